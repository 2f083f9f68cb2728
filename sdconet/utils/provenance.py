"""Where a figure came from: one ``provenance`` object for every JSON under ``benchmarks/results/``.

``{"command", "commit", "dirty", "created", "versions", "cpu": {"model", "isa", "kernel_path"}}`` — the command line
that produced the file, the git commit and whether the tree had uncommitted changes, an ISO 8601 UTC timestamp, the
versions of the libraries that set the numbers, and the CPU (model name, the SIMD/matrix ISA flags that decide which
kernels ran, and the fused CPU MSDA kernel this process loaded, if any).

The kernel path is recorded by :mod:`sdconet.kernels.cpu.build` when it hands out the library (``record_kernel``),
so this module stays at the bottom layer and reports the kernel that actually ran rather than one that might.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from sdconet.utils.cpu import cpu_flags, cpu_model_name

# the flags that decide which kernels run (oneDNN / ORT / OpenVINO / our fused op)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8")
VERSION_PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "openvino", "nncf", "nvidia-pytriton", "tritonclient",
                    "rasterio", "sahi", "pycocotools")
_REPO_ROOT = Path(__file__).resolve().parents[2]
_loaded_kernels: list[str] = []


def record_kernel(path: str | Path) -> None:
    """Note that this process loaded the fused CPU kernel at ``path`` (called by the kernel's loader)."""
    path = str(path)
    if path not in _loaded_kernels:
        _loaded_kernels.append(path)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the source tree this package runs from; (None, None) outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def package_versions(packages: Sequence[str] = VERSION_PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (None where a package is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(command: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance object of a results file. ``command`` defaults to this process's command line."""
    commit, dirty = git_state()
    flags = cpu_flags()
    record = {
        "command": list(command) if command is not None else [Path(sys.executable).name, *sys.argv],
        "commit": commit,
        "dirty": dirty,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "cpu": {"model": cpu_model_name(), "isa": [f for f in ISA_FLAGS if f in flags],
                "kernel_path": _loaded_kernels[-1] if _loaded_kernels else None},
    }
    record.update(extra)
    return record


__all__ = ["ISA_FLAGS", "git_state", "package_versions", "provenance", "record_kernel"]
