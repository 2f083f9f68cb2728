"""Saliency supervision: per-token targets from GT boxes and the focal loss on the saliency logits.

A token of level l has its centre in HR pixels at

    x = (j + 0.5) / (W_l * valid_ratio_w) * W_img,   y = (i + 0.5) / (H_l * valid_ratio_h) * H_img

(the reference-point convention of Deformable DETR: valid ratios undo the batch padding). With (l, t, r, b) the
distances from the centre to the four sides of a GT box, the token is positive for that box iff it lies strictly inside
(all four > 0) and ``max(l, t, r, b)`` falls in the level's range ``(lo, hi]`` (``SaliencyConfig.level_ranges``, HR
pixels, finest level first). With dx = (l - r) / (l + r) and dy = (t - b) / (t + b) its value is

    gaussian (paper, default):   exp(-(dx^2 + dy^2) / (2 sigma^2))
    linear (official code):      1 - sqrt(dx^2 + dy^2) / 2

1.0 at the box centre, decaying towards the sides; the token's target is the max over boxes (0 outside all boxes).

Ignored targets (``ignore=True``) produce no positives; tokens they would make positive (and no kept box does) are
left out of the loss instead of being pushed to background.

Everything is vectorised over tokens and boxes (one ``[B, N_l, M]`` tensor per level).
"""
from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss

from sdconet.config import SaliencyConfig
from sdconet.losses.matcher import ignore_flags
from sdconet.ops.box_ops import box_cxcywh_to_xyxy

TARGET_MODES = ("gaussian", "linear")


def _padded_hr_boxes(targets: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets -> (xyxy HR-pixel boxes ``[B, M, 4]``, kept ``[B, M]`` bool, ignored ``[B, M]`` bool), M = max n."""
    num_boxes = max((len(t["boxes"]) for t in targets), default=0)
    boxes = torch.zeros(len(targets), num_boxes, 4, device=device)
    kept = torch.zeros(len(targets), num_boxes, dtype=torch.bool, device=device)
    ignored = torch.zeros_like(kept)
    for b, target in enumerate(targets):
        n = len(target["boxes"])
        if n == 0:
            continue
        height, width = (float(s) for s in target["size"])
        scale = torch.tensor([width, height, width, height], device=device)
        boxes[b, :n] = box_cxcywh_to_xyxy(target["boxes"].to(device).float()) * scale
        flags = ignore_flags(target, n, device)
        kept[b, :n] = ~flags
        ignored[b, :n] = flags
    return boxes, kept, ignored


def token_centers_hr(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor,
                     image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """HR-pixel centres of every token.

    Args:
        spatial_shapes: ``[L, 2]`` (H_l, W_l).  valid_ratios: ``[B, L, 2]`` (w, h) valid fraction per level.
        image_sizes: ``[B, 2]`` (H, W) HR size of each image.
    Returns:
        L tensors ``[B, H_l * W_l, 2]`` of (x, y), row-major like the flattened feature maps.
    """
    centers = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid(torch.arange(height, device=valid_ratios.device, dtype=torch.float32) + 0.5,
                                torch.arange(width, device=valid_ratios.device, dtype=torch.float32) + 0.5,
                                indexing="ij")
        ratio_w = valid_ratios[:, level, 0:1].float()  # [B, 1]
        ratio_h = valid_ratios[:, level, 1:2].float()
        x = xs.reshape(1, -1) / (width * ratio_w) * image_sizes[:, 1:2]
        y = ys.reshape(1, -1) / (height * ratio_h) * image_sizes[:, 0:1]
        centers.append(torch.stack((x, y), dim=-1))
    return centers


def _level_values(centers: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor, size_range: tuple[float, float],
                  mode: str, sigma: float) -> torch.Tensor:
    """Max-over-boxes saliency value of each token of one level.

    Args:
        centers: ``[B, N, 2]`` (x, y) HR px.  boxes: ``[B, M, 4]`` xyxy HR px.  box_mask: ``[B, M]`` boxes to use.
    Returns:
        ``[B, N]`` values in [0, 1] (0 = negative).
    """
    if boxes.shape[1] == 0:
        return centers.new_zeros(centers.shape[:2])
    x, y = centers[..., 0:1], centers[..., 1:2]  # [B, N, 1]
    left = x - boxes[:, None, :, 0]  # [B, N, M]
    top = y - boxes[:, None, :, 1]
    right = boxes[:, None, :, 2] - x
    bottom = boxes[:, None, :, 3] - y
    ltrb = torch.stack((left, top, right, bottom), dim=-1)  # [B, N, M, 4]
    max_side = ltrb.amax(dim=-1)
    positive = (ltrb.amin(dim=-1) > 0) & (max_side > size_range[0]) & (max_side <= size_range[1]) & box_mask[:, None]
    # clamp keeps the (discarded) outside-box values finite so that no NaN reaches the max below
    dx = (left - right) / (left + right).clamp(min=1e-6)
    dy = (top - bottom) / (top + bottom).clamp(min=1e-6)
    if mode == "gaussian":
        values = torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2))
    else:
        values = 1 - 0.5 * torch.sqrt(dx ** 2 + dy ** 2)
    return torch.where(positive, values, torch.zeros_like(values)).amax(dim=-1)


def saliency_targets(targets: list[dict], spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor,
                     cfg: SaliencyConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token saliency targets for every level.

    Args:
        targets: B dicts with ``boxes`` ``[n, 4]`` normalised cxcywh, ``size`` (H, W) HR, optional ``ignore`` ``[n]``.
        spatial_shapes: ``[L, 2]`` (H_l, W_l), finest first.  valid_ratios: ``[B, L, 2]`` (w, h).
        cfg: target mode, sigma and the L level ranges.
    Returns:
        (values, ignored): L tensors ``[B, H_l * W_l]`` each; values in [0, 1] (> 0 = positive); ignored is True
        where only an ignored box would have made the token positive.
    """
    if cfg.target_mode not in TARGET_MODES:
        raise ValueError(f"model.saliency.target_mode must be one of {TARGET_MODES}, got {cfg.target_mode!r}")
    if cfg.target_mode == "gaussian" and cfg.sigma <= 0:
        raise ValueError(f"model.saliency.sigma must be > 0, got {cfg.sigma}")
    num_levels = spatial_shapes.shape[0]
    if len(cfg.level_ranges) != num_levels:
        raise ValueError(f"model.saliency.level_ranges has {len(cfg.level_ranges)} ranges but the model has "
                         f"{num_levels} levels")
    if len(targets) != valid_ratios.shape[0]:
        raise ValueError(f"saliency_targets: {len(targets)} targets for a batch of {valid_ratios.shape[0]}")
    device = valid_ratios.device
    boxes, kept, ignored = _padded_hr_boxes(targets, device)
    image_sizes = torch.tensor([[float(s) for s in t["size"]] for t in targets], device=device).view(-1, 2)
    values, ignored_tokens = [], []
    for centers, size_range in zip(token_centers_hr(spatial_shapes, valid_ratios, image_sizes), cfg.level_ranges):
        level_values = _level_values(centers, boxes, kept, size_range, cfg.target_mode, cfg.sigma)
        ignored_values = _level_values(centers, boxes, ignored, size_range, cfg.target_mode, cfg.sigma)
        values.append(level_values)
        ignored_tokens.append((ignored_values > 0) & (level_values == 0))
    return values, ignored_tokens


def _valid_tokens(ignored: list[torch.Tensor], level_masks: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Tokens that enter the loss: not padding (level_masks True = padding) and not ignored."""
    if level_masks is None:
        return [~skip for skip in ignored]
    return [~skip & ~mask.to(skip.device) for skip, mask in zip(ignored, level_masks)]


def count_positives(values: list[torch.Tensor], ignored: list[torch.Tensor],
                    level_masks: list[torch.Tensor] | None = None) -> int:
    """Number of valid tokens with a positive target (the default normaliser of :func:`saliency_loss`)."""
    return sum(int(((target > 0) & valid).sum()) for target, valid in zip(values, _valid_tokens(ignored, level_masks)))


def saliency_loss(saliency_logits: list[torch.Tensor], values: list[torch.Tensor], ignored: list[torch.Tensor],
                  level_masks: list[torch.Tensor] | None = None, alpha: float = 0.25, gamma: float = 2.0,
                  num_positives: float | None = None) -> torch.Tensor:
    """Sigmoid focal loss of the saliency logits against the soft targets, summed over valid tokens / positives.

    Args:
        saliency_logits / values / ignored / level_masks: L tensors ``[B, H_l * W_l]``; level_masks True = padding.
        num_positives: normaliser (the criterion passes the count averaged over DDP ranks); defaults to
            :func:`count_positives`. Clamped to at least 1.
    Returns:
        scalar loss.
    """
    if not (len(saliency_logits) == len(values) == len(ignored)):
        raise ValueError(f"saliency_loss: {len(saliency_logits)} logit levels but {len(values)} target levels")
    if level_masks is not None and len(level_masks) != len(values):
        raise ValueError(f"saliency_loss: {len(level_masks)} level masks but {len(values)} target levels")
    total = saliency_logits[0].new_zeros((), dtype=torch.float32)
    for level, (logits, target, valid) in enumerate(zip(saliency_logits, values,
                                                        _valid_tokens(ignored, level_masks))):
        if logits.shape != target.shape:
            raise ValueError(f"saliency_logits[{level}] has shape {tuple(logits.shape)} but its targets have "
                             f"{tuple(target.shape)}")
        loss = sigmoid_focal_loss(logits.float(), target, alpha=alpha, gamma=gamma, reduction="none")
        total = total + (loss * valid).sum()
    if num_positives is None:
        num_positives = count_positives(values, ignored, level_masks)
    return total / max(float(num_positives), 1.0)
