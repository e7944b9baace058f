"""QAdA attention backend for vLLM on CPU: the shared skeleton (`backend.py`) over vLLM's CPU
backend, with `cpu_kernel.paged_decode` for decided decode rows and vLLM's own C++ kernel for
everything else.

Registered over `CPU_ATTN` by the plugin when QAdA is enabled (the CPU platform ignores
`--attention-backend` but honours overrides of `CPU_ATTN`).
"""

from __future__ import annotations

from torch import Tensor
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from .backend import DecodeRows, QadaBackendMixin, QadaBuilderMixin, QadaImplMixin
from .cpu_kernel import paged_decode, plan_decode, stock_decode
from .kv_layout import CPU_VEC
from .policy import DecodeBatch, DecodeResult, PolicyInputs
from .settings import QadaSettings


class QadaCPUMetadataBuilder(QadaBuilderMixin, CPUAttentionMetadataBuilder):
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

    def _plan_decode(self, rows: DecodeRows, settings: QadaSettings):
        return plan_decode(
            rows.block_table,
            rows.seq_lens_cpu,
            settings,
            block_size=self.kv_cache_spec.block_size,
            num_kv_heads=self.num_kv_heads,
        )


class QadaCPUImpl(QadaImplMixin, CPUAttentionBackendImpl):
    layout = CPU_VEC

    def _caches(self, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        return kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)

    def _attend(
        self, batch: DecodeBatch, rows: DecodeRows, settings: QadaSettings, inputs: PolicyInputs
    ) -> DecodeResult:
        return paged_decode(batch, settings, inputs, plan=rows.plan)

    def _read_everything(self, batch: DecodeBatch) -> Tensor:
        return stock_decode(batch._replace(seq_lens=batch.seq_lens.int()))


class QadaCPUBackend(QadaBackendMixin, CPUAttentionBackend):
    name = "CPU_ATTN"  # an existing enum member's name: the plugin overrides CPU_ATTN's path
    impl, builder = QadaCPUImpl, QadaCPUMetadataBuilder
