"""Window layout of a scene and the tile -> scene coordinate mapping. Pure NumPy on purpose.

This module imports nothing from ``sdconet`` or torch: the self-contained Triton scene model (``sdconet_scene``)
ships a copy of it next to ``merge.py``, the way ``sdconet/serve/processing.py`` is copied into the repository.

Units: everything here is in one pixel grid, the network-input (LR) grid of the scene. A tile is
``(top, left, height, width)``; edge tiles are clipped to the scene (a scene smaller than the tile is one tile of the
scene's size), and the caller pads them bottom/right to the network input size.
"""
from __future__ import annotations

import math

import numpy as np

# tile edge order used by ``inner_edges`` and ``touches_inner_edge``
EDGES = ("left", "top", "right", "bottom")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window origins covering ``[0, length)`` with ``tile``-long windows overlapping by at least ``overlap``; the
    last window is aligned to the end. One window at 0 when ``length <= tile``."""
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than the overlap ({overlap})")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def tile_grid(height: int, width: int, tile: int, overlap: int) -> np.ndarray:
    """Tiles covering a ``height`` x ``width`` scene, row-major: int64 ``[n, 4]`` of (top, left, height, width)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"scene size must be positive, got {height}x{width}")
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows = [(top, left, tile_h, tile_w) for top in tile_starts(height, tile, overlap)
            for left in tile_starts(width, tile, overlap)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def inner_edges(tiles: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool ``[n, 4]`` (left, top, right, bottom): True where a tile edge lies inside the scene, i.e. where a
    neighbouring tile of the grid covers the area beyond it (the scene's own border is never an inner edge)."""
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 4)
    top, left, tile_h, tile_w = tiles.T
    return np.stack([left > 0, top > 0, left + tile_w < width, top + tile_h < height], axis=1)


def touches_inner_edge(boxes: np.ndarray, tile_height: int, tile_width: int, inner: np.ndarray,
                       margin: float = 2.0) -> np.ndarray:
    """bool ``[n]``: which ``boxes`` ([n, 4] xyxy in the tile's own pixels) reach within ``margin`` px of one of the
    tile's inner edges (``inner``: bool [4] from ``inner_edges``) -- boxes that may be a cut part of an object."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    near = np.stack([boxes[:, 0] <= margin, boxes[:, 1] <= margin,
                     boxes[:, 2] >= tile_width - margin, boxes[:, 3] >= tile_height - margin], axis=1)
    return (near & np.asarray(inner, dtype=bool)[None, :]).any(axis=1)


def shift_boxes(boxes: np.ndarray, top: int, left: int, scale: float = 1.0) -> np.ndarray:
    """Tile-pixel boxes [n, 4] xyxy -> scene boxes: shifted by the tile origin, then multiplied by ``scale``
    (file pixels per network pixel: 1 for LR input, the upscale factor for HR input)."""
    offset = np.asarray([left, top, left, top], dtype=np.float32)
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4) + offset) * np.float32(scale)


def clip_boxes(boxes: np.ndarray, tile_height: int, tile_width: int) -> np.ndarray:
    """Boxes [n, 4] xyxy clipped to the tile's valid area: a box may reach into the zero padding of an edge tile."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, tile_width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, tile_height)
    return boxes


def tile_extents(tiles: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """float32 ``[n, 4]`` xyxy extent of each tile (top, left, height, width) in scene pixels times ``scale``: the
    ``tile_boxes`` that ``merge_detections`` matches boxes of two tiles inside."""
    top, left, tile_h, tile_w = np.asarray(tiles, dtype=np.float32).reshape(-1, 4).T
    return np.stack([left, top, left + tile_w, top + tile_h], axis=1) * np.float32(scale)


def place_tile_boxes(boxes: np.ndarray, tile: np.ndarray | tuple[int, int, int, int], inner: np.ndarray,
                     scale: float = 1.0, margin: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One tile's boxes ([n, 4] xyxy, network-input pixels) -> (scene boxes [k, 4] float32, touches_edge [k] bool,
    kept [k] int64): clipped to the tile's valid area, boxes left with no area dropped (those that lay wholly in an
    edge tile's zero padding), tested against its inner edges (``inner`` [4]), shifted by its origin and multiplied
    by ``scale``. ``kept`` indexes the input rows that survive. ``tile`` = (top, left, height, width)."""
    top, left, tile_h, tile_w = (int(v) for v in tile)
    clipped = clip_boxes(boxes, tile_h, tile_w)
    kept = np.flatnonzero((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]))
    clipped = clipped[kept]
    return (shift_boxes(clipped, top, left, scale), touches_inner_edge(clipped, tile_h, tile_w, inner, margin),
            kept.astype(np.int64))
