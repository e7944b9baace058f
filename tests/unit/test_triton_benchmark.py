"""The GPU kernel benchmark, run end to end on CPU (Triton's interpreter, tiny context): its
correctness gate passes for our kernel and for vLLM's kernel loaded from its files, and it
writes its results, goals and plot. Its timings here mean nothing; the script has to work the
first time a GPU runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from attention_backend.testing.vllm_unified import installed_ops_dir
from serving.testing import REPO


def test_benchmark_smoke_run_on_cpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.triton_decode",
            "--device",
            "cpu",
            "--dtype",
            "fp16",
            "--contexts",
            "300",
            "--batches",
            "2",
            "--fractions",
            "0.25",
            "--t-sink",
            "4",
            "--t-local",
            "32",
            "--tile",
            "16",
            "--no-graph",
            "--vllm-ops",
            str(installed_ops_dir()),
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("full", "random", "vllm unified_attention"):
        assert f"check {name}: max" in proc.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["meta"]["vllm_reference"] is True
    assert [(r["variant"], r["best_reference"] in ("sdpa", "vllm")) for r in result["rows"]] == [
        ("full", True),
        ("frac=0.25", True),
    ]
    assert all(r["vllm_ms"] > 0 and r["ms"] > 0 for r in result["rows"])
    assert [g["met"] is None for g in result["goals"]] == [False, True, True]  # no point >= 32k here
    assert (tmp_path / "speedup.png").stat().st_size > 10_000
