"""Image file IO through Pillow, with a decompression-bomb guard and errors that name the file.

The pixel limit is checked from the file header, before any pixel is decoded, so a crafted 100k x 100k PNG costs
nothing; Pillow's own fixed guard is replaced by this configurable one while a file is open.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdconet.data.validation import DataError

DEFAULT_MAX_IMAGE_PIXELS = 2**29  # ~537 Mpx: admits DOTA's 20000 x 20000 scenes, refuses bombs
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@contextlib.contextmanager
def _open_image(path: str | Path, max_pixels: int) -> Iterator[Image.Image]:
    """Open (header only), enforce the pixel limit, raise DataError naming ``path`` on any failure."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # at open, the check below is the one guard (one message, one limit)
        try:
            image = Image.open(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{path}: not a readable image ({err})") from err
        Image.MAX_IMAGE_PIXELS = max_pixels  # decoders that re-check (e.g. TIFF tiles) follow the same limit
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise DataError(f"{path}: {width}x{height} = {width * height} pixels exceeds the limit of "
                                f"{max_pixels} (decompression-bomb guard); raise data.max_image_pixels / "
                                f"--max-pixels if this image is genuine")
            yield image
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels."""
    with _open_image(path, max_pixels) as image:
        return image.size


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to ``[H, W, 3]`` uint8 RGB (grey, palette and alpha images are converted)."""
    with _open_image(path, max_pixels) as image:
        try:
            image.load()
            return np.array(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt pixel data
            raise DataError(f"{path}: corrupt or truncated image data ({err})") from err


def save_image(array: np.ndarray, path: str | Path) -> Path:
    """Write an ``[H, W, 3]`` uint8 array; the format follows the suffix (PNG: lossless, fast compression)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"compress_level": 1} if path.suffix.lower() == ".png" else {}
    Image.fromarray(array).save(path, **options)
    return path


def find_image(directory: Path, stem: str) -> Path | None:
    """The image file called ``stem`` with any known extension (either case) in ``directory``, if present."""
    for ext in IMAGE_EXTENSIONS:
        for candidate in (directory / f"{stem}{ext}", directory / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None
