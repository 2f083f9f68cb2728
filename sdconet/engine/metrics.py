"""Evaluation metrics: COCO box AP (pycocotools) on HR pixel coordinates, and PSNR / SSIM of the SR branch.

* :func:`coco_evaluate` — AP, AP50, AP75, APs, APm, APl at maxDets 100 (pycocotools' ``summarize`` order). pycocotools
  reports -1 for an area range without ground truth; that convention is kept. Zero detections give 0.0 (not a crash).
  Ground-truth boxes with ``iscrowd: 1`` are pycocotools' ignore regions: detections on them are neither true nor
  false positives (the data converters write ignored/difficult objects that way).
* :func:`outputs_to_detections` — model outputs (normalised cxcywh + logits) -> the detection list above.
* :func:`psnr` / :func:`ssim` — on [0, 1] RGB images, per image.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sdconet.models.postprocess import select_topk_detections
from sdconet.utils.logging import get_logger

logger = get_logger(__name__)

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # = COCOeval.stats[0:6]
DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")


@contextlib.contextmanager
def _pycocotools_output_to_log(level: int):
    """pycocotools prints to stdout; send what it prints to our logger instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    for line in buffer.getvalue().splitlines():
        if line.strip():
            logger.log(level, "pycocotools: %s", line)


def load_coco(ann_file_or_coco: Union[str, Path, COCO]) -> COCO:
    """A pycocotools ``COCO`` from a JSON path (or the object itself); fills a missing ``area`` with bbox w*h."""
    if isinstance(ann_file_or_coco, COCO):
        coco = ann_file_or_coco
        source = "<COCO object>"
    else:
        source = str(ann_file_or_coco)
        if not Path(source).is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {source}")
        with _pycocotools_output_to_log(logging.DEBUG):
            coco = COCO(source)
    missing_area = 0
    for ann in coco.dataset.get("annotations", []):
        if "bbox" not in ann or len(ann["bbox"]) != 4:
            raise ValueError(f"{source}: annotation id={ann.get('id')} has no 4-number 'bbox'")
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            missing_area += 1
    if missing_area:
        logger.warning("%s: %d annotations had no 'area'; used bbox width*height for the APs/APm/APl ranges",
                       source, missing_area)
    return coco


def _check_detections(coco_gt: COCO, detections: list[dict]) -> None:
    image_ids, category_ids = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for i, det in enumerate(detections):
        missing = [k for k in DETECTION_KEYS if k not in det]
        if missing:
            raise ValueError(f"detection {i} lacks {missing}; each needs {DETECTION_KEYS}")
        if len(det["bbox"]) != 4:
            raise ValueError(f"detection {i}: bbox must be [x, y, w, h], got {det['bbox']!r}")
        if det["image_id"] not in image_ids:
            raise ValueError(f"detection {i}: image_id {det['image_id']!r} is not in the ground truth")
        if det["category_id"] not in category_ids:
            raise ValueError(f"detection {i}: category_id {det['category_id']!r} is not a ground-truth category "
                             f"({sorted(category_ids)})")


def coco_evaluate(ann_file_or_coco: Union[str, Path, COCO], detections: list[dict],
                  image_ids: Optional[Sequence[int]] = None, max_detections: int = 100) -> dict[str, float]:
    """COCO box AP of ``detections`` against a ground-truth file.

    Args:
        ann_file_or_coco: COCO JSON path or a loaded ``COCO``.
        detections: dicts ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] (HR pixels of the annotation file),
            ``score``.
        image_ids: evaluate these images only (default: every image of the ground truth).
        max_detections: pycocotools' largest maxDets, the one the AP figures use (whole scenes need more than 100).
    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` floats (at ``max_detections``; -1 = no GT in that area range).
    """
    coco_gt = load_coco(ann_file_or_coco)
    _check_detections(coco_gt, detections)
    with _pycocotools_output_to_log(logging.DEBUG):
        if detections:
            coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        else:  # loadRes cannot take an empty list: evaluate against an empty result set instead
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                               "categories": list(coco_gt.dataset.get("categories", [])), "annotations": []}
            coco_dt.createIndex()
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    evaluator.params.maxDets = [1, 10, max_detections]
    with _pycocotools_output_to_log(logging.DEBUG):
        evaluator.evaluate()
        evaluator.accumulate()
    if max_detections == 100:
        with _pycocotools_output_to_log(logging.INFO):
            evaluator.summarize()
        return {name: float(value) for name, value in zip(COCO_METRICS, evaluator.stats[:6])}
    # summarize() reads its first figure at a literal maxDets of 100: read the six from the precision table instead
    return {"AP": _average_precision(evaluator), "AP50": _average_precision(evaluator, iou=0.5),
            "AP75": _average_precision(evaluator, iou=0.75), "APs": _average_precision(evaluator, area="small"),
            "APm": _average_precision(evaluator, area="medium"), "APl": _average_precision(evaluator, area="large")}


def _average_precision(evaluator: COCOeval, iou: Optional[float] = None, area: str = "all") -> float:
    """pycocotools' AP at the largest maxDets (precision ``[T, R, K, A, M]``); -1 when no ground truth counts."""
    precision = evaluator.eval["precision"][..., evaluator.params.areaRngLbl.index(area), -1]
    if iou is not None:
        precision = precision[[i for i, t in enumerate(evaluator.params.iouThrs) if abs(t - iou) < 1e-9]]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


@torch.no_grad()
def outputs_to_detections(outputs: dict, targets: list[dict],
                          label_to_category: Union[Sequence[int], Mapping[int, int]],
                          top_k: int = 100) -> list[dict]:
    """Top-k (query, class) pairs per image as COCO detections in the annotation file's pixel coordinates.

    Args:
        outputs: ``pred_logits`` ``[B, Q, C]``, ``pred_boxes`` ``[B, Q, 4]`` normalised cxcywh.
        targets: B dicts with ``image_id`` and ``size`` (H, W): the size the boxes were normalised to. The loader
            only crops (bottom/right remainder of an odd-sized image, origin unchanged) and never resizes, so
            ``box * size`` is in the annotation file's pixel coordinates; scaling by ``orig_size`` instead would
            stretch every box by W/(W-1) on an odd-sized image.
        label_to_category: contiguous label -> COCO ``category_id`` (a sequence indexed by label, or a mapping).
        top_k: detections per image (over all Q*C pairs, so one query may yield several classes, as in DINO).
    Returns:
        list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` (plain Python numbers).
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    batch, num_queries, num_classes = logits.shape
    if len(targets) != batch:
        raise ValueError(f"outputs_to_detections: {len(targets)} targets for a batch of {batch}")
    if not isinstance(label_to_category, Mapping) and len(label_to_category) < num_classes:
        raise ValueError(f"label_to_category has {len(label_to_category)} entries but the model predicts "
                         f"{num_classes} classes")
    sizes = []
    for b, target in enumerate(targets):
        if "size" not in target or "image_id" not in target:
            raise KeyError(f"target {b} needs 'size' and 'image_id' for evaluation (has {sorted(target)})")
        sizes.append([float(s) for s in target["size"]])
    image_sizes = torch.tensor(sizes, dtype=torch.float32, device=boxes.device)  # [B, 2] (H, W)
    selected = select_topk_detections(logits.float(), boxes.float(), image_sizes, min(top_k, num_queries * num_classes))
    detections = []
    for b, target in enumerate(targets):
        height, width = sizes[b]
        xyxy = selected["boxes"][b]
        xyxy = torch.stack((xyxy[:, 0].clamp(0, width), xyxy[:, 1].clamp(0, height),
                            xyxy[:, 2].clamp(0, width), xyxy[:, 3].clamp(0, height)), dim=-1)
        xywh = torch.cat((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), dim=-1).tolist()
        image_id = int(target["image_id"])
        for box, score, label in zip(xywh, selected["scores"][b].tolist(), selected["labels"][b].tolist()):
            if isinstance(label_to_category, Mapping) and label not in label_to_category:
                raise KeyError(f"label {label} has no entry in label_to_category")
            detections.append({"image_id": image_id, "category_id": int(label_to_category[label]),
                               "bbox": box, "score": score})
    return detections


# --------------------------------------------------------------------------------------------------------------------
# Image quality
# --------------------------------------------------------------------------------------------------------------------
def _as_batch(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if a.shape != b.shape:
        raise ValueError(f"{name}: images differ in shape, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() not in (3, 4):
        raise ValueError(f"{name}: expected [3, H, W] or [B, 3, H, W], got {tuple(a.shape)}")
    single = a.dim() == 3
    if single:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    return a.double(), b.double(), single


def psnr(a: torch.Tensor, b: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
         data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image.

    Args:
        a, b: ``[B, 3, H, W]`` or ``[3, H, W]`` in [0, data_range].
        padding_mask: ``[B, H, W]`` (or ``[H, W]``) bool, True = padding, excluded from the MSE.
    Returns:
        ``[B]`` (or a scalar for unbatched input); ``inf`` for identical images.
    """
    a, b, single = _as_batch(a, b, "psnr")
    squared_error = (a - b) ** 2
    if padding_mask is None:
        mse = squared_error.mean(dim=(1, 2, 3))
    else:
        valid = (~padding_mask.bool()).reshape(a.shape[0], 1, *a.shape[2:]).to(a.dtype)
        mse = (squared_error * valid).sum(dim=(1, 2, 3)) / (valid.sum(dim=(1, 2, 3)) * a.shape[1]).clamp(min=1)
    value = 10 * torch.log10(data_range ** 2 / mse)  # mse 0 -> inf
    return value[0] if single else value


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return window / window.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), per image, averaged over channels and window positions.

    Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, population (co)variances, "valid" windows only (no
    padding) — the reference definition, equal to skimage's ``structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)``. Crop batch padding away before calling.

    Args:
        a, b: ``[B, 3, H, W]`` or ``[3, H, W]`` in [0, data_range], H, W >= window_size.
    Returns:
        ``[B]`` (or a scalar for unbatched input).
    """
    a, b, single = _as_batch(a, b, "ssim")
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"ssim: images of {tuple(a.shape[-2:])} are smaller than the {window_size}px window")
    channels = a.shape[1]
    window = _gaussian_window(window_size, sigma, a.dtype, a.device)
    kernel_x = window.view(1, 1, 1, -1).expand(channels, 1, 1, window_size)
    kernel_y = window.view(1, 1, -1, 1).expand(channels, 1, window_size, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        return F.conv2d(F.conv2d(x, kernel_x, groups=channels), kernel_y, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    value = ssim_map.mean(dim=(1, 2, 3))
    return value[0] if single else value
