"""Sine positional encodings: 2-d maps for the encoder tokens and box embeddings for the decoder queries."""
from __future__ import annotations

import math

import torch
from torch import nn


def sine_embedding(values: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """Transformer-style sine/cosine features of scalars.

    ``values [...]`` (already scaled, e.g. by 2*pi) -> ``[..., num_feats]`` with interleaved (sin, cos) pairs.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=values.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = values.float()[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionEncoding(nn.Module):
    """DETR sine encoding of a feature map, normalised to the valid (unpadded) area of each image.

    ``mask [B, H, W]`` bool (True = padding) -> ``[B, 2 * num_feats, H, W]`` (y features first, then x).
    """

    def __init__(self, num_feats: int = 128, temperature: float = 20.0, scale: float = 2 * math.pi,
                 eps: float = 1e-6) -> None:
        super().__init__()
        if num_feats % 2:
            raise ValueError(f"num_feats must be even (sin/cos pairs), got {num_feats}")
        self.num_feats = num_feats
        self.temperature = temperature
        self.scale = scale
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = (~mask).float()
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        # token centres (hence -0.5), normalised by the valid extent of each row/column
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + self.eps) * self.scale
        pos_y = sine_embedding(y_embed, self.num_feats, self.temperature)
        pos_x = sine_embedding(x_embed, self.num_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DINO query positional features: ``boxes [..., 4]`` normalised cxcywh -> ``[..., 4 * num_feats]``."""
    return sine_embedding(boxes * (2 * math.pi), num_feats, temperature).flatten(-2)
