"""U-Net super-resolution decoder over the shared encoder (training only; never part of the inference graph).

Stages, deepest first (widths ``embed_dim``, ``embed_dim/2``, ``embed_dim/4``, ``embed_dim/4`` unless
``model.sr_decoder.stage_widths`` names them)::

    s32 encoder map --up--> s16 (+ s16 skip) -> Swin stage
                    --up--> s8  (+ s8 skip)  -> Swin stage
                    --up--> s4  (+ s4 skip)  -> Swin stage
                                (+ patch-embedding tokens, the long skip) -> Swin stage
                    --up x patch size--> LR resolution -> conv -> PixelShuffle(upscale) -> conv -> RGB at HR size

"up" is LayerNorm + ConvTranspose (kernel = stride); skips are projected to the stage width by a linear layer and
added. Up-sampled maps are cropped to the skip's size, so odd map sizes (any input size) work.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformerStage

from sdconet.config import SRDecoderConfig
from sdconet.models.encoder import NUM_STAGES, use_padded_shift_blocks


class Upsample(nn.Module):
    """LayerNorm + ConvTranspose2d(k=s=factor): ``[B, H, W, C_in]`` -> ``[B, H', W', C_out]`` (NHWC), cropped to
    ``size`` = (H', W') <= factor * (H, W)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.proj = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=factor, stride=factor)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = self.proj(self.norm(x).permute(0, 3, 1, 2))
        return x[:, :, :size[0], :size[1]].permute(0, 2, 3, 1)


class SRDecoder(nn.Module):
    """Encoder maps + patch tokens -> normalised-space SR image.

    Args:
        encoder_channels: widths of the encoder maps at strides 4/8/16/32.
        patch_channels: width of the patch-embedding tokens (stride ``patch_size``).
        patch_size: the encoder's patch size (stride of its finest map).
        cfg: decoder widths/depths/heads/window.
        upscale: HR / LR scale of the output.

    ``forward(features, patch_tokens, lr_size)``: ``features`` 4 x ``[B, C_i, H_i, W_i]`` (NCHW, strides 4..32),
    ``patch_tokens`` ``[B, patch_channels, H_0, W_0]``, ``lr_size`` = (h, w) of the unpadded LR input ->
    ``[B, 3, upscale * h, upscale * w]``.
    """

    def __init__(self, encoder_channels: Sequence[int], patch_channels: int, patch_size: int, cfg: SRDecoderConfig,
                 upscale: int):
        super().__init__()
        if len(encoder_channels) != NUM_STAGES or len(cfg.depths) != NUM_STAGES or len(cfg.num_heads) != NUM_STAGES:
            raise ValueError(f"SR decoder needs {NUM_STAGES} encoder maps, model.sr_decoder.depths and num_heads "
                             f"entries; got {list(encoder_channels)}, {list(cfg.depths)}, {list(cfg.num_heads)}")
        if cfg.stage_widths is not None:
            if len(cfg.stage_widths) != NUM_STAGES or min(cfg.stage_widths) < 1:
                raise ValueError(f"model.sr_decoder.stage_widths needs {NUM_STAGES} positive widths, got "
                                 f"{list(cfg.stage_widths)}")
            widths = list(cfg.stage_widths)
        elif cfg.embed_dim % 4:
            raise ValueError(f"model.sr_decoder.embed_dim={cfg.embed_dim} must be divisible by 4 (stage widths "
                             "embed_dim, /2, /4, /4)")
        else:
            widths = [cfg.embed_dim, cfg.embed_dim // 2, cfg.embed_dim // 4, cfg.embed_dim // 4]
        if cfg.mlp_ratio <= 0:
            raise ValueError(f"model.sr_decoder.mlp_ratio must be > 0, got {cfg.mlp_ratio}")
        for index, (width, heads) in enumerate(zip(widths, cfg.num_heads)):
            if width % heads:
                raise ValueError(f"model.sr_decoder.num_heads[{index}]={heads} does not divide stage width {width}")
        if upscale < 1:
            raise ValueError(f"model.upscale must be >= 1, got {upscale}")
        skip_channels = [encoder_channels[2], encoder_channels[1], encoder_channels[0], patch_channels]
        in_widths = [encoder_channels[3], widths[0], widths[1], None]  # the long-skip stage has no up-sampling

        self.upsamples = nn.ModuleList(Upsample(c_in, c_out, 2) for c_in, c_out in zip(in_widths[:3], widths[:3]))
        self.skip_projs = nn.ModuleList(nn.Linear(c_skip, width) for c_skip, width in zip(skip_channels, widths))
        # the long-skip stage has no up-sampling to change the width: a linear map when its width differs (only
        # built then, so the default decoder's parameters are unchanged)
        self.long_skip_in = nn.Linear(widths[2], widths[3]) if widths[2] != widths[3] else None
        # window/shift are fixed (always_partition) and masks built per input, so the nominal resolution is unused
        self.stages = nn.ModuleList(
            SwinTransformerStage(dim=width, out_dim=width, input_resolution=(cfg.window_size, cfg.window_size),
                                 depth=depth, downsample=False, num_heads=heads, window_size=cfg.window_size,
                                 mlp_ratio=cfg.mlp_ratio, always_partition=True, dynamic_mask=True)
            for width, depth, heads in zip(widths, cfg.depths, cfg.num_heads))
        use_padded_shift_blocks(self.stages, cfg.window_size)
        self.to_lr = Upsample(widths[-1], widths[-1], patch_size)
        self.head = nn.Sequential(
            nn.Conv2d(widths[-1], widths[-1] * upscale ** 2, 3, padding=1),
            nn.PixelShuffle(upscale),
            nn.Conv2d(widths[-1], 3, 3, padding=1),
        )
        self.upscale = upscale
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[torch.Tensor], patch_tokens: torch.Tensor,
                lr_size: Sequence[int]) -> torch.Tensor:
        skips = [features[2], features[1], features[0], patch_tokens]
        x = features[3].permute(0, 2, 3, 1)  # NHWC for the Swin stages
        for index, (skip, skip_proj, stage) in enumerate(zip(skips, self.skip_projs, self.stages)):
            skip = skip.permute(0, 2, 3, 1)
            if index < len(self.upsamples):
                x = self.upsamples[index](x, skip.shape[1:3])
            elif self.long_skip_in is not None:
                x = self.long_skip_in(x)
            x = stage(x + skip_proj(skip))
        x = self.to_lr(x, lr_size).permute(0, 3, 1, 2)  # [B, C, h, w]
        return self.head(x)
