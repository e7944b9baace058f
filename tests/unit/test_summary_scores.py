"""The key copy kernel's build: cached per source, flags, OpenMP runtime and CPU; a clear error
without a compiler (its results are tested against PyTorch's in test_page_select)."""

from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch

from attention_backend import summary_scores


def test_the_kernel_is_built_once_into_the_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QADA_CACHE_DIR", str(tmp_path))
    built = summary_scores.build()
    assert built.parent == tmp_path / "kernels" and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert summary_scores.build() == built and built.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # nothing half-written left


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_the_build_says_why(tmp_path, monkeypatch, compiler) -> None:
    monkeypatch.setenv("QADA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    with pytest.raises(summary_scores.KernelBuildError, match=r"compiler|failed"):
        summary_scores.build()
    assert not list((tmp_path / "kernels").iterdir())


def test_without_pytorchs_openmp_the_loops_are_built_single_threaded(tmp_path, monkeypatch) -> None:
    """Where PyTorch has no OpenMP runtime to share, the library is built without OpenMP (its own
    cache entry) and its loops run on the calling thread; with one, it links PyTorch's."""
    monkeypatch.setenv("QADA_CACHE_DIR", str(tmp_path))
    runtime = summary_scores.openmp_runtime()
    shared = summary_scores.build()
    monkeypatch.setattr(summary_scores, "openmp_runtime", lambda: None)
    alone = summary_scores.build()
    assert alone != shared
    assert ctypes.CDLL(str(alone)).qada_threads() == 1
    if runtime is not None:  # PyTorch's Linux CPU wheels
        assert runtime.name.startswith("libgomp")
        linked = subprocess.run(["ldd", str(shared)], capture_output=True, text=True).stdout
        assert str(runtime.resolve()) in linked or str(runtime) in linked
        assert ctypes.CDLL(str(shared)).qada_threads() == torch.get_num_threads()
