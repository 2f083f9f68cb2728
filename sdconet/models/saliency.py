"""Multi-scale saliency predictor (Salience DETR's foreground predictor, as used by SDCoNet).

One token scorer is shared by all levels. Levels are scored coarse -> fine; each finer level is first modulated by the
upsampled saliency of the level above it (``m = m + m * up(score_coarser) * alpha_l``), so that coarse evidence of an
object raises the saliency of the fine tokens that cover it.

By default (``model.saliency.modulation: post_norm``) the modulation acts on the LayerNorm-ed tokens (the scorer's
first op). Applied before the LayerNorm (``official``, as in the Salience DETR and SDCoNet code), the per-token factor
``1 + up * alpha`` is divided out again by the normalisation (it only survives as a sign flip where the factor is
negative, and through LayerNorm's epsilon), so alpha gets almost no gradient.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODULATION_MODES = ("post_norm", "official")


class SaliencyTokenHead(nn.Module):
    """Per-token saliency logit from a local half and a global (image-level) half of the hidden features.

    ``tokens [B, N, d]``, ``padding [B, N]`` bool (True = padding), optional ``modulation [B, N, 1]`` (top-down
    factor, applied as ``m + m * modulation`` to the normalised tokens, or to the raw tokens before the LayerNorm
    when ``modulation="official"``) -> logits ``[B, N]``.
    LayerNorm -> Linear(d, h) -> GELU; channels split into local h/2 and global h/2 (global = mean over the valid
    tokens of the level); concat -> MLP h -> h/2 -> h/4 -> 1.
    """

    def __init__(self, in_dim: int = 256, hidden_dim: int = 256, modulation: str = "post_norm") -> None:
        super().__init__()
        if hidden_dim % 4:
            raise ValueError(f"saliency.hidden_dim must be divisible by 4, got {hidden_dim}")
        if modulation not in MODULATION_MODES:
            raise ValueError(f"model.saliency.modulation must be one of {MODULATION_MODES}, got {modulation!r}")
        self.hidden_dim = hidden_dim
        self.modulation = modulation
        self.norm = nn.LayerNorm(in_dim)
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU())
        self.score = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.GELU(),
            nn.Linear(hidden_dim // 2, hidden_dim // 4), nn.GELU(),
            nn.Linear(hidden_dim // 4, 1),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor,
                modulation: torch.Tensor | None = None) -> torch.Tensor:
        if modulation is not None and self.modulation == "official":
            tokens = tokens + tokens * modulation
        tokens = self.norm(tokens)
        if modulation is not None and self.modulation == "post_norm":
            tokens = tokens + tokens * modulation
        hidden = self.embed(tokens)
        local, global_ = hidden.split(self.hidden_dim // 2, dim=-1)
        valid = (~padding).to(hidden.dtype)[..., None]  # [B, N, 1]
        global_ = (global_ * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1.0)
        hidden = torch.cat((local, global_.expand_as(local)), dim=-1)
        return self.score(hidden).squeeze(-1)


class SaliencyPredictor(nn.Module):
    """Saliency logits for every token of every level, finest level first.

    ``level_tokens``: list of ``[B, H_l * W_l, d]`` (the encoder-proposal projection of feature + position),
    ``level_padding``: list of ``[B, H_l * W_l]`` bool, ``spatial_shapes``: Python ``(H_l, W_l)``
    -> list of logits ``[B, H_l * W_l]`` (padding tokens get a logit too; callers mask them).
    """

    def __init__(self, d_model: int = 256, hidden_dim: int = 256, num_levels: int = 4,
                 alpha_init_range: float = 0.3, modulation: str = "post_norm") -> None:
        super().__init__()
        self.token_head = SaliencyTokenHead(d_model, hidden_dim, modulation)
        # one modulation strength per level that has a coarser level above it
        self.alpha = nn.Parameter(torch.empty(num_levels - 1).uniform_(-alpha_init_range, alpha_init_range))

    def forward(self, level_tokens: Sequence[torch.Tensor], level_padding: Sequence[torch.Tensor],
                spatial_shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        num_levels = len(level_tokens)
        if num_levels != self.alpha.numel() + 1:
            raise ValueError(f"saliency predictor built for {self.alpha.numel() + 1} levels, got {num_levels}")
        logits: list[torch.Tensor] = [torch.empty(0)] * num_levels
        coarser: torch.Tensor | None = None
        for level in range(num_levels - 1, -1, -1):
            height, width = spatial_shapes[level]
            modulation = None
            if coarser is not None:
                up = F.interpolate(coarser, size=(height, width), mode="bilinear", align_corners=True)
                modulation = up.flatten(2).transpose(1, 2) * self.alpha[level]  # [B, N_l, 1]
            logits[level] = self.token_head(level_tokens[level], level_padding[level], modulation)
            coarser = logits[level].view(-1, 1, height, width)
        return logits
