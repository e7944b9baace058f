"""vLLM general plugin (`vllm.general_plugins`): runs in every vLLM process.

It registers the QAdA backend only when QAdA was asked for (`QADA_ENABLE=1`, set by
`qada serve` when the config enables it), so other users of the environment keep stock vLLM.
"""

from __future__ import annotations

import os


def enabled() -> bool:
    return os.environ.get("QADA_ENABLE", "0") == "1"


def register() -> None:
    if not enabled():
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "attention_backend.cpu_backend.QadaCPUBackend")
    else:  # untested on hardware; select it with --attention-backend CUSTOM
        register_backend(AttentionBackendEnum.CUSTOM, "attention_backend.gpu_backend.QadaTritonBackend")
