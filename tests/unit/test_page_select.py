"""Page selection inside long KV groups (page_select) against a row-by-row reference: the same
blocks chosen for the same estimates, unselected blocks never read, outputs as a masked SDPA."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from attention_backend import summary_scores
from attention_backend.context import StepDecisions
from attention_backend.counters import DecisionCounters
from attention_backend.cpu_kernel import paged_decode
from attention_backend.key_codes import dequantize, unpack
from attention_backend.page_estimate import PageMasses
from attention_backend.page_select import (
    key_copy_masses,
    key_dim_masses,
    rank_layer_blocks,
    select_blocks,
    select_tables,
)
from attention_backend.page_summaries import MAX, MIN
from attention_backend.policy import PolicyInputs
from attention_backend.policy_files import PolicyError
from attention_backend.request_log import RequestLog
from attention_backend.settings import ActivePolicy, QadaSettings
from attention_backend.testing.batches import TEST_SHAPE
from attention_backend.testing.paged_cases import (
    PagedCase,
    local_positions,
    make_case,
    page_summaries,
    policy_inputs,
    row_scores,
    sdpa_row,
    spy,
    write_tokens,
)

T_SINK, T_LOCAL, BS = 16, 64, 32
# Outputs against fp32 SDPA over the same positions: both are off float64 by fp32 rounding over
# up to 1300 keys, vLLM's CPU kernel by up to 1.5e-5 on outputs of magnitude 2 (measured on an
# AVX-512 Xeon); a wrong or NaN-poisoned block is off by far more.
FP32_OUTPUT = {"atol": 5e-5, "rtol": 1e-5}
SELECTIONS = [{"page_budget": 0.05}, {"page_budget": 0.3}, {"page_top_k": 1}, {"page_top_k": 4}]
SELECTION_IDS = [next(f"{k}={v}" for k, v in s.items()) for s in SELECTIONS]


def settings(**selection) -> QadaSettings:
    return QadaSettings(
        policy="qada", stats="pages", tau=0.2, t_sink=T_SINK, t_local=T_LOCAL, page_chunk=16, **selection
    )


def sample_case(seed: int) -> PagedCase:
    # rows without bulk blocks (90), with a few (300) and with many (1300, 700)
    case = make_case(
        [700, 90, 1300, 300], num_kv_heads=3, group=3, block_size=BS, dtype=torch.float32, seed=seed
    )
    gen = torch.Generator().manual_seed(seed)
    for b in range(len(case.keys)):  # a few keys aligned with the query: mass the selection must find
        k = case.keys[b]
        for pos in torch.randint(T_SINK, max(T_SINK + 1, k.shape[0] - T_LOCAL), (3,), generator=gen).tolist():
            k[pos] += 2 * case.query[b].view(3, 3, -1).mean(1)
    return rewrite(case)


def rewrite(case: PagedCase) -> PagedCase:
    for b, (k, v) in enumerate(zip(case.keys, case.values)):
        write_tokens(case.layout, case.key_cache, case.value_cache, case.block_table[b], 0, k, v)
    return case


def exact_local_lse(case: PagedCase) -> torch.Tensor:
    """[B, Hq] log-sum-exp of each head's scores over its sinks and window."""
    return torch.stack(
        [
            row_scores(case, b)[:, local_positions(int(n), T_SINK, T_LOCAL)].logsumexp(-1)
            for b, n in enumerate(case.seq_lens)
        ]
    )


def reference_selection(case: PagedCase, cfg: QadaSettings, inputs) -> list[list[set[int]]]:
    """Per row and KV head, the logical blocks read when long: every block holding sink or window
    positions, and the candidates (wholly in the bulk) chosen one (row, head) at a time."""
    logits, page_blocks = inputs.pages
    local_lse = exact_local_lse(case)
    total = torch.logaddexp(local_lse, inputs.bulk_lse)
    group = case.query.shape[1] // case.num_kv_heads
    out = []
    for b, length in enumerate(case.seq_lens.tolist()):
        n_blocks = -(-length // BS)
        candidates = [k for k in range(n_blocks) if k * BS >= T_SINK and (k + 1) * BS <= length - T_LOCAL]
        always = set(range(n_blocks)) - set(candidates)
        row = []
        for h in range(case.num_kv_heads):
            heads = range(h * group, (h + 1) * group)
            share = {
                k: [
                    sum(
                        math.exp(float(logits[b, h, g, j]) - float(total[b, h * group + g]))
                        for j in range(logits.shape[-1])
                        if int(page_blocks[b, j]) == k and logits[b, h, g, j] > -math.inf
                    )
                    for g in range(group)
                ]
                for k in candidates
            }
            ranked = sorted(candidates, key=lambda k: (-max(share[k]), k))
            if cfg.page_top_k:
                take = min(cfg.page_top_k, len(ranked))
            else:
                take = 0
                while take < len(ranked) and any(
                    sum(share[k][g] for k in ranked[take:]) > cfg.page_budget for g in range(len(heads))
                ):
                    take += 1
            row.append(always | set(ranked[:take]))
        out.append(row)
    return out


def grouped_queries(case: PagedCase) -> torch.Tensor:
    """The case's scaled queries by KV group, [B, Hkv, G, D] (scores = q . k)."""
    rows, num_heads, head_dim = case.query.shape
    return (case.query * case.scale).view(rows, case.num_kv_heads, num_heads // case.num_kv_heads, head_dim)


def poison_all_but(case: PagedCase, chosen: list[list[set[int]]]) -> None:
    """NaN into every block of every (row, KV head) outside its chosen set."""
    for b, length in enumerate(case.seq_lens.tolist()):
        for h, blocks in enumerate(chosen[b]):
            for k in set(range(-(-length // BS))) - blocks:
                phys = int(case.block_table[b, k])
                case.key_cache[phys, h] = math.nan
                case.value_cache[phys, h] = math.nan


@pytest.mark.parametrize("selection", SELECTIONS, ids=SELECTION_IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_selection_equals_the_row_by_row_reference(selection, seed) -> None:
    case = sample_case(seed)
    cfg = settings(**selection)
    inputs = policy_inputs(case, cfg)
    local_lse = exact_local_lse(case)
    total = torch.logaddexp(local_lse, inputs.bulk_lse)
    keep = select_blocks(inputs.pages, total, case.seq_lens, cfg, BS)
    expected = reference_selection(case, cfg, inputs)
    for b in range(len(case.keys)):
        for h in range(case.num_kv_heads):
            assert set(keep[b, h].nonzero().flatten().tolist()) == expected[b][h], (b, h)
    n_blocks = (case.seq_lens.long() - 1) // BS + 1
    assert (keep.sum(-1) < n_blocks.unsqueeze(1)).any(), "the case never skips a block"


@pytest.mark.parametrize("selection", SELECTIONS, ids=SELECTION_IDS)
def test_unselected_blocks_are_never_read_and_outputs_match(selection) -> None:
    case = sample_case(3)
    cfg = settings(**selection).replace(tau=0.95)  # some groups local, most long
    inputs = policy_inputs(case, cfg)  # estimates from the clean cache, as at decode time
    chosen = reference_selection(case, cfg, inputs)
    poison_all_but(case, chosen)
    result = paged_decode(case.batch(), cfg, inputs)
    assert result.long_groups.any() and (~result.long_groups).any()
    assert_read_only(case, result, chosen)


def assert_read_only(case: PagedCase, result, chosen: list[list[set[int]]]) -> None:
    """Outputs finite and equal to a masked SDPA: long groups over their chosen blocks, local
    groups over their sinks and window; kept counts those blocks."""
    assert torch.isfinite(result.output).all()
    group = case.query.shape[1] // case.num_kv_heads
    for b, length in enumerate(case.seq_lens.tolist()):
        local = local_positions(length, T_SINK, T_LOCAL)
        mask = torch.zeros(case.query.shape[1], length, dtype=torch.bool)
        for h in range(case.num_kv_heads):
            long = bool(result.long_groups[b, h])
            read = torch.zeros(length, dtype=torch.bool)
            for k in chosen[b][h]:
                read[k * BS : (k + 1) * BS] = True
            mask[h * group : (h + 1) * group] = read if long else local
            if long:
                assert int(result.kept_blocks[b, h]) == len(chosen[b][h])
            else:
                assert int(result.kept_blocks[b, h]) == 0
        torch.testing.assert_close(result.output[b], sdpa_row(case, b, mask), **FP32_OUTPUT)


def test_a_budget_reaching_every_block_is_the_head_decision() -> None:
    case = sample_case(4)
    head_level = paged_decode(case.batch(), settings(), policy_inputs(case, settings()))
    cfg = settings(page_top_k=10**4)
    result = paged_decode(case.batch(), cfg, policy_inputs(case, cfg))
    assert torch.equal(result.long_groups, head_level.long_groups)
    torch.testing.assert_close(result.output, head_level.output, atol=1e-6, rtol=1e-5)
    n_blocks = (case.seq_lens.long() - 1) // BS + 1
    assert torch.equal(result.kept_blocks, torch.where(result.long_groups, n_blocks.unsqueeze(1), 0))


def test_settings_refuse_what_cannot_select() -> None:
    assert settings(page_budget=0.1).selects_pages and not settings().selects_pages
    with pytest.raises(ValueError, match="set one"):
        settings(page_budget=0.1, page_top_k=4)
    for policy, stats in (("qada", "prompt"), ("full", "pages"), ("static", "pages")):
        with pytest.raises(ValueError, match="ranks KV blocks by the page estimates"):
            QadaSettings(policy=policy, stats=stats, page_budget=0.1)
    with pytest.raises(ValueError):
        settings(page_budget=1.0)
    QadaSettings(policy="qada", stats="pages_bound", page_top_k=2)  # the bound ranks too
    assert QadaSettings(policy="oracle", page_budget=0.1).selects_pages  # by the exact masses
    assert QadaSettings(policy="qada", stats="prompt", page_top_k=4, page_rank_dims=8).selects_pages
    with pytest.raises(ValueError, match="set page_budget or page_top_k"):
        settings(page_rank_dims=8)
    with pytest.raises(ValueError, match="page_rank_layers ranks"):
        settings(page_rank_layers=(0,))
    with pytest.raises(ValueError, match="page_rank_layers ranks"):
        settings(page_top_k=2, page_rank_dims=8, page_rank_layers=(0,))
    with pytest.raises(PolicyError, match="layers below"):
        TEST_SHAPE.check(settings(page_top_k=2, page_rank_layers=(0, TEST_SHAPE.num_layers)))
    assert QadaSettings(policy="qada", stats="prompt", page_top_k=4, page_rank_bits=4).ranks_by_key_copy
    assert not settings(page_rank_bits=4).ranks_by_key_copy  # kept, not used: no page selection
    for other in ({"page_rank_dims": 8}, {"page_rank_layers": (0,)}):
        with pytest.raises(ValueError, match="ranking of its own"):
            settings(page_top_k=2, page_rank_bits=4, **other)
    with pytest.raises(ValueError):
        settings(page_top_k=2, page_rank_bits=3)
    keeps_four = replace(TEST_SHAPE, page_rank_bits=4)
    keeps_four.check(settings(page_top_k=2, page_rank_bits=4))
    keeps_four.check(settings(page_top_k=2))  # 0: rank by the page statistics
    for shape, bits, why in ((TEST_SHAPE, 4, "keeps none"), (keeps_four, 2, "keeps a 4-bit one")):
        with pytest.raises(PolicyError, match=why):
            shape.check(settings(page_top_k=2, page_rank_bits=bits))


def test_page_selection_is_refused_off_the_cpu_path() -> None:
    with pytest.raises(PolicyError, match="CPU path only"):
        ActivePolicy.load(settings(page_budget=0.1), TEST_SHAPE, {}, device="cuda")
    keeps_four = replace(TEST_SHAPE, page_rank_bits=4)
    with pytest.raises(PolicyError, match=r"key copy\) runs on the CPU path only"):
        ActivePolicy.load(settings(page_rank_bits=4), keeps_four, {}, device="cuda")


def test_bytes_and_blocks_are_counted_from_the_blocks_read() -> None:
    """Two rows of 1000 and 300 tokens (blocks of 128: 8 and 3), one layer, 2 KV groups: row 0's
    group 0 long with 3 blocks kept, group 1 local; row 1's group 1 long with all 3 kept."""
    groups = torch.tensor([[[True, False]], [[False, True]]])
    decisions = StepDecisions(
        ["a", "b"],
        [0],
        torch.tensor([1000, 300]),
        groups.repeat_interleave(2, -1),
        groups,
        token_bytes=4,
        local_tokens=80,
        kept_blocks=torch.tensor([[[3, 0]], [[0, 3]]]),
        block_size=128,
    )
    # row 0: 2 whole blocks and the last one's 1000 - 7 * 128 = 104 tokens; local: 80
    assert decisions.tokens_read().tolist() == [[[2 * 128 + 104, 80]], [[80, 300]]]
    counters = DecisionCounters()
    counters.add(decisions)
    layer = counters.snapshot()["layers"][0]
    assert layer["kv_blocks_read"] == 6 and layer["kv_blocks_skipped"] == 5
    read = (360 + 80 + 80 + 300) * 4
    assert layer["kv_bytes_read"] == read and layer["kv_bytes_skipped"] == (2 * 1300 * 4) - read
    log = RequestLog()
    log.add(decisions, ["a", "b"])
    assert log.request("a")["kv_bytes"] == {"read": 440 * 4, "skipped": (2000 - 440) * 4, "key_copy_read": 0}
    assert log.request("b")["kv_bytes"] == {"read": 380 * 4, "skipped": (600 - 380) * 4, "key_copy_read": 0}
    # ranked by 2 key dimensions of 4 bytes: the tokens row 0's long group skipped were read at 8 bytes
    decisions.rank_bytes = 8
    assert decisions.bytes_read().tolist() == [[[360 * 4 + 640 * 8, 80 * 4]], [[80 * 4, 300 * 4]]]
    # ranked by a key copy of 2 bytes a token instead: long groups read it over their whole
    # context, counted apart from the KV cache's bytes (which it is not part of)
    decisions.rank_bytes, decisions.copy_bytes = 0, 2
    assert decisions.key_copy_bytes_read().tolist() == [[[1000 * 2, 0]], [[0, 300 * 2]]]
    counters.add(decisions)
    layer = counters.snapshot()["layers"][0]
    assert layer["key_copy_bytes_read"] == 1300 * 2 and layer["kv_bytes_read"] == 2 * read
    log.add(decisions, ["a", "b"])
    assert log.request("a")["kv_bytes"] == {
        "read": 880 * 4,
        "skipped": (4000 - 880) * 4,
        "key_copy_read": 2000,
    }


@pytest.mark.parametrize("selection", SELECTIONS, ids=SELECTION_IDS)
def test_the_oracle_selects_by_the_exact_block_masses(selection) -> None:
    case = sample_case(5)
    cfg = QadaSettings(policy="oracle", tau=0.95, t_sink=T_SINK, t_local=T_LOCAL, **selection)
    result = paged_decode(case.batch(), cfg, PolicyInputs())
    group = case.query.shape[1] // case.num_kv_heads
    bulk_lse = torch.full(case.query.shape[:2], -math.inf)
    n_blocks = -(-int(case.seq_lens.max()) // BS)
    blocks = torch.full((*case.query.shape[:2], n_blocks), -math.inf)
    for b, length in enumerate(case.seq_lens.tolist()):
        scores = row_scores(case, b).masked_fill(local_positions(length, T_SINK, T_LOCAL), -math.inf)
        bulk_lse[b] = scores.logsumexp(-1)
        for k in range(-(-length // BS)):
            blocks[b, :, k] = scores[:, k * BS : (k + 1) * BS].logsumexp(-1)
    exact = PolicyInputs(
        bulk_lse=bulk_lse,
        pages=PageMasses(
            blocks.view(len(case.keys), case.num_kv_heads, group, -1),
            torch.arange(n_blocks).expand(len(case.keys), -1),
        ),
    )
    chosen = reference_selection(case, cfg, exact)
    assert result.long_groups.any()
    for b, length in enumerate(case.seq_lens.tolist()):
        mask = local_positions(length, T_SINK, T_LOCAL).repeat(case.query.shape[1], 1)
        for h in range(case.num_kv_heads):
            if result.long_groups[b, h]:
                assert int(result.kept_blocks[b, h]) == len(chosen[b][h])
                mask[h * group : (h + 1) * group] = False
                for k in chosen[b][h]:
                    mask[h * group : (h + 1) * group, k * BS : (k + 1) * BS] = True
        torch.testing.assert_close(result.output[b], sdpa_row(case, b, mask), **FP32_OUTPUT)


def test_key_dim_masses_are_partial_scores_on_the_groups_largest_query_dimensions() -> None:
    case = sample_case(6)
    rows, num_heads, head_dim = case.query.shape
    group = num_heads // case.num_kv_heads
    q = (case.query * case.scale).view(rows, case.num_kv_heads, group, head_dim)
    pairs = torch.tensor([0, 2, 4, 5, 7, 9, 11])  # (row, KV head) = (p // 3, p % 3)
    masses, total = key_dim_masses(
        q.flatten(0, 1)[pairs],
        pairs % 3,
        case.key_cache,
        case.block_table[pairs // 3],
        case.seq_lens[pairs // 3],
        8,
    )
    for i, (b, h) in enumerate(zip((pairs // 3).tolist(), (pairs % 3).tolist())):
        dims = q[b, h].abs().sum(0).topk(8).indices
        keys = case.keys[b][:, h, dims].float()  # [L, r]
        scores = q[b, h][:, dims] @ keys.T  # [G, L]
        torch.testing.assert_close(total[i], scores.logsumexp(-1))
        for k in range(-(-int(case.seq_lens[b]) // BS)):
            torch.testing.assert_close(
                masses.logits[i, 0, :, k], scores[:, k * BS : (k + 1) * BS].logsumexp(-1)
            )


def test_key_dim_ranking_reads_only_the_values_of_the_selected_blocks() -> None:
    """The ranking reads 8 of 64 dimensions of every key; values are read only where selected."""
    case = sample_case(7)
    cfg = settings(page_top_k=2, page_rank_dims=8).replace(tau=0.95)
    rows, num_heads, head_dim = case.query.shape
    group = num_heads // case.num_kv_heads
    q = (case.query * case.scale).view(rows, case.num_kv_heads, group, head_dim)
    pairs = torch.arange(rows * case.num_kv_heads)
    row_of = pairs // case.num_kv_heads
    masses, total = key_dim_masses(
        q.flatten(0, 1),
        pairs % case.num_kv_heads,
        case.key_cache,
        case.block_table[row_of],
        case.seq_lens[row_of],
        8,
    )
    keep = select_blocks(masses, total, case.seq_lens[row_of], cfg, BS).view(rows, case.num_kv_heads, -1)
    for b, length in enumerate(case.seq_lens.tolist()):
        for h in range(case.num_kv_heads):
            for k in range(-(-length // BS)):
                if not keep[b, h, k]:
                    case.value_cache[int(case.block_table[b, k]), h] = math.nan
    result = paged_decode(case.batch(), cfg, policy_inputs(case, cfg))
    assert torch.isfinite(result.output).all() and result.long_groups.any()
    for b, length in enumerate(case.seq_lens.tolist()):
        mask = local_positions(length, T_SINK, T_LOCAL).repeat(num_heads, 1)
        for h in range(case.num_kv_heads):
            if result.long_groups[b, h]:
                read = keep[b, h].repeat_interleave(BS)[:length]
                mask[h * group : (h + 1) * group] = read
                assert int(result.kept_blocks[b, h]) == int(keep[b, h].sum())
        torch.testing.assert_close(result.output[b], sdpa_row(case, b, mask), **FP32_OUTPUT)


@pytest.mark.parametrize("selection", SELECTIONS, ids=SELECTION_IDS)
def test_a_rank_layer_chooses_each_rows_blocks_and_later_layers_read_only_them(selection) -> None:
    """page_rank_layers: the rank layer's choice is the row's candidates ranked by the largest
    exact share any of its query heads gives them (all heads as one group); a later layer's long
    groups all read exactly those blocks."""
    case = sample_case(8)
    cfg = settings(**selection, page_rank_layers=(0,)).replace(tau=0.95)
    keep = rank_layer_blocks(case.layout, case.batch(), case.seq_lens.tolist(), cfg, BS)
    chosen = []
    for b, length in enumerate(case.seq_lens.tolist()):
        scores = row_scores(case, b)  # [Hq, L]
        total = scores.logsumexp(-1)
        n_blocks = -(-length // BS)
        candidates = [k for k in range(n_blocks) if k * BS >= T_SINK and (k + 1) * BS <= length - T_LOCAL]
        share = {k: (scores[:, k * BS : (k + 1) * BS].logsumexp(-1) - total).exp() for k in candidates}
        ranked = sorted(candidates, key=lambda k: (-float(share[k].max()), k))
        if cfg.page_top_k:
            take = min(cfg.page_top_k, len(ranked))
        else:
            take = 0
            while take < len(ranked) and (sum(share[k] for k in ranked[take:]) > cfg.page_budget).any():
                take += 1
        expected = set(range(n_blocks)) - set(candidates) | set(ranked[:take])
        assert set(keep[b].nonzero().flatten().tolist()) == expected, b
        chosen.append([expected] * case.num_kv_heads)
    assert any(len(c[0]) < -(-n // BS) for c, n in zip(chosen, case.seq_lens.tolist())), "nothing skipped"
    inputs = policy_inputs(case, cfg)._replace(blocks=keep)
    poison_all_but(case, chosen)
    result = paged_decode(case.batch(), cfg, inputs)
    assert result.long_groups.any() and (~result.long_groups).any()
    assert_read_only(case, result, chosen)


@pytest.mark.parametrize("native", [True, False], ids=["c-kernel", "torch-ops"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("chunk", [8, 16, 32])  # 8: a page size the C kernel leaves to PyTorch
def test_key_copy_masses_are_the_scores_of_the_dequantized_keys(bits, native, chunk, monkeypatch) -> None:
    """Both ways of ranking by the copy: the C kernel reading the codes in place, and PyTorch ops."""
    assert summary_scores.library() is not None, "the C kernel did not build (see the warning)"
    ran = spy(monkeypatch, summary_scores, "block_lse")
    case = sample_case(9)
    q = grouped_queries(case)
    copy = page_summaries(case, chunk, key_bits=bits).key_copy(0, case.layout, case.key_cache)
    pairs = torch.tensor([0, 2, 4, 5, 7, 9, 11])  # (row, KV head) = (p // 3, p % 3)
    masses, total = key_copy_masses(
        q.flatten(0, 1)[pairs],
        pairs % 3,
        copy,
        case.block_table[pairs // 3],
        case.seq_lens[pairs // 3],
        BS,
        native=native,
    )
    assert ran == ([chunk != 8] if native else [])  # the C kernel computed it (8: PyTorch did)
    for i, (b, h) in enumerate(zip((pairs // 3).tolist(), (pairs % 3).tolist())):
        length = int(case.seq_lens[b])
        pos = torch.arange(length)
        chunk_ids = (case.block_table[b, pos // BS].long() * BS + pos % BS) // chunk
        slots = case.block_table[b, pos // BS].long() * BS + pos % BS
        codes = copy.codes.permute(0, 3, 1, 2).flatten(0, 1)[slots, h]  # [L, D * bits / 8]
        low, high = copy.stats[MIN, chunk_ids, h], copy.stats[MAX, chunk_ids, h]
        scores = q[b, h] @ dequantize(codes, low, high, bits).T  # [G, L]
        if ran == [True] and summary_scores.int8_weights(q.shape[-1], bits):  # the C ranking ran
            scores = int8_weight_scores(q[b, h], unpack(codes, bits), low, high, bits, scores)
        torch.testing.assert_close(total[i], scores.logsumexp(-1))
        for k in range(-(-length // BS)):
            torch.testing.assert_close(
                masses.logits[i, 0, :, k], scores[:, k * BS : (k + 1) * BS].logsumexp(-1)
            )
        assert (masses.logits[i, 0, :, -(-length // BS) :] == -math.inf).all()  # past the row
        # the copy's scores within sum_d |q_d| step_d / 2 of the exact scores
        step = (high - low) / (2**bits - 1)
        exact = q[b, h] @ case.keys[b][:, h].float().T
        dequantized = q[b, h] @ dequantize(codes, low, high, bits).T
        assert ((dequantized - exact).abs() <= q[b, h].abs() @ step.T / 2 + 1e-4).all()


def int8_weight_scores(
    q: Tensor, codes: Tensor, low: Tensor, high: Tensor, bits: int, scores: Tensor
) -> Tensor:
    """The C ranking's scores where it rounds the weights to int8 (`summary_scores.int8_weights`):
    q [G, D], each key's codes [L, D] and its chunk's grid low / high [L, D]; q . low plus
    scale * sum_d round(w_d / scale) code_d, w = q * step, scale = max_d |w_d| / 127 per head and
    chunk. Asserted within scale / 2 * sum_d code_d of the fp32 `scores` [G, L]."""
    w = q.unsqueeze(1) * ((high - low) / (2**bits - 1))  # [G, L, D]
    top = w.abs().amax(-1, keepdim=True)
    rounded = torch.where(top > 0, w * (127 / top), 0.0).round()
    scale = (top / 127).squeeze(-1)
    int8 = q @ low.T + scale * (rounded * codes.float()).sum(-1)
    assert ((int8 - scores).abs() <= scale / 2 * codes.float().sum(-1) + 1e-4).all()
    return int8


@pytest.mark.parametrize("selection", SELECTIONS, ids=SELECTION_IDS)
def test_key_copy_ranking_never_reads_the_unselected_blocks_and_outputs_match(selection) -> None:
    """page_rank_bits: the blocks chosen from the key copy's scores; neither the keys nor the
    values of the others are read (NaN), and the outputs are a masked SDPA over the chosen ones."""
    case = sample_case(10)
    cfg = settings(**selection, page_rank_bits=4).replace(tau=0.95)
    inputs = policy_inputs(case, cfg)
    q = grouped_queries(case)
    rows = q.shape[0]
    pairs = torch.arange(rows * case.num_kv_heads)
    row_of = pairs // case.num_kv_heads
    masses, total = key_copy_masses(
        q.flatten(0, 1), pairs % 3, inputs.key_copy, case.block_table[row_of], case.seq_lens[row_of], BS
    )
    keep = select_blocks(masses, total, case.seq_lens[row_of], cfg, BS).view(rows, case.num_kv_heads, -1)
    chosen = [
        [set(keep[b, h].nonzero().flatten().tolist()) for h in range(case.num_kv_heads)] for b in range(rows)
    ]
    assert any(len(c) < -(-n // BS) for row, n in zip(chosen, case.seq_lens.tolist()) for c in row), (
        "nothing skipped"
    )
    poison_all_but(case, chosen)
    result = paged_decode(case.batch(), cfg, inputs)
    assert result.long_groups.any() and (~result.long_groups).any()
    assert_read_only(case, result, chosen)


@pytest.mark.parametrize("selection", SELECTIONS, ids=SELECTION_IDS)
def test_the_c_selection_is_select_blocks_then_selected_tables(selection, monkeypatch) -> None:
    """The C loop that selects and builds the virtual tables in one pass (`native`) against
    `select_blocks` and `selected_tables` (PyTorch), on random per-block masses of pairs of
    different lengths, ties included."""
    assert summary_scores.library() is not None, "the C kernel did not build (see the warning)"
    ran = spy(monkeypatch, summary_scores, "select_tables")
    cfg = settings(**selection)
    generator = torch.Generator().manual_seed(3)
    pairs, group, block_size = 40, 3, 16
    seq_lens = torch.randint(1, 60 * block_size, (pairs,), generator=generator)
    num_blocks = int((seq_lens.max() - 1) // block_size) + 1
    logits = torch.randn(pairs, 1, group, num_blocks, generator=generator) * 3
    logits[::5, :, :, 4:8] = 1.5  # equal masses: ties ranked in logical order
    blocks = torch.arange(num_blocks).expand(pairs, -1)
    past = blocks >= ((seq_lens - 1) // block_size + 1).unsqueeze(1)
    logits.masked_fill_(past.view(pairs, 1, 1, -1), -math.inf)
    masses = PageMasses(logits, blocks)
    total = torch.logaddexp(logits[:, 0].logsumexp(-1), torch.randn(pairs, group, generator=generator))
    tables = torch.randperm(pairs * (num_blocks + 2), generator=generator).int().view(pairs, -1)
    native = select_tables(masses, total, seq_lens, cfg, block_size, tables, native=True)
    torch_ops = select_tables(masses, total, seq_lens, cfg, block_size, tables)
    assert ran == [True]
    for got, expected in zip(native, torch_ops):
        assert torch.equal(got, expected)
    assert (native[2] < -(-seq_lens // block_size)).any(), "nothing skipped"


def test_the_c_loops_give_the_same_step_on_one_thread_or_two(monkeypatch) -> None:
    """The C loops split their pairs, blocks and pages over PyTorch's intra-op threads (its own
    OpenMP runtime): each item writes only its own outputs, so the page estimates, the summaries'
    refresh, the key copy's ranking and the local pass are bitwise the same on one thread as on
    two, and so are the blocks read (vLLM's kernel over them sums in a thread-dependent order)."""
    if summary_scores.openmp_runtime() is None:
        pytest.skip("PyTorch without OpenMP here: the C loops run on the calling thread")
    assert summary_scores.library() is not None, "the C kernel did not build (see the warning)"
    calls: dict[str, list] = {}
    for name in ("refresh", "page_logits", "bulk_lse", "block_lse", "local_attention"):
        real = getattr(summary_scores, name)

        def record(*args, real=real, name=name, **kwargs):
            result = real(*args, **kwargs)
            written = args[4] if name == "refresh" else result  # refresh writes the stats in place
            # copies: the caller writes into some results later (the local output, for one)
            copied = tuple(t.clone() for t in written) if isinstance(written, tuple) else written.clone()
            calls.setdefault(name, []).append(copied)
            return result

        monkeypatch.setattr(summary_scores, name, record)
    cfg = settings(page_budget=0.3, page_rank_bits=4).replace(tau=0.95)
    before, runs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert summary_scores.threads() == threads  # the loops see PyTorch's thread count
            case = sample_case(10)
            runs.append(paged_decode(case.batch(), cfg, policy_inputs(case, cfg)))
    finally:
        torch.set_num_threads(before)
    assert runs[0].long_groups.any() and (~runs[0].long_groups).any()
    for name, results in calls.items():
        half = len(results) // 2
        assert half and len(results) == 2 * half, name
        for one, two in zip(results[:half], results[half:]):
            assert one is not None, f"{name} fell back to PyTorch ops"
            for a, b in zip(*(r if isinstance(r, tuple) else (r,) for r in (one, two))):
                assert torch.equal(a, b), name
    assert sorted(calls) == ["block_lse", "bulk_lse", "local_attention", "page_logits", "refresh"]
    assert torch.equal(runs[0].kept_blocks, runs[1].kept_blocks)
    torch.testing.assert_close(runs[0].output, runs[1].output, **FP32_OUTPUT)
