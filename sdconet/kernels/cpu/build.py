"""Build the fused MSDA CPU kernel (an OpenVINO extension library) with the system compiler.

    python -m sdconet.kernels.cpu [--force] [--verbose]     # what `make setup` runs

Needs cmake >= 3.16, a C++17 compiler (g++ or clang++) and the ``openvino`` wheel (its ``include/`` and ``cmake/``
folders are the SDK). The library goes to ``sdconet/kernels/cpu/build/<key>/`` (git-ignored; ``SDCONET_KERNEL_BUILD_DIR``
overrides the parent folder), keyed by a hash of the sources, the OpenVINO version and the compiler, so that a
source edit or an OpenVINO upgrade rebuilds and an unchanged tree reuses the cached build. Concurrent callers (test
workers, several processes) serialise on a file lock. :func:`extension_path` builds lazily at first use.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("CMakeLists.txt", "msda_cpu.hpp", "msda_kernel.cpp", "openvino_extension.cpp")
LIBRARY_NAME = "libsdconet_msda_ov.so"


class KernelBuildError(RuntimeError):
    """The native kernel cannot be built here; the message says what is missing and how to fix it."""


def _openvino_sdk() -> tuple[Path, str]:
    """(the wheel's cmake/ folder, OpenVINO version)."""
    try:
        import openvino
    except ImportError as err:
        raise KernelBuildError(f"the fused MSDA CPU kernel needs the openvino wheel ({err}); "
                               f"pip install 'sdconet[cpu]'") from err
    cmake_dir = Path(openvino.__file__).resolve().parent / "cmake"
    if not (cmake_dir / "OpenVINOConfig.cmake").is_file():
        raise KernelBuildError(f"the openvino wheel at {cmake_dir.parent} has no cmake/OpenVINOConfig.cmake: "
                               f"cannot build the extension against it")
    return cmake_dir, openvino.get_version()


def _compiler() -> str:
    if os.environ.get("CXX"):
        compiler = shutil.which(os.environ["CXX"])
        if not compiler:
            raise KernelBuildError(f"CXX={os.environ['CXX']} is not an executable on PATH")
        return compiler
    compiler = shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")
    if not compiler:
        raise KernelBuildError("no C++ compiler found (set CXX or install g++): the fused MSDA CPU kernel is built "
                               "from source at setup (make setup) or first use")
    return compiler


def build_dir() -> Path:
    """Folder holding one sub-folder per build key."""
    return Path(os.environ.get("SDCONET_KERNEL_BUILD_DIR", SOURCE_DIR / "build"))


def _build_key(ov_version: str, compiler: str) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(ov_version.encode())
    digest.update(compiler.encode())
    return digest.hexdigest()[:16]


def build_extension(force: bool = False, verbose: bool = False) -> Path:
    """Configure and build the extension if its cached build is missing or stale; returns the library path."""
    cmake = shutil.which("cmake")
    if not cmake:
        raise KernelBuildError("cmake not found on PATH: install cmake >= 3.16 to build the fused MSDA CPU kernel")
    cmake_dir, ov_version = _openvino_sdk()
    compiler = _compiler()
    target = build_dir() / _build_key(ov_version, compiler)
    library = target / LIBRARY_NAME
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if library.is_file() and not force:
            return library
        log = target / "build.log"
        commands = [
            [cmake, "-S", str(SOURCE_DIR), "-B", str(target), f"-DOpenVINO_DIR={cmake_dir}",
             f"-DTBB_DIR={cmake_dir}", f"-DCMAKE_CXX_COMPILER={compiler}", "-DCMAKE_BUILD_TYPE=Release"],
            [cmake, "--build", str(target), "--parallel", str(min(4, os.cpu_count() or 1))],
        ]
        with open(log, "w") as out:
            for command in commands:
                out.write("$ " + " ".join(command) + "\n")
                out.flush()
                result = subprocess.run(command, stdout=None if verbose else out, stderr=subprocess.STDOUT
                                        if not verbose else None, check=False)
                if result.returncode != 0:
                    tail = "" if verbose else "\n".join(log.read_text().splitlines()[-20:])
                    raise KernelBuildError(f"building the fused MSDA CPU kernel failed (`{' '.join(command)}`, "
                                           f"exit {result.returncode}); full log: {log}\n{tail}")
        if not library.is_file():
            raise KernelBuildError(f"the build finished but {library} is missing; see {log}")
    return library


def extension_path() -> Path:
    """The built library, building it now if needed (lazy first use); recorded in this process's provenance."""
    from sdconet.utils.provenance import record_kernel

    path = build_extension()
    record_kernel(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the fused MSDA CPU kernel (OpenVINO extension).")
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    parser.add_argument("--verbose", action="store_true", help="show the compiler output")
    args = parser.parse_args(argv)
    try:
        library = build_extension(force=args.force, verbose=args.verbose)
    except KernelBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(library)
    return 0


if __name__ == "__main__":
    sys.exit(main())
