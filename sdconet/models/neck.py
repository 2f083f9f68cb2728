"""Channel-mapper neck: encoder maps (s8/s16/s32) -> ``num_levels`` maps of ``channels`` for the detector."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdconet.config import NeckConfig

NUM_INPUT_LEVELS = 3  # the encoder's s8, s16 and s32 maps


def downsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Padding mask ``[B, h, w]`` bool (True = padding) -> ``[B, *size]`` by nearest-neighbour sampling."""
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0].bool()


class ChannelMapperNeck(nn.Module):
    """1x1 conv + GroupNorm per input map, then 3x3 stride-2 conv + GroupNorm levels on top of the last input.

    Input: the encoder's ``[B, C_i, H_i, W_i]`` maps at LR strides 8/16/32 (``in_channels`` = their widths).
    Output: ``num_levels`` maps ``[B, channels, H_l, W_l]`` at LR strides 8/16/32/64 (finest first) and, when a
    padding mask ``[B, h, w]`` is given, the matching masks ``[B, H_l, W_l]`` (True = padding).
    """

    def __init__(self, in_channels: Sequence[int], cfg: NeckConfig):
        super().__init__()
        if len(in_channels) != NUM_INPUT_LEVELS:
            raise ValueError(f"ChannelMapperNeck takes {NUM_INPUT_LEVELS} encoder maps, got widths {list(in_channels)}")
        if cfg.num_levels < NUM_INPUT_LEVELS:
            raise ValueError(f"model.neck.num_levels must be >= {NUM_INPUT_LEVELS}, got {cfg.num_levels}")
        if cfg.channels % cfg.num_groups:
            raise ValueError(f"model.neck.channels={cfg.channels} is not divisible by "
                             f"model.neck.num_groups={cfg.num_groups}")

        def conv_gn(in_ch: int, kernel_size: int, stride: int) -> nn.Sequential:
            conv = nn.Conv2d(in_ch, cfg.channels, kernel_size, stride=stride, padding=kernel_size // 2)
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            return nn.Sequential(conv, nn.GroupNorm(cfg.num_groups, cfg.channels))

        self.lateral = nn.ModuleList(conv_gn(ch, 1, 1) for ch in in_channels)
        # the first extra level reads the raw s32 encoder map, later ones the previous extra level
        extra_in = [in_channels[-1]] + [cfg.channels] * (cfg.num_levels - NUM_INPUT_LEVELS - 1)
        self.extra = nn.ModuleList(conv_gn(ch, 3, 2) for ch in extra_in[:cfg.num_levels - NUM_INPUT_LEVELS])
        self.num_levels = cfg.num_levels
        self.channels = cfg.channels

    def forward(self, features: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None
                ) -> tuple[list[torch.Tensor], Optional[list[torch.Tensor]]]:
        """(3 encoder maps, optional ``[B, h, w]`` padding mask) -> (levels, level masks or None)."""
        levels = [layer(feature) for layer, feature in zip(self.lateral, features)]
        x = features[-1]
        for layer in self.extra:
            x = layer(x)
            levels.append(x)
        if mask is None:
            return levels, None
        return levels, [downsample_mask(mask, level.shape[-2:]) for level in levels]
