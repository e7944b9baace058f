"""Bulk key moments read from the paged cache, in both layouts: from scratch, and kept by the
MomentStore while tokens are appended one at a time and in bursts, across layers, shortened,
absent, finished requests and window changes."""

from __future__ import annotations

import pytest
import torch

from attention_backend.kv_layout import CPU_VEC, TRITON_NHD
from attention_backend.moments import MomentStore, fresh_moments, range_moments
from attention_backend.policy import bulk_range
from attention_backend.testing.paged_cases import make_case, write_tokens

T_SINK, T_LOCAL = 16, 64
LAYOUTS = pytest.mark.parametrize("layout", [CPU_VEC, TRITON_NHD], ids=lambda layout: layout.name)


def contiguous_moments(keys: torch.Tensor, seq_len: int, t_local: int = T_LOCAL):
    """(n, S1 [Hkv, D], S2 [Hkv, D, D]) of the bulk, straight from the contiguous keys."""
    start, end = bulk_range(seq_len, T_SINK, t_local)
    bulk = keys[start:end].float()
    return end - start, bulk.sum(0), torch.einsum("nhd,nhe->hde", bulk, bulk)


def assert_moments(got, keys: list[torch.Tensor], seq_lens: list[int], t_local: int = T_LOCAL) -> None:
    n, s1, s2, _ = got.per_row()
    for row, (k, length) in enumerate(zip(keys, seq_lens)):
        ref_n, ref_s1, ref_s2 = contiguous_moments(k, length, t_local)
        assert n[row] == ref_n
        torch.testing.assert_close(s1[row], ref_s1, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(s2[row], ref_s2, rtol=1e-4, atol=1e-2)


def test_bulk_range() -> None:
    assert bulk_range(1000, 16, 128) == (16, 872)
    assert bulk_range(144, 16, 128) == (16, 16)
    assert bulk_range(10, 16, 128) == (16, 16)
    assert bulk_range(145, 0, 128) == (0, 17)


def test_cache_layout_is_column_major_keys() -> None:
    """The helper writes what reshape_and_cache writes: K[d, j] at d * bs + j of each (block, head)."""
    case = make_case([40], num_kv_heads=2, group=1, block_size=32, dtype=torch.float32)
    raw = case.kv.view(case.kv.shape[0], 2, -1)  # [nb, Hkv, 2 * bs * D]: K block then V block
    pos, head, dim = 37, 1, 5
    blk, j = int(case.block_table[0, pos // 32]), pos % 32
    assert raw[blk, head, dim * 32 + j] == case.keys[0][pos, head, dim]
    assert raw[blk, head, 32 * 64 + j * 64 + dim] == case.values[0][pos, head, dim]


@LAYOUTS
@pytest.mark.parametrize(
    "block_size,dtype", [(32, torch.float32), (64, torch.bfloat16), (128, torch.bfloat16)]
)
@pytest.mark.parametrize("start,end", [(0, 300), (16, 236), (17, 18), (100, 100), (128, 257)])
def test_gather_keys(layout, block_size: int, dtype: torch.dtype, start: int, end: int) -> None:
    case = make_case([300], num_kv_heads=3, group=1, block_size=block_size, dtype=dtype, layout=layout)
    keys = layout.rows_at(case.key_cache, case.block_table[0], start, end)
    assert keys.dtype == torch.float32 and keys.shape == (end - start, 3, 64)
    assert torch.equal(keys, case.keys[0][start:end].float())
    values = layout.rows_at(case.value_cache, case.block_table[0], start, end, keys=False)
    assert torch.equal(values, case.values[0][start:end].float())


@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start,end", [(0, 300), (16, 236), (17, 18), (128, 257)])
def test_range_moments(layout, dtype: torch.dtype, start: int, end: int) -> None:
    case = make_case([300], num_kv_heads=3, group=1, block_size=32, dtype=dtype, layout=layout)
    s1, s2 = range_moments(layout, case.key_cache, case.block_table[0], start, end)
    keys = case.keys[0][start:end].float()
    torch.testing.assert_close(s1, keys.sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s2, torch.einsum("nhd,nhe->hde", keys, keys), rtol=1e-5, atol=1e-3)


@LAYOUTS
def test_fresh_moments(layout) -> None:
    seq_lens = [10, 80, 81, 500]
    case = make_case(seq_lens, num_kv_heads=2, group=1, block_size=32, dtype=torch.bfloat16, layout=layout)
    got = fresh_moments(layout, case.key_cache, case.block_table, seq_lens, T_SINK, T_LOCAL)
    assert got.n.tolist() == [0, 0, 1, 420] and not got.s1[:2].any() and not got.s2[:2].any()
    assert_moments(got, case.keys, seq_lens)


@LAYOUTS
@pytest.mark.parametrize("block_size", [32, 128])
def test_store_while_decoding(layout, block_size: int) -> None:
    """Three requests in two layers: appended one token at a time and in bursts (as decode steps
    and resumed chunks write them), one request shortened (recomputed), one absent for a while
    (a prefill chunk, or another policy's steps), one finished and its slot reused by a new
    request, more requests than the initial capacity, and a window change. Unwritten positions
    are NaN, so reading one shows."""
    final = 420
    case = make_case(
        [final] * 10,
        num_kv_heads=2,
        group=1,
        block_size=block_size,
        dtype=torch.float32,
        seed=5,
        layout=layout,
    )
    case.kv.fill_(float("nan"))
    store = MomentStore()
    lengths = {0: 60, 1: 150, 2: 1}
    for row, length in lengths.items():
        write_tokens(
            layout,
            case.key_cache,
            case.value_cache,
            case.block_table[row],
            0,
            case.keys[row][:length],
            case.values[row][:length],
        )
    bursts = [1] * 90 + [7, 1, 30, 1, 1, 100] + [1] * 30
    t_local = T_LOCAL
    for step, burst in enumerate(bursts):
        if step == 50:  # request 1 is recomputed from a shorter length
            lengths[1] = 100
        if step == 60:  # request 2 finishes, request 3..9 start (capacity 8 must grow)
            store.forget(["r2"])
            del lengths[2]
            for row in range(3, 10):
                lengths[row] = 200
                write_tokens(
                    layout,
                    case.key_cache,
                    case.value_cache,
                    case.block_table[row],
                    0,
                    case.keys[row][:200],
                    case.values[row][:200],
                )
        if step == 100:  # another window: every sum starts over
            t_local = 32
        for row, length in lengths.items():
            new = min(burst, final - length)
            write_tokens(
                layout,
                case.key_cache,
                case.value_cache,
                case.block_table[row],
                length,
                case.keys[row][length : length + new],
                case.values[row][length : length + new],
            )
            lengths[row] = length + new
        absent = {0} if 70 <= step < 75 else set()  # request 0 grows but is not planned
        rows = [r for r in lengths if r not in absent]
        table = case.block_table[rows]
        lens = [lengths[r] for r in rows]
        plan = store.plan([f"r{r}" for r in rows], table, lens, (T_SINK, t_local), block_size)
        for layer in (0, 3):
            got = store.read(layer, layout, case.key_cache, plan)
            if (
                burst > 1 or step % 10 == 0 or step in (75, 100) or step == len(bursts) - 1
            ):  # errors would persist
                assert_moments(got, [case.keys[r] for r in rows], lens, t_local)
    assert store.capacity == 16 and "r2" not in store
    store.forget([f"r{r}" for r in lengths])
    assert not store.slot_of and len(store.free) == 16
