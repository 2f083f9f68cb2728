"""What the host CPU can do, read once from ``/proc/cpuinfo``: the one place runtimes, the trainer and the quantizers
ask whether reduced precision has hardware behind it.

Without native bf16 (AMX-BF16 or AVX512-BF16) every bf16 matmul is emulated and far slower than fp32 (measured on
this project's AVX2-only AMD EPYC: torch 2048³ matmul fp32 69 GFLOP/s, bf16 did not finish 7 calls in minutes), so
bf16 paths refuse or fall back on such CPUs instead of silently running slower. Without an int8 dot-product unit
(AVX512-VNNI, AVX-VNNI, AMX-INT8) int8 kernels run on plain AVX2 with 7-bit weights.
"""
from __future__ import annotations

import functools
import os
import platform

CPUINFO = "/proc/cpuinfo"
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=8)
def cpu_flags(cpuinfo: str | os.PathLike = CPUINFO) -> frozenset[str]:
    """The ``flags`` of the first CPU in ``cpuinfo`` (empty when unreadable, e.g. not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model_name(cpuinfo: str | os.PathLike = CPUINFO) -> str:
    """``model name`` from ``cpuinfo``, else what :mod:`platform` knows."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_amx_bf16(cpuinfo: str | os.PathLike = CPUINFO) -> bool:
    return "amx_bf16" in cpu_flags(cpuinfo)


def has_native_bf16(cpuinfo: str | os.PathLike = CPUINFO) -> bool:
    """AMX-BF16 or AVX512-BF16: bf16 matmuls run in hardware."""
    return any(flag in cpu_flags(cpuinfo) for flag in NATIVE_BF16_FLAGS)


def has_int8_dot(cpuinfo: str | os.PathLike = CPUINFO) -> bool:
    """AVX512-VNNI, AVX-VNNI or AMX-INT8: an int8 dot-product unit."""
    return any(flag in cpu_flags(cpuinfo) for flag in INT8_DOT_FLAGS)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (a container's cpuset or ``taskset`` can
    allow far fewer than the host's ``os.cpu_count()``), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def threads_per_process(processes: int) -> int:
    """Intra-op threads for each of ``processes`` processes sharing :func:`usable_cpus` (at least 1)."""
    return max(1, usable_cpus() // processes)
