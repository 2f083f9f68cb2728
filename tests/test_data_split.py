import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from sdconet.data.__main__ import main as cli
from sdconet.data.splitter import SplitSettings, split_dataset, window_starts


@pytest.mark.parametrize("length, window, step", [(1000, 512, 384), (512, 512, 384), (300, 512, 384),
                                                  (1100, 256, 192), (257, 256, 1)])
def test_windows_cover_the_image(length, window, step):
    starts = window_starts(length, window, step)
    covered = np.zeros(length, dtype=bool)
    for start in starts:
        covered[start:start + window] = True
        assert start + min(window, length) <= length
    assert covered.all() and starts[0] == 0
    assert all(b - a <= step for a, b in zip(starts, starts[1:]))


def _scene(root: Path, name: str, width: int, height: int, boxes: list[list[float]]) -> dict:
    rng = np.random.default_rng(len(name))
    (root / "src").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / "src" / name)
    return {"file_name": name, "width": width, "height": height, "boxes": boxes}


def _write_source(root: Path, scenes: list[dict]) -> Path:
    images, annotations = [], []
    for i, scene in enumerate(scenes):
        images.append({"id": i + 1, "file_name": scene["file_name"], "width": scene["width"],
                       "height": scene["height"]})
        for x1, y1, x2, y2 in scene["boxes"]:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1 + len(annotations) % 2,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                                "difficult": int(len(annotations) % 3 == 0)})
    path = root / "source.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "ship"}, {"id": 2, "name": "plane"}]}))
    return path


def _best_fraction(box: list[float], width: int, height: int, window: int, step: int) -> float:
    """Largest share of the box's area inside any window (brute force over the windows)."""
    x1, y1, x2, y2 = box
    best = 0.0
    for wy in window_starts(height, window, step):
        for wx in window_starts(width, window, step):
            iw = min(x2, wx + min(window, width)) - max(x1, wx)
            ih = min(y2, wy + min(window, height)) - max(y1, wy)
            if iw > 0 and ih > 0:
                best = max(best, iw * ih / ((x2 - x1) * (y2 - y1)))
    return best


def test_split_accounting_and_patch_contents(tmp_path):
    rng = np.random.default_rng(0)
    width, height = 1100, 900
    boxes = []
    for _ in range(40):
        w, h = rng.uniform(4, 300, 2)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([round(x, 1), round(y, 1), round(x + w, 1), round(y + h, 1)])
    boxes.append([0.0, 0.0, 1100.0, 900.0])  # bigger than any window: the area rule must drop it
    scene = _scene(tmp_path, "big.png", width, height, boxes)
    settings = SplitSettings(window=256, overlap=64, min_area_fraction=0.6)
    report = split_dataset(tmp_path / "src", _write_source(tmp_path, [scene]), tmp_path / "out", settings,
                           progress=False)
    counts = report["counts"]
    step = settings.window - settings.overlap
    expected_covered = [_best_fraction(b, width, height, 256, step) >= 0.6 for b in boxes]
    assert counts["source_boxes"] == 41
    assert counts["boxes_covered"] == sum(expected_covered)
    assert counts["boxes_dropped_by_area"] == 41 - sum(expected_covered) >= 1
    assert counts["boxes_covered"] + counts["boxes_dropped_by_area"] == counts["source_boxes"]
    assert json.loads((tmp_path / "out" / "split_report.json").read_text())["counts"] == counts

    out = json.loads((tmp_path / "out" / "annotations" / "train.json").read_text())
    COCO(str(tmp_path / "out" / "annotations" / "train.json"))
    assert counts["box_instances"] == len(out["annotations"]) and counts["patches"] == len(out["images"])
    source = np.asarray(Image.open(tmp_path / "src" / "big.png"))
    patches = {image["id"]: image for image in out["images"]}
    found = set()
    for image in out["images"]:
        x, y = image["offset"]
        patch = np.asarray(Image.open(tmp_path / "out" / "images" / "train" / image["file_name"]))
        assert np.array_equal(patch, source[y:y + image["height"], x:x + image["width"]])
        assert image["width"] <= 256 and image["height"] <= 256 and image["source_file"] == "big.png"
    for ann in out["annotations"]:
        patch = patches[ann["image_id"]]
        px, py = patch["offset"]
        bx, by, bw, bh = ann["bbox"]
        clipped = [bx + px, by + py, bx + bw + px, by + bh + py]
        # the patch box is the clip of exactly one source box to this window
        matches = [k for k, b in enumerate(boxes)
                   if np.allclose(clipped, [max(b[0], px), max(b[1], py), min(b[2], px + patch["width"]),
                                            min(b[3], py + patch["height"])], atol=1e-4)]
        assert matches, ann
        found.update(matches)
        assert ann["difficult"] in (0, 1)
    assert sorted(found) == [k for k, ok in enumerate(expected_covered) if ok]  # every covered box is somewhere


def test_empty_patches_and_train_val_by_source(tmp_path):
    scenes = [_scene(tmp_path, "a.png", 600, 300, [[10, 10, 40, 40]]),
              _scene(tmp_path, "b.png", 300, 300, [[100, 100, 120, 130], [250, 250, 280, 290]])]
    ann = _write_source(tmp_path, scenes)
    settings = SplitSettings(window=256, overlap=0)
    sparse = split_dataset(tmp_path / "src", ann, tmp_path / "sparse", settings, progress=False)
    dense = split_dataset(tmp_path / "src", ann, tmp_path / "dense",
                          SplitSettings(window=256, overlap=0, keep_empty=True), progress=False)
    # a: x starts 0, 256, 344 (flush) x y starts 0, 44 -> 6 windows; b: 2 x 2 windows
    assert dense["counts"]["patches"] == 10 and dense["counts"]["empty_patches_kept"] > 0
    assert sparse["counts"]["patches"] + sparse["counts"]["empty_patches_skipped"] == 10
    assert sparse["counts"]["empty_patches_kept"] == 0
    split = split_dataset(tmp_path / "src", ann, tmp_path / "tv",
                          SplitSettings(window=256, overlap=0, val_fraction=0.5), progress=False)
    sources = {name: {image["source_file"] for image in
                      json.loads((tmp_path / "tv" / "annotations" / f"{name}.json").read_text())["images"]}
               for name in split["splits"]}
    assert set(sources) == {"train", "val"}
    assert len(sources["train"]) == len(sources["val"]) == 1 and not sources["train"] & sources["val"]


def test_split_cli_and_bad_settings(tmp_path, capsys):
    ann = _write_source(tmp_path, [_scene(tmp_path, "a.png", 300, 300, [[10, 10, 40, 40]])])
    assert cli(["split", "--images", str(tmp_path / "src"), "--ann", str(ann), "--out", str(tmp_path / "o"),
                "--window", "128", "--overlap", "32", "--subset", "val", "--json", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "o" / "annotations" / "val.json").is_file()
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["boxes_covered"] == 1
    assert cli(["split", "--images", str(tmp_path / "src"), "--ann", str(ann), "--out", str(tmp_path / "o2"),
                "--window", "128", "--overlap", "128"]) == 2
    assert "0 <= overlap < window" in capsys.readouterr().err
