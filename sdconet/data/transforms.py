"""Geometric augmentations natural for overhead imagery, applied to the HR image and its xyxy boxes together.

Overhead scenes have no canonical "up": horizontal/vertical flips and 90° rotations are label-preserving, and a
random crop changes the framing. All randomness comes from a ``numpy.random.Generator`` the caller seeds, so an
epoch's augmentations are reproducible. Images are ``[3, H, W]`` tensors; boxes ``[n, 4]`` xyxy in pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror left-right."""
    width = image.shape[-1]
    return image.flip(-1), torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)


def vflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror top-bottom."""
    height = image.shape[-2]
    return image.flip(-2), torch.stack((boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]), dim=1)


def rot90(image: torch.Tensor, boxes: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate by ``k`` x 90° counter-clockwise (``torch.rot90`` on the H, W axes); ``[3, H, W]`` -> ``[3, W, H]``
    for odd ``k``. A pixel at (x, y) of a width-W image moves to (y, W - x) per quarter turn."""
    for _ in range(k % 4):
        width = image.shape[-1]
        image = torch.rot90(image, 1, dims=(-2, -1))
        boxes = torch.stack((boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]), dim=1)
    return image, boxes


def clip_boxes_to_window(boxes: torch.Tensor, window: tuple[float, float, float, float],
                         min_area_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip xyxy boxes to ``window`` (x1, y1, x2, y2) and shift them to the window's origin.

    A box is kept when its clipped area is positive and at least ``min_area_fraction`` of its own area.
    Returns (clipped boxes ``[n, 4]`` in window coordinates, keep ``[n]`` bool).
    """
    x1, y1, x2, y2 = window
    clipped = torch.stack((boxes[:, 0].clamp(x1, x2), boxes[:, 1].clamp(y1, y2),
                           boxes[:, 2].clamp(x1, x2), boxes[:, 3].clamp(y1, y2)), dim=1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (kept_area > 0) & (kept_area >= min_area_fraction * area)
    offset = torch.tensor([x1, y1, x1, y1], dtype=boxes.dtype)
    return clipped - offset, keep


def crop(image: torch.Tensor, boxes: torch.Tensor, top: int, left: int, height: int, width: int,
         min_area_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop ``[3, H, W]`` to the window and clip boxes -> (image, kept boxes, keep ``[n]`` bool)."""
    window = (float(left), float(top), float(left + width), float(top + height))
    clipped, keep = clip_boxes_to_window(boxes, window, min_area_fraction)
    return image[:, top:top + height, left:left + width], clipped[keep], keep


def crop_to_multiple(image: torch.Tensor, boxes: torch.Tensor, multiple: int,
                     min_area_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop the bottom/right remainder so H and W are multiples of ``multiple`` (at most ``multiple - 1`` pixels;
    the origin is unchanged, so pixel coordinates keep their meaning) -> (image, kept boxes, keep)."""
    height, width = image.shape[-2:]
    new_height, new_width = height - height % multiple, width - width % multiple
    if (new_height, new_width) == (height, width):
        return image, boxes, torch.ones(len(boxes), dtype=torch.bool)
    if new_height == 0 or new_width == 0:
        raise ValueError(f"image of {height}x{width} px is smaller than the degradation scale {multiple}")
    return crop(image, boxes, 0, 0, new_height, new_width, min_area_fraction)


@dataclass
class RandomGeometry:
    """Random flips, quarter turns and crop for training; each enabled op fires with probability 0.5 (rotation:
    k uniform in 0..3). ``crop_size`` (HR pixels) crops a random window when the image is larger."""

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    crop_size: Optional[int] = None
    min_area_fraction: float = 0.5

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (image, boxes, keep ``[n]`` bool over the input boxes; only the crop drops boxes)."""
        keep = torch.ones(len(boxes), dtype=torch.bool)
        if self.crop_size is not None:
            height, width = image.shape[-2:]
            crop_h, crop_w = min(self.crop_size, height), min(self.crop_size, width)
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            image, boxes, keep = crop(image, boxes, top, left, crop_h, crop_w, self.min_area_fraction)
        if self.hflip and rng.random() < 0.5:
            image, boxes = hflip(image, boxes)
        if self.vflip and rng.random() < 0.5:
            image, boxes = vflip(image, boxes)
        if self.rot90:
            image, boxes = rot90(image, boxes, int(rng.integers(0, 4)))
        return image.contiguous(), boxes, keep
