"""The served scene model ``sdconet_scene`` on the real bundled server (the shared one of ``serving_fixtures``).

A multi-tile scene sent to the server (as encoded bytes and as a raw array) must come back with the detections the
scene core computes with ONNX Runtime on the same ONNX and the same tiles; scenes over the pixel or tile limit get an
error response and the server goes on serving; tiles of one scene are batched by the detector's dynamic batcher.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

import onnxruntime  # noqa: E402,F401
import tritonclient.http  # noqa: E402,F401
from tritonclient.utils import InferenceServerException  # noqa: E402

from sdconet.serve.client import SDCoNetClient, is_retryable  # noqa: E402
from sdconet.runtime.triton_client import SCENE_MODEL, TritonSceneClient  # noqa: E402
from serving_fixtures import (  # noqa: E402
    CLASS_NAMES, IMGSZ, MAX_BATCH, MAX_SCENE_PIXELS, SCENE_MAX_TILES, SCORE_THRESHOLD, png_bytes, scene)


def test_builder_writes_the_scene_model_with_the_project_defaults(tmp_path, detector_onnx):
    from sdconet.serve.triton_repo import RepositoryError, RepositoryOptions, build_repository, parse_model_config
    from sdconet.runtime import DEFAULT_SCORE_THRESHOLD
    from sdconet.scene import merge, tiling
    from sdconet.scene.core import DEFAULT_OVERLAP
    from sdconet.serve import processing

    repo = build_repository(tmp_path / "repo", onnx_path=detector_onnx, backend="cpu", imgsz=IMGSZ,
                            max_batch=MAX_BATCH, class_names=CLASS_NAMES)
    version = repo / SCENE_MODEL / "1"
    for name, source in (("sdconet_tiling.py", tiling), ("sdconet_merge.py", merge),
                         ("sdconet_processing.py", processing)):
        assert (version / name).read_text() == Path(source.__file__).read_text(), name
    config = parse_model_config(repo / SCENE_MODEL / "config.pbtxt")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert config.backend == "python" and config.max_batch_size == 1 and config.instance_group[0].count == 2
    assert parameters["detector"] == "detector_cpu" and int(parameters["imgsz"]) == IMGSZ
    assert int(parameters["overlap"]) == min(DEFAULT_OVERLAP, IMGSZ // 2)
    assert int(parameters["tiles_per_request"]) == MAX_BATCH // 2 and parameters["merge_rule"] == merge.DEFAULT_MERGE_RULE
    assert int(parameters["max_detections"]) == 0  # no cap per scene
    # one default score threshold, in the scene model and in the ensemble's postprocess
    post = parse_model_config(repo / "postprocess" / "config.pbtxt").parameters["score_threshold"].string_value
    assert float(parameters["score_threshold"]) == float(post) == DEFAULT_SCORE_THRESHOLD
    assert json.loads(parameters["class_names"]) == CLASS_NAMES
    for options, message in ((RepositoryOptions(scene_overlap=IMGSZ), "scene_overlap must be in"),
                             (RepositoryOptions(scene_tiles_per_request=MAX_BATCH + 1), "scene_tiles_per_request"),
                             (RepositoryOptions(scene_merge_rule="vote"), "scene_merge_rule must be one of"),
                             (RepositoryOptions(scene_max_tiles=0), "scene_max_tiles must be positive")):
        with pytest.raises(RepositoryError, match=message):
            build_repository(tmp_path / "bad", onnx_path=detector_onnx, backend="cpu", imgsz=IMGSZ,
                             max_batch=MAX_BATCH, class_names=CLASS_NAMES, options=options)


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    """A 300x420 scene: 4 x 6 = 24 tiles of 128 px at the default overlap of 64."""
    path = tmp_path_factory.mktemp("scenes") / "scene.png"
    path.write_bytes(png_bytes(scene(300, 420, seed=5)))
    return path


@pytest.fixture(scope="module")
def reference(detector_onnx, scene_file, server):
    """The scene core with ONNX Runtime on the same ONNX, with the tiling options the server reports."""
    from sdconet.runtime.onnxruntime_runner import OnnxRuntimeRunner
    from sdconet.scene.core import SceneInferencer, SceneOptions
    from sdconet.data.raster import open_scene

    with TritonSceneClient(server.endpoints.http) as client:
        served = client.server_options()
    assert served["imgsz"] == IMGSZ and served["score_threshold"] == SCORE_THRESHOLD
    options = SceneOptions(overlap=served["overlap"], merge=served["merge_rule"], score_threshold=SCORE_THRESHOLD,
                           progress=False)
    with OnnxRuntimeRunner(detector_onnx, threads=1, class_names=CLASS_NAMES) as runner, \
            open_scene(scene_file) as reader:
        return SceneInferencer(runner, options).run(reader)


def assert_same_scene_detections(served: dict, reference) -> None:
    """Same detections in the same (score) order: labels equal, boxes <= 1e-3 px, scores <= 1e-5."""
    assert len(reference.scores) > 10, "the test scene should produce detections in several tiles"
    assert len(served["scores"]) == len(reference.scores)
    np.testing.assert_array_equal(served["labels"], reference.labels)
    np.testing.assert_allclose(served["boxes"], reference.boxes, atol=1e-3, rtol=0)
    np.testing.assert_allclose(served["scores"], reference.scores, atol=1e-5, rtol=0)
    assert served["class_names"] == [CLASS_NAMES[int(label)] for label in served["labels"]]


def test_multi_tile_scene_matches_the_scene_core_on_onnxruntime(server, scene_file, reference):
    pixels = scene(300, 420, seed=5)
    for protocol, url in (("http", server.endpoints.http), ("grpc", server.endpoints.grpc)):
        with TritonSceneClient(url, protocol=protocol) as client:
            from_file = client.detect_scene(scene_file)  # the encoded bytes, decoded on the server
            assert from_file["tiles"] == reference.tiles == 12  # 3 x 4 tiles of 128 px at the default overlap
            assert_same_scene_detections(from_file, reference)
            assert_same_scene_detections(client.detect_scene(pixels), reference)  # a raw [H, W, 3] array
    # boxes are in scene pixels: some lie beyond the first tile, none outside the scene
    assert from_file["boxes"][:, 2].max() > IMGSZ and from_file["boxes"][:, 3].max() > IMGSZ
    assert from_file["boxes"][:, 2].max() <= 420 and from_file["boxes"][:, 3].max() <= 300


def test_scenes_over_the_limits_get_errors_and_the_server_keeps_serving(server, scene_file, reference):
    side = int(MAX_SCENE_PIXELS ** 0.5) + 10
    with TritonSceneClient(server.endpoints.http, retries=3, backoff_s=0.01) as client:
        cases = {
            "pixel limit, encoded": (png_bytes(np.zeros((side, side, 3), np.uint8)), "exceeds the server limit"),
            "pixel limit, raw array": (np.zeros((side, side, 3), np.uint8), "exceeds the server limit"),
            "tile limit": (png_bytes(scene(600, 600, seed=6)), f"needs 36 tiles .* limit is {SCENE_MAX_TILES} tiles"),
            "garbage bytes": (b"\x89PNG not really", "not a decodable image"),
        }
        for what, (payload, message) in cases.items():
            with pytest.raises(InferenceServerException, match=message) as error:
                client.detect_scene(payload)
            assert error.value.status() == "400", what
            assert not is_retryable(error.value) and error.value.attempts == 1, f"{what} must not be retried"
            assert_same_scene_detections(client.detect_scene(scene_file), reference)  # still serving
    import tritonclient.http as httpclient

    raw = httpclient.InferenceServerClient(server.endpoints.http)
    try:
        both = [httpclient.InferInput("IMAGE_BYTES", [1, 1], "BYTES"), httpclient.InferInput("IMAGE", [1, 8, 8, 3],
                                                                                             "UINT8")]
        both[0].set_data_from_numpy(np.array([[scene_file.read_bytes()]], dtype=object))
        both[1].set_data_from_numpy(np.zeros((1, 8, 8, 3), np.uint8))
        with pytest.raises(InferenceServerException, match="exactly one of"):
            raw.infer(SCENE_MODEL, both)
    finally:
        raw.close()


def test_concurrent_scenes_have_their_tiles_batched(server, scene_file, reference):
    with SDCoNetClient(server.endpoints.http) as client:
        before = client.statistics("detector_cpu")["detector_cpu"]
        tiles_per_request = int(client.model_config(SCENE_MODEL)["parameters"]["tiles_per_request"]["string_value"])
    results, failures = [], []

    def one_scene() -> None:
        try:
            with TritonSceneClient(server.endpoints.grpc, protocol="grpc") as client:
                results.append(client.detect_scene(scene_file))
        except Exception as err:  # collected and asserted below
            failures.append(err)

    threads = [threading.Thread(target=one_scene) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert failures == [] and len(results) == 3
    for result in results:
        assert_same_scene_detections(result, reference)
    with SDCoNetClient(server.endpoints.http) as client:
        after = client.statistics("detector_cpu")["detector_cpu"]
    assert after["inference_count"] - before["inference_count"] == 3 * reference.tiles
    # an execution larger than one BLS request's tiles means the batcher merged requests
    new_batches = {entry["batch_size"]: entry["compute_infer"]["count"] for entry in after["batch_stats"]}
    old_batches = {entry["batch_size"]: entry["compute_infer"]["count"] for entry in before["batch_stats"]}
    grown = [size for size, count in new_batches.items() if count > old_batches.get(size, 0)]
    assert max(grown) > tiles_per_request and max(grown) <= MAX_BATCH, new_batches


def test_client_cli_scene_mode_writes_scene_detections(server, scene_file, reference, tmp_path):
    from sdconet.serve.client import main

    out = tmp_path / "out"
    assert main([str(scene_file), "--scene", "--url", server.endpoints.http, "--out", str(out)]) == 0
    record = json.loads((out / "scene.json").read_text())
    assert record["num_detections"] == len(reference.scores)
    np.testing.assert_allclose([d["box_xyxy"] for d in record["detections"]], reference.boxes, atol=2e-3)
    assert json.loads((out / "failures.json").read_text()) == []
    # the client-side threshold keeps only what is above it
    cut = float(np.median(reference.scores))
    assert main([str(scene_file), "--scene", "--url", server.endpoints.http, "--out", str(out),
                 "--score-threshold", str(cut)]) == 0
    record = json.loads((out / "scene.json").read_text())
    assert record["num_detections"] == int((reference.scores >= cut).sum())


# -- issue 22: the scene CLI's --backend triton against the real server ----------------------------------------------
@pytest.fixture(scope="module")
def named_onnx(detector_onnx, tmp_path_factory):
    """The served ONNX with the served class names in its metadata, for the CLI's onnxruntime backend."""
    import onnx

    from sdconet.runtime.metadata import write_onnx_metadata

    model = onnx.load(str(detector_onnx))
    write_onnx_metadata(model, class_names=CLASS_NAMES, imgsz=IMGSZ, msda="onnx",
                        outputs=[o.name for o in model.graph.output], precision="fp32")
    path = tmp_path_factory.mktemp("named") / "named.onnx"
    onnx.save(model, str(path))
    return path


def test_scene_cli_on_triton_names_and_scores_detections_like_onnxruntime(server, named_onnx, scene_file, reference,
                                                                           tmp_path):
    """Fails before issue 22: the served per-detection names were taken for the class list (wrong class names,
    so --ann scored the Triton path wrongly) and the request carried no score threshold (the server's applied)."""
    from sdconet.scene.cli import main

    # ground truth: what the scene core sees at the served threshold, categories named, ids unlike the labels
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": scene_file.name, "width": 420, "height": 300}],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": int(label) + 100, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
                        for i, ((x1, y1, x2, y2), label) in enumerate(zip(reference.boxes.tolist(),
                                                                           reference.labels.tolist()))],
        "categories": [{"id": i + 100, "name": name} for i, name in enumerate(CLASS_NAMES)]}))
    common = [str(scene_file), "--ann", str(ann), "--score-threshold", str(SCORE_THRESHOLD), "--no-progress"]
    outputs = {}
    for backend, source in (("onnxruntime", ["--model", str(named_onnx), "--threads", "1"]),
                            ("triton", ["--url", server.endpoints.http])):
        out = tmp_path / backend
        assert main([*common, "--backend", backend, *source, "--out", str(out)]) == 0, backend
        summary = json.loads((out / "summary.json").read_text())
        record = json.loads((out / "scene.json").read_text())
        outputs[backend] = (summary["metrics"], [(d["label"], d["class_name"]) for d in record["detections"]], out)
    (ort_metrics, ort_names, ort_out), (tri_metrics, tri_names, tri_out) = outputs["onnxruntime"], outputs["triton"]
    assert tri_names == ort_names and len(ort_names) == len(reference.scores)
    assert all(name == CLASS_NAMES[label] for label, name in tri_names)
    ort_eval, tri_eval = (json.loads((out / "scene.eval.json").read_text())["detections"] for out in (ort_out, tri_out))
    # the evaluation set reaches below the server's built threshold: the request carried 0.001
    assert tri_metrics["score_threshold"] == ort_metrics["score_threshold"] == 0.001
    assert min(d["score"] for d in tri_eval) < SCORE_THRESHOLD and len(tri_eval) == len(ort_eval)
    assert ort_metrics["AP"] > 0.5, "the ground truth is the scene's own detections: AP must be high"
    for key in ("AP", "AP50", "AP75", "APs"):
        assert abs(tri_metrics[key] - ort_metrics[key]) <= 0.005, key


def test_nodata_goes_to_the_server_as_a_mask_and_empty_tiles_are_skipped(server, detector_onnx):
    from sdconet.runtime.onnxruntime_runner import OnnxRuntimeRunner
    from sdconet.scene.core import ArrayScene, SceneInferencer, SceneOptions

    pixels = scene(300, 420, seed=5)
    valid = np.ones(pixels.shape[:2], bool)
    valid[:, 250:] = False  # the right part is nodata: whole tiles there are not run
    with TritonSceneClient(server.endpoints.http) as client:
        served = client.detect_scene(np.where(valid[..., None], pixels, 0).astype(np.uint8), valid=valid,
                                     overlap=32)
        options = client.server_options()
    with OnnxRuntimeRunner(detector_onnx, threads=1, class_names=CLASS_NAMES) as runner:
        local = SceneInferencer(runner, SceneOptions(overlap=32, merge=options["merge_rule"],
                                                     score_threshold=SCORE_THRESHOLD, progress=False)
                                ).run(ArrayScene(pixels, valid))
    assert local.tiles_skipped > 0 and served["tiles_skipped"] == local.tiles_skipped
    assert served["tiles"] == local.tiles
    assert_same_scene_detections(served, local)
    assert options["class_names"] == CLASS_NAMES and len(options["detector_sha256"]) == 64
