"""Scores from the page summaries and the key copy in C (`summary_scores.c`), for the CPU path.

PyTorch has no op that scores packed low-bit keys on a per-channel grid in place, nor one that
dots queries with summaries gathered by page: composed from its ops (`page_select` and
`page_estimate` without this module) the key copy's ranking gathers, unpacks and converts every
key to fp32 first, costing more than vLLM's kernel reading the whole cache, and the page
estimate spends most of its time copying gathered summaries. The C source is compiled on first
use with the machine's C compiler (`$CC`, else `cc`) for the machine's own CPU (`-march=native`)
into `$QADA_CACHE_DIR/kernels` (default `~/.cache/qada`), keyed by the source, the flags and the
CPU, and loaded with ctypes. Without a compiler each falls back to the PyTorch ops, with a
warning: same results (the ranking's in fp32), slower. The ranking of a 2- or 4-bit copy
rounds its weights to int8 where the CPU has AVX-512 VNNI (`int8_weights`); the selection of
blocks from per-block masses and the bulk's log-mass are C loops too (`select_tables`,
`bulk_lse`). Where PyTorch runs on OpenMP (its Linux CPU wheels) the library links PyTorch's own
runtime and splits its loops over the step's intra-op threads (`openmp_runtime`, `threads`):
while these loops run, PyTorch's threads would otherwise sit idle.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .page_estimate import PagePlan

from . import page_summaries  # a module (page_summaries calls refresh): names read at call time
from .key_codes import KeyCopy

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC")
logger = logging.getLogger("vllm.qada.summary_scores")  # under vLLM's logger: shown in its workers' logs


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


def openmp_runtime() -> Path | None:
    """PyTorch's own OpenMP runtime (its bundled libgomp), where its CPU build has one: linked
    against it, the C loops run on the step's intra-op threads (torch.set_num_threads), not on a
    second thread pool competing for the cores."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _compile(compiler: str, runtime: Path | None, built: Path) -> subprocess.CompletedProcess:
    """Compile and link SOURCE into built: with OpenMP against runtime, else single-threaded."""
    if runtime is None:
        command = [compiler, *FLAGS, "-shared", "-Wno-unknown-pragmas", str(SOURCE), "-o", str(built), "-lm"]
        return subprocess.run(command, capture_output=True, text=True)
    objects = built.with_suffix(".o")
    command = [compiler, *FLAGS, "-fopenmp", "-c", str(SOURCE), "-o", str(objects)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        return result
    link = ["-shared", str(objects), str(runtime), f"-Wl,-rpath,{runtime.parent}", "-o", str(built), "-lm"]
    return subprocess.run([compiler, *link], capture_output=True, text=True)


def build() -> Path:
    """The compiled library, built unless this source, flags, OpenMP runtime and CPU already have
    one; with OpenMP where PyTorch has it and the compiler takes it, else without."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise KernelBuildError("no C compiler (set CC or install gcc)")
    runtime = openmp_runtime()
    source = SOURCE.read_bytes()
    parts = [source, " ".join(FLAGS).encode(), str(runtime).encode(), _cpu_id().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir() / f"{SOURCE.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then moved in whole
        built = Path(tmp) / target.name
        try:
            result = _compile(compiler, runtime, built)
            if result.returncode and runtime is not None:
                why = result.stderr.strip()[-500:]
                logger.warning("page scores: no OpenMP build (%s); single-threaded", why)
                result = _compile(compiler, None, built)
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
        logger.warning("page scores: C kernels unavailable (%s); using PyTorch ops (slower)", error)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.qada_key_copy_block_lse.restype = lib.qada_page_logits.restype = ctypes.c_int
    lib.qada_key_copy_block_lse.argtypes = [*[pointer] * 7, *[size] * 8, pointer, pointer]
    lib.qada_page_logits.argtypes = [*[pointer] * 4, *[size] * 7, ctypes.c_float, size, pointer]
    lib.qada_refresh_summaries.restype = lib.qada_int8_weights.restype = ctypes.c_int
    lib.qada_select_blocks.restype = lib.qada_bulk_lse.restype = ctypes.c_int
    lib.qada_bulk_lse.argtypes = [*[pointer] * 3, *[size] * 4, *[pointer] * 3, *[size] * 6, pointer]
    lib.qada_select_blocks.argtypes = [*[pointer] * 4, *[size] * 7, ctypes.c_float, size, *[pointer] * 3]
    lib.qada_local_attention.restype = lib.qada_threads.restype = ctypes.c_int
    lib.qada_local_attention.argtypes = [
        pointer,
        *[pointer, size, size] * 2,
        pointer,
        size,
        pointer,
        *[size] * 7,
        pointer,
        pointer,
    ]
    lib.qada_refresh_summaries.argtypes = [
        pointer,
        *[size] * 4,
        pointer,
        pointer,
        *[size] * 7,
        pointer,
        pointer,
    ]
    logger.info("page scores: C kernels loaded, their loops on %d thread(s)", lib.qada_threads())
    return lib


def threads() -> int:
    """The threads the C loops split over (PyTorch's intra-op count with OpenMP, else 1); 0
    without the kernel."""
    lib = library()
    return 0 if lib is None else lib.qada_threads()


def int8_weights(head_dim: int, bits: int) -> bool:
    """Whether the C ranking of a `bits`-bit copy rounds each head's weights q * step to int8 on
    the scale max |weight| / 127 per chunk (its integer dot products need AVX-512 VNNI / VBMI):
    for bits <= 4 and head_dim a multiple of 16, where this CPU has them."""
    lib = library()
    return lib is not None and bits <= 4 and head_dim % 16 == 0 and bool(lib.qada_int8_weights())


def _on_cpu(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def supports(head_dim: int, group: int) -> bool:
    """Whether the kernels' fixed buffers take these shapes."""
    return head_dim <= 256 and group <= 32


KEY_COPY_CHUNKS = (16, 32, 64, 128)  # the ranking's chunks: whole 16-float vectors, unrolled


def page_logits(q: Tensor, stats: Tensor, plan: PagePlan) -> Tensor | None:
    """The whole pages' estimates [B, Hkv, G, J] of `page_estimate.bulk_lse_and_pages`: q
    [B, Hkv, G, D] scaled fp32 queries, stats the layer's summaries. None where the kernel is
    unavailable, the tensors are not on the CPU or it does not take the shapes."""
    rows, num_kv_heads, group, head_dim = q.shape
    if not supports(head_dim, group) or not _on_cpu(q, stats, plan.chunk_ids) or (lib := library()) is None:
        return None
    q, stats = q.float().contiguous(), stats.contiguous()
    ids, valid = plan.chunk_ids.long().contiguous(), plan.page_valid.contiguous()  # bool: 0 / 1 bytes
    _, pages, m = ids.shape
    out = torch.empty(rows, num_kv_heads, group, pages)
    inputs = [t.data_ptr() for t in (q, stats, ids, valid)]
    sizes = (rows, num_kv_heads, group, head_dim, pages, m, stats.shape[1])
    log_n = math.log(plan.page_chunk)
    status = lib.qada_page_logits(*inputs, *sizes, log_n, int(plan.bound), out.data_ptr())
    _check(status, f"q {tuple(q.shape)}")
    return out


def bulk_lse(q: Tensor, logits: Tensor, keys: Tensor, plan: PagePlan) -> Tensor | None:
    """The bulk's log-mass [B, Hkv, G] of `page_estimate.bulk_lse_and_pages` from the whole pages'
    estimates logits [B, Hkv, G, J] and the exact scores of the plan's other bulk positions: q
    [B, Hkv, G, D] scaled fp32, keys the cache as [num_blocks, Hkv, bs, D] (`keys_by_head`). None
    where the kernel is unavailable or the cache is not fp32 on the CPU."""
    rows, num_kv_heads, group, head_dim = q.shape
    blocks, offsets, valid = plan.exact_blocks, plan.exact_offsets, plan.exact_valid
    fits = supports(head_dim, group) and keys.dtype == torch.float32
    if not fits or not _on_cpu(q, keys, blocks) or (lib := library()) is None:
        return None
    q, logits = q.float().contiguous(), logits.contiguous()
    blocks, offsets, valid = blocks.long().contiguous(), offsets.long().contiguous(), valid.contiguous()
    out = torch.empty(rows, num_kv_heads, group)
    sizes = (rows, num_kv_heads, group, head_dim, logits.shape[-1], blocks.shape[1])
    pointers = (blocks.data_ptr(), offsets.data_ptr(), valid.data_ptr())  # bool: one byte, 0 / 1
    status = lib.qada_bulk_lse(
        q.data_ptr(), logits.data_ptr(), keys.data_ptr(), *keys.stride(), *pointers, *sizes, out.data_ptr()
    )
    _check(status, f"q {tuple(q.shape)}")
    return out


def local_attention(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    window: tuple[int, int],
) -> tuple[Tensor, Tensor] | None:
    """`cpu_kernel`'s local pass in one loop, read in place: the softmax of the scaled queries q
    [B, Hkv, G, D] over each row's local set (window = (t_sink, t_local)), as output [B, Hkv, G, D]
    and lse [B, Hkv, G]; caches [num_blocks, Hkv, bs, D] fp32 in vLLM's CPU layout (column-major
    key blocks), block_table [B, >= blocks], seq_lens [B]. None where the kernel is unavailable,
    the caches are not fp32 on the CPU or it does not take the shapes."""
    rows, num_kv_heads, group, head_dim = q.shape
    block_size = key_cache.shape[2]
    fp32 = key_cache.dtype == value_cache.dtype == torch.float32
    if not (fp32 and supports(head_dim, group) and _on_cpu(q, key_cache, block_table)):
        return None
    if (lib := library()) is None:
        return None
    q = q.float().contiguous()
    table, lengths = block_table.long().contiguous(), seq_lens.long().contiguous()
    out, lse = torch.empty(rows, num_kv_heads, group, head_dim), torch.empty(rows, num_kv_heads, group)
    caches = [(c.data_ptr(), c.stride(0), c.stride(1)) for c in (key_cache, value_cache)]
    sizes = (rows, num_kv_heads, group, head_dim, block_size, *window)
    status = lib.qada_local_attention(
        q.data_ptr(),
        *caches[0],
        *caches[1],
        table.data_ptr(),
        table.stride(0),
        lengths.data_ptr(),
        *sizes,
        out.data_ptr(),
        lse.data_ptr(),
    )
    _check(status, f"q {tuple(q.shape)}, window {window}")
    return out, lse


def _check(status: int, shapes: str) -> None:
    if status == 2:
        raise MemoryError("summary_scores: out of memory")
    if status:
        raise ValueError(f"summary_scores refused the shapes: {shapes}")


def block_lse(q: Tensor, kv_heads: Tensor, copy: KeyCopy, table: Tensor, lengths: Tensor, block_size: int):
    """Per-block log-mass [N, G, nb] (-inf past a row's last block) and each head's log-mass over
    its row [N, G] of the scores from the copy: q [N, G, D] scaled fp32 queries, kv_heads [N],
    table [N, nb] the pairs' physical blocks in logical order, lengths [N]. None where the kernel
    is unavailable, the tensors are not on the CPU or it does not take the shapes."""
    codes, stats, bits = copy
    pairs, group, head_dim = q.shape
    _, num_kv_heads, _, chunk = codes.shape
    if chunk not in KEY_COPY_CHUNKS or not supports(head_dim, group) or not _on_cpu(q, codes):
        return None
    if (lib := library()) is None:
        return None
    q = q.float().contiguous()
    kv_heads, table, lengths = (t.long().contiguous() for t in (kv_heads, table, lengths))
    low, high = (
        stats[page_summaries.MIN].contiguous(),
        stats[page_summaries.MAX].contiguous(),
    )  # views of the summaries: no copy
    out = torch.empty(pairs, group, table.shape[1])
    total = torch.empty(pairs, group)
    tensors = (q, kv_heads, codes.contiguous(), low, high, table, lengths)
    sizes = (pairs, group, head_dim, num_kv_heads, table.shape[1], block_size, chunk, bits)
    inputs = [t.data_ptr() for t in tensors]
    status = lib.qada_key_copy_block_lse(*inputs, *sizes, out.data_ptr(), total.data_ptr())
    _check(status, f"q {tuple(q.shape)}, chunk {chunk}")
    return out, total


def select_tables(
    block_lse: Tensor,
    total_lse: Tensor,
    lengths: Tensor,
    tables: Tensor,
    window: tuple[int, int],
    budget: float,
    top_k: int,
    block_size: int,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """`page_select.select_blocks` then `selected_tables` in one loop, for N pairs of one KV head
    each with per-block log-masses block_lse [N, G, nb] and totals total_lse [N, G]: the virtual
    block tables [N, nb] int32 of `tables` [N, >= nb] int32, their lengths [N] int32 and the kept
    block counts [N] int64. None where the kernel is unavailable or the tensors not on the CPU."""
    pairs, group, num_blocks = block_lse.shape
    if not supports(1, group) or not _on_cpu(block_lse, tables) or tables.dtype != torch.int32:
        return None
    if (lib := library()) is None:
        return None
    block_lse, total_lse = block_lse.float().contiguous(), total_lse.float().contiguous()
    lengths, tables = lengths.long().contiguous(), tables.contiguous()
    out = torch.empty(pairs, num_blocks, dtype=torch.int32)
    out_lengths, kept = torch.empty(pairs, dtype=torch.int32), torch.empty(pairs, dtype=torch.long)
    inputs = [t.data_ptr() for t in (block_lse, total_lse, lengths, tables)]
    sizes = (tables.shape[1], pairs, group, num_blocks, block_size, *window)
    outputs = (out.data_ptr(), out_lengths.data_ptr(), kept.data_ptr())
    status = lib.qada_select_blocks(*inputs, *sizes, budget, top_k, *outputs)
    _check(status, f"block_lse {tuple(block_lse.shape)}")
    return out, out_lengths, kept


def refresh(
    keys: Tensor, chunk_ids: Tensor, counts: Tensor, chunk: int, stats: Tensor, codes: Tensor | None
) -> bool:
    """The summaries (and codes) of the written chunks recomputed in place from keys, the cache as
    [num_blocks, Hkv, bs, D] (`KVLayout.keys_by_head`), as `page_summaries` computes them.
    False (nothing done) where the kernel is unavailable, the cache is not fp32 on the CPU or the
    shapes do not fit."""
    _, num_kv_heads, block_size, head_dim = keys.shape
    fits = supports(head_dim, 1) and chunk <= 1024 and keys.dtype == torch.float32 and stats.is_contiguous()
    tensors = (keys, chunk_ids, stats) if codes is None else (keys, chunk_ids, stats, codes)
    if not fits or not _on_cpu(*tensors) or (codes is not None and not codes.is_contiguous()):
        return False
    if (lib := library()) is None:
        return False
    ids, counts = chunk_ids.long().contiguous(), counts.long().contiguous()
    bits = 0 if codes is None else codes.shape[2] * 8 // head_dim
    sizes = (len(ids), num_kv_heads, head_dim, block_size, chunk, stats.shape[1], bits)
    pointers = (stats.data_ptr(), 0 if codes is None else codes.data_ptr())
    status = lib.qada_refresh_summaries(
        keys.data_ptr(), *keys.stride(), ids.data_ptr(), counts.data_ptr(), *sizes, *pointers
    )
    _check(status, f"keys {tuple(keys.shape)}, chunk {chunk}")
    return True
