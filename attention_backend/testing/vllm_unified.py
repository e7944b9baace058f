"""vLLM's own Triton decode kernel (`unified_attention`, what `TritonAttentionBackend` runs) as a
full-attention reference on a machine without vLLM.

The kernel's two source files are copied from a vLLM install into a directory (never committed,
see `make vllm-kernel`) and loaded here, unmodified, with the five names they import from the
rest of vLLM stood in for: `envs.VLLM_BATCH_INVARIANT` (off), `init_logger`, `current_platform`
(fp8 dtype, device capability), `triton_utils` (triton itself) and the `KVQuantMode` enum.
`UnifiedDecode` calls it the way `TritonAttentionImpl.forward` does for a batch of decode rows,
including its 2D/3D (split-softmax) choice.

    python -m attention_backend.testing.vllm_unified --copy-to .vendor/vllm_ops    # from the installed vLLM
    python -m attention_backend.testing.vllm_unified --copy-to .vendor/vllm_ops --from-wheel vllm-0.33.0-*.whl
"""

from __future__ import annotations

import argparse
import enum
import importlib.util
import logging
import shutil
import sys
import types
import zipfile
from pathlib import Path

import torch
import triton
import triton.language as tl

FILES = ("triton_attention_helpers.py", "triton_unified_attention.py")
OPS = "vllm.v1.attention.ops"
MIN_LAUNCH_GRID_SIZE_2D = 128  # vllm/v1/attention/backends/triton_attn.py
NUM_PAR_SOFTMAX_SEGMENTS = 16


class KVQuantMode(enum.IntEnum):  # the members and values the kernel file uses
    NONE = 0
    FP8_PER_TENSOR = 1
    INT8_PER_TOKEN_HEAD = 2
    FP8_PER_TOKEN_HEAD = 3
    INT4_PER_TOKEN_HEAD = 4


class _Logger(logging.LoggerAdapter):
    """vLLM's logger has *_once variants."""

    def debug_once(self, msg, *args, **kwargs):
        self.debug(msg, *args)

    def info_once(self, msg, *args, **kwargs):
        self.info(msg, *args)

    def warning_once(self, msg, *args, **kwargs):
        self.warning(msg, *args)


class _Platform:
    @staticmethod
    def fp8_dtype() -> torch.dtype:
        return torch.float8_e4m3fn

    @staticmethod
    def is_device_capability_family(major: int) -> bool:
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] * 10 == major


def _stand_ins() -> dict[str, types.ModuleType]:
    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    packages = ("vllm", "vllm.v1", "vllm.v1.attention", OPS)  # empty parents, no vLLM import
    return {
        **{name: module(name, __path__=[]) for name in packages},
        "vllm.envs": module("vllm.envs", VLLM_BATCH_INVARIANT=False),
        "vllm.logger": module("vllm.logger", init_logger=lambda name: _Logger(logging.getLogger(name), {})),
        "vllm.platforms": module("vllm.platforms", current_platform=_Platform()),
        "vllm.triton_utils": module("vllm.triton_utils", tl=tl, triton=triton),
        "vllm.v1.kv_cache_interface": module("vllm.v1.kv_cache_interface", KVQuantMode=KVQuantMode),
    }


def load(ops_dir: Path) -> types.ModuleType:
    """The kernel module from `ops_dir`, imported against the stand-ins. sys.modules is restored
    afterwards, so an installed vLLM in this process is not disturbed."""
    missing = [f for f in FILES if not (Path(ops_dir) / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{ops_dir} lacks {missing}: run `make vllm-kernel` where vLLM is installed")

    def is_vllm(name: str) -> bool:
        return name == "vllm" or name.startswith("vllm.")

    saved = {name: mod for name, mod in sys.modules.items() if is_vllm(name)}
    try:
        for name in saved:
            del sys.modules[name]
        sys.modules.update(_stand_ins())
        modules = {}
        for file in FILES:
            name = f"{OPS}.{file[:-3]}"
            spec = importlib.util.spec_from_file_location(name, Path(ops_dir) / file)
            modules[file] = importlib.util.module_from_spec(spec)
            sys.modules[name] = modules[file]
            spec.loader.exec_module(modules[file])
        return modules[FILES[-1]]
    finally:
        for name in [name for name in sys.modules if is_vllm(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


class UnifiedDecode:
    """vLLM's decode call for fixed shapes: its split-softmax scratch sized as its metadata
    builder sizes it (threshold 128 // Hkv rows, 16 segments), allocated once."""

    def __init__(
        self,
        kernel_module: types.ModuleType,
        batch: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
    ) -> None:
        self.kernel = kernel_module.unified_attention
        self.threshold = MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads
        rows = self.threshold
        f32 = dict(dtype=torch.float32, device=device)
        padded = triton.next_power_of_2(head_dim)
        self.segm_output = torch.empty(rows, num_heads, NUM_PAR_SOFTMAX_SEGMENTS, padded, **f32)
        self.segm_max = torch.empty(rows, num_heads, NUM_PAR_SOFTMAX_SEGMENTS, **f32)
        self.segm_expsum = torch.empty(rows, num_heads, NUM_PAR_SOFTMAX_SEGMENTS, **f32)
        self.cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.descale = torch.ones(batch, num_kv_heads, **f32)  # unused without fp8 (as in vLLM)
        self.uses_3d = batch <= self.threshold

    def __call__(
        self,
        query,
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        max_seq_len: int,
        scale: float,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """query [B, Hq, D], caches [num_blocks, block_size, Hkv, D]; one new token per row."""
        self.kernel(
            q=query,
            k=key_cache,
            v=value_cache,
            out=out,
            cu_seqlens_q=self.cu_seqlens_q,
            max_seqlen_q=1,
            seqused_k=seq_lens,
            max_seqlen_k=max_seq_len,
            softmax_scale=scale,
            causal=True,
            window_size=(-1, -1),
            block_table=block_table,
            softcap=0,
            q_descale=None,
            k_descale=self.descale,
            v_descale=self.descale,
            seq_threshold_3D=self.threshold,
            num_par_softmax_segments=NUM_PAR_SOFTMAX_SEGMENTS,
            softmax_segm_output=self.segm_output,
            softmax_segm_max=self.segm_max,
            softmax_segm_expsum=self.segm_expsum,
        )
        return out


def installed_ops_dir() -> Path:
    """The kernel's directory in this machine's vLLM install (found without importing vLLM)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no vLLM installed here to take the kernel from")
    return Path(spec.submodule_search_locations[0]) / "v1" / "attention" / "ops"


def copy_kernel(dest: Path, wheel: Path | None = None) -> None:
    """The two files from this machine's vLLM, or from a vLLM wheel (e.g. the GPU build:
    `pip download --no-deps vllm==0.33.0`)."""
    dest.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        src = installed_ops_dir()
        for file in FILES:
            shutil.copy2(src / file, dest / file)
    else:
        src = wheel
        with zipfile.ZipFile(wheel) as zf:
            for file in FILES:
                (dest / file).write_bytes(zf.read(f"vllm/v1/attention/ops/{file}"))
    print(f"copied {', '.join(FILES)} from {src} to {dest}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copy-to", type=Path, required=True)
    parser.add_argument("--from-wheel", type=Path, help="a vLLM wheel (default: the installed vLLM)")
    args = parser.parse_args()
    copy_kernel(args.copy_to, args.from_wheel)
