"""Batched QAdA decode over vLLM's CPU paged KV cache ("vec" layout).

Cache layout: key_cache / value_cache are [num_blocks, Hkv, block_size, D]; a value block is
row-major [block_size, D], a key block holds a column-major [D, block_size] matrix.

Every row first attends to its local set only (sink blocks + window blocks, one batched gather):
that gives the local outputs and the local log-sum-exp the decisions need. The policy then marks
KV groups long, and only those (row, KV head) pairs are recomputed over their whole context, by
vLLM's own CPU attention kernel. It runs on per-head "virtual sequences": the cache seen as
[num_blocks * Hkv, 1, block_size, D], so one (row, KV head) is a sequence with one KV head and G
query heads whose block table is `block * Hkv + head`. Local groups never touch their bulk, and
long groups stream their blocks in place at the stock kernel's speed.

Everything that depends only on (block_table, seq_lens, settings) -- identical for all layers of
a decode step -- lives in a `DecodePlan`: the builder makes it once per step (`plan_decode`) and
every layer's `paged_decode(..., plan=plan)` uses it (a call without one builds its own). Whether
a step is decided at all is the builder's choice too: rows it does not decide go to vLLM's
kernel as they are (`stock_decode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from vllm import _custom_ops as ops
from vllm import envs

from . import summary_scores
from .kv_layout import CPU_VEC
from .page_estimate import PageMasses
from .page_select import kept_tables, key_copy_masses, key_dim_masses, select_tables
from .policy import (
    NO_INPUTS,
    DecodeBatch,
    DecodeResult,
    PolicyInputs,
    bulk_sizes,
    decide_long_heads,
    group_rule,
    local_mask,
    score_stats,
)
from .reference import exact_lse
from .settings import QadaSettings


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
    seq_lens: Tensor  # [B] int64
    n_bulk: Tensor  # [B] int64
    local_rows: Tensor  # [B * Hkv * S] flat (block, head) rows of the local slots
    local_slots: int  # S
    local_invalid: Tensor  # [B, 1, S, 1, bs] bool: positions outside the local set
    local_valid_f: Tensor  # its complement as fp32
    head_tables: Tensor  # [B * Hkv, max_blocks] int32 virtual block table of each (row, KV head)
    head_seq_lens: Tensor  # [B * Hkv] int32


def plan_decode(
    block_table: Tensor, seq_lens: Tensor, settings: QadaSettings, *, block_size: int, num_kv_heads: int
) -> DecodePlan:
    """Precompute the layer-independent part of `paged_decode` for one decode step.

    block_table [B, max_blocks], seq_lens [B] (>= 1, including the current token). Entries of
    block_table past a row's last block are never read.
    """
    batch = seq_lens.shape[0]
    seq_lens = seq_lens.long()
    n_sink = -(-settings.t_sink // block_size)
    n_window = -(-settings.t_local // block_size) + 1
    last = (seq_lens - 1) // block_size  # last logical block of each row
    logical = torch.cat(
        [
            torch.arange(n_sink).expand(batch, n_sink),
            last.unsqueeze(1) - torch.arange(n_window - 1, -1, -1),
        ],
        dim=1,
    )  # [B, S]
    num_slots = logical.shape[1]
    # Slots outside [0, last] (short rows) read a clamped block and are fully masked below:
    # block_table entries past a row's last block may be garbage, so they are never looked up.
    phys = block_table.long().gather(1, logical.clamp(min=0).minimum(last.unsqueeze(1)))
    # The local set (`policy.local_mask`); sink slots keep positions < t_sink, window slots the
    # rest, so a block that is both counts once.
    pos = logical.unsqueeze(2) * block_size + torch.arange(block_size)  # [B, S, bs]
    local = local_mask(pos, seq_lens.view(batch, 1, 1), settings.t_sink, settings.t_local)
    is_sink_slot = (torch.arange(num_slots) < n_sink).view(1, -1, 1)
    valid = local & torch.where(is_sink_slot, pos < settings.t_sink, pos >= settings.t_sink)  # [B, S, bs]
    # A slot without local positions reads the row's first block instead, so that local groups
    # never touch a block of their bulk. The last slot holds the current token: never empty.
    phys = torch.where(valid.any(-1), phys, block_table[:, :1].long())
    valid = valid.view(batch, 1, num_slots, 1, block_size)
    heads = torch.arange(num_kv_heads)
    rows = phys.unsqueeze(1) * num_kv_heads + heads.view(1, -1, 1)
    # Table entries past a row's last block (never read by the kernel) become that block.
    n_blocks = int(last.max()) + 1
    table = block_table[:, :n_blocks].long()
    table = torch.where(torch.arange(n_blocks) > last.unsqueeze(1), phys[:, -1:], table)
    head_tables = (table.unsqueeze(1) * num_kv_heads + heads.view(1, -1, 1)).flatten(0, 1)
    n_bulk = bulk_sizes(seq_lens, settings)
    return DecodePlan(
        batch=batch,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        t_sink=settings.t_sink,
        t_local=settings.t_local,
        lengths=seq_lens.tolist(),
        seq_lens=seq_lens,
        n_bulk=n_bulk,
        local_rows=rows.flatten(),
        local_slots=num_slots,
        local_invalid=~valid,
        local_valid_f=valid.float(),
        head_tables=head_tables.int(),
        head_seq_lens=seq_lens.repeat_interleave(num_kv_heads).int(),
    )


def paged_decode(
    batch: DecodeBatch,
    settings: QadaSettings,
    inputs: PolicyInputs = NO_INPUTS,
    *,
    plan: DecodePlan | None = None,
) -> DecodeResult:
    """One decided decode step for one layer. `plan` (from `plan_decode` with the same block
    table, lengths and settings) may be shared by all layers of the step."""
    query, key_cache, value_cache, block_table, seq_lens, scale = batch
    rows, num_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if plan is None:
        plan = plan_decode(block_table, seq_lens, settings, block_size=block_size, num_kv_heads=num_kv_heads)
    elif (plan.batch, plan.block_size, plan.num_kv_heads, plan.t_sink, plan.t_local) != (
        (rows, block_size, num_kv_heads, *settings.window)
    ):
        raise ValueError("plan does not match this call (batch, block size, KV heads or settings)")

    group = num_heads // num_kv_heads
    heads_view = _HeadViews(key_cache, value_cache)

    q = query.float() * scale if query.dtype != torch.float32 else query * scale
    q = q.view(rows, num_kv_heads, group, head_dim)  # scores = q @ k
    local = None  # one C loop where it builds (without the score statistics), else PyTorch ops
    if not settings.needs_local_score_stats:
        local = summary_scores.local_attention(
            q, key_cache, value_cache, block_table, plan.seq_lens, settings.window
        )
    if local is None:
        local_out, local_lse, score_moments = _local_attention(
            q, heads_view, plan, want_stats=settings.needs_local_score_stats
        )
    else:
        (local_out, local_lse), score_moments = local, None
    bulk_lse = None
    if settings.needs_exact_bulk:  # the exact bulk mass of every head: reads the whole cache
        exact = exact_lse(CPU_VEC, batch, plan.lengths, settings, block_size if settings.selects_pages else 0)
        bulk_lse = exact.bulk
        if settings.selects_pages:  # the oracle's page masses: exact, per KV block
            masses = exact.blocks.view(rows, num_kv_heads, num_heads // num_kv_heads, -1)
            inputs = inputs._replace(
                pages=PageMasses(masses, torch.arange(masses.shape[-1]).expand(rows, -1))
            )
    score_stats_ = None if score_moments is None else tuple(s.flatten(1) for s in score_moments)
    long_heads = decide_long_heads(
        settings,
        query,
        scale,
        plan.n_bulk,
        num_kv_heads,
        inputs,
        local_lse=local_lse.flatten(1),
        bulk_lse=bulk_lse,
        local_score_stats=score_stats_,
    )
    long_groups = group_rule(long_heads, num_kv_heads)

    out = local_out.to(query.dtype).view(rows * num_kv_heads, group, head_dim)
    pairs = long_groups.flatten().nonzero().squeeze(1)  # (row, KV head) pairs read beyond local
    kept_blocks = torch.zeros(rows, num_kv_heads, dtype=torch.long) if settings.selects_pages else None
    if pairs.numel():
        tables = plan.head_tables.index_select(0, pairs)
        lengths = plan.head_seq_lens.index_select(0, pairs)
        if settings.selects_pages:  # only the selected blocks (page_select)
            selection = (settings, q, inputs, local_lse, bulk_lse, batch, plan, pairs, tables)
            tables, lengths, kept = _select(*selection)
            kept_blocks.view(-1)[pairs] = kept
        per_head = DecodeBatch(
            query.reshape(rows * num_kv_heads, group, head_dim).index_select(0, pairs),
            heads_view.key_cache,
            heads_view.value_cache,
            tables,
            lengths,
            scale,
        )
        long_out = stock_decode(per_head)
        out.index_copy_(0, pairs, long_out)
    return DecodeResult(out.view(rows, num_heads, head_dim), long_heads, long_groups, kept_blocks)


def _select(settings, q, inputs, local_lse, bulk_lse, batch, plan, pairs, tables):
    """The virtual block tables of the KV blocks each long (row, KV head) pair reads
    (`page_select`), their lengths and kept block counts: ranked for those pairs only, each as a
    row with one KV head; `tables` [pairs, >= nb] are the pairs' whole virtual tables."""
    _, num_kv_heads, group, head_dim = q.shape
    row = pairs // num_kv_heads
    seq_lens = plan.seq_lens.index_select(0, row)
    if settings.page_rank_layers:  # a rank layer's choice per row; before the first, every block
        if inputs.blocks is not None:
            keep = inputs.blocks.index_select(0, row)
        else:
            last = (seq_lens - 1) // plan.block_size
            keep = torch.arange(int(last.max()) + 1) <= last.unsqueeze(1)
        return kept_tables(keep, tables, seq_lens, plan.block_size)
    per_block = settings.ranks_by_key_copy or bool(settings.page_rank_dims)  # masses per owned block
    if per_block:  # scores of each pair's own keys
        pair_q, heads = q.reshape(-1, group, head_dim).index_select(0, pairs), pairs % num_kv_heads
        physical, bs = batch.block_table.index_select(0, row), plan.block_size
        if settings.ranks_by_key_copy:  # every key, from the low-bit copy
            masses, total = key_copy_masses(pair_q, heads, inputs.key_copy, physical, seq_lens, bs)
        else:  # partial key scores, from the cache
            key_cache, dims = batch.key_cache, settings.page_rank_dims
            masses, total = key_dim_masses(pair_q, heads, key_cache, physical, seq_lens, dims)
    else:  # the page estimates, or the oracle's exact block masses
        bulk = inputs.bulk_lse if bulk_lse is None else bulk_lse
        total = torch.logaddexp(local_lse.flatten(1), bulk).view(-1, group).index_select(0, pairs)
        logits, blocks = inputs.pages
        masses = PageMasses(
            logits.flatten(0, 1).index_select(0, pairs).unsqueeze(1), blocks.index_select(0, row)
        )
    return select_tables(masses, total, seq_lens, settings, plan.block_size, tables, native=per_block)


class _HeadViews:
    """Zero-copy per-(block, KV head) views of the caches: flat [nb * Hkv, D, bs] keys and
    [nb * Hkv, bs, D] values for gathers, and [nb * Hkv, 1, bs, D] caches for the stock kernel."""

    def __init__(self, key_cache: Tensor, value_cache: Tensor) -> None:
        num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
        self.block_size = block_size
        self.k_flat = key_cache.view(num_blocks * num_kv_heads, head_dim, block_size)
        self.v_flat = value_cache.view(num_blocks * num_kv_heads, block_size, head_dim)
        self.key_cache, self.value_cache = (_one_head_blocks(c) for c in (key_cache, value_cache))


def _one_head_blocks(cache: Tensor) -> Tensor:
    """[nb, Hkv, bs, D] with whole (block, head) matrices at a constant stride (vLLM's CPU cache)
    -> [nb * Hkv, 1, bs, D], block id `block * Hkv + head`."""
    num_blocks, num_kv_heads, block_size, head_dim = cache.shape
    head_stride = cache.stride(1)
    if cache.stride(0) != num_kv_heads * head_stride or cache.stride()[2:] != (head_dim, 1):
        raise ValueError(f"unexpected KV cache strides {cache.stride()} for shape {tuple(cache.shape)}")
    return cache.as_strided(
        (num_blocks * num_kv_heads, 1, block_size, head_dim), (head_stride, head_stride, head_dim, 1)
    )


def stock_decode(batch: DecodeBatch) -> Tensor:
    """vLLM's CPU decode attention, one query token per sequence, as its backend runs it: query
    [N, H, D], caches [num_blocks, Hkv, bs, D], block tables [N, n], seq_lens [N] int32.
    Returns [N, H, D]."""
    query, key_cache, value_cache, tables, seq_lens, scale = batch
    num_seqs, num_heads, head_dim = query.shape
    query = query.contiguous()
    starts = torch.arange(num_seqs + 1, dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_seqs,
        num_heads=num_heads,
        num_kv_heads=key_cache.shape[1],
        head_dim=head_dim,
        seq_lens=seq_lens,
        dtype=query.dtype,
        query_start_loc=starts,
        causal=True,
        sliding_window_size=-1,
        isa="vec",
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=None,
        kv_cache_dtype="auto",
    )
    out = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        output=out,
        query_start_loc=starts,
        seq_lens=seq_lens,
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=tables,
        softcap=0.0,
        scheduler_metadata=metadata,
        s_aux=None,
        dynamic_causal=None,
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype="auto",
    )
    return out


def _local_attention(
    q: Tensor,
    views: _HeadViews,
    plan: DecodePlan,
    want_stats: bool,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """Softmax of the scaled queries q [B, Hkv, G, D] over each row's local set: output
    [B, Hkv, G, D], lse [B, Hkv, G] and, if asked, the mean and population variance of the
    local scores, each [B, Hkv, G]."""
    batch, num_kv_heads, group, head_dim = q.shape
    block_size, num_slots = views.block_size, plan.local_slots
    keys = views.k_flat.index_select(0, plan.local_rows)
    values = views.v_flat.index_select(0, plan.local_rows)
    if keys.dtype != torch.float32:
        keys, values = keys.float(), values.float()
    keys = keys.view(batch, num_kv_heads, num_slots, head_dim, block_size)  # K^T blocks
    values = values.view(batch, num_kv_heads, num_slots, block_size, head_dim)
    scores = torch.matmul(q.unsqueeze(2), keys)  # [B, Hkv, S, G, bs]
    scores.masked_fill_(plan.local_invalid, -math.inf)
    m = scores.amax(dim=(2, 4), keepdim=True)  # finite: the current token is always valid
    # exp of -inf or of arguments below ~-87 (denormal results) is ~100x slower than normal
    # ones on CPU: clamp, then zero the masked slots exactly. Masked positions may hold stale
    # (finite: vLLM zero-fills the cache) values, which probability 0 cancels.
    probs = (scores - m).clamp_(min=-80.0).exp_().mul_(plan.local_valid_f)
    denom = probs.sum(dim=(2, 4))  # [B, Hkv, G]
    lse = m.view(batch, num_kv_heads, group) + denom.log()
    out = torch.matmul(probs, values).sum(2).div_(denom.unsqueeze(-1))  # [B, Hkv, G, D]
    stats = score_stats(scores, ~plan.local_invalid, dims=(2, 4)) if want_stats else None
    return out, lse, stats
