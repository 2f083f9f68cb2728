"""Merge the detections of overlapping tiles into one box per object. Pure NumPy on purpose.

Like ``tiling.py`` this module imports nothing from ``sdconet`` or torch (the Triton scene model ships a copy).

Why class-wise NMS alone is not enough: an object cut by a tile's inner edge comes back from that tile as a partial
box lying inside the full box that the neighbouring tile sees; their IoU is about the visible fraction (0.3-0.6), so
NMS at IoU 0.5 often keeps both. The default rule is the one with the best whole-scene AP of a trained model on
synthetic scenes (``benchmarks/results/scene_merge_study.md``); the seam study of ideal boxes
(``sdconet.benchmark.scene.seam_study``) checks one box per object.

* ``"edge"``: a box touching an inner tile edge is dropped when a box of the same class from another tile, one that
  does not touch an inner edge of its own tile, covers it (intersection over the smaller box >= ``cover``); then
  class-wise NMS removes the copies that two overlapping tiles both saw whole.
* ``"ios"``: greedy non-maximum *merging* by intersection over the smaller box (IoS), across tiles only: in score
  order, a kept box takes the best-matching lower-scoring box of the same class from each *other* tile whose IoS
  with it, both boxes seen through the two tiles' shared region, is >= ``threshold``, then those boxes' matches in
  the tiles not joined yet (an object across three tiles in a row, whose outer pieces share no region), at most one
  box per tile (union of the boxes, the best score). Boxes of one tile are never joined (two adjacent vehicles the
  detector told apart stay two), and measuring inside the shared region makes the two pieces of a seam-cut object
  match however wide the object is (on the whole boxes their IoS is about overlap / smaller piece, below 0.5 for
  objects wider than ~3x the overlap). On a trained model's scenes it scores far below ``edge`` and ``nms``
  (``benchmarks/results/scene_merge_study.md``), and not for the union alone: keeping the kept box instead of the
  union recovers under a third of the gap (docs/scenes.md).
* ``"nms"``: plain class-wise NMS at IoU ``threshold`` over all boxes (the baseline).

Pairs are found with a sweep over boxes sorted along the axis that gives fewer candidates (``sweep_candidates``),
evaluated vectorised in bounded chunks, so memory stays bounded and time grows with the number of boxes that overlap
along that axis, not n^2: 10^5 detections spread over a 20000^2 scene merge in 2-3 s on one core.
"""
from __future__ import annotations

import numpy as np

MERGE_RULES = ("edge", "ios", "nms")
DEFAULT_MERGE_RULE = "edge"  # best scene AP of a trained model, all overlaps (benchmarks/results/scene_merge_study.md)
DEFAULT_NMS_IOU = 0.5
DEFAULT_EDGE_IOU = 0.4  # the edge rule's NMS IoU: best mean scene AP of 0.4/0.5/0.6 (ties 0.5), scene_merge_study.md
DEFAULT_IOS = 0.5


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of [n, 4] xyxy boxes (0 for degenerate boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


SWEEP_AXES = ("x", "y")


def _sweep_setup(boxes: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(axis, order, counts) of the sweep along the axis that gives fewer candidate pairs: boxes sorted by their
    low edge on ``axis``; the box at sorted rank r pairs with ranks r+1 .. r+counts[r] (they start before its high
    edge). Sweeping the cheaper axis keeps a tall, narrow scene (one column of tiles) from going quadratic."""
    best = None
    for axis in (0, 1):
        order = np.argsort(boxes[:, axis], kind="stable")
        end = np.searchsorted(boxes[order, axis], boxes[order, axis + 2], side="left")
        counts = np.maximum(end - np.arange(1, len(order) + 1), 0)
        if best is None or counts.sum() < best[2].sum():
            best = (axis, order, counts)
    return best


def sweep_candidates(boxes: np.ndarray) -> tuple[str, int]:
    """(sweep axis ``"x"``/``"y"``, number of candidate pairs the pair search evaluates) for [n, 4] xyxy boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) < 2:
        return "x", 0
    axis, _, counts = _sweep_setup(boxes)
    return SWEEP_AXES[axis], int(counts.sum())


def _pairs(boxes: np.ndarray, labels: np.ndarray, metric: str, threshold: float, chunk_pairs: int = 1 << 21,
           tile_index: np.ndarray | None = None, tile_boxes: np.ndarray | None = None,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, value) of the same-class pairs whose ``metric`` >= ``threshold`` (module docstring for the
    cross-tile form used when ``tile_index`` and ``tile_boxes`` are given)."""
    if metric not in ("iou", "ios"):
        raise ValueError(f"metric must be 'iou' or 'ios', got {metric!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    cross_tile = tile_index is not None and tile_boxes is not None
    if cross_tile:
        tile_index = np.asarray(tile_index, dtype=np.int64).reshape(-1)
        tile_boxes = np.asarray(tile_boxes, dtype=np.float64).reshape(-1, 4)
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    if len(boxes) < 2:
        return empty
    _, order, counts = _sweep_setup(boxes)
    firsts, seconds, values = [], [], []
    bounds = np.cumsum(counts)
    start_rank = 0
    while start_rank < len(order):
        # ranks [start_rank, stop_rank) give at most chunk_pairs pairs (at least one rank per chunk)
        offset = bounds[start_rank - 1] if start_rank else 0
        stop_rank = max(int(np.searchsorted(bounds, offset + chunk_pairs, side="right")), start_rank + 1)
        ranks = np.arange(start_rank, min(stop_rank, len(order)))
        start_rank = int(ranks[-1]) + 1
        repeat = counts[ranks]
        if repeat.sum() == 0:
            continue
        a_rank = np.repeat(ranks, repeat)
        b_rank = a_rank + 1 + (np.arange(len(a_rank)) - np.repeat(np.cumsum(repeat) - repeat, repeat))
        a, b = order[a_rank], order[b_rank]
        same = labels[a] == labels[b]
        if cross_tile:
            same &= tile_index[a] != tile_index[b]
        a, b = a[same], b[same]
        box_a, box_b = boxes[a], boxes[b]
        if cross_tile:
            # both boxes seen through the two tiles' shared region: the pieces of one object cut by a seam are the
            # same rectangle there, however wide the object is
            region = np.concatenate([np.maximum(tile_boxes[tile_index[a], :2], tile_boxes[tile_index[b], :2]),
                                     np.minimum(tile_boxes[tile_index[a], 2:], tile_boxes[tile_index[b], 2:])], 1)
            box_a = np.concatenate([box_a[:, :2].clip(region[:, :2], None), box_a[:, 2:].clip(None, region[:, 2:])], 1)
            box_b = np.concatenate([box_b[:, :2].clip(region[:, :2], None), box_b[:, 2:].clip(None, region[:, 2:])], 1)
        width = (np.minimum(box_a[:, 2], box_b[:, 2]) - np.maximum(box_a[:, 0], box_b[:, 0])).clip(0)
        height = (np.minimum(box_a[:, 3], box_b[:, 3]) - np.maximum(box_a[:, 1], box_b[:, 1])).clip(0)
        inter = width * height
        area_a, area_b = box_area(box_a), box_area(box_b)
        if metric == "iou":
            denominator = area_a + area_b - inter
        else:
            denominator = np.minimum(area_a, area_b)
        value = np.divide(inter, denominator, out=np.zeros_like(inter), where=denominator > 0)
        hit = (value >= threshold) & (inter > 0)
        firsts.append(np.minimum(a[hit], b[hit]))
        seconds.append(np.maximum(a[hit], b[hit]))
        values.append(value[hit])
    if not firsts:
        return empty
    return (np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64),
            np.concatenate(values))


def overlap_pairs(boxes: np.ndarray, labels: np.ndarray, metric: str, threshold: float,
                  chunk_pairs: int = 1 << 21) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j, of same-class boxes whose ``metric`` ("iou" or "ios") is >= ``threshold``.

    boxes [n, 4] xyxy, labels [n]. Returns two int64 arrays of equal length. Candidates are the boxes whose extents
    overlap along the sweep axis (``sweep_candidates``), evaluated vectorised in chunks of ``chunk_pairs``.
    """
    first, second, _ = _pairs(boxes, labels, metric, threshold, chunk_pairs)
    return first, second


def _neighbours(n: int, first: np.ndarray, second: np.ndarray) -> list[list[int]]:
    adjacency: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(first.tolist(), second.tolist()):
        adjacency[a].append(b)
        adjacency[b].append(a)
    return adjacency


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float = DEFAULT_NMS_IOU,
        ) -> np.ndarray:
    """Class-wise greedy NMS. Returns the kept indices [k] in descending score order."""
    scores = np.asarray(scores).reshape(-1)
    adjacency = _neighbours(len(scores), *overlap_pairs(boxes, labels, "iou", iou_threshold))
    suppressed = [False] * len(scores)
    keep = []
    for i in np.argsort(-scores, kind="stable").tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        for j in adjacency[i]:
            suppressed[j] = True
    return np.asarray(keep, dtype=np.int64)


def ios_merge(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, threshold: float = DEFAULT_IOS,
              tile_index: np.ndarray | None = None, tile_boxes: np.ndarray | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy non-maximum merging by IoS: returns merged (boxes [k, 4], scores [k], labels [k]), score-ordered.

    With ``tile_index`` [n] and ``tile_boxes`` [t, 4] (each tile's xyxy extent in the boxes' pixels) only pairs from
    two different tiles are matched, by the IoS of the two boxes inside the tiles' shared region, and a kept box
    takes at most one box of each other tile (the best-matching one, then those boxes' best matches in the tiles not
    joined yet): two neighbours seen by the same tile are never joined. Without them every same-class pair is matched
    on the whole boxes (the rule before issue 22, kept for the merge study and for detections that carry no tile)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    cross_tile = tile_index is not None and tile_boxes is not None
    first, second, value = _pairs(boxes, labels, "ios", threshold, tile_index=tile_index, tile_boxes=tile_boxes)
    adjacency: list[list[tuple[int, float]]] = [[] for _ in range(len(scores))]
    for a, b, v in zip(first.tolist(), second.tolist(), value.tolist()):
        adjacency[a].append((b, v))
        adjacency[b].append((a, v))
    tiles = np.asarray(tile_index).reshape(-1).tolist() if cross_tile else None
    done = [False] * len(scores)  # plain lists: most boxes have no match, and per-box NumPy calls dominate
    merged = boxes.copy()
    kept = []
    for i in np.argsort(-scores, kind="stable").tolist():
        if done[i]:
            continue
        done[i] = True
        kept.append(i)
        if cross_tile:
            # the best match of each other tile, then theirs in the tiles not joined yet: at most one box per tile
            members, frontier, joined = [], [i], {tiles[i]}
            while frontier:
                best: dict[int, tuple[float, float, int]] = {}  # other tile -> (IoS, score, box) of its best match
                for m in frontier:
                    for j, v in adjacency[m]:
                        if not done[j] and tiles[j] not in joined and (
                                tiles[j] not in best or (v, float(scores[j])) > best[tiles[j]][:2]):
                            best[tiles[j]] = (v, float(scores[j]), j)
                frontier = [entry[2] for entry in best.values()]
                for j in frontier:
                    done[j] = True
                joined.update(best)
                members += frontier
        else:
            members = [j for j, _ in adjacency[i] if not done[j]]
        if members:
            for j in members:
                done[j] = True
            group = boxes[[i, *members]]
            merged[i, :2], merged[i, 2:] = group[:, :2].min(axis=0), group[:, 2:].max(axis=0)
    kept = np.asarray(kept, dtype=np.int64)
    return merged[kept], scores[kept], labels[kept]


def drop_covered_edge_boxes(boxes: np.ndarray, labels: np.ndarray, tile_index: np.ndarray, touches_edge: np.ndarray,
                            cover: float = DEFAULT_IOS) -> np.ndarray:
    """bool [n] of boxes to keep: False for a box that touches an inner edge of its tile while a same-class box
    from another tile, not touching an inner edge of its own, covers it (IoS >= ``cover``)."""
    touches_edge = np.asarray(touches_edge, dtype=bool).reshape(-1)
    tile_index = np.asarray(tile_index).reshape(-1)
    keep = np.ones(len(touches_edge), dtype=bool)
    first, second = overlap_pairs(boxes, labels, "ios", cover)
    other_tile = tile_index[first] != tile_index[second]
    for a, b in ((first, second), (second, first)):
        dropped = other_tile & touches_edge[a] & ~touches_edge[b]
        keep[a[dropped]] = False
    return keep


def merge_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, *, rule: str = DEFAULT_MERGE_RULE,
                     tile_index: np.ndarray | None = None, touches_edge: np.ndarray | None = None,
                     tile_boxes: np.ndarray | None = None, threshold: float | None = None,
                     cover: float = DEFAULT_IOS,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One box per object from the shifted detections of all tiles of a scene.

    Args:
        boxes, scores, labels: [n, 4] xyxy scene pixels, [n], [n].
        rule: "edge", "ios" or "nms" (module docstring).
        tile_index, touches_edge: [n] tile of each box and whether it touches an inner edge of that tile
            (``tiling.touches_inner_edge``); required by the "edge" rule.
        tile_boxes: [t, 4] xyxy extent of each tile in the boxes' pixels (``tiling.tile_extents``); with
            ``tile_index`` it makes the "ios" rule match only boxes of different tiles inside their shared region.
        threshold: NMS IoU for "edge" (default 0.4) and "nms" (default 0.5), IoS for "ios" (default 0.5).
        cover: IoS at which the "edge" rule considers a cut box covered by a whole one.
    Returns:
        (boxes [k, 4] float32, scores [k] float32, labels [k] int64) in descending score order.
    """
    if rule not in MERGE_RULES:
        raise ValueError(f"merge rule must be one of {', '.join(MERGE_RULES)}, got {rule!r}")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"boxes/scores/labels lengths differ: {len(boxes)}, {len(scores)}, {len(labels)}")
    if rule == "ios":
        return ios_merge(boxes, scores, labels, DEFAULT_IOS if threshold is None else threshold,
                         tile_index=tile_index, tile_boxes=tile_boxes)
    if rule == "edge":
        if tile_index is None or touches_edge is None:
            raise ValueError("the 'edge' merge rule needs tile_index and touches_edge for every box")
        survivors = np.flatnonzero(drop_covered_edge_boxes(boxes, labels, tile_index, touches_edge, cover))
        boxes, scores, labels = boxes[survivors], scores[survivors], labels[survivors]
    if threshold is None:
        threshold = DEFAULT_EDGE_IOU if rule == "edge" else DEFAULT_NMS_IOU
    keep = nms(boxes, scores, labels, threshold)
    return boxes[keep], scores[keep], labels[keep]
