"""The page-summary refresh on GPU: `page_summaries.PageSummaries.refresh` as one Triton launch
over vLLM's Triton cache layout (key_cache [num_blocks, block_size, Hkv, D], contiguous last dim).

Grid (slots, Hkv): the program of slot i recomputes the chunk slot i falls in when i is the
last slot of the step in that chunk (the next slot is in another chunk, or there is none); every
other program, and those of padding slots (-1), return at once. No host sync, no dedup pass.
"""

# fmt: off
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _refresh_kernel(
    k_ptr, slot_ptr, stats_ptr, num_slots,
    stride_kb, stride_kt, stride_kh, stride_sf, stride_sc, stride_sh,
    BS: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    nxt = tl.load(slot_ptr + i + 1, mask=i + 1 < num_slots, other=-1).to(tl.int64)
    chunk = slot // C
    if (slot < 0) | ((nxt >= 0) & (nxt // C == chunk)):
        return  # padding, or not the chunk's last slot written this step
    count = slot % C + 1
    first = chunk * C
    offs_t = tl.arange(0, C)
    offs_d = tl.arange(0, D)
    valid = offs_t < count
    rows = (first // BS) * stride_kb + (first % BS + offs_t) * stride_kt
    k = tl.load(k_ptr + rows[:, None] + h * stride_kh + offs_d[None, :], mask=valid[:, None],
                other=0.0).to(tl.float32)
    n = count.to(tl.float32)
    mean = tl.sum(k, 0) / n
    dev = tl.where(valid[:, None], k - mean[None, :], 0.0)
    var = tl.sum(dev * dev, 0) / n
    low = tl.min(tl.where(valid[:, None], k, float("inf")), 0)
    high = tl.max(tl.where(valid[:, None], k, float("-inf")), 0)
    out = stats_ptr + chunk * stride_sc + h * stride_sh + offs_d  # MEAN, VAR, MIN, MAX
    tl.store(out, mean)
    tl.store(out + stride_sf, var)
    tl.store(out + 2 * stride_sf, low)
    tl.store(out + 3 * stride_sf, high)


def refresh_pages(stats: Tensor, key_cache: Tensor, slot_mapping: Tensor, chunk: int) -> None:
    """Recompute the summaries `stats` [4, chunks, Hkv, D] of every chunk `slot_mapping` [T]
    wrote; `chunk` and D powers of two (the block size a multiple of `chunk`)."""
    num_slots = slot_mapping.shape[0]
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    if chunk & (chunk - 1) or head_dim & (head_dim - 1) or block_size % chunk:
        raise ValueError(f"page chunk {chunk} and head size {head_dim} must be powers of two "
                         f"and the chunk must divide the block size {block_size}")
    if num_slots == 0:
        return
    _refresh_kernel[(num_slots, num_kv_heads)](
        key_cache, slot_mapping, stats, num_slots,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        stats.stride(0), stats.stride(1), stats.stride(2),
        BS=block_size, C=chunk, D=head_dim,
    )
