"""Per-request bulk-key moments (QAdA's `prompt` statistics), one store for both backends.

The bulk of a row of length L is positions [t_sink, L - t_local) (`policy.bulk_range`). As
decoding goes on, positions leave the window and join the bulk. `MomentStore` keeps
n, S1 = sum k and S2 = sum k k^T of the bulk of every request it serves, per layer, in pooled
tensors on the cache's device, and remembers which bulk each request's sums cover. Each step the
builder plans once (`plan`: the keys every row still lacks), then each layer applies the plan to
its own cache (`read`). Whatever happened in between -- steps under another policy, a request
absent from some steps, a recompute from a shorter length, a changed window -- the plan reads
exactly the missing keys (or starts the request over), so the sums stay exact. A request's slot
is freed when it finishes or is preempted (`forget`; a resumed request is rebuilt from the cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kv_layout import KVLayout
from .policy import Moments, bulk_range

# A row whose bulk grew by more keys than this (a new, resumed or returning request) is read with
# one GEMM per KV head; fewer (one per decode step) join the step's batched outer-product update.
GEMM_MIN_KEYS = 8


@dataclass
class MomentStep:
    """What one step adds to the store, the same for every layer (from `MomentStore.plan`)."""

    block_table: Tensor  # [B, max_blocks] of the step's rows
    slots: Tensor  # [B] int64: each row's slot
    n: Tensor  # [B] int64: bulk size after the step
    resets: Tensor | None  # slots to zero first (new or shortened requests)
    ranges: list[tuple[int, int, int, int]]  # (row, slot, start, end): positions read by GEMM
    keys_at: tuple[Tensor, Tensor, Tensor] | None  # (row, position, slot) [T] of single new keys
    # Rows read afresh in every layer, not stored (prompt tails: several rows per request).
    extra: tuple[Tensor, list[int]] | None = None  # (block table [E, max_blocks], lengths)


def range_moments(layout: KVLayout, key_cache: Tensor, block_row: Tensor, start: int, end: int):
    """S1 [Hkv, D] and S2 [Hkv, D, D] (fp32) over positions [start, end) of one sequence."""
    keys_t = layout.keys_t_range(key_cache, block_row, start, end)  # [Hkv, D, n]
    return keys_t.sum(-1), torch.bmm(keys_t, keys_t.transpose(1, 2))


def fresh_moments(
    layout: KVLayout, key_cache: Tensor, block_table: Tensor, seq_lens: list[int], t_sink: int, t_local: int
) -> Moments:
    """Moments of each row's bulk read from scratch (per row, on the cache's device)."""
    num_kv_heads, head_dim = layout.num_kv_heads(key_cache), key_cache.shape[-1]
    dev = key_cache.device
    batch = len(seq_lens)
    s1 = torch.zeros(batch, num_kv_heads, head_dim, device=dev)
    s2 = torch.zeros(batch, num_kv_heads, head_dim, head_dim, device=dev)
    counts = []
    for b, seq_len in enumerate(seq_lens):
        start, end = bulk_range(seq_len, t_sink, t_local)
        counts.append(end - start)
        if end > start:
            s1[b], s2[b] = range_moments(layout, key_cache, block_table[b], start, end)
    return Moments(torch.tensor(counts, dtype=torch.long, device=dev), s1, s2)


class MomentStore:
    """n, S1, S2 of the bulk of every request being served, per layer, for one (t_sink, t_local)
    window: `plan` once per step, `read` in every layer, `forget` finished or preempted requests."""

    def __init__(self) -> None:
        self.window: tuple[int, int] | None = None
        self.slot_of: dict[str, int] = {}
        self.end_of: dict[str, int] = {}  # bulk end the stored sums cover
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
        window: tuple[int, int],
        block_size: int,
        extra: tuple[Tensor, list[int]] | None = None,
    ) -> MomentStep:
        """Give each row a slot and list the keys its sums still lack. Once per step: it records
        the new bulk ends, so every layer must then `read` the returned step. A new window makes
        every stored sum meaningless: the store starts over. `extra` rows are read afresh."""
        if window != self.window:
            self.__init__()
            self.window = window
        t_sink, t_local = window
        slots, counts, resets, ranges = [], [], [], []
        key_rows, positions, key_slots = [], [], []
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
                ranges.append((row, slot, start, end))
            elif end > start:
                key_rows += [row] * (end - start)
                positions += range(start, end)
                key_slots += [slot] * (end - start)
            self.end_of[req_id] = end
            slots.append(slot)
            counts.append(end - t_sink)
        dev = block_table.device

        def on_device(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long).to(dev, non_blocking=True)

        return MomentStep(
            block_table=block_table,
            slots=on_device(slots),
            n=on_device(counts),
            resets=on_device(resets) if resets else None,
            ranges=ranges,
            keys_at=tuple(on_device(x) for x in (key_rows, positions, key_slots)) if key_rows else None,
            extra=extra,
        )

    def read(self, layer: int, layout: KVLayout, key_cache: Tensor, step: MomentStep) -> Moments:
        """Apply `step` to this layer's sums; the rows' moments (pooled, with their slots; per
        row when the step has extra rows)."""
        s1, s2 = self._pool(layer, layout, key_cache)
        if step.resets is not None:
            s1.index_fill_(0, step.resets, 0.0)
            s2.index_fill_(0, step.resets, 0.0)
        for row, slot, start, end in step.ranges:
            sum1, sum2 = range_moments(layout, key_cache, step.block_table[row], start, end)
            s1[slot] += sum1
            s2[slot] += sum2
        if step.keys_at is not None:
            rows, positions, key_slots = step.keys_at
            block_size = layout.block_size(key_cache)
            blocks = step.block_table[rows, positions // block_size].long()
            keys = layout.keys_at(key_cache, blocks, positions % block_size).float()  # [T, Hkv, D]
            s1.index_add_(0, key_slots, keys)
            s2.index_add_(0, key_slots, keys.unsqueeze(-1) * keys.unsqueeze(-2))
        moments = Moments(step.n, s1, s2, step.slots)
        if step.extra is None:
            return moments
        table, lengths = step.extra
        extra = fresh_moments(layout, key_cache, table, lengths, *self.window)
        return Moments(*(torch.cat(parts) for parts in zip(moments.per_row()[:3], extra[:3])))

    def forget(self, req_ids) -> None:
        for req_id in req_ids or ():
            slot = self.slot_of.pop(req_id, None)
            self.end_of.pop(req_id, None)
            if slot is not None:
                self.free.append(slot)

    def _grow(self) -> int:
        """Double the capacity (every slot is in use) and return the first new slot."""
        old = self.capacity
        self.capacity = max(8, 2 * old)
        self.free = list(range(self.capacity - 1, old, -1))
        return old

    def _pool(self, layer: int, layout: KVLayout, key_cache: Tensor) -> tuple[Tensor, Tensor]:
        num_kv_heads, head_dim = layout.num_kv_heads(key_cache), key_cache.shape[-1]
        s1, s2 = self.layers.get(layer, (None, None))
        if s1 is None or s1.shape[0] < self.capacity:
            dev = key_cache.device
            new1 = torch.zeros(self.capacity, num_kv_heads, head_dim, device=dev)
            new2 = torch.zeros(self.capacity, num_kv_heads, head_dim, head_dim, device=dev)
            if s1 is not None:
                new1[: s1.shape[0]], new2[: s1.shape[0]] = s1, s2
            s1, s2 = self.layers[layer] = new1, new2
        return s1, s2
