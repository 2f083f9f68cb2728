"""Deformable transformer encoders: the saliency-filtered one (Salience DETR style) and the plain DINO baseline.

Token bookkeeping of the filtered encoder (all counts are Python ints fixed by the input size, so the exported graph
has static shapes):

1. per level l keep the top ``int(valid_tokens_l * level_ratio[l])`` tokens by saliency (padding sorts last);
2. concatenate the levels and sort all kept tokens by saliency -> ``N`` tokens;
3. encoder layer t updates the first ``int(N * layer_ratio[t])`` of them: a foreground self-attention over the
   ``foreground_topk`` best of those (max class score x saliency), then deformable attention whose values are the
   un-updated neck features, then the FFN; the results are scattered back into the token memory;
4. background embedding (``model.saliency.background``): ``per_level`` (ours) adds one learned vector per level to
   the tokens that no level kept; ``row_col`` (Salience DETR / official SDCoNet code) adds a learned row/column table
   entry (DETR's learned position embedding, at most :data:`BACKGROUND_TABLE_SIZE` rows/columns) to every valid token
   the last encoder layer did not update.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from sdconet.models.deformable_attention import MSDeformAttn

SpatialShapes = Sequence[tuple[int, int]]

BACKGROUND_MODES = ("per_level", "row_col")
BACKGROUND_TABLE_SIZE = 200  # rows/columns of the row_col table (Salience DETR's size)


def level_keep_counts(spatial_shapes: SpatialShapes, level_ratio: Sequence[float],
                      valid_counts: Sequence[int] | None = None) -> list[int]:
    """Tokens kept per level: ``int(valid_l * ratio_l)``; ``valid_counts`` defaults to ``H_l * W_l``.

    For a padded batch pass the batch's largest valid-token count per level.
    """
    if len(level_ratio) != len(spatial_shapes):
        raise ValueError(f"saliency.level_ratio has {len(level_ratio)} entries for {len(spatial_shapes)} levels")
    if valid_counts is None:
        valid_counts = [h * w for h, w in spatial_shapes]
    return [int(count * ratio) for count, ratio in zip(valid_counts, level_ratio)]


def layer_token_counts(num_selected: int, layer_ratio: Sequence[float]) -> list[int]:
    """Tokens each encoder layer updates: ``int(N * ratio_t)`` (at least one)."""
    return [max(1, int(num_selected * ratio)) for ratio in layer_ratio]


def encoder_reference_points(spatial_shapes: SpatialShapes, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Token centres as reference points for every level: ``valid_ratios [B, L, 2]`` -> ``[B, S, L, 2]`` (x, y).

    Centres are normalised by each image's valid extent, then rescaled to every level's valid extent.
    """
    points = []
    for level, (height, width) in enumerate(spatial_shapes):
        ys = (torch.arange(height, dtype=torch.float32, device=valid_ratios.device) + 0.5)
        xs = (torch.arange(width, dtype=torch.float32, device=valid_ratios.device) + 0.5)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = grid_y.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
        ref_x = grid_x.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), dim=-1))
    points = torch.cat(points, dim=1)  # [B, S, 2]
    return points[:, :, None] * valid_ratios[:, None]


def select_salient_tokens(saliency_logits: Sequence[torch.Tensor], level_padding: Sequence[torch.Tensor],
                          keep_per_level: Sequence[int]) -> torch.Tensor:
    """Indices (into the flattened S tokens) of the kept tokens of all levels, sorted by saliency, most salient first.

    ``saliency_logits`` / ``level_padding``: per level ``[B, H_l * W_l]``; padding tokens get -inf so they are never
    kept ahead of a valid token. Returns ``[B, sum(keep_per_level)]`` int64.
    """
    scores, indices = [], []
    start = 0
    for logits, padding, keep in zip(saliency_logits, level_padding, keep_per_level):
        masked = logits.detach().masked_fill(padding, float("-inf"))
        level_scores, level_indices = masked.topk(keep, dim=1)
        scores.append(level_scores)
        indices.append(level_indices + start)
        start += logits.shape[1]
    scores = torch.cat(scores, dim=1)
    order = scores.topk(scores.shape[1], dim=1).indices  # a full sort; exports as ONNX TopK with a constant k
    return torch.cat(indices, dim=1).gather(1, order)


class FeedForward(nn.Module):
    """Post-norm FFN block: ``x + FFN(x)`` then LayerNorm; ``[..., d] -> [..., d]``."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, d_model), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


class DeformableEncoderLayer(nn.Module):
    """Deformable attention (queries = tokens + pos, values = ``value``) + FFN, post-norm.

    ``tokens, pos [B, n, d]``, ``reference_points [B, n, L, 2]``, ``value [B, S, d]``, ``value_padding [B, S]``
    -> ``[B, n, d]``.
    """

    def __init__(self, d_model: int, ffn_dim: int, dropout: float, num_heads: int, num_levels: int,
                 num_points: int, msda_impl: str) -> None:
        super().__init__()
        self.attn = MSDeformAttn(d_model, num_levels, num_heads, num_points, impl=msda_impl)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                value: torch.Tensor, spatial_shapes: SpatialShapes, level_start_index: torch.Tensor,
                value_padding: torch.Tensor) -> torch.Tensor:
        attended = self.attn(tokens + pos, reference_points, value, spatial_shapes, level_start_index, value_padding)
        return self.ffn(self.norm(tokens + self.dropout(attended)))


class ForegroundSelfAttention(nn.Module):
    """Full self-attention among the ``topk`` highest-ranked tokens; the others pass through unchanged.

    ``tokens, pos [B, n, d]``, ``rank [B, n]`` (padding tokens must rank lowest), ``padding [B, n]`` -> ``[B, n, d]``.
    """

    def __init__(self, d_model: int, num_heads: int, topk: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.topk = topk
        self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, rank: torch.Tensor,
                padding: torch.Tensor) -> torch.Tensor:
        k = min(self.topk, tokens.shape[1])
        index = rank.topk(k, dim=1).indices
        index_d = index[..., None].expand(-1, -1, tokens.shape[-1])
        selected = tokens.gather(1, index_d)
        query = selected + pos.gather(1, index_d)
        attended = self.attn(query, query, selected, key_padding_mask=padding.gather(1, index),
                             need_weights=False)[0]
        selected = self.norm(selected + self.dropout(attended))
        return tokens.scatter(1, index_d, selected)


class DeformableEncoder(nn.Module):
    """Plain deformable encoder over all tokens (the DINO baseline, ``saliency.enabled=False``).

    ``features, pos [B, S, d]``, ``valid_ratios [B, L, 2]``, ``padding [B, S]`` -> memory ``[B, S, d]``.
    """

    def __init__(self, num_layers: int, d_model: int, ffn_dim: int, dropout: float, num_heads: int,
                 num_levels: int, num_points: int, msda_impl: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, ffn_dim, dropout, num_heads, num_levels, num_points, msda_impl)
            for _ in range(num_layers))

    def forward(self, features: torch.Tensor, pos: torch.Tensor, spatial_shapes: SpatialShapes,
                level_start_index: torch.Tensor, valid_ratios: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        memory = features
        for layer in self.layers:
            memory = layer(memory, pos, reference_points, memory, spatial_shapes, level_start_index, padding)
        return memory


class SaliencyFilteredEncoder(nn.Module):
    """Deformable encoder that only updates salient tokens (see the module docstring for the bookkeeping).

    ``forward(features, pos, spatial_shapes, level_start_index, valid_ratios, padding, saliency_logits,
    keep_per_level, token_classifier)``: ``features, pos [B, S, d]``; ``saliency_logits`` per level ``[B, H_l W_l]``;
    ``keep_per_level`` Python ints (:func:`level_keep_counts`); ``token_classifier`` maps ``[B, n, d]`` to class
    logits ``[B, n, C]`` for the foreground ranking. Returns (memory ``[B, S, d]``, tokens updated per layer).
    """

    def __init__(self, num_layers: int, d_model: int, ffn_dim: int, dropout: float, num_heads: int,
                 num_levels: int, num_points: int, msda_impl: str, layer_ratio: Sequence[float],
                 foreground_topk: int, background: str = "per_level") -> None:
        super().__init__()
        if background not in BACKGROUND_MODES:
            raise ValueError(f"model.saliency.background must be one of {BACKGROUND_MODES}, got {background!r}")
        if background == "row_col" and d_model % 2:
            raise ValueError(f"model.saliency.background=row_col needs an even detector.d_model, got {d_model}")
        if len(layer_ratio) != num_layers:
            raise ValueError(f"saliency.layer_ratio has {len(layer_ratio)} entries for "
                             f"detector.num_encoder_layers={num_layers}")
        self.layer_ratio = tuple(layer_ratio)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, ffn_dim, dropout, num_heads, num_levels, num_points, msda_impl)
            for _ in range(num_layers))
        self.foreground_attn = nn.ModuleList(
            ForegroundSelfAttention(d_model, num_heads, foreground_topk, dropout) for _ in range(num_layers))
        self.background = background
        if background == "per_level":
            self.background_embed = nn.Parameter(torch.empty(num_levels, d_model).normal_(std=0.02))
        else:  # [table, d/2] each; uniform init as DETR's learned position embedding
            self.background_rows = nn.Parameter(torch.empty(BACKGROUND_TABLE_SIZE, d_model // 2).uniform_())
            self.background_cols = nn.Parameter(torch.empty(BACKGROUND_TABLE_SIZE, d_model // 2).uniform_())

    def forward(self, features: torch.Tensor, pos: torch.Tensor, spatial_shapes: SpatialShapes,
                level_start_index: torch.Tensor, valid_ratios: torch.Tensor, padding: torch.Tensor,
                saliency_logits: Sequence[torch.Tensor], keep_per_level: Sequence[int],
                token_classifier: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        batch, _, d_model = features.shape
        level_padding = padding.split([h * w for h, w in spatial_shapes], dim=1)
        order = select_salient_tokens(saliency_logits, level_padding, keep_per_level)  # [B, N]
        counts = layer_token_counts(order.shape[1], self.layer_ratio)
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios).flatten(2)  # [B, S, L*2]
        saliency = torch.cat(saliency_logits, dim=1).detach().sigmoid()  # [B, S]

        memory = features
        for layer, foreground_attn, count in zip(self.layers, self.foreground_attn, counts):
            index = order[:, :count]
            index_d = index[..., None].expand(-1, -1, d_model)
            tokens = memory.gather(1, index_d)
            token_pos = pos.gather(1, index_d)
            token_ref = reference_points.gather(1, index[..., None].expand(-1, -1, reference_points.shape[-1]))
            token_ref = token_ref.view(batch, count, -1, 2)
            token_padding = padding.gather(1, index)
            with torch.no_grad():  # ranking only: top-k indices carry no gradient
                rank = token_classifier(tokens).sigmoid().amax(-1) * saliency.gather(1, index)
                rank = rank.masked_fill(token_padding, -1.0)
            updated = foreground_attn(tokens, token_pos, rank, token_padding)
            updated = layer(updated, token_pos, token_ref, features, spatial_shapes, level_start_index, padding)
            # padding tokens can be among the kept ones in a padded batch: they stay as they were
            updated = torch.where(token_padding[..., None], tokens, updated)
            memory = memory.scatter(1, index_d, updated)

        # tokens that get the background embedding: not kept by any level (per_level) / not updated by the last
        # layer (row_col, where the official code adds it)
        foreground = order if self.background == "per_level" else order[:, :counts[-1]]
        kept = torch.zeros_like(saliency).scatter(1, foreground, 1.0)
        background = ((1.0 - kept) * (~padding).to(kept.dtype))[..., None]  # [B, S, 1]
        return memory + background * self._background_table(spatial_shapes).to(memory.dtype), counts

    def _background_table(self, spatial_shapes: SpatialShapes) -> torch.Tensor:
        """The embedding each token would get as background: ``[S, d]``."""
        if self.background == "per_level":
            return torch.cat([embed.expand(h * w, -1) for embed, (h, w) in zip(self.background_embed, spatial_shapes)])
        tables = []
        for height, width in spatial_shapes:
            if max(height, width) > BACKGROUND_TABLE_SIZE:
                raise ValueError(f"model.saliency.background=row_col: a {height}x{width} feature map exceeds the "
                                 f"{BACKGROUND_TABLE_SIZE}-entry row/column table; use background=per_level or a "
                                 "smaller input")
            cols = self.background_cols[:width][None].expand(height, -1, -1)  # [H, W, d/2]
            rows = self.background_rows[:height][:, None].expand(-1, width, -1)
            tables.append(torch.cat((cols, rows), dim=-1).flatten(0, 1))  # x half first, as DETR
        return torch.cat(tables)
