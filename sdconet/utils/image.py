"""Image normalisation: the one place that knows the mean/std the network expects.

The model takes images in [0, 1] RGB and normalises internally, so exported graphs take [0, 1] input too.
The SR branch predicts in normalised space; use ``denormalize`` before PSNR/SSIM or saving.
"""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> ImageNet-normalised."""
    mean, std = _stats(x)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` (no clamping)."""
    mean, std = _stats(x)
    return x * std + mean
