"""The skeleton both QAdA backends share, in vLLM's v1 split: the builder plans a step once, the
impl executes it in every layer. `cpu_backend` and `gpu_backend` add only their kernel calls.

Per step, `QadaBuilderMixin.build` (vLLM puts decode rows first: the builder asks it to):
1. takes the decode rows and, as extra decode rows, the tokens of the step's prefill chunks that
   were decoded before (the generated tokens a preempted request recomputes when it resumes: so
   preemption does not change its output) and, with `decode_tail`, the last prompt tokens
   (prefill computes all of them exactly first; their decode output wins);
2. decides the step's mode, here and nowhere else (`decides_step`);
3. plans: stock metadata for what runs on vLLM's kernel; for a decided step, the backend's decode
   plan (`_plan_decode`) and the key-moment update (`MomentStore.plan`).
`QadaImplMixin.forward` then runs, in each layer, the stock parts on vLLM's kernel and the decode
rows on the backend's kernel (`_attend`, or `_read_everything` for rows that are not decided),
and records the layer's decisions in the step context, which the worker counts once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.worker.ubatch_utils import UBatchSlice, _make_metadata_with_slice

from .context import NO_WORKER, LayerDecisions, StepContext, get_step_context
from .key_codes import code_bytes
from .kv_layout import KVLayout
from .moments import MomentStep
from .page_estimate import PagePlan, bulk_lse_and_pages, plan_pages
from .page_select import rank_layer_blocks
from .policy import DecodeBatch, DecodeResult, PolicyInputs, bulk_sizes, reads_everything
from .reference import exact_lse
from .settings import QadaSettings


def decides_step(settings: QadaSettings, n_bulk: Tensor) -> bool:
    """Whether a step's decode rows are decided, or all read everything as stock vLLM does:
    under policy `full`, and when every row's bulk is shorter than `min_bulk` tokens (on CPU the
    decision's fixed cost per layer exceeds the read it could save there). In a decided step,
    such rows read everything too (`DecodeRows.reads_all`): a row's treatment never depends on
    the other rows of its batch, so outputs do not change with load."""
    return settings.decides and bool((n_bulk >= settings.min_bulk).any())


@dataclass
class DecodeRows:
    """The rows a step decodes on our path (one query each), shared by all its layers."""

    token_index: slice | Tensor  # where their queries are among the step's tokens
    num_batch_rows: int  # the first rows are the batch's decode rows, then prompt-tail rows
    req_ids: list[str]
    seq_lens: Tensor  # [n] int32 on the device
    seq_lens_cpu: Tensor  # [n] int64 on the host
    block_table: Tensor  # [n, max_blocks] on the device
    n_bulk: Tensor  # [n] int64 on the host
    decided: bool
    replayed: tuple[bool, ...] = ()  # per row: a resumed request's token decoded before it
    reads_all: Tensor | None = None  # in a decided step: rows whose bulk is below min_bulk (host)
    reads_all_index: tuple[Tensor, Tensor] | None = None  # those rows and their tokens, on the device
    plan: Any = None  # the backend's decode plan for the step (CPU: cpu_kernel.DecodePlan)
    moments: MomentStep | None = None  # the step's key-moment update (qada/prompt)
    pages: PagePlan | None = None  # the bulk pages of its rows (qada/pages)
    rank_blocks: Tensor | None = None  # page_rank_layers: the last rank layer's blocks [n, nb]

    def __len__(self) -> int:
        return len(self.req_ids)


@dataclass
class QadaMetadata:
    """One step. `stock`: the whole batch on vLLM's kernel (steps that are not decided, without
    prompt tails); otherwise `prefill`: the prefill rows on vLLM's kernel, and `decode` on ours."""

    decode: DecodeRows
    num_decode_tokens: int  # the batch's decode rows are its first tokens
    prefill: Any = None
    stock: Any = None


def host_seq_lens(cm: CommonAttentionMetadata) -> Tensor:
    """The batch's sequence lengths on the host, without a device sync where vLLM has them."""
    seq_lens = cm.seq_lens_cpu_upper_bound  # exact outside speculative decoding
    return (cm.seq_lens if seq_lens is None else seq_lens)[: cm.num_reqs].cpu().long()


class QadaBuilderMixin:
    """Mixed into a stock metadata builder (before it in the bases)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_reorder_batch_threshold(1)  # decode rows first

    def _plan_decode(self, rows: DecodeRows, settings: QadaSettings) -> Any:
        """The backend's layer-independent plan of a decided step (none by default)."""
        return None

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ):
        cm = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        rows = self._decode_rows(cm, num_decodes, num_prefills)
        if rows is None:
            return super().build(common_prefix_len, cm, fast_build)
        if not rows.decided and len(rows) == num_decodes:  # no prompt tails: all of it stock
            return QadaMetadata(
                rows, num_decode_tokens, stock=super().build(common_prefix_len, cm, fast_build)
            )
        prefill = None
        if num_prefills:
            prefills = UBatchSlice(
                slice(num_decodes, cm.num_reqs), slice(num_decode_tokens, cm.num_actual_tokens)
            )
            prefill = super().build(common_prefix_len, _make_metadata_with_slice(prefills, cm))
        if rows.decided:
            ctx = get_step_context()
            rows.plan = self._plan_decode(rows, ctx.policy.settings)
            if ctx.policy.settings.needs_moments:
                rows.moments = self._plan_moments(ctx, rows)
            if ctx.policy.settings.needs_pages:
                rows.pages = self._plan_pages(ctx, rows)
        return QadaMetadata(rows, num_decode_tokens, prefill=prefill)

    def _plan_pages(self, ctx: StepContext, rows: DecodeRows) -> PagePlan:
        settings, block_size = ctx.policy.settings, self.kv_cache_spec.block_size
        ctx.pages.check(settings.page_chunk, block_size)
        return plan_pages(
            rows.block_table, rows.seq_lens_cpu, settings, block_size=block_size, store_chunk=ctx.pages.chunk
        )

    def _plan_moments(self, ctx: StepContext, rows: DecodeRows) -> MomentStep:
        """The step's key-moment update of the batch's decode rows (prompt-tail rows, several
        per request, are read afresh in every layer instead)."""
        n, lengths = rows.num_batch_rows, rows.seq_lens_cpu.tolist()
        extra = (rows.block_table[n:], lengths[n:]) if len(rows) > n else None
        window, block_size = ctx.policy.settings.window, self.kv_cache_spec.block_size
        return ctx.moments.plan(
            rows.req_ids[:n], rows.block_table[:n], lengths[:n], window, block_size, extra
        )

    def _decode_rows(
        self, cm: CommonAttentionMetadata, num_decodes: int, num_prefills: int
    ) -> DecodeRows | None:
        """The rows for our decode path: the batch's decode rows, then one row per token of the
        step's prefill chunks past its prompt (a resumed request's generated tokens) or among the
        last `decode_tail` of its prompt.
        None when there are none, or the layer is not plain causal self-attention."""
        cross = getattr(self, "is_cross_attention", False) or getattr(
            self, "is_encoder_only_attention", False
        )
        ctx = get_step_context()
        if cross or cm.causal is not True or ctx is None:
            if ctx is None and num_decodes:  # profile and warm-up runs have no decode rows
                raise RuntimeError(NO_WORKER)
            return None
        settings = ctx.policy.settings
        seq_lens = host_seq_lens(cm)
        rows, lengths, tokens = list(range(num_decodes)), seq_lens[:num_decodes].tolist(), []
        replayed = [False] * num_decodes
        if num_prefills:
            prompt_lens, starts, totals = (
                ctx.num_prompt_tokens(),
                cm.query_start_loc_cpu.tolist(),
                ctx.num_tokens(),
            )
            for r in range(num_decodes, cm.num_reqs):
                length, prompt = int(seq_lens[r]), int(prompt_lens[r])
                first = length - (starts[r + 1] - starts[r])  # position of the chunk's first token
                # the prompt's tail, and the generated tokens of a resumed (preempted) request:
                # those were decoded before, so they are decoded again, not prefilled exactly
                # (under `full` they are prefilled, as stock vLLM does)
                end = length if settings.decides else min(length, prompt)
                for pos in range(max(first, prompt - settings.decode_tail), end):
                    tokens.append(starts[r] + pos - first)
                    rows.append(r)
                    lengths.append(pos + 1)
                    replayed.append(prompt <= pos < int(totals[r]) - 1)  # the last one is new
        if not rows:
            return None
        req_ids = ctx.batch_req_ids(cm.num_reqs)
        seq_lens_cpu = torch.tensor(lengths, dtype=torch.long)
        n_bulk = bulk_sizes(seq_lens_cpu, settings)
        decided = decides_step(settings, n_bulk)
        short = (n_bulk < settings.min_bulk).nonzero().flatten() if decided else None
        device = cm.block_table_tensor.device
        if tokens:  # prompt tails: gathered rows
            token_index = torch.tensor(list(range(num_decodes)) + tokens)
            block_table = cm.block_table_tensor[torch.tensor(rows).to(device)]
            device_lens = seq_lens_cpu.to(device, torch.int32)
        else:  # the batch's first rows, as they are
            token_index, block_table, device_lens = (
                slice(0, num_decodes),
                cm.block_table_tensor[:num_decodes],
                cm.seq_lens[:num_decodes],
            )
        return DecodeRows(
            token_index,
            num_decodes,
            [req_ids[r] for r in rows],
            device_lens,
            seq_lens_cpu,
            block_table,
            n_bulk,
            decided=decided,
            replayed=tuple(replayed),
            **_full_reads(short, token_index, device),
        )


def _full_reads(short: Tensor | None, token_index: slice | Tensor, device: torch.device) -> dict:
    """`reads_all` and `reads_all_index` of DecodeRows for the rows `short` (none if empty)."""
    if short is None or not len(short):
        return {}
    tokens = short if isinstance(token_index, slice) else token_index[short]  # the slice starts at 0
    return {"reads_all": short, "reads_all_index": (short.to(device), tokens.to(device))}


class QadaBackendMixin:
    """Mixed into a stock backend class: the existing enum member's `name` vLLM looks it up by,
    and our `impl` and `builder` classes."""

    name: str
    impl: type
    builder: type

    @classmethod
    def get_name(cls) -> str:
        return cls.name

    @classmethod
    def get_impl_cls(cls) -> type:
        return cls.impl

    @classmethod
    def get_builder_cls(cls) -> type:
        return cls.builder


class QadaImplMixin:
    """Mixed into a stock attention impl (before it in the bases). A backend sets `layout` and
    implements `_caches`, `_attend` and `_read_everything`."""

    layout: KVLayout
    _qada_layer_index: int | None = None

    def _caches(self, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """(key_cache, value_cache) views of vLLM's per-layer cache in `layout`."""
        raise NotImplementedError

    def _attend(
        self, batch: DecodeBatch, rows: DecodeRows, settings: QadaSettings, inputs: PolicyInputs
    ) -> DecodeResult:
        """Decide and attend: one decode step of one layer."""
        raise NotImplementedError

    def _read_everything(self, batch: DecodeBatch) -> Tensor:
        """Full attention of rows that are not decided, as the stock kernel computes it."""
        raise NotImplementedError

    def _refresh_pages(self, ctx: StepContext, layer: int, key_cache: Tensor, slot_mapping: Tensor) -> None:
        """Recompute the page summaries of the chunks the step wrote (C loop or PyTorch; GPU:
        Triton)."""
        written = ctx.written_chunks(slot_mapping)
        ctx.pages.refresh(layer, self.layout, key_cache, slot_mapping, written=written)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """vLLM's write of the step's keys and values, then the page summaries of what it wrote
        (every step, whatever the policy: they are indexed by physical block, not by request)."""
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        ctx = get_step_context()
        if ctx is not None and self.attn_type == AttentionType.DECODER:
            key_cache = self._caches(kv_cache)[0]
            self._refresh_pages(ctx, self._layer_index(layer), key_cache, slot_mapping[: key.shape[0]])

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ) -> Tensor:
        meta, stock = attn_metadata, super().forward
        scales = (output_scale, output_block_scale)
        if not isinstance(meta, QadaMetadata) or self.attn_type != AttentionType.DECODER:
            return stock(layer, query, key, value, kv_cache, meta, output, *scales)
        if meta.stock is not None:
            stock(layer, query, key, value, kv_cache, meta.stock, output, *scales)
        elif meta.prefill is not None:
            n = meta.num_decode_tokens
            new_kv = (None, None) if key is None else (key[n:], value[n:])
            stock(layer, query[n:], *new_kv, kv_cache, meta.prefill, output[n:], *scales)
        self._decode(self._layer_index(layer), query, kv_cache, meta, output)
        return output

    def _decode(
        self, layer: int, query: Tensor, kv_cache: Tensor, meta: QadaMetadata, output: Tensor
    ) -> None:
        """This layer's decode rows: their outputs written into `output` (unless the whole batch
        ran stock), their decisions recorded in the step context."""
        ctx, rows = get_step_context(), meta.decode
        settings = ctx.policy.settings
        stock_step = meta.stock is not None  # its outputs are written already
        batch = None
        if not stock_step or settings.observe:
            queries = query[rows.token_index]
            shape, queries = queries.shape, queries.view(len(rows), self.num_heads, self.head_size)
            batch = DecodeBatch(queries, *self._caches(kv_cache), rows.block_table, rows.seq_lens, self.scale)
        rank_layer = rows.decided and not stock_step and layer in settings.page_rank_layers
        copy_bytes = 0  # what a ranking by the key copy read per context token, where one ran
        if stock_step or not rows.decided or rank_layer:
            if not stock_step:
                output[rows.token_index] = self._read_everything(batch).view(shape)
            if rank_layer:  # reads everything, and ranks the blocks the layers after it read
                rows.rank_blocks = rank_layer_blocks(
                    self.layout, batch, rows.seq_lens_cpu.tolist(), settings, self._block_size(kv_cache)
                )
            everything = self._all_blocks(rows.seq_lens, kv_cache) if settings.selects_pages else None
            decisions = (*reads_everything(rows.n_bulk, self.num_heads, self.num_kv_heads), everything)
        else:
            inputs = ctx.policy.layer_inputs(layer, len(rows), self.num_heads, query.device)
            if rows.moments is not None:
                moments = ctx.moments.read(layer, self.layout, batch.key_cache, rows.moments)
                inputs = inputs._replace(moments=moments)
            if rows.pages is not None:
                stats = ctx.pages.layer(layer, self.layout, batch.key_cache)
                bulk_lse, pages = bulk_lse_and_pages(self.layout, batch, stats, rows.pages)
                inputs = inputs._replace(bulk_lse=bulk_lse, pages=pages if settings.selects_pages else None)
            if settings.page_rank_layers:
                inputs = inputs._replace(blocks=rows.rank_blocks)
            if settings.ranks_by_key_copy:
                inputs = inputs._replace(key_copy=ctx.pages.key_copy(layer, self.layout, batch.key_cache))
                copy_bytes = self._copy_bytes(settings.page_rank_bits, ctx.pages.chunk)
            result = self._attend(batch, rows, settings, inputs)
            output[rows.token_index] = result.output.view(shape)
            decisions = result.long_heads, result.long_groups, result.kept_blocks
            if rows.reads_all is not None:  # as if alone in the step: read in full
                decisions = self._read_short_rows(batch, kv_cache, rows, output, decisions)
        observation = None
        if settings.observe:  # evaluation only: the exact scores of every key
            exact = exact_lse(self.layout, batch, rows.seq_lens_cpu.tolist(), settings)
            observation = exact.observe(settings.logit_tau)
        heads, groups, kept = decisions
        ctx.decisions.append(
            LayerDecisions(
                layer,
                rows.req_ids,
                rows.seq_lens_cpu,
                heads,
                groups,
                token_bytes=2 * self.head_size * kv_cache.element_size(),
                observation=observation,
                replayed=rows.replayed,
                kept_blocks=kept,
                block_size=0 if kept is None else self._block_size(kv_cache),
                rank_bytes=min(settings.page_rank_dims, self.head_size) * kv_cache.element_size(),
                copy_bytes=copy_bytes,
            )
        )

    def _read_short_rows(
        self,
        batch: DecodeBatch,
        kv_cache: Tensor,
        rows: DecodeRows,
        output: Tensor,
        decisions: tuple[Tensor, Tensor, Tensor | None],
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The rows of a decided step whose bulk is below min_bulk, read in full (their outputs
        overwrite the decided ones) and counted long wherever they have a bulk."""
        idx, tokens = rows.reads_all_index
        sub = batch._replace(
            query=batch.query[idx], block_table=batch.block_table[idx], seq_lens=batch.seq_lens[idx]
        )
        output[tokens] = self._read_everything(sub).view(len(idx), *output.shape[1:]).to(output.dtype)
        heads, groups, kept = decisions
        heads, groups = heads.clone(), groups.clone()
        full_heads, full_groups = reads_everything(
            rows.n_bulk[rows.reads_all], self.num_heads, self.num_kv_heads
        )
        heads[idx], groups[idx] = full_heads.to(heads.device), full_groups.to(groups.device)
        if kept is not None:  # every block of theirs
            kept = kept.clone()
            kept[idx] = self._all_blocks(sub.seq_lens, kv_cache).to(kept.device)
        return heads, groups, kept

    def _copy_bytes(self, bits: int, chunk: int) -> int:
        """What the key copy's ranking reads per context token of a long group: its codes and its
        share of the chunk's fp32 min and max (rounded up)."""
        return code_bytes(self.head_size, bits) + -(-2 * 4 * self.head_size // chunk)

    def _block_size(self, kv_cache: Tensor) -> int:
        return self.layout.block_size(self._caches(kv_cache)[0])

    def _all_blocks(self, seq_lens: Tensor, kv_cache: Tensor) -> Tensor:
        """[B, Hkv] int64: every KV block of each row, for each KV group (a read in full)."""
        blocks = (seq_lens.long() - 1) // self._block_size(kv_cache) + 1
        return blocks.unsqueeze(1).expand(-1, self.num_kv_heads)

    def _layer_index(self, layer) -> int:
        if self._qada_layer_index is None:  # the layer's name is known only at forward
            self._qada_layer_index = extract_layer_index(layer.layer_name)
        return self._qada_layer_index
