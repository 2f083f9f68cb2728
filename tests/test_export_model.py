"""Tiny SDCoNet through the exporter: both MSDA modes, checker, parity with PyTorch, report, INT8 Q/DQ + AP, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sdconet.config import load_config
from sdconet.deploy import msda_plugin
from sdconet.deploy.exporter import MSDA_EXCLUDE_PATTERN, ExportOptions, run_export
from sdconet.deploy.onnx_export import check_model
from sdconet.deploy.op_support import check_tensorrt_support
from sdconet.deploy.report import BOX_TOLERANCE, SCORE_TOLERANCE
from sdconet.deploy.tensorrt_build import tensorrt_unavailable_reason
from sdconet.engine.checkpoint import save_model_weights
from sdconet.models import build_model

REPO = Path(__file__).resolve().parents[1]
IMGSZ = 64  # LR side of the 128 px synthetic images below: the export claims do not depend on the size
REPORT_KEYS = {"schema_version", "name", "created", "checkpoint", "options", "environment", "artifacts", "graphs",
               "parity", "int8", "calibration", "engine", "accuracy", "triton", "skipped", "provenance"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many tiny ops (conftest.py)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_ckpt")
    cfg = load_config("tiny", ["data.synthetic.num_images=8", "data.synthetic.val_fraction=0.25",
                               f"data.synthetic.image_size={2 * IMGSZ}", f"data.cache_dir={root / 'cache'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    names = [f"class_{i}" for i in range(cfg.model.detector.num_classes)]
    return save_model_weights(model, cfg, root / "run" / "checkpoints" / "best.safetensors",
                              {"category_names": names})


@pytest.fixture(scope="module")
def export(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    options = ExportOptions(checkpoint=str(checkpoint.parent.parent), out=str(out), imgsz=IMGSZ, max_batch=4,
                            msda="plugin", with_saliency=True, require_engine=True, name="tiny")
    return run_export(options), out


def test_both_modes_written_and_checked(export):
    result, out = export
    for filename in ("tiny.onnx", "tiny.plugin.onnx"):
        model = onnx.load(str(out / filename))
        check_model(model)
        assert check_tensorrt_support(model).ok
        assert [i.name for i in model.graph.input] == ["images"]
        assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels", "saliency"]
        batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param == "batch"  # dynamic batch
        assert model.graph.output[2].type.tensor_type.elem_type == onnx.TensorProto.INT32
        assert max(o.version for o in model.opset_import if o.domain == "") >= 17
    pure, plugin = (onnx.load(str(out / f)) for f in ("tiny.onnx", "tiny.plugin.onnx"))
    assert not [n for n in pure.graph.node if n.domain]
    tiny = load_config("tiny").model.detector
    assert sum(n.op_type == msda_plugin.TRT_PLUGIN_OP_TYPE for n in plugin.graph.node) == (
        tiny.num_encoder_layers + tiny.num_decoder_layers)


def test_parity_with_pytorch_in_both_modes(export):
    result, _ = export
    for kind in ("onnx", "onnx_plugin"):
        figures = result.report["parity"][kind]
        assert figures["passed"], figures
        assert figures["max_box_error_rel"] <= BOX_TOLERANCE and figures["max_score_error"] <= SCORE_TOLERANCE
        assert figures["top_labels_match"]


def test_onnx_matches_pytorch_on_another_batch_size(export, checkpoint):
    """Independent of the exporter's own parity step: batch 3 (the export traced batch 2) on both graphs."""
    _, out = export
    from sdconet.engine.inference_graph import load_inference_graph

    graph, _, _ = load_inference_graph(checkpoint, msda_impl="gather", with_saliency=True)
    images = torch.rand(3, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        boxes, scores, labels, saliency = (t.numpy() for t in graph(images))
    for filename in ("tiny.onnx", "tiny.plugin.onnx"):
        o_boxes, o_scores, o_labels, o_saliency = msda_plugin.ort_session(out / filename).run(
            None, {"images": images.numpy()})
        assert np.abs(o_boxes - boxes).max() <= BOX_TOLERANCE * IMGSZ
        assert np.abs(o_scores - scores).max() <= SCORE_TOLERANCE
        np.testing.assert_array_equal(o_labels[:, :10], labels[:, :10])
        np.testing.assert_allclose(o_saliency, saliency, atol=1e-5)


def test_report_and_skips(export):
    result, out = export
    data = json.loads((out / "tiny.report.json").read_text())
    assert set(data) == REPORT_KEYS
    assert (out / "tiny.report.md").read_text().startswith("# Export report: tiny")
    kinds = {a["kind"] for a in data["artifacts"]}
    assert {"onnx", "onnx_plugin"} <= kinds
    for artifact in data["artifacts"]:
        assert Path(artifact["path"]).stat().st_size == artifact["bytes"] and len(artifact["sha256"]) == 64
    reason = tensorrt_unavailable_reason()
    if reason:  # no engine here: the reason is recorded and --require-engine makes the run fail
        assert {"step": "engine", "reason": reason} in data["skipped"]
        assert data["engine"] is None and result.exit_code == 1
    else:
        engine = Path(data["engine"]["path"])
        meta = json.loads(engine.with_name(engine.name + ".json").read_text())
        assert {"tensorrt_version", "gpu", "precision", "input_shapes", "onnx_sha256"} <= set(meta)
        assert result.exit_code == 0


def test_onnx_detections_in_annotation_pixels_match_pytorch_evaluation(export, checkpoint):
    """The AP path (ONNX Runtime -> COCO detections) gives the trainer's detections for the same image."""
    from sdconet.data import build_dataset
    from sdconet.deploy.quantize import predict_dataset
    from sdconet.engine.checkpoint import load_model_weights
    from sdconet.engine.metrics import outputs_to_detections

    _, out = export
    cfg, state_dict, _ = load_model_weights(checkpoint)
    model = build_model(cfg.model).eval()
    model.load_state_dict(state_dict)
    val_set = build_dataset(cfg.data, "val", cfg.model.upscale, train=False)
    item = val_set[0]
    assert tuple(item["image_lr"].shape[-2:]) == (IMGSZ, IMGSZ)
    with torch.no_grad():
        outputs = model(item["image_lr"][None], run_sr=False)
    expected = outputs_to_detections(outputs, [item["target"]], val_set.label_to_category_id, top_k=5)
    detections, image_ids = predict_dataset(out / "tiny.onnx", val_set, IMGSZ, limit=1)
    assert image_ids == [int(item["target"]["image_id"])]
    got = sorted(detections, key=lambda d: -d["score"])[:5]
    for want, have in zip(expected, got):
        assert have["category_id"] == want["category_id"] and have["image_id"] == want["image_id"]
        assert have["score"] == pytest.approx(want["score"], abs=1e-4)
        np.testing.assert_allclose(have["bbox"], want["bbox"], atol=1e-2)


def test_int8_qdq_runs_on_cpu_and_ap_is_compared(export, checkpoint, tmp_path):
    from needs import require_modelopt
    from sdconet.deploy import quantize

    require_modelopt()  # a .venv-modelopt that exists but cannot import ModelOpt fails under CI=true
    _, out = export
    from sdconet.data import build_dataset
    from sdconet.engine.checkpoint import read_checkpoint_metadata

    cfg, _ = read_checkpoint_metadata(checkpoint)
    train_set = build_dataset(cfg.data, "train", cfg.model.upscale, train=False)
    val_set = build_dataset(cfg.data, "val", cfg.model.upscale, train=False)
    calib = quantize.calibration_images(train_set, 2, IMGSZ)
    assert calib.shape == (2, 3, IMGSZ, IMGSZ) and calib.dtype == np.float32
    calib_path = quantize.write_calibration_data(calib, tmp_path / "calib.npz")
    int8_path = tmp_path / "tiny.int8.onnx"
    summary = quantize.quantize_int8(out / "tiny.onnx", int8_path, calib_path, exclude_nodes=[MSDA_EXCLUDE_PATTERN])
    assert summary["quantize_linear"] > 0 and summary["dequantize_linear"] > 0
    int8_model = onnx.load(str(int8_path))
    check_model(int8_model)
    assert check_tensorrt_support(int8_model).ok
    assert not any(n.name.startswith(msda_plugin.MSDA_SUBGRAPH_PREFIX) and n.op_type == "QuantizeLinear"
                   for n in int8_model.graph.node)

    # plugin nodes swapped in after calibration compute exactly what the pure INT8 graph computes
    swapped = msda_plugin.onnx_msda_to_plugin_nodes(int8_model, onnx.load(str(out / "tiny.plugin.onnx")),
                                                    [msda_plugin.TRT_PLUGIN_OP_TYPE])
    check_model(swapped)
    pure_out = msda_plugin.ort_session(int8_model).run(None, {"images": calib})
    plugin_out = msda_plugin.ort_session(swapped).run(None, {"images": calib})
    for a, b in zip(pure_out, plugin_out):
        np.testing.assert_allclose(a, b, atol=1e-4)

    comparison = quantize.compare_int8_ap(out / "tiny.onnx", int8_path, val_set, IMGSZ)
    assert comparison["images"] == len(val_set) >= 1
    for key in ("fp32", "int8"):
        assert set(comparison[key]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert -1.0 <= comparison[key]["AP"] <= 1.0
    assert comparison["ap_drop_points"] == pytest.approx((comparison["fp32"]["AP"] - comparison["int8"]["AP"]) * 100,
                                                         abs=1e-3)


def test_cli_help_and_bad_checkpoint(tmp_path):
    script = REPO / "export" / "build_engine.py"
    help_run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert help_run.returncode == 0 and "--msda" in help_run.stdout and "--require-engine" in help_run.stdout
    missing = tmp_path / "nope.safetensors"
    bad = subprocess.run([sys.executable, str(script), "--checkpoint", str(missing), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and str(missing) in bad.stderr


def test_sdconet_plugin_engine_matches_the_gather_form(checkpoint, tmp_path):
    """``--msda sdconet`` end to end: our plugin node exported, its engine built (aot_impl runs, so a TypeError
    there makes the build return None) and run, against the pure-ONNX gather graph of the same checkpoint."""
    reason = tensorrt_unavailable_reason() or (None if torch.cuda.is_available() else "no CUDA device")
    if reason is not None:
        pytest.skip(f"the --msda sdconet engine build needs TensorRT (>= 10.9, tensorrt.plugin) and a GPU: {reason}")
    from sdconet.runtime.tensorrt_runner import TensorRTRunner

    options = ExportOptions(checkpoint=str(checkpoint.parent.parent), out=str(tmp_path), imgsz=IMGSZ, max_batch=4,
                            msda="sdconet", with_saliency=True, require_engine=True, name="tiny_sdconet")
    result = run_export(options)
    engine_path = Path(result.report.engine["path"])
    assert engine_path.is_file() and result.report.engine["msda"] == "sdconet"
    images = torch.rand(3, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(11)).numpy()
    with TensorRTRunner(engine_path) as runner:
        outputs = runner.run(images)
    g_boxes, g_scores, g_labels, g_saliency = msda_plugin.ort_session(tmp_path / "tiny_sdconet.onnx").run(
        None, {"images": images})
    assert np.abs(outputs["boxes"] - g_boxes).max() <= BOX_TOLERANCE * IMGSZ
    assert np.abs(outputs["scores"] - g_scores).max() <= SCORE_TOLERANCE
    np.testing.assert_array_equal(outputs["labels"][:, :10], g_labels[:, :10])
    np.testing.assert_allclose(outputs["saliency"], g_saliency, atol=1e-4)
