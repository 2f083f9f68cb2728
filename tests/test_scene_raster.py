"""Scene file reading (sdconet.data.raster) on real files written by rasterio / Pillow."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rasterio  # noqa: E402
from rasterio.enums import ColorInterp  # noqa: E402
from rasterio.transform import Affine  # noqa: E402

from sdconet.data import raster  # noqa: E402
from sdconet.data.raster import GDAL_CACHE_BYTES, SceneError, Window, open_scene  # noqa: E402

UTM_ORIGIN = (500000.0, 5000000.0)  # EPSG:32633 easting/northing of the top-left corner
UTM_TRANSFORM = Affine(0.5, 0.0, UTM_ORIGIN[0], 0.0, -0.5, UTM_ORIGIN[1])  # 0.5 m pixels, north up


def write_tif(path: Path, data: np.ndarray, *, crs: str | None = "EPSG:32633", nodata=None, colorinterp=None,
              tiled: bool = True, **options) -> Path:
    """``data`` [bands, h, w] -> a (Geo)TIFF, 0.5 m pixels at UTM_ORIGIN when ``crs`` is set."""
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype, nodata=nodata,
                   compress="deflate", **options)
    if tiled:
        profile.update(tiled=True, blockxsize=64, blockysize=64)
    if crs:
        profile.update(crs=crs, transform=UTM_TRANSFORM)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if colorinterp:
            dst.colorinterp = colorinterp
    return path


def test_georeferenced_rgb_windows(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 150, 200), dtype=np.uint8)
    path = write_tif(tmp_path / "scene.tif", data)
    with open_scene(path) as reader:
        assert (reader.width, reader.height, reader.band_count, reader.dtype) == (200, 150, 3, "uint8")
        assert reader.crs == "EPSG:32633" and reader.georeferenced and reader.windowed
        assert reader.transform == pytest.approx((0.5, 0.0, UTM_ORIGIN[0], 0.0, -0.5, UTM_ORIGIN[1]))
        rgb, valid = reader.read(Window(10, 20, 30, 40))
        assert rgb.dtype == np.uint8 and rgb.shape == (30, 40, 3) and valid.all()
        np.testing.assert_array_equal(rgb, data[:, 10:40, 20:60].transpose(1, 2, 0))
        rgb, valid = reader.read(Window(140, 190, 64, 64))  # clipped to the raster
        assert rgb.shape == (10, 10, 3) and valid.shape == (10, 10)
        np.testing.assert_array_equal(rgb, data[:, 140:, 190:].transpose(1, 2, 0))
        assert not reader.is_empty(Window(0, 0, 64, 64))
        with pytest.raises(ValueError, match="outside"):
            reader.read(Window(150, 0, 10, 10))


def test_grey_is_replicated_and_plain_png_is_not_georeferenced(tmp_path):
    from PIL import Image

    grey = np.arange(60 * 80, dtype=np.uint32).reshape(60, 80) % 251
    path = tmp_path / "grey.png"
    Image.fromarray(grey.astype(np.uint8)).save(path)
    with open_scene(path) as reader:
        assert not reader.windowed and not reader.georeferenced and reader.crs is None and reader.transform is None
        rgb, valid = reader.read(Window(5, 7, 20, 30))
        assert valid.all()
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel], grey[5:25, 7:37])


def test_rgba_png_alpha_zero_is_invalid(tmp_path):
    from PIL import Image

    rgba = np.zeros((40, 50, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, 25:, 3] = 255  # left half transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with open_scene(path) as reader:
        assert reader.alpha_band == 4
        _, valid = reader.read(Window(0, 0, 40, 50))
        np.testing.assert_array_equal(valid, rgba[..., 3] > 0)
        assert reader.is_empty(Window(0, 0, 40, 25)) and not reader.is_empty(Window(0, 20, 10, 10))


def test_16bit_rgb_nir_stretch_is_per_band_and_the_same_in_every_window(tmp_path):
    rng = np.random.default_rng(1)
    scales = np.array([1000, 3000, 12000, 60000])[:, None, None]
    data = (rng.random((4, 128, 160)) * scales).astype(np.uint16)
    path = write_tif(tmp_path / "ms.tif", data, colorinterp=[ColorInterp.gray] + [ColorInterp.undefined] * 3)
    with open_scene(path) as reader:
        assert reader.rgb_bands == (1, 2, 3) and reader.alpha_band is None  # band 4 (NIR) ignored, as documented
        # the raster is below COARSE_SIDE, so the statistics are over every pixel
        for band, (low, high) in enumerate(reader.stretch):
            assert (low, high) == pytest.approx(tuple(np.percentile(data[band], raster.STRETCH_PERCENTILES)))
        rgb, valid = reader.read(Window(0, 0, 128, 160))
        assert valid.all()
        low, high = np.array(reader.stretch).T[..., None, None]
        expected = np.clip((data[:3] - low) * 255 / (high - low) + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        assert np.abs(rgb.astype(int) - expected).max() <= 1
        a, _ = reader.read(Window(0, 0, 64, 64))  # overlapping windows see identical values where they overlap
        b, _ = reader.read(Window(32, 32, 64, 64))
        np.testing.assert_array_equal(a[32:, 32:], b[:32, :32])
        assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255


def test_16bit_rgba_alpha_band_is_the_mask(tmp_path):
    data = np.full((4, 64, 64), 5000, dtype=np.uint16)
    data[0, :, :32] = 20000
    data[3] = 65535
    data[3, :16] = 0
    path = write_tif(tmp_path / "rgba16.tif", data,
                     colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha])
    with open_scene(path) as reader:
        assert reader.alpha_band == 4 and reader.rgb_bands == (1, 2, 3)
        _, valid = reader.read(Window(0, 0, 64, 64))
        assert not valid[:16].any() and valid[16:].all()
        assert reader.is_empty(Window(0, 0, 16, 64)) and not reader.is_empty(Window(10, 0, 10, 10))


def test_colour_interpretation_picks_bgr_order(tmp_path):
    data = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 20, 30)])
    path = write_tif(tmp_path / "bgr.tif", data, colorinterp=[ColorInterp.blue, ColorInterp.green, ColorInterp.red])
    with open_scene(path) as reader:
        rgb, _ = reader.read(Window(0, 0, 4, 4))
        assert tuple(rgb[0, 0]) == (30, 20, 10)


@pytest.mark.parametrize("count", [2, 5])
def test_unknown_band_layout_is_refused_naming_it(tmp_path, count):
    path = write_tif(tmp_path / f"bands{count}.tif", np.zeros((count, 16, 16), np.uint16))
    with pytest.raises(SceneError, match=rf"bands{count}\.tif: {count} band\(s\) of uint16 \(1:gray"):
        open_scene(path)


def test_nodata_windows_are_empty_through_the_coarse_mask_and_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(raster, "COARSE_SIDE", 64)  # a 256-px raster then has 4-px coarse cells
    data = np.zeros((3, 256, 256), dtype=np.uint8)
    data[:, :, 128:] = 90
    data[:, 40, 60] = 7  # one valid pixel inside the nodata half: no coarse cell may hide it
    path = write_tif(tmp_path / "nodata.tif", data, nodata=0)
    with open_scene(path) as reader:
        assert reader.windowed
        assert reader.is_empty(Window(0, 0, 32, 32))
        assert reader.is_empty(Window(100, 0, 100, 120))
        assert not reader.is_empty(Window(0, 100, 64, 64))  # straddles the border
        assert not reader.is_empty(Window(30, 50, 20, 20))  # holds only the single valid pixel
        _, valid = reader.read(Window(0, 0, 256, 256))
        np.testing.assert_array_equal(valid, data[0] > 0)


def test_all_valid_file_is_never_empty(tmp_path):
    path = write_tif(tmp_path / "zeros.tif", np.zeros((3, 32, 32), np.uint8))  # no nodata declared: 0 is data
    with open_scene(path) as reader:
        assert not reader.is_empty(Window(0, 0, 32, 32))


def test_corrupt_and_truncated_tiffs_are_scene_errors_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    with pytest.raises(SceneError, match="garbage.tif"):
        open_scene(garbage)
    rng = np.random.default_rng(2)
    good = write_tif(tmp_path / "good.tif", rng.integers(0, 256, (3, 256, 256), dtype=np.uint8))
    blob = good.read_bytes()
    for name, content in (("truncated.tif", blob[: len(blob) // 2]),
                          ("scrambled.tif", blob[:4096] + bytes(len(blob) - 4096))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SceneError, match=name):
            with open_scene(path) as reader:  # open may succeed (header intact); decoding the blocks must not
                for top in range(0, 256, 64):
                    for left in range(0, 256, 64):
                        reader.read(Window(top, left, 64, 64))


def test_missing_file_is_a_scene_error(tmp_path):
    with pytest.raises(SceneError, match="not found"):
        open_scene(tmp_path / "nope.tif")


def test_png_over_the_unwindowed_limit_is_refused_with_the_fix(tmp_path):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((120, 100, 3), np.uint8)).save(path)
    with pytest.raises(SceneError, match=r"big\.png: 100x120 = 12000 pixels.*gdal_translate -co TILED=YES"):
        open_scene(path, max_unwindowed_pixels=10_000)
    with open_scene(path, max_unwindowed_pixels=12_000) as reader:
        assert reader.read(Window(0, 0, 120, 100))[0].shape == (120, 100, 3)


def test_single_strip_tiff_over_the_limit_is_refused(tmp_path, monkeypatch):
    path = write_tif(tmp_path / "strip.tif", np.zeros((3, 100, 100), np.uint8), tiled=False, blockysize=100)
    monkeypatch.setattr(raster, "MAX_BLOCK_PIXELS", 5000)  # the one strip (100x100) is then too large to window
    with pytest.raises(SceneError, match=r"strip\.tif.*blocks are 100x100 pixels.*gdal_translate"):
        open_scene(path, max_unwindowed_pixels=9_999)
    with open_scene(path) as reader:
        assert not reader.windowed


def test_preview_is_decimated(tmp_path):
    data = np.zeros((3, 300, 600), np.uint8)
    data[0] = 200
    path = write_tif(tmp_path / "wide.tif", data)
    with open_scene(path) as reader:
        preview, scale = reader.read_preview(150)
        assert preview.shape == (75, 150, 3) and scale == pytest.approx(0.25)
        assert (preview[..., 0] == 200).all() and (preview[..., 1:] == 0).all()


def test_gdal_cache_is_bounded_while_open_and_restored_after(tmp_path):
    path = write_tif(tmp_path / "c.tif", np.zeros((3, 16, 16), np.uint8))
    with open_scene(path):
        assert rasterio.env.getenv()["GDAL_CACHEMAX"] == GDAL_CACHE_BYTES
    assert not rasterio.env.hasenv() or rasterio.env.getenv().get("GDAL_CACHEMAX") != GDAL_CACHE_BYTES


def test_20000_square_geotiff_is_read_by_window_in_bounded_memory(tmp_path):
    """A sparse 20000^2 RGB GeoTIFF (1.2 GB decoded): open, window reads, is_empty and a preview stay far below it."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak RSS is read from /proc/self/status (Linux only)")
    path = tmp_path / "huge.tif"
    with rasterio.open(path, "w", driver="GTiff", width=20000, height=20000, count=3, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", sparse_ok=True, nodata=0,
                       crs="EPSG:32633", transform=UTM_TRANSFORM) as dst:
        dst.write(np.full((3, 512, 512), 100, np.uint8), window=rasterio.windows.Window(1000, 1000, 512, 512))
    script = f"""
import json
from sdconet.data.raster import open_scene, Window
with open_scene({str(path)!r}) as reader:
    rgb, valid = reader.read(Window(1000, 1000, 256, 256))
    result = dict(mean=float(rgb.mean()), valid=float(valid.mean()),
                  empty=[reader.is_empty(Window(0, 0, 256, 256)), reader.is_empty(Window(1100, 1100, 256, 256))],
                  preview=list(reader.read_preview(1024)[0].shape))
# VmHWM: peak RSS of this process image (ru_maxrss would carry over the forking pytest process's peak)
result["peak_mb"] = next(int(line.split()[1]) for line in open("/proc/self/status")
                         if line.startswith("VmHWM")) / 1024
print(json.dumps(result))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mean"] == 100 and result["valid"] == 1 and result["empty"] == [True, False]
    assert result["preview"] == [1024, 1024, 3]
    # interpreter + numpy + rasterio + the 256 MiB block cache; decoding the scene whole would add 1.2 GB
    assert result["peak_mb"] < 700, result


def test_bands_select_rgb_of_a_bgr_nir_geotiff_and_out_of_range_is_refused(tmp_path):
    """A 5-band B, G, R, NIR, SWIR GeoTIFF without colour marks: refused by default, read as RGB with bands=(3, 2, 1)
    (GDAL's 1-based numbers); band numbers outside 1..5 are errors naming the file, the count and the value."""
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, (5, 70, 90), dtype=np.uint8)
    path = write_tif(tmp_path / "bgrnir.tif", data)
    with pytest.raises(SceneError, match="cannot tell which bands"):
        open_scene(path)
    with open_scene(path, bands=(3, 2, 1)) as reader:
        assert reader.rgb_bands == (3, 2, 1) and reader.alpha_band is None and reader.georeferenced
        rgb, valid = reader.read(Window(5, 6, 40, 50))
        assert valid.all()
        np.testing.assert_array_equal(rgb, data[[2, 1, 0], 5:45, 6:56].transpose(1, 2, 0))
    with open_scene(path, bands=(4,)) as reader:  # one band: grey
        rgb, _ = reader.read(Window(0, 0, 70, 90))
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel], data[3])
    for bad, value in (((3, 2, 6), 6), ((0, 2, 1), 0)):
        with pytest.raises(SceneError, match=rf"bgrnir\.tif: 5 band\(s\) of uint8 .*: band {value} of "
                                             rf"bands=\[.*\] does not exist; the file has 5 band\(s\), numbered 1\.\.5"):
            open_scene(path, bands=bad)
    with pytest.raises(SceneError, match=r"must be 1 \(grey\) or 3 \(R, G, B\) band numbers, got 2"):
        open_scene(path, bands=(1, 2))
