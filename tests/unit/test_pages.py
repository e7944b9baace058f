"""Page summaries (refreshed from slot mappings, in both cache layouts) and qada's `pages`
estimate of the bulk log-mass, against direct computations from the keys."""

from __future__ import annotations

import math

import pytest
import torch

from attention_backend import summary_scores
from attention_backend.key_codes import dequantize
from attention_backend.kv_layout import CPU_VEC, TRITON_NHD
from attention_backend.page_estimate import bulk_lse_and_pages, pages_bulk_lse, plan_pages
from attention_backend.page_summaries import MAX, MEAN, MIN, VAR, PageSummaries
from attention_backend.policy import bulk_range, bulk_sizes, decide_long_heads, estimated_bulk_lse, group_rule
from attention_backend.reference import exact_lse
from attention_backend.settings import QadaSettings
from attention_backend.testing.batches import BatchSpec, step_context
from attention_backend.testing.paged_cases import (
    make_case,
    page_summaries,
    policy_inputs,
    slot_mapping,
    spy,
    write_tokens,
)

LAYOUTS = {"cpu": CPU_VEC, "triton": TRITON_NHD}
SEQ_LENS = [300, 37, 129, 64]
BLOCK = 64


def expected_chunk(case, row: int, chunk: int, index: int):
    """(mean, var, min, max) [Hkv, D] of the row's logical chunk `index`, from its keys."""
    keys = case.keys[row][index * chunk : (index + 1) * chunk].float()
    return keys.mean(0), keys.var(0, unbiased=False), keys.amin(0), keys.amax(0)


def stored_chunk(store: PageSummaries, case, row: int, index: int):
    stats = store.layer(0, case.layout, case.key_cache)
    pos = index * store.chunk
    block = int(case.block_table[row, pos // case.block_size])
    chunk_id = (block * case.block_size + pos % case.block_size) // store.chunk
    return tuple(stats[i, chunk_id] for i in (MEAN, VAR, MIN, MAX))


def assert_summaries(store: PageSummaries, case) -> None:
    for row, length in enumerate(case.seq_lens.tolist()):
        for index in range(-(-length // store.chunk)):  # the last chunk may be partial
            for got, want in zip(
                stored_chunk(store, case, row, index), expected_chunk(case, row, store.chunk, index)
            ):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_refresh_of_a_whole_prefill(layout, chunk):
    case = make_case(SEQ_LENS, num_kv_heads=3, group=3, block_size=BLOCK, dtype=torch.float32, layout=layout)
    assert_summaries(page_summaries(case, chunk), case)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("bits", [0, 2, 4, 8])
@pytest.mark.parametrize("chunk", [16, 64])
def test_the_c_refresh_leaves_what_pytorch_ops_leave(layout, bits, chunk, monkeypatch):
    """summary_scores' refresh against PageSummaries' PyTorch ops, over a prefill then decode
    steps: the same statistics and, bit for bit, the same codes (stale slots included)."""
    assert summary_scores.library() is not None, "the C kernels did not build (see the warning)"
    case = make_case(SEQ_LENS, num_kv_heads=3, group=2, block_size=BLOCK, dtype=torch.float32, layout=layout)
    stores = PageSummaries(chunk, key_bits=bits), PageSummaries(chunk, key_bits=bits)
    ran = spy(monkeypatch, summary_scores, "refresh")
    done = [0] * len(SEQ_LENS)
    for back in (5, 1, 0):  # a prefill, then steps of four tokens and of one (padding: -1)
        lengths = [n - back for n in SEQ_LENS]
        step = case.__class__(**{**case.__dict__, "seq_lens": torch.tensor(lengths)})
        slots = torch.cat([slot_mapping(step, done), torch.full((2,), -1)])
        for store, native in zip(stores, (True, False)):
            store.refresh(0, layout, case.key_cache, slots, native=native)
        done = lengths
    assert ran == [True] * 3  # the native store's three refreshes, in C
    native, torch_ops = (s.layer(0, layout, case.key_cache) for s in stores)
    torch.testing.assert_close(native, torch_ops, atol=1e-5, rtol=1e-5)
    if bits:
        assert torch.equal(stores[0].codes[0], stores[1].codes[0])


def test_a_steps_layers_share_its_written_chunks():
    """The step context computes the chunks a slot mapping writes once for all layers (views of
    the same mapping share them, another mapping gets its own), and a refresh from them leaves
    what a refresh from the slot mapping leaves."""
    case = make_case(SEQ_LENS, num_kv_heads=3, group=2, block_size=BLOCK, dtype=torch.float32)
    slots = torch.cat([slot_mapping(case), torch.full((3,), -1)])
    ctx = step_context(BatchSpec(seq_lens=SEQ_LENS, query_lens=SEQ_LENS), {"page_chunk": 16})
    written = ctx.written_chunks(slots[: len(slots)])
    assert ctx.written_chunks(slots[: len(slots)]) is written
    assert ctx.written_chunks(slots[:-3]) is not written  # same storage, another length
    ids, counts = written  # a whole prefill: each chunk's tokens are all those it holds
    chunks = slots[slots >= 0] // 16
    assert sorted(ids.tolist()) == sorted(set(chunks.tolist()))
    assert counts.tolist() == [int((chunks == i).sum()) for i in ids]
    ours, theirs = PageSummaries(16, key_bits=4), PageSummaries(16, key_bits=4)
    ours.refresh(0, CPU_VEC, case.key_cache, slots, written=written)
    theirs.refresh(0, CPU_VEC, case.key_cache, slots)
    assert torch.equal(ours.layer(0, CPU_VEC, case.key_cache), theirs.layer(0, CPU_VEC, case.key_cache))
    assert torch.equal(ours.codes[0], theirs.codes[0])


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_refresh_step_by_step_matches_one_pass(layout):
    """A chunked prefill, then decode steps writing one token per row (padding slots -1 in the
    mapping), leave the same summaries as one refresh of everything."""
    final = [70, 45, 129]
    case = make_case(final, num_kv_heads=2, group=2, block_size=BLOCK, dtype=torch.float32, layout=layout)
    store = PageSummaries(16, key_bits=4)
    lengths = [30, 40, 100]  # the prefill, in two chunks
    for start, end in ((0, 17), (17, None)):
        stop = [min(n, end) if end else n for n in lengths]
        prefix = case.__class__(**{**case.__dict__, "seq_lens": torch.tensor(stop)})
        store.refresh(0, layout, case.key_cache, slot_mapping(prefix, [min(start, n) for n in lengths]))
    while lengths != final:
        nxt = [min(n + 1, f) for n, f in zip(lengths, final)]
        step = case.__class__(**{**case.__dict__, "seq_lens": torch.tensor(nxt)})
        slots = torch.cat([slot_mapping(step, lengths), torch.full((2,), -1)])
        store.refresh(0, layout, case.key_cache, slots)
        lengths = nxt
    assert_summaries(store, case)
    # the key copy too: every chunk re-coded on its final grid
    once = page_summaries(case, 16, key_bits=4)
    slots = slot_mapping(case)

    def by_slot(codes):  # [slots, Hkv, D * bits / 8]
        return codes.permute(0, 3, 1, 2).flatten(0, 1)

    torch.testing.assert_close(by_slot(store.codes[0])[slots], by_slot(once.codes[0])[slots])


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_key_copy_holds_each_key_within_half_a_step_of_its_chunks_grid(layout, bits):
    """Per channel, on the chunk's own min / max: |k - dequantized| <= step / 2, and the chunk's
    min and max themselves are exact."""
    case = make_case(SEQ_LENS, num_kv_heads=3, group=3, block_size=BLOCK, dtype=torch.float32, layout=layout)
    store = page_summaries(case, 16, key_bits=bits)
    copy = store.key_copy(0, layout, case.key_cache)
    assert copy.codes.shape[-2:] == (case.key_cache.shape[-1] * bits // 8, 16)
    for row, length in enumerate(case.seq_lens.tolist()):
        for index in range(-(-length // 16)):
            keys = case.keys[row][index * 16 : (index + 1) * 16].float()  # [n, Hkv, D]
            pos = index * 16
            chunk_id = (int(case.block_table[row, pos // BLOCK]) * BLOCK + pos % BLOCK) // 16
            low, high = copy.stats[MIN, chunk_id], copy.stats[MAX, chunk_id]
            got = dequantize(copy.codes[chunk_id, ..., : len(keys)].permute(2, 0, 1), low, high, bits)
            step = (high - low) / (2**bits - 1)
            assert ((got - keys).abs() <= step / 2 + 1e-5).all(), (row, index)
            torch.testing.assert_close(got.amin(0), low)
            torch.testing.assert_close(got.amax(0), high)


def test_a_reused_block_is_summarised_over_its_new_tokens_only():
    case = make_case([BLOCK], num_kv_heads=2, group=1, block_size=BLOCK, dtype=torch.float32)
    store = page_summaries(case, 32)
    new = torch.randn(5, 2, case.key_cache.shape[-1]) * 7
    write_tokens(CPU_VEC, case.key_cache, case.value_cache, case.block_table[0], 0, new, new)
    block = int(case.block_table[0, 0])
    store.refresh(0, CPU_VEC, case.key_cache, block * BLOCK + torch.arange(5))
    stats = store.layer(0, CPU_VEC, case.key_cache)
    torch.testing.assert_close(stats[MEAN, block * 2], new.mean(0))
    torch.testing.assert_close(stats[MAX, block * 2], new.amax(0))


def naive_pages_lse(case, b: int, settings: QadaSettings, bound: bool = False) -> torch.Tensor:
    """[Hq] the estimate row by row: whole pages from their own keys, the rest exactly."""
    c, length = settings.page_chunk, int(case.seq_lens[b])
    start, end = bulk_range(length, settings.t_sink, settings.t_local)
    group = case.query.shape[1] // case.num_kv_heads
    q = case.query[b].float().view(case.num_kv_heads, group, -1) * case.scale
    terms = []
    pos = start
    while pos < end:
        if pos % c == 0 and pos + c <= end:  # a whole page
            keys = case.keys[b][pos : pos + c].float()  # [c, Hkv, D]
            if bound:
                hi, lo = keys.amax(0), keys.amin(0)
                ub = torch.maximum(q * hi.unsqueeze(1), q * lo.unsqueeze(1)).sum(-1)
                terms.append(math.log(c) + ub)
            else:
                mu, var = keys.mean(0), keys.var(0, unbiased=False)
                est = (q * mu.unsqueeze(1)).sum(-1) + 0.5 * (q.square() * var.unsqueeze(1)).sum(-1)
                terms.append(math.log(c) + est)
            pos += c
        else:
            terms.append((q * case.keys[b][pos].float().unsqueeze(1)).sum(-1))
            pos += 1
    if not terms:
        return torch.full((q.shape[0] * group,), -math.inf)
    return torch.logsumexp(torch.stack(terms), 0).flatten()


def estimate(case, settings: QadaSettings, store_chunk: int, native: bool = True):
    store = page_summaries(case, store_chunk)
    plan = plan_pages(
        case.block_table, case.seq_lens, settings, block_size=case.block_size, store_chunk=store_chunk
    )
    stats = store.layer(0, case.layout, case.key_cache)
    if native:  # the C loop (summary_scores) where it builds: the test below asserts it does
        return pages_bulk_lse(case.layout, case.batch(), stats, plan)
    return bulk_lse_and_pages(case.layout, case.batch(), stats, plan, native=False)[0]


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize(
    ("t_sink", "t_local", "page_chunk", "store_chunk"),
    [(16, 32, 32, 32), (4, 20, 16, 16), (0, 8, 64, 16), (16, 128, 32, 16), (5, 3, 16, 16)],
)
@pytest.mark.parametrize("stats", ["pages", "pages_bound"])
@pytest.mark.parametrize("native", [True, False], ids=["c-kernel", "torch-ops"])
def test_pages_estimate_matches_a_row_by_row_computation(
    layout, t_sink, t_local, page_chunk, store_chunk, stats, native, monkeypatch
):
    assert summary_scores.library() is not None, "the C kernels did not build (see the warning)"
    ran = spy(monkeypatch, summary_scores, "page_logits")
    summed = spy(monkeypatch, summary_scores, "bulk_lse")
    case = make_case(
        [300, 37, 129, 21, 1], num_kv_heads=3, group=2, block_size=BLOCK, dtype=torch.float32, layout=layout
    )
    settings = QadaSettings(stats=stats, t_sink=t_sink, t_local=t_local, page_chunk=page_chunk)
    got = estimate(case, settings, store_chunk, native)
    assert ran == summed == ([True] if native else [])  # the C kernels computed it
    for b in range(len(case.keys)):
        want = naive_pages_lse(case, b, settings, bound=stats == "pages_bound")
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_one_token_pages_are_exact_and_the_bound_bounds(layout):
    """Pages of one key have no variance: the estimate is the exact bulk log-mass; with whole
    pages the bound is never below it."""
    case = make_case(SEQ_LENS, num_kv_heads=3, group=3, block_size=BLOCK, dtype=torch.float32, layout=layout)
    one = QadaSettings(stats="pages", page_chunk=1, t_sink=4, t_local=16)
    exact = exact_lse(layout, case.batch(), case.seq_lens.tolist(), one).bulk
    torch.testing.assert_close(estimate(case, one, 1), exact, atol=1e-4, rtol=1e-5)
    bound = estimate(case, one.replace(stats="pages_bound", page_chunk=32), 32)
    has_bulk = torch.isfinite(exact)
    assert (bound[has_bulk] >= exact[has_bulk] - 1e-4).all()
    assert torch.equal(torch.isfinite(bound), has_bulk)


def test_a_page_shifted_towards_the_query_stays_visible_in_its_page_not_in_one_gaussian():
    """A page of keys shifted along the query (score +8 each) in a bulk of noise: the page
    estimate keeps its mass, one Gaussian of the whole bulk (qada/prompt) dilutes the shift by
    the page's share of the bulk. (A single outlier key inside a page is not seen: a diagonal
    variance spreads it over D dimensions.)"""
    case = make_case([2048], num_kv_heads=1, group=1, block_size=128, dtype=torch.float32)
    q = case.query[0, 0]
    keys = torch.randn(2048, 1, q.shape[0], generator=torch.Generator().manual_seed(1)) * 0.3
    keys[896:928, 0] += q / q.norm() ** 2 * 8 / case.scale
    write_tokens(CPU_VEC, case.key_cache, case.value_cache, case.block_table[0], 0, keys, keys)
    case.keys[0] = keys
    settings = QadaSettings(stats="pages", page_chunk=32)
    exact = exact_lse(CPU_VEC, case.batch(), [2048], settings).bulk
    prompt_settings = settings.replace(stats="prompt")
    inputs = policy_inputs(case, prompt_settings)
    prompt = estimated_bulk_lse(
        prompt_settings, case.query, case.scale, bulk_sizes(case.seq_lens, settings), 1, inputs
    )
    assert abs(float(estimate(case, settings, 32) - exact)) < 0.1
    assert float(exact - prompt) > 3.0


def test_mean_group_rule_reads_a_group_when_its_heads_average_above_tau():
    query = torch.zeros(1, 4, 8)
    local = torch.zeros(1, 4)
    bulk = torch.tensor([[3.0, -3.0, -3.0, -3.0]])  # bulk shares ~0.95, 0.05, 0.05, 0.05
    n_bulk = torch.tensor([100])
    for groups, want_heads in (("any", [True, False, False, False]), ("mean", [False] * 4)):
        settings = QadaSettings(policy="oracle", tau=0.3, groups=groups)
        long = decide_long_heads(settings, query, 1.0, n_bulk, 1, local_lse=local, bulk_lse=bulk)
        assert long[0].tolist() == want_heads
        assert group_rule(long, 1).tolist() == [[any(want_heads)]]
    settings = QadaSettings(policy="oracle", tau=0.2, groups="mean")  # mean share 0.29 > 0.2
    long = decide_long_heads(settings, query, 1.0, n_bulk, 2, local_lse=local, bulk_lse=bulk)
    assert long[0].tolist() == [True, True, False, False]


def test_page_chunk_changes_only_coarsen_the_stored_pages():
    store = PageSummaries(32)
    store.check(64, 128)
    with pytest.raises(ValueError, match="multiple of 32"):
        store.check(16, 128)
    with pytest.raises(ValueError, match="does not divide"):
        store.check(96, 128)
