"""The COCO detection dataset the trainer, evaluator and exporter read, its collate function and ``build_dataset``.

An item follows docs/architecture.md ("Data -> trainer"): the HR image from the file (after augmentation), the LR
network input made from it by :func:`sdconet.data.degradation.degrade`, and the target dict. HR sizes that are not
multiples of the upscale factor are **cropped** at the bottom/right (at most ``upscale - 1`` pixels, origin unchanged,
boxes clipped): nothing is resized, so normalised boxes times ``target["size"]`` are pixel coordinates of the file.
Padding to the Swin encoder's multiple of 32 (LR) is the collate's / trainer's job (``size_divisibility``).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sdconet.config import DataConfig
from sdconet.data.coco import CocoIndex, check_image_files, load_coco, write_coco
from sdconet.data.degradation import DEGRADATION_MODES, RealisticDegradation, degrade
from sdconet.data.image_io import load_image
from sdconet.data.synthetic import ensure_synthetic_dataset
from sdconet.data.transforms import RandomGeometry, crop_to_multiple
from sdconet.data.validation import DataError
from sdconet.ops.box_ops import box_xyxy_to_cxcywh
from sdconet.utils.logging import get_logger

logger = get_logger(__name__)

SPLITS = ("train", "val")


class CocoDetection(Dataset):
    """HR images + COCO JSON -> ``dict(image_lr, image_hr, target)`` items.

    Args:
        images_dir: folder the JSON's ``file_name`` entries are relative to.
        ann_file: COCO JSON, boxes in HR pixels of the files.
        cfg: data settings (degradation, augmentation flags, strictness, seed, pixel limit).
        upscale: HR / LR factor (``model.upscale``).
        train: apply the random augmentations (``set_epoch`` changes them per epoch, reproducibly).
    """

    def __init__(self, images_dir: str | Path, ann_file: str | Path, cfg: DataConfig, upscale: int = 2,
                 train: bool = False) -> None:
        if cfg.degradation not in DEGRADATION_MODES:
            raise DataError(f"data.degradation='{cfg.degradation}' is not one of {', '.join(DEGRADATION_MODES)}")
        if cfg.random_crop is not None and (cfg.random_crop <= 0 or cfg.random_crop % upscale):
            raise DataError(f"data.random_crop={cfg.random_crop} must be a positive multiple of the upscale {upscale}")
        self.cfg = cfg
        self.images_dir = Path(images_dir)
        self.upscale = upscale
        self.train = train
        self.epoch = 0
        self.index: CocoIndex = load_coco(ann_file, strict=cfg.strict)
        check_image_files(self.index, self.images_dir)
        self.category_names: list[str] = self.index.category_names
        self.num_classes = len(self.category_names)
        self.label_to_category_id: list[int] = self.index.label_to_category_id
        self._category_to_label = {cat_id: label for label, cat_id in enumerate(self.label_to_category_id)}
        self.realistic = RealisticDegradation.from_config(cfg)
        self.augment = (RandomGeometry(cfg.hflip, cfg.vflip, cfg.rot90, cfg.random_crop, cfg.min_box_area_fraction)
                        if train else None)
        self.ann_file = self._evaluation_ann_file()

    def _evaluation_ann_file(self) -> Path:
        """The JSON evaluation compares against: the source file when it needs no change, else a validated copy
        (repaired boxes; ignored boxes as ``iscrowd=1``) in ``cache_dir/eval_gt/``, so evaluation and training
        see the same ground truth."""
        has_difficult = any(image.difficult.any() for image in self.index.images)
        if self.index.repairs.total == 0 and not (self.cfg.ignore_difficult and has_difficult):
            return self.index.path
        source = self.index.path.resolve()
        stat = source.stat()
        key = hashlib.sha1(json.dumps([str(source), stat.st_mtime_ns, stat.st_size, self.cfg.ignore_difficult,
                                       self.cfg.strict]).encode()).hexdigest()[:12]
        path = Path(self.cfg.cache_dir) / "eval_gt" / f"{source.stem}-{key}.json"
        if not path.is_file():
            data = self.index.to_coco_dict(ignore_difficult=self.cfg.ignore_difficult)
            write_coco(path, data["images"], data["annotations"], data["categories"], data["info"]["description"])
            logger.info("evaluation ground truth (repaired / difficult ignored): %s", path)
        return path

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation draws (item i of epoch e always gets the same ones)."""
        self.epoch = epoch

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.index.images[index].file_name

    def __len__(self) -> int:
        return len(self.index.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.index.images[index]
        path = self.image_path(index)
        array = load_image(path, self.cfg.max_image_pixels)
        if array.shape[:2] != (record.height, record.width):
            raise DataError(f"{path}: image is {array.shape[1]}x{array.shape[0]} px but {self.index.path} says "
                            f"{record.width}x{record.height} (image id {record.id})")
        image_hr = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        boxes = torch.from_numpy(record.boxes).float()
        kept = torch.arange(len(boxes))
        seed_words = [self.cfg.seed, self.epoch, index] if self.train else [self.cfg.seed, index]
        rng = np.random.default_rng(seed_words)
        if self.augment is not None:
            image_hr, boxes, keep = self.augment(image_hr, boxes, rng)
            kept = kept[keep]
        image_hr, boxes, keep = crop_to_multiple(image_hr, boxes, self.upscale, self.cfg.min_box_area_fraction)
        kept = kept[keep]
        image_lr = degrade(image_hr, self.upscale, self.cfg.degradation, seed=int(rng.integers(2**62)),
                           realistic=self.realistic)

        height, width = image_hr.shape[-2:]
        labels = torch.tensor([self._category_to_label[int(c)] for c in record.category_ids], dtype=torch.int64)
        ignore = torch.from_numpy(record.iscrowd | (record.difficult & self.cfg.ignore_difficult))
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {
            "boxes": box_xyxy_to_cxcywh(boxes) / scale,
            "boxes_xyxy": boxes,
            "labels": labels[kept],
            "ignore": ignore[kept],
            "image_id": record.id,
            "size": torch.tensor([height, width], dtype=torch.int64),
            "orig_size": torch.tensor([record.height, record.width], dtype=torch.int64),
        }
        return {"image_lr": image_lr, "image_hr": image_hr, "target": target}


def collate_fn(batch: list[dict[str, Any]], size_divisibility: int = 1) -> dict[str, Any]:
    """Pad a list of items bottom/right to the largest image -> batch dict (docs/architecture.md).

    ``size_divisibility`` additionally rounds the LR size up to a multiple (e.g. 32 for the Swin encoder; the HR
    padding follows at ``upscale`` times). Masks are True on padding.
    """
    scale = batch[0]["image_hr"].shape[-1] // batch[0]["image_lr"].shape[-1]
    lr_height = max(item["image_lr"].shape[-2] for item in batch)
    lr_width = max(item["image_lr"].shape[-1] for item in batch)
    lr_height = math.ceil(lr_height / size_divisibility) * size_divisibility
    lr_width = math.ceil(lr_width / size_divisibility) * size_divisibility
    size = len(batch)
    images_lr = batch[0]["image_lr"].new_zeros(size, 3, lr_height, lr_width)
    images_hr = batch[0]["image_hr"].new_zeros(size, 3, lr_height * scale, lr_width * scale)
    masks_lr = torch.ones(size, lr_height, lr_width, dtype=torch.bool)
    masks_hr = torch.ones(size, lr_height * scale, lr_width * scale, dtype=torch.bool)
    for i, item in enumerate(batch):
        h, w = item["image_lr"].shape[-2:]
        if tuple(item["image_hr"].shape[-2:]) != (h * scale, w * scale):
            raise ValueError(f"batch item {i}: HR {tuple(item['image_hr'].shape[-2:])} is not {scale} x LR {(h, w)}")
        images_lr[i, :, :h, :w] = item["image_lr"]
        masks_lr[i, :h, :w] = False
        images_hr[i, :, :h * scale, :w * scale] = item["image_hr"]
        masks_hr[i, :h * scale, :w * scale] = False
    return {"images_lr": images_lr, "masks_lr": masks_lr, "images_hr": images_hr, "masks_hr": masks_hr,
            "targets": [item["target"] for item in batch]}


def build_dataset(cfg: DataConfig, split: str, upscale: int, train: bool) -> CocoDetection:
    """The dataset of ``split`` ("train" | "val"); ``cfg.root=None`` -> the synthetic dataset, generated on first use
    into ``cfg.cache_dir``. Augmentations only when ``train``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if cfg.root is None:
        root = ensure_synthetic_dataset(cfg.synthetic, cfg.cache_dir)
    else:
        root = Path(cfg.root)
        if not root.is_dir():
            raise DataError(f"data.root folder not found: {root}")
    ann_file = root / (cfg.train_json if split == "train" else cfg.val_json)
    images_dir = root / (cfg.train_images if split == "train" else cfg.val_images)
    return CocoDetection(images_dir, ann_file, cfg, upscale, train)
