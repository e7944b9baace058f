"""Page selection inside long KV groups: which KV blocks a long (row, KV head) reads.

The head decision reads a long group's whole context although its bulk mass often sits in a few
blocks. With `page_budget` (top-p), a long group reads its always-read blocks (those holding
sinks or window positions, the current token's last) and, of its other blocks (the candidates,
wholly inside the bulk), the fewest that leave at most `page_budget` of each of its query heads'
estimated softmax mass unread, taken in order of the largest share any of its heads gives them.
With `page_top_k` (as Quest), it reads its k candidates of highest such share. Masses are the
page estimates (`page_estimate.PageMasses`), pooled per block, with a head's total its exact
local mass plus its estimated bulk mass (a share is what the head decision thresholds, per
block); or, with `page_rank_dims`, SparQ's partial scores on the key dimensions where the group's
queries are largest, read from the cache (`key_dim_masses`); or, with `page_rank_bits`, the
scores of every key from a low-bit copy of the keys (`key_copy_masses`); or the oracle's exact
masses; or, with `page_rank_layers`, once per row in a rank layer, from the exact masses of all
its heads there (`rank_layer_blocks`), the layers after it reading the same blocks in every long
group.

Blocks are vLLM's KV blocks (128 tokens on CPU): the unit the stock kernel reads through a
block table (`cpu_kernel`), so a selection is read at the stock kernel's speed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import summary_scores
from .key_codes import KeyCopy, grid_step, pieces
from .page_estimate import PageMasses
from .page_summaries import MAX, MIN
from .reference import exact_lse

if TYPE_CHECKING:
    from .kv_layout import KVLayout
    from .policy import DecodeBatch
    from .settings import QadaSettings


def candidate_blocks(seq_lens: Tensor, settings: QadaSettings, block_size: int, num_blocks: int) -> Tensor:
    """Bool [B, num_blocks]: the logical blocks of each row wholly inside its bulk
    [t_sink, L - t_local); the row's other blocks up to its last hold sinks or window positions."""
    t_sink, t_local = settings.window
    first = -(-t_sink // block_size)
    window = (seq_lens.long() - t_local).clamp(min=0) // block_size  # first block with window positions
    k = torch.arange(num_blocks, device=seq_lens.device)
    return (k >= first) & (k < window.unsqueeze(1))


def block_shares(masses: PageMasses, total_lse: Tensor, candidates: Tensor) -> Tensor:
    """[B, Hkv, G, nb]: each candidate block's estimated share of each head's mass (0 elsewhere);
    total_lse [B, Hkv, G] is the head's log of local plus estimated bulk mass."""
    logits, page_blocks = masses
    batch, _, _, num_pages = logits.shape
    shares = (logits - total_lse.unsqueeze(-1)).exp()  # padding pages: exp(-inf) = 0
    index = page_blocks.clamp(max=candidates.shape[1] - 1).view(batch, 1, 1, num_pages)
    per_block = torch.zeros(*logits.shape[:3], candidates.shape[1], device=logits.device)
    per_block.scatter_add_(-1, index.expand_as(shares), shares)
    return per_block * candidates.view(batch, 1, 1, -1)


def select_blocks(
    masses: PageMasses, total_lse: Tensor, seq_lens: Tensor, settings: QadaSettings, block_size: int
) -> Tensor:
    """Bool [B, Hkv, nb]: the logical blocks each (row, KV head) reads when its group is long,
    always-read blocks included; total_lse [B, Hq] is each head's log-mass over its whole row, in
    the measure of `masses` (local exact plus estimated bulk, or all sketched); seq_lens [B] on
    the estimates' device. nb covers the longest row."""
    batch, num_kv_heads, group, _ = masses.logits.shape
    lengths = seq_lens.long()
    last = (lengths - 1) // block_size
    num_blocks = int(last.max()) + 1
    candidates = candidate_blocks(lengths, settings, block_size, num_blocks)  # [B, nb]
    total = total_lse.view(batch, num_kv_heads, group)
    shares = block_shares(masses, total, candidates)  # [B, Hkv, G, nb]
    rank_by = torch.where(candidates.unsqueeze(1), shares.amax(2), -1.0)  # [B, Hkv, nb]
    order = rank_by.argsort(dim=-1, descending=True, stable=True)
    n_candidates = candidates.sum(-1).view(batch, 1)
    if settings.page_top_k:
        take = n_candidates.clamp(max=settings.page_top_k).expand(batch, num_kv_heads)
    else:
        ranked = shares.gather(-1, order.unsqueeze(2).expand_as(shares))
        # unread before taking the i-th ranked block: the total, less the blocks ranked above it
        unread = shares.sum(-1, keepdim=True) - (ranked.cumsum(-1) - ranked)
        take = (unread > settings.page_budget).any(2).sum(-1).minimum(n_candidates)  # [B, Hkv]
    selected = order.argsort(-1) < take.unsqueeze(-1)
    within = torch.arange(num_blocks, device=lengths.device) <= last.unsqueeze(1)
    return (selected & candidates.unsqueeze(1)) | (within & ~candidates).unsqueeze(1)


def rank_layer_blocks(
    layout: KVLayout, batch: DecodeBatch, seq_lens: list[int], settings: QadaSettings, block_size: int
) -> Tensor:
    """Bool [B, nb]: the blocks each row's long groups read in the layers after a rank layer,
    chosen by `select_blocks` from the exact block masses of all the row's query heads in it, as
    one group (a block's rank is the largest share any head gives it). The masses come from the
    reference's row-by-row scores, as the oracle's: for measuring the choice, not for speed."""
    exact = exact_lse(layout, batch, seq_lens, settings, block_size)
    rows, _, num_blocks = exact.blocks.shape
    blocks = torch.arange(num_blocks, device=exact.blocks.device).expand(rows, -1)
    masses = PageMasses(exact.blocks.unsqueeze(1), blocks)
    total = torch.logaddexp(exact.local, exact.bulk)
    lengths = torch.tensor(seq_lens, device=exact.blocks.device)
    return select_blocks(masses, total, lengths, settings, block_size)[:, 0]


def key_dim_masses(
    q: Tensor, kv_heads: Tensor, key_cache: Tensor, block_table: Tensor, seq_lens: Tensor, dims: int
) -> tuple[PageMasses, Tensor]:
    """SparQ's first step as page masses, for N (row, KV head) pairs: partial scores of every key
    of the pair's row on the `dims` key dimensions where its group's queries are largest (summed
    |q| over the group), read from the CPU-layout cache (dims / D of the keys). q [N, G, D]
    scaled queries, kv_heads [N], block_table [N, >= nb] and seq_lens [N] of the pairs' rows.
    Returns the per-block log-mass [N, 1, G, nb] and each head's log-mass over its row [N, G]."""
    _, group, head_dim = q.shape
    num_blocks_total, num_kv_heads, block_size, _ = key_cache.shape
    lengths = seq_lens.long()
    table = _owned_blocks(block_table, lengths, block_size)
    top = q.abs().sum(1).topk(min(dims, head_dim), -1).indices  # [N, r]
    columns = key_cache.view(num_blocks_total, num_kv_heads, head_dim, block_size)  # K^T per block
    keys = columns[table.unsqueeze(-1), kv_heads.long().view(-1, 1, 1), top.unsqueeze(1)]  # [N, nb, r, bs]
    q_top = q.gather(-1, top.unsqueeze(1).expand(-1, group, -1))  # [N, G, r]
    scores = torch.einsum("ngr,nkrs->ngks", q_top.float(), keys.float())  # [N, G, nb, bs]
    return _block_masses(scores, lengths)


def key_copy_masses(
    q: Tensor,
    kv_heads: Tensor,
    copy: KeyCopy,
    block_table: Tensor,
    seq_lens: Tensor,
    block_size: int,
    *,
    native: bool = True,
) -> tuple[PageMasses, Tensor]:
    """The scores of every key of the N (row, KV head) pairs' rows from the layer's low-bit key
    copy (`key_codes`, bits / 32 of the keys, and the chunks' min / max), as page masses: q [N, G, D]
    scaled queries, kv_heads [N], block_table [N, >= nb] and seq_lens [N] of the pairs' rows.
    Returns the per-block log-mass [N, 1, G, nb] and each head's log-mass over its row [N, G].
    On the CPU one C loop reads the codes in place (`summary_scores`); with `native=False`, or
    where it cannot be built, PyTorch ops compute the same from unpacked fp32 codes."""
    codes, stats, bits = copy
    num_chunks, num_kv_heads, nbytes, chunk = codes.shape
    pairs, group, _ = q.shape
    lengths = seq_lens.long()
    table = _owned_blocks(block_table, lengths, block_size)
    computed = summary_scores.block_lse(q, kv_heads, copy, table, lengths, block_size) if native else None
    if computed is not None:
        block_lse, total = computed
        blocks = torch.arange(table.shape[1], device=q.device).expand(pairs, -1)
        return PageMasses(block_lse.unsqueeze(1), blocks), total
    per_block = block_size // chunk
    chunk_ids = (table.unsqueeze(-1) * per_block + torch.arange(per_block, device=q.device)).flatten(1)
    heads = kv_heads.long().view(-1, 1)
    low, high = stats[MIN][chunk_ids, heads], stats[MAX][chunk_ids, heads]  # [N, C, D]
    step = grid_step(low, high, bits)
    rows = (chunk_ids * num_kv_heads + heads).flatten()  # one contiguous (chunk, head) run each
    packed = codes.view(num_chunks * num_kv_heads, nbytes, chunk).index_select(0, rows)
    packed = packed.view(pairs, -1, nbytes, chunk)  # [N, C, D * bits / 8, chunk]
    # q . (low + code * step), per chunk: q . low plus (q * step) . code, a run of dims at a time
    weights = q.unsqueeze(2) * step.unsqueeze(1)  # [N, G, C, D]
    scores = torch.einsum("ngd,ncd->ngc", q, low).unsqueeze(-1)
    for i, run in enumerate(pieces(packed, bits)):
        part = weights[..., i * nbytes : (i + 1) * nbytes]
        scores = scores + torch.einsum("ngcd,ncdt->ngct", part, run.float())
    return _block_masses(scores.reshape(pairs, group, table.shape[1], block_size), lengths)


def _owned_blocks(block_table: Tensor, lengths: Tensor, block_size: int) -> Tensor:
    """The rows' physical blocks [N, nb] up to the longest row's last (padding: block 0, masked
    later)."""
    num_blocks = int((lengths.max() - 1) // block_size) + 1
    k = torch.arange(num_blocks, device=block_table.device)
    owned = k < ((lengths - 1) // block_size + 1).unsqueeze(1)
    return torch.where(owned, block_table[:, :num_blocks].long(), 0)


def _block_masses(scores: Tensor, lengths: Tensor) -> tuple[PageMasses, Tensor]:
    """Page masses of scores [N, G, nb, bs] of the rows' keys in logical order (positions past a
    row's length masked): per-block log-mass [N, 1, G, nb] and each head's total [N, G]."""
    pairs, _, num_blocks, block_size = scores.shape
    k = torch.arange(num_blocks, device=scores.device)
    positions = k.view(-1, 1) * block_size + torch.arange(block_size, device=scores.device)
    scores = scores.masked_fill(positions >= lengths.view(-1, 1, 1, 1), -math.inf)
    block_lse = scores.logsumexp(-1)
    return PageMasses(block_lse.unsqueeze(1), k.expand(pairs, -1)), block_lse.logsumexp(-1)


def select_tables(
    masses: PageMasses,
    total_lse: Tensor,
    seq_lens: Tensor,
    settings: QadaSettings,
    block_size: int,
    tables: Tensor,
    *,
    native: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """`select_blocks` for N pairs of one KV head each, then their `selected_tables` of `tables`
    [N, >= nb] int32: (virtual tables [N, nb], lengths [N] int32, kept block counts [N]). With
    `native` (masses per KV block, as every ranking but the page estimates gives them), one C
    loop (`summary_scores.select_tables`) where it builds, else PyTorch ops: the same choice."""
    if native:
        total = total_lse.view(masses.logits.shape[0], -1)
        chosen = summary_scores.select_tables(
            masses.logits[:, 0],
            total,
            seq_lens,
            tables,
            settings.window,
            settings.page_budget,
            settings.page_top_k,
            block_size,
        )
        if chosen is not None:
            return chosen
    keep = select_blocks(masses, total_lse, seq_lens, settings, block_size)[:, 0]
    return kept_tables(keep, tables, seq_lens, block_size)


def kept_tables(
    keep: Tensor, tables: Tensor, seq_lens: Tensor, block_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`selected_tables` of keep [N, nb], and the kept block counts [N]."""
    return (*selected_tables(keep, tables, seq_lens, block_size), keep.sum(-1))


def selected_tables(keep: Tensor, tables: Tensor, seq_lens: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Virtual sequences of the kept blocks: keep [N, nb] bool and tables [N, >= nb] (physical
    blocks in logical order) -> block tables [N, nb] listing the kept blocks first, the one holding
    the current token (of seq_lens [N]) last of them, and their lengths [N] int32: every kept block
    but the last is whole (a bulk or sink block, or a window block before the last)."""
    lengths = seq_lens.long()
    last = (lengths - 1) // block_size
    k = torch.arange(keep.shape[1], device=keep.device)
    sort_key = torch.where(keep, (k == last.unsqueeze(1)).long(), 2)
    order = sort_key.argsort(dim=-1, stable=True)
    virtual_lens = (keep.sum(-1) - 1) * block_size + (lengths - 1) % block_size + 1
    return tables[:, : keep.shape[1]].gather(1, order), virtual_lens.int()
