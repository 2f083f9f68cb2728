"""The SAHI side of benchmarks/scene.py --vs-sahi (issue 22 item 5): SAHI slices exactly our tiles, and the SAHI
DetectionModel wrapping a runner returns each object once, at its scene position and class. Skipped without sahi
(an optional benchmark dependency: pip install 'sdconet[bench]')."""
from __future__ import annotations

import numpy as np
import pytest

sahi = pytest.importorskip("sahi", reason="sahi is not installed (optional: pip install 'sdconet[bench]')")

from sdconet.benchmark.scene import ours_on_heldout, sahi_detection_model, sahi_on_heldout  # noqa: E402
from sdconet.scene.tiling import tile_grid  # noqa: E402

TILE = 64
NAMES = ["car", "ship", "plane"]


@pytest.mark.parametrize("height,width,overlap", [(512, 512, 32), (512, 512, 16), (300, 431, 25), (200, 200, 20)])
def test_sahi_slices_are_our_tiles(height, width, overlap):
    from sahi.slicing import get_slice_bboxes

    slices = get_slice_bboxes(height, width, slice_height=TILE, slice_width=TILE,
                              overlap_height_ratio=overlap / TILE, overlap_width_ratio=overlap / TILE)
    ours = {(left, top, left + w, top + h) for top, left, h, w in tile_grid(height, width, TILE, overlap).tolist()}
    assert {tuple(s) for s in slices} == ours


def coordinate_scene(height: int, width: int) -> np.ndarray:
    """Pixels that encode their own position: R, G = x, y mod 256; B = (x // 256) * 16 + y // 256."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs % 256, ys % 256, (xs // 256) * 16 + ys // 256], axis=-1).astype(np.uint8)


class PlantedRunner:
    """A stand-in for a runner: reads each tile's scene position from its top-left pixel (coordinate_scene) and
    returns the part of every planted object inside the tile that shows at least half of it, in tile pixels."""

    backend = "stub"
    class_names = NAMES
    max_batch = None
    has_saliency = False

    def __init__(self, objects: np.ndarray, labels: np.ndarray, imgsz: int = TILE) -> None:
        self.objects, self.labels, self.imgsz = objects, labels, imgsz
        self.calls: list[int] = []

    def describe(self) -> dict:
        return {"backend": self.backend}

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(len(images))
        k = len(self.objects)
        out = {"boxes": np.zeros((len(images), k, 4), np.float32), "scores": np.zeros((len(images), k), np.float32),
               "labels": np.zeros((len(images), k), np.int64)}
        areas = (self.objects[:, 2] - self.objects[:, 0]) * (self.objects[:, 3] - self.objects[:, 1])
        for row, image in enumerate(images):
            r, g, b = (np.round(image[:, 0, 0] * 255).astype(int))
            left, top = r + (b // 16) * 256, g + (b % 16) * 256
            clipped = self.objects.copy()
            clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(left, left + self.imgsz)
            clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(top, top + self.imgsz)
            visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]) / areas
            out["boxes"][row] = clipped - np.array([left, top, left, top], np.float32)
            out["scores"][row] = np.where(visible >= 0.5, 0.5 + 0.4 * visible, 0.0)
            out["labels"][row] = self.labels
        return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = ((np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])).clip(0) *
             (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])).clip(0))
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_the_sahi_wrapper_and_our_core_find_each_planted_object_once():
    rng = np.random.default_rng(0)
    scene = coordinate_scene(300, 280)
    objects = []
    while len(objects) < 25:  # 6-14 px objects (each whole in some tile at overlap 16), apart, many on seams
        w, h = rng.integers(6, 15, 2)
        x, y = rng.uniform(0, 280 - w), rng.uniform(0, 300 - h)
        box = np.array([x, y, x + w, y + h], np.float32)
        if not objects or _iou(box[None], np.stack(objects)).max() == 0 and \
                (np.abs(np.stack(objects)[:, :2] - box[:2]).max(axis=1) > 22).all():
            objects.append(box)
    objects = np.stack(objects)
    labels = rng.integers(0, len(NAMES), len(objects))
    runner = PlantedRunner(objects, labels)
    scenes = [(1, "coords", scene)]
    for method in (sahi_on_heldout, ours_on_heldout):
        runner.calls.clear()
        found, tiles, seconds = method(runner, scenes, tile=TILE, overlap=16, threshold=0.3)
        assert tiles == len(tile_grid(300, 280, TILE, 16)) and seconds > 0
        if method is sahi_on_heldout:
            assert set(runner.calls) == {1}  # SAHI: one slice per call
        else:
            assert max(runner.calls) > 1  # ours batches tiles
        dets = found[1]
        assert len(dets["boxes"]) == len(objects), method.__name__
        iou = _iou(dets["boxes"], objects)
        match = iou.argmax(axis=1)
        assert sorted(match.tolist()) == list(range(len(objects)))  # one-to-one
        assert iou.max(axis=1).min() > 0.99  # scene coordinates, shift included
        np.testing.assert_array_equal(dets["labels"], labels[match])


def test_the_sahi_wrapper_names_classes_and_applies_its_threshold():
    runner = PlantedRunner(np.array([[2, 2, 20, 20], [30, 30, 40, 40]], np.float32), np.array([2, 0]))
    model = sahi_detection_model(runner, confidence_threshold=0.5)
    assert model.category_mapping == {"0": "car", "1": "ship", "2": "plane"} and model.num_categories == 3
    model.perform_inference(coordinate_scene(TILE, TILE))
    model.convert_original_predictions(shift_amount=[100, 200], full_shape=[1000, 1000])
    predictions = model.object_prediction_list
    assert [p.category.name for p in predictions] == ["plane", "car"]
    assert predictions[0].bbox.to_xyxy() == pytest.approx([2, 2, 20, 20])  # slice pixels, shift carried along
    assert predictions[0].get_shifted_object_prediction().bbox.to_xyxy() == pytest.approx([102, 202, 120, 220])
    model = sahi_detection_model(runner, confidence_threshold=0.95)
    model.perform_inference(coordinate_scene(TILE, TILE))
    model.convert_original_predictions()
    assert model.object_prediction_list == []
