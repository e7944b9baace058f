"""The GPU backend cannot run without a GPU: check it imports on CPU, that the plugin registers
it as CUSTOM on other platforms, and its per-request moment-row bookkeeping."""

from __future__ import annotations

import pytest


def test_gpu_backend_imports_and_plugin_registers_custom(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from vllm.v1.worker.gpu_worker import Worker

    from attention_backend import gpu_backend, gpu_worker, plugin

    assert issubclass(gpu_worker.QadaGPUWorker, Worker)
    assert hasattr(gpu_worker.QadaGPUWorker, "qada_configure")
    assert issubclass(gpu_backend.QadaTritonBackend, TritonAttentionBackend)
    assert gpu_backend.QadaTritonBackend.get_name() == "CUSTOM"
    assert gpu_backend.QadaTritonBackend.get_impl_cls() is gpu_backend.QadaTritonImpl
    assert gpu_backend.QadaTritonMetadataBuilder._cudagraph_support.name == "NEVER"
    monkeypatch.setenv("QADA_ENABLE", "1")
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda *a: False)
    had_override = AttentionBackendEnum.CUSTOM.is_overridden()
    try:
        plugin.register()
        assert AttentionBackendEnum.CUSTOM.get_path() == "attention_backend.gpu_backend.QadaTritonBackend"
    finally:
        if not had_override:
            AttentionBackendEnum.CUSTOM.clear_override()


def test_moment_rows_follow_live_requests() -> None:
    from attention_backend.gpu_backend import _MomentRows

    pool = _MomentRows()
    rows, fresh = pool.assign(["a", "b"], capacity=3)
    assert sorted(rows) == [0, 1] and fresh == [0, 1]
    again, fresh = pool.assign(["b", "c", "a"], capacity=3)
    assert again[0] == rows[1] and again[2] == rows[0] and fresh == [1]
    later, fresh = pool.assign(["d", "c"], capacity=3)  # a and b finished: their rows are free
    assert later[1] == again[1] and fresh == [0] and len(set(later)) == 2
