"""Scene core: window layout, cross-tile merge on constructed per-tile detections, the inferencer on real files."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from sdconet.benchmark.scene import (match_objects, merge_tiles, plant_seam_objects, seam_study,
                                     simulate_tile_detections)
from sdconet.scene import merge, tiling
from sdconet.scene.merge import merge_detections, nms, overlap_pairs
from sdconet.scene.tiling import inner_edges, shift_boxes, tile_grid, tile_starts, touches_inner_edge

REPO = Path(__file__).resolve().parents[1]


def test_tiling_and_merge_import_nothing_but_numpy():
    # the Triton scene model ships copies of these two files: they must stay self-contained
    for module in (tiling, merge):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert imported <= {"numpy", "math", "__future__"}, (module.__name__, imported)


def test_tile_grid_covers_any_scene_with_the_overlap():
    for height, width in ((1, 1), (50, 70), (256, 256), (257, 600), (1001, 333)):
        tiles = tile_grid(height, width, 256, 64)
        covered = np.zeros((height, width), dtype=np.int32)
        for top, left, tile_h, tile_w in tiles:
            assert tile_h == min(256, height) and tile_w == min(256, width)
            assert top + tile_h <= height and left + tile_w <= width
            covered[top:top + tile_h, left:left + tile_w] += 1
        assert covered.min() >= 1, (height, width)
        for starts in (tile_starts(height, 256, 64), tile_starts(width, 256, 64)):
            assert all(b - a <= 256 - 64 for a, b in zip(starts, starts[1:]))
    assert tile_grid(50, 70, 256, 64).tolist() == [[0, 0, 50, 70]]  # smaller than a tile: one clipped tile
    with pytest.raises(ValueError, match="larger than the overlap"):
        tile_grid(300, 300, 64, 64)
    with pytest.raises(ValueError, match="positive"):
        tile_grid(0, 10, 64, 8)


def test_inner_edges_and_touching_boxes():
    tiles = tile_grid(300, 300, 200, 100)  # 2 x 2 tiles at 0 and 100
    inner = inner_edges(tiles, 300, 300)
    assert inner.tolist() == [[False, False, True, True], [True, False, False, True],
                              [False, True, True, False], [True, True, False, False]]
    boxes = np.array([[10, 10, 50, 50], [150, 10, 199.5, 40], [0.5, 10, 30, 40]], np.float32)
    # top-left tile: its right edge is inner, its left edge is the scene border
    assert touches_inner_edge(boxes, 200, 200, inner[0]).tolist() == [False, True, False]
    assert touches_inner_edge(boxes, 200, 200, inner[1]).tolist() == [False, False, True]
    assert shift_boxes(boxes[:1], top=100, left=20, scale=2).tolist() == [[60, 220, 140, 300]]


def test_nms_and_pairs_match_a_brute_force_reference():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (300, 2))], axis=1).astype(np.float32)
    labels = rng.integers(0, 3, 300)
    scores = rng.random(300).astype(np.float32)
    first, second = overlap_pairs(boxes, labels, "iou", 0.3)
    found = set(zip(first.tolist(), second.tolist()))
    expected = set()
    for i in range(300):
        for j in range(i + 1, 300):
            if labels[i] != labels[j]:
                continue
            w = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            h = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = w * h
            union = ((boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]) +
                     (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]) - inter)
            if inter / union >= 0.3:
                expected.add((i, j))
    assert found == expected and expected
    torchvision = pytest.importorskip("torchvision")
    import torch

    reference = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                            torch.from_numpy(labels), 0.3).numpy()
    assert nms(boxes, scores, labels, 0.3).tolist() == reference.tolist()


def test_half_object_inside_the_whole_one_comes_back_once():
    # tiles [0, 200) and [100, 300) on x; an object at x 180..230 is cut by the first tile's right edge
    tiles = tile_grid(100, 300, 200, 100)
    per_tile = [{"boxes": np.array([[180, 20, 200, 60]], np.float32), "scores": np.array([0.9], np.float32),
                 "labels": np.array([0])},
                {"boxes": np.array([[80, 20, 130, 60]], np.float32), "scores": np.array([0.8], np.float32),
                 "labels": np.array([0])}]
    whole = np.array([[180, 20, 230, 60]], np.float32)
    assert len(merge_tiles(per_tile, tiles, 100, 300, "nms")[0]) == 2  # the failure the other rules fix
    for rule in ("edge", "ios"):
        boxes, scores, labels = merge_tiles(per_tile, tiles, 100, 300, rule)
        assert boxes.tolist() == whole.tolist(), rule
        assert scores.tolist() == pytest.approx([0.9 if rule == "ios" else 0.8]) and labels.tolist() == [0]


def test_objects_across_seams_and_in_overlaps_come_back_once():
    rng = np.random.default_rng(0)
    for overlap, size in ((64, (8, 48)), (32, (30, 90))):
        tiles = tile_grid(600, 600, 256, overlap)
        planted = plant_seam_objects(tiles, 600, 600, 40, size, rng)
        per_tile = simulate_tile_detections(planted, tiles, rng)
        raw = sum(len(t["boxes"]) for t in per_tile)
        assert raw > 1.3 * len(planted)  # the scene really has objects seen twice or cut
        boxes, _, _ = merge_tiles(per_tile, tiles, 600, 600, merge.DEFAULT_MERGE_RULE)
        matched, ious = match_objects(boxes, planted)
        assert len(boxes) == len(planted) == matched, overlap
        assert min(ious) > 0.75 and np.mean(ious) > 0.9


def test_seam_study_reports_the_default_rule_as_the_best():
    rules = seam_study(scenes=4, overlap=32, object_size=(30, 90))["rules"]
    best = rules[merge.DEFAULT_MERGE_RULE]
    assert best["detections_per_object"] == 1.0 and best["recall_iou50"] == 1.0
    assert rules["nms"]["extra_boxes"] > 0 and rules["edge"]["extra_boxes"] > 0


def test_merge_rejects_bad_arguments():
    boxes = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="merge rule"):
        merge_detections(boxes, np.ones(2), np.zeros(2), rule="wbf")
    with pytest.raises(ValueError, match="tile_index and touches_edge"):
        merge_detections(boxes, np.ones(2), np.zeros(2), rule="edge")
    with pytest.raises(ValueError, match="lengths differ"):
        merge_detections(boxes, np.ones(3), np.zeros(2))
    empty = merge_detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    assert [a.shape for a in empty] == [(0, 4), (0,), (0,)]
