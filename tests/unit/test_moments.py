"""Bulk key moments read from the paged cache, built at once or advanced token by token."""
from __future__ import annotations

import pytest
import torch

from attention_backend.moments import KeyMoments, bulk_range, gather_keys, stack_moments
from paged_helpers import make_case, write_tokens

T_SINK, T_LOCAL = 16, 64


def contiguous_moments(keys: torch.Tensor, seq_len: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(n, mean [Hkv, D], population covariance [Hkv, D, D]) of a non-empty bulk, straight from torch."""
    bulk = keys[T_SINK : seq_len - T_LOCAL].float()
    cov = torch.stack([torch.cov(bulk[:, h].T, correction=0) for h in range(bulk.shape[1])])
    return bulk.shape[0], bulk.mean(0), cov


def assert_same(a: KeyMoments, b: KeyMoments) -> None:
    assert (a.n, a.end) == (b.n, b.end)
    torch.testing.assert_close(a.s1, b.s1, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a.s2, b.s2, rtol=1e-5, atol=1e-3)


def test_bulk_range() -> None:
    assert bulk_range(1000, 16, 128) == (16, 872)
    assert bulk_range(144, 16, 128) == (16, 16)
    assert bulk_range(10, 16, 128) == (16, 16)
    assert bulk_range(145, 0, 128) == (0, 17)


def test_cache_layout_is_column_major_keys() -> None:
    """The helper writes what reshape_and_cache writes: K[d, j] at d * bs + j of each (block, head)."""
    case = make_case([40], num_kv_heads=2, group=1, block_size=16, dtype=torch.float32)
    raw = case.kv.view(case.kv.shape[0], 2, -1)  # [nb, Hkv, 2 * bs * D]: K block then V block
    pos, head, dim = 37, 1, 5
    blk, j = int(case.block_table[0, pos // 16]), pos % 16
    assert raw[blk, head, dim * 16 + j] == case.keys[0][pos, head, dim]
    assert raw[blk, head, 16 * 64 + j * 64 + dim] == case.values[0][pos, head, dim]


@pytest.mark.parametrize("block_size,dtype", [(16, torch.float32), (32, torch.bfloat16), (128, torch.bfloat16)])
@pytest.mark.parametrize("start,end", [(0, 300), (16, 236), (17, 18), (100, 100), (128, 257)])
def test_gather_keys(block_size: int, dtype: torch.dtype, start: int, end: int) -> None:
    case = make_case([300], num_kv_heads=3, group=1, block_size=block_size, dtype=dtype)
    keys = gather_keys(case.key_cache, case.block_table[0], start, end)
    assert keys.dtype == torch.float32 and keys.shape == (end - start, 3, 64)
    assert torch.equal(keys, case.keys[0][start:end].float())


@pytest.mark.parametrize("seq_len", [10, 80, 81, 500])
def test_build_matches_torch(seq_len: int) -> None:
    case = make_case([seq_len], num_kv_heads=2, group=1, block_size=32, dtype=torch.bfloat16)
    moments = KeyMoments.build(case.key_cache, case.block_table[0], seq_len, T_SINK, T_LOCAL)
    n_bulk = max(0, seq_len - T_SINK - T_LOCAL)
    assert moments.n == n_bulk and moments.end == T_SINK + n_bulk
    if n_bulk == 0:
        assert not moments.s1.any() and not moments.s2.any()
        return
    _, mean, cov = contiguous_moments(case.keys[0], seq_len)
    torch.testing.assert_close(moments.mean(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments.cov(), cov, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_size", [16, 128])
def test_advance_while_decoding_matches_build(block_size: int) -> None:
    """Prompt of 60 tokens, then tokens appended one at a time and in bursts, as a decode loop
    would write them; positions not written yet are NaN in the cache."""
    final = 400
    case = make_case([final], num_kv_heads=2, group=1, block_size=block_size, dtype=torch.float32, seed=5)
    keys, values = case.keys[0], case.values[0]
    case.kv.fill_(float("nan"))
    row = case.block_table[0]
    write_tokens(case.key_cache, case.value_cache, row, 0, keys[:60], values[:60])
    moments = KeyMoments.build(case.key_cache, row, 60, T_SINK, T_LOCAL)
    length = 60
    for step in [1] * 120 + [7, 1, 30, 1, 1, 100] + [1] * 80:
        write_tokens(case.key_cache, case.value_cache, row, length, keys[length:length + step],
                     values[length:length + step])
        length += step
        moments.advance(case.key_cache, row, length, T_SINK, T_LOCAL)
    assert length == final
    assert_same(moments, KeyMoments.build(case.key_cache, row, final, T_SINK, T_LOCAL))
    n, mean, cov = contiguous_moments(keys, final)
    assert moments.n == n
    torch.testing.assert_close(moments.mean(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments.cov(), cov, rtol=1e-4, atol=1e-4)


def test_shrink_rebuilds() -> None:
    case = make_case([300], num_kv_heads=2, group=1, block_size=16, dtype=torch.float32)
    row = case.block_table[0]
    moments = KeyMoments.build(case.key_cache, row, 300, T_SINK, T_LOCAL)
    moments.advance(case.key_cache, row, 150, T_SINK, T_LOCAL)
    assert_same(moments, KeyMoments.build(case.key_cache, row, 150, T_SINK, T_LOCAL))
    moments.advance(case.key_cache, row, 20, T_SINK, T_LOCAL)
    assert (moments.n, moments.end) == (0, T_SINK) and not moments.s2.any()


def test_stack_moments() -> None:
    case = make_case([200, 300], num_kv_heads=2, group=1, block_size=16, dtype=torch.float32)
    items = [KeyMoments.build(case.key_cache, case.block_table[b], length, T_SINK, T_LOCAL)
             for b, length in enumerate([200, 300])]
    n, s1, s2 = stack_moments([items[0], None, items[1]], 2, 64)
    assert n.tolist() == [120, 0, 220]
    assert s1.shape == (3, 2, 64) and s2.shape == (3, 2, 64, 64)
    assert torch.equal(s1[2], items[1].s1) and torch.equal(s2[0], items[0].s2)
    assert not s1[1].any() and not s2[1].any()
