"""The served model and the ONE real Triton server of a test run, shared by every serving test module.

``tests/conftest.py`` imports the fixtures below, so they are session-scoped across ``test_serving.py``,
``test_serving_scene.py`` and ``test_serving_soak.py``: one ONNX export, one repository, one bundled
``tritonserver`` (on free loopback ports, the ``cpu`` deployment), always stopped at the end. Where no tritonserver
can run (none installed, no stub for this Python, no shared libpython) the server tests skip with the reason (under
``CI=true`` they fail: ``make setup`` installs nvidia-pytriton, which bundles the server).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest

CLASS_NAMES = ["airplane", "ship", "storage tank", "vehicle", "bridge", "harbor"]  # tiny: 6 classes
IMGSZ = 128  # LR engine size of the served tiny model
MAX_BATCH = 8
SCORE_THRESHOLD = 0.02  # the random-init tiny model scores ~0.01-0.05
MAX_IMAGE_PIXELS = 500 * 500  # small, so the over-limit request is cheap to send
MAX_SCENE_PIXELS = 640 * 640  # sdconet_scene's pixel limit in the shared repository
SCENE_MAX_TILES = 30  # and its tile limit (a 600x600 scene needs 36 tiles of 128 px at the default overlap, 25)


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """[H, W, 3] uint8: smooth background + bright rectangles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = 80 + 50 * np.sin(xx / 9.0 + seed)[..., None] * np.cos(yy / 13.0)[..., None] + rng.normal(0, 8, (
        height, width, 3))
    for _ in range(6):
        y, x = rng.integers(0, height - 12), rng.integers(0, width - 12)
        image[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12)] = rng.integers(160, 256, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def require_server(repo: Path) -> None:
    """Skip (with the reason) where no tritonserver can run, fail under CI=true (nvidia-pytriton, installed by
    ``make setup``, bundles one); a broken repository or environment always fails."""
    from needs import unavailable
    from sdconet.serve.server import ServerUnavailable, TritonServer

    try:
        TritonServer(repo).preflight()
    except ServerUnavailable as err:
        unavailable(f"no runnable tritonserver here: {err}")


@pytest.fixture(scope="session")
def detector_onnx(tmp_path_factory) -> Path:
    """The real tiny SDCoNet inference graph (random init, seeded), exported as the deploy pipeline does: pure-ONNX
    MSDA, dynamic batch, onnxsim, saliency output included. The single place to swap the served model."""
    import torch
    from sdconet.config import load_config
    from sdconet.engine.inference_graph import build_inference_graph
    from sdconet.deploy.onnx_export import check_model, export_module, save_model, simplify

    torch.manual_seed(0)
    with warnings.catch_warnings():  # tracer notes about the model's static shapes belong to the export tests
        warnings.simplefilter("ignore")
        graph = build_inference_graph(load_config("tiny"), None, msda_impl="gather", with_saliency=True)
        model = export_module(graph, torch.rand(1, 3, IMGSZ, IMGSZ), input_name="images",
                              output_names=graph.output_names)
        path = save_model(simplify(model), tmp_path_factory.mktemp("onnx") / "sdconet_tiny.onnx")
    check_model(path)
    return path


@pytest.fixture(scope="session")
def cpu_repo(tmp_path_factory, detector_onnx) -> Path:
    from sdconet.serve.triton_repo import RepositoryOptions, build_repository

    return build_repository(tmp_path_factory.mktemp("serving") / "repo_cpu", onnx_path=detector_onnx, backend="cpu",
                            imgsz=IMGSZ, max_batch=MAX_BATCH, class_names=CLASS_NAMES,
                            score_threshold=SCORE_THRESHOLD,
                            options=RepositoryOptions(max_image_pixels=MAX_IMAGE_PIXELS, cpu_threads=1,
                                                      max_scene_pixels=MAX_SCENE_PIXELS,
                                                      scene_max_tiles=SCENE_MAX_TILES))


@pytest.fixture(scope="session")
def server(cpu_repo, tmp_path_factory):
    """The shared server. A test that kills a stub must leave it healed (``server.heal()``)."""
    from sdconet.serve.server import TritonServer, process_group_members

    require_server(cpu_repo)
    log_file = tmp_path_factory.mktemp("server_log") / "tritonserver.log"
    # port 0: distinct free ports picked at start, picked again if another process takes one first
    instance = TritonServer(cpu_repo, http_port=0, grpc_port=0, metrics_port=0, log_file=log_file)
    with instance:
        yield instance
    assert not process_group_members(instance.process.pid), "server processes left behind"
