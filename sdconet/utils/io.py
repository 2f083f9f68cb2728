"""Atomic file writes: the one helper every writer of checkpoints, metrics, datasets and scene outputs uses."""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a hidden temporary file next to ``path`` (same suffix, so writers that pick the format from
    it still work), flush it to disk, then rename it over ``path``; a failed write removes the temporary file.

    A reader therefore sees the old file or the new one, never a half-written one, even if the process is killed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync_directory(path: str | Path) -> None:
    """Flush ``path``'s directory entries to disk, so that renames into it survive a power loss (a rename is atomic
    against a killed process without this; it is durable only once the directory itself is synced)."""
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: str | Path, text: str) -> Path:
    """``write_atomically`` for a text file."""
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def save_figure(figure: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib ``figure`` atomically (format from the suffix, e.g. ``.png``) and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=dpi))
    finally:
        plt.close(figure)


def sha256_of(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks (an artifact's identity in reports, manifests and
    resume markers)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
