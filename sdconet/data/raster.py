"""Scene files read window by window: GeoTIFF/COG, JPEG 2000, VRT, Erdas .img, PNG/JPEG, ... through rasterio (GDAL),
bounded memory.

Contract (also in docs/scenes.md, "Scene files"):

* **Windows.** ``read(Window(top, left, height, width))`` returns ``rgb`` uint8 ``[h, w, 3]`` and ``valid`` bool
  ``[h, w]`` for the part of the window inside the raster (clipped). Only the blocks the window touches are decoded.
* **Windowed vs whole-file.** A file of any GDAL driver whose blocks (tiles or strips, ``block_shapes``) hold at most
  ``MAX_BLOCK_PIXELS`` pixels is read by window: GeoTIFF/COG, tiled JPEG 2000 (JP2OpenJPEG), Erdas Imagine ``.img``
  (HFA), BMP, ... A VRT is read by window when its own blocks and every source file it references (recursively)
  are. The drivers of ``SEQUENTIAL_DRIVERS`` (PNG, JPEG, GIF, WebP) decode from the start of the file whatever
  blocks they report, so they never are. Every file that is not read by window (those, a single-strip TIFF, an
  untiled JPEG 2000 over 4 Mpx, a VRT over one of them) has to be decoded whole, so it is decoded once at open and
  refused when it has more than ``max_unwindowed_pixels`` pixels (checked from the header, before any pixel is
  decoded), with the ``gdal_translate`` command that makes it tiled. ``windowed_reason`` says why a file is not. PNG and JPEG go through
  GDAL too, not through ``sdconet.data.image_io`` (Pillow, which stays the training-data reader), so that their
  alpha, palettes and 16-bit samples follow the band rules below; the header check stands in for image_io's
  decompression-bomb guard.
* **Bands.** The band roles come from the file's colour interpretation: 1 band = grey, replicated to RGB (a palette
  band is expanded through its colour table, whose alpha counts as validity); a band marked *alpha* is the validity
  mask (alpha 0 = invalid), whatever the band count; bands marked red/green/blue are used as such, in any order;
  otherwise 3 bands are R, G, B in file order, and 4 bands without an alpha band are R, G, B + an ignored 4th band
  (multispectral RGB+NIR). More bands without red/green/blue marks, or 2 bands without alpha, are refused naming the
  layout; ``bands=(r, g, b)`` (1-based, GDAL's numbering; the scene CLI's ``--bands``) overrides the choice, e.g.
  ``(3, 2, 1)`` for a B, G, R, NIR file, and ``bands=(b,)`` reads one band as grey. An alpha band that is not
  among them still marks validity. A band number outside ``1..count`` is refused naming the file and the count.
* **Bit depth.** 8-bit data is used as is. Any other data type (16-bit, 32-bit, float) gets a per-band linear stretch
  from the ``STRETCH_PERCENTILES`` (2nd, 98th) percentiles of the valid pixels, computed once at open from a decimated
  whole-scene read (``COARSE_SIDE`` pixels a side), so every window of a scene uses the same mapping and tiles are
  normalised identically.
* **Validity.** nodata values, alpha 0, internal/external GDAL masks and palette alpha 0 make ``valid`` False.
  ``is_empty(window)`` is True when no pixel of the window is valid: a window holding a valid cell of the decimated
  mask is answered from it without decoding; only windows without one are checked exactly, at full resolution.
* **GDAL block cache** is bounded to ``GDAL_CACHE_BYTES`` (256 MiB) through ``rasterio.Env`` for the reader's life.
  Close readers in the reverse order of opening (use them as context managers); a reader is not thread-safe.
* **Georeferencing.** ``transform`` is the affine pixel -> CRS map ``(a, b, c, d, e, f)`` with ``x = a*col + b*row +
  c`` and ``y = d*col + e*row + f`` for pixel *corner* coordinates (col, row); ``georeferenced`` needs both a CRS and
  a non-identity transform (GCP- or RPC-only rasters are not georeferenced: warp them with ``gdalwarp`` first).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sdconet.utils.logging import get_logger

logger = get_logger(__name__)

DEFAULT_MAX_UNWINDOWED_PIXELS = 2**26  # 67 Mpx (~192 MiB as RGB): the most we decode whole
MAX_BLOCK_PIXELS = 2**22  # a block (tile or strip) up to 4 Mpx still reads by window
# drivers that decode from the start of the file (a window near the end decodes everything before it), whatever
# blocks they report: never read by window
SEQUENTIAL_DRIVERS = frozenset({"PNG", "JPEG", "GIF", "WEBP", "JPEGXL"})
MAX_VRT_DEPTH = 4  # a VRT over a VRT over ...: sources checked this deep, deeper is whole-file
# files a dataset lists besides its pixels (GDAL's sidecars): not sources
SIDECAR_SUFFIXES = (".aux.xml", ".ovr", ".msk", ".aux", ".rrd", ".xml", ".tfw", ".jgw", ".j2w", ".wld", ".prj")
GDAL_CACHE_BYTES = 256 * 2**20  # rasterio passes GDAL_CACHEMAX to GDALSetCacheMax64: bytes, not MB
STRETCH_PERCENTILES = (2.0, 98.0)
COARSE_SIDE = 1024  # side of the decimated read behind the stretch statistics and is_empty


class SceneError(ValueError):
    """A scene file cannot be opened or read; the message names the file and what to do.

    A ValueError like ``sdconet.data.DataError``, but not importing it: this module stays free of torch."""


@dataclass(frozen=True)
class Window:
    """A pixel window of a scene: rows ``[top, top + height)``, columns ``[left, left + width)``."""

    top: int
    left: int
    height: int
    width: int

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width


def _rasterio():
    """rasterio, imported on first use (the rest of the package works without it)."""
    try:
        import rasterio
    except ImportError as err:  # pragma: no cover - it is a main dependency
        raise SceneError("reading scene files needs rasterio: pip install rasterio") from err
    return rasterio


def _band_layout(ds, path: Path, bands: Optional[Sequence[int]]) -> tuple[tuple[int, int, int], Optional[int]]:
    """(R, G, B band indexes, 1-based, possibly repeated for grey; alpha band index or None) per the module rules."""
    from rasterio.enums import ColorInterp

    interp = list(ds.colorinterp)
    layout = ", ".join(f"{i + 1}:{c.name}" for i, c in enumerate(interp))
    described = f"{path}: {ds.count} band(s) of {ds.dtypes[0]} ({layout})"
    alpha = next((i + 1 for i, c in enumerate(interp) if c == ColorInterp.alpha), None)
    if bands is not None:
        chosen = tuple(int(b) for b in bands)
        if len(chosen) not in (1, 3):
            raise SceneError(f"{described}: bands={list(bands)} must be 1 (grey) or 3 (R, G, B) band numbers, "
                             f"got {len(chosen)}")
        outside = [b for b in chosen if not 1 <= b <= ds.count]
        if outside:
            # GDAL numbers bands from 1: a 0 here is usually a 0-based index
            raise SceneError(f"{described}: band {outside[0]} of bands={list(chosen)} does not exist; the file has "
                             f"{ds.count} band(s), numbered 1..{ds.count} (1-based, as in gdal_translate -b)")
        rgb = chosen * 3 if len(chosen) == 1 else chosen
        return (rgb[0], rgb[1], rgb[2]), (alpha if alpha not in rgb else None)
    colour = [i + 1 for i in range(ds.count) if i + 1 != alpha]
    by_role = {c: i + 1 for i, c in enumerate(interp)}
    if all(role in by_role for role in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        return (by_role[ColorInterp.red], by_role[ColorInterp.green], by_role[ColorInterp.blue]), alpha
    if len(colour) == 1:
        return (colour[0],) * 3, alpha
    if len(colour) == 3:
        return (colour[0], colour[1], colour[2]), alpha
    if len(colour) == 4 and alpha is None:
        logger.info("%s: 4 bands without alpha: bands 1, 2, 3 are read as R, G, B and band 4 is ignored", described)
        return (1, 2, 3), None
    raise SceneError(f"{described}: cannot tell which bands are red, green and blue (supported: 1 grey or palette "
                     f"band, 3 colour bands, 4 bands = RGB + alpha or RGB + NIR, any count with red/green/blue "
                     f"colour interpretation); extract them first, e.g. gdal_translate -b 1 -b 2 -b 3 IN OUT.tif")


def _gdal_message(err: BaseException) -> str:
    """rasterio's message plus GDAL's own, which rasterio chains as the cause ("Read failed. See previous ...")."""
    cause = err.__cause__ or err.__context__
    return f"{err}: {cause}" if cause is not None and str(cause) not in str(err) else str(err)


def _largest_block(ds) -> int:
    return max(rows * cols for rows, cols in ds.block_shapes)


def vrt_sources(ds) -> list[str]:
    """The files a VRT's bands read (GDAL's file list less the VRT itself and its sidecars)."""
    own = Path(ds.name).resolve() if not str(ds.name).startswith("/vsi") else None
    sources = []
    for name in ds.files:
        if own is not None and not str(name).startswith("/vsi") and Path(name).resolve() == own:
            continue
        if str(name).lower().endswith(SIDECAR_SUFFIXES):
            continue
        sources.append(str(name))
    return sources


def window_readable(ds, depth: int = 0) -> Optional[str]:
    """None when the open rasterio dataset ``ds`` can be read window by window (see the module docstring), else why
    not (a phrase naming the driver, the block layout or the source that prevents it)."""
    rasterio = _rasterio()
    if ds.driver in SEQUENTIAL_DRIVERS:
        return f"a {ds.driver} file, which GDAL decodes from its start"
    largest = _largest_block(ds)
    if largest > MAX_BLOCK_PIXELS:
        rows, cols = max(ds.block_shapes, key=lambda shape: shape[0] * shape[1])
        return f"a {ds.driver} file whose blocks are {rows}x{cols} pixels (more than {MAX_BLOCK_PIXELS})"
    if ds.driver == "VRT":
        if depth >= MAX_VRT_DEPTH:
            return f"a VRT nested more than {MAX_VRT_DEPTH} deep"
        for source in vrt_sources(ds):
            try:
                with rasterio.open(source) as src:
                    why = window_readable(src, depth + 1)
            except rasterio.errors.RasterioError as err:
                return f"a VRT whose source {source} cannot be opened ({_gdal_message(err)})"
            if why is not None:
                return f"a VRT over {source}, {why}"
    return None


class SceneReader:
    """One open scene file (see the module docstring). Build it with :func:`open_scene`."""

    def __init__(self, path: str | Path, max_unwindowed_pixels: int = DEFAULT_MAX_UNWINDOWED_PIXELS, *,
                 bands: Optional[Sequence[int]] = None,
                 stretch_percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> None:
        rasterio = _rasterio()
        self.path = Path(path)
        if not self.path.is_file():
            raise SceneError(f"scene file not found: {self.path}")
        self._env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES)
        self._env.__enter__()
        self._ds = None
        try:
            self._open(rasterio, max_unwindowed_pixels, bands, stretch_percentiles)
        except BaseException:
            self.close()
            raise

    def _open(self, rasterio, max_unwindowed_pixels: int, bands: Optional[Sequence[int]],
              stretch_percentiles: tuple[float, float]) -> None:
        from rasterio.enums import ColorInterp, MaskFlags

        with warnings.catch_warnings():  # a plain PNG has no georeferencing: not worth a warning per file
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            try:
                ds = rasterio.open(self.path)
            except rasterio.errors.RasterioError as err:
                raise SceneError(f"{self.path}: not a readable raster, or a corrupt or truncated file "
                                 f"({_gdal_message(err)})") from err
        self._ds = ds
        self.width, self.height, self.band_count = ds.width, ds.height, ds.count
        self.dtype = str(ds.dtypes[0])
        if np.dtype(self.dtype).kind not in "uif":
            raise SceneError(f"{self.path}: band data type {self.dtype} is not supported (integer or float bands)")
        self.crs: Optional[str] = ds.crs.to_string() if ds.crs else None
        self.transform: Optional[tuple[float, ...]] = None if ds.transform.is_identity else tuple(ds.transform)[:6]
        self.georeferenced = self.crs is not None and self.transform is not None
        self.rgb_bands, self.alpha_band = _band_layout(ds, self.path, bands)
        self._indexes = sorted(set(self.rgb_bands))
        self._lut: Optional[np.ndarray] = None  # palette -> [256, 4] RGBA
        if ds.colorinterp[self.rgb_bands[0] - 1] == ColorInterp.palette and len(self._indexes) == 1:
            if self.dtype != "uint8":
                raise SceneError(f"{self.path}: palette band of {self.dtype}: only 8-bit palettes are supported")
            colormap = ds.colormap(self.rgb_bands[0])
            self._lut = np.array([colormap.get(i, (0, 0, 0, 255)) for i in range(256)], dtype=np.uint8)
        # the dataset mask folds nodata, alpha and internal masks into one; all-valid files skip mask reads entirely
        self._all_valid = all(MaskFlags.all_valid in flags for flags in ds.mask_flag_enums) and \
            (self._lut is None or bool((self._lut[:, 3] > 0).all()))
        self.driver = ds.driver
        self.windowed_reason: Optional[str] = window_readable(ds)  # None = read by window
        self.windowed = self.windowed_reason is None
        self._memory: Optional[tuple[np.ndarray, Optional[np.ndarray]]] = None
        if not self.windowed:
            pixels = self.width * self.height
            if pixels > max_unwindowed_pixels:
                raise SceneError(
                    f"{self.path}: {self.width}x{self.height} = {pixels} pixels in {self.windowed_reason}, which "
                    f"cannot be read window by window, exceeds max_unwindowed_pixels={max_unwindowed_pixels}; "
                    f"convert it to a tiled GeoTIFF first: gdal_translate -co TILED=YES -co COMPRESS=DEFLATE "
                    f"-co BIGTIFF=IF_SAFER '{self.path}' '{self.path.with_suffix('').name}_tiled.tif'")
            self._memory = self._read_raw(None)
        self._stretch: Optional[np.ndarray] = None
        self._coarse_valid: Optional[np.ndarray] = None
        needs_stretch = self.dtype != "uint8"
        if needs_stretch or not self._all_valid:
            data, valid = self._coarse_read()
            if not self._all_valid:
                self._coarse_valid = valid
            if needs_stretch:
                self._stretch = self._stretch_from(data, valid, stretch_percentiles)

    # -- raw reads ------------------------------------------------------------------------------------------------
    def _read_raw(self, window: Optional[Window], out_shape: Optional[tuple[int, int]] = None,
                  with_bands: bool = True) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """(bands ``[k, h, w]`` of ``self._indexes`` in the file's dtype or None without ``with_bands``,
        dataset mask ``[h, w]`` bool or None = all valid)."""
        from rasterio.enums import Resampling
        from rasterio.windows import Window as RioWindow

        rasterio = _rasterio()
        rio_window = None if window is None else RioWindow(window.left, window.top, window.width, window.height)
        kwargs = {} if out_shape is None else {"out_shape": (len(self._indexes),) + out_shape,
                                               "resampling": Resampling.nearest}
        try:
            data = self._ds.read(self._indexes, window=rio_window, **kwargs) if with_bands else None
            mask = None
            if not self._all_valid:
                mask_kwargs = {} if out_shape is None else {"out_shape": out_shape,
                                                            "resampling": Resampling.nearest}
                mask = self._ds.dataset_mask(window=rio_window, **mask_kwargs) > 0
        except rasterio.errors.RasterioError as err:
            where = "the whole raster" if window is None else f"window {window}"
            raise SceneError(f"{self.path}: cannot read {where}: corrupt or truncated file? "
                             f"({_gdal_message(err)})") from err
        return data, mask

    def _window_raw(self, window: Window) -> tuple[np.ndarray, Optional[np.ndarray]]:
        if self._memory is None:
            return self._read_raw(window)
        data, mask = self._memory
        rows, cols = slice(window.top, window.bottom), slice(window.left, window.right)
        return data[:, rows, cols], (None if mask is None else mask[rows, cols])

    def _coarse_read(self) -> tuple[np.ndarray, np.ndarray]:
        """Decimated whole-scene read (nearest, at most ``COARSE_SIDE`` a side) -> (bands, validity)."""
        shape = self._coarse_shape()
        if self._memory is None:
            data, mask = self._read_raw(None, shape)
        else:
            rows = (np.arange(shape[0]) + 0.5) * self.height / shape[0]
            cols = (np.arange(shape[1]) + 0.5) * self.width / shape[1]
            full, full_mask = self._memory
            rows, cols = rows.astype(np.int64), cols.astype(np.int64)
            data = full[:, rows][:, :, cols]
            mask = None if full_mask is None else full_mask[rows][:, cols]
        return data, self._validity(data, mask)

    def _coarse_shape(self) -> tuple[int, int]:
        scale = min(1.0, COARSE_SIDE / max(self.width, self.height))
        return max(1, round(self.height * scale)), max(1, round(self.width * scale))

    def _validity(self, data: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
        valid = np.ones(data.shape[1:], dtype=bool) if mask is None else mask
        if self._lut is not None:
            valid = valid & (self._lut[data[0], 3] > 0)
        return valid

    @staticmethod
    def _stretch_from(data: np.ndarray, valid: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
        """``[k, 2]`` float64 (low, high) per band from the valid pixels; a constant band maps to [v, v + 1]."""
        stretch = np.zeros((data.shape[0], 2), dtype=np.float64)
        for band in range(data.shape[0]):
            values = data[band][valid]
            values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
            low, high = (np.percentile(values, percentiles) if values.size else (0.0, 1.0))
            stretch[band] = (low, high if high > low else low + 1.0)
        return stretch

    def _to_rgb(self, data: np.ndarray) -> np.ndarray:
        """Raw bands ``[k, h, w]`` -> ``[h, w, 3]`` uint8 RGB (palette lookup, stretch, grey replication)."""
        if self._lut is not None:
            return self._lut[data[0]][..., :3]
        if self._stretch is not None:
            low, high = self._stretch[:, 0, None, None], self._stretch[:, 1, None, None]
            scaled = (data.astype(np.float32) - low.astype(np.float32)) * (255.0 / (high - low)).astype(np.float32)
            data = np.clip(np.nan_to_num(scaled, nan=0.0) + 0.5, 0, 255).astype(np.uint8)
        position = {band: i for i, band in enumerate(self._indexes)}
        return np.ascontiguousarray(np.stack([data[position[b]] for b in self.rgb_bands], axis=-1))

    # -- the interface --------------------------------------------------------------------------------------------
    @property
    def stretch(self) -> Optional[list[tuple[float, float]]]:
        """The (low, high) raw values mapped to 0 and 255 for R, G, B; None for 8-bit data (used as is)."""
        if self._stretch is None:
            return None
        position = {band: i for i, band in enumerate(self._indexes)}
        return [tuple(float(v) for v in self._stretch[position[b]]) for b in self.rgb_bands]

    def clip(self, window: Window) -> Window:
        """``window`` intersected with the raster; ValueError when they do not overlap."""
        top, left = max(window.top, 0), max(window.left, 0)
        bottom, right = min(window.bottom, self.height), min(window.right, self.width)
        if bottom <= top or right <= left:
            raise ValueError(f"{self.path}: window {window} lies outside the {self.width}x{self.height} raster")
        return Window(top, left, bottom - top, right - left)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(rgb uint8 ``[h, w, 3]``, valid bool ``[h, w]``) of ``window`` clipped to the raster."""
        window = self.clip(window)
        data, mask = self._window_raw(window)
        return self._to_rgb(data), self._validity(data, mask)

    def is_empty(self, window: Window) -> bool:
        """True when no pixel of ``window`` (clipped to the raster) is valid."""
        window = self.clip(window)
        if self._all_valid:
            return False
        if self._memory is None and self._coarse_valid is not None:
            # a valid coarse cell lying (with a one-cell margin) inside the window proves a valid pixel there
            cell_h = self.height / self._coarse_valid.shape[0]
            cell_w = self.width / self._coarse_valid.shape[1]
            r0, r1 = math.ceil(window.top / cell_h) + 1, math.floor(window.bottom / cell_h) - 1
            c0, c1 = math.ceil(window.left / cell_w) + 1, math.floor(window.right / cell_w) - 1
            if r1 > r0 and c1 > c0 and self._coarse_valid[r0:r1, c0:c1].any():
                return False
        if self._memory is None and self._lut is None:  # the mask alone decides: no band data to convert
            return not self._read_raw(window, with_bands=False)[1].any()
        return not self.read(window)[1].any()

    def read_preview(self, max_side: int) -> tuple[np.ndarray, float]:
        """Decimated whole-scene RGB ``[h', w', 3]`` (box-averaged, at most ``max_side`` a side, invalid pixels black)
        and ``scale`` = preview pixels per file pixel (``w' / width``; ``h' / height`` agrees to rounding)."""
        from rasterio.enums import Resampling

        scale = min(1.0, max_side / max(self.width, self.height))
        shape = (max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        if self._memory is None:
            rasterio = _rasterio()
            try:
                data = self._ds.read(self._indexes, out_shape=(len(self._indexes),) + shape,
                                     resampling=Resampling.nearest if self._lut is not None else Resampling.average)
                mask = None if self._all_valid else self._ds.dataset_mask(out_shape=shape) > 0
            except rasterio.errors.RasterioError as err:
                raise SceneError(f"{self.path}: cannot read a preview: corrupt or truncated file? "
                             f"({_gdal_message(err)})") from err
            rgb, valid = self._to_rgb(data), self._validity(data, mask)
        else:
            from sdconet.utils.image import resize

            rgb, valid = self.read(Window(0, 0, self.height, self.width))
            rgb = resize(rgb, shape, nearest=self._lut is not None)
            valid = resize(valid.astype(np.uint8), shape, nearest=True) > 0
        rgb = np.where(valid[..., None], rgb, 0).astype(np.uint8)
        return rgb, shape[1] / self.width

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None
        self._memory = None
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SceneReader({str(self.path)!r}, {self.width}x{self.height}, {self.band_count} x {self.dtype}, "
                f"crs={self.crs}, windowed={self.windowed})")


def open_scene(path: str | Path, max_unwindowed_pixels: int = DEFAULT_MAX_UNWINDOWED_PIXELS, *,
               bands: Optional[Sequence[int]] = None,
               stretch_percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> SceneReader:
    """Open a scene file for window reads (see the module docstring); SceneError naming the file on anything bad."""
    return SceneReader(path, max_unwindowed_pixels, bands=bands, stretch_percentiles=stretch_percentiles)
