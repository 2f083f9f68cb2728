"""Every bad-input case gives a clear error naming the file and item, or (box defects only) a counted repair."""
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdconet.config import DataConfig
from sdconet.data.__main__ import main as cli
from sdconet.data.coco import load_coco
from sdconet.data.converters import convert_dota
from sdconet.data.dataset import CocoDetection
from sdconet.data.image_io import load_image, read_image_size
from sdconet.data.validation import DataError

CATEGORIES = [{"id": 1, "name": "ship"}, {"id": 2, "name": "plane"}]


def _dataset(root: Path, annotations: list[dict], images: list[dict] | None = None) -> tuple[Path, Path]:
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images = images if images is not None else [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}]
    for image in images:
        if not (images_dir / image["file_name"]).exists():
            pixels = np.zeros((image["height"], image["width"], 3), np.uint8)
            Image.fromarray(pixels).save(images_dir / image["file_name"])
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return images_dir, ann_file


def _ann(ann_id: int, bbox: list, category_id: int = 1, image_id: int = 1) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0}


def _bomb_png(path: Path, width: int, height: int) -> None:
    """A tiny file whose PNG header claims width x height pixels (a decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_corrupt_truncated_and_missing_images_name_the_file(tmp_path):
    images_dir, ann_file = _dataset(tmp_path, [_ann(1, [1, 1, 5, 5])])
    (images_dir / "a.png").write_bytes(b"this is not an image")
    dataset = CocoDetection(images_dir, ann_file, DataConfig(cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match=r"a.png: not a readable image"):
        dataset[0]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(images_dir / "a.png")
    data = (images_dir / "a.png").read_bytes()
    (images_dir / "a.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"a.png: corrupt or truncated image data"):
        dataset[0]
    (images_dir / "a.png").unlink()
    with pytest.raises(DataError, match=r"1 image file\(s\) listed but not found in .*images: a.png"):
        CocoDetection(images_dir, ann_file, DataConfig(cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match=r"image file not found: .*a.png"):
        load_image(images_dir / "a.png")


def test_image_size_must_match_the_json(tmp_path):
    images_dir, ann_file = _dataset(tmp_path, [_ann(1, [1, 1, 5, 5])],
                                    [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}])
    Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(images_dir / "a.png")
    with pytest.raises(DataError, match=r"a.png: image is 64x40 px but .*ann.json says 64x48 \(image id 1\)"):
        CocoDetection(images_dir, ann_file, DataConfig(cache_dir=str(tmp_path / "c")))[0]


def test_decompression_bombs_are_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    _bomb_png(bomb, 100_000, 100_000)
    with pytest.raises(DataError, match=r"bomb.png: .*decompression-bomb"):
        read_image_size(bomb)
    with pytest.raises(DataError, match=r"bomb.png: .*decompression-bomb"):
        load_image(bomb)
    # the limit is configurable and checked before decoding; below it Pillow's own guard is not in the way
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(small)
    with pytest.raises(DataError, match=r"small.png: 100x100 = 10000 pixels exceeds the limit of 5000"):
        load_image(small, max_pixels=5000)
    assert load_image(small, max_pixels=10_000).shape == (100, 100, 3)
    images_dir, ann_file = _dataset(tmp_path / "d", [_ann(1, [1, 1, 5, 5])])
    dataset = CocoDetection(images_dir, ann_file, DataConfig(cache_dir=str(tmp_path / "c"), max_image_pixels=1000))
    with pytest.raises(DataError, match=r"a.png: 64x48 = 3072 pixels exceeds the limit of 1000"):
        dataset[0]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["annotations"].append(_ann(5, [1, 1, 2, 2], image_id=9)),
     r"annotation id 5: points to image_id 9, which is not in 'images'"),
    (lambda d: d["annotations"].append(_ann(6, [1, 1, 2, 2], category_id=42)),
     r"annotation id 6: unknown category_id 42 \(known ids: \[1, 2\]\)"),
    (lambda d: d.update(annotations=[]), r"the 'annotations' list is empty"),
    (lambda d: d.update(categories=[]), r"the 'categories' list is empty"),
    (lambda d: d["annotations"].append(_ann(7, [1, 1, 2])), r"annotation id 7: 'bbox' must be \[x, y, width, height\]"),
    (lambda d: d["annotations"].append(_ann(1, [1, 1, 2, 2])), r"annotation id 1: duplicate annotation id"),
    (lambda d: d["images"][0].pop("width"), r"images\[0\]: missing field 'width'"),
    (lambda d: d.pop("images"), r"missing or invalid 'images' list"),
])
def test_annotation_errors_name_the_item(tmp_path, mutate, message):
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
            "annotations": [_ann(1, [1, 1, 5, 5])], "categories": list(CATEGORIES)}
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message) as info:
        load_coco(path)
    assert "bad.json" in str(info.value)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON"):
        load_coco(path)
    with pytest.raises(DataError, match=r"annotation file not found: .*nope.json"):
        load_coco(tmp_path / "nope.json")


def test_box_defects_are_repaired_and_counted_or_strict_errors(tmp_path):
    annotations = [_ann(1, [10, 10, 8, 8]),         # fine
                   _ann(2, [60, 40, 10, 20]),       # crosses the right/bottom edge: clipped to [60, 40, 64, 48]
                   _ann(3, [100, 100, 5, 5]),       # entirely outside: dropped
                   _ann(4, [20, 20, 0, 7]),         # zero width: dropped
                   _ann(5, [-4, 5, 6, 6])]          # crosses the left edge: clipped
    images_dir, ann_file = _dataset(tmp_path, annotations)
    records = _Records()
    logger = logging.getLogger("sdconet.data.validation")
    logger.addHandler(records)
    try:
        index = load_coco(ann_file)
    finally:
        logger.removeHandler(records)
    assert index.repairs.as_dict() == {"clipped": 2, "dropped_outside": 1, "dropped_zero_area": 1}
    assert index.images[0].boxes.tolist() == [[10, 10, 18, 18], [60, 40, 64, 48], [0, 5, 2, 11]]
    assert index.images[0].annotation_ids.tolist() == [1, 2, 5]
    assert any("2 clipped to the image, 1 dropped (outside the image), 1 dropped (zero area)" in m
               for m in records.messages)
    dataset = CocoDetection(images_dir, ann_file, DataConfig(cache_dir=str(tmp_path / "c")))
    assert dataset[0]["target"]["boxes_xyxy"].tolist() == [[10, 10, 18, 18], [60, 40, 64, 48], [0, 5, 2, 11]]
    evaluation = json.loads(Path(dataset.ann_file).read_text())  # the evaluation ground truth is the repaired one
    assert [a["id"] for a in evaluation["annotations"]] == [1, 2, 5]
    assert evaluation["annotations"][1]["bbox"] == [60, 40, 4, 8]
    with pytest.raises(DataError, match=r"annotation id 2 \(image 'a.png'\): box \[60, 40, 70, 60\] extends "
                                        r"outside the 64x48 image \(strict mode\)"):
        load_coco(ann_file, strict=True)
    with pytest.raises(DataError, match=r"strict mode"):
        CocoDetection(images_dir, ann_file, DataConfig(cache_dir=str(tmp_path / "c"), strict=True))
    images_dir, zero_file = _dataset(tmp_path / "z", [_ann(1, [20, 20, 0, 7])])
    with pytest.raises(DataError, match=r"annotation id 1 \(image 'a.png'\): box \[20, 20, 20, 27\] has zero area"):
        load_coco(zero_file, strict=True)


def test_empty_label_files_warn_or_fail_in_strict_mode(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labelTxt").mkdir()
    for stem in ("P1", "P2"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.png")
    (tmp_path / "labelTxt" / "P1.txt").write_text("1 1 9 1 9 9 1 9 ship 0\n")
    (tmp_path / "labelTxt" / "P2.txt").write_text("imagesource:GoogleEarth\ngsd:null\n")
    summary = convert_dota(tmp_path / "images", tmp_path / "labelTxt", tmp_path / "o.json", progress=False)
    assert summary["images_without_boxes"] == 1 and summary["boxes"] == 1
    with pytest.raises(DataError, match=r"labelTxt: 1 label file\(s\) list no objects \(strict mode\)"):
        convert_dota(tmp_path / "images", tmp_path / "labelTxt", tmp_path / "o.json", strict=True, progress=False)
    (tmp_path / "labelTxt" / "P1.txt").write_text("")
    with pytest.raises(DataError, match=r"labelTxt: no annotations found"):
        convert_dota(tmp_path / "images", tmp_path / "labelTxt", tmp_path / "o.json", progress=False)


def test_cli_stats_reports_repairs_and_strict_fails(tmp_path, capsys):
    images_dir, ann_file = _dataset(tmp_path, [_ann(1, [10, 10, 8, 8]), _ann(2, [60, 40, 10, 20])])
    out = tmp_path / "stats.json"
    assert cli(["stats", str(ann_file), "--images", str(images_dir), "--check-images", "--json", str(out)]) == 0
    stats = json.loads(out.read_text())
    assert stats["num_boxes"] == 2 and stats["files"][str(ann_file)]["repairs"]["clipped"] == 1
    assert cli(["stats", str(ann_file), "--strict"]) == 2
    assert "annotation id 2 (image 'a.png')" in capsys.readouterr().err
    _bomb_png(images_dir / "a.png", 100_000, 100_000)
    assert cli(["stats", str(ann_file), "--images", str(images_dir), "--check-images"]) == 2
    assert "decompression" in capsys.readouterr().err
