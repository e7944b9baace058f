"""QAdA attention backend for vLLM on CPU: prefill rows stay on the stock kernel, decode rows go
through `cpu_kernel.paged_decode`, where local KV groups read only their sink and last blocks.

Registered over `CPU_ATTN` by the plugin when QAdA is enabled (the CPU platform ignores
`--attention-backend` but honours overrides of `CPU_ATTN`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.worker.ubatch_utils import UBatchSlice, _make_metadata_with_slice

from .cpu_kernel import DecodePlan, bulk_sizes, paged_decode, plan_decode, reads_everything, undecided
from .moments import MomentStep, fresh_moments
from .observe import observe_decode
from .state import WORKER_STATE


@dataclass
class QadaCPUMetadata:
    """Decode rows come first in the batch (the builder asks vLLM to reorder). With `decode_tail`,
    the last prompt tokens of prefill rows are also decoded on our path, as extra decode rows
    (after the prefill computed them exactly) whose output replaces the prefill's."""

    num_decodes: int  # rows on our decode path: the batch's decode rows, then prompt-tail tokens
    num_decode_tokens: int  # the batch's decode rows (its first tokens)
    decode_seq_lens: torch.Tensor  # [num_decodes] CPU int
    decode_block_table: torch.Tensor  # [num_decodes, max_blocks]
    decode_req_ids: list[str]
    prefill: CPUAttentionMetadata | None  # stock metadata of the prefill sub-batch
    decode_tokens: torch.Tensor | None = None  # token index of each decode row, if not 0..n-1
    plan: DecodePlan | None = None  # decode indices shared by all layers, built by the first
    # When no decode row is decided (policy full, or bulks below min_bulk): the whole batch on
    # the stock path, and the decode rows' (long heads, long groups) to count.
    stock: CPUAttentionMetadata | None = None
    undecided: tuple[torch.Tensor, torch.Tensor] | None = None
    moments: MomentStep | None = None  # this step's key-moment update, planned by the first layer


class QadaCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Our kernel reads the "vec" cache layout (K blocks column-major); AMX packs tiles and
        # other ISAs use other layouts, so pin "vec" where it exists and refuse elsewhere.
        if self.isa != "vec":
            if self.isa != "amx":
                raise NotImplementedError(
                    f"QAdA on CPU needs the 'vec' KV layout; this CPU uses {self.isa!r}"
                )
            self.isa = "vec"
            self._set_isa_to_layers(layer_names)
        if self.kv_cache_dtype != "auto":
            raise NotImplementedError("QAdA on CPU supports kv_cache_dtype=auto only")
        self._init_reorder_batch_threshold(1)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> QadaCPUMetadata | CPUAttentionMetadata:
        cm = common_attn_metadata
        if self.is_cross_attention or self.is_encoder_only_attention or cm.causal is not True:
            return super().build(common_prefix_len, cm, fast_build)
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        tail = WORKER_STATE.decode_tail if num_prefills else 0
        req_ids = WORKER_STATE.request_ids(cm.num_reqs) if num_decodes or tail else []
        seq_lens = cm.seq_lens.cpu()
        meta = QadaCPUMetadata(
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            decode_seq_lens=seq_lens[:num_decodes],
            decode_block_table=cm.block_table_tensor[:num_decodes],
            decode_req_ids=req_ids[:num_decodes],
            prefill=None,
        )
        n_bulk = bulk_sizes(meta.decode_seq_lens, WORKER_STATE.policy)
        if (
            num_decodes
            and not tail
            and not WORKER_STATE.observe
            and reads_everything(WORKER_STATE.policy, int(n_bulk.sum()))
        ):
            meta.stock = super().build(common_prefix_len, cm, fast_build)
            meta.undecided = undecided(n_bulk, self.num_heads, self.num_kv_heads)
            return meta
        if num_prefills:
            rows = slice(num_decodes, cm.num_reqs)
            tokens = slice(num_decode_tokens, cm.num_actual_tokens)
            meta.prefill = super().build(
                common_prefix_len, _make_metadata_with_slice(UBatchSlice(rows, tokens), cm)
            )
            if tail:
                tails = _prompt_tails(cm, num_decodes, seq_lens.tolist(), tail)
                if tails[0]:
                    tail_tokens, tail_rows, tail_lens = tails
                    meta.decode_tokens = torch.cat([torch.arange(num_decodes), torch.tensor(tail_tokens)])
                    meta.decode_seq_lens = torch.cat([meta.decode_seq_lens, seq_lens.new_tensor(tail_lens)])
                    meta.decode_block_table = torch.cat(
                        [meta.decode_block_table, cm.block_table_tensor[tail_rows]]
                    )
                    meta.decode_req_ids += [req_ids[r] for r in tail_rows]
                    meta.num_decodes += len(tail_tokens)
        return meta


def _prompt_tails(
    cm: CommonAttentionMetadata, num_decodes: int, seq_lens: list[int], tail: int
) -> tuple[list[int], list[int], list[int]]:
    """Token index, batch row and sequence length (position + 1) of each token of this step's
    prefill chunks that is among the last `tail` tokens of its prompt."""
    prompt_lens = WORKER_STATE.runner.input_batch.num_prompt_tokens
    starts = cm.query_start_loc_cpu.tolist()
    tokens, rows, lens = [], [], []
    for r in range(num_decodes, cm.num_reqs):
        first = seq_lens[r] - (starts[r + 1] - starts[r])  # position of the chunk's first token
        prompt_len = int(prompt_lens[r])
        for pos in range(max(first, prompt_len - tail), min(seq_lens[r], prompt_len)):
            tokens.append(starts[r] + pos - first)
            rows.append(r)
            lens.append(pos + 1)
    return tokens, rows, lens


class QadaCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not WORKER_STATE.settings:  # first layer of this process: apply the launch settings
            WORKER_STATE.configure(get_current_vllm_config().additional_config.get("qada") or {})
        self.layer_index: int | None = None

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
    ) -> torch.Tensor:
        if not isinstance(attn_metadata, QadaCPUMetadata) or self.attn_type != AttentionType.DECODER:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        meta = attn_metadata
        nd = meta.num_decode_tokens
        if meta.stock is not None:
            super().forward(layer, query, key, value, kv_cache, meta.stock, output)
            self._record(layer, meta, *meta.undecided, kv_cache.element_size())
            return output
        if meta.prefill is not None:
            # key/value are only read by the stock kernel for encoder attention (never here).
            super().forward(layer, query[nd:], None, None, kv_cache, meta.prefill, output[nd:])
        if meta.decode_tokens is not None:  # prompt tails: recomputed on the decode path
            output[meta.decode_tokens] = self._decode(layer, query[meta.decode_tokens], kv_cache, meta)
        elif meta.num_decodes:
            output[:nd] = self._decode(layer, query[:nd], kv_cache, meta)
        return output

    def _layer_index(self, layer) -> int:
        if self.layer_index is None:
            self.layer_index = int(re.search(r"layers\.(\d+)\.", layer.layer_name).group(1))
        return self.layer_index

    def _record(
        self, layer, meta: QadaCPUMetadata, long_heads, long_groups, element_size: int, observation=None
    ) -> None:
        cfg = WORKER_STATE.policy
        WORKER_STATE.counters.record(
            self._layer_index(layer),
            meta.decode_req_ids,
            long_heads,
            long_groups,
            meta.decode_seq_lens,
            local_tokens=cfg.t_sink + cfg.t_local,
            token_bytes=2 * self.head_size * element_size,
            observation=observation,
        )

    def _decode(
        self, layer, query: torch.Tensor, kv_cache: torch.Tensor, meta: QadaCPUMetadata
    ) -> torch.Tensor:
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
        state, cfg, layer_index = WORKER_STATE, WORKER_STATE.policy, self._layer_index(layer)
        if meta.plan is None:
            meta.plan = plan_decode(
                meta.decode_block_table,
                meta.decode_seq_lens,
                cfg,
                block_size=block_size,
                num_kv_heads=num_kv_heads,
            )
        moments = None
        if cfg.policy == "qada" and cfg.stats == "prompt" and not reads_everything(cfg, meta.plan.total_bulk):
            moments = self._prompt_moments(layer_index, key_cache, meta)
        shape, query = query.shape, query.view(meta.num_decodes, self.num_heads, self.head_size)
        result = paged_decode(
            query,
            key_cache,
            value_cache,
            meta.decode_block_table,
            meta.decode_seq_lens,
            self.scale,
            cfg,
            moments=moments,
            plan=meta.plan,
            calib=None if state.calib is None else (state.calib[0][layer_index], state.calib[1][layer_index]),
            static_mask=None if state.static_heads is None else state.static_heads[layer_index],
            generator=state.generator,
        )
        observation = None
        if state.observe:
            observation = observe_decode(
                query, key_cache, meta.decode_block_table, meta.plan.lengths, self.scale, cfg
            )
        self._record(layer, meta, result.long_heads, result.long_groups, kv_cache.element_size(), observation)
        return result.output.view(shape)

    @staticmethod
    def _prompt_moments(layer_index: int, key_cache: torch.Tensor, meta: QadaCPUMetadata):
        cfg, store, lengths = WORKER_STATE.policy, WORKER_STATE.moments, meta.plan.lengths
        decodes = meta.num_decode_tokens
        if meta.moments is None:
            meta.moments = store.plan(
                meta.decode_req_ids[:decodes],
                meta.decode_block_table,
                lengths[:decodes],
                cfg.t_sink,
                cfg.t_local,
                key_cache.shape[2],
            )
        moments = store.read(layer_index, key_cache, meta.moments)
        if meta.num_decodes > decodes:  # prompt tails: several rows per request, read afresh
            tails = fresh_moments(
                key_cache, meta.decode_block_table[decodes:], lengths[decodes:], cfg.t_sink, cfg.t_local
            )
            moments = tuple(torch.cat(parts) for parts in zip(moments, tails))
        return moments


class QadaCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # must name an existing enum member; we override CPU_ATTN's path

    @staticmethod
    def get_impl_cls() -> type[QadaCPUImpl]:
        return QadaCPUImpl

    @staticmethod
    def get_builder_cls() -> type[QadaCPUMetadataBuilder]:
        return QadaCPUMetadataBuilder
