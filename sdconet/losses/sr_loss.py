"""Super-resolution loss: L1 between the SR output and the normalised HR image, over unpadded pixels only."""
from __future__ import annotations

import torch

from sdconet.utils.image import normalize


def sr_l1_loss(sr_image: torch.Tensor, images_hr: torch.Tensor, masks_hr: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error in normalised space over valid HR pixels and the 3 channels.

    Args:
        sr_image: ``[B, 3, H, W]`` SR prediction in normalised space (the model's ``sr_image``).
        images_hr: ``[B, 3, H, W]`` HR images in [0, 1] (normalised here with ``sdconet.utils.image.normalize``).
        masks_hr: ``[B, H, W]`` bool, True = padding (excluded); None = every pixel is valid.
    Returns:
        scalar loss (0 when no pixel is valid).
    """
    if sr_image.shape != images_hr.shape:
        raise ValueError(f"sr_image has shape {tuple(sr_image.shape)} but images_hr has {tuple(images_hr.shape)}; "
                         "the SR branch must output the HR size")
    error = (sr_image.float() - normalize(images_hr.float())).abs()
    if masks_hr is None:
        return error.mean()
    expected = (sr_image.shape[0], *sr_image.shape[2:])
    if tuple(masks_hr.shape) != expected:
        raise ValueError(f"masks_hr has shape {tuple(masks_hr.shape)}, expected {expected}")
    valid = (~masks_hr.bool()).unsqueeze(1).to(error.dtype)  # [B, 1, H, W]
    return (error * valid).sum() / (valid.sum() * error.shape[1]).clamp(min=1.0)
