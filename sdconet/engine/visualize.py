"""Pictures for humans: annotated detections and the per-epoch training grid.

A grid row per validation image, panels left to right: LR input (nearest-upsampled to HR size), SR output (blank when
the SR branch is not active), HR target, saliency overlay on the HR image, detections (red, with score) vs ground
truth (green) on the HR image. Arrays are HWC uint8 RGB; tensors are [3, H, W] floats in [0, 1].
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdconet.utils.image import resize  # noqa: F401  (re-export)

GT_COLOR = (40, 220, 60)
PRED_COLOR = (255, 50, 50)
PANEL_TITLES = ("LR input", "SR output", "HR target", "saliency", "pred red / GT green")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8 (values outside [0, 1] are clipped)."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def draw_boxes(image: np.ndarray, boxes_xyxy: torch.Tensor, color: tuple[int, int, int],
               labels: torch.Tensor | None = None, scores: torch.Tensor | None = None,
               category_names: Sequence[str] = ()) -> np.ndarray:
    """Draw [n, 4] pixel boxes on a copy of ``image`` ([H, W, 3] uint8), captioned ``name score`` when ``labels``
    are given."""
    canvas = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(canvas)
    for i, box in enumerate(boxes_xyxy.tolist()):
        draw.rectangle(box, outline=color, width=1)
        if labels is None:
            continue
        label = int(labels[i])
        caption = category_names[label] if label < len(category_names) else str(label)
        if scores is not None:
            caption = f"{caption} {float(scores[i]):.2f}"
        draw.text((box[0] + 1, max(0.0, box[1] - 10)), caption, fill=color)
    return np.asarray(canvas)


def saliency_overlay(image: np.ndarray, saliency: torch.Tensor, opacity: float = 0.55) -> np.ndarray:
    """Blend a saliency map ([h, w] in [0, 1], any resolution) as a heat map over ``image`` ([H, W, 3] uint8)."""
    from matplotlib import colormaps  # imported here: only pictures need it

    heat = (saliency.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    heat = resize(heat[..., None].repeat(3, -1), image.shape[:2])[..., 0]
    colored = (colormaps["inferno"](heat)[..., :3] * 255).astype(np.float32)
    return (image.astype(np.float32) * (1 - opacity) + colored * opacity).astype(np.uint8)


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    canvas = Image.fromarray(panel.copy())
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, draw.textlength(title) + 5, 12), fill=(0, 0, 0))
    draw.text((3, 1), title, fill=(255, 255, 255))
    return np.asarray(canvas)


def grid_row(image_lr: torch.Tensor, image_hr: torch.Tensor, sr_image: torch.Tensor | None,
             saliency: torch.Tensor | None, pred: dict[str, torch.Tensor], gt: dict[str, torch.Tensor],
             category_names: Sequence[str] = ()) -> np.ndarray:
    """One row of the epoch grid ([H, 5W, 3] uint8).

    ``pred`` holds ``boxes`` ([n, 4] xyxy HR pixels), ``labels`` and ``scores``; ``gt`` holds ``boxes``.
    ``sr_image`` is the SR output in [0, 1] at HR size; ``saliency`` is [h, w] in [0, 1].
    """
    hr = to_uint8(image_hr)
    size = hr.shape[:2]
    lr = resize(to_uint8(image_lr), size, nearest=True)
    sr = resize(to_uint8(sr_image), size) if sr_image is not None else np.full_like(hr, 32)
    sal = saliency_overlay(hr, saliency) if saliency is not None else np.full_like(hr, 32)
    detections = draw_boxes(hr, gt["boxes"], GT_COLOR)
    detections = draw_boxes(detections, pred["boxes"], PRED_COLOR, pred["labels"], pred["scores"], category_names)
    panels = [_titled(p, t) for p, t in zip((lr, sr, hr, sal, detections), PANEL_TITLES)]
    return np.concatenate(panels, axis=1)


def stack_rows(rows: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Stack rows (possibly of different sizes) vertically on a dark background."""
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    grid = np.full((height, width, 3), 16, dtype=np.uint8)
    top = 0
    for row in rows:
        grid[top:top + row.shape[0], :row.shape[1]] = row
        top += row.shape[0] + gap
    return grid


