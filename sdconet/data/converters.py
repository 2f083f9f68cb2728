"""Converters from public remote-sensing release formats to COCO JSON (horizontal boxes, pixel coordinates).

* NWPU VHR-10: ``<root>/positive image set/*.jpg`` + ``<root>/ground truth/*.txt`` with lines
  ``(x1,y1),(x2,y2),class_id`` (ids 1-10); optional ``negative image set`` (no objects).
  ``file_name`` entries are relative to ``<root>``.
* DOTA v1.0 / v1.5: ``labelTxt/*.txt`` with optional ``imagesource:`` / ``gsd:`` header lines, then
  ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult``; the corner polygon becomes its axis-aligned bounding box and
  ``difficult`` is kept (the dataset marks it ``ignore`` when ``data.ignore_difficult``). ``file_name`` is relative to
  the images folder.
* HRSC2016-style XML: one ``HRSC_Image`` per file with ``Img_FileName``/``Img_FileFmt``/``Img_SizeWidth``/
  ``Img_SizeHeight`` and ``HRSC_Objects/HRSC_Object`` entries with ``box_xmin..box_ymax``, ``difficult``,
  ``Class_ID``. Either one ``ship`` class (the usual HRSC2016 level-1 task) or one category per ``Class_ID``.

Coordinates are taken as given (no +1 convention). Boxes outside the image or with zero area are repaired and counted
(errors with ``strict``); malformed lines, unknown classes and missing images are errors naming the file and line.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sdconet.data.coco import CocoBuilder
from sdconet.data.image_io import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, find_image, read_image_size
from sdconet.data.validation import DataError
from sdconet.utils.logging import get_logger

logger = get_logger(__name__)

NWPU_CLASSES = ("airplane", "ship", "storage tank", "baseball diamond", "tennis court", "basketball court",
                "ground track field", "harbor", "bridge", "vehicle")
DOTA_V10_CLASSES = ("plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
                    "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
                    "roundabout", "soccer-ball-field", "swimming-pool")
DOTA_CLASSES = {"1.0": DOTA_V10_CLASSES, "1.5": DOTA_V10_CLASSES + ("container-crane",)}

_NUMBER = r"\s*(-?\d+(?:\.\d*)?)\s*"
_NWPU_LINE = re.compile(rf"^\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)\s*,\s*(\d+)\s*$")


def _categories(names: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name} for i, name in enumerate(names)]


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _empty_label_files(source: str, count: int, strict: bool) -> None:
    if count and strict:
        raise DataError(f"{source}: {count} label file(s) list no objects (strict mode)")
    if count:
        logger.warning("%s: %d label file(s) list no objects; their images are kept without boxes", source, count)


def convert_nwpu(root: str | Path, out_json: str | Path, include_negative: bool = False, strict: bool = False,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, progress: bool = True) -> dict[str, Any]:
    """NWPU VHR-10 release folder -> COCO JSON (``file_name`` relative to ``root``) -> summary dict."""
    root = Path(root)
    positive, ground_truth = root / "positive image set", root / "ground truth"
    for folder in (positive, ground_truth):
        if not folder.is_dir():
            raise DataError(f"NWPU VHR-10 folder not found: {folder}")
    builder = CocoBuilder(_categories(NWPU_CLASSES), str(root), strict)
    label_files = sorted(ground_truth.glob("*.txt"))
    if not label_files:
        raise DataError(f"{ground_truth}: no ground-truth .txt files")
    labelled = set()
    empty = 0
    for label_file in tqdm(label_files, desc="NWPU VHR-10", disable=not progress, unit="file"):
        image_path = find_image(positive, label_file.stem)
        if image_path is None:
            raise DataError(f"{label_file}: image '{label_file.stem}.*' not found in {positive}")
        labelled.add(image_path.name)
        width, height = read_image_size(image_path, max_pixels)
        image_id = builder.add_image(f"{positive.name}/{image_path.name}", width, height)
        lines = [(n, line.strip()) for n, line in enumerate(label_file.read_text().splitlines(), 1) if line.strip()]
        empty += not lines
        for line_no, line in lines:
            match = _NWPU_LINE.match(line)
            if match is None:
                raise DataError(f"{label_file}:{line_no}: cannot parse '{line}' (expected '(x1,y1),(x2,y2),class_id')")
            x1, y1, x2, y2 = (float(v) for v in match.groups()[:4])
            class_id = int(match.group(5))
            if not 1 <= class_id <= len(NWPU_CLASSES):
                raise DataError(f"{label_file}:{line_no}: unknown NWPU VHR-10 class id {class_id} (valid: 1-10)")
            builder.add_box(image_id, class_id, (x1, y1, x2, y2), f"{label_file.name} line {line_no}")
    _empty_label_files(str(ground_truth), empty, strict)
    unlabelled = [p.name for p in _image_files(positive) if p.name not in labelled]
    if unlabelled:
        raise DataError(f"{positive}: {len(unlabelled)} positive image(s) have no ground-truth file, e.g. "
                        f"{unlabelled[0]} (expected {ground_truth / Path(unlabelled[0]).stem}.txt)")
    negative = root / "negative image set"
    if include_negative:
        if not negative.is_dir():
            raise DataError(f"--include-negative: folder not found: {negative}")
        for image_path in _image_files(negative):
            width, height = read_image_size(image_path, max_pixels)
            builder.add_image(f"{negative.name}/{image_path.name}", width, height)
    return builder.write(out_json, f"NWPU VHR-10 converted from {root}")


def _dota_lines(label_file: Path) -> list[tuple[int, list[str]]]:
    """Object lines of a labelTxt file as (line number, tokens); header lines (``key:value``) are skipped."""
    rows = []
    for line_no, line in enumerate(label_file.read_text().splitlines(), 1):
        tokens = line.split()
        if not tokens or (len(tokens) == 1 and ":" in tokens[0]):
            continue
        rows.append((line_no, tokens))
    return rows


def convert_dota(images_dir: str | Path, labels_dir: str | Path, out_json: str | Path, version: str = "1.0",
                 strict: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 progress: bool = True) -> dict[str, Any]:
    """DOTA ``images/`` + ``labelTxt/`` -> COCO JSON with axis-aligned boxes and ``difficult`` -> summary dict."""
    if version not in DOTA_CLASSES:
        raise DataError(f"unknown DOTA version '{version}' (choose from {', '.join(DOTA_CLASSES)})")
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(f"DOTA folder not found: {folder}")
    classes = DOTA_CLASSES[version]
    category_ids = {name: i + 1 for i, name in enumerate(classes)}
    builder = CocoBuilder(_categories(classes), str(labels_dir), strict)
    label_files = sorted(labels_dir.glob("*.txt"))
    if not label_files:
        raise DataError(f"{labels_dir}: no labelTxt .txt files")
    empty = 0
    for label_file in tqdm(label_files, desc=f"DOTA v{version}", disable=not progress, unit="file"):
        image_path = find_image(images_dir, label_file.stem)
        if image_path is None:
            raise DataError(f"{label_file}: image '{label_file.stem}.*' not found in {images_dir}")
        width, height = read_image_size(image_path, max_pixels)
        image_id = builder.add_image(image_path.name, width, height)
        rows = _dota_lines(label_file)
        empty += not rows
        for line_no, tokens in rows:
            where = f"{label_file}:{line_no}"
            if len(tokens) not in (9, 10):
                raise DataError(f"{where}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]', "
                                f"got '{' '.join(tokens)}'")
            try:
                coords = [float(v) for v in tokens[:8]]
                difficult = int(tokens[9]) if len(tokens) == 10 else 0
            except ValueError as err:
                raise DataError(f"{where}: non-numeric coordinate or difficult flag ({err})") from err
            name = tokens[8]
            if name not in category_ids:
                raise DataError(f"{where}: unknown DOTA v{version} class '{name}' (known: {', '.join(classes)})")
            xs, ys = coords[0::2], coords[1::2]
            builder.add_box(image_id, category_ids[name], (min(xs), min(ys), max(xs), max(ys)),
                            f"{label_file.name} line {line_no}", difficult=bool(difficult))
    _empty_label_files(str(labels_dir), empty, strict)
    return builder.write(out_json, f"DOTA v{version} converted from {labels_dir}")


def _xml_text(node: ElementTree.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _xml_number(node: ElementTree.Element, tag: str, where: str) -> float:
    text = _xml_text(node, tag, where)
    try:
        return float(text)
    except ValueError as err:
        raise DataError(f"{where}: <{tag}> is not a number: '{text}'") from err


def convert_hrsc(images_dir: str | Path, annotations_dir: str | Path, out_json: str | Path,
                 per_class_id: bool = False, strict: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 progress: bool = True) -> dict[str, Any]:
    """HRSC2016-style XML annotations -> COCO JSON -> summary dict.

    ``per_class_id``: one category per ``Class_ID`` (named by the id); otherwise every object is a ``ship``.
    """
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise DataError(f"HRSC folder not found: {folder}")
    xml_files = sorted(annotations_dir.glob("*.xml"))
    if not xml_files:
        raise DataError(f"{annotations_dir}: no .xml annotation files")
    parsed = []
    for xml_file in tqdm(xml_files, desc="HRSC XML", disable=not progress, unit="file"):
        try:
            root = ElementTree.parse(xml_file).getroot()
        except ElementTree.ParseError as err:
            raise DataError(f"{xml_file}: invalid XML ({err})") from err
        objects = root.findall("./HRSC_Objects/HRSC_Object")
        parsed.append((xml_file, root, objects))
    if per_class_id:
        class_ids = sorted({int(_xml_number(obj, "Class_ID", f"{xml_file} object {i + 1}"))
                            for xml_file, _, objects in parsed for i, obj in enumerate(objects)})
        categories = [{"id": class_id, "name": str(class_id)} for class_id in class_ids]
    else:
        categories = [{"id": 1, "name": "ship"}]
    builder = CocoBuilder(categories, str(annotations_dir), strict)
    empty = 0
    for xml_file, root, objects in parsed:
        stem = _xml_text(root, "Img_FileName", str(xml_file))
        fmt = root.findtext("Img_FileFmt", default="").strip()
        image_path = images_dir / f"{stem}.{fmt}" if fmt else None
        if image_path is None or not image_path.is_file():
            image_path = find_image(images_dir, stem)
        if image_path is None:
            raise DataError(f"{xml_file}: image '{stem}.{fmt or '*'}' not found in {images_dir}")
        width = int(_xml_number(root, "Img_SizeWidth", str(xml_file)))
        height = int(_xml_number(root, "Img_SizeHeight", str(xml_file)))
        actual = read_image_size(image_path, max_pixels)
        if actual != (width, height):
            raise DataError(f"{xml_file}: says the image is {width}x{height} but {image_path} is "
                            f"{actual[0]}x{actual[1]}")
        image_id = builder.add_image(image_path.name, width, height)
        empty += not objects
        for i, obj in enumerate(objects):
            where = f"{xml_file} object {i + 1}"
            box = tuple(_xml_number(obj, tag, where) for tag in ("box_xmin", "box_ymin", "box_xmax", "box_ymax"))
            difficult = bool(int(_xml_number(obj, "difficult", where))) if obj.find("difficult") is not None else False
            category_id = int(_xml_number(obj, "Class_ID", where)) if per_class_id else 1
            builder.add_box(image_id, category_id, box, f"{xml_file.name} object {i + 1}", difficult=difficult)
    _empty_label_files(str(annotations_dir), empty, strict)
    return builder.write(out_json, f"HRSC2016-style XML converted from {annotations_dir}")
