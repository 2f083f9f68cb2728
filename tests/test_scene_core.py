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
    import torchvision
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
    # objects smaller than the overlap: both rules; larger: only ios joins pieces that no tile saw whole
    for overlap, size, rules in ((64, (8, 48), ("edge", "ios")), (32, (30, 90), ("ios",))):
        tiles = tile_grid(600, 600, 256, overlap)
        planted = plant_seam_objects(tiles, 600, 600, 40, size, rng)
        per_tile = simulate_tile_detections(planted, tiles, rng)
        raw = sum(len(t["boxes"]) for t in per_tile)
        assert raw > 1.3 * len(planted)  # the scene really has objects seen twice or cut
        for rule in rules:
            boxes, _, _ = merge_tiles(per_tile, tiles, 600, 600, rule)
            matched, ious = match_objects(boxes, planted)
            assert len(boxes) == len(planted) == matched, (overlap, rule)
            assert min(ious) > 0.75 and np.mean(ious) > 0.9


def test_seam_study_shows_ios_joining_objects_larger_than_the_overlap():
    # ideal boxes: ios is the rule that joins them (the default, edge, is chosen by a trained model's scene AP)
    rules = seam_study(scenes=4, overlap=32, object_size=(30, 90))["rules"]
    best = rules["ios"]
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
    empty = merge_detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0), rule="nms")
    assert [a.shape for a in empty] == [(0, 4), (0,), (0,)]


# -- the inferencer ------------------------------------------------------------------------------------------------
from sdconet.runtime.base import Runner  # noqa: E402
from sdconet.scene.core import ArrayScene, SceneInferencer, SceneOptions  # noqa: E402


class SquareFinder(Runner):
    """A perfect detector of the white squares of a test scene: per tile, the box of every 4-connected run of
    white pixels it sees (partial squares at a tile's edge included), and records every batch it was given."""

    backend = "test"

    def __init__(self, imgsz: int | None = 64, max_batch: int | None = None, saliency: bool = False) -> None:
        super().__init__(imgsz=imgsz, class_names=["square"], precision="fp32", max_batch=max_batch,
                         has_saliency=saliency)
        self.batches: list[np.ndarray] = []

    def _run(self, images):
        from scipy import ndimage

        self.batches.append(images.copy())
        k = 8
        boxes = np.zeros((len(images), k, 4), np.float32)
        scores = np.zeros((len(images), k), np.float32)
        for i, image in enumerate(images):
            found = ndimage.find_objects(ndimage.label(image[0] > 0.99)[0])[:k]
            for j, (rows, cols) in enumerate(found):
                boxes[i, j] = [cols.start, rows.start, cols.stop, rows.stop]
                scores[i, j] = 0.9
        out = {"boxes": boxes, "scores": scores, "labels": np.zeros((len(images), k), np.int64)}
        if self.has_saliency:
            out["saliency"] = images[:, :1, ::8, ::8].copy()
        return out


def _square_scene(height: int, width: int, squares: list[tuple[int, int, int]]) -> np.ndarray:
    image = np.full((height, width, 3), 60, np.uint8)
    for top, left, side in squares:
        image[top:top + side, left:left + side] = 255
    return image


def test_inferencer_finds_squares_across_seams_once_in_scene_pixels():
    # 64 px tiles overlapping by 16: starts 0, 48, 96, 136 on a 200 px side; squares cut by seams and in overlaps
    squares = [(40, 40, 20), (50, 100, 12), (120, 20, 30), (150, 130, 25), (5, 170, 10), (90, 60, 8)]
    scene = ArrayScene(_square_scene(200, 190, squares))
    runner = SquareFinder(max_batch=3, saliency=True)
    result = SceneInferencer(runner, SceneOptions(overlap=16, progress=False)).run(scene)
    expected = sorted([left, top, left + side, top + side] for top, left, side in squares)
    assert sorted(result.boxes.tolist()) == expected
    assert result.tiles == 16 and result.tiles_skipped == 0
    assert [len(b) for b in runner.batches] == [3] * 5 + [1]  # max_batch respected, padded to 64 x 64
    assert all(b.shape[1:] == (3, 64, 64) for b in runner.batches)
    saliency, cell = result.saliency
    assert cell == 8 and saliency.shape == (25, 24)


def test_scene_smaller_than_a_tile_and_odd_sizes_are_padded_not_resized():
    runner = SquareFinder()
    scene = ArrayScene(_square_scene(37, 51, [(30, 44, 7)]))  # a square touching the bottom-right corner
    result = SceneInferencer(runner, SceneOptions(progress=False)).run(scene)
    assert result.boxes.tolist() == [[44, 30, 51, 37]] and result.tiles == 1
    batch = runner.batches[0]
    assert batch.shape == (1, 3, 64, 64) and (batch[0, :, 37:] == 0).all() and (batch[0, :, :, 51:] == 0).all()
    np.testing.assert_allclose(batch[0, 0, :37, :51], scene.rgb[..., 0] / 255.0)
    odd = SceneInferencer(runner, SceneOptions(overlap=10, progress=False)).run(
        ArrayScene(_square_scene(77, 131, [(60, 120, 11), (10, 50, 9)])))
    assert sorted(odd.boxes.tolist()) == [[50, 10, 59, 19], [120, 60, 131, 71]]


def test_nodata_tiles_are_skipped_and_hr_windows_degrade_like_the_whole_image():
    import torch

    from sdconet.data import degrade

    runner = SquareFinder(imgsz=32)
    image = np.random.default_rng(0).integers(0, 255, (150, 222, 3), dtype=np.uint8)
    valid = np.zeros(image.shape[:2], bool)
    valid[:, 100:] = True  # the left of the scene is nodata
    result = SceneInferencer(runner, SceneOptions(overlap=8, progress=False)).run(ArrayScene(image, valid))
    ran = sum(len(b) for b in runner.batches)
    grid = tile_grid(150, 222, 32, 8)
    empty = int((grid[:, 1] + grid[:, 3] <= 100).sum())  # tiles lying wholly in the nodata part
    assert empty > 0 and result.tiles_skipped == empty and result.tiles == ran == len(grid) - empty
    runner.batches.clear()
    hr = SceneInferencer(runner, SceneOptions(input="hr", overlap=8, batch=64, progress=False))
    hr.run(ArrayScene(image))
    whole = degrade(torch.from_numpy(image).permute(2, 0, 1).float() / 255, 2, "bicubic", seed=0).numpy()
    tiles = tile_grid(75, 111, 32, 8)
    assert len(runner.batches[0]) == len(tiles)
    for tile, fed in zip(tiles.tolist(), runner.batches[0]):
        top, left, h, w = tile
        np.testing.assert_array_equal(fed[:, :h, :w], whole[:, top:top + h, left:left + w])


def test_hr_input_boxes_come_back_in_file_pixels():
    """``input="hr"`` runs the network on the x2-degraded scene: its boxes are in LR pixels and must be scaled back to
    the file's (HR) pixels, the ones the outputs and the georeferencing use."""
    squares = [(40, 60, 24), (120, 30, 30), (20, 150, 20)]  # (top, left, side) in HR file pixels
    runner = SquareFinder(imgsz=32)
    result = SceneInferencer(runner, SceneOptions(input="hr", overlap=8, merge="ios", progress=False)).run(
        ArrayScene(_square_scene(180, 200, squares)))
    truth = np.array([[left, top, left + side, top + side] for top, left, side in squares], np.float32)
    assert len(result.boxes) == len(truth)
    for box in result.boxes:  # the degradation blurs a square's rim: its box shrinks by a pixel or two per side
        assert np.abs(truth - box).max(axis=1).min() <= 4.0, (box.tolist(), truth.tolist())


def test_inferencer_refuses_bad_settings_naming_the_value():
    runner = SquareFinder(imgsz=64, max_batch=4)
    with pytest.raises(ValueError, match="--tile 96: .*must be 64"):
        SceneInferencer(runner, SceneOptions(tile=96))
    with pytest.raises(ValueError, match="--overlap 64"):
        SceneInferencer(runner, SceneOptions(overlap=64))
    with pytest.raises(ValueError, match="--batch 8"):
        SceneInferencer(runner, SceneOptions(batch=8))
    with pytest.raises(ValueError, match="give a tile size"):
        SceneInferencer(SquareFinder(imgsz=None), SceneOptions())
    with pytest.raises(ValueError, match="input must be"):
        SceneInferencer(runner, SceneOptions(input="sr"))


# -- issue 22: cross-tile merging, degenerate boxes, the sweep axis, the evaluation set -------------------------------
def _two_tiles():
    """Tiles [0, 200) and [100, 300) on x of a 100 px tall scene (the overlap is x 100..200)."""
    return tile_grid(100, 300, 200, 100)


def test_ios_merge_never_joins_two_boxes_of_one_tile():
    """Fails before issue 22: two adjacent vehicles one tile told apart (IoS 0.6) became one union box."""
    tiles = _two_tiles()
    pair = np.array([[10, 20, 30, 40], [18, 20, 38, 40]], np.float32)  # IoS 0.6, both in the first tile only
    per_tile = [{"boxes": pair, "scores": np.array([0.9, 0.8], np.float32), "labels": np.array([0, 0])},
                {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                 "labels": np.zeros(0, np.int64)}]
    boxes, _, _ = merge_tiles(per_tile, tiles, 100, 300, "ios")
    assert sorted(boxes.tolist()) == sorted(pair.tolist())
    assert len(merge_tiles(per_tile, tiles, 100, 300, "ios-all-pairs")[0]) == 1  # the rule before


def test_ios_merge_takes_one_box_per_other_tile_in_a_crowded_overlap():
    """Two objects side by side inside the overlap, each seen by both tiles: two boxes, not one union."""
    tiles = _two_tiles()
    a, b = [120, 20, 140, 40], [128, 20, 148, 40]  # IoS 0.6 with each other
    shift = np.array([100, 0, 100, 0], np.float32)
    per_tile = [{"boxes": np.array([a, b], np.float32), "scores": np.array([0.9, 0.7], np.float32),
                 "labels": np.array([0, 0])},
                {"boxes": np.array([a, b], np.float32) - shift, "scores": np.array([0.8, 0.6], np.float32),
                 "labels": np.array([0, 0])}]
    boxes, scores, _ = merge_tiles(per_tile, tiles, 100, 300, "ios")
    assert sorted(boxes.tolist()) == sorted([a, b]) and scores.tolist() == pytest.approx([0.9, 0.7])


def test_ios_merge_joins_a_seam_cut_object_wider_than_three_overlaps():
    """Fails before issue 22: on the whole boxes the pieces' IoS is overlap / smaller piece (here 20 / 60 = 0.33),
    so an object wider than ~3x the overlap stayed two boxes; inside the shared region the pieces match."""
    tiles = tile_grid(100, 300, 160, 20)  # tiles [0, 160) and [140, 300): a 20 px overlap
    whole = [90, 20, 210, 60]  # 120 px wide, 6x the overlap, cut by both inner edges
    per_tile = [{"boxes": np.array([[90, 20, 160, 60]], np.float32), "scores": np.array([0.9], np.float32),
                 "labels": np.array([0])},
                {"boxes": np.array([[0, 20, 70, 60]], np.float32), "scores": np.array([0.8], np.float32),
                 "labels": np.array([0])}]
    assert len(merge_tiles(per_tile, tiles, 100, 300, "ios-all-pairs")[0]) == 2
    boxes, _, _ = merge_tiles(per_tile, tiles, 100, 300, "ios")
    assert boxes.tolist() == [whole]


def test_seam_study_with_wide_objects_and_dense_crowds():
    """The study's hard set-ups: objects up to 5x the overlap, and crowds above IoS 0.5."""
    wide = seam_study(scenes=3, overlap=16, object_size=(50, 90), objects=20)["rules"]
    assert wide["ios"]["detections_per_object"] == 1.0 and wide["ios"]["recall_iou50"] == 1.0
    assert wide["ios-all-pairs"]["extra_boxes"] > 0  # the rule before issue 22 leaves wide objects duplicated
    crowd = seam_study(scenes=3, overlap=32, object_size=(8, 48), objects=120, max_overlap=0.7)["rules"]
    assert crowd["ios"]["recall_iou50"] > crowd["ios-all-pairs"]["recall_iou50"]


def test_boxes_wholly_in_the_padding_are_dropped():
    """Fails before issue 22: a box the detector put in an edge tile's zero padding came back with zero area."""
    tiling_boxes = np.array([[10, 10, 20, 20], [55, 5, 60, 9]], np.float32)  # the second lies beyond x 50
    boxes, touches, kept = tiling.place_tile_boxes(tiling_boxes, (0, 100, 64, 50), np.array([True, False, False,
                                                                                              False]))
    assert kept.tolist() == [0] and boxes.tolist() == [[110, 10, 120, 20]] and touches.tolist() == [False]


def test_pair_search_sweeps_the_axis_with_fewer_candidates():
    """Fails before issue 22 (x only): a tall column of boxes sharing one x range was n^2 candidate pairs."""
    n = 2000
    column = np.stack([np.zeros(n), np.arange(n) * 10.0, np.full(n, 20.0), np.arange(n) * 10.0 + 8], 1)
    assert merge.sweep_candidates(column) == ("y", 0)
    assert merge.sweep_candidates(column[:, [1, 0, 3, 2]]) == ("x", 0)
    assert len(overlap_pairs(column, np.zeros(n), "iou", 0.1)[0]) == 0


def test_evaluation_set_is_merged_at_its_own_threshold():
    class Scored(SquareFinder):
        def _run(self, images):
            out = super()._run(images)
            out["scores"] = np.where(out["scores"] > 0, 0.9, 0.0).astype(np.float32)
            out["boxes"][:, 7] = [1, 1, 5, 5]
            out["scores"][:, 7] = 0.01  # a low-score box in every tile
            return out

    pytest.importorskip("scipy")
    scene = ArrayScene(_square_scene(64, 64, [(20, 20, 10)]))
    result = SceneInferencer(Scored(), SceneOptions(score_threshold=0.3, eval_score_threshold=0.001,
                                                    progress=False)).run(scene)
    assert result.boxes.tolist() == [[20, 20, 30, 30]]
    assert result.evaluation["scores"].tolist() == pytest.approx([0.9, 0.01])
    with pytest.raises(ValueError, match="eval_score_threshold must be in"):
        SceneInferencer(Scored(), SceneOptions(eval_score_threshold=2.0))


# -- one tile pass, any merge (SceneInferencer.detect_tiles / merge: the merge study's path) --------------------------
class GradedSquareFinder(SquareFinder):
    """SquareFinder whose score grows with the box's area (a cut square scores lower than the whole one)."""

    def _run(self, images):
        out = super()._run(images)
        area = (out["boxes"][..., 2] - out["boxes"][..., 0]) * (out["boxes"][..., 3] - out["boxes"][..., 1])
        out["scores"] = np.where(out["scores"] > 0, 0.05 + 0.9 * np.minimum(area / 900.0, 1.0), 0.0
                                 ).astype(np.float32)
        return out


# squares on the seams of 64 px tiles overlapping by 16 (starts 0, 48, 96, 136), some wider than the overlap
GRADED_SQUARES = [(40, 40, 20), (50, 100, 12), (120, 20, 30), (150, 130, 25), (5, 170, 10), (90, 60, 8),
                  (0, 88, 40), (100, 125, 36)]


def test_one_tile_pass_serves_every_merge_rule_and_threshold():
    """detect_tiles + merge(rule, merge_threshold, threshold) equals a full run with those options, for every rule:
    the merge study scores one model pass per overlap with every merge. A merge that ignored its rule, its merge
    threshold or its score threshold, or cut after merging, differs from the full run here."""
    scene = ArrayScene(_square_scene(200, 190, GRADED_SQUARES))
    runner = GradedSquareFinder(max_batch=4)
    base = SceneInferencer(runner, SceneOptions(overlap=16, score_threshold=0.01, progress=False))
    raw = base.detect_tiles(scene)
    assert sum(len(b) for b in runner.batches) == raw.tiles == 16  # one pass over the tiles
    results = {}
    for rule in merge.MERGE_RULES:
        for merge_threshold in (0.3, 0.8):
            for threshold in (0.05, 0.5):
                full = SceneInferencer(GradedSquareFinder(max_batch=4), SceneOptions(
                    overlap=16, merge=rule, merge_threshold=merge_threshold, score_threshold=threshold,
                    progress=False)).run(scene)
                once = base.merge(raw, threshold, rule=rule, merge_threshold=merge_threshold)
                for a, b in zip(once, (full.boxes, full.scores, full.labels)):
                    np.testing.assert_array_equal(a, b)
                results[rule, merge_threshold, threshold] = sorted(map(tuple, once[0].tolist()))
    # the grid is not vacuous: rules, merge thresholds and score thresholds each change the outcome
    assert len({tuple(results[r, 0.3, 0.05]) for r in merge.MERGE_RULES}) == 3
    assert any(results[r, 0.3, 0.05] != results[r, 0.8, 0.05] for r in merge.MERGE_RULES)
    assert all(len(results[r, 0.3, 0.5]) < len(results[r, 0.3, 0.05]) for r in merge.MERGE_RULES)
    # ios at its default threshold finds every square once, as a whole, those wider than the overlap included
    expected = sorted((left, top, left + side, top + side) for top, left, side in GRADED_SQUARES)
    assert sorted(map(tuple, base.merge(raw, 0.01, rule="ios")[0].tolist())) == expected


def test_tile_detections_are_every_tile_box_unmerged_in_file_pixels():
    squares = [(40, 40, 20), (30, 88, 40)]  # (top, left, side) in HR file pixels
    runner = GradedSquareFinder(imgsz=32)
    inferencer = SceneInferencer(runner, SceneOptions(input="hr", overlap=8, score_threshold=0.3,
                                                      eval_score_threshold=0.1, progress=False))
    raw = inferencer.detect_tiles(ArrayScene(_square_scene(120, 160, squares)))
    grid = tile_grid(60, 80, 32, 8)
    np.testing.assert_array_equal(raw.extents, tiling.tile_extents(grid, 2))
    assert raw.tiles == len(grid) == len(raw.found) and raw.tiles_skipped == 0 and raw.seconds > 0
    total = 0
    for boxes, scores, labels, tile_index, touches in raw.found:
        assert len(boxes) == len(scores) == len(labels) == len(tile_index) == len(touches)
        assert (scores >= 0.1).all()  # the lower of the output and the evaluation threshold
        if len(boxes):
            extent = raw.extents[tile_index[0]]
            assert (tile_index == tile_index[0]).all()
            assert (boxes[:, :2] >= extent[:2]).all() and (boxes[:, 2:] <= extent[2:]).all()  # file pixels
        total += len(boxes)
    assert total > len(squares)  # unmerged: the squares were seen by several tiles
    assert any(t.any() for *_, t in raw.found)  # cut squares are marked as touching an inner edge
    merged = inferencer.merge(raw, 0.1, rule="ios")
    assert len(merged[0]) == len(squares)
    capped = SceneInferencer(runner, SceneOptions(input="hr", overlap=8, max_detections=1, progress=False))
    assert len(capped.merge(raw, 0.1, rule="ios")[0]) == 1 and capped.merge(raw, 0.1, rule="ios")[1][0] == merged[1][0]
    with pytest.raises(ValueError, match="merge must be one of"):
        inferencer.merge(raw, 0.1, rule="wbf")


def test_merge_cuts_by_score_before_merging():
    """A low-score piece from the other tile that reaches past the whole box widens the merged box only when the
    score threshold lets it in (cutting after merging would keep the widened box)."""
    from sdconet.scene.core import TileDetections

    tiles = _two_tiles()
    found = [(np.array([[120, 20, 150, 40]], np.float32), np.array([0.9], np.float32), np.array([0]),
              np.array([0]), np.array([False])),
             (np.array([[120, 20, 156, 40]], np.float32), np.array([0.1], np.float32), np.array([0]),
              np.array([1]), np.array([False]))]
    raw = TileDetections(found, tiling.tile_extents(tiles), None, tiles=2, tiles_skipped=0, seconds=0.0)
    inferencer = SceneInferencer(SquareFinder(imgsz=200), SceneOptions(overlap=100, progress=False))
    assert inferencer.merge(raw, 0.05, rule="ios")[0].tolist() == [[120, 20, 156, 40]]
    assert inferencer.merge(raw, 0.5, rule="ios")[0].tolist() == [[120, 20, 150, 40]]
    empty = TileDetections([], tiling.tile_extents(tiles), None, tiles=0, tiles_skipped=2, seconds=0.0)
    assert [a.shape for a in inferencer.merge(empty, 0.05)] == [(0, 4), (0,), (0,)]


def test_ios_merge_joins_an_object_across_three_tiles_in_a_row():
    """Fails on the cross-tile rule as first landed: the two outer tiles share no region, so the kept middle-left
    piece took only its neighbour's piece and the third tile's sliver stayed a second box."""
    tiles = tile_grid(40, 190, 64, 16)  # x starts 0, 48, 96, 126: tiles 1 ([48, 112)) and 3 ([126, 190)) are apart
    assert tiles[:, 1].tolist() == [0, 48, 96, 126]
    empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int64)}
    piece = lambda x1, x2, s: {"boxes": np.array([[x1, 0, x2, 40]], np.float32),  # noqa: E731
                               "scores": np.array([s], np.float32), "labels": np.array([0])}
    # a square at x 88..128, in tile pixels: tile 1 sees 88..112, tile 2 96..128, tile 3 the sliver 126..128
    per_tile = [empty, piece(40, 64, 0.95), piece(0, 32, 0.9), piece(0, 2, 0.1)]
    boxes, scores, _ = merge_tiles(per_tile, tiles, 40, 190, "ios")
    assert boxes.tolist() == [[88, 0, 128, 40]] and scores.tolist() == pytest.approx([0.95])
