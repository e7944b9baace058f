"""A low-bit copy of the keys beside the paged cache, for ranking KV blocks (`page_rank_bits`).

Each key is quantized per channel on the grid of its page-summary chunk (as KIVI quantizes keys
per channel): `bits`-bit codes of (k - min) / step, step = (max - min) / (2^bits - 1), with min
and max the chunk's own (`page_summaries`), so the copy costs bits / 32 of an fp32 key cache plus
the chunks' min / max that the summaries store anyway. Codes are packed 8 / bits to a byte along
the head dimension: with per = 8 / bits, dimension i * D / per + j in byte j at bit i * bits, so
each shift of the bytes gives a contiguous run of dimensions (`pieces`). A chunk's codes are
stored byte-major, [D * bits / 8, chunk]: byte b of its tokens side by side, so that a ranking
scores all the chunk's tokens one dimension at a time (`summary_scores.c`, vectorized over tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

KEY_BITS = (0, 2, 4, 8)  # 0: no copy


class KeyCopy(NamedTuple):
    """One layer's key copy: what a ranking reads."""

    codes: Tensor  # [num_chunks, Hkv, D * bits / 8, chunk] uint8, chunk i = slots [i * chunk, ...)
    stats: Tensor  # the layer's page summaries [4, num_chunks, Hkv, D]: MIN and MAX are the grid
    bits: int


def code_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one key's codes for one KV head."""
    if bits not in KEY_BITS[1:] or (head_dim * bits) % 8:
        raise ValueError(f"a {bits}-bit key copy needs bits in {KEY_BITS[1:]} and whole bytes per key")
    return head_dim * bits // 8


def grid_step(low: Tensor, high: Tensor, bits: int) -> Tensor:
    """The value of one code step on the grid [low, high]."""
    return (high - low) / (2**bits - 1)


def quantize(keys: Tensor, low: Tensor, high: Tensor, bits: int) -> Tensor:
    """Packed codes [N, Hkv, D * bits / 8, chunk] (byte-major) of keys [N, chunk, Hkv, D] on the
    grid of each chunk's per-channel low / high [N, Hkv, D] (a constant channel codes as 0)."""
    levels = 2**bits - 1
    step = grid_step(low, high, bits).unsqueeze(1)
    scaled = torch.where(step > 0, (keys - low.unsqueeze(1)) / step, 0.0)
    codes = scaled.nan_to_num(0.0).round_().clamp_(0, levels).to(torch.uint8).transpose(1, 2)
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=keys.device).view(-1, 1)
    runs = codes.unflatten(-1, (per, -1)) << shifts  # [N, Hkv, chunk, per, D / per]
    return runs.sum(-2, dtype=torch.uint8).transpose(-1, -2).contiguous()


def pieces(packed: Tensor, bits: int) -> list[Tensor]:
    """The codes of packed [..., D * bits / 8] as 8 / bits uint8 runs [..., D * bits / 8], run i
    holding dimensions [i * D * bits / 8, (i + 1) * D * bits / 8)."""
    return [(packed >> shift) & (2**bits - 1) for shift in range(0, 8, bits)]


def unpack(packed: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., D] of packed [..., D * bits / 8]."""
    return torch.cat(pieces(packed, bits), dim=-1)


def dequantize(packed: Tensor, low: Tensor, high: Tensor, bits: int) -> Tensor:
    """The keys the codes stand for: low + code * step, with low / high broadcast against the
    unpacked codes [..., D]."""
    return low + unpack(packed, bits).float() * grid_step(low, high, bits)
