"""Accuracy gate of a reduced-precision artifact against fp32 of the same checkpoint (issue 13 item 5).

AP of a barely trained model says little about a quantization, so the gate measures two things on the validation
set, for any pair of runners (ONNX Runtime, OpenVINO, TensorRT, Triton: every ``sdconet.runtime.Runner``):

* **AP / AP50** of the candidate and of the fp32 reference (COCO, HR pixels of the annotation file), and the AP50
  drop in points;
* **detection agreement**: the fraction of the reference's detections with score >= the project's default score
  threshold that the candidate reproduces, i.e. a candidate detection of the same label with IoU >= ``iou``
  (0.9) and a score at least ``threshold - score_margin`` (a score of 0.29 against 0.31 is the same detection;
  a missing box is not). Matching is one-to-one, greedy in the reference's score order.

:data:`GATE_TARGETS` holds the targets per precision (INT8: agreement >= 95 %, AP50 drop <= 1 point; bf16 / fp16:
agreement >= 98 %).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from sdconet.deploy.quantize import run_dataset
from sdconet.ops.box_ops import box_iou
from sdconet.runtime.base import DEFAULT_SCORE_THRESHOLD, Runner

GATE_IOU = 0.9
DEFAULT_SCORE_MARGIN = 0.05
# precision -> (min agreement, max AP50 drop in points)
GATE_TARGETS: dict[str, dict[str, float]] = {
    "int8": {"min_agreement": 0.95, "max_ap50_drop": 1.0},
    "int8-qdq": {"min_agreement": 0.95, "max_ap50_drop": 1.0},
    "bf16": {"min_agreement": 0.98, "max_ap50_drop": 1.0},
    "fp16": {"min_agreement": 0.98, "max_ap50_drop": 1.0},
}


def detection_agreement(reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]], *,
                        score_threshold: float = DEFAULT_SCORE_THRESHOLD, iou: float = GATE_IOU,
                        score_margin: float = DEFAULT_SCORE_MARGIN) -> dict[str, Any]:
    """Agreement of per-image detections (``boxes [K, 4]`` xyxy, ``scores [K]``, ``labels [K]``; same image order).

    Returns ``agreement`` (matched / reference detections >= threshold; ``None`` when the reference has none),
    ``reference_detections``, ``matched``, ``candidate_detections`` (>= threshold) and ``extra`` (those of them
    matched to no reference detection).
    """
    if len(reference) != len(candidate):
        raise ValueError(f"agreement needs the same images: {len(reference)} reference vs {len(candidate)} "
                         f"candidate results")
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    total = matched = candidates = extra = 0
    for ref, cand in zip(reference, candidate):
        ref_keep = np.flatnonzero(np.asarray(ref["scores"]) >= score_threshold)
        ref_keep = ref_keep[np.argsort(-np.asarray(ref["scores"])[ref_keep], kind="stable")]
        cand_scores = np.asarray(cand["scores"])
        cand_keep = np.flatnonzero(cand_scores >= score_threshold - score_margin)
        total += len(ref_keep)
        candidates += int((cand_scores >= score_threshold).sum())
        used = np.zeros(len(cand_keep), dtype=bool)
        if len(ref_keep) and len(cand_keep):
            overlaps = box_iou(torch.as_tensor(np.asarray(ref["boxes"])[ref_keep], dtype=torch.float64),
                               torch.as_tensor(np.asarray(cand["boxes"])[cand_keep], dtype=torch.float64))[0].numpy()
            same_label = np.asarray(ref["labels"])[ref_keep][:, None] == np.asarray(cand["labels"])[cand_keep][None]
            overlaps = np.where(same_label & (overlaps >= iou), overlaps, -1.0)
            for row in range(len(ref_keep)):
                scores = np.where(used, -1.0, overlaps[row])
                best = int(scores.argmax())
                if scores[best] >= 0.0:
                    used[best] = True
                    matched += 1
        extra += int((~used & (cand_scores[cand_keep] >= score_threshold)).sum())
    return {"agreement": matched / total if total else None, "reference_detections": total, "matched": matched,
            "candidate_detections": candidates, "extra": extra}


def accuracy_gate(reference_runner: Runner, candidate_runner: Runner, dataset, *, limit: int | None = None,
                  score_threshold: float = DEFAULT_SCORE_THRESHOLD, iou: float = GATE_IOU,
                  min_agreement: float | None = None, max_ap50_drop: float | None = None,
                  score_margin: float = DEFAULT_SCORE_MARGIN, imgsz: int | None = None) -> dict[str, Any]:
    """Gate ``candidate_runner`` (a reduced-precision artifact) against ``reference_runner`` (fp32, same checkpoint)
    on ``dataset`` (a COCO dataset of ``sdconet.data``, normally the validation split).

    Targets default to :data:`GATE_TARGETS` for the candidate's precision. ``imgsz`` defaults to the runners'.
    Returns ``AP``, ``AP50`` (candidate), ``AP_fp32``, ``AP50_fp32``, ``ap50_drop_points``, the agreement figures of
    :func:`detection_agreement`, the targets, ``images``, ``passed`` and, when it failed, ``reasons``.
    """
    from sdconet.engine.metrics import coco_evaluate

    targets = GATE_TARGETS.get(candidate_runner.precision, GATE_TARGETS["int8"])
    min_agreement = targets["min_agreement"] if min_agreement is None else min_agreement
    max_ap50_drop = targets["max_ap50_drop"] if max_ap50_drop is None else max_ap50_drop
    imgsz = imgsz or candidate_runner.imgsz or reference_runner.imgsz
    if imgsz is None:
        raise ValueError("accuracy_gate: neither runner has a fixed input size; pass imgsz")
    if reference_runner.imgsz not in (None, imgsz) or candidate_runner.imgsz not in (None, imgsz):
        raise ValueError(f"accuracy_gate: the runners take {reference_runner.imgsz} and {candidate_runner.imgsz} "
                         f"px inputs; both must take {imgsz}")
    if len(dataset) == 0:
        raise ValueError("accuracy_gate: the validation dataset is empty")
    ref_images, ref_dets, image_ids = run_dataset(reference_runner, dataset, imgsz, limit,
                                                  desc=f"{reference_runner.backend} {reference_runner.precision}")
    cand_images, cand_dets, _ = run_dataset(candidate_runner, dataset, imgsz, limit,
                                            desc=f"{candidate_runner.backend} {candidate_runner.precision}")
    ref_ap = coco_evaluate(dataset.ann_file, ref_dets, image_ids=image_ids)
    cand_ap = coco_evaluate(dataset.ann_file, cand_dets, image_ids=image_ids)
    agreement = detection_agreement(ref_images, cand_images, score_threshold=score_threshold, iou=iou,
                                    score_margin=score_margin)
    drop = (ref_ap["AP50"] - cand_ap["AP50"]) * 100.0
    reasons = []
    if agreement["agreement"] is None:
        reasons.append(f"the fp32 model has no detection with score >= {score_threshold} on these images: "
                       f"agreement cannot be measured")
    elif agreement["agreement"] < min_agreement:
        reasons.append(f"agreement {agreement['agreement']:.3f} < {min_agreement}")
    if drop > max_ap50_drop:
        reasons.append(f"AP50 drop {drop:.2f} points > {max_ap50_drop}")
    result = {"AP": cand_ap["AP"], "AP50": cand_ap["AP50"], "AP_fp32": ref_ap["AP"], "AP50_fp32": ref_ap["AP50"],
              "ap50_drop_points": round(drop, 3), **agreement, "images": len(image_ids),
              "score_threshold": score_threshold, "iou": iou, "score_margin": score_margin,
              "min_agreement": min_agreement, "max_ap50_drop": max_ap50_drop,
              "reference": reference_runner.describe(), "candidate": candidate_runner.describe(),
              "passed": not reasons}
    if reasons:
        result["reasons"] = reasons
    return result
