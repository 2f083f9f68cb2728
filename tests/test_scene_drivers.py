"""Window reads beyond GeoTIFF (issue 22 item 4): JPEG 2000, VRT and Erdas .img files written by the bundled GDAL are
read window by window, and a folder search finds them (a VRT's sources once, through the VRT)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import rasterio
import rasterio.shutil
from rasterio.transform import Affine

from sdconet.data import raster
from sdconet.data.raster import SceneError, Window, open_scene
from sdconet.scene.cli import collect_scenes

TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5000000.0)
SHAPE = (3, 300, 400)  # bands, rows, columns: 120000 pixels
UNDER = 100_000  # a max_unwindowed_pixels the files exceed: they open only when read by window


def _data(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, SHAPE, dtype=np.uint8)


def _tif(path: Path, data: np.ndarray, **options) -> Path:
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype="uint8",
                   crs="EPSG:32633", transform=TRANSFORM, tiled=True, blockxsize=64, blockysize=64)
    profile.update(options)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _copy(src: Path, dst: Path, driver: str, **options) -> Path:
    """``src`` rewritten by GDAL's CreateCopy of ``driver``; skips the test, saying why, when this GDAL cannot."""
    with rasterio.Env() as env:
        if driver not in env.drivers():
            pytest.skip(f"the bundled GDAL {rasterio.__gdal_version__} has no {driver} driver")
    try:
        rasterio.shutil.copy(src, dst, driver=driver, **options)
    except rasterio.errors.RasterioError as err:
        pytest.skip(f"the bundled GDAL {rasterio.__gdal_version__} cannot write {driver}: {err}")
    return dst


def _check_windows(path: Path, data: np.ndarray, exact: bool = True) -> None:
    with open_scene(path, max_unwindowed_pixels=UNDER) as reader:
        assert reader.windowed and reader.windowed_reason is None
        assert reader.georeferenced and reader.crs == "EPSG:32633"
        assert reader.transform == pytest.approx(tuple(TRANSFORM)[:6])
        rgb, valid = reader.read(Window(10, 20, 130, 150))
        assert rgb.shape == (130, 150, 3) and valid.all()
        expected = data[:, 10:140, 20:170].transpose(1, 2, 0)
        if exact:
            np.testing.assert_array_equal(rgb, expected)
        rgb, _ = reader.read(Window(250, 350, 128, 128))  # clipped at the bottom-right corner
        assert rgb.shape == (50, 50, 3)
        assert reader.read_preview(100)[0].shape == (75, 100, 3)


def test_vrt_over_a_tiled_geotiff_is_read_by_window(tmp_path):
    data = _data()
    tif = _tif(tmp_path / "base.tif", data)
    vrt = _copy(tif, tmp_path / "scene.vrt", "VRT")
    _check_windows(vrt, data)


def test_vrt_mosaic_of_two_geotiffs_is_read_by_window(tmp_path):
    """A two-tile mosaic (the usual VRT): its blocks and both sources are windowed, and windows across the seam read
    the right pixels of each."""
    data = _data(1)
    left = _tif(tmp_path / "left.tif", np.ascontiguousarray(data[:, :, :200]))
    right_transform = Affine(0.5, 0.0, 500000.0 + 200 * 0.5, 0.0, -0.5, 5000000.0)
    right = _tif(tmp_path / "right.tif", np.ascontiguousarray(data[:, :, 200:]), transform=right_transform)
    vrt = tmp_path / "mosaic.vrt"
    def band(b: int) -> str:
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{name}</SourceFilename><SourceBand>{b}</SourceBand>'
            f'<SrcRect xOff="0" yOff="0" xSize="200" ySize="300"/>'
            f'<DstRect xOff="{x}" yOff="0" xSize="200" ySize="300"/></SimpleSource>'
            for name, x in ((left.name, 0), (right.name, 200)))
        return f'<VRTRasterBand dataType="Byte" band="{b}" blockXSize="128" blockYSize="128">{sources}</VRTRasterBand>'

    bands = "".join(band(b) for b in (1, 2, 3))
    vrt.write_text(f'<VRTDataset rasterXSize="400" rasterYSize="300"><SRS>EPSG:32633</SRS>'
                   f'<GeoTransform>{", ".join(str(v) for v in TRANSFORM.to_gdal())}</GeoTransform>{bands}</VRTDataset>')
    _check_windows(vrt, data)


def test_vrt_over_a_png_is_whole_file_and_says_which_source(tmp_path):
    data = _data(2)
    tif = _tif(tmp_path / "base.tif", data)
    png = _copy(tif, tmp_path / "base.png", "PNG")
    vrt = _copy(png, tmp_path / "over_png.vrt", "VRT")
    with pytest.raises(SceneError, match=r"over_png\.vrt: 400x300 = 120000 pixels in a VRT over .*base\.png, a PNG "
                                         r"file.*gdal_translate"):
        open_scene(vrt, max_unwindowed_pixels=UNDER)
    with open_scene(vrt) as reader:
        assert not reader.windowed
        np.testing.assert_array_equal(reader.read(Window(0, 0, 300, 400))[0], data.transpose(1, 2, 0))


def test_tiled_jpeg2000_is_read_by_window(tmp_path):
    data = _data(3)
    tif = _tif(tmp_path / "base.tif", data)
    jp2 = _copy(tif, tmp_path / "scene.jp2", "JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES", BLOCKXSIZE=128,
                BLOCKYSIZE=128)
    with rasterio.open(jp2) as ds:
        assert ds.block_shapes[0] == (128, 128)  # tiles as written
    _check_windows(jp2, data)  # lossless (reversible 5/3 wavelet): the pixels are exact


def test_untiled_jpeg2000_over_the_block_limit_is_whole_file(tmp_path, monkeypatch):
    data = _data(4)
    tif = _tif(tmp_path / "base.tif", data)
    jp2 = _copy(tif, tmp_path / "one_tile.jp2", "JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES")
    monkeypatch.setattr(raster, "MAX_BLOCK_PIXELS", 64 * 64)
    with pytest.raises(SceneError, match=r"one_tile\.jp2.*JP2OpenJPEG file whose blocks are 300x400 pixels"):
        open_scene(jp2, max_unwindowed_pixels=UNDER)


def test_erdas_imagine_img_is_read_by_window(tmp_path):
    data = _data(5)
    tif = _tif(tmp_path / "base.tif", data)
    img = _copy(tif, tmp_path / "scene.img", "HFA")
    _check_windows(img, data)


def test_png_stays_whole_file_whatever_its_blocks(tmp_path, monkeypatch):
    data = _data(6)
    png = _copy(_tif(tmp_path / "base.tif", data), tmp_path / "scene.png", "PNG")
    monkeypatch.setattr(raster, "MAX_BLOCK_PIXELS", 10**9)  # blocks no object: the driver decodes from the start
    with open_scene(png) as reader:
        assert not reader.windowed and "PNG file, which GDAL decodes from its start" in reader.windowed_reason


def test_folder_search_finds_jp2_vrt_and_img_and_reads_vrt_sources_once(tmp_path):
    data = _data(7)
    folder = tmp_path / "scenes"
    (folder / "parts").mkdir(parents=True)
    base = _tif(folder / "parts" / "mosaic.tif", data)  # same stem as the VRT: read through it, no collision
    _copy(base, folder / "mosaic.vrt", "VRT")
    _tif(folder / "alone.tif", data)
    _copy(base, folder / "a.jp2", "JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES", BLOCKXSIZE=128, BLOCKYSIZE=128)
    _copy(base, folder / "b.img", "HFA")
    found = sorted(scene.relative.as_posix() for scene in collect_scenes([folder]))
    assert found == ["a.jp2", "alone.tif", "b.img", "mosaic.vrt"]
