"""The QAdA CPU builder and impl against vLLM's stock CPU backend on one mixed batch (decode rows
first, then a fresh and a chunked prefill), with vLLM's own KV write and kernel and shuffled
physical blocks: the step as the engine runs it, from `build()` to every layer's `forward`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

vllm = pytest.importorskip("vllm")
from vllm import _custom_ops as ops
from vllm.config import set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder
from vllm.v1.kv_cache_interface import FullAttentionSpec

from attention_backend.backend import QadaMetadata
from attention_backend.context import reset_step_context, set_step_context
from attention_backend.cpu_backend import QadaCPUImpl, QadaCPUMetadataBuilder
from attention_backend.testing.batches import BATCH_SPECS, common_metadata, step_context
from attention_backend.testing.paged_cases import local_positions

HQ, HKV, D, LAYER = 9, 3, 64, 3
SPEC = BATCH_SPECS["mixed"]  # decodes at 40, 300, 700; a fresh prompt of 20 and a chunk of 37 at 500
ND = SPEC.num_decodes
T_SINK, T_LOCAL = 16, 128
LAYER_NAME = f"model.layers.{LAYER}.self_attn.attn"


@pytest.fixture(scope="module")
def vllm_config(model_path):
    return EngineArgs(model=str(model_path), dtype="float32").create_engine_config()


def make_batch(block_size: int, dtype: torch.dtype, seed: int = 0):
    """SPEC's K/V written by vLLM's cache write into shuffled blocks, and its queries."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in SPEC.seq_lens]
    perm = torch.randperm(sum(blocks) + 2, generator=gen)
    table = torch.zeros(len(SPEC.seq_lens), max(blocks), dtype=torch.int32)
    kv = torch.zeros(sum(blocks) + 2, HKV, block_size, 2 * D, dtype=dtype)
    key_cache, value_cache = kv.view(kv.shape[0], HKV, 2 * block_size, D).chunk(2, dim=2)
    keys, values, slots, used = [], [], [], 0
    for row, (n, nb) in enumerate(zip(SPEC.seq_lens, blocks)):
        table[row, :nb] = perm[used : used + nb]
        used += nb
        k = torch.randn(n, HKV, D, generator=gen) + torch.randn(HKV, D, generator=gen)  # mean offset
        keys.append(k.to(dtype))
        values.append(torch.randn(n, HKV, D, generator=gen).to(dtype))
        pos = torch.arange(n)
        slots.append(table[row, pos // block_size].long() * block_size + pos % block_size)
    ops.cpu_attn_reshape_and_cache(
        torch.cat(keys),
        torch.cat(values),
        key_cache,
        value_cache,
        torch.cat(slots),
        "vec",
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype="auto",
    )
    query = (torch.randn(sum(SPEC.query_lens), HQ, D, generator=gen) * 2).to(dtype)
    return SimpleNamespace(kv=kv, keys=keys, values=values, table=table, query=query)


def run_both(batch, vllm_config, dtype, block_size: int, settings: dict):
    """The stock CPU backend's output and ours (and our metadata) for one layer of the step."""
    layer = SimpleNamespace(layer_name=LAYER_NAME, isa="vec", _k_scale_float=1.0, _v_scale_float=1.0)
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HKV, head_size=D, dtype=dtype)
    cm = common_metadata(SPEC, batch.table, block_size)
    with set_current_vllm_config(vllm_config):
        stock_builder = CPUAttentionMetadataBuilder(spec, [LAYER_NAME], vllm_config, torch.device("cpu"))
        builder = QadaCPUMetadataBuilder(spec, [LAYER_NAME], vllm_config, torch.device("cpu"))
        stock = CPUAttentionBackendImpl(HQ, D, D**-0.5, HKV, None, None, "auto")
        ours = QadaCPUImpl(HQ, D, D**-0.5, HKV, None, None, "auto")
    out_stock, out_ours = torch.zeros_like(batch.query), torch.full_like(batch.query, float("nan"))
    stock.forward(layer, batch.query, None, None, batch.kv, stock_builder.build(0, cm), out_stock)
    set_step_context(ctx := step_context(SPEC, settings))
    try:
        meta = builder.build(0, cm)
        ours.forward(layer, batch.query, None, None, batch.kv, meta, out_ours)
    finally:
        reset_step_context()
    return out_stock.float(), out_ours.float(), meta, ctx.step_decisions()


def decode_reference(batch, row: int, long_groups: list[bool]) -> torch.Tensor:
    """Contiguous SDPA for decode row `row`: long groups see everything, others sink+window."""
    n = SPEC.seq_lens[row]
    long_heads = torch.tensor(long_groups).repeat_interleave(HQ // HKV)
    mask = local_positions(n, T_SINK, T_LOCAL).unsqueeze(0) | long_heads.unsqueeze(1)
    q = batch.query[row].float()[None, :, None]
    k = batch.keys[row].float().transpose(0, 1)[None]
    v = batch.values[row].float().transpose(0, 1)[None]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[None, :, None], scale=D**-0.5, enable_gqa=True
    )
    return out[0, :, 0]


TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [32, 128])
def test_policy_full_equals_stock_backend(vllm_config, dtype, block_size):
    batch = make_batch(block_size, dtype)
    stock, ours, meta, _ = run_both(batch, vllm_config, dtype, block_size, {"policy": "full"})
    assert isinstance(meta, QadaMetadata) and meta.stock is not None  # not decided: the stock kernel
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)


@pytest.mark.parametrize("block_size", [32, 128])
def test_policy_local_decodes_sink_and_window_and_keeps_prefill_stock(vllm_config, block_size):
    batch = make_batch(block_size, torch.float32, seed=1)
    stock, ours, meta, _ = run_both(batch, vllm_config, torch.float32, block_size, {"policy": "local"})
    assert meta.stock is None and meta.prefill is not None and meta.decode.decided
    torch.testing.assert_close(ours[ND:], stock[ND:], **TOL[torch.float32])
    for row in range(ND):
        torch.testing.assert_close(
            ours[row], decode_reference(batch, row, [False] * HKV), **TOL[torch.float32]
        )
    assert not torch.allclose(ours[2], stock[2], atol=1e-3)  # 700 tokens: local really differs


def test_mixed_per_group_decisions_match_masked_reference(vllm_config):
    batch = make_batch(32, torch.float32, seed=2)  # in layer LAYER, query head 4 (KV group 1) is long
    _, ours, _, step = run_both(
        batch, vllm_config, torch.float32, 32, {"policy": "static", "static_heads": [[LAYER, 4]]}
    )
    for row in range(ND):
        has_bulk = SPEC.seq_lens[row] > T_SINK + T_LOCAL
        expected = decode_reference(batch, row, [False, has_bulk, False])
        torch.testing.assert_close(ours[row], expected, **TOL[torch.float32])
    assert step.groups[:, 0].tolist() == [[False, s > T_SINK + T_LOCAL, False] for s in SPEC.seq_lens[:ND]]


@pytest.mark.parametrize("policy", ["local", "qada"])
def test_rows_below_min_bulk_read_everything(vllm_config, policy):
    """A row whose bulk is shorter than min_bulk reads everything, as stock does (its heads with
    a bulk count as long), whatever the other rows of its step: a step of only such rows runs
    stock; in a decided step, the others are decided as without min_bulk."""
    batch = make_batch(32, torch.float32, seed=7)
    bulks = [max(n - T_SINK - T_LOCAL, 0) for n in SPEC.seq_lens[:ND]]  # 0, 156, 556
    settings = {"policy": policy, "tau": 0.5}
    _, plain, _, plain_step = run_both(batch, vllm_config, torch.float32, 32, settings)
    stock, above, meta, step = run_both(
        batch, vllm_config, torch.float32, 32, {**settings, "min_bulk": max(bulks) + 1}
    )
    assert meta.stock is not None
    torch.testing.assert_close(above, stock, rtol=0, atol=0)
    has_bulk = torch.tensor([b > 0 for b in bulks])
    assert torch.equal(step.heads[:, 0], has_bulk.unsqueeze(1).expand(ND, HQ))
    _, mixed, meta, mixed_step = run_both(
        batch, vllm_config, torch.float32, 32, {**settings, "min_bulk": max(bulks)}
    )
    assert meta.decode.decided and meta.decode.reads_all.tolist() == [0, 1]
    torch.testing.assert_close(mixed[:2], stock[:2], **TOL[torch.float32])  # read in full
    assert torch.equal(mixed[2], plain[2]) and torch.equal(mixed_step.heads[2], plain_step.heads[2])
    assert torch.equal(mixed_step.heads[:2, 0], has_bulk[:2].unsqueeze(1).expand(2, HQ))
    if policy == "local":  # without min_bulk, row 1 skipped its bulk: min_bulk really changed it
        assert not plain_step.heads[1, 0].any() and not torch.allclose(plain[1], stock[1], atol=1e-3)
