"""The Triton cpu deployment's runtimes: ``detector_cpu`` on OpenVINO (plugin-mode ONNX, fused MSDA op from the
extension library carried in the repository) and on ONNX Runtime, selected when the repository is built.

One small bundled ``tritonserver`` serves, from one (moved) repository, ``detector_cpu`` on OpenVINO and a copy of the
ONNX Runtime detector with an old-style config (no ``runtime`` parameter, ``onnx_file``), as repositories built
before the runtime choice existed have. Their outputs are compared with the direct ``OpenVINORunner`` /
``OnnxRuntimeRunner`` on the same input.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx  # noqa: F401  (make setup installs every one of these: a broken install fails, never skips)
import onnxruntime  # noqa: F401
import openvino  # noqa: F401
import pytest
import torch
import tritonclient.http as httpclient

from needs import unavailable

from sdconet.deploy.report import parity_figures  # noqa: E402
from sdconet.serve.triton_repo import (  # noqa: E402
    EXTENSION_NAME, MANIFEST_NAME, RepositoryError, RepositoryOptions, build_repository, parse_model_config)
from sdconet.runtime import open_runner  # noqa: E402

from serving_fixtures import CLASS_NAMES, IMGSZ, SCORE_THRESHOLD, png_bytes, require_server, scene  # noqa: E402

MAX_BATCH = 4
BATCH_SIZES = (1, 4)  # two compiles at load; a batch of 3 is padded to 4
LEGACY = "detector_cpu_legacy"
KEYS = ("boxes", "scores", "labels")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny inference graph (random init, seeded) as the exporter writes it: plugin-mode ONNX (MSDA plugin nodes)
    and the pure ONNX derived from it, with their sdconet.* metadata."""
    from sdconet.config import load_config
    from sdconet.deploy import msda_plugin
    from sdconet.engine.inference_graph import build_inference_graph
    from sdconet.deploy.onnx_export import export_module, save_model, simplify_around_custom_nodes
    from sdconet.kernels.cpu import KernelBuildError, extension_path
    from sdconet.runtime.metadata import write_onnx_metadata

    try:
        extension_path()
    except KernelBuildError as err:
        unavailable(f"the fused MSDA CPU kernel cannot be built here: {err}")
    out = tmp_path_factory.mktemp("cpu_runtime_models")
    torch.manual_seed(0)
    graph = build_inference_graph(load_config("tiny", ["model.sr=false"]), None, msda_impl="plugin",
                                  with_saliency=True)
    spec = msda_plugin.trt_plugin_spec(1)
    with warnings.catch_warnings(), msda_plugin.use_plugin_spec(spec):
        warnings.simplefilter("ignore")  # tracer notes belong to the export tests
        exported = export_module(graph, torch.rand(1, 3, IMGSZ, IMGSZ), input_name="images",
                                 output_names=graph.output_names, custom_domains=[spec.domain])
    plugin = simplify_around_custom_nodes(exported)
    pure = msda_plugin.plugin_nodes_to_onnx(plugin, [spec.op_type])
    paths = {}
    for kind, model, msda in (("plugin", plugin, "plugin"), ("pure", pure, "onnx")):
        write_onnx_metadata(model, class_names=CLASS_NAMES, imgsz=IMGSZ, msda=msda, outputs=graph.output_names,
                            precision="fp32")
        paths[kind] = save_model(model, out / f"tiny.{kind}.onnx")
    return paths


def _build(repo: Path, models: dict[str, Path], **options) -> Path:
    cpu_model = options.pop("cpu_model", None)
    return build_repository(repo, onnx_path=models["pure"], backend="cpu", imgsz=IMGSZ, max_batch=MAX_BATCH,
                            class_names=CLASS_NAMES, score_threshold=SCORE_THRESHOLD, cpu_model=cpu_model,
                            options=RepositoryOptions(cpu_threads=1, **options))


def _legacy_config(text: str) -> str:
    """An ONNX Runtime detector_cpu config as the builder wrote it before the runtime choice: no runtime/precision/
    extension/batch-size parameters, the model named by ``onnx_file``; renamed so it sits next to detector_cpu."""
    kept = [line for line in text.splitlines() if not re.search(
        r'key: "(runtime|model_file|precision|extension|openvino_version|batch_sizes)"', line)]
    kept.append('parameters { key: "onnx_file" value: { string_value: "model.onnx" } }')
    return "\n".join(kept).replace('name: "detector_cpu"', f'name: "{LEGACY}"') + "\n"


@pytest.fixture(scope="module")
def cpu_repos(tmp_path_factory, models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cpu_runtime_repos")
    built = _build(root / "built_here", models, cpu_runtime="openvino", cpu_model=models["plugin"],
                   cpu_batch_sizes=BATCH_SIZES)
    ort_repo = _build(root / "ort", models, cpu_runtime="onnxruntime")
    legacy = built / LEGACY
    shutil.copytree(ort_repo / "detector_cpu", legacy)
    (legacy / "config.pbtxt").write_text(_legacy_config((legacy / "config.pbtxt").read_text()))
    assert parse_model_config(legacy / "config.pbtxt").name == LEGACY
    moved = built.rename(root / "moved")  # the repository carries everything it needs: it is relocatable
    return {"openvino": moved, "onnxruntime": ort_repo}


@pytest.fixture(scope="module")
def cpu_server(cpu_repos, tmp_path_factory):
    from sdconet.serve.server import TritonServer

    repo = cpu_repos["openvino"]
    require_server(repo)
    log_file = tmp_path_factory.mktemp("cpu_runtime_log") / "tritonserver.log"
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=log_file) as server:
        yield server


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Three network inputs (batch 3: padded to the compiled batch 4 by the openvino detector)."""
    return np.stack([np.asarray(scene(IMGSZ, IMGSZ, seed), np.float32).transpose(2, 0, 1) / 255.0
                     for seed in range(3)])


def _infer(server, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    client = httpclient.InferenceServerClient(server.endpoints.http)
    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput(k) for k in KEYS])
    return {k: result.as_numpy(k) for k in KEYS}


def _figures(out: dict, ref: dict) -> dict:
    return parity_figures([ref[k] for k in KEYS], [out[k] for k in KEYS], IMGSZ)


def _loaded_libraries(server, model: str) -> set[str]:
    """Shared libraries mapped by the python backend stub of ``model`` (which runtime it really runs)."""
    from sdconet.serve.server import stub_pids

    pids = stub_pids(server.process.pid, model)
    assert len(pids) == 1, (model, pids)
    maps = Path(f"/proc/{pids[0]}/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines() if ".so" in line}


# ---------------------------------------------------------------------------------------------------------------------
# Builder (no server)
# ---------------------------------------------------------------------------------------------------------------------
def test_openvino_repository_carries_model_extension_and_manifest(cpu_repos, models):
    from sdconet.kernels.cpu import extension_path

    repo = cpu_repos["openvino"]
    version_dir = repo / "detector_cpu" / "1"
    assert (version_dir / "model.onnx").read_bytes() == models["plugin"].read_bytes()
    assert (version_dir / EXTENSION_NAME).read_bytes() == extension_path().read_bytes()
    config = parse_model_config(repo / "detector_cpu" / "config.pbtxt")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["runtime"] == "openvino" and parameters["model_file"] == "model.onnx"
    assert parameters["extension"] == EXTENSION_NAME and parameters["batch_sizes"] == "1,4"
    assert parameters["openvino_version"] == openvino.get_version() and parameters["precision"] == "fp32"
    manifest = json.loads((repo / MANIFEST_NAME).read_text())
    assert manifest["cpu_runtime"] == {
        "runtime": "openvino", "precision": "fp32", "source_model": str(models["plugin"].resolve()),
        "model_file": "model.onnx", "extension": EXTENSION_NAME, "openvino_version": openvino.get_version(),
        "batch_sizes": [1, 4]}
    ort_manifest = json.loads((cpu_repos["onnxruntime"] / MANIFEST_NAME).read_text())
    assert ort_manifest["cpu_runtime"]["runtime"] == "onnxruntime"
    assert not (cpu_repos["onnxruntime"] / "detector_cpu" / "1" / EXTENSION_NAME).exists()


def test_auto_runtime_follows_the_cpu_model(tmp_path, models):
    plugin = _build(tmp_path / "plugin", models, cpu_model=models["plugin"])
    pure = _build(tmp_path / "pure", models)
    manifest = {name: json.loads((repo / MANIFEST_NAME).read_text())["cpu_runtime"]
                for name, repo in (("plugin", plugin), ("pure", pure))}
    assert manifest["plugin"]["runtime"] == "openvino" and manifest["plugin"]["batch_sizes"] == [1, 2, 4]
    assert manifest["pure"]["runtime"] == "onnxruntime" and manifest["pure"]["extension"] is None


@pytest.mark.parametrize("options, message", [
    ({"cpu_runtime": "tensorflow"}, "cpu_runtime must be one of"),
    ({"cpu_runtime": "onnxruntime", "cpu_precision": "bf16"}, "no bf16 path: use cpu_runtime 'openvino'"),
    ({"cpu_runtime": "openvino", "cpu_precision": "int8"}, "is not quantized: int8 needs the CPU quantizer's model"),
    ({"cpu_runtime": "onnxruntime", "cpu_model": "plugin"}, "custom operator.*cpu_runtime 'openvino'"),
    ({"cpu_runtime": "openvino", "cpu_batch_sizes": (1, 2)}, "include max_batch, got \\[1, 2\\]"),
    ({"cpu_runtime": "openvino", "cpu_batch_sizes": (0, 4)}, "cpu_batch_sizes must be in \\[1, max_batch=4\\]"),
])
def test_builder_refuses_cpu_runtime_settings_that_cannot_serve(tmp_path, models, options, message):
    if options.get("cpu_model") == "plugin":
        options["cpu_model"] = models["plugin"]
    with pytest.raises(RepositoryError, match=message):
        _build(tmp_path / "repo", models, **options)
    assert not (tmp_path / "repo").exists()


def _detector_module():
    """detector_cpu's model.py imported outside Triton (a stand-in for the backend's utility module)."""
    import importlib.util
    import sys
    import types

    from sdconet.serve.triton_repo import TEMPLATE_DIR

    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("sdconet_detector_cpu_model", TEMPLATE_DIR / "detector_cpu" /
                                                  "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openvino_detector_refuses_what_this_environment_cannot_run(cpu_repos):
    from sdconet.runtime.openvino_runner import cpu_capabilities

    module = _detector_module()
    version_dir = cpu_repos["openvino"] / "detector_cpu" / "1"
    config = parse_model_config(cpu_repos["openvino"] / "detector_cpu" / "config.pbtxt")
    parameters = {key: value.string_value for key, value in config.parameters.items()} | {"batch_sizes": "1"}
    args = (version_dir / "model.onnx", 1)
    io = ([3, IMGSZ, IMGSZ], list(KEYS))
    with pytest.raises(RuntimeError, match="built against OpenVINO 1999.1, this environment has"):
        module._OpenVINO(*args, parameters | {"openvino_version": "1999.1"}, version_dir, *io)
    if "BF16" not in cpu_capabilities():
        with pytest.raises(RuntimeError, match="precision bf16 needs a CPU with AVX512-BF16 or AMX"):
            module._OpenVINO(*args, parameters | {"precision": "bf16"}, version_dir, *io)
    engine = module._OpenVINO(*args, parameters, version_dir, *io)  # batch 1 only
    with pytest.raises(ValueError, match="batch 2 exceeds the largest compiled batch size 1"):
        engine.run(np.zeros((2, 3, IMGSZ, IMGSZ), np.float32))


# ---------------------------------------------------------------------------------------------------------------------
# The real server
# ---------------------------------------------------------------------------------------------------------------------
def test_openvino_detector_matches_the_direct_runners(cpu_server, models, images):
    served = _infer(cpu_server, "detector_cpu", images)
    libraries = _loaded_libraries(cpu_server, "detector_cpu")
    # the fused op came from the library inside the moved repository, and OpenVINO (not ONNX Runtime) runs the model
    assert str((cpu_server.repo / "detector_cpu" / "1" / EXTENSION_NAME).resolve()) in libraries, sorted(libraries)
    assert not any("onnxruntime" in lib for lib in libraries), sorted(libraries)
    with open_runner("openvino", model=models["plugin"], threads=1) as runner:
        assert runner.msda == "fused"
        direct = runner.run(images)
    with open_runner("onnxruntime", model=models["pure"], threads=1) as runner:
        reference = runner.run(images)
    same_runtime = _figures(served, direct)
    # the same OpenVINO model compiled for batch 4 (3 images + 1 padded row) vs batch 3: float rounding only
    assert same_runtime["max_box_error_px"] <= 1e-3 and same_runtime["max_score_error"] <= 1e-5, same_runtime
    assert same_runtime["top_labels_match"], same_runtime
    across = _figures(served, reference)  # the exporter's parity gate vs ONNX Runtime on the pure graph
    assert across["passed"], across
    # single requests (compiled batch 1) agree with the first image of the batch
    single = _infer(cpu_server, "detector_cpu", images[:1])
    assert _figures(single, {k: v[:1] for k, v in direct.items()})["passed"]


def test_old_style_config_serves_with_onnxruntime(cpu_server, models, images):
    served = _infer(cpu_server, LEGACY, images)
    libraries = _loaded_libraries(cpu_server, LEGACY)
    assert any("onnxruntime" in lib for lib in libraries) and not any("openvino" in lib for lib in libraries), \
        sorted(libraries)
    with open_runner("onnxruntime", model=models["pure"], threads=1) as runner:
        reference = runner.run(images)
    figures = _figures(served, reference)
    assert figures["max_box_error_px"] <= 1e-3 and figures["max_score_error"] <= 1e-5, figures
    assert figures["top_labels_match"], figures


def test_ensemble_serves_through_the_openvino_detector(cpu_server, models):
    from sdconet.serve import processing
    from sdconet.serve.client import SDCoNetClient

    image = scene(96, 160, seed=7)
    with SDCoNetClient(cpu_server.endpoints.http, protocol="http") as client:
        detections = client.detect(png_bytes(image))
    network_input, info = processing.letterbox(image, IMGSZ)
    with open_runner("openvino", model=models["plugin"], threads=1) as runner:
        out = runner.run(network_input[None])
    boxes, scores, labels = processing.select_detections(out["boxes"][0], out["scores"][0],
                                                         out["labels"][0].astype(np.int32), info, SCORE_THRESHOLD)
    assert len(scores) > 0 and len(detections) == len(scores)
    np.testing.assert_allclose(np.sort(detections.scores), np.sort(scores), atol=1e-5)
    assert sorted(detections.class_names) == sorted(CLASS_NAMES[int(label)] for label in labels)


def test_exporter_picks_the_cpu_runtime_from_its_artifacts(models, tmp_path):
    """export/build_engine.py --triton-cpu-runtime/--triton-cpu-precision: what the cpu repository is built from."""
    from sdconet.deploy.exporter import ExportError, ExportOptions, Exporter
    from sdconet.deploy.report import ExportReport

    def pick(artifacts: dict[str, Path], **options) -> tuple:
        exporter = Exporter(ExportOptions(out=str(tmp_path), triton_repo=str(tmp_path / "repo"), **options))
        exporter.report = ExportReport("tiny")
        for kind, path in artifacts.items():
            exporter.report.add_artifact(kind, path)
        return exporter.triton_cpu_model()

    both = {"onnx": models["pure"], "onnx_plugin": models["plugin"]}
    assert pick(both) == (models["plugin"], "openvino")  # auto: the fused op, where it builds (it does here)
    assert pick({"onnx": models["pure"]}) == (None, "onnxruntime")  # --msda onnx: no plugin-mode ONNX
    assert pick(both, triton_cpu_runtime="onnxruntime") == (None, "onnxruntime")
    assert pick({"onnx": models["pure"]}, triton_cpu_runtime="openvino") == (None, "openvino")
    # int8 serves the --cpu-int8 model of the runtime (OpenVINO's first under auto)
    int8 = both | {"onnx_cpu_int8": models["pure"]}
    assert pick(int8, triton_cpu_precision="int8", cpu_int8=("onnxruntime",)) == (models["pure"], "onnxruntime")
    with pytest.raises(ExportError, match="no openvino INT8 model was written"):
        pick(int8, triton_cpu_precision="int8", triton_cpu_runtime="openvino", cpu_int8=("openvino",))
    with pytest.raises(ExportError, match="int8 serves the CPU quantizer's model: add --cpu-int8 openvino"):
        ExportOptions(triton_repo="r", triton_cpu_precision="int8", triton_cpu_runtime="openvino").validate()
    with pytest.raises(ExportError, match="--triton-cpu-runtime must be one of auto, onnxruntime, openvino"):
        ExportOptions(triton_cpu_runtime="tvm").validate()
