"""The Triton page-summary refresh, run by Triton's CPU interpreter, against the PyTorch refresh
(`PageSummaries.refresh`, itself checked against the keys in tests/unit/test_pages.py). Run with
TRITON_INTERPRET=1 (`make test` does)."""

from __future__ import annotations

import os

import pytest
import torch

from attention_backend.kv_layout import TRITON_NHD
from attention_backend.page_summaries import PageSummaries, written_chunks
from attention_backend.page_summary_kernel import refresh_pages
from attention_backend.testing.paged_cases import make_case, slot_mapping

if os.environ.get("TRITON_INTERPRET") != "1":  # Triton reads it when kernels are decorated
    pytest.skip("run with TRITON_INTERPRET=1 (make test does)", allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [16, 32])
def test_refresh_kernel_matches_the_pytorch_refresh(dtype: torch.dtype, chunk: int) -> None:
    """One step that prefills some rows from a cached prefix, decodes others by one token, and
    pads its slot mapping with -1, then a decode step over all rows."""
    case = make_case([150, 37, 64, 90], 2, 2, 32, dtype, head_dim=64, layout=TRITON_NHD)
    starts = [0, 36, 20, 89]  # row 0 prefilled whole; rows 1 and 3 decode one token
    slots = torch.cat([slot_mapping(case, starts), torch.full((3,), -1)])
    torch_store = PageSummaries(chunk)
    torch_store.refresh(0, TRITON_NHD, case.key_cache, slots)
    want = torch_store.layer(0, TRITON_NHD, case.key_cache)
    stats = torch.full_like(want, float("nan"))
    refresh_pages(stats, case.key_cache, slots, chunk)
    written = torch.zeros(want.shape[1], dtype=torch.bool)
    written[written_chunks(slots[slots >= 0], chunk)[0]] = True
    torch.testing.assert_close(stats[:, written], want[:, written], atol=1e-5, rtol=1e-5)
    assert stats[:, ~written].isnan().all(), "a chunk the step did not write was touched"
