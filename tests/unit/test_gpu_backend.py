"""The plugin registers the GPU backend as CUSTOM on GPU platforms, only when QAdA is enabled
(its host logic runs on CPU in test_gpu_host.py)."""

from __future__ import annotations

import pytest


def test_plugin_registers_the_triton_backend_as_custom_on_gpu_platforms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from attention_backend import gpu_backend, plugin

    assert gpu_backend.QadaTritonBackend.get_name() == "CUSTOM"
    assert gpu_backend.QadaTritonBackend.get_impl_cls() is gpu_backend.QadaTritonImpl
    assert gpu_backend.QadaTritonBackend.get_builder_cls() is gpu_backend.QadaTritonMetadataBuilder
    assert gpu_backend.QadaTritonMetadataBuilder._cudagraph_support.name == "NEVER"
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda *a: False)
    had_override = AttentionBackendEnum.CUSTOM.is_overridden()
    try:
        monkeypatch.setenv("QADA_ENABLE", "0")
        plugin.register()
        assert AttentionBackendEnum.CUSTOM.is_overridden() == had_override  # not asked for: nothing
        monkeypatch.setenv("QADA_ENABLE", "1")
        plugin.register()
        assert AttentionBackendEnum.CUSTOM.get_path() == "attention_backend.gpu_backend.QadaTritonBackend"
    finally:
        if not had_override:
            AttentionBackendEnum.CUSTOM.clear_override()
