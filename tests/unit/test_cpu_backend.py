"""The QAdA impl against vLLM's stock CPU impl on one mixed batch (decode rows first, then a fresh
and a chunked prefill), with vLLM's own KV write and kernel, shuffled physical blocks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from paged_helpers import local_positions

vllm = pytest.importorskip("vllm")
from vllm import _custom_ops as ops  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import (  # noqa: E402
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
)

from attention_backend.cpu_backend import QadaCPUImpl, QadaCPUMetadata  # noqa: E402
from attention_backend.state import WORKER_STATE  # noqa: E402

HQ, HKV, D, LAYER = 9, 3, 64, 3
DECODE_LENS = [40, 300, 700]  # one query each
PREFILL = [(20, 20), (37, 500)]  # (new tokens, seq len): a fresh prompt and a chunked one
T_SINK, T_LOCAL = 16, 128


@pytest.fixture(scope="module")
def vllm_config(model_path):
    return EngineArgs(
        model=str(model_path), dtype="float32", additional_config={"qada": {"policy": "full"}}
    ).create_engine_config()


def metadata(seq_lens, query_lens, block_table, dtype) -> CPUAttentionMetadata:
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    scheduler = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens),
        num_heads=HQ,
        num_kv_heads=HKV,
        head_dim=D,
        seq_lens=seq_lens,
        dtype=dtype,
        query_start_loc=qsl,
        causal=True,
        sliding_window_size=-1,
        isa="vec",
        enable_kv_split=False,
        dynamic_causal=None,
        kv_cache_dtype="auto",
    )
    return CPUAttentionMetadata(
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(query_lens),
        query_start_loc=qsl,
        max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens,
        block_table=block_table,
        slot_mapping=torch.empty(0, dtype=torch.int64),
        scheduler_metadata=scheduler,
    )


def make_batch(block_size: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = DECODE_LENS + [n for _, n in PREFILL]
    query_lens = [1] * len(DECODE_LENS) + [q for q, _ in PREFILL]
    blocks = [-(-n // block_size) for n in seq_lens]
    perm = torch.randperm(sum(blocks) + 2, generator=gen)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    kv = torch.zeros(sum(blocks) + 2, HKV, block_size, 2 * D, dtype=dtype)
    key_cache, value_cache = kv.view(kv.shape[0], HKV, 2 * block_size, D).chunk(2, dim=2)
    keys, values, slots, used = [], [], [], 0
    for row, (n, nb) in enumerate(zip(seq_lens, blocks)):
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
    query = (torch.randn(sum(query_lens), HQ, D, generator=gen) * 2).to(dtype)
    return SimpleNamespace(
        kv=kv, keys=keys, values=values, table=table, query=query, seq_lens=seq_lens, query_lens=query_lens
    )


def run_both(batch, vllm_config, dtype, settings: dict):
    layer = SimpleNamespace(
        layer_name=f"model.layers.{LAYER}.self_attn.attn", isa="vec", _k_scale_float=1.0, _v_scale_float=1.0
    )
    nd = len(DECODE_LENS)
    stock_meta = metadata(batch.seq_lens, batch.query_lens, batch.table, dtype)
    ours_meta = QadaCPUMetadata(
        num_decodes=nd,
        num_decode_tokens=nd,
        decode_seq_lens=torch.tensor(DECODE_LENS, dtype=torch.int32),
        decode_block_table=batch.table[:nd],
        decode_req_ids=[f"r{i}" for i in range(nd)],
        prefill=metadata(batch.seq_lens[nd:], batch.query_lens[nd:], batch.table[nd:], dtype),
    )
    with set_current_vllm_config(vllm_config):
        stock = CPUAttentionBackendImpl(HQ, D, D**-0.5, HKV, None, None, "auto")
        ours = QadaCPUImpl(HQ, D, D**-0.5, HKV, None, None, "auto")
    WORKER_STATE.configure(settings)
    WORKER_STATE.moments.clear()
    out_stock, out_ours = torch.zeros_like(batch.query), torch.full_like(batch.query, float("nan"))
    stock.forward(layer, batch.query, None, None, batch.kv, stock_meta, out_stock)
    ours.forward(layer, batch.query, None, None, batch.kv, ours_meta, out_ours)
    WORKER_STATE.counters.end_step()
    return out_stock.float(), out_ours.float()


def decode_reference(batch, row: int, long_groups: list[bool]) -> torch.Tensor:
    """Contiguous SDPA for decode row `row`: long groups see everything, others sink+window."""
    n = batch.seq_lens[row]
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
    stock, ours = run_both(batch, vllm_config, dtype, {"policy": "full"})
    torch.testing.assert_close(ours, stock, **TOL[dtype])


@pytest.mark.parametrize("block_size", [32, 128])
def test_policy_local_decodes_sink_and_window_and_keeps_prefill_stock(vllm_config, block_size):
    batch = make_batch(block_size, torch.float32, seed=1)
    stock, ours = run_both(batch, vllm_config, torch.float32, {"policy": "local"})
    nd = len(DECODE_LENS)
    torch.testing.assert_close(ours[nd:], stock[nd:], **TOL[torch.float32])
    for row in range(nd):
        torch.testing.assert_close(
            ours[row], decode_reference(batch, row, [False] * HKV), **TOL[torch.float32]
        )
    assert not torch.allclose(ours[2], stock[2], atol=1e-3)  # 700 tokens: local really differs


def test_mixed_per_group_decisions_match_masked_reference(vllm_config, tmp_path):
    path = tmp_path / "heads.json"  # in layer LAYER, query head 4 (KV group 1) is long
    path.write_text(json.dumps({"num_layers": 30, "num_heads": HQ, "long_heads": [[LAYER, 4]]}))
    batch = make_batch(32, torch.float32, seed=2)
    _, ours = run_both(batch, vllm_config, torch.float32, {"policy": "static", "static_heads": str(path)})
    for row in range(len(DECODE_LENS)):
        has_bulk = DECODE_LENS[row] > T_SINK + T_LOCAL
        expected = decode_reference(batch, row, [False, has_bulk, False])
        torch.testing.assert_close(ours[row], expected, **TOL[torch.float32])
