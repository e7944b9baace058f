"""Bulk-key moments (QAdA "prompt" statistics) on device, over vLLM's Triton paged layout
(key_cache [num_blocks, block_size, Hkv, D]), batched over rows with torch ops.

The bulk of a row of length L is positions [t_sink, L - t_local). `build_key_moments` reads it
once; `advance_key_moments` then adds, per decode step, the one key that left the window, with no
Python loop over rows and no host sync (CUDA-graph safe).
"""

from __future__ import annotations

import torch
from torch import Tensor


def build_key_moments(
    key_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    t_sink: int,
    t_local: int,
    max_seq_len: int | None = None,
    chunk: int = 2048,
) -> tuple[Tensor, Tensor, Tensor]:
    """(n [B] int64, S1 [B, Hkv, D], S2 [B, Hkv, D, D]) fp32 over each row's bulk, read in
    position chunks of `chunk` tokens for all rows at once. `max_seq_len` bounds the chunk loop
    (computed with one host sync when not given)."""
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    batch, dev = seq_lens.shape[0], key_cache.device
    end = seq_lens.long() - t_local  # bulk is [t_sink, end)
    n = (end - t_sink).clamp(min=0)
    s1 = torch.zeros(batch, num_kv_heads, head_dim, device=dev)
    s2 = torch.zeros(batch, num_kv_heads, head_dim, head_dim, device=dev)
    max_end = (int(seq_lens.max()) if max_seq_len is None else max_seq_len) - t_local
    for start in range(t_sink, max_end, chunk):
        pos = torch.arange(start, min(start + chunk, max_end), device=dev)
        keys = _keys_at(key_cache, block_table, pos.expand(batch, -1), pos < end.unsqueeze(1))
        s1 += keys.sum(1)
        s2 += torch.einsum("bphd,bphe->bhde", keys, keys)
    return n, s1, s2


def advance_key_moments(
    n: Tensor,
    s1: Tensor,
    s2: Tensor,
    key_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    t_sink: int,
    t_local: int,
    rows: Tensor | None = None,
) -> None:
    """In place, for a decode step at lengths seq_lens [B]: the key at position L - 1 - t_local
    (it just left the window) joins the bulk of every row where that position is >= t_sink.
    Row b's moments are n[rows[b]], s1[rows[b]], s2[rows[b]] (default: row b). Call exactly once
    per step, with moments that cover the bulk of length L - 1."""
    pos = seq_lens.long() - 1 - t_local
    keys = _keys_at(key_cache, block_table, pos.unsqueeze(1), (pos >= t_sink).unsqueeze(1))[:, 0]
    joined = (pos >= t_sink).to(n.dtype)
    outer = keys.unsqueeze(-1) * keys.unsqueeze(-2)
    if rows is None:
        n += joined
        s1 += keys
        s2 += outer
    else:
        n.index_add_(0, rows, joined)
        s1.index_add_(0, rows, keys)
        s2.index_add_(0, rows, outer)


def _keys_at(key_cache: Tensor, block_table: Tensor, pos: Tensor, valid: Tensor) -> Tensor:
    """fp32 keys [B, P, Hkv, D] at positions pos [B, P]; zeros where not `valid` (never
    looking up block-table entries or cache slots there, which may be garbage)."""
    block_size = key_cache.shape[1]
    pos = torch.where(valid, pos, 0)
    logical = (pos // block_size).clamp(max=block_table.shape[1] - 1)
    blocks = torch.where(valid, block_table.gather(1, logical).long(), 0)
    keys = key_cache[blocks, pos % block_size].float()
    return torch.where(valid[..., None, None], keys, 0.0)
