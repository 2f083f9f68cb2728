"""Serving: Triton repository builder, the bundled tritonserver on CPU, HTTP/gRPC clients, load generator.

The server tests use the one python-only ``tritonserver`` (bundled in nvidia-pytriton) of the test run, on free
loopback ports with the ``cpu`` deployment, always stopped at the end; it and the served ONNX (``detector_onnx``, the
single place to swap the model) are the session fixtures of ``serving_fixtures.py``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402,F401
import tritonclient.grpc  # noqa: E402,F401
import tritonclient.http  # noqa: E402,F401
from PIL import Image  # noqa: E402

from sdconet.serve.triton_repo import (  # noqa: E402
    DETECTOR_MODELS, MANIFEST_NAME, RepositoryError, RepositoryOptions, TEMPLATE_DIR, build_repository,
    check_config_against_onnx, parse_model_config)
from sdconet.serve import processing  # noqa: E402
from sdconet.serve.client import SDCoNetClient, detect_many  # noqa: E402
from sdconet.serve.python_env import PythonEnvError, inspect_python_env  # noqa: E402
from sdconet.serve.server import (  # noqa: E402
    PortInUseError, ServerError, ServerUnavailable, TritonServer, find_tritonserver, free_ports, port_holders,
    port_is_free, process_group_members)

from needs import unavailable  # noqa: E402
from serving_fixtures import (  # noqa: E402  (shared with the other serving tests through conftest.py)
    CLASS_NAMES, IMGSZ, MAX_BATCH, MAX_IMAGE_PIXELS, SCORE_THRESHOLD, png_bytes, require_server as _require_server,
    scene)


def reference_detections(session, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Direct ONNX Runtime on one image (batch 1) + the same pre/post-processing functions."""
    network_input, info = processing.letterbox(image, IMGSZ)
    boxes, scores, labels = session.run(["boxes", "scores", "labels"], {"images": network_input[None]})
    return processing.select_detections(boxes[0], scores[0], labels[0], info, SCORE_THRESHOLD)


def assert_same_detections(served, reference) -> None:
    """Same detections (order-free for equal scores): labels equal, boxes <= 1e-3 px, scores <= 1e-5."""
    boxes, scores, labels = reference
    assert len(served) == len(scores), (len(served), len(scores))
    assert len(scores) > 0, "the test image should produce detections"
    unmatched = list(range(len(scores)))
    for box, score, label in zip(served.boxes, served.scores, served.labels):
        hits = [j for j in unmatched if labels[j] == label and np.abs(boxes[j] - box).max() <= 1e-3
                and abs(scores[j] - score) <= 1e-5]
        assert hits, f"served detection {label} {score} {box} has no reference counterpart"
        unmatched.remove(hits[0])
    assert served.class_names == [CLASS_NAMES[int(label)] for label in served.labels]


# ---------------------------------------------------------------------------------------------------------------------
# Pre/post-processing (no server)
# ---------------------------------------------------------------------------------------------------------------------
def test_letterbox_geometry_round_trips_boxes():
    image = scene(90, 150, seed=1)
    network_input, info = processing.letterbox(image, IMGSZ)
    assert network_input.shape == (3, IMGSZ, IMGSZ) and network_input.dtype == np.float32
    new_h, new_w = round(90 * IMGSZ / 150), IMGSZ
    np.testing.assert_allclose(info, [90, 150, new_h / 90, new_w / 150], rtol=1e-6)
    assert network_input[:, new_h:].max() == 0.0  # bottom padding
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    np.testing.assert_allclose(network_input[:, :new_h, :new_w], resized.transpose(2, 0, 1) / 255.0, atol=1e-7)
    original = np.array([[10.0, 20.0, 140.0, 80.0], [0.0, 0.0, 150.0, 90.0]], np.float32)
    in_network = original * np.array([info[3], info[2], info[3], info[2]], np.float32)
    np.testing.assert_allclose(processing.boxes_to_original(in_network, info), original, atol=1e-4)
    # boxes reaching into the padding are clipped to the image
    clipped = processing.boxes_to_original(np.array([[-5.0, 30.0, IMGSZ + 6.0, IMGSZ - 1.0]], np.float32), info)
    np.testing.assert_allclose(clipped, [[0.0, 30.0 / info[2], 150.0, 90.0]], rtol=1e-5)


def test_small_image_is_upscaled_to_the_engine_size():
    network_input, info = processing.letterbox(scene(32, 20, seed=2), IMGSZ)
    new_w = round(20 * IMGSZ / 32)
    assert info[2] == IMGSZ / 32 and info[3] == pytest.approx(new_w / 20)
    assert network_input[:, :, new_w:].max() == 0.0 and network_input[:, :, :new_w].max() > 0.0


def test_select_detections_thresholds_sorts_and_maps():
    info = np.array([128, 128, 0.5, 0.5], np.float32)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]], np.float32)
    out_boxes, out_scores, out_labels = processing.select_detections(
        boxes, np.array([0.4, 0.9, 0.1], np.float32), np.array([2, 0, 1], np.int32), info, 0.3)
    np.testing.assert_allclose(out_scores, [0.9, 0.4])
    np.testing.assert_array_equal(out_labels, [0, 2])
    np.testing.assert_allclose(out_boxes, [[10, 10, 40, 40], [0, 0, 20, 20]])


def test_decode_image_refuses_bad_input():
    with pytest.raises(processing.InvalidImageError, match="not a decodable image"):
        processing.decode_image(b"definitely not an image")
    with pytest.raises(processing.InvalidImageError, match="empty"):
        processing.decode_image(b"")
    big = png_bytes(np.zeros((600, 600, 3), np.uint8))
    with pytest.raises(processing.InvalidImageError, match="exceeds the server limit"):
        processing.decode_image(big, max_pixels=MAX_IMAGE_PIXELS)
    good = png_bytes(scene(40, 30, seed=3))
    with pytest.raises(processing.InvalidImageError, match="corrupt or truncated"):
        processing.decode_image(good[: len(good) // 2])
    np.testing.assert_array_equal(processing.decode_image(good), scene(40, 30, seed=3))


# ---------------------------------------------------------------------------------------------------------------------
# Repository builder (no server)
# ---------------------------------------------------------------------------------------------------------------------
def _build(tmp_path: Path, detector_onnx: Path, backend: str, **kwargs) -> Path:
    extra = {"engine_path": kwargs.pop("engine_path")} if "engine_path" in kwargs else {}
    return build_repository(tmp_path / f"repo_{backend}", onnx_path=detector_onnx, backend=backend, imgsz=IMGSZ,
                            max_batch=MAX_BATCH, class_names=CLASS_NAMES, score_threshold=SCORE_THRESHOLD,
                            options=RepositoryOptions(**kwargs), **extra)


def test_cpu_repository_holds_exactly_the_cpu_deployment(tmp_path, detector_onnx):
    repo = _build(tmp_path, detector_onnx, "cpu", max_image_pixels=MAX_IMAGE_PIXELS)
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["detector_cpu", "postprocess", "preprocess",
                                                                    "sdconet", "sdconet_scene"]
    manifest = json.loads((repo / MANIFEST_NAME).read_text())
    assert manifest["backend"] == "cpu" and manifest["class_names"] == CLASS_NAMES
    assert (repo / "detector_cpu/1/model.onnx").read_bytes() == detector_onnx.read_bytes()
    for model in ("preprocess", "postprocess"):
        assert (repo / model / "1" / "sdconet_processing.py").read_text() == Path(processing.__file__).read_text()
    ensemble = parse_model_config(repo / "sdconet/config.pbtxt")
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == MAX_BATCH
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == ["preprocess", "detector_cpu",
                                                                               "postprocess"]
    for model in ("preprocess", "detector_cpu", "postprocess"):
        config = parse_model_config(repo / model / "config.pbtxt")
        assert config.backend == "python" and config.max_batch_size == MAX_BATCH
        assert config.HasField("dynamic_batching") and config.instance_group[0].count == 1
        assert config.parameters["EXECUTION_ENV_PATH"].string_value == sys.prefix
    post = parse_model_config(repo / "postprocess/config.pbtxt")
    assert json.loads(post.parameters["class_names"].string_value) == CLASS_NAMES
    assert float(post.parameters["score_threshold"].string_value) == SCORE_THRESHOLD
    # rebuilding for another backend replaces the repository as a whole
    other = build_repository(repo, onnx_path=detector_onnx, backend="onnx", imgsz=IMGSZ, max_batch=MAX_BATCH,
                             class_names=CLASS_NAMES)
    assert not (other / "detector_cpu").exists() and (other / "detector_onnx/1/model.onnx").is_file()


def _onnx_io(path: Path) -> dict[str, tuple[int, list]]:
    """name -> (ONNX elem type, dims with the batch axis as a symbol string)."""
    graph = onnx.load(str(path)).graph
    return {v.name: (v.type.tensor_type.elem_type,
                     [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in list(graph.input) + list(graph.output)}


@pytest.mark.parametrize("backend", ["trt", "onnx"])
def test_gpu_detector_configs_match_the_exported_model(tmp_path, detector_onnx, backend):
    """The bundled server has no tensorrt/onnxruntime backend, so these configs are checked structurally."""
    kwargs = {"onnx_tensorrt": True} if backend == "onnx" else {}
    if backend == "trt":
        # stands in for a TensorRT engine file; only the config is checked here (TensorRT is not installed)
        kwargs["engine_path"] = tmp_path / "engine_placeholder.plan"
        kwargs["engine_path"].write_bytes(b"placeholder")
    repo = _build(tmp_path, detector_onnx, backend, **kwargs)
    model = DETECTOR_MODELS[backend]
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted([model, "postprocess", "preprocess",
                                                                           "sdconet", "sdconet_scene"])
    config = parse_model_config(repo / model / "config.pbtxt")
    assert config.platform == {"trt": "tensorrt_plan", "onnx": "onnxruntime_onnx"}[backend]
    assert (repo / model / "1" / ("model.plan" if backend == "trt" else "model.onnx")).is_file()
    assert config.max_batch_size == MAX_BATCH and config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    onnx_io = _onnx_io(detector_onnx)
    elem_to_triton = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT32: "TYPE_INT32"}
    from tritonclient.grpc import model_config_pb2

    declared = list(config.input) + list(config.output)
    assert sorted(t.name for t in declared) == sorted(onnx_io)
    for tensor in declared:
        elem_type, dims = onnx_io[tensor.name]
        assert isinstance(dims[0], str), f"{tensor.name}: ONNX batch axis must be dynamic"
        assert model_config_pb2.DataType.Name(tensor.data_type) == elem_to_triton[elem_type]
        assert list(tensor.dims) == dims[1:], tensor.name
    ensemble = parse_model_config(repo / "sdconet/config.pbtxt")
    assert ensemble.ensemble_scheduling.step[1].model_name == model
    if backend == "onnx":
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    check_config_against_onnx(repo / model / "config.pbtxt", detector_onnx)
    # the checker catches a config that disagrees with the model
    text = (repo / model / "config.pbtxt").read_text()
    (repo / model / "config.pbtxt").write_text(text.replace("TYPE_INT32", "TYPE_INT64"))
    with pytest.raises(RepositoryError, match="'labels': config TYPE_INT64, ONNX TYPE_INT32"):
        check_config_against_onnx(repo / model / "config.pbtxt", detector_onnx)


def test_builder_refuses_what_would_not_serve(tmp_path, detector_onnx):
    with pytest.raises(RepositoryError, match=f"is {IMGSZ}x{IMGSZ} but imgsz is {2 * IMGSZ}"):
        build_repository(tmp_path / "a", onnx_path=detector_onnx, backend="cpu", imgsz=2 * IMGSZ, max_batch=4,
                         class_names=CLASS_NAMES)
    with pytest.raises(RepositoryError, match="backend 'trt' needs engine_path"):
        build_repository(tmp_path / "b", onnx_path=detector_onnx, backend="trt", imgsz=IMGSZ, max_batch=4,
                         class_names=CLASS_NAMES)
    with pytest.raises(RepositoryError, match="template directory"):
        build_repository(TEMPLATE_DIR, onnx_path=detector_onnx, backend="cpu", imgsz=IMGSZ, max_batch=4,
                         class_names=CLASS_NAMES)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RepositoryError, match="not written by this builder"):
        build_repository(foreign, onnx_path=detector_onnx, backend="cpu", imgsz=IMGSZ, max_batch=4,
                         class_names=CLASS_NAMES)
    # a plugin-mode graph cannot run on ONNX Runtime
    graph = onnx.load(str(detector_onnx))
    graph.graph.node.append(onnx.helper.make_node("MultiscaleDeformableAttnPlugin_TRT", ["images"], ["unused"],
                                                  domain="trt.plugins"))
    plugin_path = tmp_path / "plugin.onnx"
    onnx.save(graph, str(plugin_path))
    with pytest.raises(RepositoryError, match="custom operator"):
        build_repository(tmp_path / "c", onnx_path=plugin_path, backend="cpu", imgsz=IMGSZ, max_batch=4,
                         class_names=CLASS_NAMES)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_python_env_check(tmp_path):
    info = inspect_python_env(sys.prefix, ["numpy", "PIL", "onnxruntime"])
    assert info.version == f"{sys.version_info[0]}.{sys.version_info[1]}" and int(info.numpy_version[0]) < 2
    with pytest.raises(PythonEnvError, match="bin/activate"):
        inspect_python_env(tmp_path)
    with pytest.raises(PythonEnvError, match="lacks module"):
        inspect_python_env(sys.prefix, ["a_module_that_does_not_exist"])


def test_bundled_server_refuses_gpu_backends_before_starting(tmp_path, detector_onnx):
    try:
        binary, bundled = find_tritonserver()
    except ServerUnavailable as err:
        unavailable(str(err))
    if not bundled:
        pytest.skip(f"tritonserver on PATH ({binary}) has real backends; this checks the nvidia-pytriton one")
    repo = _build(tmp_path, detector_onnx, "onnx")
    server = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(ServerError, match="'onnxruntime_onnx' backend, which the tritonserver bundled"):
        server.start()
    assert server.process is None


def test_free_ports_are_distinct_and_free():
    """All probe sockets stay bound until every port is picked, so no port comes back twice."""
    for count in (3, 64):
        ports = free_ports(count)
        assert len(ports) == len(set(ports)) == count
        assert all(port_is_free("127.0.0.1", port) for port in ports)


def test_shared_memory_of_killed_servers_is_removed_and_live_regions_kept(tmp_path):
    from sdconet.serve.server import remove_stale_shm_regions

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    # a region a live process names on its command line (a stale server's stub) stays, even with its launcher gone
    in_use = f"sdconet{dead}_inuse123_"
    user = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{in_use}0d0e"])
    cmdline = Path(f"/proc/{user.pid}/cmdline")
    deadline = time.monotonic() + 30
    # the check reads the user's command line: wait until the child has exec'd python (a fork is still the test's)
    while in_use.encode() not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        regions = {"killed": f"sdconet{dead}_abcd1234_6f1c", "killed2": f"sdconet{dead}_abcd1234_77aa",
                   "live launcher": f"sdconet{os.getpid()}_efgh5678_0a0b", "in use": f"{in_use}0d0e",
                   "not ours": "psm_1234"}
        for name in regions.values():
            (tmp_path / name).write_bytes(b"\0" * 64)
        assert remove_stale_shm_regions(tmp_path) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            regions[k] for k in ("live launcher", "in use", "not ours"))
    finally:
        user.kill()
        user.wait()


def test_an_explicit_port_in_use_names_its_holder(cpu_repo):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert [h.pid for h in port_holders(port)] == [os.getpid()]
        server = TritonServer(cpu_repo, http_port=0, grpc_port=port, metrics_port=0)
        with pytest.raises(PortInUseError, match=rf"grpc port {port} on 127.0.0.1 is in use by .*\(pid {os.getpid()}\); "
                                                 r"pass another --grpc-port \(0 = a free one\)"):
            server.start()
        assert server.process is None


# ---------------------------------------------------------------------------------------------------------------------
# The real server (bundled tritonserver, cpu deployment)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def session(detector_onnx):
    return ort.InferenceSession(str(detector_onnx), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [scene(120, 160, seed=10), scene(200, 90, seed=11), scene(48, 40, seed=12)]


def test_http_and_grpc_match_direct_onnxruntime(server, session, images):
    for protocol, url in (("http", server.endpoints.http), ("grpc", server.endpoints.grpc)):
        with SDCoNetClient(url, protocol=protocol) as client:
            assert client.is_ready()
            for image in images:
                reference = reference_detections(session, image)
                assert_same_detections(client.detect(png_bytes(image)), reference)
                assert_same_detections(client.detect(image), reference)  # raw uint8 array input


def test_one_request_may_carry_several_images(server, session, images):
    import tritonclient.http as httpclient

    from sdconet.serve.client import parse_result

    batch = np.array([[png_bytes(images[0])], [png_bytes(images[1])]], dtype=object)
    tensor = httpclient.InferInput("IMAGE_BYTES", list(batch.shape), "BYTES")
    tensor.set_data_from_numpy(batch)
    client = httpclient.InferenceServerClient(server.endpoints.http)
    try:
        per_image = parse_result(client.infer("sdconet", [tensor]))
    finally:
        client.close()
    assert len(per_image) == 2  # rows past each image's num_detections are padding
    for detections, image in zip(per_image, images[:2]):
        assert_same_detections(detections, reference_detections(session, image))


def test_concurrent_clients_get_batched_and_correct_answers(server, session, images):
    references = [reference_detections(session, image) for image in images]
    encoded = [png_bytes(image) for image in images]
    with SDCoNetClient(server.endpoints.http) as client:
        before = client.statistics("detector_cpu")["detector_cpu"]
    failures, results = [], []

    def client_thread(index: int) -> None:
        protocol = "http" if index % 2 == 0 else "grpc"
        url = server.endpoints.http if protocol == "http" else server.endpoints.grpc
        with SDCoNetClient(url, protocol=protocol) as client:
            for request in range(25):
                which = (index + request) % len(images)
                try:
                    results.append((which, client.detect(encoded[which])))
                except Exception as err:  # collected and asserted below
                    failures.append(err)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == [] and len(results) == 200
    for which, detections in results:
        assert_same_detections(detections, references[which])
    with SDCoNetClient(server.endpoints.grpc, protocol="grpc") as client:
        after = client.statistics("detector_cpu")["detector_cpu"]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 200
    assert executions < inferences, "dynamic batching never grouped requests"
    assert max(entry["batch_size"] for entry in after["batch_stats"]) > 1


def test_bad_requests_get_errors_and_the_server_carries_on(server, session, images):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    good, reference = png_bytes(images[0]), reference_detections(session, images[0])
    for module, url in ((httpclient, server.endpoints.http), (grpcclient, server.endpoints.grpc)):
        raw_client = module.InferenceServerClient(url)

        def tensor(name, array, datatype):
            item = module.InferInput(name, list(array.shape), datatype)
            item.set_data_from_numpy(array)
            return item

        bad_requests = {
            "wrong dtype": ([tensor("IMAGE", np.zeros((1, 8, 8, 3), np.float32), "FP32")], "data-type"),
            "wrong shape": ([tensor("IMAGE", np.zeros((1, 8, 8, 4), np.uint8), "UINT8")], "shape"),
            "garbage bytes": ([tensor("IMAGE_BYTES", np.array([[b"\x89PNG garbage"]], dtype=object), "BYTES")],
                              "not a decodable image"),
            "over the size limit": ([tensor("IMAGE_BYTES", np.array([[png_bytes(np.zeros((600, 600, 3), np.uint8))]],
                                                                    dtype=object), "BYTES")],
                                    "exceeds the server limit"),
            "both inputs": ([tensor("IMAGE_BYTES", np.array([[good]], dtype=object), "BYTES"),
                             tensor("IMAGE", images[0][None], "UINT8")], "exactly one of"),
        }
        with SDCoNetClient(url, protocol="grpc" if module is grpcclient else "http") as client:
            for what, (inputs, message) in bad_requests.items():
                with pytest.raises(InferenceServerException, match=message):
                    raw_client.infer("sdconet", inputs)
                assert_same_detections(client.detect(good), reference)  # the next good request is served
        raw_client.close()


def test_client_cli_writes_json_and_annotated_png(server, session, images, tmp_path):
    from sdconet.serve.client import main

    paths = []
    for i, image in enumerate(images[:2]):
        paths.append(tmp_path / f"scene{i}.png")
        paths[-1].write_bytes(png_bytes(image))
    out = tmp_path / "out"
    assert main([str(p) for p in paths] + ["--url", server.endpoints.grpc, "--protocol", "grpc", "--out", str(out),
                                           "--annotate"]) == 0
    for path, image in zip(paths, images):
        record = json.loads((out / f"{path.stem}.json").read_text())
        boxes, scores, labels = reference_detections(session, image)
        assert record["image"] == str(path) and record["num_detections"] == len(scores)
        assert sorted(d["label"] for d in record["detections"]) == sorted(labels.tolist())
        assert all(d["class_name"] == CLASS_NAMES[d["label"]] for d in record["detections"])
        with Image.open(out / f"{path.stem}.png") as annotated:
            assert annotated.size == (image.shape[1], image.shape[0])
    # the library's concurrent mode answers in input order
    results = detect_many([paths[1], paths[0]], url=server.endpoints.http, concurrency=2)
    assert_same_detections(results[0], reference_detections(session, images[1]))
    assert_same_detections(results[1], reference_detections(session, images[0]))


def test_loadgen_sweep_reports_latency_and_queue_compute_split(server, images, tmp_path, capsys):
    from sdconet.serve.loadgen import main

    out, image_path = tmp_path / "load.json", tmp_path / "scene.png"
    image_path.write_bytes(png_bytes(images[0]))
    assert main(["--url", server.endpoints.http, "--images", str(image_path), "--concurrency", "1,4",
                 "--requests", "12", "--warmup", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "p99 ms" in table and "queue ms" in table and "detector_cpu" in table
    report = json.loads(out.read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    for level in report["levels"]:
        assert level["errors"] == 0 and level["requests"] == 12 and level["throughput_rps"] > 0
        latency = level["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        models = {m["model"]: m for m in level["models"]}
        assert set(models) == {"sdconet", "preprocess", "detector_cpu", "postprocess"}
        for name in ("sdconet", "preprocess", "detector_cpu", "postprocess"):
            assert models[name]["requests"] == 12, name
            assert models[name]["compute_ms"] > 0 and models[name]["queue_ms"] >= 0
        assert models["detector_cpu"]["inferences"] == 12


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_cli_starts_prints_endpoints_and_stops_cleanly(cpu_repo, tmp_path, stop_signal):
    _require_server(cpu_repo)
    ports = free_ports(3)
    command = [sys.executable, "-m", "sdconet.serve", "--repo", str(cpu_repo), "--http-port", str(ports[0]),
               "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--json",
               "--log-file", str(tmp_path / "server.log")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    try:
        line = process.stdout.readline()  # the JSON endpoints line, printed once the server is ready
        assert line, process.stderr.read()
        info = json.loads(line)
        assert info["http"] == f"127.0.0.1:{ports[0]}" and info["grpc"] == f"127.0.0.1:{ports[1]}"
        with SDCoNetClient(info["http"]) as client:
            assert client.is_ready()
        process.send_signal(stop_signal)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not process_group_members(info["pid"]), "tritonserver or a backend stub outlived the launcher"
    assert not Path(f"/proc/{info['pid']}").exists()


def test_serve_cli_rejects_a_repository_built_for_another_backend(cpu_repo, capsys):
    from sdconet.serve.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--repo", str(cpu_repo), "--backend", "trt"])
    assert exit_info.value.code == 2
    assert "was built for backend 'cpu', not 'trt'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lifecycle_repo(cpu_repo, tmp_path_factory) -> Path:
    """The shared repository cut down to its preprocess model: the process-lifecycle tests below start servers of
    their own, and one python model (one stub) starts and stops in a third of the time of all five."""
    import shutil

    repo = tmp_path_factory.mktemp("lifecycle") / "repo"
    repo.mkdir()
    shutil.copytree(cpu_repo / "preprocess", repo / "preprocess")
    manifest = json.loads((cpu_repo / MANIFEST_NAME).read_text())
    (repo / MANIFEST_NAME).write_text(json.dumps(dict(manifest, models=["preprocess"])))
    return repo


def _launch(repo: Path, ports, *extra: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    command = [sys.executable, "-m", "sdconet.serve", "--repo", str(repo), "--http-port", str(ports[0]),
               "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--json", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            cwd=Path(__file__).resolve().parents[1])


def _server_ready(http: str) -> bool:
    """Triton's own readiness (the cut-down repository has no ``sdconet`` model for the client to check)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=5) as response:
        return response.status == 200


def _alive(pid: int) -> bool:
    """Running, i.e. present and not a zombie (a reaped or zombie server serves nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_sigkilled_launcher_takes_its_tritonserver_with_it(lifecycle_repo):
    """SIGKILL leaves the launcher no chance to stop its server: the kernel's PDEATHSIG SIGTERMs it instead."""
    _require_server(lifecycle_repo)
    launcher = _launch(lifecycle_repo, (0, 0, 0))  # port 0: picked free, printed in the JSON line
    try:
        info = json.loads(launcher.stdout.readline() or "{}")
        assert info, launcher.stderr.read()
        assert len({info["http"], info["grpc"], info["metrics"].split("/")[2]}) == 3
        assert _server_ready(info["http"])
        assert _alive(info["pid"]) and len(process_group_members(info["pid"])) > 1  # the server and its stubs
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 15  # Triton unloads its models and exits; its stubs go with it
        while (_alive(info["pid"]) or process_group_members(info["pid"])) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(info["pid"]), "tritonserver outlived its SIGKILLed launcher"
        assert not process_group_members(info["pid"]), "a backend stub outlived its SIGKILLed launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if "info" in locals() and info and process_group_members(info["pid"]):
            os.killpg(info["pid"], signal.SIGKILL)  # only if the test failed: leave no server behind


def test_launcher_refuses_a_stale_server_on_its_port_and_replaces_it_when_asked(lifecycle_repo, tmp_path):
    """A tritonserver whose launcher is gone (what an older launcher's SIGKILL left) holds the HTTP port: the new
    launcher refuses, naming its pid and the fixes; with --replace-stale it stops it and serves on that port."""
    _require_server(lifecycle_repo)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_launcher = int(gone.stdout)
    fake = tmp_path / "tritonserver"  # named like the server, so it is recognised as one
    fake.symlink_to(sys.executable)
    port = free_ports(1)[0]
    listen = (f"import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
              f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(300)")
    stale = subprocess.Popen([str(fake), "-c", listen, "--model-repository=/old/repo"], stdout=subprocess.PIPE,
                             text=True, start_new_session=True,
                             env=dict(os.environ, SDCONET_LAUNCHER_PID=str(dead_launcher)))
    launcher = None
    try:
        assert stale.stdout.readline().strip() == "up"
        (holder,) = port_holders(port)
        assert holder.stale and holder.pid == stale.pid and holder.launcher_pid == dead_launcher
        refused = _launch(lifecycle_repo, (port, 0, 0))
        _, err = refused.communicate(timeout=60)
        assert refused.returncode == 1 and stale.poll() is None
        assert (f"http port {port} on 127.0.0.1 is in use by a stale tritonserver (pid {stale.pid}, repository "
                f"/old/repo) whose launcher (pid {dead_launcher}) is gone; stop it (kill -TERM -- -{stale.pid}), "
                f"rerun python -m sdconet.serve with --replace-stale") in err

        launcher = _launch(lifecycle_repo, (port, 0, 0), "--replace-stale", stderr=subprocess.DEVNULL)
        info = json.loads(launcher.stdout.readline() or "{}")
        assert info["http"] == f"127.0.0.1:{port}"
        assert stale.wait(timeout=5) == -signal.SIGTERM  # stopped the way the launcher stops its own server
        assert _server_ready(info["http"])
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0
    finally:
        for process in (stale, launcher):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_server_retries_on_new_ports_when_a_picked_port_is_taken_before_the_bind(lifecycle_repo, monkeypatch):
    """The race free_ports cannot close: another process binds a picked port between the check and Triton's bind.
    Triton exits with 'already in use' and the server starts again on new ports."""
    import socket

    from sdconet.serve import server as server_module

    _require_server(lifecycle_repo)
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        thief.listen()
        stolen = thief.getsockname()[1]
        real, calls = server_module.free_ports, []

        def first_pick_is_stolen(count, host="127.0.0.1"):
            calls.append(count)
            ports = real(count, host)
            return [stolen] + ports[1:] if len(calls) == 1 else ports

        monkeypatch.setattr(server_module, "free_ports", first_pick_is_stolen)
        monkeypatch.setattr(server_module, "port_is_free", lambda host, port: True)  # free when checked
        with TritonServer(lifecycle_repo, http_port=0, grpc_port=0, metrics_port=0) as server:
            assert len(calls) == 2 and server.endpoints.http_port != stolen
            assert _server_ready(server.endpoints.http)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_server_started_from_a_worker_thread_outlives_that_thread(lifecycle_repo):
    """PDEATHSIG fires when the forking *thread* exits: a server started from a short-lived thread is forked by the
    long-lived spawner thread instead, so it keeps serving after the starting thread is gone."""
    _require_server(lifecycle_repo)
    started: dict[str, TritonServer] = {}

    def start() -> None:
        server = TritonServer(lifecycle_repo, http_port=0, grpc_port=0, metrics_port=0)
        started["server"] = server
        server.start()
        server.wait_ready()

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    server = started["server"]
    try:
        time.sleep(1.0)  # a signal sent at the thread's exit would have stopped it by now
        assert server.process.poll() is None and _server_ready(server.endpoints.http)
    finally:
        server.stop()
