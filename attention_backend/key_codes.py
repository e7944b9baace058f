"""A low-bit copy of the keys beside the paged cache, for ranking KV blocks (`page_rank_bits`).

Each key is quantized per channel on the grid of its page-summary chunk (as KIVI quantizes keys
per channel): `bits`-bit codes of (k - min) / step, step = (max - min) / (2^bits - 1), with min
and max the chunk's own (`page_summaries`), so the copy costs bits / 32 of an fp32 key cache plus
the chunks' min / max that the summaries store anyway. Codes are packed 8 / bits to a byte along
the head dimension (dimension d in byte d // per at bit (d % per) * bits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

KEY_BITS = (0, 2, 4, 8)  # 0: no copy


class KeyCopy(NamedTuple):
    """One layer's key copy: what a ranking reads."""

    codes: Tensor  # [num_chunks, chunk, Hkv, D * bits / 8] uint8, chunk i = slots [i * chunk, ...)
    stats: Tensor  # the layer's page summaries [4, num_chunks, Hkv, D]: MIN and MAX are the grid
    bits: int


def code_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one key's codes for one KV head."""
    if bits not in KEY_BITS[1:] or (head_dim * bits) % 8:
        raise ValueError(f"a {bits}-bit key copy needs bits in {KEY_BITS[1:]} and whole bytes per key")
    return head_dim * bits // 8


def quantize(keys: Tensor, low: Tensor, high: Tensor, bits: int) -> Tensor:
    """Packed codes [N, chunk, Hkv, D * bits / 8] of keys [N, chunk, Hkv, D] on the grid of each
    chunk's per-channel low / high [N, Hkv, D] (a constant channel codes as 0)."""
    levels = 2**bits - 1
    step = ((high - low) / levels).unsqueeze(1)
    scaled = torch.where(step > 0, (keys - low.unsqueeze(1)) / step, 0.0)
    codes = scaled.nan_to_num(0.0).round_().clamp_(0, levels).to(torch.uint8)
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=keys.device)
    grouped = codes.view(*codes.shape[:-1], -1, per) << shifts
    return grouped.sum(-1, dtype=torch.uint8) if per > 1 else grouped.squeeze(-1)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., D] of packed [..., D * bits / 8]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)


def dequantize(packed: Tensor, low: Tensor, high: Tensor, bits: int) -> Tensor:
    """The keys the codes stand for: low + code * step, with low / high broadcast against the
    unpacked codes [..., D]."""
    return low + unpack(packed, bits).float() * ((high - low) / (2**bits - 1))
