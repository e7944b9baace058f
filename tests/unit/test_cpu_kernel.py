"""paged_decode against contiguous references (SDPA, and decisions recomputed from raw keys)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from attention_backend import summary_scores
from attention_backend.cpu_kernel import _HeadViews, _local_attention, paged_decode, plan_decode
from attention_backend.kv_layout import CPU_VEC
from attention_backend.moments import fresh_moments
from attention_backend.policy import PolicyInputs, group_rule, local_mask, random_long_mask
from attention_backend.settings import QadaSettings
from attention_backend.testing.paged_cases import (
    PagedCase,
    local_positions,
    make_case,
    masked_reference,
    policy_inputs,
    relayout,
    row_scores,
    sdpa_row,
    tolerance,
)

T_SINK, T_LOCAL = 16, 64  # trivially local for L <= 80
# (seq_lens, Hkv, group, block_size, dtype): ragged rows, rows without bulk, rows with 1-3 bulk tokens.
CASES = [
    ([300], 2, 1, 32, torch.float32),
    ([70, 200, 95], 2, 3, 32, torch.bfloat16),
    ([1, 17, 80, 81, 83, 300, 520, 129], 1, 7, 128, torch.float32),
    ([600, 82, 40], 3, 3, 128, torch.bfloat16),
    ([5, 81, 96, 97, 250, 410, 150, 333], 2, 7, 32, torch.bfloat16),
]
CASE_IDS = [f"B{len(c[0])}-kv{c[1]}-g{c[2]}-bs{c[3]}-{str(c[4])[6:]}" for c in CASES]


@pytest.fixture(params=range(len(CASES)), ids=CASE_IDS)
def case(request: pytest.FixtureRequest) -> PagedCase:
    seq_lens, num_kv_heads, group, block_size, dtype = CASES[request.param]
    return make_case(seq_lens, num_kv_heads, group, block_size, dtype, seed=request.param)


def decode(case: PagedCase, cfg: QadaSettings, plan=None, **inputs):
    return paged_decode(case.batch(), cfg, PolicyInputs(**inputs), plan=plan)


def n_bulk(case: PagedCase, t_sink: int = T_SINK, t_local: int = T_LOCAL) -> torch.Tensor:
    return (case.seq_lens.long() - t_sink - t_local).clamp(min=0)


def assert_matches_masked_reference(case: PagedCase, result, t_sink: int = T_SINK, t_local: int = T_LOCAL):
    assert result.output.dtype == case.query.dtype
    assert torch.isfinite(result.output.float()).all()
    expected = masked_reference(case, result.long_groups, t_sink, t_local)
    torch.testing.assert_close(result.output.float(), expected, **tolerance(case.query.dtype))


def assert_decisions(case: PagedCase, result, log_ratio: torch.Tensor, tau: float) -> None:
    """long_heads == (log_ratio > logit(tau)) where the bulk is non-empty, up to fp ties."""
    margin = log_ratio - math.log(tau / (1 - tau))
    expected = (margin > 0) & (n_bulk(case) > 0).unsqueeze(1)
    disagree = result.long_heads != expected
    assert (margin[disagree].abs() < 1e-3).all(), f"decisions differ at {disagree.nonzero().tolist()}"
    assert torch.equal(result.long_groups, group_rule(result.long_heads, case.num_kv_heads))


def local_and_bulk_scores(case: PagedCase, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = int(case.seq_lens[b])
    local = local_positions(length, T_SINK, T_LOCAL)
    scores = row_scores(case, b)
    return scores[:, local], scores[:, ~local]


def test_full_equals_sdpa(case: PagedCase) -> None:
    result = decode(case, QadaSettings(policy="full", t_sink=T_SINK, t_local=T_LOCAL))
    expected = torch.stack([sdpa_row(case, b) for b in range(len(case.keys))])
    torch.testing.assert_close(result.output.float(), expected, **tolerance(case.query.dtype))
    assert torch.equal(result.long_heads, (n_bulk(case) > 0).unsqueeze(1).expand_as(result.long_heads))


@pytest.mark.parametrize("t_sink,t_local", [(T_SINK, T_LOCAL), (0, 1), (5, 20), (40, 200)])
def test_local_equals_window_reference(case: PagedCase, t_sink: int, t_local: int) -> None:
    result = decode(case, QadaSettings(policy="local", t_sink=t_sink, t_local=t_local))
    assert not result.long_heads.any() and not result.long_groups.any()
    assert_matches_masked_reference(case, result, t_sink, t_local)


def test_static_mask_mixed_heads(case: PagedCase) -> None:
    num_heads = case.query.shape[1]
    mask = torch.arange(num_heads) % 3 == 1  # one head in three: some groups long, some local
    result = decode(case, QadaSettings(policy="static", t_sink=T_SINK, t_local=T_LOCAL), long_mask=mask)
    assert torch.equal(result.long_heads, mask & (n_bulk(case) > 0).unsqueeze(1))
    assert_matches_masked_reference(case, result)


def test_random_is_seeded_and_exact(case: PagedCase) -> None:
    cfg = QadaSettings(policy="random", random_fraction=0.4, t_sink=T_SINK, t_local=T_LOCAL)
    batch, heads = case.query.shape[:2]
    first = decode(case, cfg, long_mask=random_long_mask(0.4, batch, heads, torch.Generator().manual_seed(7)))
    again = decode(case, cfg, long_mask=random_long_mask(0.4, batch, heads, torch.Generator().manual_seed(7)))
    assert torch.equal(first.long_heads, again.long_heads)
    assert_matches_masked_reference(case, first)


def test_oracle_decisions(case: PagedCase) -> None:
    tau = 0.5
    result = decode(case, QadaSettings(policy="oracle", tau=tau, t_sink=T_SINK, t_local=T_LOCAL))
    log_ratio = torch.stack(
        [
            bulk.logsumexp(-1) - local.logsumexp(-1)
            for local, bulk in (local_and_bulk_scores(case, b) for b in range(len(case.keys)))
        ]
    )
    assert_decisions(case, result, log_ratio, tau)
    assert_matches_masked_reference(case, result)


def gaussian_log_ratio(case: PagedCase, b: int, n: float, mu, sigma, local) -> torch.Tensor:
    """QAdA's estimated log(A_B / A_L) per query head of row b, for bulk keys ~ N(mu, sigma) per
    KV head (mu [Hkv, D], sigma [Hkv, D, D]), written out independently of policy.py."""
    group = case.query.shape[1] // case.num_kv_heads
    mu, sigma = mu.repeat_interleave(group, 0), sigma.repeat_interleave(group, 0)
    q = case.query[b].float()
    est = (
        (math.log(n) if n > 0 else -math.inf)
        + case.scale * (q * mu).sum(-1)
        + case.scale**2 * torch.einsum("hd,hde,he->h", q, sigma, q) / 2
    )
    return est - local.logsumexp(-1)


@pytest.mark.parametrize("tau", [0.3, 0.8])
def test_qada_prompt_decisions(case: PagedCase, tau: float) -> None:
    cfg = QadaSettings(policy="qada", stats="prompt", tau=tau, t_sink=T_SINK, t_local=T_LOCAL)
    moments = fresh_moments(
        CPU_VEC, case.key_cache, case.block_table, case.seq_lens.tolist(), T_SINK, T_LOCAL
    )
    result = decode(case, cfg, moments=moments)

    rows = []
    for b, length in enumerate(case.seq_lens.tolist()):
        local, _ = local_and_bulk_scores(case, b)
        bulk_keys = case.keys[b][~local_positions(length, T_SINK, T_LOCAL)].float()  # [n, Hkv, D]
        if bulk_keys.shape[0] == 0:
            rows.append(torch.full((case.query.shape[1],), -math.inf))
            continue
        mu = bulk_keys.mean(0)
        sigma = torch.stack([torch.cov(bulk_keys[:, h].T, correction=0) for h in range(case.num_kv_heads)])
        rows.append(gaussian_log_ratio(case, b, bulk_keys.shape[0], mu, sigma, local))
    assert_decisions(case, result, torch.stack(rows), tau)
    assert_matches_masked_reference(case, result)


def test_qada_calib_decisions(case: PagedCase) -> None:
    tau = 0.5
    gen = torch.Generator().manual_seed(3)
    head_dim = case.query.shape[2]
    mu = torch.randn(case.num_kv_heads, head_dim, generator=gen)
    a = torch.randn(case.num_kv_heads, head_dim, head_dim, generator=gen)
    sigma = a @ a.transpose(1, 2) / head_dim
    cfg = QadaSettings(policy="qada", stats="calib", tau=tau, t_sink=T_SINK, t_local=T_LOCAL)
    result = decode(case, cfg, calib=(mu, sigma))

    rows = []
    for b in range(len(case.keys)):
        local, _ = local_and_bulk_scores(case, b)
        rows.append(gaussian_log_ratio(case, b, float(n_bulk(case)[b]), mu, sigma, local))
    assert_decisions(case, result, torch.stack(rows), tau)
    assert_matches_masked_reference(case, result)


@pytest.mark.parametrize("stats", ["pages", "pages_bound"])
def test_qada_pages_decisions(case: PagedCase, stats: str) -> None:
    """The kernel thresholds the page estimate (checked against the keys in test_pages) against
    its own local log-mass."""
    tau = 0.5
    cfg = QadaSettings(policy="qada", stats=stats, tau=tau, t_sink=T_SINK, t_local=T_LOCAL, page_chunk=32)
    inputs = policy_inputs(case, cfg)
    result = paged_decode(case.batch(), cfg, inputs)
    local = torch.stack([local_and_bulk_scores(case, b)[0].logsumexp(-1) for b in range(len(case.keys))])
    assert_decisions(case, result, inputs.bulk_lse - local, tau)
    assert_matches_masked_reference(case, result)


def test_qada_local_stats_decisions(case: PagedCase) -> None:
    tau = 0.5
    cfg = QadaSettings(policy="qada", stats="local", tau=tau, t_sink=T_SINK, t_local=T_LOCAL)
    result = decode(case, cfg)
    rows = []
    for b in range(len(case.keys)):
        local, _ = local_and_bulk_scores(case, b)
        est = torch.tensor(float(n_bulk(case)[b])).log() + local.mean(-1) + local.var(-1, unbiased=False) / 2
        rows.append(est - local.logsumexp(-1))
    assert_decisions(case, result, torch.stack(rows), tau)
    assert_matches_masked_reference(case, result)


def test_gqa_one_long_head_makes_its_group_long() -> None:
    case = make_case([400, 300], num_kv_heads=3, group=3, block_size=32, dtype=torch.float32, seed=11)
    mask = torch.zeros(9, dtype=torch.bool)
    mask[4] = True  # middle head of group 1
    result = decode(case, QadaSettings(policy="static", t_sink=T_SINK, t_local=T_LOCAL), long_mask=mask)
    assert result.long_groups.tolist() == [[False, True, False]] * 2
    for b, length in enumerate(case.seq_lens.tolist()):
        full = sdpa_row(case, b)
        local = sdpa_row(case, b, local_positions(length, T_SINK, T_LOCAL).expand(9, -1))
        torch.testing.assert_close(result.output[b, 3:6], full[3:6])
        torch.testing.assert_close(result.output[b, :3], local[:3])
        torch.testing.assert_close(result.output[b, 6:], local[6:])


def poison_unread_bulk(case: PagedCase, long_groups: torch.Tensor) -> None:
    """NaN into every block lying wholly in a row's bulk, for the KV heads of its local groups."""
    bs = case.block_size
    for b, length in enumerate(case.seq_lens.tolist()):
        end = length - T_LOCAL
        bulk_blocks = [j for j in range(-(-length // bs)) if j * bs >= T_SINK and (j + 1) * bs <= end]
        heads = torch.nonzero(~long_groups[b]).flatten()
        if bulk_blocks and heads.numel():
            phys = case.block_table[b, bulk_blocks].long()
            case.key_cache[phys.unsqueeze(1), heads.unsqueeze(0)] = float("nan")
            case.value_cache[phys.unsqueeze(1), heads.unsqueeze(0)] = float("nan")


@pytest.mark.parametrize("policy", ["local", "static"])
def test_local_groups_never_read_bulk(case: PagedCase, policy: str) -> None:
    cfg = QadaSettings(policy=policy, t_sink=T_SINK, t_local=T_LOCAL)
    mask = torch.arange(case.query.shape[1]) < case.query.shape[1] // case.num_kv_heads  # group 0 long
    expected_groups = group_rule(mask & (n_bulk(case) > 0).unsqueeze(1), case.num_kv_heads)
    if policy == "local":
        expected_groups = torch.zeros_like(expected_groups)
    poison_unread_bulk(case, expected_groups)
    result = decode(case, cfg, long_mask=mask)
    assert torch.equal(result.long_groups, expected_groups)
    assert_matches_masked_reference(case, result)


# Layouts of the block table: fully fragmented (make_case), one run per row, and mixed runs.
LAYOUTS = {"shuffled": None, "contiguous": [10**6], "mixed": [1, 5, 1, 1, 40, 3, 2], "pairs": [2, 1]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["full", "static", "oracle"])
def test_block_layouts_agree(layout: str, dtype: torch.dtype, policy: str) -> None:
    # short rows (40, 81, 100) have no bulk or a bulk inside one or two blocks.
    seq_lens = [1200, 40, 81, 100, 777, 1024]
    case = make_case(seq_lens, num_kv_heads=3, group=2, block_size=32, dtype=dtype, seed=5)
    if LAYOUTS[layout] is not None:
        case = relayout(case, LAYOUTS[layout], seed=1)
    mask = torch.tensor([True, False, False, False, True, True])  # groups 0 and 2 long
    result = decode(
        case, QadaSettings(policy=policy, t_sink=T_SINK, t_local=T_LOCAL, tau=0.5), long_mask=mask
    )
    if policy == "full":
        expected = torch.stack([sdpa_row(case, b) for b in range(len(seq_lens))])
        torch.testing.assert_close(result.output.float(), expected, **tolerance(dtype))
    else:
        assert_matches_masked_reference(case, result)


@pytest.mark.parametrize("t_sink,t_local", [(T_SINK, T_LOCAL), (0, 1), (40, 200), (16, 128)])
def test_plan_shared_across_layers(t_sink: int, t_local: int) -> None:
    case = relayout(make_case([1, 20, 130, 129, 700], 3, 3, 32, torch.float32, seed=2), [3, 1])
    cfg = QadaSettings(policy="static", t_sink=t_sink, t_local=t_local)
    plan = plan_decode(case.block_table, case.seq_lens, cfg, block_size=32, num_kv_heads=3)
    for layer in range(3):  # different static masks per layer, one plan
        mask = (torch.arange(9) // 3) == layer
        with_plan = decode(case, cfg, long_mask=mask, plan=plan)
        without = decode(case, cfg, long_mask=mask)
        torch.testing.assert_close(with_plan.output, without.output, rtol=0, atol=0)
        assert_matches_masked_reference(case, with_plan, t_sink, t_local)
    with pytest.raises(ValueError, match="plan does not match"):
        decode(case, QadaSettings(policy="local", t_sink=t_sink, t_local=t_local + 1), plan=plan)


def test_stale_tails_and_far_scores() -> None:
    """Window slots reaching back past the row, stale values in unwritten tails, and scores far
    below the max (exp would underflow to denormals) must neither leak nor lose precision."""
    case = make_case([33, 64, 65, 500], 2, 2, 32, torch.float32, seed=4)
    case.query[3] *= 40.0  # scores spread over hundreds: many exp arguments below -87
    for policy in ("local", "full"):
        result = decode(case, QadaSettings(policy=policy, t_sink=T_SINK, t_local=T_LOCAL))
        assert_matches_masked_reference(case, result)


@pytest.mark.parametrize("policy", ["full", "static"])
def test_strided_query(policy: str) -> None:
    """vLLM's query is a view into the fused QKV projection: rows are not contiguous."""
    case = make_case([700, 90, 300], 3, 3, 128, torch.float32, seed=6)
    batch, heads, dim = case.query.shape
    qkv = torch.randn(batch, (heads + 6) * dim)
    qkv[:, : heads * dim] = case.query.flatten(1)
    strided = qkv[:, : heads * dim].view(batch, heads, dim)
    assert not strided.is_contiguous()
    cfg = QadaSettings(policy=policy, t_sink=T_SINK, t_local=T_LOCAL)
    mask = torch.arange(heads) < 3
    expected = decode(case, cfg, long_mask=mask)
    got = decode(replace(case, query=strided), cfg, long_mask=mask)
    torch.testing.assert_close(got.output, expected.output, rtol=0, atol=0)


@pytest.mark.parametrize("t_sink,t_local", [(T_SINK, T_LOCAL), (0, 1), (5, 20), (40, 200), (16, 128)])
def test_c_local_pass_reads_the_local_set_only(t_sink: int, t_local: int) -> None:
    """The local pass in C (`summary_scores.local_attention`) gives the PyTorch pass's outputs and
    log-sum-exps while every cached position outside the local set is NaN."""
    case = relayout(make_case([1, 17, 80, 81, 300, 520, 129, 700], 3, 3, 32, torch.float32, seed=7), [3, 1])
    cfg = QadaSettings(policy="local", t_sink=t_sink, t_local=t_local)
    plan = plan_decode(case.block_table, case.seq_lens, cfg, block_size=32, num_kv_heads=3)
    rows, _, head_dim = case.query.shape
    q = (case.query * case.scale).view(rows, 3, 3, head_dim)
    views = _HeadViews(case.key_cache, case.value_cache)
    out, lse, _ = _local_attention(q, views, plan, want_stats=False)
    for b, length in enumerate(case.seq_lens.tolist()):
        positions = torch.arange(-(-length // 32) * 32)  # the row's blocks, unwritten tail included
        outside = ~local_mask(positions, length, t_sink, t_local)
        for p in outside.nonzero().flatten().tolist():
            rows_of = case.block_table[b, p // 32].long() * 3 + torch.arange(3)
            views.k_flat[rows_of, :, p % 32] = float("nan")
            views.v_flat[rows_of, p % 32, :] = float("nan")
    native = summary_scores.local_attention(
        q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, cfg.window
    )
    assert native is not None, "the C kernels build on the test machines"
    torch.testing.assert_close(native[0], out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native[1], lse, rtol=1e-5, atol=1e-5)
