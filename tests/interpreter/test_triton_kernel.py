"""The Triton decode kernel, run by Triton's CPU interpreter, against the PyTorch reference over
vLLM's Triton paged layout, for every policy; and pooled key moments (the worker's store) driving
it exactly like moments read afresh. Run with TRITON_INTERPRET=1 (`make test` does)."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from attention_backend import triton_kernel as tk
from attention_backend.kv_layout import TRITON_NHD
from attention_backend.moments import MomentStore
from attention_backend.policy import NO_INPUTS, PolicyInputs
from attention_backend.reference import reference_decode
from attention_backend.settings import QadaSettings
from attention_backend.testing.paged_cases import PagedCase, make_case, policy_inputs

if os.environ.get("TRITON_INTERPRET") != "1":  # Triton reads it when kernels are decorated
    pytest.skip("run with TRITON_INTERPRET=1 (make test does)", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf

T_SINK, T_LOCAL = 4, 16
TILE = 16  # several tiles per local set and per split at these lengths
SPLITS = 3

# (seq_lens, Hkv, G, D, block_size, dtype). Lengths <= T_SINK + T_LOCAL = 20 are trivially local;
# 21 has a one-token bulk.
CASES = {
    "g1-d64-bs16-fp32": ([150, 20, 77], 2, 1, 64, 16, torch.float32),
    "g3-d128-bs32-fp16": ([201, 9, 21], 2, 3, 128, 32, torch.float16),
    "g8-d64-bs32-bf16": ([260, 45], 1, 8, 64, 32, torch.bfloat16),
    "g3-d64-bs16-bf16": ([5, 300, 123], 3, 3, 64, 16, torch.bfloat16),
}
POLICIES = {
    "full": dict(policy="full"),
    "local": dict(policy="local"),
    "oracle": dict(policy="oracle"),
    "qada-prompt": dict(policy="qada", stats="prompt"),
    "qada-calib": dict(policy="qada", stats="calib"),
    "qada-local": dict(policy="qada", stats="local"),
    "qada-pages": dict(policy="qada", stats="pages", page_chunk=16),
    "qada-bound": dict(policy="qada", stats="pages_bound", page_chunk=16),
    "qada-pages-mean": dict(policy="qada", stats="pages", page_chunk=16, groups="mean"),
    "oracle-mean": dict(policy="oracle", groups="mean"),
    "static": dict(policy="static"),
    "random": dict(policy="random", random_fraction=0.4),
}


def triton_case(
    seq_lens, num_kv_heads, group, head_dim, block_size, dtype, seed=0, capacity=None
) -> PagedCase:
    """A case in vLLM's NHD layout (K and V interleaved per token and head), unwritten slots NaN."""
    return make_case(
        seq_lens,
        num_kv_heads,
        group,
        block_size,
        dtype,
        seed=seed,
        head_dim=head_dim,
        capacity=capacity,
        layout=TRITON_NHD,
    )


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


def run_kernel(case: PagedCase, cfg: QadaSettings, inputs: PolicyInputs = NO_INPUTS):
    """Kernel result and its workspace, whose scratch starts NaN (so nothing unwritten passes)."""
    batch, num_heads, head_dim = case.query.shape
    ws = tk.alloc_workspace(batch, case.num_kv_heads, num_heads // case.num_kv_heads, head_dim, SPLITS, "cpu")
    for t in ws.values():
        t.fill_(math.nan if t.is_floating_point() else 7)
    result = tk.qada_decode(case.batch(), cfg, inputs, tile=TILE, workspace=ws)
    return result, ws


def run_reference(case: PagedCase, cfg: QadaSettings, inputs: PolicyInputs = NO_INPUTS):
    return reference_decode(TRITON_NHD, case.batch(), cfg, inputs)


def separating_tau(log_ratio: Tensor, has_bulk: Tensor) -> tuple[float, float]:
    """A tau whose logit lies in the widest gap between the sorted log-ratios of heads with a
    bulk near their median, so some heads go long and some local; and the distance from that
    logit to the nearest log-ratio (the margin decisions must survive)."""
    values = log_ratio[has_bulk].sort().values
    mid = len(values) // 2
    lo, hi = max(mid - 3, 0), min(mid + 3, len(values) - 1)
    gaps = values[lo + 1 : hi + 1] - values[lo:hi]
    i = lo + int(gaps.argmax())
    logit = float(values[i] + values[i + 1]) / 2
    return 1 / (1 + math.exp(-logit)), float(gaps.max()) / 2


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case_id", CASES)
def test_kernel_matches_reference(case_id: str, policy: str) -> None:
    case = triton_case(*CASES[case_id], seed=len(case_id))
    dtype = case.query.dtype
    cfg = QadaSettings(t_sink=T_SINK, t_local=T_LOCAL, tau=0.5, **POLICIES[policy])
    has_bulk = (case.seq_lens.long() - T_SINK - T_LOCAL > 0).unsqueeze(1).expand(-1, case.query.shape[1])
    inputs = policy_inputs(case, cfg)
    if cfg.needs_exact_bulk or cfg.estimates_bulk:
        tau, margin = separating_tau(run_reference(case, cfg, inputs).log_ratio, has_bulk)
        assert margin > 1e-3, "test data puts a decision within float error of the threshold"
        cfg = cfg.replace(tau=tau)

    got, ws = run_kernel(case, cfg, inputs)
    want = run_reference(case, cfg, inputs)

    assert got.output.dtype == case.query.dtype and got.output.shape == case.query.shape
    assert torch.equal(got.long_heads, want.long_heads)
    assert torch.equal(got.long_groups, want.long_groups)
    torch.testing.assert_close(got.output.float(), want.output, **tolerance(dtype))
    if want.log_ratio is not None:  # the quantity thresholded, not just the decisions
        torch.testing.assert_close(ws["log_ratio"], want.log_ratio, atol=1e-4, rtol=1e-4)
    # stage 2 wrote partials exactly for the groups whose bulk it had to read
    read = got.long_groups | ((case.seq_lens > T_SINK + T_LOCAL).unsqueeze(1) & cfg.needs_exact_bulk)
    written = ~ws["part_lse"].isnan().all(-1).all(-1)
    assert torch.equal(written, read)
    if cfg.decides and cfg.policy != "local":  # the case exercises both decisions
        assert want.long_heads.any() and not want.long_heads[has_bulk].all()
    assert not want.long_heads[~has_bulk].any()


def test_local_groups_never_read_their_bulk() -> None:
    """NaN in every bulk-only block of the KV heads of local groups changes nothing."""
    case = triton_case(
        [300, 170], num_kv_heads=3, group=2, head_dim=64, block_size=16, dtype=torch.float16, seed=3
    )
    cfg = QadaSettings(policy="static", t_sink=T_SINK, t_local=T_LOCAL)
    mask = torch.tensor([False, False, True, False, False, False])  # only KV head 1 is long
    before, _ = run_kernel(case, cfg, PolicyInputs(long_mask=mask))
    assert before.long_groups.tolist() == [[False, True, False]] * 2
    for b, length in enumerate(case.seq_lens.tolist()):
        for j in range(-(-length // 16)):
            if j * 16 >= T_SINK and (j + 1) * 16 <= length - T_LOCAL:
                block = int(case.block_table[b, j])
                case.key_cache[block, :, [0, 2]] = math.nan
                case.value_cache[block, :, [0, 2]] = math.nan
    after, _ = run_kernel(case, cfg, PolicyInputs(long_mask=mask))
    assert torch.isfinite(after.output).all()
    assert torch.equal(after.output, before.output)


def test_pooled_moments_drive_the_kernel_like_fresh_ones() -> None:
    """The worker's store keeps moments in a pool, read in place by slot; decode steps append a
    token per row (row 1 starts without bulk and gains one). After the steps, the pooled sums
    give the kernel the decisions and outputs of sums read afresh."""
    start, steps = [60, 12, 33], 14
    case = triton_case(
        [s + steps for s in start],
        num_kv_heads=2,
        group=1,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        seed=6,
    )
    cfg = QadaSettings(policy="qada", stats="prompt", tau=0.5, t_sink=T_SINK, t_local=T_LOCAL)
    store = MomentStore()
    store.plan(["other"], case.block_table[:1], [40], cfg.window, 16)  # a slot in use before ours
    lens = torch.tensor(start, dtype=torch.int32)
    for _ in range(steps + 1):
        step = store.plan(["a", "b", "c"], case.block_table, lens.tolist(), cfg.window, 16)
        pooled = store.read(0, TRITON_NHD, case.key_cache, step)
        lens += 1  # the new token's K/V is already in the cache, as in vLLM's forward
    lens -= 1
    assert pooled.rows is not None and pooled.rows.tolist() != [0, 1, 2]
    now = replace(case, seq_lens=lens)
    fresh = policy_inputs(now, cfg)
    got, _ = run_kernel(now, cfg, PolicyInputs(moments=pooled))
    want, _ = run_kernel(now, cfg, fresh)
    assert torch.equal(got.long_heads, want.long_heads) and got.long_heads.any() and not got.long_heads.all()
    torch.testing.assert_close(got.output, want.output)
