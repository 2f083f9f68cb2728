"""Triton repositories for NVIDIA's container (issue 15 item 5): no build-host venv in trt/onnx repositories by
default, plugin libraries recorded and passed to the server, model_warmup on the GPU detectors, the ONNX Runtime
TensorRT accelerator's engine cache and its INT8 refusal. Configs are parsed with Triton's own schema."""
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tritonclient.grpc  # noqa: E402,F401

from sdconet.deploy.exporter import ExportOptions, repository_python_env  # noqa: E402
from sdconet.serve.triton_repo import (DETECTOR_MODELS, MANIFEST_NAME, RepositoryError, RepositoryOptions,  # noqa: E402
                                       build_repository, load_manifest, parse_model_config)
from sdconet.serve.server import TritonServer, tensorrt_plugin_args  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
IMGSZ, MAX_BATCH, NUM_DETECTIONS = 32, 4, 5


@pytest.fixture(scope="module")
def detector_onnx(tmp_path_factory) -> Path:
    """A graph with the detector's serving signature (images -> boxes/scores/labels, dynamic batch); never run."""
    flat = 3 * IMGSZ * IMGSZ
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.random((flat, NUM_DETECTIONS), dtype=np.float32), "w_scores"),
             onnx.numpy_helper.from_array(rng.random((flat, 4 * NUM_DETECTIONS), dtype=np.float32), "w_boxes"),
             onnx.numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
             onnx.numpy_helper.from_array(np.array([0, NUM_DETECTIONS, 4], np.int64), "box_shape")]
    nodes = [helper.make_node("Reshape", ["images", "flat_shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w_scores"], ["scores"]),
             helper.make_node("MatMul", ["flat", "w_boxes"], ["boxes_flat"]),
             helper.make_node("Reshape", ["boxes_flat", "box_shape"], ["boxes"]),
             helper.make_node("Cast", ["scores"], ["labels"], to=TensorProto.INT32)]
    graph = helper.make_graph(
        nodes, "detector", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, IMGSZ, IMGSZ])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["B", NUM_DETECTIONS, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", NUM_DETECTIONS]),
         helper.make_tensor_value_info("labels", TensorProto.INT32, ["B", NUM_DETECTIONS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("detector") / "detector.onnx"
    onnx.save(model, str(path))
    return path


def _build(tmp_path: Path, detector_onnx: Path, backend: str, **options) -> Path:
    engine = None
    tmp_path.mkdir(parents=True, exist_ok=True)
    if backend == "trt":
        # stands in for an engine file: only configs and manifest are checked here (TensorRT is not installed)
        engine = tmp_path / "engine_placeholder.plan"
        engine.write_bytes(b"placeholder")
    return build_repository(tmp_path / f"repo_{backend}", onnx_path=detector_onnx, engine_path=engine,
                            backend=backend, imgsz=IMGSZ, max_batch=MAX_BATCH, class_names=["a", "b"],
                            options=RepositoryOptions(**options))


def _default_env_options(backend: str) -> dict:
    """RepositoryOptions fields the exporter derives from its default --triton-python-env."""
    python_env, check = repository_python_env(ExportOptions().triton_python_env, backend)
    return {"python_env": python_env, "check_python_env": check}


def _load_cli():
    spec = importlib.util.spec_from_file_location("build_engine_cli", REPO_ROOT / "export" / "build_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["trt", "onnx"])
def test_default_gpu_repository_has_no_build_host_python_env(tmp_path, detector_onnx, backend):
    assert _load_cli().parse_args([]).triton_python_env == ExportOptions().triton_python_env == "auto"
    repo = _build(tmp_path, detector_onnx, backend, **_default_env_options(backend))
    configs = sorted(repo.glob("*/config.pbtxt"))
    assert {"preprocess", DETECTOR_MODELS[backend], "postprocess", "sdconet"} <= {c.parent.name for c in configs}
    for config in configs:
        assert "EXECUTION_ENV_PATH" not in config.read_text(), config
    assert json.loads((repo / MANIFEST_NAME).read_text())["python_env_version"] is None  # nothing was checked


def test_default_cpu_repository_keeps_this_python_env():
    assert repository_python_env("auto", "cpu") == (sys.prefix, True)
    assert repository_python_env("none", "cpu") == (None, False)
    assert repository_python_env("/opt/env", "trt") == ("/opt/env", False)


@pytest.mark.parametrize("backend", ["trt", "onnx"])
def test_gpu_detectors_warm_up_at_batch_1_and_max_batch(tmp_path, detector_onnx, backend):
    repo = _build(tmp_path, detector_onnx, backend, python_env=None)
    config = parse_model_config(repo / DETECTOR_MODELS[backend] / "config.pbtxt")
    assert [w.batch_size for w in config.model_warmup] == [1, MAX_BATCH]
    for warmup in config.model_warmup:
        image = warmup.inputs["images"]
        assert list(image.dims) == [3, IMGSZ, IMGSZ] and image.random_data
    off = _build(tmp_path / "off", detector_onnx, backend, python_env=None, warmup=False)
    assert not parse_model_config(off / DETECTOR_MODELS[backend] / "config.pbtxt").model_warmup


def test_plugin_libraries_in_manifest_and_server_command(tmp_path, detector_onnx):
    libs = [tmp_path / "libmsda_plugin.so", tmp_path / "libother.so"]
    for lib in libs:
        lib.write_bytes(b"\x7fELF")  # only the path is recorded and passed on here
    repo = _build(tmp_path, detector_onnx, "trt", python_env=None, plugin_libs=tuple(str(p) for p in libs))
    manifest = json.loads((repo / MANIFEST_NAME).read_text())
    assert manifest["plugin_libs"] == [str(p.resolve()) for p in libs]
    expected = f"--backend-config=tensorrt,plugins={libs[0].resolve()};{libs[1].resolve()}"
    assert tensorrt_plugin_args(repo) == [expected]
    server = TritonServer(repo, binary=tmp_path / "tritonserver")  # command() only: nothing is started
    assert expected in server.command()
    without = _build(tmp_path / "plain", detector_onnx, "trt", python_env=None)
    assert json.loads((without / MANIFEST_NAME).read_text())["plugin_libs"] == []
    assert not any(a.startswith("--backend-config=tensorrt") for a in TritonServer(
        without, binary=tmp_path / "tritonserver").command())


def test_plugin_library_errors(tmp_path, detector_onnx):
    with pytest.raises(RepositoryError, match="libmissing.so: file not found"):
        _build(tmp_path, detector_onnx, "trt", python_env=None, plugin_libs=(str(tmp_path / "libmissing.so"),))
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"")
    with pytest.raises(RepositoryError, match="backend 'onnx' does not load them"):
        _build(tmp_path, detector_onnx, "onnx", python_env=None, plugin_libs=(str(lib),))
    odd = tmp_path / "a,b"
    odd.mkdir()
    (odd / "libx.so").write_bytes(b"")
    with pytest.raises(RepositoryError, match="cannot be passed to Triton's"):
        _build(tmp_path, detector_onnx, "trt", python_env=None, plugin_libs=(str(odd / "libx.so"),))


def test_onnx_tensorrt_accelerator_engine_cache_and_int8_refusal(tmp_path, detector_onnx):
    repo = _build(tmp_path, detector_onnx, "onnx", python_env=None, onnx_tensorrt=True,
                  onnx_tensorrt_cache_path="/var/cache/sdconet_trt")
    config = parse_model_config(repo / "detector_onnx/config.pbtxt")
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": "FP16", "trt_engine_cache_enable": "1",
                                            "trt_engine_cache_path": "/var/cache/sdconet_trt"}
    with pytest.raises(RepositoryError, match="INT8 needs onnx_tensorrt_calibration_table"):
        _build(tmp_path / "int8", detector_onnx, "onnx", python_env=None, onnx_tensorrt=True,
               onnx_tensorrt_precision="INT8")
    int8 = _build(tmp_path / "int8_table", detector_onnx, "onnx", python_env=None, onnx_tensorrt=True,
                  onnx_tensorrt_precision="INT8", onnx_tensorrt_calibration_table="calibration.flatbuffers")
    parameters = parse_model_config(int8 / "detector_onnx/config.pbtxt").optimization.execution_accelerators \
        .gpu_execution_accelerator[0].parameters
    assert parameters["precision_mode"] == "INT8"
    assert parameters["int8_calibration_table_name"] == "calibration.flatbuffers"


# -- the shared image-input check of the preprocess and sdconet_scene python models ------------------------------------
class _Tensor:
    """Stands in for pb_utils.Tensor as the models read it."""

    def __init__(self, array):
        self.array = array

    def as_numpy(self):
        return self.array


def _load_python_model(version_dir: Path):
    """``version_dir/model.py`` imported as Triton's python backend does (its directory on sys.path), with a minimal
    ``triton_python_backend_utils``; the copied sdconet_* modules are dropped from sys.modules again afterwards."""
    import types

    fake = types.ModuleType("triton_python_backend_utils")
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    copies = ("sdconet_processing", "sdconet_tiling", "sdconet_merge")
    saved = {name: sys.modules.pop(name) for name in copies + ("triton_python_backend_utils",) if name in sys.modules}
    sys.modules["triton_python_backend_utils"] = fake
    sys.path.insert(0, str(version_dir))
    try:
        spec = importlib.util.spec_from_file_location(f"_model_{version_dir.parent.name}", version_dir / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(version_dir))
        for name in copies + ("triton_python_backend_utils",):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _initialized(module, config_path: Path):
    from google.protobuf import json_format

    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(parse_model_config(config_path),
                                                                preserving_proto_field_name=True)})
    return model


def test_both_python_models_use_the_shared_single_input_check(tmp_path, detector_onnx):
    """preprocess and sdconet_scene refuse a request with both or neither of IMAGE_BYTES / IMAGE through
    sdconet_processing.image_input (their old messages kept), and serve one that carries exactly one."""
    from PIL import Image

    from sdconet.serve.triton_repo import TEMPLATE_DIR
    from sdconet.serve import processing

    repo = _build(tmp_path, detector_onnx, "onnx", python_env=None)
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    encoded = _Tensor(np.array([[buffer.getvalue()]], dtype=object))
    raw = _Tensor(image[None])
    for model_name, what, run in (("preprocess", "encoded image", lambda m, r: m._prepare(r)),
                                  ("sdconet_scene", "an encoded scene", lambda m, r: m._scene(r))):
        assert "send exactly one of" not in (TEMPLATE_DIR / model_name / "model.py").read_text()  # not duplicated
        module = _load_python_model(repo / model_name / "1")
        model = _initialized(module, repo / model_name / "config.pbtxt")
        message = f"send exactly one of the inputs IMAGE_BYTES ({what}) or IMAGE ([H, W, 3] uint8 RGB)"
        for request in ({}, {"IMAGE_BYTES": encoded, "IMAGE": raw}):
            with pytest.raises(module.InvalidImageError) as err:  # the class of the repository's own copy
                run(model, request)
            assert str(err.value) == message, model_name
        for request in ({"IMAGE_BYTES": encoded}, {"IMAGE": raw}):
            out = run(model, request)
            if model_name == "preprocess":
                expected = processing.letterbox(image, IMGSZ)
                np.testing.assert_array_equal(out[0], expected[0][None])
                np.testing.assert_array_equal(out[1], expected[1][None])
            else:
                np.testing.assert_array_equal(out[0], image)
                assert out[1] is None  # no VALID mask sent: every pixel is image


def test_new_model_py_next_to_an_old_processing_copy_says_how_to_rebuild(tmp_path, detector_onnx):
    """A built repository is self-contained (its model.py files carry their copies of sdconet_processing), so an old
    one keeps loading; a new model.py copied next to an older sdconet_processing.py fails with how to rebuild."""
    repo = _build(tmp_path, detector_onnx, "onnx", python_env=None)
    for model_name in ("preprocess", "sdconet_scene"):
        copy = repo / model_name / "1" / "sdconet_processing.py"
        copy.write_text(copy.read_text().replace("def image_input(", "def _not_yet_there("))
        with pytest.raises(ImportError, match=rf"{model_name}: the sdconet_processing.py next to this model.py is "
                                              r"older than it .*rebuild the repository with export/build_engine.py"):
            _load_python_model(repo / model_name / "1")


def test_scene_model_exposes_the_served_detector_digest(tmp_path, detector_onnx):
    """Fails before issue 22: neither the manifest nor the scene model named the detector's weights, so a client's
    resume marker could not tell two deployments apart."""
    import hashlib

    for backend in ("onnx", "trt"):
        repo = _build(tmp_path / backend, detector_onnx, backend, python_env=None)
        artifact = repo / DETECTOR_MODELS[backend] / "1" / ("model.plan" if backend == "trt" else "model.onnx")
        digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
        parameters = parse_model_config(repo / "sdconet_scene" / "config.pbtxt").parameters
        assert parameters["detector_sha256"].string_value == digest, backend
        assert load_manifest(repo)["detector_artifact"]["sha256"] == digest


def test_scene_model_cancels_the_other_tile_requests_when_one_fails(tmp_path, detector_onnx):
    """Fails before issue 22 (asyncio.gather): after the first detector request failed, the others ran on to the
    end for a scene whose answer was already an error."""
    import asyncio

    repo = _build(tmp_path, detector_onnx, "onnx", python_env=None)
    module = _load_python_model(repo / "sdconet_scene" / "1")
    model = _initialized(module, repo / "sdconet_scene" / "config.pbtxt")
    model.tiles_per_request, model.in_flight = 1, 8
    finished, cancelled = [], []

    class Response:
        def __init__(self, failed):
            self.failed = failed

        def has_error(self):
            return self.failed

        def error(self):
            return type("Error", (), {"message": lambda self: "stub restarting"})()

    class Request:
        calls = 0

        def __init__(self, **kwargs):
            self.index = Request.calls
            Request.calls += 1

        async def async_exec(self):
            if self.index == 0:
                return Response(True)
            try:
                await asyncio.sleep(0.3)
            except asyncio.CancelledError:
                cancelled.append(self.index)
                raise
            finished.append(self.index)
            return Response(False)

    module.pb_utils.InferenceRequest = Request
    module.pb_utils.Tensor = lambda name, array: array
    scene = np.zeros((IMGSZ * 2, IMGSZ * 2, 3), np.uint8)
    tiles = module.tile_grid(scene.shape[0], scene.shape[1], IMGSZ, 0)

    async def serve_on():
        with pytest.raises(module.DetectorFailed, match="stub restarting"):
            await model._run_tiles(scene, None, tiles)
        await asyncio.sleep(0.6)  # the server's event loop lives on after the failed scene

    asyncio.run(serve_on())
    assert len(tiles) == 4 and finished == [] and sorted(cancelled) == [1, 2, 3]
