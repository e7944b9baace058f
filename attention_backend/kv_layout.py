"""The two paged KV-cache layouts the backends read, as the host-side code sees them.

- `CPU_VEC`, vLLM's CPU backend ("vec" ISA): key_cache / value_cache [num_blocks, Hkv, bs, D],
  views of one [num_blocks, Hkv, 2 * bs, D] tensor; a value block is row-major [bs, D], a key
  block holds a column-major [D, bs] matrix.
- `TRITON_NHD`, vLLM's Triton backend: key_cache / value_cache [num_blocks, bs, Hkv, D] (K and V
  interleaved per token and head; any strides with a contiguous last dim).

Everything that reads keys outside the kernels (key moments, the exact reference, the oracle's
observation) goes through `keys_at` / `keys_t_range`, so it works on either layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class KVLayout:
    name: str
    kv_head_axis: int  # where Hkv is in the 4-d cache view
    block_axis: int  # where the block's token offset is

    def num_kv_heads(self, cache: Tensor) -> int:
        return cache.shape[self.kv_head_axis]

    def block_size(self, cache: Tensor) -> int:
        return cache.shape[self.block_axis]

    def keys_at(self, key_cache: Tensor, blocks: Tensor, offsets: Tensor) -> Tensor:
        """Keys at (physical block, offset) pairs [T] as [T, Hkv, D] (cache dtype)."""
        if self is CPU_VEC:
            num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
            return key_cache.view(num_blocks, num_kv_heads, head_dim, block_size)[blocks, :, :, offsets]
        return key_cache[blocks, offsets]

    def keys_by_head(self, key_cache: Tensor) -> Tensor:
        """The keys as a [num_blocks, Hkv, bs, D] view (no copy)."""
        if self is CPU_VEC:
            num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
            return key_cache.view(num_blocks, num_kv_heads, head_dim, block_size).transpose(2, 3)
        return key_cache.transpose(1, 2)

    def values_at(self, value_cache: Tensor, blocks: Tensor, offsets: Tensor) -> Tensor:
        """Values at (physical block, offset) pairs [T] as [T, Hkv, D] (cache dtype)."""
        if self is CPU_VEC:
            return value_cache[blocks, :, offsets]
        return value_cache[blocks, offsets]

    def rows_at(self, cache: Tensor, block_row: Tensor, start: int, end: int, keys: bool = True) -> Tensor:
        """Positions [start, end) of one sequence as fp32 [end - start, Hkv, D]."""
        pos = torch.arange(start, end, device=block_row.device)
        bs = self.block_size(cache)
        blocks, offsets = block_row[pos // bs].long(), pos % bs
        at = self.keys_at if keys else self.values_at
        return at(cache, blocks, offsets).float()

    def keys_t_range(self, key_cache: Tensor, block_row: Tensor, start: int, end: int) -> Tensor:
        """K^T of positions [start, end) of one sequence, fp32 [Hkv, D, end - start], with one
        block-wise copy (the CPU layout's key blocks are K^T already)."""
        bs = self.block_size(key_cache)
        first = start // bs
        blocks = block_row[first : (end - 1) // bs + 1].long()
        lo, hi = start - first * bs, end - first * bs
        if self is CPU_VEC:
            num_blocks, num_kv_heads, _, head_dim = key_cache.shape
            columns = key_cache.view(num_blocks, num_kv_heads, head_dim, bs).permute(1, 2, 0, 3)
            keys_t = columns.index_select(2, blocks).reshape(num_kv_heads, head_dim, -1)
            return keys_t[:, :, lo:hi].float()
        keys = key_cache.index_select(0, blocks).flatten(0, 1)[lo:hi]  # [n, Hkv, D]
        return keys.float().permute(1, 2, 0)


CPU_VEC = KVLayout("cpu_vec", kv_head_axis=1, block_axis=2)
TRITON_NHD = KVLayout("triton_nhd", kv_head_axis=2, block_axis=1)
