"""What a benchmark figure depends on: the CPU model and its vector extensions, printed beside every figure."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """Return the CPU model with its widest vector extensions (AVX-512 or AVX2, and BF16 / VNNI where present)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.processor())
    flags = cpu_flags()
    extras = [label for flag, label in (("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI")) if flag in flags]
    return f"{name}, {'AVX-512' if 'avx512f' in flags else 'AVX2'}{''.join(' ' + e for e in extras)}"


def cpu_flags() -> set[str]:
    """Return the CPU's feature flags (/proc/cpuinfo; empty where it does not exist)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return set(next((ln for ln in info.splitlines() if ln.startswith("flags")), "").split())
