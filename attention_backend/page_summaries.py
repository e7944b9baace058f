"""Page summaries beside the paged KV cache: per layer, per chunk of `chunk` tokens of every
physical KV block, per KV head, the keys' mean, population variance, min and max (fp32).

They are indexed by physical block id, so they need no request ids: whatever writes a block
(a prefill chunk, a decode token, a recompute after preemption, a reused block) refreshes it, and
a block shared by prefix caching was summarised when it was written. Each layer refreshes after
vLLM writes its new keys (`do_kv_cache_update`), from the step's slot mapping: every chunk a slot
of the step falls in is recomputed from the cache over its tokens up to the last one written (a
block is filled in order, so those are exactly the chunk's valid tokens).

Memory: 4 * (block_size / chunk) * Hkv * D * 4 bytes per block and layer: 4 / chunk times an
fp32 key cache, 2 / chunk of the K+V cache (chunk 16: 12.5%; chunk 32: 6.25%).
Launched with `key_bits` (`page_rank_bits`), the refresh also re-codes the chunk's keys on its new
min / max (`key_codes`): bits / 64 of the fp32 K+V cache more (4 bits: 6.25%).
The refresh here is a C loop on CPU (`summary_scores`, PyTorch ops where it declines);
`page_summary_kernel` does it on GPU (no key copy).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import summary_scores
from .key_codes import KeyCopy, code_bytes, quantize
from .kv_layout import KVLayout

MEAN, VAR, MIN, MAX = range(4)


def check_page_chunk(page_chunk: int, stored_chunk: int, block_size: int | None = None) -> None:
    """Refuse a page size summaries stored at `stored_chunk` cannot give (not a multiple of it,
    or one that does not divide the block)."""
    if page_chunk % stored_chunk:
        raise ValueError(
            f"page_chunk {page_chunk} is not a multiple of {stored_chunk}, the page size the "
            "summaries were launched with"
        )
    if block_size is not None and block_size % page_chunk:
        raise ValueError(f"page_chunk {page_chunk} does not divide the KV block size {block_size}")


class PageSummaries:
    """Per layer: stats [4, num_blocks * block_size // chunk, Hkv, D] (MEAN, VAR, MIN, MAX);
    chunk `i` holds tokens [i * chunk, (i + 1) * chunk) of the flat slot space. With `key_bits`,
    also the keys' codes [num_chunks, Hkv, D * key_bits / 8, chunk] on those chunks' min / max
    (a chunk's codes of one KV head contiguous, byte-major: what a ranking reads, `key_codes`)."""

    def __init__(self, chunk: int, key_bits: int = 0) -> None:
        self.chunk = chunk
        self.key_bits = key_bits
        self.layers: dict[int, Tensor] = {}
        self.codes: dict[int, Tensor] = {}

    def check(self, page_chunk: int, block_size: int | None = None) -> None:
        """Refuse a page size these summaries cannot give (`check_page_chunk`)."""
        check_page_chunk(page_chunk, self.chunk, block_size)

    def layer(self, layer: int, layout: KVLayout, key_cache: Tensor) -> Tensor:
        """This layer's summaries, allocated at its first use (zeros)."""
        stats = self.layers.get(layer)
        if stats is None:
            block_size = layout.block_size(key_cache)
            self.check(self.chunk, block_size)
            num_chunks = key_cache.shape[0] * block_size // self.chunk
            shape = (4, num_chunks, layout.num_kv_heads(key_cache), key_cache.shape[-1])
            stats = self.layers[layer] = torch.zeros(shape, dtype=torch.float32, device=key_cache.device)
            if self.key_bits:
                nbytes = code_bytes(shape[-1], self.key_bits)
                self.codes[layer] = torch.zeros(
                    (num_chunks, shape[2], nbytes, self.chunk), dtype=torch.uint8, device=key_cache.device
                )
        return stats

    def key_copy(self, layer: int, layout: KVLayout, key_cache: Tensor) -> KeyCopy:
        """This layer's key copy (launched with `key_bits`)."""
        if not self.key_bits:
            raise RuntimeError("these page summaries keep no key copy (launched without page_rank_bits)")
        stats = self.layer(layer, layout, key_cache)
        return KeyCopy(self.codes[layer], stats, self.key_bits)

    def written(self, slot_mapping: Tensor) -> tuple[Tensor, Tensor]:
        """(chunk ids, valid tokens) [C] int64 of the chunks a step's `slot_mapping` [T] writes
        (-1: no write), `written_chunks` of its slots."""
        slots = slot_mapping.long()
        return written_chunks(slots[slots >= 0], self.chunk)

    def refresh(
        self,
        layer: int,
        layout: KVLayout,
        key_cache: Tensor,
        slot_mapping: Tensor,
        *,
        native: bool = True,
        written: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Recompute every chunk the step's `slot_mapping` [T] wrote (-1: no write): on the CPU by
        one C loop over the cache in place (`summary_scores`), else (or `native=False`) by PyTorch
        ops. `written`: `self.written(slot_mapping)`, where the caller keeps it for all layers."""
        stats = self.layer(layer, layout, key_cache)
        chunk_ids, counts = self.written(slot_mapping) if written is None else written
        if not chunk_ids.numel():
            return
        codes = self.codes[layer] if self.key_bits else None
        if native and summary_scores.refresh(
            layout.keys_by_head(key_cache), chunk_ids, counts, self.chunk, stats, codes
        ):
            return
        keys, valid = chunk_keys(layout, key_cache, chunk_ids, counts, self.chunk)
        summary = summarize(keys, valid, counts)
        stats.index_copy_(1, chunk_ids, summary)
        if self.key_bits:  # the chunk's grid moved: re-code all its keys
            codes = quantize(keys, summary[MIN], summary[MAX], self.key_bits)
            self.codes[layer].index_copy_(0, chunk_ids, codes)


def written_chunks(slots: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """(chunk ids, valid tokens) of the chunks the slots [T] fall in: a chunk's tokens are written
    in order, so it is valid up to its last slot written (a request's slots are consecutive)."""
    ids = slots // chunk
    last = torch.ones_like(ids, dtype=torch.bool)
    last[:-1] = ids[1:] != ids[:-1]
    return ids[last], slots[last] % chunk + 1


def chunk_keys(layout: KVLayout, key_cache: Tensor, chunk_ids: Tensor, counts: Tensor, chunk: int):
    """fp32 keys [N, chunk, Hkv, D] of the chunks and which of them are valid [N, chunk]."""
    block_size = layout.block_size(key_cache)
    first = chunk_ids * chunk
    offsets = first.unsqueeze(1) % block_size + torch.arange(chunk, device=first.device)
    blocks = (first // block_size).unsqueeze(1).expand_as(offsets)
    keys = layout.keys_at(key_cache, blocks, offsets).float()
    return keys, torch.arange(chunk, device=first.device) < counts.unsqueeze(1)


def summarize(keys: Tensor, valid: Tensor, counts: Tensor) -> Tensor:
    """[4, N, Hkv, D]: mean, population variance (two-pass), min and max of the valid keys."""
    mask = valid.view(*valid.shape, 1, 1)
    n = counts.view(-1, 1, 1).float()
    mean = torch.where(mask, keys, 0.0).sum(1) / n
    var = torch.where(mask, (keys - mean.unsqueeze(1)).square(), 0.0).sum(1) / n
    low = torch.where(mask, keys, torch.inf).amin(1)
    high = torch.where(mask, keys, -torch.inf).amax(1)
    return torch.stack([mean, var, low, high])
