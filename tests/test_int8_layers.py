"""INT8 bookkeeping (issue 21): MAC counts and the INT8 share of a quantized graph, names and layer groups of the
exported compute nodes, --int8-exclude reaching the quantizers, --calib-dir, and the Triton repository refusing a
model whose accuracy gate failed."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdconet.deploy import layer_groups as lg
from sdconet.deploy.cpu_quantize import quantize_onnxruntime_int8
from sdconet.deploy.exporter import ExportError, ExportOptions
from sdconet.deploy.quantize import calibration_images_from_dir

SIDE = 8
# hand-counted MACs of _small_graph: Conv 4 out ch x 8 x 8 px x (3 in ch x 3 x 3); MatMul 64 x 5 outputs x 4;
# Gemm 64 x 6 outputs x 5
CONV_MACS, MATMUL_MACS, GEMM_MACS = 4 * 8 * 8 * 27, 64 * 5 * 4, 64 * 6 * 5


def _small_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "model.conv.weight"),
             numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "model.proj.weight"),
             numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "model.head.weight"),
             numpy_helper.from_array(np.array([1, 4, 64], np.int64), "shape3"),
             numpy_helper.from_array(np.array([64, 5], np.int64), "shape2")]
    nodes = [helper.make_node("Conv", ["images", "model.conv.weight"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="/conv/Relu"),
             helper.make_node("Reshape", ["r", "shape3"], ["flat"], name="/Reshape"),
             helper.make_node("Transpose", ["flat"], ["tokens"], name="/Transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["tokens", "model.proj.weight"], ["p"], name="/proj/MatMul"),
             helper.make_node("Reshape", ["p", "shape2"], ["p2"], name="/Reshape_1"),
             # an onnxsim-style unscoped Gemm: name_compute_nodes names it after its weight's module
             helper.make_node("Gemm", ["p2", "model.head.weight"], ["out"], name="Gemm_7", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                             [1, 3, SIDE, SIDE])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_macs_are_counted_per_node_and_unscoped_gemms_get_their_module_name():
    model = _small_graph()
    assert lg.name_compute_nodes(model) == 1
    names = [n.name for n in model.graph.node if n.op_type in lg.COMPUTE_OPS]
    assert names == ["/conv/Conv", "/proj/MatMul", "model.head/Gemm"]
    assert lg.compute_macs(model) == {"/conv/Conv": CONV_MACS, "/proj/MatMul": MATMUL_MACS,
                                      "model.head/Gemm": GEMM_MACS}
    assert lg.node_groups(names, (("convs", r".*conv.*"), ("heads", r"model\.head/.*"))) == {
        "convs": ["/conv/Conv"], "heads": ["model.head/Gemm"]}
    assert lg.matching_nodes(model, [r".*proj.*"], lg.COMPUTE_OPS) == ["/proj/MatMul"]
    with pytest.raises(ValueError, match=r"--int8-exclude '\(' is not a valid regular expression"):
        lg.check_patterns(["("])


def test_int8_share_counts_only_quantized_macs_and_exclusions_reach_onnxruntime(tmp_path):
    source = tmp_path / "small.onnx"
    onnx.save(_small_graph(), str(source))
    calibration = np.random.default_rng(1).random((4, 3, SIDE, SIDE), dtype=np.float32)
    everything = quantize_onnxruntime_int8(source, tmp_path / "all.onnx", calibration, preprocess=False)
    share = lg.int8_mac_fraction(tmp_path / "all.onnx")
    total = CONV_MACS + MATMUL_MACS + GEMM_MACS
    assert share["total_macs"] == total and share["compute_nodes"] == 3
    assert share["int8_macs"] == total and share["int8_mac_fraction"] == 1.0 and everything["exclude"] == []

    summary = quantize_onnxruntime_int8(source, tmp_path / "excl.onnx", calibration, preprocess=False,
                                        exclude=[r"/proj/.*"])
    assert summary["excluded_compute_nodes"] == ["/proj/MatMul"]
    share = lg.int8_mac_fraction(tmp_path / "excl.onnx")
    assert share["int8_macs"] == CONV_MACS + GEMM_MACS and share["int8_nodes"] == 2
    assert share["int8_mac_fraction"] == round((CONV_MACS + GEMM_MACS) / total, 4)
    # the float graph runs nothing in INT8
    assert lg.int8_mac_fraction(source)["int8_mac_fraction"] == 0.0


@pytest.fixture(scope="module")
def study_export(tiny_random_checkpoint, tmp_path_factory):
    """The tiny model's pure ONNX as the study names it (``<work>/study.onnx``): one export for both tests."""
    from sdconet.deploy.exporter import run_export

    work = tmp_path_factory.mktemp("int8_study")
    result = run_export(ExportOptions(checkpoint=str(tiny_random_checkpoint), out=str(work), imgsz=64,
                                      max_batch=2, msda="onnx", name="study"))
    assert result.exit_code == 0
    return work


def test_the_exported_detector_has_every_compute_node_named_and_grouped(study_export):
    model = onnx.load(str(study_export / "study.onnx"))
    names = [n.name for n in model.graph.node if n.op_type in lg.COMPUTE_OPS]
    assert names and all("/" in name for name in names), [n for n in names if "/" not in n]
    groups = lg.node_groups(names)
    grouped = {name for members in groups.values() for name in members}
    macs = lg.compute_macs(model)
    # the study's groups cover the graph: the few ungrouped nodes (box/scale glue) carry a sliver of the MACs
    assert sum(v for k, v in macs.items() if k in grouped) / sum(macs.values()) > 0.95, sorted(set(names) - grouped)
    for expected in ("swin.patch_embed", "swin.stage0", "neck", "encoder.layer0.value_proj",
                     "encoder.layer0.sampling_offsets", "encoder.layer0.attention_weights",
                     "encoder.layer0.output_proj", "encoder.layer0.ffn", "proposal_head", "decoder.layer0.ffn",
                     "decoder.box_heads"):
        # (not decoder.class_heads: untrained, they are initialised alike, and the export keeps one copy of equal
        # initializers, named after the proposal head's; a trained model's differ)
        assert expected in groups, (expected, sorted(groups))


def test_calibration_from_a_folder_and_named_errors(tmp_path):
    from PIL import Image

    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / "b.png")  # below the side
    (folder / "notes.txt").write_text("not an image")
    images = calibration_images_from_dir(folder, count=5, imgsz=32)
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    # round-robin over the files: a.png gives the 1st, 3rd and 5th inputs, crops of its pixels
    a = np.asarray(Image.open(folder / "a.png"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    crop = images[0]
    found = any(np.allclose(a[:, y:y + 32, x:x + 32], crop) for y in range(9) for x in range(19))
    assert found
    with pytest.raises(ValueError, match="--calib-dir .*missing: not a directory"):
        calibration_images_from_dir(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="--calib-dir .*empty: no image files"):
        calibration_images_from_dir(empty)
    (folder / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"--calib-dir: cannot read .*c\.png"):
        calibration_images_from_dir(folder, count=3, imgsz=16)


def test_export_options_name_the_bad_int8_value(tmp_path):
    with pytest.raises(ExportError, match="--calib-method must be entropy or max, got 'kl'"):
        ExportOptions(calib_method="kl").validate()
    with pytest.raises(ExportError, match="--int8-exclude '\\[' is not a valid regular expression"):
        ExportOptions(int8_exclude=("[",)).validate()
    with pytest.raises(ExportError, match="--calib-dir .*nowhere: not a directory"):
        ExportOptions(calib_dir=str(tmp_path / "nowhere")).validate()
    with pytest.raises(ExportError, match="--gate-images and --gate-ann go together"):
        ExportOptions(gate_images=str(tmp_path)).validate()


def test_repository_refuses_a_failed_gate_unless_allowed_and_records_it(tmp_path, detector_onnx):
    from serving_fixtures import IMGSZ
    from sdconet.serve.triton_repo import MANIFEST_NAME, RepositoryError, build_repository, load_manifest

    failed = {"key": "onnxruntime_int8", "passed": False, "reasons": ["agreement 0.400 < 0.95"],
              "ap_drop_points": 2.5}
    common = dict(onnx_path=detector_onnx, backend="onnx", imgsz=IMGSZ, max_batch=2, class_names=["a", "b"])
    with pytest.raises(RepositoryError, match=re.escape("accuracy gate (onnxruntime_int8) failed: agreement 0.400 "
                                                        "< 0.95") + ".*--allow-failed-gate"):
        build_repository(tmp_path / "refused", gate=failed, **common)
    assert not (tmp_path / "refused").exists()  # nothing half-written
    repo = build_repository(tmp_path / "allowed", gate=failed, allow_failed_gate=True, **common)
    recorded = load_manifest(repo)["accuracy_gate"]
    assert recorded["passed"] is False and recorded["allowed_failed"] is True and recorded["ap_drop_points"] == 2.5
    passed = build_repository(tmp_path / "ok", gate=dict(failed, passed=True, reasons=[]), **common)
    assert load_manifest(passed)["accuracy_gate"]["allowed_failed"] is False
    assert json.loads((passed / MANIFEST_NAME).read_text())["accuracy_gate"]["key"] == "onnxruntime_int8"


def test_the_study_tool_writes_its_table_and_the_group_variants_hold_what_they_say(tiny_random_checkpoint,
                                                                                     study_export, tmp_path):
    from sdconet.deploy import int8_study

    out = tmp_path / "int8_study"
    assert int8_study.main(["--checkpoint", str(tiny_random_checkpoint), "--images", "4", "--imgsz", "64",
                            "--calib-images", "4", "--groups", "neck", "encoder.layer0.value_proj",
                            "--error-images", "2", "--work-dir", str(study_export), "--out", str(out),
                            "--float-set", "stem=swin.patch_embed,neck"]) == 0
    study = json.loads(out.with_suffix(".json").read_text())
    assert {"rows", "groups", "activation_error", "provenance"} <= set(study)
    assert study["gate_images"] == 4 and study["calibration_images"] == 4
    assert study["provenance"]["command"] and "isa" in study["provenance"]["cpu"]
    assert [g["group"] for g in study["groups"]] == ["neck", "encoder.layer0.value_proj"]
    full = study["all_int8"]["int8_mac_fraction"]
    for row in study["groups"]:
        assert {"group", "AP", "AP75", "agreement", "mac_share"} <= set(row)
        # "only this group in INT8" runs exactly the group's MACs in INT8; "all but this group" the rest
        assert row["int8_only"]["int8_mac_fraction"] == pytest.approx(row["mac_share"], abs=2e-4)
        assert row["float_only"]["int8_mac_fraction"] == pytest.approx(full - row["mac_share"], abs=2e-4)
    assert "| neck |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    (candidate,) = study["exclusion_sets"]
    assert candidate["name"] == "stem" and candidate["float_groups"] == ["swin.patch_embed", "neck"]
    assert candidate["kept_nodes"] > 0 and candidate["int8_mac_fraction"] < full


def test_the_default_exclusions_select_exactly_the_groups_the_study_chose(study_export):
    """DEFAULT_INT8_EXCLUDE (node-name regexes, what --int8-exclude replaces) and DEFAULT_INT8_FLOAT_GROUPS (the
    study's group names) must name the same nodes: a renamed module would otherwise quietly quantize a layer the
    study kept in float."""
    from sdconet.deploy.exporter import DEFAULT_INT8_EXCLUDE, DEFAULT_INT8_FLOAT_GROUPS, MSDA_EXCLUDE_PATTERN

    model = onnx.load(str(study_export / "study.onnx"))
    compute = [n.name for n in model.graph.node if n.op_type in lg.COMPUTE_OPS
               and not re.fullmatch(MSDA_EXCLUDE_PATTERN, n.name)]
    chosen = {name for group, members in lg.node_groups(compute).items()
              if any(re.fullmatch(p, group) for p in DEFAULT_INT8_FLOAT_GROUPS) for name in members}
    matched = set(lg.matching_nodes(model, DEFAULT_INT8_EXCLUDE, lg.COMPUTE_OPS)) - set(
        lg.matching_nodes(model, [MSDA_EXCLUDE_PATTERN]))
    assert chosen and matched == chosen, (sorted(matched - chosen)[:5], sorted(chosen - matched)[:5])
    # and the Swin stages 1-3 and the decoder's attention and FFNs stay INT8
    stay_int8 = [n for n in compute if "layers_2" in n or "decoder.layers." in n or "/decoder/layers." in n]
    assert stay_int8 and not any(re.fullmatch(p, n) for p in DEFAULT_INT8_EXCLUDE for n in stay_int8)


def test_study_rows_take_the_qat_row_from_the_qat_report_only():
    """The QAT export's report also has an onnxruntime_int8-qdq gate (against the QAT float twin): it must not
    become a second modelopt-ptq row, and its onnxruntime_int8-qat gate is the modelopt-qat row."""
    from sdconet.deploy.int8_study import path_rows

    def gate(agreement):
        return {"ap_drop_points": 0.1, "agreement": agreement, "int8_mac_fraction": 0.7, "passed": True}

    ptq = {"int8": {"calibration_images": 256},
           "accuracy": {"onnxruntime_int8-qdq": gate(0.97), "onnxruntime_int8": gate(0.96),
                        "openvino_int8": gate(0.98)}}
    qat = {"accuracy": {"onnxruntime_int8-qdq": gate(0.93), "onnxruntime_int8-qat": gate(0.89)}}
    assert [(r["path"], r["agreement"]) for r in path_rows(ptq)] == [
        ("modelopt-ptq", 0.97), ("onnxruntime", 0.96), ("openvino", 0.98)]
    assert [(r["path"], r["agreement"]) for r in path_rows(qat)] == [("modelopt-qat", 0.89)]
    assert path_rows(ptq)[0]["calibration_images"] == 256
