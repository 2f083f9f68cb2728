"""Pre- and post-processing shared by the Triton python models and the direct ONNX Runtime reference path.

This module depends on numpy and Pillow only: the repository builder copies it next to the ``preprocess`` and
``postprocess`` ``model.py`` files (as ``sdconet_processing.py``) so a built Triton repository is self-contained and
runs in any Python environment with numpy < 2 and Pillow, without the ``sdconet`` package installed.

Geometry: an image of ``H x W`` pixels is resized (aspect ratio kept, bicubic) to fit ``size x size`` and placed at the
top-left of a zero canvas (padding bottom/right, the DETR convention used in training). ``image_info`` =
``(H, W, scale_y, scale_x)`` with ``scale = resized / original`` per axis, so a box in network-input pixels maps back to
original pixels by dividing by the scales.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable, Optional, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
IMAGE_INFO_FIELDS = ("height", "width", "scale_y", "scale_x")
# the two image inputs of the preprocess and sdconet_scene models: a request carries exactly one of them
ENCODED_INPUT, RAW_INPUT = "IMAGE_BYTES", "IMAGE"

_Tensor = TypeVar("_Tensor")


class InvalidImageError(ValueError):
    """An image a client sent cannot be used; the message says why (it is returned to the client)."""


def image_input(get_input: Callable[[str], Optional[_Tensor]],
                encoded_what: str = "encoded image") -> tuple[str, _Tensor]:
    """The one image input a request carries -> (``ENCODED_INPUT`` or ``RAW_INPUT``, its tensor).

    ``get_input(name)`` returns the request's input tensor or None (in a Triton python model:
    ``lambda name: pb_utils.get_input_tensor_by_name(request, name)``); ``encoded_what`` describes IMAGE_BYTES in the
    error a request with both or neither input gets."""
    encoded, raw = get_input(ENCODED_INPUT), get_input(RAW_INPUT)
    if (encoded is None) == (raw is None):
        raise InvalidImageError(f"send exactly one of the inputs {ENCODED_INPUT} ({encoded_what}) or {RAW_INPUT} "
                                f"([H, W, 3] uint8 RGB)")
    return (ENCODED_INPUT, encoded) if encoded is not None else (RAW_INPUT, raw)


def check_pixel_limit(height: int, width: int, max_pixels: int) -> None:
    """Refuse empty images and images above ``max_pixels`` (decompression-bomb and memory guard)."""
    if height <= 0 or width <= 0:
        raise InvalidImageError(f"image is empty ({height}x{width} pixels)")
    if height * width > max_pixels:
        raise InvalidImageError(f"image of {width}x{height} = {width * height} pixels exceeds the server limit of "
                                f"{max_pixels} pixels; tile or downscale it before sending")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, TIFF, ...) -> ``[H, W, 3]`` uint8 RGB.

    The size is read from the header and checked against ``max_pixels`` before any pixel is decoded.
    """
    if len(data) == 0:
        raise InvalidImageError("image bytes are empty")
    try:
        with warnings.catch_warnings():
            # our own limit below is the guard; Pillow's warning threshold would only add noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise InvalidImageError(f"image refused as a decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise InvalidImageError(f"{len(data)} bytes are not a decodable image (unknown or unsupported format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidImageError(f"{len(data)} bytes are not a decodable image ({err})") from err
    with image:
        width, height = image.size
        check_pixel_limit(height, width, max_pixels)
        try:
            image.load()
            return np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise InvalidImageError(f"corrupt or truncated image data ({err})") from err


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``[H, W, 3]`` uint8 RGB -> (network input ``[3, size, size]`` float32 in [0, 1], ``image_info`` ``[4]``).

    The image is resized (bicubic, aspect ratio kept) so its longer side is ``size``, then padded bottom/right with
    zeros. ``image_info`` = (H, W, scale_y, scale_x), see the module docstring.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InvalidImageError(f"expected an [H, W, 3] uint8 RGB array, got shape {tuple(image.shape)} "
                                f"dtype {image.dtype}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise InvalidImageError(f"image is empty ({height}x{width} pixels)")
    ratio = size / max(height, width)
    new_width, new_height = max(1, round(width * ratio)), max(1, round(height * ratio))
    if (new_height, new_width) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BICUBIC))
    canvas = np.zeros((3, size, size), dtype=np.float32)
    canvas[:, :new_height, :new_width] = image.transpose(2, 0, 1).astype(np.float32) / 255.0
    info = np.array([height, width, new_height / height, new_width / width], dtype=np.float32)
    return canvas, info


def boxes_to_original(boxes: np.ndarray, image_info: np.ndarray) -> np.ndarray:
    """``[K, 4]`` xyxy in network-input pixels -> xyxy in original-image pixels, clipped to the image."""
    height, width, scale_y, scale_x = (float(v) for v in image_info)
    scale = np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)
    limit = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(boxes.astype(np.float32) / scale, 0.0, limit)


def select_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, image_info: np.ndarray,
                      score_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's raw detector output (``[K, 4]`` input-pixel xyxy, ``[K]``, ``[K]``) -> the detections with
    ``score >= score_threshold``, boxes in original pixels, sorted by descending score."""
    keep = np.flatnonzero(scores >= score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return (boxes_to_original(boxes[keep], image_info), scores[keep].astype(np.float32),
            labels[keep].astype(np.int32))
