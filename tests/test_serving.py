"""Serving: Triton repository builder, the bundled tritonserver on CPU, HTTP/gRPC clients, load generator.

The server tests use the one python-only ``tritonserver`` (bundled in nvidia-pytriton) of the test run, on free
loopback ports with the ``cpu`` deployment, always stopped at the end; it and the served ONNX (``detector_onnx``, the
single place to swap the model) are the session fixtures of ``serving_fixtures.py``.
"""
from __future__ import annotations

import json
import re
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


def test_letterbox_refuses_arrays_that_are_not_rgb_uint8():
    """An IMAGE array of 4 channels (RGBA), 1 channel or float dtype is refused by name, never letterboxed into a
    3-channel canvas."""
    for bad in (np.zeros((20, 30, 4), np.uint8), np.zeros((20, 30, 1), np.uint8), np.zeros((20, 30), np.uint8),
                np.zeros((20, 30, 3), np.float32)):
        with pytest.raises(processing.InvalidImageError, match=re.escape(f"got shape {bad.shape}")):
            processing.letterbox(bad, IMGSZ)


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
# Healing policy (no server): a stand-in answering as Triton 2.51 does (the same JSON the real-server tests below
# check on the real server: repository index entries, /v2/models/stats entries)
# ---------------------------------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _FakeTriton:
    """The HealTarget calls, one stub per model. ``dies_after_reload``: models whose new stub crashes at once;
    ``canary_answers``: what the next canary of a model gets (default ok, which counts as a success and an
    execution, as on the real server); ``busy``: models completing executions during a canary."""

    def __init__(self, models: list[str], clock: _Clock):
        self.models, self.clock = models, clock
        self.index = {m: {"name": m, "version": "1", "state": "READY"} for m in models}
        self.alive = {m: 1 for m in models}
        self.success = {m: 0 for m in models}
        self.executions = {m: 0 for m in models}
        self.dies_after_reload: set[str] = set()
        self.canary_answers: dict = {}
        self.busy: set[str] = set()
        self.calls: list[tuple[float, str, str]] = []
        self.retained_mb = 0.0
        self.retained_asked: list[float] = []

    def python_models(self):
        return list(self.models)

    def missing_stubs(self):
        return {m: (1, 0) for m in self.models if not self.alive[m]}  # processes, whatever the index says

    def repository_index(self):
        return list(self.index.values())

    def model_statistics(self):
        return {"model_stats": [{"name": m, "version": "1", "last_inference": 0, "inference_count": self.success[m],
                                 "execution_count": self.executions[m],
                                 "inference_stats": {"success": {"count": self.success[m], "ns": 0},
                                                     "fail": {"count": 0, "ns": 0}}}
                                for m in self.models if self.index[m]["state"] == "READY"]}

    def canary(self, model, timeout_s):
        from sdconet.serve.healing import CanaryResult

        self.calls.append((self.clock.now, "canary", model))
        answer = self.canary_answers.pop(model, CanaryResult("ok"))
        if answer.status == "ok":
            self.success[model] += 1
            self.executions[model] += 1
        if model in self.busy:
            self.executions[model] += 3
        return answer

    def kill_stubs(self, model):
        self.calls.append((self.clock.now, "kill", model))
        self.alive[model] = 0
        return [1234]

    def reload_model(self, model):
        self.calls.append((self.clock.now, "reload", model))
        self.alive[model] = 0 if model in self.dies_after_reload else 1

    def retained_shm_mb(self):
        self.retained_asked.append(self.clock.now)
        return self.retained_mb


def _calls(fake: _FakeTriton, kind: str) -> list[tuple[float, str]]:
    return [(t, model) for t, what, model in fake.calls if what == kind]


def test_reload_budget_backs_off_exponentially_then_escalates():
    from sdconet.serve.healing import Healer, HealPolicy, ReloadBudgetExhausted

    clock = _Clock()
    fake = _FakeTriton(["detector_cpu", "preprocess"], clock)
    healer = Healer(fake, HealPolicy(reload_budget=3, backoff_s=2.0, canary_interval_s=0), clock)
    fake.alive["detector_cpu"] = 0  # a stub that dies on every request: each new one dies at once
    fake.dies_after_reload.add("detector_cpu")
    with pytest.raises(ReloadBudgetExhausted, match=r"model 'detector_cpu' failed again \(0 of 1 python backend "
                                                    r"stub\(s\) alive .*\) after 3 reload\(s\) in 7 s: reload "
                                                    r"budget exhausted") as exhausted:
        for second in range(60):  # the launcher's watch: one heal() a second
            clock.now = float(second)
            healer.heal()
    assert exhausted.value.model == "detector_cpu" and clock.now == 7.0
    # reloads at 0, then after 2 s, then after 4 s more; the 4th need (t = 7) escalates instead of reloading
    assert _calls(fake, "reload") == [(0.0, "detector_cpu"), (2.0, "detector_cpu"), (6.0, "detector_cpu")]
    assert not _calls(fake, "kill")  # a dead stub needs no kill


def test_reload_budget_refills_after_a_healthy_spell():
    from sdconet.serve.healing import Healer, HealPolicy

    clock = _Clock()
    fake = _FakeTriton(["postprocess"], clock)
    healer = Healer(fake, HealPolicy(reload_budget=2, backoff_s=2.0, budget_reset_s=300, canary_interval_s=0), clock)
    for crash_at in (0.0, 400.0, 800.0, 1200.0):  # one crash every 400 s: each one is healed, none escalates
        clock.now = crash_at
        fake.alive["postprocess"] = 0
        assert healer.heal() == ["postprocess"]
        clock.now += 1
        assert healer.heal() == []
    assert [t for t, _ in _calls(fake, "reload")] == [0.0, 400.0, 800.0, 1200.0]


def test_shared_memory_kept_by_replaced_instances_is_logged_then_restarts_the_server(caplog):
    import logging

    from sdconet.serve.healing import Healer, HealPolicy, RestartNeeded, RetainedMemoryExceeded

    clock = _Clock()
    fake = _FakeTriton(["preprocess", "detector_cpu"], clock)
    healer = Healer(fake, HealPolicy(canary_interval_s=0, max_retained_shm_mb=256, retained_check_delay_s=5), clock)
    for second in range(10):  # no reload yet: the server is not even asked
        clock.now = float(second)
        healer.heal()
    assert not fake.retained_asked
    fake.alive["preprocess"] = 0  # killed under load: reloaded, and Triton keeps the old instance's 201 MB pool
    assert healer.heal() == ["preprocess"]
    fake.retained_mb = 201.0
    with caplog.at_level(logging.WARNING, logger="sdconet.serve.healing"):
        for second in range(10, 30):
            clock.now = float(second)
            healer.heal()
    assert fake.retained_asked[0] == 14.0  # retained_check_delay_s after the reload
    kept = [r.getMessage() for r in caplog.records if "keeps" in r.getMessage()]
    assert len(kept) == 1 and "201 MB" in kept[0]  # logged once per new figure, not every second
    fake.alive["detector_cpu"] = 0  # a second death: its own pool counts as unmapped by a live stub until reloaded
    fake.retained_mb = 201.0 + 210.0
    assert healer.heal() == ["detector_cpu"]  # reloaded, not restarted
    fake.retained_mb = 201.0 + 210.0  # ... and Triton kept that one too: over the limit
    with pytest.raises(RetainedMemoryExceeded, match=r"keeps 411 MB .* over the limit of 256 MB.*only a restart") as \
            exceeded:
        for second in range(30, 60):
            clock.now = float(second)
            healer.heal()
    assert isinstance(exceeded.value, RestartNeeded) and clock.now == 34.0  # 5 s after the reload at 29
    off = Healer(fake, HealPolicy(canary_interval_s=0, max_retained_shm_mb=0), clock)  # 0 = never
    fake.alive["preprocess"] = 0
    for second in range(60, 80):
        clock.now = float(second)
        off.heal()
    assert max(fake.retained_asked) < 60


def test_retained_shared_memory_is_what_the_server_maps_and_no_stub_does():
    import os
    import subprocess
    import sys
    from multiprocessing import shared_memory

    from sdconet.serve.server import retained_shm_bytes, shm_mappings

    region = shared_memory.SharedMemory(create=True, size=8 << 20)  # mapped by this process, 8 MB
    try:
        region.buf[: 3 << 20] = b"\1" * (3 << 20)  # 3 MB of it touched: what the region really holds
        assert region.name.lstrip("/") in shm_mappings(os.getpid())
        held = retained_shm_bytes(os.getpid(), [])
        assert abs(held[region.name.lstrip("/")] - (3 << 20)) <= 64 << 10
        # a "stub" that maps the same region: nothing of it is retained
        stub = subprocess.Popen([sys.executable, "-c", "import mmap, os, sys, time; "
                                 "m = mmap.mmap(os.open('/dev/shm/' + sys.argv[1], os.O_RDWR), 0); "
                                 "print('ok', flush=True); time.sleep(30)", region.name.lstrip("/")],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert stub.stdout.readline().strip() == "ok"
            assert region.name.lstrip("/") not in retained_shm_bytes(os.getpid(), [stub.pid])
        finally:
            stub.kill()
            stub.wait()
        assert region.name.lstrip("/") in retained_shm_bytes(os.getpid(), [stub.pid])  # the stub is gone
    finally:
        region.close()
        region.unlink()
    assert region.name.lstrip("/") not in shm_mappings(os.getpid())


def test_healer_leaves_a_model_its_key_holder_unloaded_alone(caplog):
    import logging

    from sdconet.serve.healing import Healer, HealPolicy

    clock = _Clock()
    fake = _FakeTriton(["postprocess", "preprocess"], clock)
    healer = Healer(fake, HealPolicy(canary_interval_s=5.0), clock)
    # what the real index answers after an unload through the repository API (measured on 2.51)
    fake.index["postprocess"] = {"name": "postprocess", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    fake.alive["postprocess"] = 0
    with caplog.at_level(logging.WARNING, logger="sdconet.serve.healing"):
        for second in range(30):
            clock.now = float(second)
            assert healer.heal() == []
    assert not _calls(fake, "reload") and ("canary", "postprocess") not in [c[1:] for c in fake.calls]
    assert [r.getMessage() for r in caplog.records] == [
        "model 'postprocess' is UNAVAILABLE (unloaded): not healing it (unloaded or being loaded through the "
        "repository API, or failed to load)"]  # said once, not every second
    fake.index["postprocess"] = {"name": "postprocess", "version": "1", "state": "READY"}  # loaded again
    fake.alive["postprocess"] = 1
    clock.now = 40.0
    assert healer.heal() == []
    fake.alive["postprocess"] = 0  # and healed again once it is back
    clock.now = 41.0
    assert healer.heal() == ["postprocess"]


def test_canary_verdicts_hung_unhealthy_busy_and_quiet():
    from sdconet.serve.healing import CanaryResult, Healer, HealPolicy

    clock = _Clock()
    fake = _FakeTriton(["a", "b", "c"], clock)
    healer = Healer(fake, HealPolicy(canary_interval_s=5.0, canary_timeout_s=10.0, backoff_s=0.0), clock)
    assert healer.heal() == [] and sorted(_calls(fake, "canary")) == [(0.0, "a"), (0.0, "b"), (0.0, "c")]
    clock.now = 3.0
    assert healer.heal() == [] and len(_calls(fake, "canary")) == 3  # not due yet
    # round 2: a served a real request meanwhile (no canary); b hangs; c times out but is busy executing
    fake.success["a"] += 1
    fake.canary_answers["b"] = CanaryResult("timeout", "timed out")
    fake.canary_answers["c"] = CanaryResult("timeout", "timed out")
    fake.busy.add("c")
    clock.now = 5.0
    assert healer.heal() == ["b"]
    assert sorted(m for t, m in _calls(fake, "canary") if t == 5.0) == ["b", "c"]
    assert [c[1:] for c in fake.calls if c[0] == 5.0 and c[1] != "canary"] == [("kill", "b"), ("reload", "b")]
    # round 3: c answers "not healthy" (a stopped stub: alive in the process table): killed, then reloaded
    fake.busy.clear()
    fake.canary_answers["c"] = CanaryResult("unhealthy", "Stub process 'c_0_0' is not healthy.")
    clock.now = 10.0
    assert healer.heal() == ["c"]
    assert [c[1:] for c in fake.calls if c[0] == 10.0 and c[1] != "canary"] == [("kill", "c"), ("reload", "c")]
    # an error answer from the model's own code proves its stub runs; no answer at all gives no verdict
    fake.canary_answers["a"] = CanaryResult("ok", "POST /v2/models/a/infer answered HTTP 400 empty image")
    fake.canary_answers["b"] = CanaryResult("error", "connection refused")
    clock.now = 15.0
    assert healer.heal() == []


def test_canary_request_reaches_the_model_code():
    """Built from the config Triton serves: every required input, or the first when all are optional."""
    from sdconet.serve.healing import canary_request

    preprocess = {"name": "preprocess", "max_batch_size": 8, "input": [
        {"name": "IMAGE_BYTES", "data_type": "TYPE_STRING", "dims": ["1"], "optional": True},
        {"name": "IMAGE", "data_type": "TYPE_UINT8", "dims": ["-1", "-1", "3"], "optional": True}]}
    assert json.loads(canary_request(preprocess)) == {
        "inputs": [{"name": "IMAGE_BYTES", "shape": [1, 1], "datatype": "BYTES", "data": [""]}]}
    post = {"name": "postprocess", "max_batch_size": 8, "input": [
        {"name": "boxes", "data_type": "TYPE_FP32", "dims": ["50", "4"]},
        {"name": "labels", "data_type": "TYPE_INT32", "dims": ["50"]}]}
    body = json.loads(canary_request(post))["inputs"]
    assert [(t["name"], t["shape"], t["datatype"], len(t["data"])) for t in body] == [
        ("boxes", [1, 50, 4], "FP32", 200), ("labels", [1, 50], "INT32", 50)]


def test_admin_key_file_is_created_private_and_refused_when_others_can_read_it(tmp_path):
    from sdconet.serve.server import admin_key_from_file, check_admin_key

    path = tmp_path / "admin.key"
    key = admin_key_from_file(path)
    assert path.stat().st_mode & 0o777 == 0o600 and check_admin_key(key) == key and len(key) >= 32
    assert admin_key_from_file(path) == key  # kept: a restarted launcher reuses it
    path.chmod(0o644)
    with pytest.raises(ServerError, match=r"admin key file .* is readable by others \(mode 644\); chmod 600"):
        admin_key_from_file(path)
    with pytest.raises(ValueError, match="16..256 characters"):
        check_admin_key("short:key=x")
    server = TritonServer(tmp_path, binary=tmp_path / "tritonserver", admin_key=key)  # command() only
    command = server.command()
    assert f"--http-restricted-api=model-repository,shared-memory,trace,logging:sdconet-admin-key={key}" in command
    assert f"--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:sdconet-admin-key={key}" \
        in command
    assert TritonServer(tmp_path, binary=tmp_path / "tritonserver").admin_key != key  # fresh per server


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


def _post(url: str, headers: dict | None = None, body: bytes = b"{}") -> tuple[int, str]:
    """A raw HTTP POST (no tritonclient): (status, body)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_repository_api_needs_the_admin_key_while_inference_stays_open(server, session, images):
    """From raw clients: load/unload/index without the key (HTTP and gRPC) are refused and change nothing, inference
    is served; with the key they work, and a model its holder unloaded is not "healed" back."""
    import base64

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from sdconet.serve.healing import index_states

    good, reference = png_bytes(images[0]), reference_detections(session, images[0])
    base = f"http://{server.endpoints.http}/v2"
    # what a hostile client would load: the postprocess model with a python file of its own
    hostile = json.dumps({"parameters": {"config": json.dumps({"backend": "python"}),
                                         "file:1/model.py": base64.b64encode(b"import os\n").decode()}}).encode()
    for headers in ({}, {"sdconet-admin-key": "not-the-key-0123456789"}):
        for path, body in (("repository/index", b"{}"), ("repository/models/postprocess/unload", b"{}"),
                           ("repository/models/postprocess/load", hostile)):
            code, answer = _post(f"{base}/{path}", headers, body)
            assert code == 403 and "This API is restricted" in answer, (path, code, answer)
    grpc = grpcclient.InferenceServerClient(server.endpoints.grpc)
    try:
        for call in (lambda: grpc.unload_model("postprocess"), lambda: grpc.load_model("postprocess"),
                     lambda: grpc.get_model_repository_index(),
                     lambda: grpc.unload_model("postprocess", headers={"sdconet-admin-key": server.admin_key})):
            with pytest.raises(InferenceServerException, match="This protocol is restricted"):
                call()
        assert not server.missing_stubs()  # nothing was unloaded
        for protocol, url in (("http", server.endpoints.http), ("grpc", server.endpoints.grpc)):
            with SDCoNetClient(url, protocol=protocol) as client:
                assert_same_detections(client.detect(good), reference)

        # the key holder: index and unload over gRPC, load over raw HTTP
        index = grpc.get_model_repository_index(headers=server.admin_headers("grpc"), as_json=True)["models"]
        assert index_states(index) == {m: ("READY", "") for m in ["detector_cpu", "postprocess", "preprocess",
                                                                  "sdconet", "sdconet_scene"]}
        grpc.unload_model("postprocess", headers=server.admin_headers("grpc"))
        deadline = time.monotonic() + 30
        while server.stub_pids("postprocess") and time.monotonic() < deadline:
            time.sleep(0.1)
        states = index_states(server.repository_index())
        assert states["postprocess"] == ("UNAVAILABLE", "unloaded")
        assert states["sdconet"] == ("UNAVAILABLE", "unloaded")  # the ensemble goes with it (Triton's choice)
        assert server.missing_stubs() == {"postprocess": (1, 0)}
        for _ in range(3):  # no reload, no error that would restart the server
            assert server.heal() == []
        assert server.missing_stubs() == {"postprocess": (1, 0)} and not server.stub_pids("postprocess")
        code, answer = _post(f"{base}/repository/models/postprocess/load", server.admin_headers("http"))
        assert code == 200, answer
        assert index_states(server.repository_index())["sdconet"][0] == "READY"
        with SDCoNetClient(server.endpoints.http) as client:
            assert_same_detections(client.detect(good), reference)
        assert server.heal() == [] and not server.missing_stubs()
    finally:
        grpc.close()
    assert server.admin_key not in server.log_path.read_text()  # neither Triton nor the launcher logs it


@pytest.fixture(scope="module")
def sleepy_repo(tmp_path_factory) -> Path:
    """One python model that answers x + 1, except the request that finds a ``hang`` file in the model's
    directory: it removes the file and sleeps for an hour inside ``execute`` (a stub alive but stuck)."""
    repo = tmp_path_factory.mktemp("sleepy") / "repo"
    (repo / "sleepy" / "1").mkdir(parents=True)
    (repo / "sleepy" / "config.pbtxt").write_text(
        'name: "sleepy"\nbackend: "python"\nmax_batch_size: 4\n'
        'input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
        'instance_group [ { kind: KIND_CPU count: 1 } ]\n'
        f'parameters {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: "{sys.prefix}" }} }}\n')
    (repo / "sleepy" / "1" / "model.py").write_text(
        "import time\nfrom pathlib import Path\n\nimport triton_python_backend_utils as pb_utils\n\n\n"
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        self.trigger = Path(args['model_repository']) / 'hang'\n\n"
        "    def execute(self, requests):\n"
        "        if self.trigger.exists():\n"
        "            self.trigger.unlink()\n"
        "            time.sleep(3600)\n"
        "        return [pb_utils.InferenceResponse([pb_utils.Tensor(\n"
        "            'Y', pb_utils.get_input_tensor_by_name(r, 'X').as_numpy() + 1)]) for r in requests]\n")
    return repo


def test_the_canary_heals_a_hung_and_a_stopped_stub(sleepy_repo):
    """Neither stub is missing from the process table; the canary finds both. The hung one: a request sleeps in
    ``execute``, the canary times out with no execution completed, the stub is killed (which also answers the stuck
    request) and the model reloaded. The stopped one (SIGSTOP): Triton answers "is not healthy"."""
    from sdconet.serve.healing import HealPolicy

    _require_server(sleepy_repo)
    body = json.dumps({"inputs": [{"name": "X", "shape": [1, 1], "datatype": "INT32", "data": [41]}]}).encode()
    policy = HealPolicy(canary_interval_s=0.2, canary_timeout_s=2.0, backoff_s=0.0)
    # exit_timeout_s: after a stub died mid-execute Triton 2.51 keeps the old model version until its exit timeout
    with TritonServer(sleepy_repo, http_port=0, grpc_port=0, metrics_port=0, heal_policy=policy,
                      exit_timeout_s=2) as server:
        infer = f"http://{server.endpoints.http}/v2/models/sleepy/infer"
        assert server.heal() == []  # the first canary round: answered
        first = server.stub_pids("sleepy")
        (sleepy_repo / "sleepy" / "hang").touch()
        stuck: list[tuple[int, str, float]] = []
        request = threading.Thread(target=lambda: stuck.append((*_post(infer, body=body), time.monotonic())))
        request.start()
        deadline = time.monotonic() + 30
        while (sleepy_repo / "sleepy" / "hang").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the stub took the request and sleeps
        assert not (sleepy_repo / "sleepy" / "hang").exists() and request.is_alive()
        assert not server.missing_stubs() and server.stub_pids("sleepy") == first  # invisible to the count
        time.sleep(policy.canary_interval_s)
        assert server.heal() == ["sleepy"]
        healed_at = time.monotonic()
        request.join(timeout=30)
        assert not request.is_alive() and stuck[0][0] == 500, stuck  # released with an error, not left hanging
        assert stuck[0][2] - healed_at < 5
        second = server.stub_pids("sleepy")
        assert len(second) == 1 and set(second).isdisjoint(first)
        assert json.loads(_post(infer, body=body)[1])["outputs"][0]["data"] == [42]

        os.kill(second[0], signal.SIGSTOP)
        assert not server.missing_stubs()
        time.sleep(policy.canary_interval_s)
        assert server.heal() == ["sleepy"]
        third = server.stub_pids("sleepy")
        assert len(third) == 1 and third != second and not _alive(second[0])  # killed (maybe a zombie)
        assert json.loads(_post(infer, body=body)[1])["outputs"][0]["data"] == [42]
        time.sleep(policy.canary_interval_s)
        assert server.heal() == []  # healthy again: the canary answers


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


def test_launcher_escalates_a_stub_that_keeps_dying_to_a_restart_then_stops(lifecycle_repo, tmp_path):
    """Every preprocess stub is killed a second after it starts: the launcher reloads it within its budget
    (--reload-budget 1), then restarts the server, then (--max-restarts 1) stops with one line and exit code 1."""
    from sdconet.serve.server import _launcher_of, process_label

    _require_server(lifecycle_repo)
    stderr_path = tmp_path / "serve.log"
    with open(stderr_path, "w") as stderr:
        launcher = _launch(lifecycle_repo, (0, 0, 0), "--reload-budget", "1", "--reload-backoff", "0",
                           "--max-restarts", "1", "--canary-interval", "0", stderr=stderr)
    killed, stop = [], threading.Event()

    def kill_every_stub() -> None:  # the stubs of this launcher's servers, once they are a second old
        while not stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or process_label(int(entry.name)) != "stub:preprocess":
                    continue
                pid = int(entry.name)
                try:
                    # field 22 of /proc/PID/stat: start time in clock ticks after boot
                    started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
                    age = float(Path("/proc/uptime").read_text().split()[0]) - started / os.sysconf("SC_CLK_TCK")
                    if _launcher_of(os.getpgid(pid)) != launcher.pid or age < 1.0:
                        continue
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except (OSError, ValueError):
                    pass
            time.sleep(0.1)

    killer = threading.Thread(target=kill_every_stub, daemon=True)
    try:
        info = json.loads(launcher.stdout.readline() or "{}")
        assert info, stderr_path.read_text()
        killer.start()
        assert launcher.wait(timeout=180) == 1, stderr_path.read_text()[-3000:]
    finally:
        stop.set()
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    log = stderr_path.read_text()
    assert log.count("reloading the model (reload 1 of 1)") == 2, log[-3000:]  # once per server
    assert "model 'preprocess' failed again (0 of 1 python backend stub(s) alive (a stub crashed or was killed)) " \
           "after 1 reload(s)" in log
    assert "reload budget exhausted; restarting the server (restart 1 of at most 1)" in log
    (last,) = [line for line in log.splitlines() if "giving up" in line]
    assert "reload budget exhausted; not restarting (--max-restarts 1 reached): the server is stopped and the " \
           "launcher exits with code 1" in last
    assert len(killed) >= 4
    assert "sdconet-admin-key=<admin key>" in log  # the launcher's "starting" line hides the key
    assert not process_group_members(info["pid"])


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
