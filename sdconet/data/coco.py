"""COCO JSON (horizontal boxes) reading with validation, and writing.

:func:`load_coco` checks the whole file up front and returns a :class:`CocoIndex`: per image the boxes in xyxy HR
pixels after box repairs, category ids, ``difficult`` and ``iscrowd`` flags. Category ids map to contiguous labels
``0..C-1`` in increasing id order; the names are kept. Converters, the splitter and the synthetic generator all write
through :func:`write_coco`, so every file this package produces has the same fields: ``bbox`` [x, y, w, h],
``area`` = w·h, ``iscrowd``, and ``difficult`` where the source format has it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from sdconet.data.validation import BoxRepairs, DataError
from sdconet.utils.io import write_text_atomically


@dataclass
class CocoImage:
    """One image entry and its (repaired) annotations; boxes ``[n, 4]`` xyxy pixels."""

    id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    category_ids: np.ndarray
    difficult: np.ndarray
    iscrowd: np.ndarray
    annotation_ids: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)  # other image fields (e.g. the splitter's patch origin)


@dataclass
class CocoIndex:
    """A validated COCO file: images with annotations and categories sorted by id."""

    path: Path
    images: list[CocoImage]
    categories: list[dict[str, Any]]
    repairs: BoxRepairs

    @property
    def category_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    @property
    def label_to_category_id(self) -> list[int]:
        return [int(c["id"]) for c in self.categories]

    @property
    def num_boxes(self) -> int:
        return sum(len(image.boxes) for image in self.images)

    def to_coco_dict(self, ignore_difficult: bool = False) -> dict[str, Any]:
        """The repaired dataset as COCO JSON; with ``ignore_difficult`` difficult boxes become ``iscrowd=1``, which
        pycocotools treats as ignore regions (matching them is neither a true nor a false positive)."""
        images, annotations = [], []
        for image in self.images:
            images.append({"id": image.id, "file_name": image.file_name, "width": image.width,
                           "height": image.height, **image.extra})
            for box, category_id, difficult, crowd, ann_id in zip(image.boxes, image.category_ids, image.difficult,
                                                                  image.iscrowd, image.annotation_ids):
                ignored = bool(crowd) or (ignore_difficult and bool(difficult))
                annotations.append(make_annotation(int(ann_id), image.id, int(category_id), box.tolist(),
                                                   bool(difficult), ignored))
        return {"info": {"description": f"validated copy of {self.path}"}, "images": images,
                "annotations": annotations, "categories": self.categories}


def make_annotation(ann_id: int, image_id: int, category_id: int, box_xyxy: Sequence[float],
                    difficult: Optional[bool] = None, iscrowd: bool = False) -> dict[str, Any]:
    """A COCO annotation dict from an xyxy box (``difficult`` is written only when the source format has it)."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    annotation = {"id": ann_id, "image_id": image_id, "category_id": category_id,
                  "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(iscrowd)}
    if difficult is not None:
        annotation["difficult"] = int(difficult)
    return annotation


def write_coco(path: str | Path, images: list[dict], annotations: list[dict], categories: list[dict],
               description: str = "") -> Path:
    """Write a COCO JSON atomically (temporary file + rename)."""
    data = {"info": {"description": description}, "images": images, "annotations": annotations,
            "categories": categories}
    return write_text_atomically(path, json.dumps(data))


class CocoBuilder:
    """Collects images and boxes (repairing box defects through :class:`BoxRepairs`) and writes one COCO JSON."""

    def __init__(self, categories: list[dict[str, Any]], source: str, strict: bool = False) -> None:
        self.categories = categories
        self.repairs = BoxRepairs(source, strict=strict)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add_image(self, file_name: str, width: int, height: int, **extra: Any) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height),
                            **extra})
        return image_id

    def add_box(self, image_id: int, category_id: int, box_xyxy: Sequence[float], item: str,
                difficult: Optional[bool] = None, iscrowd: bool = False) -> bool:
        """Add a box (repaired against its image); False when it had to be dropped."""
        image = self.images[image_id - 1]
        box = self.repairs.repair(box_xyxy, image["width"], image["height"], item)
        if box is None:
            return False
        self.annotations.append(make_annotation(len(self.annotations) + 1, image_id, category_id, box, difficult,
                                                iscrowd))
        return True

    def write(self, path: str | Path, description: str) -> dict[str, Any]:
        """Write the JSON -> summary (images, boxes, images without boxes, boxes per class, repairs)."""
        if not self.annotations:
            raise DataError(f"{self.repairs.source}: no annotations found; nothing written to {path}")
        self.repairs.log()
        write_coco(path, self.images, self.annotations, self.categories, description)
        names = {c["id"]: c["name"] for c in self.categories}
        per_class = {name: 0 for name in names.values()}
        for annotation in self.annotations:
            per_class[names[annotation["category_id"]]] += 1
        with_boxes = {annotation["image_id"] for annotation in self.annotations}
        return {"out": str(path), "images": len(self.images), "boxes": len(self.annotations),
                "images_without_boxes": len(self.images) - len(with_boxes), "per_class": per_class,
                "repairs": self.repairs.as_dict()}


def _require(container: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in container:
        raise DataError(f"{where}: missing field '{key}'")
    value = container[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DataError(f"{where}: field '{key}' has invalid value {value!r}")
    return value


def load_coco(path: str | Path, strict: bool = False) -> CocoIndex:
    """Read and validate a COCO JSON; box defects are repaired and counted (errors when ``strict``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or invalid '{key}' list")
    if not data["categories"]:
        raise DataError(f"{path}: the 'categories' list is empty")
    if not data["images"]:
        raise DataError(f"{path}: the 'images' list is empty")
    if not data["annotations"]:
        raise DataError(f"{path}: the 'annotations' list is empty (no objects to train or evaluate on)")

    categories: dict[int, dict] = {}
    for i, category in enumerate(data["categories"]):
        where = f"{path}: categories[{i}]"
        if not isinstance(category, dict):
            raise DataError(f"{where}: must be an object")
        cat_id = _require(category, "id", int, where)
        name = _require(category, "name", str, where)
        if cat_id in categories:
            raise DataError(f"{where}: duplicate category id {cat_id}")
        categories[cat_id] = {"id": cat_id, "name": name}

    images: dict[int, dict] = {}
    for i, image in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict):
            raise DataError(f"{where}: must be an object")
        image_id = _require(image, "id", int, where)
        _require(image, "file_name", str, where)
        for key in ("width", "height"):
            if _require(image, key, int, where) <= 0:
                raise DataError(f"{where} ('{image['file_name']}'): {key} must be positive, got {image[key]}")
        if image_id in images:
            raise DataError(f"{where}: duplicate image id {image_id}")
        images[image_id] = image

    repairs = BoxRepairs(str(path), strict=strict)
    per_image: dict[int, list[tuple]] = {image_id: [] for image_id in images}
    seen_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"{where}: must be an object")
        ann_id = _require(ann, "id", int, where)
        where = f"{path}: annotation id {ann_id}"
        if ann_id in seen_ids:
            raise DataError(f"{where}: duplicate annotation id")
        seen_ids.add(ann_id)
        image_id = _require(ann, "image_id", int, where)
        if image_id not in images:
            raise DataError(f"{where}: points to image_id {image_id}, which is not in 'images'")
        category_id = _require(ann, "category_id", int, where)
        if category_id not in categories:
            raise DataError(f"{where}: unknown category_id {category_id} (known ids: {sorted(categories)})")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise DataError(f"{where}: 'bbox' must be [x, y, width, height] numbers, got {bbox!r}")
        image = images[image_id]
        x, y, w, h = bbox
        box = repairs.repair((x, y, x + w, y + h), image["width"], image["height"],
                             f"annotation id {ann_id} (image '{image['file_name']}')")
        if box is not None:
            per_image[image_id].append((box, category_id, bool(ann.get("difficult", 0)), bool(ann.get("iscrowd", 0)),
                                        ann_id))
    repairs.log()

    standard = {"id", "file_name", "width", "height"}
    coco_images = []
    for image_id, image in images.items():
        rows = per_image[image_id]
        coco_images.append(CocoImage(
            id=image_id, file_name=image["file_name"], width=image["width"], height=image["height"],
            boxes=np.array([r[0] for r in rows], dtype=np.float64).reshape(-1, 4),
            category_ids=np.array([r[1] for r in rows], dtype=np.int64),
            difficult=np.array([r[2] for r in rows], dtype=bool),
            iscrowd=np.array([r[3] for r in rows], dtype=bool),
            annotation_ids=np.array([r[4] for r in rows], dtype=np.int64),
            extra={k: v for k, v in image.items() if k not in standard}))
    return CocoIndex(path=path, images=coco_images, categories=[categories[k] for k in sorted(categories)],
                     repairs=repairs)


def check_image_files(index: CocoIndex, images_dir: str | Path) -> None:
    """Raise DataError naming the missing image files (the first few and the count) of ``index``."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"image folder not found: {images_dir} (for {index.path})")
    missing = [image.file_name for image in index.images if not (images_dir / image.file_name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{index.path}: {len(missing)} image file(s) listed but not found in {images_dir}: {shown}")
