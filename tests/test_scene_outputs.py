"""GeoJSON / JSON / preview / saliency outputs of a scene (sdconet.scene.outputs) on real rasterio files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import rasterio  # noqa: E402
from rasterio.transform import Affine  # noqa: E402
from rasterio.warp import transform as warp_transform  # noqa: E402

from sdconet.scene.outputs import RING_POINTS_PER_EDGE, write_atomically, write_scene_outputs  # noqa: E402
from sdconet.data.raster import open_scene  # noqa: E402

# Top-left corner 100 m west of the central meridian of UTM zone 33N (15 deg E): pixel column 200 lies on it.
ORIGIN_E, ORIGIN_N, PIXEL = 499_900.0, 5_000_000.0, 0.5
CLASSES = ["airplane", "ship", "vehicle"]
DETECTIONS = {"boxes": np.array([[200.0, 100.0, 240.0, 130.0], [10.5, 20.25, 30.0, 45.0]]),
              "scores": np.array([0.9, 0.45]), "labels": np.array([2, 0])}


def utm33_central_meridian_latitude(northing: float) -> float:
    """Latitude (deg) of a point on the UTM central meridian: the WGS84 footpoint latitude of the meridian arc
    northing / k0 (Snyder, Map Projections, eq. 3-26 and 7-19), written out here independently of PROJ."""
    a, f, k0 = 6378137.0, 1 / 298.257223563, 0.9996
    e2 = f * (2 - f)
    mu = northing / k0 / (a * (1 - e2 / 4 - 3 * e2 ** 2 / 64 - 5 * e2 ** 3 / 256))
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    phi = (mu + (3 * e1 / 2 - 27 * e1 ** 3 / 32) * math.sin(2 * mu)
           + (21 * e1 ** 2 / 16 - 55 * e1 ** 4 / 32) * math.sin(4 * mu)
           + (151 * e1 ** 3 / 96) * math.sin(6 * mu) + (1097 * e1 ** 4 / 512) * math.sin(8 * mu))
    return math.degrees(phi)


@pytest.fixture()
def geotiff(tmp_path) -> Path:
    path = tmp_path / "utm.tif"
    data = np.full((3, 300, 400), 120, np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=400, height=300, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(PIXEL, 0, ORIGIN_E, 0, -PIXEL, ORIGIN_N), tiled=True, blockxsize=64,
                       blockysize=64) as dst:
        dst.write(data)
    return path


def pixel_to_utm(x: float, y: float) -> tuple[float, float]:
    return ORIGIN_E + PIXEL * x, ORIGIN_N - PIXEL * y


def shoelace(ring: list) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:])) / 2


def no_temporary_files(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def test_wgs84_polygons_land_on_the_right_map_coordinates(geotiff, tmp_path):
    out = tmp_path / "out"
    with open_scene(geotiff) as reader:
        written = write_scene_outputs(out, "utm", reader, DETECTIONS, CLASSES)
    collection = json.loads(written["geojson"].read_text())
    assert collection["type"] == "FeatureCollection" and collection["sdconet:coordinates"] == "wgs84"
    assert "crs" not in collection  # RFC 7946: WGS84 is implied
    first, second = collection["features"]
    assert first["properties"] == {"bbox_xyxy": [200.0, 100.0, 240.0, 130.0], "score": 0.9, "label": 2,
                                   "class_name": "vehicle"}
    assert second["properties"]["class_name"] == "airplane"
    for feature, box in zip(collection["features"], DETECTIONS["boxes"]):
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and len(ring) == 4 * RING_POINTS_PER_EDGE + 1
        assert ring[0] == ring[-1] and shoelace(ring) > 0  # closed, counter-clockwise
        # every vertex is the WGS84 image of a point on the pixel box's outline
        utm = np.array([pixel_to_utm(x, y) for x, y in [(box[0], box[1]), (box[2], box[1]),
                                                        (box[2], box[3]), (box[0], box[3])]])
        lon, lat = warp_transform("EPSG:32633", "EPSG:4326", utm[:, 0].tolist(), utm[:, 1].tolist())
        ring_array = np.array(ring)
        for corner in zip(lon, lat):
            assert np.min(np.hypot(*(ring_array - corner).T)) < 1e-8
        assert ring_array[:, 0].min() == pytest.approx(min(lon), abs=1e-8)
        assert ring_array[:, 1].max() == pytest.approx(max(lat), abs=1e-8)
    # the first box's left edge is on the central meridian: lon 15 exactly, latitude from the meridian arc
    ring = np.array(first["geometry"]["coordinates"][0])
    west = ring[np.isclose(ring[:, 0], ring[:, 0].min(), rtol=0, atol=1e-9)]
    assert len(west) == RING_POINTS_PER_EDGE + 2  # the edge's points plus the closing repeat
    np.testing.assert_allclose(west[:, 0], 15.0, atol=1e-9)
    top = utm33_central_meridian_latitude(pixel_to_utm(200, 100)[1])
    bottom = utm33_central_meridian_latitude(pixel_to_utm(200, 130)[1])
    assert west[:, 1].max() == pytest.approx(top, abs=1e-8) and west[:, 1].min() == pytest.approx(bottom, abs=1e-8)
    assert 45.13 < bottom < top < 45.16 and ring[:, 0].max() > 15.0  # 5000 km north, east of the meridian
    assert no_temporary_files(out)


def test_native_crs_polygons_are_the_affine_image_of_the_pixel_box(geotiff, tmp_path):
    with open_scene(geotiff) as reader:
        written = write_scene_outputs(tmp_path, "utm", reader, DETECTIONS, CLASSES, geojson_crs="native")
    collection = json.loads(written["geojson"].read_text())
    assert collection["sdconet:coordinates"] == "native"
    assert collection["crs"] == {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
    ring = np.array(collection["features"][0]["geometry"]["coordinates"][0])
    east, north = ring.T
    assert (east.min(), east.max()) == pytest.approx((500_000.0, 500_020.0))
    assert (north.min(), north.max()) == pytest.approx((4_999_935.0, 4_999_950.0))
    assert shoelace(ring.tolist()) == pytest.approx(20.0 * 15.0)  # positive: counter-clockwise


def test_json_record_preview_and_georeferenced_saliency(geotiff, tmp_path):
    saliency = np.linspace(0, 1, 38 * 50, dtype=np.float32).reshape(38, 50)  # 8 file pixels per cell
    with open_scene(geotiff) as reader:
        written = write_scene_outputs(tmp_path, "utm", reader, DETECTIONS, CLASSES, saliency=(saliency, 8.0),
                                      preview_max_side=200)
    record = json.loads(written["json"].read_text())
    assert record["file"] == str(geotiff) and (record["width"], record["height"]) == (400, 300)
    assert record["crs"] == "EPSG:32633"
    assert record["transform"] == pytest.approx([PIXEL, 0, ORIGIN_E, 0, -PIXEL, ORIGIN_N])
    assert record["saliency"] == "utm_saliency.tif" and written["saliency"] == tmp_path / "utm_saliency.tif"
    assert [d["bbox_xyxy"] for d in record["detections"]] == DETECTIONS["boxes"].tolist()
    assert [d["class_name"] for d in record["detections"]] == ["vehicle", "airplane"]
    with rasterio.open(written["saliency"]) as stitched:
        assert stitched.crs.to_string() == "EPSG:32633" and (stitched.width, stitched.height) == (50, 38)
        assert tuple(stitched.transform)[:6] == pytest.approx((4.0, 0, ORIGIN_E, 0, -4.0, ORIGIN_N))
        np.testing.assert_array_equal(stitched.read(1), saliency)
    from PIL import Image

    preview = np.asarray(Image.open(written["preview"]).convert("RGB"))
    assert preview.shape == (150, 200, 3)  # 400x300 scene at max side 200
    red = (preview[..., 0] > 200) & (preview[..., 1] < 100)
    # the first box (200..240, 100..130 file px) is drawn at half scale: its outline is red, the scene is grey
    assert red[50, 100:120].all() and red[50:65, 100].all() and not red[57, 110]
    assert no_temporary_files(tmp_path)


def test_plain_png_gets_pixel_coordinates_and_a_png_saliency(tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.fromarray(np.full((100, 120, 3), 90, np.uint8)).save(path)
    out = tmp_path / "out"
    with open_scene(path) as reader:
        written = write_scene_outputs(out, "plain", reader, DETECTIONS, CLASSES, geojson_crs="native",
                                      saliency=(np.full((13, 15), 0.5, np.float32), 8.0))
    collection = json.loads(written["geojson"].read_text())
    assert collection["sdconet:coordinates"] == "pixel" and "crs" not in collection
    ring = np.array(collection["features"][1]["geometry"]["coordinates"][0])
    assert (ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()) == (10.5, 20.25, 30.0, 45.0)
    assert shoelace(ring.tolist()) > 0
    record = json.loads(written["json"].read_text())
    assert record["crs"] is None and record["transform"] is None and record["saliency"] == "plain_saliency.png"
    assert np.asarray(Image.open(written["saliency"])).tolist() == np.full((13, 15), 128).tolist()
    assert no_temporary_files(out)


def test_no_saliency_and_no_detections(geotiff, tmp_path):
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    with open_scene(geotiff) as reader:
        written = write_scene_outputs(tmp_path, "utm", reader, empty, CLASSES)
    assert written["saliency"] is None and not list(tmp_path.glob("utm_saliency.*"))
    assert json.loads(written["geojson"].read_text())["features"] == []
    record = json.loads(written["json"].read_text())
    assert record["saliency"] is None and record["detections"] == []


def test_bad_arguments_are_refused_naming_the_field(geotiff, tmp_path):
    with open_scene(geotiff) as reader:
        with pytest.raises(ValueError, match="geojson_crs"):
            write_scene_outputs(tmp_path, "s", reader, DETECTIONS, CLASSES, geojson_crs="utm")
        with pytest.raises(ValueError, match=r"detections\['boxes'\] must be \[n, 4\]"):
            write_scene_outputs(tmp_path, "s", reader, {**DETECTIONS, "boxes": np.zeros((2, 3))}, CLASSES)
        with pytest.raises(ValueError, match="scores 1"):
            write_scene_outputs(tmp_path, "s", reader, {**DETECTIONS, "scores": np.zeros(1)}, CLASSES)
        with pytest.raises(ValueError, match="saliency must be"):
            write_scene_outputs(tmp_path, "s", reader, DETECTIONS, CLASSES, saliency=(np.zeros(5), 8.0))
    assert not list(tmp_path.glob("s*")) and no_temporary_files(tmp_path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "scene.json"
    target.write_text("old")

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt  # a killed job

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["scene.json"]
    write_atomically(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["scene.json"]
