"""Dataset statistics: images, boxes per class, box-size histogram, fraction of small objects (HR pixels).

"Small" follows COCO: box area w·h < 32² HR pixels (the paper's target regime). Box sizes are binned by
sqrt(w·h). Several COCO files (e.g. train + val) are summed; each file also gets its own line.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm import tqdm

from sdconet.data.coco import CocoIndex, check_image_files, load_coco
from sdconet.data.image_io import DEFAULT_MAX_IMAGE_PIXELS, load_image
from sdconet.data.validation import DataError

SMALL_AREA = 32 * 32
SIZE_EDGES = (0, 8, 16, 32, 64, 128, 256, math.inf)  # sqrt(area) bin edges, HR pixels


def _size_labels() -> list[str]:
    return [f"{lo}-{hi}" if hi != math.inf else f">={lo}" for lo, hi in zip(SIZE_EDGES[:-1], SIZE_EDGES[1:])]


def verify_images(index: CocoIndex, images_dir: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                  progress: bool = True) -> None:
    """Decode every image of ``index`` and check its size against the JSON (DataError naming the file)."""
    check_image_files(index, images_dir)
    for image in tqdm(index.images, desc=f"checking {Path(images_dir).name}", disable=not progress, unit="img"):
        path = Path(images_dir) / image.file_name
        array = load_image(path, max_pixels)
        if array.shape[:2] != (image.height, image.width):
            raise DataError(f"{path}: image is {array.shape[1]}x{array.shape[0]} px but {index.path} says "
                            f"{image.width}x{image.height} (image id {image.id})")


def dataset_stats(ann_files: Sequence[str | Path], strict: bool = False,
                  images_dirs: Optional[Sequence[Optional[str | Path]]] = None,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, progress: bool = True) -> dict[str, Any]:
    """Statistics over one or more COCO files; ``images_dirs`` (one per file, or None) decodes and checks images.

    Keys: ``num_images``, ``num_boxes``, ``small_fraction``, ``per_class`` (name -> boxes), ``size_histogram``
    (sqrt-area bin -> boxes), ``images_without_boxes``, ``num_difficult``, ``box_side`` (min/median/max of
    sqrt(area)), ``files`` (per-file num_images/num_boxes/small_fraction/repairs).
    """
    if not ann_files:
        raise DataError("stats: no annotation files given")
    per_class: dict[str, int] = {}
    areas, files = [], {}
    num_images = without_boxes = difficult = 0
    for k, ann_file in enumerate(ann_files):
        index = load_coco(ann_file, strict=strict)
        if images_dirs is not None and images_dirs[k] is not None:
            verify_images(index, images_dirs[k], max_pixels, progress)
        id_to_name = {c["id"]: c["name"] for c in index.categories}
        for name in index.category_names:
            per_class.setdefault(name, 0)
        file_areas = []
        for image in index.images:
            file_areas.append((image.boxes[:, 2] - image.boxes[:, 0]) * (image.boxes[:, 3] - image.boxes[:, 1]))
            for category_id in image.category_ids:
                per_class[id_to_name[int(category_id)]] += 1
            without_boxes += len(image.boxes) == 0
            difficult += int(image.difficult.sum())
        file_areas = np.concatenate(file_areas)
        num_images += len(index.images)
        areas.append(file_areas)
        files[str(ann_file)] = {"num_images": len(index.images), "num_boxes": int(len(file_areas)),
                                "small_fraction": float((file_areas < SMALL_AREA).mean()) if len(file_areas) else 0.0,
                                "repairs": index.repairs.as_dict()}
    area = np.concatenate(areas)
    side = np.sqrt(area)
    counts, _ = np.histogram(side, bins=np.array(SIZE_EDGES, dtype=np.float64))
    return {
        "num_images": num_images,
        "num_boxes": int(len(area)),
        "small_fraction": float((area < SMALL_AREA).mean()),
        "per_class": per_class,
        "size_histogram": dict(zip(_size_labels(), (int(c) for c in counts))),
        "images_without_boxes": without_boxes,
        "num_difficult": difficult,
        "box_side": {"min": float(side.min()), "median": float(np.median(side)), "max": float(side.max())},
        "files": files,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable tables of :func:`dataset_stats`."""
    lines = [f"images: {stats['num_images']}  (without boxes: {stats['images_without_boxes']})",
             f"boxes:  {stats['num_boxes']}  (difficult: {stats['num_difficult']})",
             f"small objects (area < 32^2 HR px): {100 * stats['small_fraction']:.1f}%",
             "box side sqrt(w*h) px: min {min:.1f}  median {median:.1f}  max {max:.1f}".format(**stats["box_side"]),
             "", f"{'class':<24}{'boxes':>8}{'share':>8}"]
    total = max(stats["num_boxes"], 1)
    for name, count in stats["per_class"].items():
        lines.append(f"{name:<24}{count:>8}{100 * count / total:>7.1f}%")
    lines += ["", f"{'sqrt(area) px':<24}{'boxes':>8}  histogram"]
    peak = max(max(stats["size_histogram"].values()), 1)
    for label, count in stats["size_histogram"].items():
        lines.append(f"{label:<24}{count:>8}  {'#' * round(40 * count / peak)}")
    if len(stats["files"]) > 1:
        lines += ["", f"{'file':<48}{'images':>8}{'boxes':>8}{'small':>8}"]
        for path, entry in stats["files"].items():
            lines.append(f"{path[-48:]:<48}{entry['num_images']:>8}{entry['num_boxes']:>8}"
                         f"{100 * entry['small_fraction']:>7.1f}%")
    return "\n".join(lines)
