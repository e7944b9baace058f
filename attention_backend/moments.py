"""Bulk-key moments (QAdA "prompt" statistics) of the decoding requests, read from the CPU cache.

The bulk of a sequence of length L is positions [t_sink, L - t_local). As decoding goes on,
positions leave the local window and join the bulk; `MomentStore` keeps n, S1 = sum k and
S2 = sum k k^T of every running request and layer in pooled tensors and adds the keys that left
the window with one batched update per layer, instead of rereading the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# A row whose bulk grew by more keys than this (a new or resumed request) is read with one GEMM;
# fewer (one per decode step) join the batch's outer-product update.
GEMM_MIN_KEYS = 8


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


def range_moments(key_cache: Tensor, block_table_row: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
    """S1 = sum k [Hkv, D] and S2 = sum k k^T [Hkv, D, D] (fp32) over positions [start, end):
    the blocks' column-major keys side by side are K^T [Hkv, D, n], so S2 is one GEMM per head."""
    num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
    if end <= start:
        return torch.zeros(num_kv_heads, head_dim), torch.zeros(num_kv_heads, head_dim, head_dim)
    first = start // block_size
    blocks = block_table_row[first : (end - 1) // block_size + 1].long()
    columns = key_cache.view(num_blocks, num_kv_heads, head_dim, block_size).permute(1, 2, 0, 3)
    keys_t = columns.index_select(2, blocks).view(num_kv_heads, head_dim, -1)  # one copy
    keys_t = keys_t[:, :, start - first * block_size : end - first * block_size].float()
    return keys_t.sum(-1), torch.bmm(keys_t, keys_t.transpose(1, 2))


def fresh_moments(
    key_cache: Tensor, block_table: Tensor, seq_lens: list[int], t_sink: int, t_local: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of each row's bulk read from scratch: n [B] int64, S1 [B, Hkv, D], S2 [B, Hkv, D, D]."""
    _, num_kv_heads, _, head_dim = key_cache.shape
    batch = len(seq_lens)
    n = torch.zeros(batch, dtype=torch.long)
    s1 = torch.zeros(batch, num_kv_heads, head_dim)
    s2 = torch.zeros(batch, num_kv_heads, head_dim, head_dim)
    for b, seq_len in enumerate(seq_lens):
        start, end = bulk_range(seq_len, t_sink, t_local)
        n[b] = end - start
        s1[b], s2[b] = range_moments(key_cache, block_table[b], start, end)
    return n, s1, s2


@dataclass
class MomentStep:
    """What one decode step adds to the store, the same for every layer (from `MomentStore.plan`)."""

    slots: Tensor  # [B] int64: each row's slot
    n: Tensor  # [B] int64: bulk size after the step
    resets: Tensor | None  # slots to zero first (new, resumed or shortened requests)
    ranges: list[tuple[Tensor, int, int, int]]  # (block row, slot, start, end) read by GEMM
    keys_at: tuple[Tensor, Tensor, Tensor] | None  # (block, offset, slot) [T] of single new keys


class MomentStore:
    """n, S1, S2 of the bulk of every running request, per layer. Each decode step: `plan` once,
    then `read` in every layer; `forget` frees a request's slot (finished or preempted: a resumed
    request is rebuilt from the cache)."""

    def __init__(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.end_of: dict[str, int] = {}  # bulk end the stored moments cover
        self.free: list[int] = []
        self.capacity = 0
        self.layers: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> S1 [cap, Hkv, D], S2

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.slot_of

    def plan(
        self,
        req_ids: list[str],
        block_table: Tensor,
        seq_lens: list[int],
        t_sink: int,
        t_local: int,
        block_size: int,
    ) -> MomentStep:
        """Give each row a slot and list the keys its moments still lack. Once per decode step:
        it records the new bulk ends, so every layer must then `read` the returned step."""
        slots, counts, resets, ranges = [], [], [], []
        blocks, offsets, key_slots = [], [], []
        for row, (req_id, seq_len) in enumerate(zip(req_ids, seq_lens)):
            slot = self.slot_of.get(req_id)
            if slot is None:
                slot = self.slot_of[req_id] = self.free.pop() if self.free else self._grow()
            start, end = bulk_range(seq_len, t_sink, t_local)
            done = self.end_of.get(req_id)
            if done is None or done > end:  # unknown, or the sequence got shorter
                resets.append(slot)
            else:
                start = done
            if end - start > GEMM_MIN_KEYS:
                ranges.append((block_table[row], slot, start, end))
            elif end > start:
                positions = range(start, end)
                blocks += [int(block_table[row, p // block_size]) for p in positions]
                offsets += [p % block_size for p in positions]
                key_slots += [slot] * len(positions)
            self.end_of[req_id] = end
            slots.append(slot)
            counts.append(end - t_sink)
        return MomentStep(
            slots=torch.tensor(slots, dtype=torch.long),
            n=torch.tensor(counts, dtype=torch.long),
            resets=torch.tensor(resets, dtype=torch.long) if resets else None,
            ranges=ranges,
            keys_at=tuple(torch.tensor(x, dtype=torch.long) for x in (blocks, offsets, key_slots))
            if blocks
            else None,
        )

    def read(self, layer: int, key_cache: Tensor, step: MomentStep) -> tuple[Tensor, Tensor, Tensor]:
        """Apply `step` to this layer's moments; returns the rows' n [B], S1 [B, Hkv, D] and
        S2 [B, Hkv, D, D]."""
        s1, s2 = self._layer(layer, key_cache)
        if step.resets is not None:
            s1.index_fill_(0, step.resets, 0.0)
            s2.index_fill_(0, step.resets, 0.0)
        for block_row, slot, start, end in step.ranges:
            sum1, sum2 = range_moments(key_cache, block_row, start, end)
            s1[slot] += sum1
            s2[slot] += sum2
        if step.keys_at is not None:
            blocks, offsets, key_slots = step.keys_at
            num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
            keys = key_cache.view(num_blocks, num_kv_heads, head_dim, block_size)[blocks, :, :, offsets]
            keys = keys.float()  # [T, Hkv, D]
            s1.index_add_(0, key_slots, keys)
            s2.index_add_(0, key_slots, keys.unsqueeze(-1) * keys.unsqueeze(-2))
        return step.n, s1.index_select(0, step.slots), s2.index_select(0, step.slots)

    def forget(self, req_ids) -> None:
        for req_id in req_ids or ():
            slot = self.slot_of.pop(req_id, None)
            self.end_of.pop(req_id, None)
            if slot is not None:
                self.free.append(slot)

    def clear(self) -> None:
        self.__init__()

    def _grow(self) -> int:
        """Double the capacity (every slot is in use) and return the first new slot."""
        old = self.capacity
        self.capacity = max(8, 2 * old)
        self.free = list(range(self.capacity - 1, old, -1))
        return old

    def _layer(self, layer: int, key_cache: Tensor) -> tuple[Tensor, Tensor]:
        _, num_kv_heads, _, head_dim = key_cache.shape
        s1, s2 = self.layers.get(layer, (None, None))
        if s1 is None or s1.shape[0] < self.capacity:
            old = 0 if s1 is None else s1.shape[0]
            new1 = torch.zeros(self.capacity, num_kv_heads, head_dim)
            new2 = torch.zeros(self.capacity, num_kv_heads, head_dim, head_dim)
            if old:
                new1[:old], new2[:old] = s1, s2
            s1, s2 = self.layers[layer] = new1, new2
        return s1, s2
