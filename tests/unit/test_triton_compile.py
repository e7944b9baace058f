"""The Triton decode kernel compiled for H100 (sm_90) by Triton's real code generator and ptxas,
without a GPU (see `triton_offline`): every policy and the shapes the GPU path promises build to
a cubin that uses tensor cores, pipelines its cache loads and spills no registers. The
interpreter tests check the numbers; these check that the same source builds for the device.
vLLM's own decode kernel, the GPU benchmark's reference, is built the same way."""

from __future__ import annotations

import pytest
import torch

from attention_backend.kv_layout import TRITON_NHD
from attention_backend.page_summary_kernel import refresh_pages
from attention_backend.settings import POLICIES as POLICY_NAMES
from attention_backend.settings import QadaSettings
from attention_backend.testing.paged_cases import make_case, policy_inputs
from attention_backend.testing.triton_offline import compile_only
from attention_backend.testing.vllm_unified import UnifiedDecode, installed_ops_dir, load
from attention_backend.triton_kernel import qada_decode

# every policy, and qada with each statistics source
POLICIES = {
    **{name: QadaSettings(policy=name) for name in POLICY_NAMES if name != "qada"},
    **{
        f"qada-{stats}": QadaSettings(policy="qada", stats=stats, page_chunk=16)
        for stats in ("prompt", "calib", "local", "pages")
    },
    "qada-pages-mean": QadaSettings(policy="qada", stats="pages", page_chunk=16, groups="mean"),
}


def compile_decode(
    cfg: QadaSettings, group: int, head_dim: int, block_size: int, dtype: torch.dtype, arch: int = 90
):
    """Run `qada_decode` (production tile) on a Triton-layout case with every launch compiled
    for sm_`arch` instead."""
    case = make_case(
        [3 * block_size, 2 * block_size], 2, group, block_size, dtype, head_dim=head_dim, layout=TRITON_NHD
    )
    with compile_only(arch) as compiled:
        qada_decode(case.batch(), cfg, policy_inputs(case, cfg))
    return {c.name: c for c in compiled}


def check_device_code(kernels: dict, dtype: torch.dtype) -> None:
    assert sorted(kernels) == ["_bulk_kernel", "_local_kernel", "_merge_kernel"]
    for name, kernel in kernels.items():
        res = kernel.resources()
        assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{name} spills registers: {res}"
    for name in ("_local_kernel", "_bulk_kernel"):  # the K/V loops
        ptx = kernels[name].ptx
        if dtype != torch.float32:
            assert "mma.sync" in ptx or "wgmma" in ptx, f"{name}: QK and PV dots are not on tensor cores"
        assert "cp.async" in ptx, f"{name}: cache tiles are not loaded asynchronously (no pipelining)"


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_builds_for_h100_at_llama_8b_shapes(policy: str) -> None:
    kernels = compile_decode(POLICIES[policy], group=4, head_dim=128, block_size=16, dtype=torch.bfloat16)
    check_device_code(kernels, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_promised_shapes_build_for_h100(
    dtype: torch.dtype, head_dim: int, block_size: int, group: int
) -> None:
    kernels = compile_decode(POLICIES["qada-prompt"], group, head_dim, block_size, dtype)
    check_device_code(kernels, dtype)


def test_fp32_cache_and_ampere_build() -> None:
    check_device_code(compile_decode(POLICIES["qada-prompt"], 7, 64, 16, torch.float32), torch.float32)
    check_device_code(compile_decode(POLICIES["oracle"], 6, 128, 16, torch.bfloat16, arch=80), torch.bfloat16)


@pytest.mark.parametrize("batch", [2, 64], ids=["3d-split-softmax", "2d"])
def test_vllm_reference_kernel_builds_for_h100(batch: int) -> None:
    """The benchmark's reference, vLLM's unified_attention loaded from its files, builds for
    H100 with this Triton in both of the launch shapes vLLM picks for decode batches."""
    kernel = load(installed_ops_dir())
    decode = UnifiedDecode(kernel, batch, 32, 8, 128, torch.device("cpu"))
    kv = torch.zeros(batch * 2, 16, 8, 256, dtype=torch.bfloat16)
    query = torch.zeros(batch, 32, 128, dtype=torch.bfloat16)
    table = torch.arange(batch * 2, dtype=torch.int32).view(batch, 2)
    seq_lens = torch.full((batch,), 30, dtype=torch.int32)
    with compile_only(90) as compiled:
        decode(query, kv[..., :128], kv[..., 128:], table, seq_lens, 30, 128**-0.5, torch.empty_like(query))
    names = [c.name for c in compiled]
    assert names == (
        ["kernel_unified_attention", "reduce_segments"] if decode.uses_3d else ["kernel_unified_attention"]
    )
    assert all(c.resources()["LOCAL"] == 0 for c in compiled)


@pytest.mark.parametrize("chunk", [16, 32])
def test_page_summary_refresh_builds_for_h100(chunk: int) -> None:
    case = make_case(
        [100, 40], 8, 1, 16 if chunk == 16 else 32, torch.bfloat16, head_dim=128, layout=TRITON_NHD
    )
    stats = torch.zeros(4, case.key_cache.shape[0] * case.block_size // chunk, 8, 128)
    with compile_only(90) as compiled:
        refresh_pages(stats, case.key_cache, torch.arange(50), chunk)
    assert [c.name for c in compiled] == ["_refresh_kernel"]
    assert compiled[0].resources()["LOCAL"] == 0
