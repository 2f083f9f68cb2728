"""Patch splitter for large scenes (the "-Split" datasets, e.g. NWPU VHR-10-Split, DOTA split to 512 px).

A window (default 512 px) slides with ``window - overlap`` steps; the last window in each direction is aligned to
the image's far edge so the whole image is covered (images smaller than the window give one patch of their own size).
Boxes are clipped to each window and kept where they keep at least ``min_area_fraction`` of their area. Patches
without boxes are written only with ``keep_empty``. Train/val assignment (``val_fraction``) is per *source* image, so
overlapping patches of one scene never leak across splits.

Accounting: every source box is counted as *covered* (in at least one patch) or *dropped by the area rule*
(no window keeps enough of it); the two always add up to the source count, and the report says so.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sdconet.data.coco import CocoBuilder, load_coco
from sdconet.data.image_io import DEFAULT_MAX_IMAGE_PIXELS, load_image, save_image
from sdconet.data.transforms import clip_boxes_to_window
from sdconet.data.validation import DataError
from sdconet.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class SplitSettings:
    """How to cut scenes into patches."""

    window: int = 512
    overlap: int = 128
    min_area_fraction: float = 0.5
    keep_empty: bool = False
    val_fraction: float = 0.0  # > 0: random train/val split by source image; 0: everything goes to ``subset``
    subset: str = "train"
    seed: int = 0

    def validate(self) -> None:
        if self.window <= 0 or not 0 <= self.overlap < self.window:
            raise DataError(f"split: need window > 0 and 0 <= overlap < window, got window={self.window}, "
                            f"overlap={self.overlap}")
        if not 0.0 <= self.min_area_fraction <= 1.0:
            raise DataError(f"split: min_area_fraction must be in [0, 1], got {self.min_area_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"split: val_fraction must be in [0, 1), got {self.val_fraction}")


def window_starts(length: int, window: int, step: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with windows of ``window`` px every ``step`` px (last one flush)."""
    if length <= window:
        return [0]
    return sorted(set(range(0, length - window, step)) | {length - window})


def _assign_splits(num_images: int, settings: SplitSettings) -> list[str]:
    """Split name per source image: all ``subset``, or a seeded random ``val_fraction`` of them ``val``."""
    if settings.val_fraction == 0:
        return [settings.subset] * num_images
    splits = ["train"] * num_images
    order = np.random.default_rng(settings.seed).permutation(num_images)
    for i in order[:round(num_images * settings.val_fraction)]:
        splits[int(i)] = "val"
    return splits


def split_dataset(images_dir: str | Path, ann_file: str | Path, out_dir: str | Path, settings: SplitSettings,
                  strict: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                  progress: bool = True) -> dict[str, Any]:
    """Cut every image of a COCO dataset into patches -> ``out_dir/images/<split>/`` + ``annotations/<split>.json``
    (+ ``split_report.json``) -> report dict."""
    settings.validate()
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    index = load_coco(ann_file, strict=strict)
    split_of = _assign_splits(len(index.images), settings)
    builders: dict[str, CocoBuilder] = {}
    counts = {"source_images": len(index.images), "source_boxes": index.num_boxes, "patches": 0,
              "empty_patches_kept": 0, "empty_patches_skipped": 0, "box_instances": 0, "boxes_covered": 0,
              "boxes_dropped_by_area": 0}
    step = settings.window - settings.overlap
    for i, record in enumerate(tqdm(index.images, desc="splitting", disable=not progress, unit="img")):
        split = split_of[i]
        builder = builders.setdefault(split, CocoBuilder(index.categories, f"{ann_file} -> {split}", strict))
        image = load_image(images_dir / record.file_name, max_pixels)
        if image.shape[:2] != (record.height, record.width):
            raise DataError(f"{images_dir / record.file_name}: image is {image.shape[1]}x{image.shape[0]} px but "
                            f"{ann_file} says {record.width}x{record.height}")
        boxes = torch.from_numpy(record.boxes)
        covered = np.zeros(len(boxes), dtype=bool)
        stem = Path(record.file_name).stem
        for y in window_starts(record.height, settings.window, step):
            for x in window_starts(record.width, settings.window, step):
                width, height = min(settings.window, record.width), min(settings.window, record.height)
                clipped, keep = clip_boxes_to_window(boxes, (x, y, x + width, y + height),
                                                     settings.min_area_fraction)
                keep = keep.numpy()
                if not keep.any():
                    if not settings.keep_empty:
                        counts["empty_patches_skipped"] += 1
                        continue
                    counts["empty_patches_kept"] += 1
                covered |= keep
                file_name = f"{stem}__{x}_{y}.png"
                save_image(image[y:y + height, x:x + width], out_dir / "images" / split / file_name)
                patch_id = builder.add_image(file_name, width, height, source_file=record.file_name,
                                             source_image_id=record.id, offset=[x, y])
                for j in np.flatnonzero(keep):
                    builder.add_box(patch_id, int(record.category_ids[j]), clipped[j].tolist(),
                                    f"{file_name} box from annotation id {int(record.annotation_ids[j])}",
                                    difficult=bool(record.difficult[j]), iscrowd=bool(record.iscrowd[j]))
                counts["patches"] += 1
                counts["box_instances"] += int(keep.sum())
        counts["boxes_covered"] += int(covered.sum())
        counts["boxes_dropped_by_area"] += int((~covered).sum())
    report: dict[str, Any] = {"settings": asdict(settings), "counts": counts, "splits": {}}
    for split, builder in builders.items():
        report["splits"][split] = builder.write(out_dir / "annotations" / f"{split}.json",
                                                f"patches of {ann_file} ({split})")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "split_report.json").write_text(json.dumps(report, indent=2))
    logger.info("split: %d source images -> %d patches; %d of %d boxes covered, %d dropped by the area rule "
                "(min_area_fraction=%g), %d box instances written", counts["source_images"], counts["patches"],
                counts["boxes_covered"], counts["source_boxes"], counts["boxes_dropped_by_area"],
                settings.min_area_fraction, counts["box_instances"])
    return report
