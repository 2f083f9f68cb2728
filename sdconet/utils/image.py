"""Image normalisation (the one place that knows the mean/std the network expects) and uint8 resizing.

The model takes images in [0, 1] RGB and normalises internally, so exported graphs take [0, 1] input too.
The SR branch predicts in normalised space; use ``denormalize`` before PSNR/SSIM or saving.
"""
from __future__ import annotations

import numpy as np
import torch

from sdconet.utils.constants import constant_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # cached per dtype/device: no host->device copy per call (CUDA-graph capturable)
    mean = constant_tensor(IMAGENET_MEAN, x.dtype, x.device).view(-1, 1, 1)
    std = constant_tensor(IMAGENET_STD, x.dtype, x.device).view(-1, 1, 1)
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> ImageNet-normalised."""
    mean, std = _stats(x)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` (no clamping)."""
    mean, std = _stats(x)
    return x * std + mean


def resize(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """[H, W, C] uint8 -> [size[0], size[1], C]."""
    height, width = size
    from PIL import Image

    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((width, height), resample))
