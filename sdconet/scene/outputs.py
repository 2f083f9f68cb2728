"""What a scene run leaves for a GIS user: GeoJSON, a JSON record, an annotated preview and the saliency map.

``write_scene_outputs`` writes, in ``out_dir``:

* ``<stem>.geojson``: an RFC 7946 FeatureCollection, one Feature per detection, the box as a Polygon whose ring is
  densified (``RING_POINTS_PER_EDGE`` points per edge, so a reprojected box keeps its true shape), closed and
  counter-clockwise (positive shoelace area in the written coordinates). Coordinates are

  - WGS84 longitude, latitude (degrees) when the scene is georeferenced (``geojson_crs="wgs84"``, the RFC 7946 CRS);
  - the raster's own CRS (``geojson_crs="native"``), with a ``crs`` member naming it (the pre-RFC 7946 convention
    GDAL and QGIS read);
  - pixel coordinates of the file when it is not georeferenced: x to the right, y down, (0, 0) the top-left corner
    of the top-left pixel (counter-clockwise then means in these numbers, i.e. clockwise on screen).

  The top-level foreign member ``sdconet:coordinates`` says which (``"wgs84"``, ``"native"``, ``"pixel"``). Every Feature's
  properties hold ``bbox_xyxy`` (the box in file pixels), ``score``, ``label`` and ``class_name``. Boxes crossing the
  antimeridian are not split.
* ``<stem>.json``: ``{"file", "width", "height", "crs", "transform", "detections": [{"bbox_xyxy", "score", "label",
  "class_name"}], "saliency": file name or null, "geojson", "preview"}`` (``transform`` as in
  :mod:`sdconet.data.raster`).
* ``<stem>.eval.json`` (``write_evaluation_detections``, when the job scores scenes against annotations): the
  detections at the evaluation threshold, ``{"file", "score_threshold", "detections": [{"bbox_xyxy", "score",
  "label", "class_name"}]}``, merged on their own (AP needs the whole precision-recall curve, not the one cut at
  the display threshold).
* ``<stem>_preview.png``: the scene decimated to ``preview_max_side`` with the boxes drawn.
* ``<stem>_saliency.tif`` (georeferenced scenes: float32 GeoTIFF, the scene's CRS and its transform scaled by the
  saliency cell size) or ``<stem>_saliency.png`` (8-bit grey, value x 255), when a saliency map is given; cell
  ``(i, j)`` covers file pixels ``[j*s, (j+1)*s) x [i*s, (i+1)*s)`` for ``s`` file pixels per cell.

Each file is written to a hidden temporary file in ``out_dir`` and renamed into place, so a killed run never leaves a
half-written output.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from sdconet.data.raster import SceneReader
from sdconet.utils.io import write_atomically, write_text_atomically

GEOJSON_CRS_CHOICES = ("wgs84", "native")
RING_POINTS_PER_EDGE = 4  # vertices per box edge before the closing point: 16-vertex ring
DEFAULT_PREVIEW_MAX_SIDE = 2048
COORDINATES_MEMBER = "sdconet:coordinates"  # which coordinates the GeoJSON holds: "wgs84" | "native" | "pixel"
EVAL_SUFFIX = ".eval.json"


def _check_detections(detections: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes ``[n, 4]`` float64, scores ``[n]`` float64, labels ``[n]`` int64) or ValueError naming the field."""
    missing = [key for key in ("boxes", "scores", "labels") if key not in detections]
    if missing:
        raise ValueError(f"detections lack {missing} (need boxes [n, 4], scores [n], labels [n])")
    boxes = np.asarray(detections["boxes"], dtype=np.float64)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    scores = np.asarray(detections["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(detections["labels"]).reshape(-1).astype(np.int64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"detections['boxes'] must be [n, 4] xyxy, got shape {boxes.shape}")
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"detections disagree in length: boxes {len(boxes)}, scores {len(scores)}, "
                         f"labels {len(labels)}")
    return boxes, scores, labels


def _class_name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def _pixel_rings(boxes: np.ndarray) -> np.ndarray:
    """Densified closed rings ``[n, 4 * RING_POINTS_PER_EDGE + 1, 2]`` of xyxy pixel boxes (x, y)."""
    steps = np.arange(RING_POINTS_PER_EDGE) / RING_POINTS_PER_EDGE
    x1, y1, x2, y2 = (boxes[:, i:i + 1] for i in range(4))
    # top-left -> top-right -> bottom-right -> bottom-left; the orientation is fixed after projection
    xs = np.concatenate([x1 + (x2 - x1) * steps, np.repeat(x2, len(steps), 1), x2 - (x2 - x1) * steps,
                         np.repeat(x1, len(steps), 1), x1], axis=1)
    ys = np.concatenate([np.repeat(y1, len(steps), 1), y1 + (y2 - y1) * steps, np.repeat(y2, len(steps), 1),
                         y2 - (y2 - y1) * steps, y1], axis=1)
    return np.stack([xs, ys], axis=-1)


def _counter_clockwise(rings: np.ndarray) -> np.ndarray:
    """Reverse the rings ``[n, p, 2]`` whose shoelace area is negative (RFC 7946 right-hand rule)."""
    x, y = rings[..., 0], rings[..., 1]
    area = np.sum(x[:, :-1] * y[:, 1:] - x[:, 1:] * y[:, :-1], axis=1)
    rings = rings.copy()
    rings[area < 0] = rings[area < 0, ::-1]
    return rings


def project_rings(reader: SceneReader, rings: np.ndarray, geojson_crs: str) -> tuple[np.ndarray, str]:
    """Pixel rings ``[n, p, 2]`` -> (rings in the GeoJSON's coordinates, ``"wgs84"`` | ``"native"`` | ``"pixel"``)."""
    if not reader.georeferenced:
        return rings, "pixel"
    a, b, c, d, e, f = reader.transform
    col, row = rings[..., 0], rings[..., 1]
    native = np.stack([a * col + b * row + c, d * col + e * row + f], axis=-1)
    if geojson_crs == "native":
        return native, "native"
    from rasterio.warp import transform

    lon, lat = transform(reader.crs, "EPSG:4326", native[..., 0].ravel().tolist(), native[..., 1].ravel().tolist())
    return np.stack([np.asarray(lon), np.asarray(lat)], axis=-1).reshape(rings.shape), "wgs84"


def _crs_member(crs: str) -> dict:
    """The pre-RFC 7946 ``crs`` member (named CRS) GDAL and QGIS read."""
    if crs.upper().startswith("EPSG:"):
        return {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{crs.split(':', 1)[1]}"}}
    return {"type": "name", "properties": {"name": crs}}


def scene_geojson(reader: SceneReader, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                  class_names: Sequence[str], geojson_crs: str = "wgs84") -> dict:
    """The FeatureCollection of the module docstring; ``boxes`` ``[n, 4]`` xyxy file pixels."""
    if geojson_crs not in GEOJSON_CRS_CHOICES:
        raise ValueError(f"geojson_crs must be one of {GEOJSON_CRS_CHOICES}, got {geojson_crs!r}")
    rings, kind = project_rings(reader, _pixel_rings(boxes), geojson_crs)
    rings = _counter_clockwise(rings)
    digits = {"wgs84": 9, "native": 4, "pixel": 3}[kind]  # ~0.1 mm in degrees, 0.1 mm in metres, 1/1000 px
    features = []
    for ring, box, score, label in zip(np.round(rings, digits).tolist(), boxes.tolist(), scores.tolist(),
                                       labels.tolist()):
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"bbox_xyxy": [round(v, 3) for v in box], "score": round(score, 6),
                                        "label": int(label), "class_name": _class_name(int(label), class_names)}})
    # a foreign member, named so it cannot be read as GeoJSON's own "coordinates" (RFC 7946 section 7.1 forbids
    # that member outside a geometry)
    collection: dict[str, Any] = {"type": "FeatureCollection", COORDINATES_MEMBER: kind, "features": features}
    if kind == "native":
        collection["crs"] = _crs_member(reader.crs)
    return collection


def _write_json(path: Path, data: dict) -> Path:
    return write_text_atomically(path, json.dumps(data))


def _write_preview(path: Path, reader: SceneReader, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                   class_names: Sequence[str], max_side: int) -> Path:
    import torch

    from sdconet.data.image_io import save_image
    from sdconet.engine.visualize import PRED_COLOR, draw_boxes

    preview, _ = reader.read_preview(max_side)
    scale = np.array([preview.shape[1] / reader.width, preview.shape[0] / reader.height] * 2)
    picture = draw_boxes(preview, torch.as_tensor(boxes * scale), PRED_COLOR, torch.as_tensor(labels),
                         torch.as_tensor(scores), class_names)
    return write_atomically(path, lambda tmp: save_image(picture, tmp))


def _write_saliency(out_dir: Path, stem: str, reader: SceneReader, saliency: tuple[np.ndarray, float]) -> Path:
    """The stitched saliency map ``[h, w]`` (``s`` file pixels per cell) as a GeoTIFF or an 8-bit PNG."""
    values, cell = saliency
    values, cell = np.asarray(values, dtype=np.float32), float(cell)
    if values.ndim != 2 or not values.size:
        raise ValueError(f"saliency must be a non-empty [h, w] array, got shape {values.shape}")
    if not cell > 0:
        raise ValueError(f"saliency scale (file pixels per cell) must be > 0, got {cell}")
    if not reader.georeferenced:
        from sdconet.data.image_io import save_image

        grey = (np.clip(np.nan_to_num(values), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return write_atomically(out_dir / f"{stem}_saliency.png", lambda tmp: save_image(grey, tmp))
    import rasterio
    from rasterio.transform import Affine

    a, b, c, d, e, f = reader.transform
    transform = Affine(a * cell, b * cell, c, d * cell, e * cell, f)  # one cell = ``cell`` file pixels
    height, width = values.shape

    def write(tmp: Path) -> None:
        profile = dict(driver="GTiff", width=width, height=height, count=1, dtype="float32", crs=reader.crs,
                       transform=transform, compress="deflate", predictor=3)
        if width >= 256 and height >= 256:
            profile.update(tiled=True, blockxsize=256, blockysize=256)
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(values[None])
            dst.set_band_description(1, "saliency")

    return write_atomically(out_dir / f"{stem}_saliency.tif", write)


def write_scene_outputs(out_dir: str | Path, stem: str, reader: SceneReader, detections: Mapping[str, Any],
                        class_names: Sequence[str], *, geojson_crs: str = "wgs84",
                        saliency: Optional[tuple[np.ndarray, float]] = None,
                        preview_max_side: int = DEFAULT_PREVIEW_MAX_SIDE) -> dict[str, Optional[Path]]:
    """Write the module docstring's files for one scene -> ``{"geojson", "json", "preview", "saliency"}`` paths
    (``saliency`` None when no map is given). ``detections``: ``boxes`` ``[n, 4]`` xyxy file pixels, ``scores``
    ``[n]``, ``labels`` ``[n]``; ``saliency``: (``[h, w]`` float32 in [0, 1], file pixels per cell)."""
    out_dir = Path(out_dir)
    boxes, scores, labels = _check_detections(detections)
    collection = scene_geojson(reader, boxes, scores, labels, class_names, geojson_crs)
    written: dict[str, Optional[Path]] = {"saliency": None}
    if saliency is not None:
        written["saliency"] = _write_saliency(out_dir, stem, reader, saliency)
    written["preview"] = _write_preview(out_dir / f"{stem}_preview.png", reader, boxes, scores, labels, class_names,
                                        preview_max_side)
    written["geojson"] = _write_json(out_dir / f"{stem}.geojson", collection)
    record = {"file": str(reader.path), "width": reader.width, "height": reader.height, "crs": reader.crs,
              "transform": list(reader.transform) if reader.transform is not None else None,
              "detections": [feature["properties"] for feature in collection["features"]],
              "saliency": written["saliency"].name if written["saliency"] is not None else None,
              "geojson": written["geojson"].name, "preview": written["preview"].name}
    written["json"] = _write_json(out_dir / f"{stem}.json", record)
    return written


def detection_records(detections: Mapping[str, Any], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """``[{"bbox_xyxy", "score", "label", "class_name"}]`` of ``detections`` (boxes in file pixels)."""
    boxes, scores, labels = _check_detections(detections)
    return [{"bbox_xyxy": [round(v, 3) for v in box], "score": round(score, 6), "label": int(label),
             "class_name": _class_name(int(label), class_names)}
            for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist())]


def write_evaluation_detections(out_dir: str | Path, stem: str, file: str, detections: Mapping[str, Any],
                                class_names: Sequence[str], score_threshold: float) -> Path:
    """``<stem>.eval.json`` of the module docstring."""
    record = {"file": file, "score_threshold": float(score_threshold),
              "detections": detection_records(detections, class_names)}
    return _write_json(Path(out_dir) / f"{stem}{EVAL_SUFFIX}", record)
