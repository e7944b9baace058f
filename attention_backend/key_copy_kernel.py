"""The key copy's ranking as one C loop (`key_copy_kernel.c`), for the CPU path.

PyTorch has no op that scores packed low-bit keys on a per-channel grid in place; composed from
its ops (`page_select.key_copy_masses` without this kernel) the ranking gathers, unpacks and
converts every key to fp32 first, which costs more than vLLM's kernel reading the whole cache.
The C source is compiled on first use with the machine's C compiler (`$CC`, else `cc`) for the
machine's own CPU (`-march=native`) into `$QADA_CACHE_DIR/kernels` (default `~/.cache/qada`),
keyed by the source, the flags and the CPU, and loaded with ctypes. Without a compiler the
ranking falls back to the PyTorch ops, with a warning: same results, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .key_codes import KeyCopy
from .page_summaries import MAX, MIN

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared")
logger = logging.getLogger(__name__)


class KernelBuildError(RuntimeError):
    """The C kernel could not be compiled or loaded on this machine."""


def cache_dir() -> Path:
    return Path(os.environ.get("QADA_CACHE_DIR") or Path.home() / ".cache" / "qada") / "kernels"


def _cpu_id() -> str:
    try:  # the instruction sets -march=native compiles for
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {flags}"


def build() -> Path:
    """The compiled library, built unless this source, flags and CPU already have one."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise KernelBuildError("no C compiler (set CC or install gcc)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), _cpu_id().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{SOURCE.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then moved in whole
        built = Path(tmp) / target.name
        try:
            command = [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as error:
            raise KernelBuildError(f"cannot run the C compiler {compiler}: {error}") from error
        if result.returncode:
            raise KernelBuildError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (with one warning) where it cannot be built."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (KernelBuildError, OSError) as error:
        logger.warning("key copy ranking: C kernel unavailable (%s); using PyTorch ops (slower)", error)
        return None
    lib.qada_key_copy_block_lse.restype = ctypes.c_int
    pointers, sizes = [ctypes.c_void_p] * 7, [ctypes.c_int64] * 8
    lib.qada_key_copy_block_lse.argtypes = [*pointers, *sizes, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def supports(head_dim: int, group: int, chunk: int) -> bool:
    """Whether the kernel takes these shapes (its fixed buffers; chunks of whole 16-float vectors)."""
    return head_dim <= 256 and group <= 32 and chunk in (16, 32, 64, 128)


def block_lse(q: Tensor, kv_heads: Tensor, copy: KeyCopy, table: Tensor, lengths: Tensor, block_size: int):
    """Per-block log-mass [N, G, nb] (-inf past a row's last block) and each head's log-mass over
    its row [N, G] of the scores from the copy: q [N, G, D] scaled fp32 queries, kv_heads [N],
    table [N, nb] the pairs' physical blocks in logical order, lengths [N]. None where the kernel
    is unavailable, the tensors are not on the CPU or it does not take the shapes (`supports`)."""
    codes, stats, bits = copy
    pairs, group, head_dim = q.shape
    _, num_kv_heads, _, chunk = codes.shape
    if not supports(head_dim, group, chunk) or q.device.type != "cpu" or codes.device.type != "cpu":
        return None
    lib = library()
    if lib is None:
        return None
    q = q.float().contiguous()
    kv_heads, table, lengths = (t.long().contiguous() for t in (kv_heads, table, lengths))
    low, high = stats[MIN].contiguous(), stats[MAX].contiguous()  # views of the summaries: no copy
    out = torch.empty(pairs, group, table.shape[1])
    total = torch.empty(pairs, group)
    tensors = (q, kv_heads, codes.contiguous(), low, high, table, lengths)
    sizes = (pairs, group, head_dim, num_kv_heads, table.shape[1], block_size, chunk, bits)
    inputs = [t.data_ptr() for t in tensors]
    status = lib.qada_key_copy_block_lse(*inputs, *sizes, out.data_ptr(), total.data_ptr())
    if status:
        raise ValueError(f"key copy kernel refused the shapes (status {status}): D {head_dim}, G {group}")
    return out, total
