"""HR -> LR degradation: the one function that makes every network input (training, prediction, calibration).

``bicubic`` (default, DESIGN §2) is exactly ``F.interpolate(hr, scale_factor=1/scale, mode="bicubic",
align_corners=False)``; it is not clamped, so bicubic overshoot can leave values slightly outside [0, 1] (the paper's
formula, kept bit-exact). ``realistic`` = Gaussian blur at HR -> the same bicubic downsampling -> additive Gaussian
noise -> JPEG round trip; its output is 8-bit quantised in [0, 1]. Each image of a batch draws its own blur sigma,
noise level and JPEG quality from ranges, reproducibly from ``seed``.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdconet.config import DataConfig

DEGRADATION_MODES = ("bicubic", "realistic")


@dataclass(frozen=True)
class RealisticDegradation:
    """Ranges of the ``realistic`` mode; each image draws uniformly in [low, high]."""

    blur_sigma: tuple[float, float] = (0.2, 1.5)  # HR pixels
    noise_std: tuple[float, float] = (0.0, 0.03)  # on [0, 1] intensities, added at LR
    jpeg_quality: tuple[int, int] = (40, 95)

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "RealisticDegradation":
        return cls(blur_sigma=cfg.blur_sigma, noise_std=cfg.noise_std, jpeg_quality=cfg.jpeg_quality)


def _check_input(hr: torch.Tensor, scale: int, mode: str) -> None:
    if mode not in DEGRADATION_MODES:
        raise ValueError(f"unknown degradation mode '{mode}' (choose from {', '.join(DEGRADATION_MODES)})")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"degradation scale must be a positive integer, got {scale!r}")
    if hr.dim() not in (3, 4) or hr.shape[-3] != 3:
        raise ValueError(f"degrade expects an RGB image [3, H, W] or batch [B, 3, H, W], got {tuple(hr.shape)}")
    height, width = hr.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"HR size {height}x{width} is not divisible by the scale {scale}; crop it first "
                         f"(sdconet.data.transforms.crop_to_multiple)")


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[1, 3, H, W]`` with edge replication (works at any image size)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    horizontal = kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1)
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=3)
    return F.conv2d(F.pad(image, (0, 0, radius, radius), mode="replicate"), vertical, groups=3)


def _jpeg_round_trip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """``[3, h, w]`` in [0, 1] -> JPEG-compressed and decoded, same shape, 8-bit levels."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).to(image).permute(2, 0, 1) / 255.0


def _uniform(generator: torch.Generator, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand((), generator=generator))


def degrade(hr: torch.Tensor, scale: int = 2, mode: str = "bicubic", seed: Optional[int] = None,
            realistic: Optional[RealisticDegradation] = None) -> torch.Tensor:
    """Make the LR network input from an HR image.

    Args:
        hr: ``[3, H, W]`` or ``[B, 3, H, W]`` float RGB in [0, 1]; H and W divisible by ``scale``.
        scale: downsampling factor (2 in the paper; 4 also supported).
        mode: ``"bicubic"`` (exact DESIGN §2 formula) or ``"realistic"`` (blur, downsample, noise, JPEG).
        seed: RNG seed of the realistic mode's random draws (None: drawn from torch's global RNG).
        realistic: ranges of the realistic mode (defaults of :class:`RealisticDegradation` when None).

    Returns:
        ``[3, H/scale, W/scale]`` or ``[B, 3, H/scale, W/scale]``, same dtype/device as ``hr``.
    """
    _check_input(hr, scale, mode)
    batch = hr if hr.dim() == 4 else hr.unsqueeze(0)
    if mode == "bicubic":
        lr = F.interpolate(batch, scale_factor=1.0 / scale, mode="bicubic", align_corners=False)
        return lr if hr.dim() == 4 else lr.squeeze(0)
    params = realistic or RealisticDegradation()
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for image in batch:
        sigma = _uniform(generator, params.blur_sigma)
        noise_std = _uniform(generator, params.noise_std)
        quality = round(_uniform(generator, (float(params.jpeg_quality[0]), float(params.jpeg_quality[1]))))
        blurred = _gaussian_blur(image.unsqueeze(0), sigma) if sigma > 0 else image.unsqueeze(0)
        lr = F.interpolate(blurred, scale_factor=1.0 / scale, mode="bicubic", align_corners=False)[0]
        noise = torch.randn(lr.shape, generator=generator).to(lr) * noise_std
        outputs.append(_jpeg_round_trip(lr + noise, quality))
    lr = torch.stack(outputs)
    return lr if hr.dim() == 4 else lr.squeeze(0)
