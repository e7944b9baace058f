"""qada's `pages` statistics: the bulk's log-mass estimated from the page summaries.

A row's bulk [t_sink, L - t_local) is cut into whole pages of `page_chunk` tokens (aligned to
the cache) and at most two partial pages at its ends. Each whole page c contributes, for keys
~ N(mu_c, diag sigma2_c), log n_c + q.mu_c + 1/2 sum_d q_d^2 sigma2_c,d (q scaled by the
model's scale); `pages_bound` uses Quest's upper bound max_d-wise(q_d min_c,d, q_d max_c,d)
instead, which certifies a local decision. The partial pages' bulk keys are scored exactly; the
local set is the local pass's own, exact. A needle shifts its own page's mean by k / page_size,
where one Gaussian of the whole bulk dilutes it to k / n_B.

`plan_pages` runs once per step in the builder (positions on the host, one gather of the block
table on the device); `pages_bulk_lse` in every layer. Both paths use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from . import summary_scores
from .kv_layout import KVLayout
from .page_summaries import MAX, MEAN, MIN, VAR
from .policy import DecodeBatch, _grouped

if TYPE_CHECKING:
    from .settings import QadaSettings


@dataclass
class PagePlan:
    """The step's pages, the same for every layer."""

    page_chunk: int
    bound: bool  # pages_bound: Quest's upper bound instead of the Gaussian estimate
    chunk_ids: Tensor  # [B, J, m] int64: the stored chunks of each whole bulk page
    page_valid: Tensor  # [B, J] bool
    page_blocks: Tensor  # [B, J] int64: the logical KV block each whole page lies in
    exact_blocks: Tensor  # [B, P] int64: physical block of each bulk position outside whole pages
    exact_offsets: Tensor  # [B, P] int64
    exact_valid: Tensor  # [B, P] bool


def plan_pages(
    block_table: Tensor, seq_lens: Tensor, settings: QadaSettings, *, block_size: int, store_chunk: int
) -> PagePlan:
    """Pages of each row's bulk: block_table [B, max_blocks] (device), seq_lens [B] (host), pages
    of `settings.page_chunk` tokens pooled from stored chunks of `store_chunk`."""
    t_sink, t_local = settings.window
    c, m = settings.page_chunk, settings.page_chunk // store_chunk
    seq_lens = seq_lens.long().cpu()
    bulk_end = (seq_lens - t_local).clamp(min=t_sink)  # [B]
    first = -(-t_sink // c)  # first whole page
    stop = bulk_end // c  # [B] end of the whole pages
    n_pages = (stop - first).clamp(min=0)
    pages = first + torch.arange(max(int(n_pages.max()), 1))
    page_valid = pages < (first + n_pages).unsqueeze(1)  # [B, J]
    # partial pages: [t_sink, first * c) and [max(first, stop) * c, bulk_end)
    head = t_sink + torch.arange(first * c - t_sink)
    tail_start = torch.maximum(stop, torch.tensor(first)) * c
    tail = tail_start.unsqueeze(1) + torch.arange(c)
    exact_pos = torch.cat([head.expand(len(seq_lens), -1), tail], dim=1)  # [B, P]
    exact_valid = exact_pos < bulk_end.unsqueeze(1)
    page_pos = torch.where(page_valid, pages * c, 0)
    exact_pos = torch.where(exact_valid, exact_pos, 0)  # padding reads the row's first block

    dev = block_table.device
    table = block_table.long()

    def physical(pos: Tensor) -> tuple[Tensor, Tensor]:
        pos = pos.to(dev, non_blocking=True)
        return table.gather(1, pos // block_size), pos % block_size

    page_blocks = (page_pos // block_size).to(dev, non_blocking=True)
    blocks, offsets = physical(page_pos)
    chunks_per_block = block_size // store_chunk
    chunk_ids = (blocks * chunks_per_block + offsets // store_chunk).unsqueeze(-1) + torch.arange(
        m, device=dev
    )
    exact_blocks, exact_offsets = physical(exact_pos)
    bound = settings.stats == "pages_bound"
    return PagePlan(
        c, bound, chunk_ids, page_valid.to(dev), page_blocks, exact_blocks, exact_offsets, exact_valid.to(dev)
    )


class PageMasses(NamedTuple):
    """What page selection (`page_select`) ranks: each whole bulk page's estimated log-mass."""

    logits: Tensor  # [B, Hkv, G, J] (-inf: padding)
    blocks: Tensor  # [B, J] int64: the logical KV block each page lies in


def pages_bulk_lse(layout: KVLayout, batch: DecodeBatch, stats: Tensor, plan: PagePlan) -> Tensor:
    """[B, Hq] estimated log-sum-exp of the scores over each row's bulk (-inf without bulk), from
    the layer's page summaries `stats` (`page_summaries.PageSummaries.layer`)."""
    return bulk_lse_and_pages(layout, batch, stats, plan)[0]


def bulk_lse_and_pages(
    layout: KVLayout, batch: DecodeBatch, stats: Tensor, plan: PagePlan, *, native: bool = True
) -> tuple[Tensor, PageMasses]:
    """`pages_bulk_lse`, and the whole pages' estimates it sums. On the CPU the whole pages'
    estimates come from one C loop over the summaries in place and the sum with the exact scores
    from another (`summary_scores`); with `native=False`, or where they cannot be built, from
    PyTorch ops over gathered summaries and keys."""
    q = _grouped(batch.query, stats.shape[2]) * batch.scale  # [B, Hkv, G, D]
    logits = summary_scores.page_logits(q, stats, plan) if native else None
    if logits is not None:
        bulk_lse = summary_scores.bulk_lse(q, logits, layout.keys_by_head(batch.key_cache), plan)
        if bulk_lse is not None:
            return bulk_lse.flatten(1), PageMasses(logits, plan.page_blocks)
    else:
        logits = _page_logits(q, stats, plan)
    keys = layout.keys_at(batch.key_cache, plan.exact_blocks, plan.exact_offsets).float()  # [B, P, Hkv, D]
    scores = _dot(q, keys).masked_fill(~plan.exact_valid[:, None, None, :], -math.inf)
    bulk_lse = torch.logsumexp(torch.cat([logits, scores], dim=-1), dim=-1).flatten(1)
    return bulk_lse, PageMasses(logits, plan.page_blocks)


def _page_logits(q: Tensor, stats: Tensor, plan: PagePlan) -> Tensor:
    """The whole pages' estimated log-masses [B, Hkv, G, J] (-inf: padding), by PyTorch ops."""
    ids = plan.chunk_ids
    if plan.bound:
        low, high = stats[MIN][ids].amin(2), stats[MAX][ids].amax(2)  # [B, J, Hkv, D]
        logits = _dot(q.clamp(min=0), high) + _dot(q.clamp(max=0), low)
    else:
        mean, var = stats[MEAN][ids], stats[VAR][ids]  # [B, J, m, Hkv, D]
        if ids.shape[2] > 1:  # pool the stored chunks of a page (equal counts: whole pages)
            pooled = mean.mean(2)
            var = ((var + mean.square()).mean(2) - pooled.square()).clamp(min=0.0)
            mean = pooled
        else:
            mean, var = mean.squeeze(2), var.squeeze(2)
        logits = _dot(q, mean) + 0.5 * _dot(q.square(), var)
    return (logits + math.log(plan.page_chunk)).masked_fill(~plan.page_valid[:, None, None, :], -math.inf)


def _dot(q: Tensor, per_position: Tensor) -> Tensor:
    """q [B, Hkv, G, D] . x [B, N, Hkv, D] -> [B, Hkv, G, N]."""
    return torch.einsum("bkgd,bnkd->bkgn", q, per_position)
