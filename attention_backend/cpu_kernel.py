"""Batched QAdA decode over vLLM's CPU paged KV cache ("vec" layout), in pure torch.

Cache layout: key_cache / value_cache are [num_blocks, Hkv, block_size, D]; a value block is
row-major [block_size, D], a key block holds a column-major [D, block_size] matrix.

Every row first attends to its local set only (sink blocks + window blocks, one batched gather).
The policy then marks KV groups long; only those (row, KV head) pairs read their bulk blocks, and
the bulk partial is merged into the local one by log-sum-exp.

Bulk (and `full`) reads avoid copies where they can: a run of physically consecutive blocks of a
KV head is a uniformly strided batch of [D, bs] / [bs, D] matrices, so `matmul` reads it straight
from the cache. Only short runs (fragmented block tables) are gathered, in cache-sized chunks.
Everything that depends only on (block_table, seq_lens, cfg) -- identical for all layers of a
decode step -- lives in a `DecodePlan`; build it once per step with `plan_decode` and pass it to
every layer's `paged_decode(..., plan=plan)`, or let `paged_decode` build it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .policy import PolicyConfig, decide_long_heads, group_rule

# Runs of at least MIN_RUN physically consecutive blocks are read in place; shorter runs are
# gathered. Segments hold at most MAX_CHUNK blocks so that gathered / converted copies stay in L2.
MIN_RUN = 2
MAX_CHUNK = 32
CONVERT_CHUNK = 16  # blocks per fp32 copy of a 16-bit cache


class DecodeResult(NamedTuple):
    output: Tensor  # [B, Hq, D], query dtype
    long_heads: Tensor  # [B, Hq] bool
    long_groups: Tensor  # [B, Hkv] bool


class _Segment(NamedTuple):
    """Blocks [j0, j0 + n) of a row's range: a physical run starting at p0 (read in place), or,
    when p0 < 0, gathered blocks `blocks` [n] (physical ids, int64)."""

    j0: int
    n: int
    p0: int
    blocks: Tensor | None
    rows: Tensor | None  # blocks * Hkv + head, [Hkv, n] (gathered segments only)
    rows_all: Tensor | None  # [n * Hkv], all heads interleaved as in the cache


class _RowRange(NamedTuple):
    """Positions [lo, (n - 1) * bs + hi) of the n blocks of one row's range, split into segments.
    The last block is its own segment when hi < bs, so its unwritten tail is never multiplied."""

    n: int
    lo: int
    hi: int
    segments: tuple[_Segment, ...]


@dataclass
class DecodePlan:
    """Everything `paged_decode` needs that depends only on the block table, the sequence lengths,
    the block size, the number of KV heads and the (t_sink, t_local) of the policy."""

    batch: int
    block_size: int
    num_kv_heads: int
    t_sink: int
    t_local: int
    lengths: list[int]
    n_bulk: Tensor  # [B] int64
    local_rows: Tensor  # [B * Hkv * S] flat (block, head) rows of the local slots
    local_slots: int  # S
    local_valid: Tensor  # [B, 1, S, 1, bs] bool
    local_invalid: Tensor  # ~local_valid
    local_valid_f: Tensor  # local_valid as fp32
    local_clean_all: bool  # some slot other than the last may hold an unwritten tail
    local_count: Tensor  # [B, 1, 1] valid local slots
    table_rows: list[list[int]] = field(repr=False)
    _bulk: dict[int, _RowRange | None] = field(default_factory=dict, repr=False)
    _full: dict[int, _RowRange] = field(default_factory=dict, repr=False)

    def bulk(self, b: int) -> _RowRange | None:
        if b not in self._bulk:
            length = self.lengths[b]
            start, end = self.t_sink, max(self.t_sink, length - self.t_local)
            self._bulk[b] = None if end <= start else self._range(b, start, end)
        return self._bulk[b]

    def full(self, b: int) -> _RowRange:
        if b not in self._full:
            self._full[b] = self._range(b, 0, self.lengths[b])
        return self._full[b]

    def _range(self, b: int, start: int, end: int) -> _RowRange:
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        blocks = self.table_rows[b][first : last + 1]
        lo, hi = start - first * bs, end - last * bs
        n = len(blocks)
        body = n - 1 if hi < bs else n
        segments = _segments(blocks[:body], 0, self.num_kv_heads)
        if body < n:
            segments += _segments(blocks[body:], body, self.num_kv_heads)
        return _RowRange(n, lo, hi, tuple(segments))


def _segments(blocks: list[int], offset: int, num_kv_heads: int) -> list[_Segment]:
    """Split physical blocks into in-place runs (>= MIN_RUN consecutive ids) and gathered
    segments, each at most MAX_CHUNK blocks; j0 counts from `offset`."""
    out: list[_Segment] = []
    pending: list[int] = []  # start index of pending short-run blocks

    def flush_gather(idx: list[int]) -> None:
        for c in range(0, len(idx), MAX_CHUNK):
            part = idx[c : c + MAX_CHUNK]
            phys = torch.tensor([blocks[i] for i in part], dtype=torch.long)
            rows = phys.unsqueeze(0) * num_kv_heads + torch.arange(num_kv_heads).unsqueeze(1)
            out.append(_Segment(offset + part[0], len(part), -1, phys, rows,
                                rows.t().reshape(-1)))

    i = 0
    while i < len(blocks):
        j = i + 1
        while j < len(blocks) and blocks[j] == blocks[j - 1] + 1:
            j += 1
        if j - i >= MIN_RUN:
            if pending:
                flush_gather(pending)
                pending = []
            for c in range(i, j, MAX_CHUNK):
                n = min(MAX_CHUNK, j - c)
                out.append(_Segment(offset + c, n, blocks[c], None, None, None))
        else:
            pending.extend(range(i, j))
            if len(pending) >= MAX_CHUNK:
                flush_gather(pending)
                pending = []
        i = j
    if pending:
        flush_gather(pending)
    # Gathered segments must cover consecutive j ranges: pending blocks are always consecutive
    # because a run flushes them first.
    return out


def plan_decode(
    block_table: Tensor, seq_lens: Tensor, cfg: PolicyConfig, *, block_size: int, num_kv_heads: int
) -> DecodePlan:
    """Precompute the layer-independent part of `paged_decode` for one decode step.

    block_table [B, max_blocks], seq_lens [B] (>= 1, including the current token). Entries of
    block_table past a row's last block are never read.
    """
    batch = seq_lens.shape[0]
    seq_lens = seq_lens.long()
    lengths = seq_lens.tolist()
    n_sink = -(-cfg.t_sink // block_size)
    n_window = -(-cfg.t_local // block_size) + 1
    last = (seq_lens - 1) // block_size  # last logical block of each row
    logical = torch.cat([
        torch.arange(n_sink).expand(batch, n_sink),
        last.unsqueeze(1) - torch.arange(n_window - 1, -1, -1),
    ], dim=1)  # [B, S]
    num_slots = logical.shape[1]
    # Slots outside [0, last] (short rows) read a clamped block and are fully masked below:
    # block_table entries past a row's last block may be garbage, so they are never looked up.
    phys = block_table.long().gather(1, logical.clamp(min=0).minimum(last.unsqueeze(1)))
    # Sink slots keep positions < t_sink, window slots the rest, so overlaps count once.
    pos = logical.unsqueeze(2) * block_size + torch.arange(block_size)  # [B, S, bs]
    t = (seq_lens - 1).view(batch, 1, 1)
    sink_ok = (pos < cfg.t_sink) & (pos <= t)
    window_ok = (pos >= cfg.t_sink) & (pos > t - cfg.t_local) & (pos <= t)
    is_sink_slot = (torch.arange(num_slots) < n_sink).view(1, -1, 1)
    valid = torch.where(is_sink_slot, sink_ok, window_ok)  # [B, S, bs]
    # A slot without valid positions reads logical block 0 instead, fully written when the row
    # has more than one block; then only the last slot (the row's last block) has an unwritten
    # tail. Otherwise (a row of one block, or sinks reaching the last block) clean every slot.
    empty = ~valid.any(-1)  # [B, S]
    phys = torch.where(empty, block_table[:, :1].long(), phys)
    clean_all = bool((last < max(n_sink, 1)).any())
    rows = phys.unsqueeze(1) * num_kv_heads + torch.arange(num_kv_heads).view(1, -1, 1)
    n_blocks = (last + 1).tolist()
    table = block_table[:, : max(n_blocks)].tolist()
    return DecodePlan(
        batch=batch, block_size=block_size, num_kv_heads=num_kv_heads,
        t_sink=cfg.t_sink, t_local=cfg.t_local, lengths=lengths,
        n_bulk=(seq_lens - cfg.t_sink - cfg.t_local).clamp(min=0),
        local_rows=rows.flatten(), local_slots=num_slots,
        local_valid=valid.view(batch, 1, num_slots, 1, block_size),
        local_invalid=~valid.view(batch, 1, num_slots, 1, block_size),
        local_valid_f=valid.view(batch, 1, num_slots, 1, block_size).float(),
        local_clean_all=clean_all,
        local_count=valid.flatten(1).sum(-1).view(batch, 1, 1),
        table_rows=[row[:nb] for row, nb in zip(table, n_blocks)],
    )


def paged_decode(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    cfg: PolicyConfig,
    *,
    moments: tuple[Tensor, Tensor, Tensor] | None = None,
    calib: tuple[Tensor, Tensor] | None = None,
    static_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    plan: DecodePlan | None = None,
) -> DecodeResult:
    """One decode step (one new query per row) for one layer. seq_lens [B] (>= 1) include the
    current token, whose K/V must already be in the cache. `plan` (from `plan_decode` with the
    same block_table, seq_lens and cfg) may be shared by all layers of the step."""
    batch, num_heads, head_dim = query.shape
    num_blocks, num_kv_heads, block_size, _ = key_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if plan is None:
        plan = plan_decode(block_table, seq_lens, cfg, block_size=block_size,
                           num_kv_heads=num_kv_heads)
    elif (plan.batch, plan.block_size, plan.num_kv_heads, plan.t_sink, plan.t_local) != (
            batch, block_size, num_kv_heads, cfg.t_sink, cfg.t_local):
        raise ValueError("plan does not match this call (batch, block size, KV heads or cfg)")
    group = num_heads // num_kv_heads
    q = query.float() * scale if query.dtype != torch.float32 else query * scale
    q = q.view(batch, num_kv_heads, group, head_dim)  # scores = q @ k
    cache = _CacheViews(key_cache, value_cache)
    decide = dict(n_bulk=plan.n_bulk, query=query, scale=scale, num_kv_heads=num_kv_heads)

    if cfg.policy == "full":
        long_heads = decide_long_heads(cfg, **decide)
        outs = [_range_attention(q[b], cache, plan.full(b), None)[0] for b in range(batch)]
        out = torch.stack(outs)
        return DecodeResult(out.view(batch, num_heads, head_dim).to(query.dtype), long_heads,
                            group_rule(long_heads, num_kv_heads))

    local_out, local_lse, score_stats = _local_attention(
        q, cache, plan, want_stats=cfg.policy == "qada" and cfg.stats == "local")
    bulk_out = bulk_lse = None
    if cfg.policy == "oracle":  # exact bulk mass of every head: reads the whole cache
        bulk_out = torch.zeros_like(local_out)
        bulk_lse = torch.full_like(local_lse, -math.inf)
        for b in range(batch):
            rr = plan.bulk(b)
            if rr is not None:
                bulk_out[b], bulk_lse[b] = _range_attention(q[b], cache, rr, None)

    long_heads = decide_long_heads(
        cfg, **decide, local_lse=local_lse.flatten(1),
        bulk_lse=None if bulk_lse is None else bulk_lse.flatten(1),
        moments=moments, calib=calib,
        local_score_stats=None if score_stats is None else tuple(s.flatten(1) for s in score_stats),
        static_mask=static_mask, generator=generator,
    )
    long_groups = group_rule(long_heads, num_kv_heads)

    out = local_out  # long groups are merged in place
    pairs: list[int] = []
    o_parts: list[Tensor] = []
    lse_parts: list[Tensor] = []
    for b, row in enumerate(long_groups.tolist()):
        heads = [h for h, is_long in enumerate(row) if is_long]
        if not heads:
            continue
        pairs.extend(b * num_kv_heads + h for h in heads)
        if bulk_out is not None:
            o_parts.append(bulk_out[b, heads])
            lse_parts.append(bulk_lse[b, heads])
        else:
            o, lse = _range_attention(q[b], cache, plan.bulk(b),
                                      None if len(heads) == num_kv_heads else heads)
            o_parts.append(o)
            lse_parts.append(lse)
    if pairs:
        idx = torch.tensor(pairs)
        flat_out = out.view(batch * num_kv_heads, group, head_dim)
        flat_lse = local_lse.view(batch * num_kv_heads, group)
        o_bulk = o_parts[0] if len(o_parts) == 1 else torch.cat(o_parts)
        lse_bulk = lse_parts[0] if len(lse_parts) == 1 else torch.cat(lse_parts)
        flat_out.index_copy_(0, idx, _merge(flat_out.index_select(0, idx),
                                            flat_lse.index_select(0, idx), o_bulk, lse_bulk))
    return DecodeResult(out.view(batch, num_heads, head_dim).to(query.dtype), long_heads, long_groups)


class _CacheViews:
    """Zero-copy views of the K and V caches: per (block, head) [D, bs] keys and [bs, D] values,
    indexable by block ([nb, Hkv, ...]) or by flat (block * Hkv + head) row."""

    def __init__(self, key_cache: Tensor, value_cache: Tensor) -> None:
        num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
        self.num_kv_heads, self.block_size, self.head_dim = num_kv_heads, block_size, head_dim
        self.k4 = key_cache.view(num_blocks, num_kv_heads, head_dim, block_size)
        self.v4 = value_cache
        self.k_flat = key_cache.view(num_blocks * num_kv_heads, head_dim, block_size)
        self.v_flat = value_cache.view(num_blocks * num_kv_heads, block_size, head_dim)
        self.dtype = key_cache.dtype


def _local_attention(
    q: Tensor, cache: _CacheViews, plan: DecodePlan, want_stats: bool,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """Softmax of the scaled queries q [B, Hkv, G, D] over each row's local set: output
    [B, Hkv, G, D], lse [B, Hkv, G] and, if asked, the mean and population variance of the
    local scores, each [B, Hkv, G]."""
    batch, num_kv_heads, group, head_dim = q.shape
    block_size, num_slots = cache.block_size, plan.local_slots
    keys = cache.k_flat.index_select(0, plan.local_rows)
    values = cache.v_flat.index_select(0, plan.local_rows)
    if keys.dtype != torch.float32:
        keys, values = keys.float(), values.float()
    keys = keys.view(batch, num_kv_heads, num_slots, head_dim, block_size)  # K^T blocks
    values = values.view(batch, num_kv_heads, num_slots, block_size, head_dim)
    # Masked slots get probability exactly 0 below; their values must still be finite, since
    # 0 * NaN = NaN. Slots with no valid position read a fully written block of their row (see
    # plan_decode), so only the unwritten tail of a row's last block can hold garbage.
    if plan.local_clean_all:
        values.nan_to_num_(0.0, 0.0, 0.0)
    else:
        values[:, :, -1].nan_to_num_(0.0, 0.0, 0.0)
    scores = torch.matmul(q.unsqueeze(2), keys)  # [B, Hkv, S, G, bs]
    scores.masked_fill_(plan.local_invalid, -math.inf)
    m = scores.amax(dim=(2, 4), keepdim=True)  # finite: the current token is always valid
    # exp of -inf or of arguments below ~-87 (denormal results) is ~100x slower than normal
    # ones on CPU: clamp, then zero the masked slots exactly.
    probs = (scores - m).clamp_(min=-80.0).exp_().mul_(plan.local_valid_f)
    denom = probs.sum(dim=(2, 4))  # [B, Hkv, G]
    lse = m.view(batch, num_kv_heads, group) + denom.log()
    out = torch.matmul(probs, values).sum(2).div_(denom.unsqueeze(-1))  # [B, Hkv, G, D]
    stats = None
    if want_stats:
        valid = plan.local_valid
        count = plan.local_count
        mean = torch.where(valid, scores, 0.0).sum((2, 4)) / count
        dev = (scores - mean.view(batch, num_kv_heads, 1, group, 1)).square()
        var = torch.where(valid, dev, 0.0).sum((2, 4)) / count
        stats = (mean, var)
    return out, lse, stats


def _range_attention(
    q: Tensor, cache: _CacheViews, rr: _RowRange, heads: list[int] | None,
) -> tuple[Tensor, Tensor]:
    """Softmax of one row's scaled queries q [Hkv, G, D] over the positions of `rr`, for the KV
    heads `heads` (None: all): output [h, G, D] and lse [h, G]."""
    num_kv_heads, group, head_dim = q.shape
    bs, n = cache.block_size, rr.n
    # Units: all heads at once (k = Hkv, matching the cache's (block, head) interleave) or one
    # head at a time (k = 1). Scores [U, n, k, G, bs].
    convert = cache.dtype != torch.float32
    if heads is None and convert and any(seg.p0 >= 0 for seg in rr.segments):
        # converting all heads' interleaved in-place blocks at once is slower: one at a time
        heads = list(range(num_kv_heads))
    units = [None] if heads is None else heads
    k = num_kv_heads if heads is None else 1
    kbuf = torch.empty(CONVERT_CHUNK * k * bs * head_dim) if convert else None
    scores = torch.empty(len(units), n, k, group, bs)
    for u, head in enumerate(units):
        hsel = slice(None) if head is None else slice(head, head + 1)
        qu = q[hsel]  # [k, G, D]
        for seg in rr.segments:
            if seg.p0 >= 0:
                keys = cache.k4[seg.p0 : seg.p0 + seg.n, hsel]  # [n, k, D, bs] view
            else:
                rows = seg.rows_all if head is None else seg.rows[head]
                keys = cache.k_flat.index_select(0, rows).view(seg.n, k, head_dim, bs)
                if convert:  # already a fresh copy of at most MAX_CHUNK blocks
                    keys = keys.float()
            if convert and seg.p0 >= 0:  # fp32 copies in L2-sized pieces, into one reused buffer
                for c in range(0, seg.n, CONVERT_CHUNK):
                    piece = keys[c : c + CONVERT_CHUNK]
                    buf = kbuf[: piece.numel()].view(piece.shape).copy_(piece)
                    torch.matmul(qu, buf, out=scores[u, seg.j0 + c : seg.j0 + c + piece.shape[0]])
            else:
                torch.matmul(qu, keys, out=scores[u, seg.j0 : seg.j0 + seg.n])
    if rr.lo:
        scores[:, 0, :, :, : rr.lo] = -math.inf
    if rr.hi < bs:
        scores[:, n - 1, :, :, rr.hi :] = -math.inf
    m = scores.amax(dim=(1, 4), keepdim=True)  # [U, 1, k, G, 1], finite (range non-empty)
    # Clamp: exp is ~100x slower on -inf and on arguments giving denormals.
    probs = scores.sub_(m).clamp_(min=-80.0).exp_()
    if rr.lo:
        probs[:, 0, :, :, : rr.lo] = 0.0
    if rr.hi < bs:
        probs[:, n - 1, :, :, rr.hi :] = 0.0
    denom = probs.sum(dim=(1, 4))  # [U, k, G]
    lse = m.view(denom.shape) + denom.log()
    partial = torch.empty(len(units), n, k, group, head_dim)
    for u, head in enumerate(units):
        hsel = slice(None) if head is None else slice(head, head + 1)
        for seg in rr.segments:
            p = probs[u, seg.j0 : seg.j0 + seg.n]
            if seg.p0 >= 0:
                values = cache.v4[seg.p0 : seg.p0 + seg.n, hsel]  # [n, k, bs, D] view
            else:
                rows = seg.rows_all if head is None else seg.rows[head]
                values = cache.v_flat.index_select(0, rows).view(seg.n, k, bs, head_dim)
                if convert:
                    values = values.float()
            if seg.j0 + seg.n == n and rr.hi < bs:  # unwritten tail: never multiply it
                p, values = p[..., : rr.hi], values[..., : rr.hi, :]
            if convert and seg.p0 >= 0:
                for c in range(0, seg.n, CONVERT_CHUNK):
                    piece = values[c : c + CONVERT_CHUNK]
                    buf = kbuf[: piece.numel()].view(piece.shape).copy_(piece)
                    torch.matmul(p[c : c + CONVERT_CHUNK], buf,
                                 out=partial[u, seg.j0 + c : seg.j0 + c + piece.shape[0]])
            else:
                torch.matmul(p, values, out=partial[u, seg.j0 : seg.j0 + seg.n])
    out = partial.sum(1).div_(denom.unsqueeze(-1))  # [U, k, G, D]
    return out.view(-1, group, head_dim), lse.view(-1, group)


def _merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Combine two softmax partials over disjoint key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - lse).exp().unsqueeze(-1) + out_b * (lse_b - lse).exp().unsqueeze(-1)
