"""Per-sequence moments of the bulk keys (QAdA "prompt" statistics), read from the CPU cache.

The bulk of a sequence of length L is positions [t_sink, L - t_local). As decoding goes on,
positions leave the local window and join the bulk; `KeyMoments.advance` adds them with an
O(D^2) rank-k update instead of rereading the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def bulk_range(seq_len: int, t_sink: int, t_local: int) -> tuple[int, int]:
    """Half-open bulk positions [start, end); end == start when the bulk is empty."""
    return t_sink, max(t_sink, seq_len - t_local)


def gather_keys(key_cache: Tensor, block_table_row: Tensor, start: int, end: int) -> Tensor:
    """Keys of positions [start, end) of one sequence as fp32 [end - start, Hkv, D].

    key_cache is [num_blocks, Hkv, block_size, D] but each (block, head) holds a column-major
    [D, block_size] matrix (vLLM CPU "vec" layout).
    """
    _, num_kv_heads, block_size, head_dim = key_cache.shape
    if end <= start:
        return torch.zeros(0, num_kv_heads, head_dim)
    first = start // block_size
    blocks = block_table_row[first : (end - 1) // block_size + 1].long()
    keys = key_cache[blocks].view(-1, num_kv_heads, head_dim, block_size)
    keys = keys.permute(0, 3, 1, 2).reshape(-1, num_kv_heads, head_dim)
    offset = first * block_size
    return keys[start - offset : end - offset].float()


@dataclass
class KeyMoments:
    """n, S1 = sum k [Hkv, D], S2 = sum k k^T [Hkv, D, D] (fp32) over bulk positions [t_sink, end)."""

    n: int
    s1: Tensor
    s2: Tensor
    end: int

    @classmethod
    def build(
        cls, key_cache: Tensor, block_row: Tensor, seq_len: int, t_sink: int, t_local: int
    ) -> KeyMoments:
        start, end = bulk_range(seq_len, t_sink, t_local)
        keys = gather_keys(key_cache, block_row, start, end)
        return cls(n=end - start, s1=keys.sum(0), s2=torch.einsum("nhd,nhe->hde", keys, keys), end=end)

    def advance(
        self, key_cache: Tensor, block_row: Tensor, seq_len: int, t_sink: int, t_local: int
    ) -> None:
        """Bring the moments up to date for a sequence now `seq_len` long (in place)."""
        _, end = bulk_range(seq_len, t_sink, t_local)
        if end < self.end:  # the sequence got shorter (e.g. preempted and recomputed)
            fresh = KeyMoments.build(key_cache, block_row, seq_len, t_sink, t_local)
            self.n, self.s1, self.s2, self.end = fresh.n, fresh.s1, fresh.s2, fresh.end
            return
        if end == self.end:
            return
        keys = gather_keys(key_cache, block_row, self.end, end)
        self.s1 += keys.sum(0)
        self.s2 += torch.einsum("nhd,nhe->hde", keys, keys)
        self.n += end - self.end
        self.end = end

    def mean(self) -> Tensor:
        return self.s1 / max(self.n, 1)

    def cov(self) -> Tensor:
        """Population covariance S2/n - mu mu^T, [Hkv, D, D]."""
        mu = self.mean()
        return self.s2 / max(self.n, 1) - mu.unsqueeze(-1) * mu.unsqueeze(-2)


def stack_moments(
    items: list[KeyMoments | None], num_kv_heads: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch per-row moments into (n [B] int64, S1 [B, Hkv, D], S2 [B, Hkv, D, D]); zeros for None."""
    n = torch.zeros(len(items), dtype=torch.long)
    s1 = torch.zeros(len(items), num_kv_heads, head_dim)
    s2 = torch.zeros(len(items), num_kv_heads, head_dim, head_dim)
    for i, item in enumerate(items):
        if item is not None:
            n[i], s1[i], s2[i] = item.n, item.s1, item.s2
    return n, s1, s2
