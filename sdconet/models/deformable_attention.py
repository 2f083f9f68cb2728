"""Multi-scale deformable attention module (Deformable DETR) on top of the ``sdconet.ops.msda`` core."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from sdconet.ops.msda import multi_scale_deformable_attn, spatial_shapes_as_ints
from sdconet.utils.constants import constant_tensor


class MSDeformAttn(nn.Module):
    """Each query attends to ``num_points`` sampled locations per head and level around its reference.

    ``query [B, Lq, d]``; ``reference_points [B, Lq, L, 2]`` (normalised x, y; encoder) or ``[B, Lq, L, 4]``
    (normalised cx, cy, w, h; decoder: offsets scale with the box); ``value [B, S, d]`` with
    ``value_padding_mask [B, S]`` (True = padding, zeroed after projection) -> ``[B, Lq, d]``.
    ``spatial_shapes`` are Python ``(H, W)`` pairs so that every shape stays a constant in traced graphs.
    """

    def __init__(self, d_model: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4,
                 impl: str = "auto") -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR init: offsets start on a ring of directions (one per head), growing with the point index."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack((thetas.cos(), thetas.sin()), dim=-1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]], level_start_index: torch.Tensor,
                value_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, num_queries, _ = query.shape
        num_tokens = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, num_tokens, heads, self.d_model // heads)

        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level
            # [L, 2] (x, y), cached per shape: no host->device copy per layer and forward
            normalizer = constant_tensor(tuple((w, h) for h, w in spatial_shapes_as_ints(spatial_shapes)),
                                         query.dtype, query.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are fractions of the reference box half-size
            centers = reference_points[:, :, None, :, None, :2]
            half_sizes = reference_points[:, :, None, :, None, 2:] * 0.5
            locations = centers + offsets / points * half_sizes
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")

        out = multi_scale_deformable_attn(value, spatial_shapes, level_start_index, locations, weights,
                                          impl=self.impl)
        return self.output_proj(out)
