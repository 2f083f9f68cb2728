"""The scene-inference core: a whole scene of any size through any runner, with bounded memory.

``SceneInferencer(runner, options).run(reader)`` lays tiles over the scene's network-input (LR) grid, skips tiles
that are entirely nodata, reads and feeds the others window by window in batches (zero-padded bottom/right with
``pad_to_input``, the same in every backend), shifts the boxes to file pixels, merges across tiles (``merge.py``) and
stitches the scene-level saliency map when the runner has one. At no point is the whole scene held in memory: the
largest arrays are one batch of tiles and the saliency map (1/stride^2 of the scene, float32).

Input contract (``SceneOptions.input``):

* ``"lr"`` (default): the file *is* the network input at its native resolution. Never resized.
* ``"hr"``: the evaluation protocol on HR imagery: every window is degraded x``upscale`` with the training
  degradation (``sdconet.data.degrade``, seed 0), read with a ``DEGRADE_MARGIN`` so the result does not depend on
  where the window lies (the bicubic mode is bit-identical to degrading the whole scene); boxes come back in file
  pixels. At most ``upscale - 1`` px are cropped bottom/right, as in training.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from sdconet.runtime.base import DEFAULT_SCORE_THRESHOLD, Runner, pad_to_input
from sdconet.scene.merge import DEFAULT_MERGE_RULE, MERGE_RULES, merge_detections
from sdconet.scene.tiling import inner_edges, place_tile_boxes, tile_extents, tile_grid

DEFAULT_OVERLAP = 25  # LR px, capped at half the tile: best scene AP at the fewest tiles (scene_merge_study.md)
DEFAULT_BATCH = 4  # tiles per runner call when the runner has no max batch
DEGRADE_MARGIN = 16  # LR pixels of context read around a window for input="hr" (blur, bicubic and JPEG support)
EDGE_MARGIN = 2.0  # LR pixels: a box this close to an inner tile edge counts as touching it
INPUTS = ("lr", "hr")


@dataclass
class SceneOptions:
    """How a scene is tiled, fed and merged. ``tile`` and ``overlap`` are in network-input (LR) pixels."""

    input: str = "lr"  # "lr": the file is the network input; "hr": degrade x upscale first (evaluation protocol)
    tile: Optional[int] = None  # None = the runner's input size
    overlap: Optional[int] = None  # None = min(DEFAULT_OVERLAP, tile // 2)
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    # also merge the detections >= this threshold into SceneResult.evaluation (what --ann scores: AP needs the whole
    # precision-recall curve, not the one cut at the display threshold); None = no evaluation set
    eval_score_threshold: Optional[float] = None
    max_detections: Optional[int] = None  # per scene; None = no cap
    batch: Optional[int] = None  # tiles per runner call; None = the runner's max batch, else DEFAULT_BATCH
    merge: str = DEFAULT_MERGE_RULE
    merge_threshold: Optional[float] = None  # None = the rule's default (merge.py)
    upscale: int = 2  # input="hr" only
    degradation: str = "bicubic"  # input="hr" only: "bicubic" | "realistic"
    progress: bool = True  # tqdm bar over tiles

    def fingerprint(self) -> dict[str, Any]:
        """The options that change the detections (what a done-marker hashes); ``progress`` does not."""
        record = asdict(self)
        record.pop("progress")
        if self.input == "lr":  # unused with LR input
            record.pop("upscale")
            record.pop("degradation")
        return record


@dataclass
class SceneResult:
    """Detections of one scene in file pixels and what it took."""

    boxes: np.ndarray  # [n, 4] float32 xyxy file pixels
    scores: np.ndarray  # [n] float32, descending
    labels: np.ndarray  # [n] int64
    saliency: Optional[tuple[np.ndarray, float]]  # ([h, w] float32 in [0, 1], file pixels per cell) or None
    tiles: int  # tiles run
    tiles_skipped: int  # tiles that were entirely nodata
    seconds: float
    # the detections >= options.eval_score_threshold, merged on their own (same keys as ``detections``), or None
    evaluation: Optional[dict[str, np.ndarray]] = None

    @property
    def detections(self) -> dict[str, np.ndarray]:
        return {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}


@dataclass
class TileDetections:
    """What the tiles of one scene returned before any merge (``SceneInferencer.detect_tiles``): per run tile
    (boxes [k, 4] file pixels, scores [k], labels [k], tile index [k], touches an inner edge [k]), at or above the
    inferencer's per-tile threshold; ``extents`` [n, 4] xyxy file pixels of every tile of the grid. ``merge`` it
    with any rule: one model pass serves every merge rule and threshold (the merge study)."""

    found: list[tuple[np.ndarray, ...]]
    extents: np.ndarray
    saliency: Optional[tuple[np.ndarray, float]]
    tiles: int
    tiles_skipped: int
    seconds: float


class SceneInferencer:
    """Runs whole scenes through ``runner`` (any ``sdconet.runtime.Runner``) with ``options``."""

    def __init__(self, runner: Runner, options: SceneOptions | None = None) -> None:
        options = options or SceneOptions()
        if options.input not in INPUTS:
            raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {options.input!r}")
        if options.merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {', '.join(MERGE_RULES)}, got {options.merge!r}")
        tile = options.tile if options.tile is not None else runner.imgsz
        if tile is None:
            raise ValueError(f"the {runner.backend} runner accepts any input size: give a tile size (--tile)")
        if runner.imgsz is not None and tile != runner.imgsz:
            raise ValueError(f"--tile {tile}: this {runner.backend} model takes fixed {runner.imgsz}x{runner.imgsz} "
                             f"inputs, so the tile must be {runner.imgsz} (LR pixels)")
        overlap = min(DEFAULT_OVERLAP, tile // 2) if options.overlap is None else options.overlap
        if tile <= 0 or overlap < 0 or overlap >= tile:
            raise ValueError(f"--tile {tile} / --overlap {overlap} (LR pixels): need tile > overlap >= 0")
        batch = options.batch or runner.max_batch or DEFAULT_BATCH
        if batch < 1 or (runner.max_batch is not None and batch > runner.max_batch):
            raise ValueError(f"--batch {batch}: must be between 1 and the model's max batch "
                             f"{runner.max_batch or 'unbounded'}")
        for name in ("score_threshold", "eval_score_threshold", "merge_threshold"):
            value = getattr(options, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if options.max_detections is not None and options.max_detections < 1:
            raise ValueError(f"--max-detections must be >= 1, got {options.max_detections}")
        if options.input == "hr" and options.upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {options.upscale}")
        self.runner, self.options = runner, options
        self.tile, self.overlap, self.batch = tile, overlap, batch
        self.scale = options.upscale if options.input == "hr" else 1  # file pixels per network pixel

    def describe(self) -> dict[str, Any]:
        """Resolved settings (what a report and the done-marker record)."""
        return self.options.fingerprint() | {"tile": self.tile, "overlap": self.overlap, "batch": self.batch}

    # -- one scene -------------------------------------------------------------------------------------------------
    def run(self, reader) -> SceneResult:
        """Detections of the scene behind ``reader`` (a ``sdconet.data.raster.SceneReader``)."""
        started = time.perf_counter()
        raw = self.detect_tiles(reader)
        boxes, scores, labels = self.merge(raw, self.options.score_threshold)
        evaluation = None
        if self.options.eval_score_threshold is not None:
            evaluation = dict(zip(("boxes", "scores", "labels"), self.merge(raw, self.options.eval_score_threshold)))
        return SceneResult(boxes, scores, labels, raw.saliency, tiles=raw.tiles, tiles_skipped=raw.tiles_skipped,
                           seconds=time.perf_counter() - started, evaluation=evaluation)

    def detect_tiles(self, reader) -> TileDetections:
        """Every tile of the scene behind ``reader`` through the runner, its boxes placed in file pixels, unmerged."""
        from tqdm import tqdm

        started = time.perf_counter()
        height, width = reader.height // self.scale, reader.width // self.scale  # LR grid
        if height == 0 or width == 0:
            raise ValueError(f"{reader.path}: {reader.width}x{reader.height} px is smaller than one LR pixel at "
                             f"x{self.scale}")
        tiles = tile_grid(height, width, self.tile, self.overlap)
        inner = inner_edges(tiles, height, width)
        found: list[tuple[np.ndarray, ...]] = []
        saliency = _SaliencyCanvas(height, width) if self.runner.has_saliency else None
        pending: list[int] = []
        pending_tiles: list[np.ndarray] = []
        skipped = 0

        def flush() -> None:
            outputs = self.runner.run(pad_to_input(pending_tiles, self.tile))
            for row, index in enumerate(pending):
                found.append(self._tile_detections(outputs, row, index, tiles[index], inner[index]))
                if saliency is not None:
                    saliency.add(outputs["saliency"][row, 0], tiles[index], self.tile)
            pending.clear()
            pending_tiles.clear()

        with tqdm(total=len(tiles), desc=str(getattr(reader.path, "name", reader.path)), unit="tile",
                  disable=not self.options.progress, dynamic_ncols=True, leave=False) as bar:
            for index, (top, left, tile_h, tile_w) in enumerate(tiles.tolist()):
                window = self._file_window(reader, top, left, tile_h, tile_w)
                if reader.is_empty(window):
                    skipped += 1
                    bar.update(1)
                    continue
                pending.append(index)
                pending_tiles.append(self._network_input(reader, top, left, tile_h, tile_w))
                if len(pending) == self.batch:
                    flush()
                    bar.update(self.batch)
            if pending:
                bar.update(len(pending))
                flush()
        return TileDetections(found, tile_extents(tiles, self.scale),
                              saliency.result(self.scale) if saliency is not None else None,
                              tiles=len(tiles) - skipped, tiles_skipped=skipped,
                              seconds=time.perf_counter() - started)

    # -- steps -----------------------------------------------------------------------------------------------------
    def _file_window(self, reader, top: int, left: int, tile_h: int, tile_w: int):
        from sdconet.data.raster import Window

        s = self.scale
        return Window(top * s, left * s, tile_h * s, tile_w * s)

    def _network_input(self, reader, top: int, left: int, tile_h: int, tile_w: int) -> np.ndarray:
        """[3, tile_h, tile_w] float32 in [0, 1]: the LR tile (nodata pixels set to 0, like the padding)."""
        from sdconet.data.raster import Window

        if self.scale == 1:
            rgb, valid = reader.read(Window(top, left, tile_h, tile_w))
            return _to_chw(rgb, valid)
        import torch

        from sdconet.data import degrade

        s, margin = self.scale, DEGRADE_MARGIN
        lr_h, lr_w = reader.height // s, reader.width // s
        top0, left0 = max(0, top - margin), max(0, left - margin)
        bottom0, right0 = min(lr_h, top + tile_h + margin), min(lr_w, left + tile_w + margin)
        rgb, valid = reader.read(Window(top0 * s, left0 * s, (bottom0 - top0) * s, (right0 - left0) * s))
        hr = torch.from_numpy(_to_chw(rgb, valid))
        lr = degrade(hr, s, self.options.degradation, seed=0).numpy()
        return np.ascontiguousarray(lr[:, top - top0:top - top0 + tile_h, left - left0:left - left0 + tile_w])

    def _tile_detections(self, outputs: dict[str, np.ndarray], row: int, index: int, tile: np.ndarray,
                         inner: np.ndarray) -> tuple[np.ndarray, ...]:
        keep = np.flatnonzero(outputs["scores"][row] >= self._detection_threshold)
        boxes, touches, kept = place_tile_boxes(outputs["boxes"][row][keep], tile, inner, self.scale, EDGE_MARGIN)
        keep = keep[kept]
        return (boxes, outputs["scores"][row][keep], outputs["labels"][row][keep],
                np.full(len(keep), index, np.int64), touches)

    @property
    def _detection_threshold(self) -> float:
        """Per-tile cut: the lower of the output and the evaluation threshold (each set is merged on its own)."""
        if self.options.eval_score_threshold is None:
            return self.options.score_threshold
        return min(self.options.score_threshold, self.options.eval_score_threshold)

    def merge(self, raw: TileDetections, threshold: float, rule: Optional[str] = None,
              merge_threshold: Optional[float] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes, scores, labels) of ``raw``'s detections >= ``threshold`` merged across tiles by ``rule`` at
        ``merge_threshold`` (defaults: the options'), capped at ``max_detections``. ``threshold`` below the
        per-tile cut the tiles were run with gives only what they kept."""
        rule = self.options.merge if rule is None else rule
        if rule not in MERGE_RULES:
            raise ValueError(f"merge must be one of {', '.join(MERGE_RULES)}, got {rule!r}")
        merge_threshold = self.options.merge_threshold if merge_threshold is None else merge_threshold
        if not raw.found:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        boxes, scores, labels, tile_index, touches = (np.concatenate(parts) for parts in zip(*raw.found))
        if threshold > float(scores.min(initial=1.0)):
            keep = scores >= threshold
            boxes, scores, labels, tile_index, touches = (a[keep] for a in (boxes, scores, labels, tile_index,
                                                                             touches))
        boxes, scores, labels = merge_detections(boxes, scores, labels, rule=rule,
                                                 tile_index=tile_index, touches_edge=touches, tile_boxes=raw.extents,
                                                 threshold=merge_threshold)
        if self.options.max_detections is not None:
            boxes, scores, labels = (a[:self.options.max_detections] for a in (boxes, scores, labels))
        return boxes, scores, labels


def _to_chw(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[h, w, 3] uint8 + [h, w] bool -> [3, h, w] float32 in [0, 1], invalid pixels 0."""
    image = rgb.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    if not valid.all():
        image[:, ~valid] = 0.0
    return image


class _SaliencyCanvas:
    """The scene-level saliency map on the finest level's grid (one cell = ``stride`` LR pixels), max over tiles."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.map: Optional[np.ndarray] = None
        self.stride = 0.0

    def add(self, tile_map: np.ndarray, tile: np.ndarray, input_size: int) -> None:
        """``tile_map`` [h, w] covering the whole padded ``input_size`` input of ``tile`` (top, left, h, w)."""
        if self.map is None:
            self.stride = input_size / tile_map.shape[0]
            self.map = np.zeros((int(np.ceil(self.height / self.stride)), int(np.ceil(self.width / self.stride))),
                                np.float32)
        top, left, tile_h, tile_w = tile.tolist()
        row, col = int(round(top / self.stride)), int(round(left / self.stride))
        rows = min(int(np.ceil(tile_h / self.stride)), self.map.shape[0] - row)
        cols = min(int(np.ceil(tile_w / self.stride)), self.map.shape[1] - col)
        region = self.map[row:row + rows, col:col + cols]
        np.maximum(region, tile_map[:rows, :cols], out=region)

    def result(self, scale: int) -> Optional[tuple[np.ndarray, float]]:
        return None if self.map is None else (self.map, self.stride * scale)


class ArrayScene:
    """An in-memory scene with the reader interface the core uses (``path``, ``width``, ``height``, ``read``,
    ``is_empty``): for pixels already decoded (the legacy predictor, tests, arrays sent to a server)."""

    def __init__(self, rgb: np.ndarray, valid: Optional[np.ndarray] = None, name: str = "<array>") -> None:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"{name}: an array scene must be [H, W, 3] uint8, got {rgb.dtype} {list(rgb.shape)}")
        if valid is not None and valid.shape != rgb.shape[:2]:
            raise ValueError(f"{name}: valid mask {list(valid.shape)} does not match the image {list(rgb.shape[:2])}")
        self.rgb, self.valid, self.path = rgb, valid, name
        self.height, self.width = rgb.shape[:2]

    def read(self, window) -> tuple[np.ndarray, np.ndarray]:
        rows = slice(max(window.top, 0), min(window.top + window.height, self.height))
        cols = slice(max(window.left, 0), min(window.left + window.width, self.width))
        rgb = self.rgb[rows, cols]
        valid = self.valid[rows, cols] if self.valid is not None else np.ones(rgb.shape[:2], dtype=bool)
        return rgb, valid

    def is_empty(self, window) -> bool:
        return self.valid is not None and not self.read(window)[1].any()
