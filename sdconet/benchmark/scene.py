"""Scene benchmarks: the seam-merge study (which merge rule leaves one box per object) and scene throughput.

Seam study (no model): objects are planted on a scene with many of them across tile seams and in overlaps; a
simulated detector returns, for every tile, the visible part of every object that shows at least ``min_visible`` of
its area in that tile (jittered, with a score); each merge rule then has to give back one box per object. Reported
per rule: detections per object, objects found (IoU >= 0.5, one-to-one), duplicates, mean IoU of the matches.

Throughput: ``python benchmarks/scene.py --help``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sdconet.scene.merge import MERGE_RULES, merge_detections
from sdconet.scene.tiling import inner_edges, shift_boxes, tile_grid, touches_inner_edge

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


# -- seam study ------------------------------------------------------------------------------------------------------
def plant_seam_objects(tiles: np.ndarray, height: int, width: int, count: int, size: tuple[int, int],
                       rng: np.random.Generator, max_overlap: float = 0.0) -> np.ndarray:
    """``count`` boxes [count, 4] xyxy of side in ``size``, two thirds of them centred on an inner tile edge (cut by
    a seam or inside an overlap), the rest anywhere; two objects overlap by at most ``max_overlap`` IoS (0: apart,
    about 0.3: a crowded parking lot)."""
    edges_x = sorted({int(t[1]) for t in tiles if t[1] > 0} | {int(t[1] + t[3]) for t in tiles if t[1] + t[3] < width})
    edges_y = sorted({int(t[0]) for t in tiles if t[0] > 0} | {int(t[0] + t[2]) for t in tiles if t[0] + t[2] < height})
    boxes: list[np.ndarray] = []
    for _ in range(count * 50):
        if len(boxes) == count:
            break
        w, h = rng.integers(size[0], size[1] + 1, 2)
        cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
        if rng.random() < 2 / 3 and (edges_x or edges_y):
            if edges_x and (not edges_y or rng.random() < 0.5):
                cx = float(np.clip(rng.choice(edges_x) + rng.uniform(-w / 3, w / 3), w / 2, width - w / 2))
            else:
                cy = float(np.clip(rng.choice(edges_y) + rng.uniform(-h / 3, h / 3), h / 2, height - h / 2))
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=np.float32)
        if boxes:
            others = np.stack(boxes)
            inter = ((np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])).clip(0) *
                     (np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])).clip(0))
            smaller = np.minimum((box[2] - box[0]) * (box[3] - box[1]),
                                 (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]))
            if (inter / smaller > max_overlap).any() or (max_overlap == 0 and (inter > 0).any()):
                continue
        boxes.append(box)
    return np.stack(boxes) if boxes else np.zeros((0, 4), np.float32)


def simulate_tile_detections(objects: np.ndarray, tiles: np.ndarray, rng: np.random.Generator,
                             min_visible: float = 0.25, jitter: float = 0.5) -> list[dict[str, np.ndarray]]:
    """Per tile, what a detector would return: the visible part of every object (tile pixels, jittered by
    ``jitter`` px) showing at least ``min_visible`` of its area, scored lower the more of it is cut."""
    areas = (objects[:, 2] - objects[:, 0]) * (objects[:, 3] - objects[:, 1])
    results = []
    for top, left, tile_h, tile_w in tiles.tolist():
        clipped = objects.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(left, left + tile_w)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(top, top + tile_h)
        visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]) / areas
        seen = visible >= min_visible
        boxes = clipped[seen] - np.array([left, top, left, top], np.float32)
        boxes = boxes + rng.normal(0, jitter, boxes.shape).astype(np.float32)
        scores = (0.5 + 0.4 * visible[seen] + rng.uniform(-0.05, 0.05, seen.sum())).astype(np.float32)
        results.append({"boxes": boxes, "scores": scores, "labels": np.zeros(seen.sum(), np.int64)})
    return results


def match_objects(found: np.ndarray, objects: np.ndarray, iou_threshold: float = 0.5) -> tuple[int, list[float]]:
    """Greedy one-to-one matching by IoU (found boxes in the given order): (matched count, IoU of each match)."""
    used = np.zeros(len(objects), dtype=bool)
    ious: list[float] = []
    for box in found:
        inter_w = (np.minimum(box[2], objects[:, 2]) - np.maximum(box[0], objects[:, 0])).clip(0)
        inter_h = (np.minimum(box[3], objects[:, 3]) - np.maximum(box[1], objects[:, 1])).clip(0)
        inter = inter_w * inter_h
        union = ((box[2] - box[0]) * (box[3] - box[1]) +
                 (objects[:, 2] - objects[:, 0]) * (objects[:, 3] - objects[:, 1]) - inter)
        iou = np.where(used, 0.0, inter / union)
        best = int(iou.argmax()) if len(iou) else -1
        if best >= 0 and iou[best] >= iou_threshold:
            used[best] = True
            ious.append(float(iou[best]))
    return int(used.sum()), ious


def merge_tiles(per_tile: Sequence[dict[str, np.ndarray]], tiles: np.ndarray, height: int, width: int,
                rule: str, edge_margin: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shift per-tile detections to scene pixels and merge them with ``rule`` (the same steps as the scene core)."""
    inner = inner_edges(tiles, height, width)
    boxes, scores, labels, tile_index, touches = [], [], [], [], []
    for index, ((top, left, tile_h, tile_w), found) in enumerate(zip(tiles.tolist(), per_tile)):
        boxes.append(shift_boxes(found["boxes"], top, left))
        scores.append(found["scores"])
        labels.append(found["labels"])
        tile_index.append(np.full(len(found["scores"]), index))
        touches.append(touches_inner_edge(found["boxes"], tile_h, tile_w, inner[index], edge_margin))
    return merge_detections(np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels), rule=rule,
                            tile_index=np.concatenate(tile_index), touches_edge=np.concatenate(touches))


def seam_study(scenes: int = 20, size: int = 600, tile: int = 256, overlap: int = 64,
               object_size: tuple[int, int] = (8, 48), objects: int = 40, max_overlap: float = 0.0,
               seed: int = 0) -> dict[str, Any]:
    """Every merge rule on the same ``scenes`` synthetic seam scenes; figures per rule (module docstring)."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(scenes):
        tiles = tile_grid(size, size, tile, overlap)
        planted = plant_seam_objects(tiles, size, size, objects, object_size, rng, max_overlap)
        cases.append((tiles, planted, simulate_tile_detections(planted, tiles, rng)))
    figures: dict[str, Any] = {}
    for rule in MERGE_RULES:
        total_objects = found_total = detections = 0
        ious: list[float] = []
        for tiles, planted, per_tile in cases:
            boxes, _, _ = merge_tiles(per_tile, tiles, size, size, rule)
            matched, match_ious = match_objects(boxes, planted)
            total_objects += len(planted)
            found_total += matched
            detections += len(boxes)
            ious += match_ious
        figures[rule] = {"objects": total_objects, "detections": detections,
                         "detections_per_object": round(detections / total_objects, 4),
                         "recall_iou50": round(found_total / total_objects, 4),
                         "extra_boxes": detections - found_total,
                         "mean_iou": round(float(np.mean(ious)), 4) if ious else None}
    return {"setup": {"scenes": scenes, "size": size, "tile": tile, "overlap": overlap,
                      "object_size": list(object_size), "objects_per_scene": objects,
                      "max_overlap": max_overlap, "seed": seed}, "rules": figures}


def seam_study_markdown(study: dict[str, Any]) -> str:
    lines = ["| merge rule | detections / object | recall (IoU ≥ 0.5) | extra boxes | mean IoU |",
             "|---|---|---|---|---|"]
    for rule, f in study["rules"].items():
        lines.append(f"| {rule} | {f['detections_per_object']:.3f} | {f['recall_iou50']:.3f} | {f['extra_boxes']} | "
                     f"{f['mean_iou']:.3f} |")
    return "\n".join(lines)
