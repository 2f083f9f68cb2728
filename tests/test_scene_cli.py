"""The scene CLI (python -m sdconet.predict): torch and ONNX Runtime agree on whole scenes, a wrong --tile for a
fixed-size model is refused, a bad scene is an entry in errors, a job killed with SIGKILL resumes to the outputs of an
uninterrupted run, whole-scene COCO metrics with maxDets above the ground-truth count."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdconet.scene.cli import DONE_SUFFIX, SUMMARY_NAME, UsageError, collect_scenes, evaluate_scenes, main
from conftest import TINY_CLASS_NAMES

REPO = Path(__file__).resolve().parents[1]
IMGSZ = 64
NAMES = TINY_CLASS_NAMES
# a score threshold the random-init tiny model crosses a few times per tile (0.3 is never reached)
COMMON = ["--tile", str(IMGSZ), "--overlap", "16", "--score-threshold", "0.02", "--no-progress"]
TIMING = ("seconds", "tiles_per_s", "megapixels_per_s", "peak_rss_mb")


@pytest.fixture(scope="module")
def checkpoint(tiny_random_checkpoint):
    return tiny_random_checkpoint


@pytest.fixture(scope="module")
def onnx_model(checkpoint, tmp_path_factory):
    """The pure-ONNX graph of the checkpoint at 64 px, with its metadata (no parity or simplification: fast)."""
    from sdconet.engine.inference_graph import load_inference_graph
    from sdconet.deploy.onnx_export import export_module, save_model
    from sdconet.runtime.metadata import write_onnx_metadata

    graph, _, meta = load_inference_graph(checkpoint, msda_impl="gather", with_saliency=True)
    model = export_module(graph, torch.rand(1, 3, IMGSZ, IMGSZ), input_name="images",
                          output_names=graph.output_names)
    write_onnx_metadata(model, class_names=meta["category_names"], imgsz=IMGSZ, msda="onnx",
                        outputs=graph.output_names, precision="fp32")
    return save_model(model, tmp_path_factory.mktemp("scene_onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (100, 90, 3), dtype=np.uint8)).save(root / "a.png")  # 2 x 2 tiles
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.fromarray(rng.integers(0, 255, (101, 137, 3), dtype=np.uint8)).save(root / "c.png")  # 2 x 3 tiles, odd
    Image.fromarray(rng.integers(0, 255, (40, 51, 3), dtype=np.uint8)).save(root / "sub" / "b.png")  # < a tile
    return root


def _torch_command(checkpoint: Path, scenes: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sdconet.predict", str(scenes), "--backend", "torch", "--checkpoint",
            str(checkpoint), "--device", "cpu", "--out", str(out), *COMMON]


# one intra-op thread in every torch run compared byte for byte (float sums depend on the thread split)
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def torch_run(checkpoint, scenes, tmp_path_factory):
    """An uninterrupted job, as a subprocess like the interrupted one it is compared with."""
    out = tmp_path_factory.mktemp("out_torch")
    result = subprocess.run(_torch_command(checkpoint, scenes, out), cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300)
    return result.returncode, out


def _detections(out: Path, stem: str) -> dict[str, np.ndarray]:
    record = json.loads((out / f"{stem}.json").read_text())
    dets = sorted(record["detections"], key=lambda d: (-d["score"], d["bbox_xyxy"][0]))
    return {"boxes": np.array([d["bbox_xyxy"] for d in dets]).reshape(-1, 4),
            "scores": np.array([d["score"] for d in dets]), "labels": np.array([d["label"] for d in dets])}


def test_torch_and_onnxruntime_agree_on_whole_scenes(torch_run, onnx_model, scenes, tmp_path):
    code, torch_out = torch_run
    assert code == 1  # broken.png failed, the others ran
    summary = json.loads((torch_out / SUMMARY_NAME).read_text())
    assert [e["file"] for e in summary["errors"]] == ["broken.png"] and "broken.png" in summary["errors"][0]["error"]
    by_file = {e["file"]: e for e in summary["scenes"]}
    assert set(by_file) == {"a.png", "c.png", "sub/b.png"} and summary["metrics"] is None
    assert [by_file[f]["tiles"] for f in ("a.png", "c.png", "sub/b.png")] == [4, 6, 1]
    for entry in summary["scenes"]:
        assert set(TIMING) <= set(entry) and entry["peak_rss_mb"] > 0
        for name in entry["outputs"].values():
            assert (torch_out / name).is_file(), name
    assert sum(e["detections"] for e in summary["scenes"]) > 10

    ort_out = tmp_path / "ort"
    assert main([str(scenes), "--backend", "onnxruntime", "--model", str(onnx_model), "--threads", "1",
                 "--out", str(ort_out), *COMMON]) == 1
    for stem in ("a", "c", "sub/b"):
        ours, theirs = _detections(torch_out, stem), _detections(ort_out, stem)
        assert len(ours["boxes"]) == len(theirs["boxes"]) > 0, stem
        np.testing.assert_allclose(theirs["boxes"], ours["boxes"], atol=1e-2, err_msg=stem)
        np.testing.assert_allclose(theirs["scores"], ours["scores"], atol=1e-3, err_msg=stem)
        np.testing.assert_array_equal(theirs["labels"], ours["labels"], err_msg=stem)
        c = json.loads((ort_out / "c.json").read_text())
        assert (c["width"], c["height"]) == (137, 101)
        boxes = ours["boxes"]
        assert (boxes[:, [0, 2]] <= 137).all() and (boxes[:, [1, 3]] <= 101).all() and (boxes >= 0).all()


def test_a_wrong_tile_for_a_fixed_size_model_is_refused(onnx_model, scenes, tmp_path, capsys):
    code = main([str(scenes / "a.png"), "--backend", "onnxruntime", "--model", str(onnx_model),
                 "--out", str(tmp_path), "--tile", "96"])
    assert code == 2 and "--tile 96" in capsys.readouterr().err
    assert main([str(scenes / "a.png"), "--backend", "onnxruntime", "--checkpoint", "x", "--out", str(tmp_path)]) == 2
    assert "takes --model" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    assert main([str(scenes / "a.png"), "--backend", "onnxruntime", "--model", str(corrupt),
                 "--out", str(tmp_path)]) == 2
    assert f"{corrupt}: the onnxruntime backend cannot open it" in capsys.readouterr().err
    assert not (tmp_path / SUMMARY_NAME).exists()


def test_colliding_and_reserved_output_names_are_refused(tmp_path):
    for name in ("x.png", "x.tif", "summary.png"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UsageError, match="both write OUT/x"):
        collect_scenes([tmp_path / "x.png", tmp_path / "x.tif"])
    with pytest.raises(UsageError, match="named 'summary'"):
        collect_scenes([tmp_path / "summary.png"])
    with pytest.raises(UsageError, match="not found"):
        collect_scenes([tmp_path / "missing.tif"])


def _outputs(out: Path) -> dict[str, bytes]:
    """Every output file except the summary and the done-markers (they hold timing fields)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != SUMMARY_NAME and not p.name.endswith(DONE_SUFFIX)}


def _without_timing(summary: dict) -> list[dict]:
    return [{k: v for k, v in entry.items() if k not in TIMING} for entry in summary["scenes"]]


def test_a_job_killed_with_sigkill_resumes_to_the_uninterrupted_outputs(torch_run, checkpoint, scenes, tmp_path):
    _, reference = torch_run
    out = tmp_path / "job"
    command = _torch_command(checkpoint, scenes, out)
    job = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / f"a{DONE_SUFFIX}").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)  # a.png done; c.png (6 tiles) in the middle of its run
    job.wait(timeout=30)
    assert job.returncode == -signal.SIGKILL
    assert (out / f"a{DONE_SUFFIX}").exists() and not (out / f"c{DONE_SUFFIX}").exists()
    marker_time = (out / f"a{DONE_SUFFIX}").stat().st_mtime_ns
    # what a kill in the middle of an atomic write leaves (the job may or may not have been writing just then)
    (out / f".c.{job.pid}-deadbeef.tmp.json").write_text('{"half": ')

    rerun = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr  # broken.png still fails
    assert "a.png: done already" in rerun.stderr and "c.png: done already" not in rerun.stderr
    assert (out / f"a{DONE_SUFFIX}").stat().st_mtime_ns == marker_time  # skipped, not redone
    assert _outputs(out) == _outputs(reference)
    summary, expected = (json.loads((d / SUMMARY_NAME).read_text()) for d in (out, reference))
    assert _without_timing(summary) == _without_timing(expected) and summary["errors"] == expected["errors"]


def test_whole_scene_metrics_use_maxdets_above_the_ground_truth_count(torch_run, tmp_path):
    from sdconet.engine.metrics import coco_evaluate

    _, out = torch_run
    summary = json.loads((out / SUMMARY_NAME).read_text())
    # ground truth = the scenes' own detections (> 100 per scene): AP 1 only when maxDets is raised above 100
    images, annotations = [], []
    for image_id, (stem, file_name) in enumerate((("a", "a.png"), ("c", "scenes/c.png")), start=1):
        found = _detections(out, stem)
        images.append({"id": image_id, "file_name": file_name, "width": 200, "height": 200})
        for (x1, y1, x2, y2), label in zip(found["boxes"].tolist(), found["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                "category_id": int(label) + 10,  # ids differ from labels: matched by name
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    counts = [sum(a["image_id"] == i for a in annotations) for i in (1, 2)]  # all classes of a scene
    assert min(counts) > 100
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 10, "name": name} for i, name in enumerate(NAMES)]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    metrics = evaluate_scenes(ann, out, summary["scenes"])  # c.png matched by its base name; sub/b.png left out
    assert metrics["images"] == 2 and metrics["max_dets"] == max(counts)
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP"] == pytest.approx(1.0)
    # pycocotools caps detections per image and category: one category of > 100 objects shows the cap's effect
    single = tmp_path / "single.json"
    single.write_text(json.dumps(dict(coco, annotations=[dict(a, category_id=10) for a in annotations])))
    detections = [{"image_id": a["image_id"], "category_id": 10, "bbox": a["bbox"], "score": 0.5}
                  for a in annotations]
    assert coco_evaluate(single, detections, max_detections=max(counts))["AP50"] == pytest.approx(1.0)
    assert coco_evaluate(single, detections, max_detections=100)["AP50"] < 0.99  # the training cap cuts it


class _FakeSceneClient:
    """Stands in for sdconet.runtime.triton_client.TritonSceneClient, answering as the served sdconet_scene model does:
    the model's class list in the options, one class name per detection, the request's score threshold applied."""

    sent: list = []
    parameters: list = []
    masks: list = []
    options = {"imgsz": 64, "overlap": 16, "score_threshold": 0.1, "max_scene_pixels": 100 * 100, "max_tiles": 40,
               "class_names": NAMES, "detector_sha256": "a" * 64}

    def __init__(self, url, protocol="http", timeout_s=600.0, retries=0):
        self.url = url

    def server_options(self):
        return dict(self.options)

    def detect_scene(self, scene, valid=None, **parameters):
        self.sent.append(scene)
        self.masks.append(valid)
        self.parameters.append(parameters)
        threshold = parameters.get("score_threshold")
        threshold = self.options["score_threshold"] if threshold is None else threshold
        boxes = np.array([[1, 2, 30, 40], [5, 5, 9, 9], [40, 2, 50, 9]], np.float32)
        scores, labels = np.array([0.9, 0.2, 0.05], np.float32), np.array([3, 0, 1])
        keep = scores >= threshold
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                "class_names": [NAMES[v] for v in labels[keep]], "tiles": 4, "tiles_skipped": 0}

    def close(self):
        pass


@pytest.fixture
def fake_triton(monkeypatch):
    import sdconet.runtime.triton_client as scene_client

    monkeypatch.setattr(scene_client, "TritonSceneClient", _FakeSceneClient)
    for name in ("sent", "parameters", "masks"):
        monkeypatch.setattr(_FakeSceneClient, name, [])
    monkeypatch.setattr(_FakeSceneClient, "options", dict(_FakeSceneClient.options))
    return _FakeSceneClient


def test_triton_backend_sends_scene_pixels_and_checks_the_served_options(scenes, tmp_path, fake_triton, capsys):
    base = [str(scenes / "a.png"), str(scenes / "c.png"), "--backend", "triton", "--url", "h:1", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "x"), "--tile", "128"]) == 2
    assert "--tile 128: the served detector takes 64 px tiles" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x"), "--input", "hr"]) == 2
    assert main([*base, "--out", str(tmp_path / "out"), "--score-threshold", "0.5"]) == 1  # c.png: too many px
    sent = fake_triton.sent
    assert len(sent) == 1 and sent[0].shape == (100, 90, 3) and sent[0].dtype == np.uint8
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert "max_scene_pixels" in summary["errors"][0]["error"] and summary["scenes"][0]["tiles"] == 4
    record = json.loads((tmp_path / "out" / "a.json").read_text())
    assert [(d["bbox_xyxy"], d["class_name"]) for d in record["detections"]] == [([1, 2, 30, 40], NAMES[3])]


def test_triton_backend_names_detections_by_label_and_passes_its_options(scenes, tmp_path, fake_triton, capsys):
    """Fails before issue 22: the per-detection names were taken for the model's class list (label 0 came back as
    the first detection's class), and neither the score threshold nor --overlap reached the server."""
    out = tmp_path / "out"
    assert main([str(scenes / "a.png"), "--backend", "triton", "--url", "h:1", "--no-progress", "--out", str(out),
                 "--score-threshold", "0.15", "--overlap", "8", "--merge", "nms", "--merge-threshold", "0.6"]) == 0
    record = json.loads((out / "a.json").read_text())
    assert [(d["label"], d["class_name"]) for d in record["detections"]] == [(3, NAMES[3]), (0, NAMES[0])]
    (sent,) = fake_triton.parameters
    assert sent["score_threshold"] == 0.15 and sent["overlap"] == 8
    assert sent["merge_rule"] == "nms" and sent["merge_threshold"] == 0.6


def test_triton_backend_checks_the_tile_limit_before_uploading(scenes, tmp_path, fake_triton):
    """Fails before issue 22: only the pixel limit was checked, the scene was sent and refused by the server."""
    fake_triton.options["max_tiles"] = 3  # a.png (100 x 90) needs 2 x 2 tiles of 64 px at overlap 16
    out = tmp_path / "out"
    assert main([str(scenes / "a.png"), "--backend", "triton", "--url", "h:1", "--no-progress",
                 "--out", str(out)]) == 1
    assert fake_triton.sent == []
    error = json.loads((out / SUMMARY_NAME).read_text())["errors"][0]["error"]
    assert "needs 4 tiles of 64 px (overlap 16); the server's max_tiles is 3" in error


def test_triton_resume_marker_carries_the_served_detector_digest(scenes, tmp_path, fake_triton, capsys):
    base = [str(scenes / "a.png"), "--backend", "triton", "--url", "h:1", "--no-progress", "--out",
            str(tmp_path / "out")]
    assert main(base) == 0 and main(base) == 0
    assert len(fake_triton.sent) == 1  # the rerun skipped the scene done with the same served detector
    fake_triton.options["detector_sha256"] = "b" * 64  # the repository was rebuilt from other weights
    assert main(base) == 0
    assert len(fake_triton.sent) == 2


def test_triton_backend_sends_nodata_as_zeros_with_its_mask(tmp_path, fake_triton):
    """Fails before issue 22: nodata pixels went to the server as if they were image, with no mask."""
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import Affine

    data = np.full((3, 60, 70), 120, np.uint8)
    data[:, :, 40:] = 7  # the nodata value on the right part
    path = tmp_path / "nodata.tif"
    with rasterio.open(path, "w", driver="GTiff", width=70, height=60, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(0.5, 0, 500000, 0, -0.5, 5000000), nodata=7) as dst:
        dst.write(data)
    assert main([str(path), "--backend", "triton", "--url", "h:1", "--no-progress", "--out",
                 str(tmp_path / "out")]) == 0
    (sent,), (mask,) = fake_triton.sent, fake_triton.masks
    assert mask is not None and mask[:, :40].all() and not mask[:, 40:].any()
    assert (sent[:, 40:] == 0).all() and (sent[:, :40] == 120).all()


def test_an_out_folder_that_cannot_be_created_is_a_usage_error(scenes, tmp_path, fake_triton, capsys):
    """Fails before issue 22: a traceback (FileExistsError) instead of exit status 2."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([str(scenes / "a.png"), "--backend", "triton", "--url", "h:1", "--no-progress",
                 "--out", str(blocker / "out")]) == 2
    assert f"--out {blocker / 'out'}: cannot create the folder" in capsys.readouterr().err


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from sdconet.scene.cli import remove_stale_temporaries

    (tmp_path / "sub").mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = [tmp_path / f".summary.{pid}-00ed17cd.tmp.json", tmp_path / "sub" / f".b_preview.{pid}-0a0b0c0d.tmp.png"]
    live = tmp_path / f".a.{os.getpid()}-0a0b0c0d.tmp.json"
    other = tmp_path / ".notes.txt"
    for path in (*stale, live, other):
        path.write_text("x")
    assert remove_stale_temporaries(tmp_path) == 2
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()


def test_bands_flag_reads_the_rgb_bands_of_a_multiband_geotiff(tmp_path, fake_triton, capsys):
    """--bands 3 2 1 on a 4-band B, G, R, NIR GeoTIFF: the scene sent is R, G, B; a band number beyond the file's
    count fails that scene naming the file, the count and the value; --bands 0 ... is a usage error."""
    import rasterio
    from rasterio.transform import Affine
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (4, 60, 70), dtype=np.uint8)
    path = tmp_path / "bgrn.tif"
    with rasterio.open(path, "w", driver="GTiff", width=70, height=60, count=4, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(0.5, 0, 500000, 0, -0.5, 5000000), tiled=True, blockxsize=32,
                       blockysize=32) as dst:
        dst.write(data)
    base = [str(path), "--backend", "triton", "--url", "h:1", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "out"), "--bands", "3", "2", "1"]) == 0
    (sent,) = fake_triton.sent
    alpha = data[3] > 0  # GDAL's dataset mask reads band 4 as alpha: its 0 pixels go as nodata zeros
    np.testing.assert_array_equal(sent, data[[2, 1, 0]].transpose(1, 2, 0) * alpha[..., None])
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["settings"]["bands"] == [3, 2, 1] and summary["scenes"][0]["file"] == "bgrn.tif"
    # the default (no --bands) keeps today's reading: bands 1, 2, 3 as R, G, B, band 4 ignored; a new key, so redone
    assert main([*base, "--out", str(tmp_path / "out")]) == 0
    np.testing.assert_array_equal(fake_triton.sent[-1], data[:3].transpose(1, 2, 0) * alpha[..., None])
    np.testing.assert_array_equal(fake_triton.masks[-1], alpha)

    assert main([*base, "--out", str(tmp_path / "bad"), "--bands", "3", "2", "5"]) == 1
    error = json.loads((tmp_path / "bad" / SUMMARY_NAME).read_text())["errors"][0]["error"]
    assert str(path) in error and "band 5 of bands=[3, 2, 5] does not exist" in error
    assert "the file has 4 band(s), numbered 1..4" in error
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "bad"), "--bands", "0", "1", "2"]) == 2
    assert "band 0 does not exist; band numbers start at 1" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "bad"), "--bands", "3", "2"]) == 2
    assert "give 3 band numbers (R G B) or 1 (grey), got 2" in capsys.readouterr().err
