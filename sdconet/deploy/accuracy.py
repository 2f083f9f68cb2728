"""Accuracy gate of a reduced-precision artifact against fp32 of the same checkpoint (issue 13 item 5).

AP of a barely trained model says little about a quantization, so the gate measures two things on the validation
set, for any pair of runners (ONNX Runtime, OpenVINO, TensorRT, Triton: every ``sdconet.runtime.Runner``):

* **AP / AP50** of the candidate and of the fp32 reference (COCO, HR pixels of the annotation file), and the AP50
  drop in points;
* **detection agreement**: the fraction of the reference's detections with score >= the project's default score
  threshold that the candidate reproduces, i.e. a candidate detection of the same label with IoU >= ``iou``
  (0.9) and a score at least ``threshold - score_margin`` (a score of 0.29 against 0.31 is the same detection;
  a missing box is not). Matching is one-to-one, greedy in the reference's score order.

:data:`GATE_TARGETS` holds the targets per precision: agreement, the AP50 drop and the AP@[.5:.95] drop in points
(``max_ap_drop``: 0.5 for the TensorRT Q/DQ graph, 1.0 for the CPU quantizers' models) and, for INT8, the share of
the graph's MACs that really runs in INT8 (``min_int8_mac_fraction``: a graph that keeps everything in float would
pass the other checks trivially).

The gate runs on a **held-out** set of at least :data:`DEFAULT_GATE_IMAGES` images (:func:`gate_dataset`): a
synthetic split generated with a seed the training data never used, or the user's ``--gate-images DIR --gate-ann
FILE``; 32 validation images could not tell a 0.5 point drop from noise.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sdconet.deploy.quantize import run_dataset
from sdconet.ops.box_ops import box_iou
from sdconet.runtime.base import DEFAULT_SCORE_THRESHOLD, Runner

GATE_IOU = 0.9
DEFAULT_SCORE_MARGIN = 0.05
DEFAULT_GATE_IMAGES = 200
HELDOUT_SEED_OFFSET = 1000  # the gate's synthetic seed = training seed + this (never a training image)
# precision -> targets (agreement, AP50 / AP drops in points, INT8 share of the MACs)
GATE_TARGETS: dict[str, dict[str, float]] = {
    "int8": {"min_agreement": 0.95, "max_ap50_drop": 1.0, "max_ap_drop": 1.0, "min_int8_mac_fraction": 0.5},
    "int8-qdq": {"min_agreement": 0.95, "max_ap50_drop": 1.0, "max_ap_drop": 0.5, "min_int8_mac_fraction": 0.5},
    "int8-qat": {"min_agreement": 0.95, "max_ap50_drop": 1.0, "max_ap_drop": 0.3, "min_int8_mac_fraction": 0.8},
    "bf16": {"min_agreement": 0.98, "max_ap50_drop": 1.0, "max_ap_drop": 1.0},
    "fp16": {"min_agreement": 0.98, "max_ap50_drop": 1.0, "max_ap_drop": 1.0},
    # another fp32 artifact of the same checkpoint (a re-export, another runtime): no INT8 share to ask for
    "fp32": {"min_agreement": 0.98, "max_ap50_drop": 1.0, "max_ap_drop": 1.0},
}


def gate_dataset(data_cfg, upscale: int, *, images: int = DEFAULT_GATE_IMAGES, gate_images: str | Path | None = None,
                 gate_ann: str | Path | None = None):
    """The held-out set the gate runs on (no augmentation).

    ``gate_images`` + ``gate_ann``: the user's COCO images and JSON (all of their images). Otherwise, for the
    embedded synthetic dataset, ``images`` fresh images of the same generator settings with the seed
    ``seed + HELDOUT_SEED_OFFSET`` (generated once into the data cache); for a dataset on disk, its validation split
    (a warning when it has fewer than ``images``).
    """
    from sdconet.data import build_dataset
    from sdconet.data.dataset import CocoDetection
    from sdconet.utils.logging import get_logger

    if (gate_images is None) != (gate_ann is None):
        raise ValueError("--gate-images and --gate-ann go together (a folder of images and its COCO JSON)")
    if gate_images is not None:
        if not Path(gate_images).is_dir():
            raise ValueError(f"--gate-images {gate_images}: not a directory")
        if not Path(gate_ann).is_file():
            raise ValueError(f"--gate-ann {gate_ann}: file not found")
        return CocoDetection(Path(gate_images), Path(gate_ann), data_cfg, upscale, False)
    if images < 1:
        raise ValueError(f"--gate-count must be >= 1, got {images}")
    if data_cfg.root is None:
        synthetic = dataclasses.replace(data_cfg.synthetic, num_images=images, val_fraction=0.0,
                                        seed=data_cfg.synthetic.seed + HELDOUT_SEED_OFFSET)
        # val_fraction 0: every held-out image lands in the "train" folder of that cache entry
        return build_dataset(dataclasses.replace(data_cfg, synthetic=synthetic), "train", upscale, train=False)
    dataset = build_dataset(data_cfg, "val", upscale, train=False)
    if len(dataset) < images:
        get_logger(__name__).warning("accuracy gate: the validation split has %d images (< %d): pass --gate-images "
                                     "DIR --gate-ann FILE for a gate worth trusting", len(dataset), images)
    return dataset


def reference_results(runner: Runner, dataset, imgsz: int, limit: int | None = None) -> dict[str, Any]:
    """The fp32 side of :func:`accuracy_gate` (per-image outputs, COCO AP, image ids), computed once and passed as
    ``reference=`` to gate several candidates on the same images."""
    from sdconet.engine.metrics import coco_evaluate

    images, detections, image_ids = run_dataset(runner, dataset, imgsz, limit,
                                                desc=f"{runner.backend} {runner.precision}")
    return {"images": images, "image_ids": image_ids, "ap": coco_evaluate(dataset.ann_file, detections,
                                                                           image_ids=image_ids),
            "describe": runner.describe(), "imgsz": imgsz, "limit": limit}


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
                  max_ap_drop: float | None = None, min_int8_mac_fraction: float | None = None,
                  score_margin: float = DEFAULT_SCORE_MARGIN, imgsz: int | None = None,
                  reference: dict[str, Any] | None = None, macs: dict[str, Any] | None = None,
                  target: str | None = None) -> dict[str, Any]:
    """Gate ``candidate_runner`` (a reduced-precision artifact) against ``reference_runner`` (fp32, same checkpoint)
    on ``dataset`` (a COCO dataset of ``sdconet.data``, normally the validation split).

    Targets default to :data:`GATE_TARGETS` of ``target`` (default: the candidate's precision). ``imgsz`` defaults
    to the runners'. ``reference``: :func:`reference_results` of ``reference_runner`` on the same images (computed
    here when None). ``macs``: :func:`sdconet.deploy.layer_groups.int8_mac_fraction` of the candidate (INT8 targets
    need it). Returns ``AP``, ``AP50``, ``AP75`` (candidate), ``AP_fp32``, ``AP50_fp32``, ``AP75_fp32``,
    ``ap_drop_points`` (AP@[.5:.95]), ``ap50_drop_points``, ``int8_mac_fraction``, the agreement figures of
    :func:`detection_agreement`, the targets, ``images``, ``passed`` and, when it failed, ``reasons``.
    """
    from sdconet.engine.metrics import coco_evaluate

    target = target or candidate_runner.precision
    targets = GATE_TARGETS.get(target, GATE_TARGETS["int8"])
    min_agreement = targets["min_agreement"] if min_agreement is None else min_agreement
    max_ap50_drop = targets["max_ap50_drop"] if max_ap50_drop is None else max_ap50_drop
    max_ap_drop = targets["max_ap_drop"] if max_ap_drop is None else max_ap_drop
    if min_int8_mac_fraction is None:
        min_int8_mac_fraction = targets.get("min_int8_mac_fraction")
    imgsz = imgsz or candidate_runner.imgsz or reference_runner.imgsz
    if imgsz is None:
        raise ValueError("accuracy_gate: neither runner has a fixed input size; pass imgsz")
    if reference_runner.imgsz not in (None, imgsz) or candidate_runner.imgsz not in (None, imgsz):
        raise ValueError(f"accuracy_gate: the runners take {reference_runner.imgsz} and {candidate_runner.imgsz} "
                         f"px inputs; both must take {imgsz}")
    if len(dataset) == 0:
        raise ValueError("accuracy_gate: the validation dataset is empty")
    if reference is None:
        reference = reference_results(reference_runner, dataset, imgsz, limit)
    elif reference["imgsz"] != imgsz or reference["limit"] != limit:
        raise ValueError(f"accuracy_gate: the reference results were computed at {reference['imgsz']} px on "
                         f"{reference['limit']} images, not {imgsz} px on {limit}")
    ref_images, image_ids, ref_ap = reference["images"], reference["image_ids"], reference["ap"]
    cand_images, cand_dets, _ = run_dataset(candidate_runner, dataset, imgsz, limit,
                                            desc=f"{candidate_runner.backend} {candidate_runner.precision}")
    cand_ap = coco_evaluate(dataset.ann_file, cand_dets, image_ids=image_ids)
    agreement = detection_agreement(ref_images, cand_images, score_threshold=score_threshold, iou=iou,
                                    score_margin=score_margin)
    drop = (ref_ap["AP50"] - cand_ap["AP50"]) * 100.0
    ap_drop = (ref_ap["AP"] - cand_ap["AP"]) * 100.0
    fraction = None if macs is None else macs["int8_mac_fraction"]
    reasons = []
    if agreement["agreement"] is None:
        reasons.append(f"the fp32 model has no detection with score >= {score_threshold} on these images: "
                       f"agreement cannot be measured")
    elif agreement["agreement"] < min_agreement:
        reasons.append(f"agreement {agreement['agreement']:.3f} < {min_agreement}")
    if drop > max_ap50_drop:
        reasons.append(f"AP50 drop {drop:.2f} points > {max_ap50_drop}")
    if ap_drop > max_ap_drop:
        reasons.append(f"AP drop {ap_drop:.2f} points > {max_ap_drop}")
    if min_int8_mac_fraction is not None:
        if fraction is None:
            reasons.append("int8_mac_fraction not measured (the INT8 target needs it)")
        elif fraction < min_int8_mac_fraction:
            reasons.append(f"int8_mac_fraction {fraction:.3f} < {min_int8_mac_fraction}")
    result = {"AP": cand_ap["AP"], "AP50": cand_ap["AP50"], "AP75": cand_ap["AP75"], "AP_fp32": ref_ap["AP"],
              "AP50_fp32": ref_ap["AP50"], "AP75_fp32": ref_ap["AP75"], "ap_drop_points": round(ap_drop, 3),
              "ap50_drop_points": round(drop, 3), "int8_mac_fraction": fraction, **agreement,
              "images": len(image_ids), "score_threshold": score_threshold, "iou": iou, "score_margin": score_margin,
              "target": target, "min_agreement": min_agreement, "max_ap50_drop": max_ap50_drop,
              "max_ap_drop": max_ap_drop, "min_int8_mac_fraction": min_int8_mac_fraction,
              "reference": reference["describe"], "candidate": candidate_runner.describe(),
              "passed": not reasons}
    if macs is not None:
        result["macs"] = {k: v for k, v in macs.items() if k != "int8_mac_fraction"}
    if reasons:
        result["reasons"] = reasons
    return result
