"""What a benchmark ran on: the CPU model, its core count and widest vector unit, for results
files. Speeds differ by 2x between the machines these runs get (stock vLLM's 7k x 1 decode:
10 to 22 tok/s), so only numbers from one run compare."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    """E.g. 'AMD EPYC, 2 CPUs, avx512f'; the architecture alone where /proc/cpuinfo is absent."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return platform.machine()
    fields = {}
    for line in info.read_text().splitlines():  # one block per CPU, alike: the last one stays
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    vector = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no avx")
    return f"{fields.get('model name', platform.machine())}, {os.cpu_count()} CPUs, {vector}"
