"""Compile Triton kernels for an NVIDIA GPU on a machine without one.

Triton's compiler (front end, LLVM, and the `ptxas` its wheel ships) needs no GPU; only the
launch does. `compile_only(arch)` points Triton's active driver at a fixed `GPUTarget` and turns
every `kernel[grid](...)` into a warm-up: the host code around a launch runs unchanged (on CPU
tensors), each launch compiles exactly the specialisation it would run on the device, and
returns without running. This catches what the interpreter cannot: type and layout errors of the
real code generator, tensor-core lowering, register spills.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


@dataclass
class Compiled:
    name: str
    kernel: object  # triton.compiler.CompiledKernel

    @property
    def ptx(self) -> str:
        return self.kernel.asm["ptx"]

    def resources(self) -> dict[str, int]:
        """REG, STACK, SHARED, LOCAL, ... of the cubin, as `cuobjdump -res-usage` prints them."""
        bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / f"{self.name}.cubin"
            cubin.write_bytes(self.kernel.asm["cubin"])
            text = subprocess.run(
                [str(bin_dir / "cuobjdump"), "-res-usage", str(cubin)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        line = text[text.index(f"Function {self.name}:") :].splitlines()[1]
        return {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}


class _Target:
    """The part of Triton's driver interface that compiling (not launching) uses."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


@contextmanager
def compile_only(arch: int = 90) -> Iterator[list[Compiled]]:
    """Within the block, launches compile for sm_`arch` and are collected, not run."""
    compiled: list[Compiled] = []
    touched: set[JITFunction] = set()
    launch = JITFunction.__getitem__

    def warmup_instead(self: JITFunction, grid):
        def go(*args, **kwargs):
            touched.add(self)
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            compiled.append(Compiled(self.fn.__name__, kernel))
            return kernel

        return go

    saved = driver._active
    driver.set_active(_Target(arch))
    JITFunction.__getitem__ = warmup_instead
    try:
        yield compiled
    finally:
        JITFunction.__getitem__ = launch
        driver._active = saved
        for fn in touched:  # no kernel built for a device this process does not have stays cached
            fn.device_caches.clear()
