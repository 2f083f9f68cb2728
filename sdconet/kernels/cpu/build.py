"""Build the fused MSDA CPU kernel (an OpenVINO extension library) with the system compiler.

    python -m sdconet.kernels.cpu [--force] [--verbose]     # what `make setup` runs

Needs cmake >= 3.16, a C++17 compiler (g++ or clang++) and the ``openvino`` wheel (its ``include/`` and ``cmake/``
folders are the SDK). The library goes to ``sdconet/kernels/cpu/build/<key>/`` (git-ignored; ``SDCONET_KERNEL_BUILD_DIR``
overrides the parent folder), keyed by a hash of the sources, the OpenVINO version and the compiler, so that a
source edit or an OpenVINO upgrade rebuilds and an unchanged tree reuses the cached build. Concurrent callers (test
workers, several processes) serialise on a file lock. :func:`extension_path` builds lazily at first use.

A build runs in a temporary folder inside the key folder; the finished library is renamed into place atomically and
then its SHA-256 is written next to it (``libsdconet_msda_ov.so.sha256``). Only a library whose bytes match that
record is used, so a truncated ``.so`` from a killed link (or one edited since) is rebuilt, never loaded. Every failure
to build, including an unwritable build folder (``OSError``), is a :class:`KernelBuildError`, on which every caller
falls back to the pure ONNX path with a warning.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sdconet.utils.logging import get_logger

_LOG = get_logger(__name__)
SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("CMakeLists.txt", "msda_cpu.hpp", "msda_kernel.cpp", "openvino_extension.cpp")
LIBRARY_NAME = "libsdconet_msda_ov.so"
DIGEST_SUFFIX = ".sha256"  # the record of a completed build, written after the library is in place
_TMP_PREFIX = ".build-"


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trusted_library(library: Path) -> bool:
    """The library exists, is an ELF file and matches the digest its completed build recorded."""
    record = library.with_name(library.name + DIGEST_SUFFIX)
    try:
        with open(library, "rb") as handle:
            if handle.read(4) != b"\x7fELF":
                return False
        return record.read_text().strip() == _sha256(library)
    except OSError:
        return False


def _publish(built: Path, library: Path) -> None:
    """Rename ``built`` over ``library`` (same folder tree: atomic), then record its digest (atomically too)."""
    digest = _sha256(built)
    with open(built, "rb") as handle:
        os.fsync(handle.fileno())
    record = library.with_name(library.name + DIGEST_SUFFIX)
    record.unlink(missing_ok=True)  # a crash between the two renames leaves a library without record: rebuilt
    os.replace(built, library)
    tmp_record = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    tmp_record.write_text(digest + "\n")
    os.replace(tmp_record, record)


def _build(target: Path, library: Path, cmake: str, cmake_dir: Path, compiler: str, verbose: bool) -> None:
    """Configure and build in a fresh temporary folder under ``target`` (caller holds the lock), then publish."""
    for stale in target.glob(_TMP_PREFIX + "*"):  # folders of builds that were killed (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=target))
    log = target / "build.log"
    try:
        commands = [
            [cmake, "-S", str(SOURCE_DIR), "-B", str(work), f"-DOpenVINO_DIR={cmake_dir}",
             f"-DTBB_DIR={cmake_dir}", f"-DCMAKE_CXX_COMPILER={compiler}", "-DCMAKE_BUILD_TYPE=Release"],
            [cmake, "--build", str(work), "--parallel", str(min(4, os.cpu_count() or 1))],
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
        built = work / LIBRARY_NAME
        if not built.is_file():
            raise KernelBuildError(f"the build finished but {built} is missing; see {log}")
        _publish(built, library)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_extension(force: bool = False, verbose: bool = False) -> Path:
    """Configure and build the extension if its cached build is missing, stale or not trusted; returns the library
    path. Raises :class:`KernelBuildError` for anything that prevents a trusted library (tools, compile errors, an
    unwritable build folder)."""
    cmake = shutil.which("cmake")
    if not cmake:
        raise KernelBuildError("cmake not found on PATH: install cmake >= 3.16 to build the fused MSDA CPU kernel")
    cmake_dir, ov_version = _openvino_sdk()
    compiler = _compiler()
    target = build_dir() / _build_key(ov_version, compiler)
    library = target / LIBRARY_NAME
    if not force and trusted_library(library):
        return library  # no lock needed to read a published build (e.g. a read-only install)
    try:
        target.mkdir(parents=True, exist_ok=True)
        with open(target / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
            if force or not trusted_library(library):  # it may have finished while we waited
                if library.exists():
                    log_reason = "rebuilding" if force else "not trusted (no matching build record: a killed " \
                                                            "link or an edited file), rebuilding"
                    _LOG.warning("fused MSDA CPU kernel %s: %s", library, log_reason)
                _build(target, library, cmake, cmake_dir, compiler, verbose)
    except OSError as err:
        raise KernelBuildError(f"cannot build the fused MSDA CPU kernel in {target} ({err}); point "
                               f"SDCONET_KERNEL_BUILD_DIR at a writable folder or run `make setup` where the "
                               f"package is writable") from err
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
