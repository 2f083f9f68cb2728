"""DINO decoder side: two-stage query selection and the deformable decoder with iterative box refinement.

Boxes are normalised cxcywh relative to each image's valid (unpadded) area; they are scaled by the valid ratios
only where they become sampling references on the padded feature maps.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from sdconet.models.deformable_attention import MSDeformAttn
from sdconet.models.deformable_encoder import FeedForward
from sdconet.models.position_encoding import box_sine_embedding
from sdconet.ops.box_ops import inverse_sigmoid

SpatialShapes = Sequence[tuple[int, int]]


REFERENCE_UPDATES = ("raw", "normed")


def class_bias_prior(prior_prob: float = 0.01) -> float:
    """Bias that makes the initial sigmoid class score equal ``prior_prob`` (focal-loss init)."""
    return -math.log((1 - prior_prob) / prior_prob)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between: ``[..., in_dim] -> [..., out_dim]``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


def box_head(d_model: int) -> MLP:
    """Box-delta head (3-layer MLP), last layer zero-initialised so refinement starts from the reference box."""
    head = MLP(d_model, d_model, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


def class_head(d_model: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(d_model, num_classes)
    nn.init.constant_(head.bias, class_bias_prior())
    return head


def proposal_grid(spatial_shapes: SpatialShapes, valid_ratios: torch.Tensor,
                  padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor box per token: centre of the token, side ``0.05 * 2**level`` (Deformable DETR two-stage).

    ``valid_ratios [B, L, 2]``, ``padding [B, S]`` -> (``proposal_logits [B, S, 4]`` inverse-sigmoid cxcywh,
    ``invalid [B, S]`` bool: padding or an anchor too close to the border to be a useful proposal).
    """
    proposals = []
    for level, (height, width) in enumerate(spatial_shapes):
        ys = torch.arange(height, dtype=torch.float32, device=padding.device) + 0.5
        xs = torch.arange(width, dtype=torch.float32, device=padding.device) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        valid_h = valid_ratios[:, level, 1, None] * height  # [B, 1]
        valid_w = valid_ratios[:, level, 0, None] * width
        cx = grid_x.reshape(1, -1) / valid_w
        cy = grid_y.reshape(1, -1) / valid_h
        side = torch.full_like(cx, 0.05 * 2.0 ** level)
        proposals.append(torch.stack((cx, cy, side, side), dim=-1))
    proposals = torch.cat(proposals, dim=1)
    inside = ((proposals > 0.01) & (proposals < 0.99)).all(-1)
    return inverse_sigmoid(proposals), padding | ~inside


class TwoStageQuerySelection(nn.Module):
    """Encoder proposals -> the decoder's initial queries (DINO "mixed" query selection).

    ``project`` is the encoder-proposal projection (Linear + LayerNorm, invalid tokens zeroed); the saliency
    predictor scores the same projection of (feature + position). ``forward`` scores the projected memory with the
    encoder-proposal heads, keeps the top ``num_queries`` tokens by max class logit and returns
    (``content [B, Q, d]`` learned embeddings, ``reference [B, Q, 4]`` detached sigmoid boxes,
    ``enc_logits [B, Q, C]``, ``enc_boxes [B, Q, 4]``).
    """

    def __init__(self, d_model: int, num_classes: int, num_queries: int) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.proj = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.class_head = class_head(d_model, num_classes)
        self.box_head = box_head(d_model)
        self.content = nn.Embedding(num_queries, d_model)

    def project(self, tokens: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S, d]``, ``invalid [B, S]`` -> ``[B, S, d]``."""
        return self.norm(self.proj(tokens.masked_fill(invalid[..., None], 0.0)))

    def forward(self, memory: torch.Tensor, proposal_logits: torch.Tensor,
                invalid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, num_tokens, _ = memory.shape
        if num_tokens < self.num_queries:
            raise ValueError(f"detector.num_queries={self.num_queries} exceeds the {num_tokens} encoder tokens of "
                             f"this input size; use a larger input or fewer queries")
        projected = self.project(memory, invalid)
        logits = self.class_head(projected)
        box_logits = self.box_head(projected) + proposal_logits
        scores = logits.amax(-1).masked_fill(invalid, float("-inf"))
        index = scores.topk(self.num_queries, dim=1).indices  # [B, Q]
        enc_logits = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
        enc_boxes = box_logits.gather(1, index[..., None].expand(-1, -1, 4)).sigmoid()
        content = self.content.weight[None].expand(batch, -1, -1)
        return content, enc_boxes.detach(), enc_logits, enc_boxes


class DINODecoderLayer(nn.Module):
    """Self-attention among queries (optionally masked) -> deformable cross-attention -> FFN, post-norm.

    ``queries, query_pos [B, T, d]``, ``reference_points [B, T, L, 4]``, ``memory [B, S, d]``,
    ``memory_padding [B, S]``, ``attn_mask [T, T]`` bool or None -> ``[B, T, d]``.
    """

    def __init__(self, d_model: int, ffn_dim: int, dropout: float, num_heads: int, num_levels: int,
                 num_points: int, msda_impl: str) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, num_levels, num_heads, num_points, impl=msda_impl)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)

    def forward(self, queries: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                memory: torch.Tensor, spatial_shapes: SpatialShapes, level_start_index: torch.Tensor,
                memory_padding: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = queries + query_pos
        attended = self.self_attn(q, q, queries, attn_mask=attn_mask, need_weights=False)[0]
        queries = self.norm1(queries + self.dropout1(attended))
        attended = self.cross_attn(queries + query_pos, reference_points, memory, spatial_shapes,
                                   level_start_index, memory_padding)
        queries = self.norm2(queries + self.dropout2(attended))
        return self.ffn(queries)


class DINODecoder(nn.Module):
    """Deformable decoder with iterative box refinement, look-forward-twice and unshared per-layer heads.

    ``forward(queries [B, T, d], reference [B, T, 4] sigmoid cxcywh, memory [B, S, d], spatial_shapes,
    level_start_index, valid_ratios [B, L, 2], memory_padding [B, S], attn_mask)`` -> (per-layer class logits
    ``[B, T, C]``, per-layer boxes ``[B, T, 4]`` sigmoid cxcywh).

    Look forward twice (DINO): layer i's prediction is ``sigmoid(delta_i + logit(box_{i-1}))`` with ``box_{i-1}``
    NOT detached, so layer i's loss also trains layer i-1's box head; ``box_{i-1}`` itself was computed from the
    detached ``box_{i-2}``, so the gradient stops there (no earlier head). The reference fed into layer i is detached.

    ``reference_update`` picks the value the next reference is refined from (``model.detector.reference_update``):
    ``"raw"`` (DINO, Salience DETR) applies box head i to layer i's raw output for the reference update and to its
    LayerNorm-ed output for the prediction, so ``box_{i-1}`` in the prediction is the raw-output refinement;
    ``"normed"`` uses the normed output for both (the prediction's delta is then reused as the update).
    """

    def __init__(self, num_layers: int, d_model: int, num_classes: int, ffn_dim: int, dropout: float,
                 num_heads: int, num_levels: int, num_points: int, msda_impl: str,
                 reference_update: str = "raw") -> None:
        super().__init__()
        if reference_update not in REFERENCE_UPDATES:
            raise ValueError(f"model.detector.reference_update must be one of {', '.join(REFERENCE_UPDATES)}, "
                             f"got {reference_update!r}")
        self.reference_update = reference_update
        self.d_model = d_model
        self.layers = nn.ModuleList(
            DINODecoderLayer(d_model, ffn_dim, dropout, num_heads, num_levels, num_points, msda_impl)
            for _ in range(num_layers))
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model)
        self.class_heads = nn.ModuleList(class_head(d_model, num_classes) for _ in range(num_layers))
        self.box_heads = nn.ModuleList(box_head(d_model) for _ in range(num_layers))

    def forward(self, queries: torch.Tensor, reference: torch.Tensor, memory: torch.Tensor,
                spatial_shapes: SpatialShapes, level_start_index: torch.Tensor, valid_ratios: torch.Tensor,
                memory_padding: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ratio_scale = torch.cat((valid_ratios, valid_ratios), dim=-1)[:, None]  # [B, 1, L, 4]
        reference = reference.detach()
        previous_boxes = reference  # box_{i-1}, carrying the gradient of head i-1 only
        all_logits, all_boxes = [], []
        for layer, cls_head, bbox_head in zip(self.layers, self.class_heads, self.box_heads):
            reference_points = reference[:, :, None] * ratio_scale  # [B, T, L, 4]
            query_pos = self.ref_point_head(box_sine_embedding(reference_points[:, :, 0], self.d_model // 2))
            queries = layer(queries, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                            memory_padding, attn_mask)
            normed = self.norm(queries)
            delta = bbox_head(normed)
            all_logits.append(cls_head(normed))
            all_boxes.append((delta + inverse_sigmoid(previous_boxes)).sigmoid())
            # "normed": same value as the prediction, but its gradient reaches head i only; "raw": DINO's update
            update = bbox_head(queries) if self.reference_update == "raw" else delta
            previous_boxes = (update + inverse_sigmoid(reference)).sigmoid()
            reference = previous_boxes.detach()
        return all_logits, all_boxes
