"""The Triton decode kernel (run by Triton's CPU interpreter) against the PyTorch reference, and
the on-device moment update against a rebuild, over vLLM's Triton paged layout."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from attention_backend import triton_kernel as tk
from attention_backend.moments_device import advance_key_moments, build_key_moments
from attention_backend.policy import PolicyConfig
from attention_backend.triton_reference import gather_row, local_mask, reference_decode

# Triton reads TRITON_INTERPRET when `@triton.jit` decorates, including its own standard library
# (tl.zeros, tl.sum, ...) at `import triton`, which vLLM does early in a full test session. So the
# kernel tests run in a fresh interpreter process: without the variable, this module only has
# `test_in_triton_interpreter`, which reruns it with TRITON_INTERPRET=1 (no env leak into the
# vLLM servers other tests start).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_in_triton_interpreter")
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf


@pytest.mark.skipif(INTERPRETED, reason="already in the interpreter")
def test_in_triton_interpreter() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "not test_in_triton_interpreter",
        ],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


T_SINK, T_LOCAL = 4, 16
TILE = 16  # several tiles per local set and per split at these lengths
SPLITS = 3


@dataclass
class Case:
    query: Tensor  # [B, Hq, D]
    key_cache: Tensor  # [num_blocks, bs, Hkv, D] views into one NaN-filled K|V cache
    value_cache: Tensor
    block_table: Tensor  # [B, max_blocks] int32, padded with a block no row owns
    seq_lens: Tensor  # [B] int32
    scale: float


def make_case(
    seq_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    capacity: list[int] | None = None,
) -> Case:
    """Random K/V in vLLM's NHD layout (K and V interleaved per token and head), physical blocks
    shuffled across rows, unwritten slots NaN. Keys get a per-KV-head offset and query heads
    random magnitudes, so decisions mix long and local."""
    gen = torch.Generator().manual_seed(seed)
    capacity = capacity or seq_lens
    blocks_per_row = [-(-c // block_size) for c in capacity]
    num_blocks = sum(blocks_per_row) + 2
    kv = torch.full((num_blocks, block_size, num_kv_heads, 2 * head_dim), math.nan, dtype=dtype)
    key_cache, value_cache = kv[..., :head_dim], kv[..., head_dim:]
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(seq_lens), max(blocks_per_row) + 1), int(perm[-1]), dtype=torch.int32)
    used = 0
    for b, (length, n_blocks) in enumerate(zip(seq_lens, blocks_per_row)):
        table[b, :n_blocks] = perm[used : used + n_blocks]
        used += n_blocks
        pos = torch.arange(length)
        blocks, offsets = table[b, pos // block_size].long(), pos % block_size
        offset = torch.randn(num_kv_heads, head_dim, generator=gen)
        key_cache[blocks, offsets] = (torch.randn(length, num_kv_heads, head_dim, generator=gen) + offset).to(
            dtype
        )
        value_cache[blocks, offsets] = torch.randn(length, num_kv_heads, head_dim, generator=gen).to(dtype)
    num_heads = num_kv_heads * group
    magnitude = torch.empty(len(seq_lens), num_heads, 1).uniform_(0.3, 3.0, generator=gen)
    query = (torch.randn(len(seq_lens), num_heads, head_dim, generator=gen) * magnitude).to(dtype)
    return Case(
        query, key_cache, value_cache, table, torch.tensor(seq_lens, dtype=torch.int32), head_dim**-0.5
    )


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
    "static": dict(policy="static"),
    "random": dict(policy="random", random_fraction=0.4),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


def policy_inputs(case: Case, cfg: PolicyConfig, seed: int = 5) -> tuple[dict, dict]:
    """Keyword arguments for (kernel, reference) carrying the same statistics / masks."""
    num_heads, head_dim = case.query.shape[1:]
    num_kv_heads = case.key_cache.shape[2]
    if cfg.policy == "qada" and cfg.stats == "prompt":
        moments = build_key_moments(case.key_cache, case.block_table, case.seq_lens, cfg.t_sink, cfg.t_local)
        return dict(moments=moments), dict(moments=moments)
    if cfg.policy == "qada" and cfg.stats == "calib":
        gen = torch.Generator().manual_seed(seed)
        mu = torch.randn(num_kv_heads, head_dim, generator=gen)
        a = torch.randn(num_kv_heads, head_dim, head_dim, generator=gen)
        calib = (mu, a @ a.transpose(1, 2) / head_dim)
        return dict(calib=calib), dict(calib=calib)
    if cfg.policy == "static":
        mask = torch.arange(num_heads) % 3 == 1  # some groups long, some local
        return dict(long_mask=mask), dict(static_mask=mask)
    if cfg.policy == "random":
        mask = tk.random_long_mask(cfg, case.query.shape[0], num_heads, torch.Generator().manual_seed(seed))
        return dict(long_mask=mask), dict(generator=torch.Generator().manual_seed(seed))
    return {}, {}


def run_kernel(case: Case, cfg: PolicyConfig, **kwargs):
    """Kernel result and its workspace, whose scratch starts NaN (so nothing unwritten passes)."""
    batch, num_heads, head_dim = case.query.shape
    num_kv_heads = case.key_cache.shape[2]
    ws = tk.alloc_workspace(
        batch, num_kv_heads, num_heads // num_kv_heads, head_dim, SPLITS, case.query.device
    )
    for t in ws.values():
        t.fill_(math.nan if t.is_floating_point() else 7)
    result = tk.qada_decode(
        case.query,
        case.key_cache,
        case.value_cache,
        case.block_table,
        case.seq_lens,
        case.scale,
        cfg,
        tile=TILE,
        workspace=ws,
        **kwargs,
    )
    return result, ws


def run_reference(case: Case, cfg: PolicyConfig, **kwargs):
    return reference_decode(
        case.query,
        case.key_cache,
        case.value_cache,
        case.block_table,
        case.seq_lens,
        case.scale,
        cfg,
        **kwargs,
    )


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


@interpreted
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case_id", CASES)
def test_kernel_matches_reference(case_id: str, policy: str) -> None:
    seq_lens, num_kv_heads, group, head_dim, block_size, dtype = CASES[case_id]
    case = make_case(seq_lens, num_kv_heads, group, head_dim, block_size, dtype, seed=len(case_id))
    cfg = PolicyConfig(t_sink=T_SINK, t_local=T_LOCAL, tau=0.5, **POLICIES[policy])
    has_bulk = (case.seq_lens.long() - T_SINK - T_LOCAL > 0).unsqueeze(1).expand(-1, case.query.shape[1])
    kernel_kw, ref_kw = policy_inputs(case, cfg)
    if cfg.policy in ("oracle", "qada"):
        tau, margin = separating_tau(run_reference(case, cfg, **ref_kw).log_ratio, has_bulk)
        assert margin > 1e-3, "test data puts a decision within float error of the threshold"
        cfg = PolicyConfig(**{**cfg.__dict__, "tau": tau})

    got, ws = run_kernel(case, cfg, **kernel_kw)
    want = run_reference(case, cfg, **ref_kw)

    assert got.output.dtype == case.query.dtype and got.output.shape == case.query.shape
    assert torch.equal(got.long_heads, want.long_heads)
    assert torch.equal(got.long_groups, want.long_groups)
    torch.testing.assert_close(got.output.float(), want.output, **tolerance(dtype))
    if want.log_ratio is not None:  # the quantity thresholded, not just the decisions
        torch.testing.assert_close(ws["log_ratio"], want.log_ratio, atol=1e-4, rtol=1e-4)
    # stage 2 wrote partials exactly for the groups whose bulk it had to read
    read = got.long_groups | ((case.seq_lens > T_SINK + T_LOCAL).unsqueeze(1) & (cfg.policy == "oracle"))
    written = ~ws["part_lse"].isnan().all(-1).all(-1)
    assert torch.equal(written, read)
    if cfg.policy not in ("full", "local"):  # the case exercises both decisions
        assert want.long_heads.any() and not want.long_heads[has_bulk].all()
    assert not want.long_heads[~has_bulk].any()


@interpreted
def test_local_groups_never_read_their_bulk() -> None:
    """NaN in every bulk-only block of the KV heads of local groups changes nothing."""
    case = make_case(
        [300, 170], num_kv_heads=3, group=2, head_dim=64, block_size=16, dtype=torch.float16, seed=3
    )
    cfg = PolicyConfig(policy="static", t_sink=T_SINK, t_local=T_LOCAL)
    mask = torch.tensor([False, False, True, False, False, False])  # only KV head 1 is long
    before, _ = run_kernel(case, cfg, long_mask=mask)
    assert before.long_groups.tolist() == [[False, True, False]] * 2
    for b, length in enumerate(case.seq_lens.tolist()):
        for j in range(-(-length // 16)):
            if j * 16 >= T_SINK and (j + 1) * 16 <= length - T_LOCAL:
                block = int(case.block_table[b, j])
                case.key_cache[block, :, [0, 2]] = math.nan
                case.value_cache[block, :, [0, 2]] = math.nan
    after, _ = run_kernel(case, cfg, long_mask=mask)
    assert torch.isfinite(after.output).all()
    assert torch.equal(after.output, before.output)


@interpreted
def test_moments_build_matches_gathered_keys() -> None:
    case = make_case(
        [90, 20, 21, 47], num_kv_heads=2, group=1, head_dim=64, block_size=16, dtype=torch.bfloat16, seed=4
    )
    n, s1, s2 = build_key_moments(case.key_cache, case.block_table, case.seq_lens, T_SINK, T_LOCAL, chunk=32)
    for b, length in enumerate(case.seq_lens.tolist()):
        keys = gather_row(case.key_cache, case.block_table[b], 0, length)[
            ~local_mask(length, T_SINK, T_LOCAL)
        ]
        assert n[b] == keys.shape[0] == max(length - T_SINK - T_LOCAL, 0)
        torch.testing.assert_close(s1[b], keys.sum(0))
        torch.testing.assert_close(s2[b], torch.einsum("nhd,nhe->hde", keys, keys))


@interpreted
def test_moments_advance_matches_rebuild() -> None:
    """Decode steps append a token per row; advancing each step equals rebuilding at the end.
    Row 1 starts without bulk and gains one; moments live in shuffled pool rows."""
    start, steps = [60, 12, 33], 14
    full = make_case(
        [s + steps for s in start],
        num_kv_heads=2,
        group=1,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        seed=6,
    )
    lens = torch.tensor(start, dtype=torch.int32)
    pool_rows = torch.tensor([2, 0, 3])
    n, s1, s2 = (
        torch.zeros(4, *t.shape[1:], dtype=t.dtype)
        for t in build_key_moments(full.key_cache, full.block_table, lens, T_SINK, T_LOCAL)
    )
    built = build_key_moments(full.key_cache, full.block_table, lens, T_SINK, T_LOCAL)
    n[pool_rows], s1[pool_rows], s2[pool_rows] = built
    for _ in range(steps):
        lens += 1  # the new token's K/V is already in the cache, as in vLLM's forward
        advance_key_moments(
            n, s1, s2, full.key_cache, full.block_table, lens, T_SINK, T_LOCAL, rows=pool_rows
        )
    want = build_key_moments(full.key_cache, full.block_table, lens, T_SINK, T_LOCAL)
    assert torch.equal(n[pool_rows], want[0])
    torch.testing.assert_close(s1[pool_rows], want[1])
    torch.testing.assert_close(s2[pool_rows], want[2])

    # and the advanced moments drive the kernel exactly like rebuilt ones
    cfg = PolicyConfig(policy="qada", stats="prompt", tau=0.5, t_sink=T_SINK, t_local=T_LOCAL)
    query_case = Case(full.query, full.key_cache, full.value_cache, full.block_table, lens, full.scale)
    pooled, _ = run_kernel(query_case, cfg, moments=(n, s1, s2), moment_rows=pool_rows)
    rebuilt, _ = run_kernel(query_case, cfg, moments=want)
    assert torch.equal(pooled.long_heads, rebuilt.long_heads)
    torch.testing.assert_close(pooled.output, rebuilt.output)
