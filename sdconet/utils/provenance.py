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
import hashlib
import importlib.metadata
import json
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


# what decides a training run's numbers: the network, criterion, data pipeline, trainer, the ops they call and the
# config system with its presets (dataclass defaults are part of every resolved config)
TRAINING_CODE = ("sdconet/models", "sdconet/losses", "sdconet/data", "sdconet/engine", "sdconet/ops",
                 "sdconet/configs", "sdconet/config.py")


def code_hash(paths: Sequence[str] = TRAINING_CODE, root: Path = _REPO_ROOT) -> str:
    """sha256 over the ``.py`` / ``.yaml`` files under ``paths`` (relative to ``root``), path and content, in sorted
    order: the working tree as it is, so uncommitted edits count and commits that touch none of them do not."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for rel in paths:
        target = root / rel
        if not target.exists():
            raise FileNotFoundError(f"code_hash: {target} does not exist")
        files += [target] if target.is_file() else [f for f in target.rglob("*") if f.suffix in (".py", ".yaml")]
    for path in sorted(set(files)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a resolved config (``sdconet.config.config_to_dict``) as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def utc_now() -> str:
    """ISO 8601 UTC timestamp, seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
        "created": utc_now(),
        "versions": package_versions(),
        "cpu": {"model": cpu_model_name(), "isa": [f for f in ISA_FLAGS if f in flags],
                "kernel_path": _loaded_kernels[-1] if _loaded_kernels else None},
    }
    record.update(extra)
    return record


__all__ = ["ISA_FLAGS", "TRAINING_CODE", "code_hash", "config_hash", "git_state", "package_versions", "provenance",
           "record_kernel", "utc_now"]
