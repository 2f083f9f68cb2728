"""The large-scene generator (sdconet.data.scene_synth, ``python -m sdconet.data synth-scene``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rasterio  # noqa: E402

from sdconet.data import scene_synth  # noqa: E402
from sdconet.data.__main__ import main  # noqa: E402
from sdconet.data.scene_synth import generate_scene, split_length  # noqa: E402
from sdconet.data.synthetic import SYNTHETIC_CATEGORIES  # noqa: E402
from sdconet.data.validation import DataError  # noqa: E402
from sdconet.data.raster import Window, open_scene  # noqa: E402


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def boxes_of(coco: dict) -> np.ndarray:
    return np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                     for a in coco["annotations"]], dtype=float).reshape(-1, 4)


def test_split_length_parts_differ_by_at_most_one():
    assert split_length(1100, 512) == [367, 367, 366]
    assert split_length(512, 512) == [512] and split_length(100, 512) == [100]
    parts = split_length(20000, 512)
    assert sum(parts) == 20000 and max(parts) - min(parts) <= 1 and max(parts) <= 512


def test_cli_writes_a_readable_georeferenced_tiled_geotiff_and_its_coco(tmp_path, capsys):
    out = tmp_path / "scene"
    assert main(["synth-scene", "--out", str(out), "--size", "700", "333", "--geotiff", "--crs", "EPSG:32633",
                 "--seed", "4", "--tile", "256"]) == 0
    assert "synthetic scene 700x333" in capsys.readouterr().out
    tif, coco = out / "scene.tif", json.loads((out / "scene.json").read_text())
    with rasterio.open(tif) as ds:
        assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (700, 333, 3, "uint8")
        assert ds.crs.to_epsg() == 32633 and ds.block_shapes[0] == (256, 256) and ds.compression.name == "deflate"
        # UTM placement: the centre column on the zone's central meridian, top edge at northing 5,000,000 m
        assert tuple(ds.transform)[:6] == pytest.approx((0.5, 0, 500_000 - 175, 0, -0.5, 5_000_000))
    with open_scene(tif) as reader:
        assert reader.georeferenced and reader.windowed
        rgb, valid = reader.read(Window(300, 600, 64, 200))
        assert rgb.shape == (33, 100, 3) and valid.all() and rgb.std() > 5  # a textured scene, not a blank
    assert coco["images"] == [{"id": 1, "file_name": "scene.tif", "width": 700, "height": 333}]
    assert [c["name"] for c in coco["categories"]] == list(SYNTHETIC_CATEGORIES)
    assert [c["id"] for c in coco["categories"]] == list(range(1, 7))
    boxes = boxes_of(coco)
    assert len(boxes) >= 6  # 3 x 2 render tiles, each with at least one object (seeded)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 700).all() and (boxes[:, 3] <= 333).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert len({a["id"] for a in coco["annotations"]}) == len(boxes) and leftovers(out) == []


def test_generation_is_reproducible_per_seed(tmp_path):
    from PIL import Image

    first = generate_scene(tmp_path / "a", 300, seed=7, progress=False)
    again = generate_scene(tmp_path / "b", 300, seed=7, progress=False)
    other = generate_scene(tmp_path / "c", 300, seed=8, progress=False)
    a, b, c = (np.asarray(Image.open(summary["scene"])) for summary in (first, again, other))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    coco_a = json.loads(Path(first["annotations"]).read_text())
    assert coco_a == json.loads(Path(again["annotations"]).read_text())
    assert coco_a["images"][0]["file_name"] == "scene.png" and first["transform"] is None


def test_classes_limit_what_is_drawn_but_categories_stay(tmp_path):
    summary = generate_scene(tmp_path, 600, seed=1, classes=["vehicle", "storage-tank"], progress=False)
    coco = json.loads(Path(summary["annotations"]).read_text())
    names = {SYNTHETIC_CATEGORIES[a["category_id"] - 1] for a in coco["annotations"]}
    assert names and names <= {"vehicle", "storage-tank"} and len(coco["categories"]) == 6
    with pytest.raises(DataError, match=r"unknown class\(es\) \['boat'\]"):
        generate_scene(tmp_path / "x", 100, classes=["boat"], progress=False)


def test_bad_requests_are_refused_before_any_work(tmp_path):
    with pytest.raises(DataError, match="too large for a PNG.*--geotiff"):
        generate_scene(tmp_path / "png", 9000, progress=False)
    with pytest.raises(DataError, match="at least 32"):
        generate_scene(tmp_path / "tiny", 16, progress=False)
    with pytest.raises(DataError, match="--crs 'EPSG:999999'"):
        generate_scene(tmp_path / "crs", 64, geotiff=True, crs="EPSG:999999", progress=False)
    assert main(["synth-scene", "--out", str(tmp_path / "cli"), "--size", "1", "2", "3"]) == 2
    assert not (tmp_path / "png").exists() or not any((tmp_path / "png").iterdir())


def test_geographic_crs_uses_degrees(tmp_path):
    summary = generate_scene(tmp_path, 64, geotiff=True, crs="EPSG:4326", progress=False)
    step = 0.5 / scene_synth.METRES_PER_DEGREE_LATITUDE
    assert summary["transform"] == pytest.approx([step, 0, 15.0, 0, -step, 45.0])


def test_an_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = scene_synth.render_scene

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(scene_synth, "render_scene", failing)
    out = tmp_path / "scene"
    with pytest.raises(KeyboardInterrupt):
        generate_scene(out, 600, geotiff=True, tile=256, progress=False)
    assert list(out.iterdir()) == []


def test_a_large_geotiff_is_written_in_bounded_memory(tmp_path):
    """6000^2 (108 MB of pixels) with a constant-tile renderer and a 16 MiB GDAL cache: the scene is never held."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak RSS is read from /proc/self/status (Linux only)")
    script = f"""
import json
import numpy as np
from sdconet.data import scene_synth
from sdconet.data import raster

def peak_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

raster.GDAL_CACHE_BYTES = 16 * 2**20
scene_synth.render_scene = lambda rng, side, *counts_weights_extent: (np.full((side, side, 3), 77, np.uint8), [])
scene_synth.generate_scene({str(tmp_path / "warm")!r}, 64, geotiff=True, progress=False)  # loads GDAL, PROJ
before = peak_mb()
summary = scene_synth.generate_scene({str(tmp_path)!r}, 6000, geotiff=True, progress=False)
print(json.dumps({{"before": before, "after": peak_mb(), "tiles": summary["tiles"]}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tiles"] == 144
    assert result["after"] - result["before"] < 60, result  # holding the scene would add >= 108 MB
    with open_scene(tmp_path / "scene.tif") as reader:
        assert reader.read(Window(5990, 5990, 10, 10))[0].tolist() == np.full((10, 10, 3), 77).tolist()
