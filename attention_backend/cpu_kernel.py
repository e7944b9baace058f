"""Batched QAdA decode over vLLM's CPU paged KV cache ("vec" layout), in pure torch.

Cache layout: key_cache / value_cache are [num_blocks, Hkv, block_size, D]; a value block is
row-major [block_size, D], a key block holds a column-major [D, block_size] matrix.

Every row first attends to its local set only (sink blocks + window blocks, one batched gather).
The policy then marks KV groups long; only those (row, KV head) pairs read their bulk blocks, and
the bulk partial is merged into the local one by log-sum-exp.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .moments import bulk_range
from .policy import PolicyConfig, decide_long_heads, group_rule


class DecodeResult(NamedTuple):
    output: Tensor  # [B, Hq, D], query dtype
    long_heads: Tensor  # [B, Hq] bool
    long_groups: Tensor  # [B, Hkv] bool


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
) -> DecodeResult:
    """One decode step (one new query per row) for one layer. seq_lens [B] (>= 1) include the
    current token, whose K/V must already be in the cache."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    seq_lens = seq_lens.long()
    lengths = seq_lens.tolist()
    n_bulk = (seq_lens - cfg.t_sink - cfg.t_local).clamp(min=0)
    q = (query.float() * scale).view(batch, num_kv_heads, group, head_dim)  # scores = q @ k
    all_kv_heads = torch.arange(num_kv_heads)
    decide = dict(n_bulk=n_bulk, query=query, scale=scale, num_kv_heads=num_kv_heads)

    if cfg.policy == "full":
        long_heads = decide_long_heads(cfg, **decide)
        out = torch.stack([
            _range_attention(q[b], key_cache, value_cache, block_table[b], 0, lengths[b],
                             all_kv_heads)[0]
            for b in range(batch)
        ])
        return DecodeResult(out.view(batch, num_heads, head_dim).to(query.dtype), long_heads,
                            group_rule(long_heads, num_kv_heads))

    local_out, local_lse, score_stats = _local_attention(
        q, key_cache, value_cache, block_table, seq_lens, cfg,
        want_stats=cfg.policy == "qada" and cfg.stats == "local",
    )
    bulk_out = bulk_lse = None
    if cfg.policy == "oracle":  # exact bulk mass of every head: reads the whole cache
        bulk_out = torch.zeros_like(local_out)
        bulk_lse = torch.full_like(local_lse, -math.inf)
        for b in torch.nonzero(n_bulk).flatten().tolist():
            bulk_out[b], bulk_lse[b] = _range_attention(
                q[b], key_cache, value_cache, block_table[b],
                *bulk_range(lengths[b], cfg.t_sink, cfg.t_local), all_kv_heads)

    long_heads = decide_long_heads(
        cfg, **decide, local_lse=local_lse.flatten(1),
        bulk_lse=None if bulk_lse is None else bulk_lse.flatten(1),
        moments=moments, calib=calib,
        local_score_stats=None if score_stats is None else tuple(s.flatten(1) for s in score_stats),
        static_mask=static_mask, generator=generator,
    )
    long_groups = group_rule(long_heads, num_kv_heads)

    out = local_out  # long groups are merged in place
    for b in torch.nonzero(long_groups.any(1)).flatten().tolist():
        heads = torch.nonzero(long_groups[b]).flatten()
        if bulk_out is not None:
            o_bulk, lse_bulk = bulk_out[b, heads], bulk_lse[b, heads]
        else:
            start, end = bulk_range(lengths[b], cfg.t_sink, cfg.t_local)
            o_bulk, lse_bulk = _range_attention(
                q[b, heads], key_cache, value_cache, block_table[b], start, end, heads)
        out[b, heads] = _merge(local_out[b, heads], local_lse[b, heads], o_bulk, lse_bulk)
    return DecodeResult(out.view(batch, num_heads, head_dim).to(query.dtype), long_heads, long_groups)


def _local_attention(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    cfg: PolicyConfig,
    want_stats: bool,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """Softmax of the scaled queries q [B, Hkv, G, D] over each row's local set: output
    [B, Hkv, G, D], lse [B, Hkv, G] and, if asked, the mean and population variance of the
    local scores, each [B, Hkv, G]."""
    batch, num_kv_heads, group, head_dim = q.shape
    block_size = key_cache.shape[2]
    n_sink = -(-cfg.t_sink // block_size)
    n_window = -(-cfg.t_local // block_size) + 1
    last = (seq_lens - 1) // block_size  # last logical block of each row
    logical = torch.cat([
        torch.arange(n_sink).expand(batch, n_sink),
        last.unsqueeze(1) - torch.arange(n_window - 1, -1, -1),
    ], dim=1)  # [B, S]
    num_slots = logical.shape[1] * block_size
    # Slots outside [0, last] (short rows) read a clamped block and are fully masked below:
    # block_table entries past a row's last block may be garbage, so they are never looked up.
    phys = block_table.long().gather(1, logical.clamp(min=0).minimum(last.unsqueeze(1)))

    # Sink slots keep positions < t_sink, window slots the rest, so overlaps count once.
    pos = logical.unsqueeze(2) * block_size + torch.arange(block_size)  # [B, S, bs]
    t = (seq_lens - 1).view(batch, 1, 1)
    sink_ok = (pos < cfg.t_sink) & (pos <= t)
    window_ok = (pos >= cfg.t_sink) & (pos > t - cfg.t_local) & (pos <= t)
    is_sink_slot = (torch.arange(logical.shape[1]) < n_sink).view(1, -1, 1)
    valid = torch.where(is_sink_slot, sink_ok, window_ok).view(batch, 1, 1, num_slots)

    heads = torch.arange(num_kv_heads).view(1, -1, 1)
    keys = _gather(key_cache, phys.unsqueeze(1), heads).float()  # [B, Hkv, S, ...]
    keys = keys.view(batch, num_kv_heads, -1, head_dim, block_size)  # K^T blocks
    scores = (q.unsqueeze(2) @ keys).transpose(2, 3).reshape(batch, num_kv_heads, group, num_slots)
    scores = scores.masked_fill(~valid, -math.inf)
    # Masked slots may hold anything (unwritten tail, other sequences' blocks): zero their
    # values so that 0 * garbage cannot turn into NaN.
    values = _gather(value_cache, phys.unsqueeze(1), heads).float()
    values = values.view(batch, num_kv_heads, num_slots, head_dim)
    values = values.masked_fill(~valid.view(batch, 1, num_slots, 1), 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    out = (scores - lse.unsqueeze(-1)).exp() @ values
    stats = None
    if want_stats:
        count = valid.sum(-1)
        mean = torch.where(valid, scores, 0.0).sum(-1) / count
        var = torch.where(valid, (scores - mean.unsqueeze(-1)).square(), 0.0).sum(-1) / count
        stats = (mean, var)
    return out, lse, stats


def _range_attention(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    table_row: Tensor,
    start: int,
    end: int,
    kv_heads: Tensor,
) -> tuple[Tensor, Tensor]:
    """Softmax of one row's scaled queries q [h, G, D] over positions [start, end) (non-empty)
    of the KV heads `kv_heads` [h]: output [h, G, D] and lse [h, G]."""
    num_heads, group, head_dim = q.shape
    block_size = key_cache.shape[2]
    first = start // block_size
    blocks = table_row[first : (end - 1) // block_size + 1].long()
    num_slots = blocks.numel() * block_size
    span = slice(start - first * block_size, end - first * block_size)
    keys = _gather(key_cache, blocks.unsqueeze(0), kv_heads.unsqueeze(1)).float()  # [h, n, ...]
    keys = keys.view(num_heads, -1, head_dim, block_size)  # K^T blocks
    scores = (q.unsqueeze(1) @ keys).transpose(1, 2).reshape(num_heads, group, num_slots)[..., span]
    values = _gather(value_cache, blocks.unsqueeze(0), kv_heads.unsqueeze(1)).float()
    values = values.view(num_heads, num_slots, head_dim)[:, span]
    lse = torch.logsumexp(scores, dim=-1)
    return (scores - lse.unsqueeze(-1)).exp() @ values, lse


def _gather(cache: Tensor, blocks: Tensor, kv_heads: Tensor) -> Tensor:
    """cache[blocks, kv_heads] for broadcastable index tensors: [*shape, bs, D] raw blocks.

    index_select over (block, head) rows copies each block with one memcpy, about twice as
    fast on CPU as advanced indexing. The view fails loudly rather than copy the whole cache.
    """
    num_blocks, num_kv_heads, block_size, head_dim = cache.shape
    rows = blocks * num_kv_heads + kv_heads
    flat = cache.view(num_blocks * num_kv_heads, block_size * head_dim)
    return flat.index_select(0, rows.flatten()).view(*rows.shape, block_size, head_dim)


def _merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Combine two softmax partials over disjoint key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - lse).exp().unsqueeze(-1) + out_b * (lse_b - lse).exp().unsqueeze(-1)
