"""Hungarian matching between predicted queries and ground-truth boxes (DETR/DINO).

The cost of assigning query q to target t is

    C[q, t] = class_cost * focal_cost(q, label_t) + l1_cost * |box_q - box_t|_1 + giou_cost * (-GIoU(box_q, box_t))

with boxes in normalised cxcywh (L1) / xyxy (GIoU) and the focal-style class cost of Deformable DETR / DINO:
``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` with p = sigmoid(logit of the target's class).
The assignment minimising the total cost is found per image with ``scipy.optimize.linear_sum_assignment``.

Targets flagged ``ignore=True`` (e.g. DOTA "difficult") never take part in matching: no query is assigned to them.
The returned target indices still index the image's FULL target list, so callers can use them directly.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from sdconet.config import LossConfig
from sdconet.ops.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# Replaces non-finite costs (NaN/inf predictions) so that the matcher never crashes: the loss computed afterwards is
# then non-finite too, which the trainer detects and reports.
_INVALID_COST = 1e8


def ignore_flags(target: dict, num_targets: int, device: torch.device) -> torch.Tensor:
    """``target["ignore"]`` as a bool tensor ``[n]`` (all False when the key is absent)."""
    flags = target.get("ignore")
    if flags is None:
        return torch.zeros(num_targets, dtype=torch.bool, device=device)
    flags = torch.as_tensor(flags, dtype=torch.bool, device=device)
    if flags.shape != (num_targets,):
        raise ValueError(f"target['ignore'] has shape {tuple(flags.shape)}, expected ({num_targets},) "
                         f"(one flag per box, image_id={target.get('image_id')})")
    return flags


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to (non-ignored) targets, per image.

    Args:
        class_cost / l1_cost / giou_cost: weights of the three cost terms (DINO: 2 / 5 / 2).
        focal_alpha / focal_gamma: parameters of the focal-style class cost (0.25 / 2).
    """

    def __init__(self, class_cost: float = 2.0, l1_cost: float = 5.0, giou_cost: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if class_cost == 0 and l1_cost == 0 and giou_cost == 0:
            raise ValueError("HungarianMatcher: all cost weights are 0 (matcher_class_cost, matcher_l1_cost, "
                             "matcher_giou_cost); at least one must be positive")
        self.class_cost = class_cost
        self.l1_cost = l1_cost
        self.giou_cost = giou_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, cfg: LossConfig) -> "HungarianMatcher":
        return cls(cfg.matcher_class_cost, cfg.matcher_l1_cost, cfg.matcher_giou_cost, cfg.focal_alpha,
                   cfg.focal_gamma)

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor,
                    target_boxes: torch.Tensor) -> torch.Tensor:
        """Cost of every (query, target) pair of one image.

        Args:
            logits: ``[Q, C]`` class logits.  boxes: ``[Q, 4]`` normalised cxcywh.
            target_labels: ``[T]`` int64.  target_boxes: ``[T, 4]`` normalised cxcywh.
        Returns:
            ``[Q, T]`` float cost.
        """
        prob = logits.float().sigmoid()[:, target_labels]  # [Q, T]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        pos_cost = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
        neg_cost = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
        class_cost = pos_cost - neg_cost
        boxes = boxes.float()
        target_boxes = target_boxes.float()
        l1_cost = torch.cdist(boxes, target_boxes, p=1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        cost = self.class_cost * class_cost + self.l1_cost * l1_cost + self.giou_cost * giou_cost
        return torch.nan_to_num(cost, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=-_INVALID_COST)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: ``pred_logits`` ``[B, Q, C]`` and ``pred_boxes`` ``[B, Q, 4]`` (normalised cxcywh).
            targets: B dicts with ``labels`` ``[n]``, ``boxes`` ``[n, 4]`` and optionally ``ignore`` ``[n]`` bool.
        Returns:
            B pairs ``(query_idx, target_idx)`` of int64 CPU tensors of equal length ``min(Q, n_kept)``;
            ``target_idx`` indexes the full target list (ignored targets never appear).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {logits.shape[0]} outputs")
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"].to(logits.device)
            kept = (~ignore_flags(target, len(labels), logits.device)).nonzero().squeeze(1)
            if kept.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[b], boxes[b], labels[kept], target["boxes"].to(boxes.device)[kept])
            query_idx, kept_idx = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(query_idx, dtype=torch.int64),
                            kept.cpu()[torch.as_tensor(kept_idx, dtype=torch.int64)]))
        return indices
