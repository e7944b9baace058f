"""The CPU metadata builder as the model runner calls it, once per step, in the style of vLLM's
tests/v1/attention: named batch specs (decode rows first), a stand-in runner holding the batch's
requests, and the step context the worker sets. What `build()` plans is checked directly: the
rows on our decode path and their order, the stock sub-batches, the one place a step's mode is
decided, the key-moment update, and the prompt-tail rows of `decode_tail`."""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm")
from vllm.config import set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from attention_backend.backend import QadaMetadata, decides_step
from attention_backend.context import reset_step_context, set_step_context
from attention_backend.cpu_backend import QadaCPUMetadataBuilder
from attention_backend.cpu_kernel import DecodePlan
from attention_backend.settings import QadaSettings
from attention_backend.testing.batches import BATCH_SPECS, BatchSpec, common_metadata, step_context

BLOCK = 32
LAYER_NAME = "model.layers.0.self_attn.attn"


@pytest.fixture(scope="module")
def builder(model_path):
    vllm_config = EngineArgs(model=str(model_path), dtype="float32").create_engine_config()
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.float32)
    with set_current_vllm_config(vllm_config):
        return QadaCPUMetadataBuilder(spec, [LAYER_NAME], vllm_config, torch.device("cpu"))


def block_table(spec: BatchSpec, seed: int = 0) -> torch.Tensor:
    """Distinct shuffled physical blocks for every row, room for 8 more tokens each."""
    blocks = [-(-(n + 8) // BLOCK) for n in spec.seq_lens]
    perm = torch.randperm(sum(blocks), generator=torch.Generator().manual_seed(seed)).int()
    table = torch.zeros(len(blocks), max(blocks), dtype=torch.int32)
    for row, start in enumerate(torch.tensor([0, *blocks]).cumsum(0)[:-1].tolist()):
        table[row, : blocks[row]] = perm[start : start + blocks[row]]
    return table


def build(builder, spec: BatchSpec, settings: dict, table: torch.Tensor | None = None, ctx=None):
    table = block_table(spec) if table is None else table
    ctx = ctx or step_context(spec, settings)
    set_step_context(ctx)
    try:
        return builder.build(0, common_metadata(spec, table, BLOCK)), table, ctx
    finally:
        reset_step_context()


@pytest.mark.parametrize("name", ["small_decode", "long_decode", "mixed"])
def test_decode_rows_come_first_in_request_order(builder, name):
    spec = BATCH_SPECS[name]
    meta, table, _ = build(builder, spec, {"policy": "local"})
    nd = spec.num_decodes
    rows = meta.decode
    assert isinstance(meta, QadaMetadata) and meta.num_decode_tokens == nd and rows.decided
    assert rows.req_ids == spec.req_ids[:nd] and rows.token_index == slice(0, nd)
    assert rows.seq_lens.tolist() == rows.seq_lens_cpu.tolist() == spec.seq_lens[:nd]
    assert torch.equal(rows.block_table, table[:nd])
    assert rows.n_bulk.tolist() == [max(n - 16 - 128, 0) for n in spec.seq_lens[:nd]]
    assert isinstance(rows.plan, DecodePlan) and rows.plan.lengths == spec.seq_lens[:nd]
    if nd == len(spec.seq_lens):
        assert meta.prefill is None
    else:  # the prefill rows' own stock metadata, re-based to their first token
        prefill = meta.prefill
        assert isinstance(prefill, CPUAttentionMetadata)
        assert prefill.seq_lens.tolist() == spec.seq_lens[nd:]
        assert prefill.query_start_loc.tolist() == [0, *torch.tensor(spec.query_lens[nd:]).cumsum(0).tolist()]
        assert prefill.num_actual_tokens == sum(spec.query_lens[nd:])
        assert torch.equal(prefill.block_table, table[nd:])


def test_a_batch_without_decode_rows_is_stock(builder):
    meta, _, _ = build(builder, BATCH_SPECS["prefill_only"], {"policy": "qada"})
    assert isinstance(meta, CPUAttentionMetadata)


def test_the_step_mode_is_decided_in_one_place():
    bulks = torch.tensor([0, 5, 10])
    assert decides_step(QadaSettings(policy="local", min_bulk=10), bulks)  # one row reaches it
    assert not decides_step(QadaSettings(policy="local", min_bulk=11), bulks)  # none does
    assert not decides_step(QadaSettings(policy="full"), bulks)
    assert decides_step(QadaSettings(policy="oracle"), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "settings, decided",
    [
        ({"policy": "full"}, False),
        ({"policy": "qada", "min_bulk": 557}, False),  # the mixed batch's decode bulks: 0, 156, 556
        ({"policy": "qada", "min_bulk": 556}, True),
    ],
)
def test_stock_fallback(builder, settings, decided):
    meta, _, ctx = build(builder, BATCH_SPECS["mixed"], settings)
    assert meta.decode.decided is decided
    if decided:
        assert meta.stock is None and meta.prefill is not None and meta.decode.plan is not None
        assert meta.decode.reads_all.tolist() == [0, 1]  # the rows below min_bulk: read in full
    else:  # the whole batch, decodes and prefills, in one stock call; nothing planned
        assert isinstance(meta.stock, CPUAttentionMetadata) and meta.stock.num_actual_tokens == 60
        assert meta.prefill is None and meta.decode.plan is None and meta.decode.moments is None
        assert not ctx.moments.slot_of


def test_build_plans_the_moment_update_once_per_step(builder):
    spec = BATCH_SPECS["long_decode"]
    meta, table, ctx = build(builder, spec, {"policy": "qada", "stats": "prompt"})
    step = meta.decode.moments
    assert [ctx.moments.end_of[r] for r in spec.req_ids] == [n - 128 for n in spec.seq_lens]
    assert step.keys_at is None and [r[2:] for r in step.ranges] == [(16, n - 128) for n in spec.seq_lens]
    # next step: each row grew by one token, so one key per row left its window
    grown = BatchSpec([n + 1 for n in spec.seq_lens], spec.query_lens)
    meta, _, _ = build(
        builder, grown, {}, table=table, ctx=step_context(grown, ctx.policy.settings, ctx.moments)
    )
    rows, positions, _ = meta.decode.moments.keys_at
    assert not meta.decode.moments.ranges and rows.tolist() == [0, 1, 2]
    assert positions.tolist() == [n - 128 for n in spec.seq_lens]


def test_decode_tail_adds_the_last_prompt_tokens_as_decode_rows(builder):
    # decodes at 40, 300, 700; a fresh prompt of 20 tokens; a chunk of 37 that ends its 500-token prompt
    spec = BATCH_SPECS["mixed"]
    meta, table, _ = build(builder, spec, {"policy": "qada", "stats": "prompt", "decode_tail": 4})
    rows = meta.decode
    nd, fresh, chunk = 3, 3, 3 + 20  # the fresh prompt's tokens start at 3, the chunk's at 23
    assert rows.num_batch_rows == nd and len(rows) == nd + 8 and rows.decided
    assert rows.token_index.tolist() == [
        0,
        1,
        2,
        *range(fresh + 16, fresh + 20),
        *range(chunk + 33, chunk + 37),
    ]
    assert rows.seq_lens_cpu.tolist() == [40, 300, 700, 17, 18, 19, 20, 497, 498, 499, 500]
    assert rows.req_ids == spec.req_ids[:3] + [spec.req_ids[3]] * 4 + [spec.req_ids[4]] * 4
    assert torch.equal(rows.block_table, table[[0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4]])
    assert meta.prefill is not None and meta.stock is None
    extra_table, extra_lens = rows.moments.extra  # prompt tails: read afresh, never stored
    assert extra_lens == [17, 18, 19, 20, 497, 498, 499, 500] and torch.equal(
        extra_table, rows.block_table[3:]
    )
    # a chunk that does not reach its prompt's last tokens adds no rows
    later = BatchSpec(spec.seq_lens, spec.query_lens, prompt_lens=[39, 299, 699, 20, 800])
    meta, _, _ = build(builder, later, {"policy": "full", "decode_tail": 4})
    assert len(meta.decode) == nd + 4 and not meta.decode.decided and meta.stock is None


def test_without_the_worker_class_decode_rows_fail_clearly(builder):
    spec = BATCH_SPECS["small_decode"]
    cm = common_metadata(spec, block_table(spec), BLOCK)
    with pytest.raises(RuntimeError, match="--worker-cls"):
        builder.build(0, cm)
    prefill = BATCH_SPECS["prefill_only"]  # profile and warm-up runs have no decode rows
    assert isinstance(
        builder.build(0, common_metadata(prefill, block_table(prefill), BLOCK)), CPUAttentionMetadata
    )


def test_a_runner_without_a_persistent_batch_fails_clearly(builder):
    spec = BATCH_SPECS["small_decode"]
    ctx = step_context(spec, {})
    ctx.runner = object()  # vLLM's V2 model runner keeps no persistent batch
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        build(builder, spec, {}, ctx=ctx)


def test_a_resumed_request_decodes_its_generated_tokens_again(builder):
    # decodes at 40, 300, 700; a fresh prompt of 20; a preempted request of a 480-token prompt and
    # 20 generated tokens recomputing its last 37 (vLLM resumes it as a prefill of all 500)
    spec = BatchSpec([40, 300, 700, 20, 500], [1, 1, 1, 20, 37], prompt_lens=[39, 299, 699, 20, 480])
    meta, table, _ = build(builder, spec, {"policy": "qada", "stats": "prompt"})
    rows, chunk = meta.decode, 3 + 20
    assert len(rows) == 3 + 20 and rows.decided and meta.prefill is not None
    assert rows.token_index.tolist() == [0, 1, 2, *range(chunk + 17, chunk + 37)]  # positions 480..499
    assert rows.seq_lens_cpu.tolist() == [40, 300, 700, *range(481, 501)]
    assert rows.req_ids == spec.req_ids[:3] + [spec.req_ids[4]] * 20
    assert torch.equal(rows.block_table[3:], table[[4] * 20])
    assert rows.replayed == (False,) * 3 + (True,) * 19 + (False,)  # 499 is new: it was never fed
    # under `full`, it is prefilled as stock vLLM does
    meta, _, _ = build(builder, spec, {"policy": "full"})
    assert len(meta.decode) == 3 and meta.stock is not None
