"""Merge the detections of overlapping tiles into one box per object. Pure NumPy on purpose.

Like ``tiling.py`` this module imports nothing from ``sdconet`` or torch (the Triton scene model ships a copy).

Why class-wise NMS alone is not enough: an object cut by a tile's inner edge comes back from that tile as a partial
box lying inside the full box that the neighbouring tile sees; their IoU is about the visible fraction (0.3-0.6), so
NMS at IoU 0.5 often keeps both. Two rules are implemented; ``"ios"`` is the default because it measured better on
synthetic seam scenes (``sdconet.benchmark.scene.seam_study``; figures in ``docs/scenes.md``): both leave one box
per object smaller than the overlap, but only IoS merging also joins the two halves of an object larger than it.

* ``"edge"``: a box touching an inner tile edge is dropped when a box of the same class from another tile, one that
  does not touch an inner edge of its own tile, covers it (intersection over the smaller box >= ``cover``); then
  class-wise NMS removes the copies that two overlapping tiles both saw whole.
* ``"ios"``: greedy non-maximum *merging* by intersection over the smaller box: in score order, every lower-scoring
  box of the same class with IoS >= ``threshold`` is merged into the kept one (union of the boxes, the best score).
* ``"nms"``: plain class-wise NMS at IoU ``threshold`` (the old behaviour, kept as the baseline).

Pairs are found with a sweep over boxes sorted by x1, evaluated vectorised in bounded chunks, so memory stays bounded
and time grows with the number of boxes that overlap in x, not n^2: 10^5 detections spread over a 20000^2 scene
merge in 2-3 s on one core.
"""
from __future__ import annotations

import numpy as np

MERGE_RULES = ("edge", "ios", "nms")
DEFAULT_MERGE_RULE = "ios"  # measured best (docs/scenes.md): robust to objects larger than the overlap
DEFAULT_NMS_IOU = 0.5
DEFAULT_IOS = 0.5


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of [n, 4] xyxy boxes (0 for degenerate boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


def overlap_pairs(boxes: np.ndarray, labels: np.ndarray, metric: str, threshold: float,
                  chunk_pairs: int = 1 << 21) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j, of same-class boxes whose ``metric`` ("iou" or "ios") is >= ``threshold``.

    boxes [n, 4] xyxy, labels [n]. Returns two int64 arrays of equal length. Candidates are the boxes whose x1 lies
    in another's [x1, x2) (a sweep over x1-sorted boxes), evaluated vectorised in chunks of ``chunk_pairs``.
    """
    if metric not in ("iou", "ios"):
        raise ValueError(f"metric must be 'iou' or 'ios', got {metric!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(boxes) < 2:
        return empty
    areas = box_area(boxes)
    order = np.argsort(boxes[:, 0], kind="stable")
    # for the box at sorted rank r: candidates are ranks r+1 .. end[r]-1 (they start before its x2)
    end = np.searchsorted(boxes[order, 0], boxes[order, 2], side="left")
    counts = np.maximum(end - np.arange(1, len(order) + 1), 0)
    firsts, seconds = [], []
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
        a, b = a[same], b[same]
        width = (np.minimum(boxes[a, 2], boxes[b, 2]) - np.maximum(boxes[a, 0], boxes[b, 0])).clip(0)
        height = (np.minimum(boxes[a, 3], boxes[b, 3]) - np.maximum(boxes[a, 1], boxes[b, 1])).clip(0)
        inter = width * height
        if metric == "iou":
            denominator = areas[a] + areas[b] - inter
        else:
            denominator = np.minimum(areas[a], areas[b])
        value = np.divide(inter, denominator, out=np.zeros_like(inter), where=denominator > 0)
        hit = (value >= threshold) & (inter > 0)
        firsts.append(np.minimum(a[hit], b[hit]))
        seconds.append(np.maximum(a[hit], b[hit]))
    if not firsts:
        return empty
    return np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)


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
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy non-maximum merging by IoS: returns merged (boxes [k, 4], scores [k], labels [k]), score-ordered."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    adjacency = _neighbours(len(scores), *overlap_pairs(boxes, labels, "ios", threshold))
    done = [False] * len(scores)  # plain lists: most boxes have no match, and per-box NumPy calls dominate
    merged = boxes.copy()
    kept = []
    for i in np.argsort(-scores, kind="stable").tolist():
        if done[i]:
            continue
        done[i] = True
        kept.append(i)
        members = [j for j in adjacency[i] if not done[j]]
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
                     threshold: float | None = None, cover: float = DEFAULT_IOS,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One box per object from the shifted detections of all tiles of a scene.

    Args:
        boxes, scores, labels: [n, 4] xyxy scene pixels, [n], [n].
        rule: "edge", "ios" or "nms" (module docstring).
        tile_index, touches_edge: [n] tile of each box and whether it touches an inner edge of that tile
            (``tiling.touches_inner_edge``); required by the "edge" rule.
        threshold: NMS IoU for "edge"/"nms" (default 0.5), IoS for "ios" (default 0.5).
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
        return ios_merge(boxes, scores, labels, DEFAULT_IOS if threshold is None else threshold)
    if rule == "edge":
        if tile_index is None or touches_edge is None:
            raise ValueError("the 'edge' merge rule needs tile_index and touches_edge for every box")
        survivors = np.flatnonzero(drop_covered_edge_boxes(boxes, labels, tile_index, touches_edge, cover))
        boxes, scores, labels = boxes[survivors], scores[survivors], labels[survivors]
    keep = nms(boxes, scores, labels, DEFAULT_NMS_IOU if threshold is None else threshold)
    return boxes[keep], scores[keep], labels[keep]
