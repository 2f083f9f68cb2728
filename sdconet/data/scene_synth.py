"""Large synthetic scenes for scene-scale tests, demos and benchmarks (``python -m sdconet.data synth-scene``).

A scene of any size is a grid of tiles drawn by the synthetic renderer (:func:`sdconet.data.synthetic.render_scene`),
each from its own generator ``default_rng([seed, row, col])``, so the scene is reproducible and a tile does not depend
on the others. Each side is split into parts of ``tile`` pixels or fewer (sizes differ by at most one pixel); a
non-square tile is rendered square with its objects and distractors kept inside the part that is kept. Objects never
cross a *render* tile border; they do cross the seams of any inference tiling whose stride differs from it. Terrain changes
abruptly at the render tile borders.

Written tile by tile (memory: one tile plus GDAL's block cache, bounded as when reading): a tiled (256 x 256),
DEFLATE-compressed GeoTIFF (BigTIFF when needed) when ``geotiff`` is set, georeferenced with ``pixel_size`` metres
pixels; otherwise a PNG, assembled in memory and so limited to
:data:`sdconet.data.raster.DEFAULT_MAX_UNWINDOWED_PIXELS` (what the scene reader accepts unwindowed). The COCO JSON
next to it has one image (``file_name`` = the scene file), the boxes in scene pixels and the six categories of the
synthetic dataset, by the same names and ids.

Georeferencing: a UTM CRS (EPSG:326zz north / 327zz south) puts the scene's centre column on the zone's central
meridian, top edge at northing 5,000,000 m (about 45 deg N, or 45 deg S); a geographic CRS puts the top-left corner at
15 deg E, 45 deg N with ``pixel_size`` metres converted to degrees of latitude; any other projected CRS puts it at the
projection of 15 deg E, 45 deg N. Rendering runs at about 2 s per megapixel on one core.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from sdconet.config import SyntheticDataConfig
from sdconet.data.coco import make_annotation, write_coco
from sdconet.data.synthetic import CLASS_WEIGHTS, GENERATOR_VERSION, SYNTHETIC_CATEGORIES, render_scene
from sdconet.data.validation import DataError

DEFAULT_TILE = 512  # the synthetic dataset's image size: the same object density per area
MIN_TILE = 32  # the renderer's smallest sensible image
GEOTIFF_BLOCK = 256
DEFAULT_PIXEL_SIZE = 0.5  # metres
METRES_PER_DEGREE_LATITUDE = 111_320.0


def split_length(length: int, tile: int) -> list[int]:
    """``length`` split into ``ceil(length / tile)`` parts whose sizes differ by at most one."""
    count = max(1, math.ceil(length / tile))
    base, extra = divmod(length, count)
    return [base + 1 if i < extra else base for i in range(count)]


def scene_transform(crs: str, width: int, pixel_size: float) -> tuple[float, ...]:
    """The affine ``(a, b, c, d, e, f)`` of a north-up scene in ``crs`` (placement rules in the module docstring)."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.warp import transform

    try:
        parsed = CRS.from_user_input(crs)
    except CRSError as err:
        raise DataError(f"--crs {crs!r}: not a coordinate reference system rasterio knows ({err})") from err
    epsg = parsed.to_epsg()
    if epsg is not None and (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760):
        return (pixel_size, 0.0, 500_000.0 - width * pixel_size / 2, 0.0, -pixel_size, 5_000_000.0)
    if parsed.is_geographic:
        step = pixel_size / METRES_PER_DEGREE_LATITUDE
        return (step, 0.0, 15.0, 0.0, -step, 45.0)
    (x,), (y,) = transform("EPSG:4326", parsed, [15.0], [45.0])
    return (pixel_size, 0.0, x, 0.0, -pixel_size, y)


def _class_weights(classes: Optional[Sequence[str]]) -> dict[str, float]:
    if not classes:
        return dict(CLASS_WEIGHTS)
    unknown = sorted(set(classes) - set(SYNTHETIC_CATEGORIES))
    if unknown:
        raise DataError(f"--classes: unknown class(es) {unknown}; the synthetic classes are "
                        f"{list(SYNTHETIC_CATEGORIES)}")
    return {name: CLASS_WEIGHTS[name] for name in SYNTHETIC_CATEGORIES if name in classes}


class _Canvas:
    """Receives the scene tile by tile; used as a context manager, it completes the file only on success."""

    def write(self, tile: np.ndarray, top: int, left: int) -> None:
        raise NotImplementedError

    def close(self, completed: bool) -> None:
        raise NotImplementedError

    def __enter__(self) -> "_Canvas":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(completed=exc_type is None)


class _PngCanvas(_Canvas):
    """The whole scene in memory, saved as PNG at the end (small scenes only)."""

    def __init__(self, path: Path, width: int, height: int) -> None:
        self.path, self.array = path, np.zeros((height, width, 3), dtype=np.uint8)

    def write(self, tile: np.ndarray, top: int, left: int) -> None:
        self.array[top:top + tile.shape[0], left:left + tile.shape[1]] = tile

    def close(self, completed: bool) -> None:
        if completed:
            from sdconet.data.image_io import save_image

            save_image(self.array, self.path)


class _GeoTiffCanvas(_Canvas):
    """A tiled, compressed GeoTIFF written window by window."""

    def __init__(self, path: Path, width: int, height: int, crs: str, transform: tuple[float, ...]) -> None:
        import rasterio
        from rasterio.enums import ColorInterp
        from rasterio.transform import Affine

        self.dst = rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                                 crs=crs, transform=Affine(*transform), tiled=True, blockxsize=GEOTIFF_BLOCK,
                                 blockysize=GEOTIFF_BLOCK, compress="deflate", predictor=2, photometric="RGB",
                                 BIGTIFF="IF_SAFER")
        self.dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]

    def write(self, tile: np.ndarray, top: int, left: int) -> None:
        from rasterio.windows import Window

        self.dst.write(tile.transpose(2, 0, 1), window=Window(left, top, tile.shape[1], tile.shape[0]))

    def close(self, completed: bool) -> None:
        self.dst.close()


def generate_scene(out_dir: str | Path, width: int, height: Optional[int] = None, *, geotiff: bool = False,
                   crs: str = "EPSG:32633", pixel_size: float = DEFAULT_PIXEL_SIZE, seed: int = 0,
                   classes: Optional[Sequence[str]] = None, tile: int = DEFAULT_TILE,
                   objects_per_tile: Optional[tuple[int, int]] = None,
                   distractors_per_tile: Optional[tuple[int, int]] = None, name: str = "scene",
                   progress: bool = True) -> dict:
    """Write ``out_dir/<name>.tif`` (or ``.png``) and ``out_dir/<name>.json`` (COCO) -> summary dict.

    ``objects_per_tile`` / ``distractors_per_tile`` (min, max) default to the synthetic dataset's per-image counts
    scaled by the tile's area relative to a 512-pixel image.
    """
    from sdconet.data import raster
    from sdconet.utils.io import write_atomically

    height = width if height is None else height
    if width < MIN_TILE or height < MIN_TILE:
        raise DataError(f"--size {width}x{height}: a scene must be at least {MIN_TILE} pixels a side")
    if tile < MIN_TILE:
        raise DataError(f"--tile {tile}: must be at least {MIN_TILE}")
    if not pixel_size > 0:
        raise DataError(f"--pixel-size {pixel_size}: must be > 0")
    if not geotiff and width * height > raster.DEFAULT_MAX_UNWINDOWED_PIXELS:
        raise DataError(f"--size {width}x{height}: {width * height} pixels is too large for a PNG (the scene reader "
                        f"decodes PNGs whole, up to {raster.DEFAULT_MAX_UNWINDOWED_PIXELS}); pass --geotiff")
    weights = _class_weights(classes)
    defaults = SyntheticDataConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.{'tif' if geotiff else 'png'}"
    transform = scene_transform(crs, width, pixel_size) if geotiff else None
    rows, cols = split_length(height, tile), split_length(width, tile)
    categories = [{"id": i + 1, "name": class_name} for i, class_name in enumerate(SYNTHETIC_CATEGORIES)]
    category_ids = {c["name"]: c["id"] for c in categories}
    annotations: list[dict] = []

    def write(tmp: Path) -> None:
        canvas = _GeoTiffCanvas(tmp, width, height, crs, transform) if geotiff else _PngCanvas(tmp, width, height)
        with canvas, tqdm(total=len(rows) * len(cols), desc="scene tiles", disable=not progress, unit="tile") as bar:
            top = 0
            for row, tile_h in enumerate(rows):
                left = 0
                for col, tile_w in enumerate(cols):
                    side = max(tile_h, tile_w)  # rendered square, objects kept inside the crop
                    area = tile_h * tile_w / defaults.image_size ** 2
                    low, high = objects_per_tile or [max(1, round(n * area)) for n in defaults.objects_per_image]
                    d_low, d_high = distractors_per_tile or [round(n * area) for n in defaults.distractors_per_image]
                    rng = np.random.default_rng([seed, row, col])
                    image, boxes = render_scene(rng, side, int(rng.integers(low, high + 1)),
                                                int(rng.integers(d_low, d_high + 1)), weights, (tile_h, tile_w))
                    canvas.write(image[:tile_h, :tile_w], top, left)
                    for class_name, (x1, y1, x2, y2) in boxes:
                        annotations.append(make_annotation(len(annotations) + 1, 1, category_ids[class_name],
                                                           (left + x1, top + y1, left + x2, top + y2)))
                    left += tile_w
                    bar.update()
                top += tile_h

    if geotiff:
        import rasterio

        with rasterio.Env(GDAL_CACHEMAX=raster.GDAL_CACHE_BYTES):  # dirty blocks are flushed past this, not held
            write_atomically(path, write)
    else:
        write_atomically(path, write)
    ann_path = write_coco(out_dir / f"{name}.json", [{"id": 1, "file_name": path.name, "width": width,
                                                      "height": height}], annotations, categories,
                          f"sdconet synthetic scene v{GENERATOR_VERSION} ({width}x{height}, seed {seed})")
    per_class = {c["name"]: 0 for c in categories}
    for annotation in annotations:
        per_class[SYNTHETIC_CATEGORIES[annotation["category_id"] - 1]] += 1
    return {"scene": str(path), "annotations": str(ann_path), "width": width, "height": height,
            "tiles": len(rows) * len(cols), "boxes": len(annotations), "per_class": per_class,
            "crs": crs if geotiff else None, "transform": list(transform) if transform else None}
