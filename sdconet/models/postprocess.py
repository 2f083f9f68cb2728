"""Detector outputs -> top-K detections in image pixels (DINO style: top-K over all query x class scores).

Every shape is static for a fixed input size, so the same code runs eagerly, traced and in the exported graph.
"""
from __future__ import annotations

import torch

from sdconet.ops.box_ops import box_cxcywh_to_xyxy


def valid_image_sizes(masks: torch.Tensor) -> torch.Tensor:
    """Padding masks ``[B, h, w]`` (True = padding, bottom/right) -> unpadded ``(h, w)`` per image ``[B, 2]`` float."""
    valid = ~masks
    return torch.stack((valid[:, :, 0].sum(1), valid[:, 0, :].sum(1)), dim=-1).float()


def full_image_sizes(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, h, w]`` -> ``[B, 2]`` float filled with (h, w) (no padding)."""
    batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    return torch.stack((images.new_full((batch,), height), images.new_full((batch,), width)), dim=-1).float()


def select_topk_detections(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, image_sizes: torch.Tensor,
                           num_detections: int) -> dict[str, torch.Tensor]:
    """Top-K (query, class) pairs by sigmoid score.

    Args:
        pred_logits: ``[B, Q, C]`` class logits.
        pred_boxes: ``[B, Q, 4]`` normalised cxcywh.
        image_sizes: ``[B, 2]`` (h, w) of each unpadded image, in the pixels the boxes are wanted in.
        num_detections: K, at most Q * C (checked when the model is built, so traced graphs stay branch-free).

    Returns:
        ``boxes`` ``[B, K, 4]`` xyxy pixels, ``scores`` ``[B, K]``, ``labels`` ``[B, K]`` int64; sorted by score.
    """
    num_classes = pred_logits.shape[-1]
    scores, flat_index = pred_logits.sigmoid().flatten(1).topk(num_detections, dim=1)
    query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index % num_classes
    boxes = pred_boxes.gather(1, query_index.unsqueeze(-1).expand(-1, -1, 4))
    scale = image_sizes.flip(-1).repeat(1, 2).unsqueeze(1)  # [B, 1, 4] = (w, h, w, h)
    return {"boxes": box_cxcywh_to_xyxy(boxes) * scale, "scores": scores, "labels": labels}
