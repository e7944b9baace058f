"""Random paged KV caches in either of vLLM's layouts (`kv_layout`), built from contiguous
per-sequence K/V, and contiguous references to check paged code against. For tests and
benchmarks; nothing here is used when serving."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kv_layout import CPU_VEC, KVLayout
from ..moments import fresh_moments
from ..page_estimate import bulk_lse_and_pages, plan_pages
from ..page_summaries import PageSummaries
from ..policy import DecodeBatch, PolicyInputs, local_mask, random_long_mask

HEAD_DIM = 64
# CPU layout: block_table entries past a row's blocks are out of range, so reading one raises.
GARBAGE_BLOCK = 10**6
# CPU layout: unwritten cache slots. vLLM zero-fills the cache and freed blocks keep old values,
# so they are finite (its kernel multiplies masked tails by probability 0); large, so that a
# position read by mistake dominates its head's scores and shows. The Triton layout's unwritten
# slots are NaN instead (its kernels never load a masked position).
STALE = 1e3


@dataclass
class PagedCase:
    layout: KVLayout
    query: Tensor  # [B, Hq, D]
    keys: list[Tensor]  # contiguous [L_b, Hkv, D] per row, already rounded to the cache dtype
    values: list[Tensor]
    kv: Tensor  # the whole cache, blocks first
    key_cache: Tensor  # views of `kv` in `layout`
    value_cache: Tensor
    block_table: Tensor  # [B, max_blocks + 2] int32
    seq_lens: Tensor  # [B] int32
    scale: float

    @property
    def num_kv_heads(self) -> int:
        return self.layout.num_kv_heads(self.key_cache)

    @property
    def block_size(self) -> int:
        return self.layout.block_size(self.key_cache)

    def batch(self) -> DecodeBatch:
        """The case as a kernel call's decode batch."""
        return DecodeBatch(
            self.query, self.key_cache, self.value_cache, self.block_table, self.seq_lens, self.scale
        )


def cache_views(layout: KVLayout, kv: Tensor) -> tuple[Tensor, Tensor]:
    """K and V views of a whole cache as vLLM's impls make them: CPU [nb, Hkv, 2 * bs, D] halves,
    Triton [nb, bs, Hkv, 2 * D] halves."""
    if layout is CPU_VEC:
        return kv.chunk(2, dim=2)
    head_dim = kv.shape[-1] // 2
    return kv[..., :head_dim], kv[..., head_dim:]


def new_kv_cache(
    layout: KVLayout, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """A cache of unwritten slots and its key/value views."""
    if layout is CPU_VEC:
        kv = torch.full((num_blocks, num_kv_heads, 2 * block_size, head_dim), STALE, dtype=dtype)
    else:
        kv = torch.full((num_blocks, block_size, num_kv_heads, 2 * head_dim), math.nan, dtype=dtype)
    return (kv, *cache_views(layout, kv))


def write_tokens(
    layout: KVLayout,
    key_cache: Tensor,
    value_cache: Tensor,
    block_row: Tensor,
    start: int,
    keys: Tensor,
    values: Tensor,
) -> None:
    """Write keys/values [n, Hkv, D] at positions [start, start + n) of one sequence, as vLLM's
    cache write does (CPU: K column-major [D, bs] per block and head, V row-major [bs, D])."""
    block_size = layout.block_size(key_cache)
    pos = torch.arange(start, start + keys.shape[0])
    blocks, offsets = block_row[pos // block_size].long(), pos % block_size
    if layout is CPU_VEC:
        num_blocks, num_kv_heads, _, head_dim = key_cache.shape
        key_cache.view(num_blocks, num_kv_heads, head_dim, block_size)[blocks, :, :, offsets] = keys.to(
            key_cache.dtype
        )
        value_cache[blocks, :, offsets] = values.to(value_cache.dtype)
    else:
        key_cache[blocks, offsets] = keys.to(key_cache.dtype)
        value_cache[blocks, offsets] = values.to(value_cache.dtype)


def make_case(
    seq_lens: list[int],
    num_kv_heads: int,
    group: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    head_dim: int = HEAD_DIM,
    capacity: list[int] | None = None,
    layout: KVLayout = CPU_VEC,
) -> PagedCase:
    """Random K/V/query in a paged cache whose physical blocks are shuffled across rows.

    Keys get a per-KV-head mean offset and query heads random magnitudes, so that decisions mix
    long and local. `capacity[b]` (>= seq_lens[b]) reserves blocks for tokens appended later.
    Block-table entries past a row's blocks: GARBAGE_BLOCK (CPU), a block no row owns (Triton).
    """
    gen = torch.Generator().manual_seed(seed)
    capacity = capacity or seq_lens
    blocks_per_row = [-(-c // block_size) for c in capacity]
    num_blocks = sum(blocks_per_row) + 3  # a few blocks no row owns (unwritten)
    perm = torch.randperm(num_blocks, generator=gen)
    pad = GARBAGE_BLOCK if layout is CPU_VEC else int(perm[-1])
    table = torch.full((len(seq_lens), max(blocks_per_row) + 2), pad, dtype=torch.int32)
    kv, key_cache, value_cache = new_kv_cache(layout, num_blocks, num_kv_heads, block_size, head_dim, dtype)
    keys, values, used = [], [], 0
    for b, (length, n_blocks) in enumerate(zip(seq_lens, blocks_per_row)):
        table[b, :n_blocks] = perm[used : used + n_blocks]
        used += n_blocks
        offset = torch.randn(num_kv_heads, head_dim, generator=gen)
        k = (torch.randn(length, num_kv_heads, head_dim, generator=gen) + offset).to(dtype)
        v = torch.randn(length, num_kv_heads, head_dim, generator=gen).to(dtype)
        write_tokens(layout, key_cache, value_cache, table[b], 0, k, v)
        keys.append(k)
        values.append(v)
    num_heads = num_kv_heads * group
    magnitude = torch.empty(len(seq_lens), num_heads, 1).uniform_(0.3, 3.0, generator=gen)
    query = (torch.randn(len(seq_lens), num_heads, head_dim, generator=gen) * magnitude).to(dtype)
    return PagedCase(
        layout,
        query,
        keys,
        values,
        kv,
        key_cache,
        value_cache,
        table,
        torch.tensor(seq_lens, dtype=torch.int32),
        head_dim**-0.5,
    )


def relayout(case: PagedCase, run_lengths: list[int], seed: int = 0) -> PagedCase:
    """The same case with each row's blocks stored as runs of physically consecutive blocks,
    run lengths cycling through `run_lengths`, runs placed in shuffled order with a spare block
    between them (so neighbouring runs never merge)."""
    gen = torch.Generator().manual_seed(seed)
    bs = case.block_size
    runs = []  # (row, first logical block, length)
    for b, length in enumerate(case.seq_lens.tolist()):
        n_blocks, j, r = -(-length // bs), 0, 0
        while j < n_blocks:
            size = min(run_lengths[r % len(run_lengths)], n_blocks - j)
            runs.append((b, j, size))
            j, r = j + size, r + 1
    order = torch.randperm(len(runs), generator=gen).tolist()
    owned = set(case.block_table[case.block_table < case.kv.shape[0]].tolist())
    spare = next(i for i in range(case.kv.shape[0]) if i not in owned)  # unwritten
    table = torch.full_like(case.block_table, GARBAGE_BLOCK)
    src, used = [], 0
    for i in order:
        b, j, size = runs[i]
        table[b, j : j + size] = torch.arange(used, used + size, dtype=table.dtype)
        src.append(case.block_table[b, j : j + size].long())
        src.append(torch.tensor([spare]))
        used += size + 1
    kv = case.kv[torch.cat(src)].contiguous()
    return replace(
        case,
        kv=kv,
        key_cache=cache_views(case.layout, kv)[0],
        value_cache=cache_views(case.layout, kv)[1],
        block_table=table,
    )


def local_positions(seq_len: int, t_sink: int, t_local: int) -> Tensor:
    """Bool [L]: the sinks and the last t_local positions of a row of length L."""
    return local_mask(torch.arange(seq_len), seq_len, t_sink, t_local)


def row_scores(case: PagedCase, b: int) -> Tensor:
    """fp32 scores [Hq, L] of row b, from the contiguous keys."""
    group = case.query.shape[1] // case.num_kv_heads
    k = case.keys[b].float().repeat_interleave(group, dim=1)
    return case.scale * torch.einsum("hd,lhd->hl", case.query[b].float(), k)


def sdpa_row(case: PagedCase, b: int, mask: Tensor | None = None) -> Tensor:
    """fp32 attention output [Hq, D] of row b with optional per-head bool mask [Hq, L]."""
    q = case.query[b].float()[None, :, None]  # [1, Hq, 1, D]
    k = case.keys[b].float().transpose(0, 1)[None]  # [1, Hkv, L, D]
    v = case.values[b].float().transpose(0, 1)[None]
    attn_mask = None if mask is None else mask[None, :, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=case.scale, enable_gqa=True)
    return out[0, :, 0]


def masked_reference(case: PagedCase, long_groups: Tensor, t_sink: int, t_local: int) -> Tensor:
    """fp32 [B, Hq, D]: heads of long groups attend to everything, the others to their local set."""
    group = case.query.shape[1] // case.num_kv_heads
    outs = []
    for b, length in enumerate(case.seq_lens.tolist()):
        local = local_positions(length, t_sink, t_local)
        long_heads = long_groups[b].repeat_interleave(group)
        outs.append(sdpa_row(case, b, local.unsqueeze(0) | long_heads.unsqueeze(1)))
    return torch.stack(outs)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


def policy_inputs(case: PagedCase, settings) -> PolicyInputs:
    """The policy's inputs for a kernel or reference call on `case` (both take the same): key
    moments read from the cache (qada/prompt), page estimates (and with page selection the
    pages' own, qada/pages, and the key copy with page_rank_bits), a random Gaussian
    (qada/calib), a mask mixing long and local groups (static) or a seeded random draw (random)."""
    num_heads, head_dim = case.query.shape[1:]
    gen = torch.Generator().manual_seed(5)
    if settings.needs_moments:
        lengths = case.seq_lens.tolist()
        return PolicyInputs(
            moments=fresh_moments(case.layout, case.key_cache, case.block_table, lengths, *settings.window)
        )
    if settings.needs_pages:
        store = page_summaries(case, settings.page_chunk, settings.page_rank_bits)
        plan = plan_pages(
            case.block_table, case.seq_lens, settings, block_size=case.block_size, store_chunk=store.chunk
        )
        stats = store.layer(0, case.layout, case.key_cache)
        bulk_lse, pages = bulk_lse_and_pages(case.layout, case.batch(), stats, plan)
        copy = store.key_copy(0, case.layout, case.key_cache) if settings.ranks_by_key_copy else None
        return PolicyInputs(bulk_lse=bulk_lse, pages=pages if settings.selects_pages else None, key_copy=copy)
    if settings.needs_calib:
        mu = torch.randn(case.num_kv_heads, head_dim, generator=gen)
        a = torch.randn(case.num_kv_heads, head_dim, head_dim, generator=gen)
        return PolicyInputs(calib=(mu, a @ a.transpose(1, 2) / head_dim))
    if settings.needs_head_mask:
        return PolicyInputs(long_mask=torch.arange(num_heads) % 3 == 1)  # some groups long, some local
    if settings.needs_generator:
        return PolicyInputs(
            long_mask=random_long_mask(settings.random_fraction, case.query.shape[0], num_heads, gen)
        )
    return PolicyInputs()


def slot_mapping(case: PagedCase, starts: list[int] | None = None) -> Tensor:
    """int64 [T]: the cache slots of every row's positions [starts[b], seq_len) in row order, as
    the slot mapping of a step that wrote them."""
    slots = []
    for b, length in enumerate(case.seq_lens.tolist()):
        pos = torch.arange(starts[b] if starts else 0, length)
        slots.append(
            case.block_table[b, pos // case.block_size].long() * case.block_size + pos % case.block_size
        )
    return torch.cat(slots)


def page_summaries(case: PagedCase, chunk: int, key_bits: int = 0) -> PageSummaries:
    """Layer 0's page summaries (and key copy) of the whole case, refreshed as one step that wrote
    it all."""
    store = PageSummaries(chunk, key_bits)
    store.refresh(0, case.layout, case.key_cache, slot_mapping(case))
    return store


def spy(monkeypatch, module, name: str) -> list[bool]:
    """Wrap module.name (a native kernel's wrapper) so that each call appends whether it computed
    a result (not None / False, i.e. did not decline to the PyTorch fallback)."""
    real, ran = getattr(module, name), []

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        ran.append(result is not None and result is not False)
        return result

    monkeypatch.setattr(module, name, wrapped)
    return ran
