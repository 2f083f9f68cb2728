"""Contrastive denoising (CDN) queries of DINO, built from the ground truth during training.

Layout of the ``pad_size = num_groups * single_pad`` dn queries (``single_pad = 2 * max_gt``): group g's positive
query for target j sits at ``g * single_pad + j``, its negative at ``g * single_pad + max_gt + j``. Slots of images
with fewer than ``max_gt`` targets are zero padding (not supervised).
Positives get box noise below half the box size per side (``|noise| < box_noise_scale * wh / 2``), negatives between
one and two times that, so a negative lies further from its box and must be classified as background.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sdconet.ops.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@dataclass
class DenoisingQueries:
    """``content [B, pad, d]``, ``reference_logits [B, pad, 4]`` (inverse-sigmoid cxcywh), ``attn_mask
    [pad + Q, pad + Q]`` bool (True = may not attend), and ``meta`` (the ``dn_meta`` contract)."""

    content: torch.Tensor
    reference_logits: torch.Tensor
    attn_mask: torch.Tensor
    meta: dict


def denoising_attn_mask(num_groups: int, single_pad: int, num_queries: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """``[pad + Q, pad + Q]`` bool: matching queries cannot see dn queries; dn groups cannot see each other."""
    pad_size = num_groups * single_pad
    total = pad_size + num_queries
    group_id = torch.arange(pad_size, device=device) // single_pad
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    mask[:pad_size, :pad_size] = group_id[:, None] != group_id[None, :]
    return mask


class ContrastiveDenoising(nn.Module):
    """Builds noised positive/negative queries from targets (dicts with ``labels [n]`` and ``boxes [n, 4]`` cxcywh)."""

    def __init__(self, num_classes: int, d_model: int, num_dn_queries: int = 100, label_noise_ratio: float = 0.5,
                 box_noise_scale: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_dn_queries = num_dn_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_embed = nn.Embedding(num_classes, d_model)

    def forward(self, targets: list[dict], num_queries: int) -> DenoisingQueries | None:
        """Returns None when the batch has no ground truth (nothing to denoise)."""
        max_gt = max((len(t["labels"]) for t in targets), default=0)
        if max_gt == 0 or self.num_dn_queries <= 0:
            return None
        device = self.label_embed.weight.device
        batch = len(targets)
        num_groups = max(1, self.num_dn_queries // max_gt)
        single_pad = 2 * max_gt

        labels = torch.zeros(batch, max_gt, dtype=torch.long, device=device)
        boxes = torch.zeros(batch, max_gt, 4, device=device)
        present = torch.zeros(batch, max_gt, dtype=torch.bool, device=device)
        for i, target in enumerate(targets):
            n = len(target["labels"])
            labels[i, :n] = target["labels"].to(device)
            boxes[i, :n] = target["boxes"].to(device=device, dtype=boxes.dtype)
            present[i, :n] = True

        # [B, groups, 2 (positive, negative), max_gt]
        shape = (batch, num_groups, 2, max_gt)
        labels = labels[:, None, None].expand(shape)
        boxes = boxes[:, None, None].expand(*shape, 4)
        present = present[:, None, None].expand(shape)

        flip = torch.rand(shape, device=device) < self.label_noise_ratio * 0.5
        labels = torch.where(flip, torch.randint_like(labels, self.num_classes), labels)

        half_wh = boxes[..., 2:] / 2
        max_shift = torch.cat((half_wh, half_wh), dim=-1) * self.box_noise_scale
        sign = torch.randint(0, 2, boxes.shape, device=device, dtype=boxes.dtype) * 2.0 - 1.0
        magnitude = torch.rand(boxes.shape, device=device)
        magnitude = magnitude + torch.tensor([0.0, 1.0], device=device).view(1, 1, 2, 1, 1)  # negatives in [1, 2)
        noised = (box_cxcywh_to_xyxy(boxes) + sign * magnitude * max_shift).clamp(0.0, 1.0)
        noised = box_xyxy_to_cxcywh(noised)

        present_f = present[..., None].to(boxes.dtype)
        content = self.label_embed(labels) * present_f
        reference_logits = inverse_sigmoid(noised) * present_f
        pad_size = num_groups * single_pad
        return DenoisingQueries(
            content=content.reshape(batch, pad_size, -1),
            reference_logits=reference_logits.reshape(batch, pad_size, 4),
            attn_mask=denoising_attn_mask(num_groups, single_pad, num_queries, device),
            meta={"num_groups": num_groups, "single_pad": single_pad, "pad_size": pad_size},
        )
