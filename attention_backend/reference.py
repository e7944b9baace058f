"""Exact attention over a paged KV cache in plain PyTorch, for either layout (`kv_layout`).

- `exact_lse`: every head's log-mass over its local set and over its bulk, and where its scores
  peak. The oracle policy thresholds it, and with `observe: true` (evaluation) every decode step
  reports what the oracle would decide (both read every key: the cost of full attention).
- `reference_decode`: what a decode kernel must return (decisions from `policy`, outputs from
  full or local softmax per KV group), row by row in fp32; the kernels' tests check against it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .kv_layout import KVLayout
from .policy import (
    NO_INPUTS,
    DecodeBatch,
    PolicyInputs,
    bulk_sizes,
    decide_long_heads,
    estimated_bulk_lse,
    group_rule,
    local_mask,
    score_stats,
)

if TYPE_CHECKING:
    from .settings import QadaSettings


class Observation(NamedTuple):
    """Evaluation only (`observe: true`): what the oracle would decide, and where each head's
    attention peaks (for retrieval scores)."""

    oracle_long: Tensor  # [B, Hq] bool: bulk share of the softmax mass > tau
    top1: Tensor  # [B, Hq] int64: position of the largest score


class ExactLse(NamedTuple):
    local: Tensor  # [B, Hq] log-sum-exp of the scores over the local set
    bulk: Tensor  # [B, Hq] over the bulk (-inf where it is empty)
    top1: Tensor  # [B, Hq] int64: position of the largest score
    blocks: Tensor | None = None  # with block_size: [B, Hq, nb] over each KV block's bulk positions

    def observe(self, logit_tau: float) -> Observation:
        return Observation(self.bulk - self.local > logit_tau, self.top1)


class ReferenceResult(NamedTuple):
    output: Tensor  # fp32 [B, Hq, D]
    long_heads: Tensor  # [B, Hq] bool
    long_groups: Tensor  # [B, Hkv] bool
    log_ratio: Tensor | None  # [B, Hq] bulk_lse - local_lse, thresholded by oracle and qada


def _row_scores(
    layout: KVLayout, query: Tensor, key_cache: Tensor, block_row: Tensor, length: int, scale: float
):
    """fp32 scores [Hq, L] of one row's query [Hq, D] over its L keys."""
    keys = layout.rows_at(key_cache, block_row, 0, length).to(query.device)  # [L, Hkv, D]
    group = query.shape[0] // keys.shape[1]
    return scale * torch.einsum("hd,lhd->hl", query.float(), keys.repeat_interleave(group, 1))


def exact_lse(
    layout: KVLayout, batch: DecodeBatch, seq_lens: list[int], settings: QadaSettings, block_size: int = 0
) -> ExactLse:
    """Over the first `seq_lens[b]` positions of each row; results on the query's device. With
    `block_size`, also per KV block (the oracle's page masses for page selection)."""
    query, key_cache, _, block_table, _, scale = batch
    rows, num_heads, _ = query.shape
    local_lse = torch.empty(rows, num_heads, device=query.device)
    bulk_lse = torch.full((rows, num_heads), -math.inf, device=query.device)
    top1 = torch.zeros(rows, num_heads, dtype=torch.long, device=query.device)
    num_blocks = -(-max(seq_lens, default=1) // block_size) if block_size else 0
    blocks = torch.full((rows, num_heads, num_blocks), -math.inf, device=query.device)
    for b, length in enumerate(seq_lens):
        scores = _row_scores(layout, query[b], key_cache, block_table[b], length, scale)
        top1[b] = scores.argmax(-1)
        local = local_mask(
            torch.arange(length, device=scores.device), length, settings.t_sink, settings.t_local
        )
        local_lse[b] = scores[:, local].logsumexp(-1)
        if not local.all():
            bulk_lse[b] = scores[:, ~local].logsumexp(-1)
        if block_size:
            bulk = F.pad(
                scores.masked_fill(local, -math.inf), (0, num_blocks * block_size - length), value=-math.inf
            )
            blocks[b] = bulk.view(num_heads, num_blocks, block_size).logsumexp(-1)
    return ExactLse(local_lse, bulk_lse, top1, blocks if block_size else None)


def reference_decode(
    layout: KVLayout, batch: DecodeBatch, settings: QadaSettings, inputs: PolicyInputs = NO_INPUTS
) -> ReferenceResult:
    """One decode step of one layer, on CPU in fp32."""
    query, key_cache, value_cache, block_table, seq_lens, scale = batch
    num_heads = query.shape[1]
    num_kv_heads = layout.num_kv_heads(key_cache)
    group = num_heads // num_kv_heads
    q, inputs = query.float().cpu(), inputs.to_cpu()
    local_lse, bulk_lse, mean, var, out_local, out_full = ([] for _ in range(6))
    for b, length in enumerate(seq_lens.tolist()):
        scores = _row_scores(layout, q[b], key_cache, block_table[b], length, scale).cpu()  # [Hq, L]
        values = layout.rows_at(value_cache, block_table[b], 0, length, keys=False).cpu()
        values = values.repeat_interleave(group, 1)  # [L, Hq, D]
        local = local_mask(torch.arange(length), length, settings.t_sink, settings.t_local)
        local_lse.append(scores[:, local].logsumexp(-1))
        bulk_lse.append(scores[:, ~local].logsumexp(-1))  # -inf when the bulk is empty
        m, v = score_stats(scores, local.expand_as(scores), dims=(1,))
        mean.append(m)
        var.append(v)
        out_local.append(torch.einsum("hl,lhd->hd", scores[:, local].softmax(-1), values[local]))
        out_full.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), values))
    local_lse, bulk_lse = torch.stack(local_lse), torch.stack(bulk_lse)
    n_bulk = bulk_sizes(seq_lens.cpu(), settings)
    stats = (torch.stack(mean), torch.stack(var))
    long_heads = decide_long_heads(
        settings,
        q,
        scale,
        n_bulk,
        num_kv_heads,
        inputs,
        local_lse=local_lse,
        bulk_lse=bulk_lse,
        local_score_stats=stats,
    )
    long_groups = group_rule(long_heads, num_kv_heads)
    log_ratio = None
    if settings.needs_exact_bulk:
        log_ratio = bulk_lse - local_lse
    elif settings.estimates_bulk:
        log_ratio = estimated_bulk_lse(settings, q, scale, n_bulk, num_kv_heads, inputs, stats) - local_lse
    use_full = long_groups.repeat_interleave(group, 1).unsqueeze(-1)
    output = torch.where(use_full, torch.stack(out_full), torch.stack(out_local))
    return ReferenceResult(output, long_heads, long_groups, log_ratio)
