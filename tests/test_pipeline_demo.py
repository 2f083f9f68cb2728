"""The one-command demo, end to end with the smallest settings: every stage runs for real (training, evaluation,
ONNX/INT8 export, a Triton server with client requests, a whole GeoTIFF scene, benchmarks), and the summary's numbers are the ones in the
files the stages wrote."""
import json

import pytest

from sdconet.pipeline.demo import DemoLayout, format_summary, main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from needs import require_modelopt, unavailable
    from sdconet.serve.server import ServerUnavailable, find_tritonserver

    try:
        find_tritonserver()
    except ServerUnavailable as err:
        unavailable(f"no runnable tritonserver: {err}")
    require_modelopt()  # a .venv-modelopt that exists but cannot import ModelOpt fails under CI=true
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        # every stage runs the tiny model: one thread per process (two threads contend on a shared 2-core CPU)
        patch.setenv("OMP_NUM_THREADS", "1")
        code = main(["--out", str(out), "--calib-images", "2", "--gate-count", "4", "--bench-iters", "3",
                     "--scene-size", "256", "--",
                     "--epochs", "1", "data.synthetic.num_images=10", "data.synthetic.image_size=128",
                     f"data.cache_dir={out / 'cache'}"])
    assert code == 0
    return DemoLayout(out)


def test_summary_numbers_come_from_stage_files(demo_run, capsys):
    layout = demo_run
    summary = json.loads(layout.summary_json.read_text())
    # every figure is checked against the stage file that produced it, read here independently of collect_summary
    evaluation = json.loads(layout.eval_report.read_text())
    assert summary["evaluation"] == evaluation and summary["evaluation"]["AP50"] == evaluation["AP50"]
    history = json.loads(layout.metrics.read_text())
    assert summary["training"]["epochs"] == len(history) == 1 and summary["training"]["last"] == history[-1]
    report = json.loads(layout.export_report.read_text())
    assert set(summary["export"]["parity"]) == set(report["parity"])
    assert {k: v["max_box_error_px"] for k, v in summary["export"]["parity"].items()} == \
        {k: v["max_box_error_px"] for k, v in report["parity"].items()}
    assert summary["export"]["accuracy"] == report["accuracy"] and report["accuracy"]
    assert summary["export"]["calibration"] == report["calibration"]
    served = [json.loads(p.read_text()) for p in sorted(layout.detections.glob("*.json"))
              if p.name != "failures.json"]
    assert summary["serving"]["images"] == len(served)
    assert summary["serving"]["detections"] == sum(d.get("num_detections", 0) for d in served)
    assert all(p["passed"] for p in summary["export"]["parity"].values())
    assert summary["export"]["int8"]["ap_drop_points"] == report["int8"]["ap_drop_points"]
    latency_file = json.loads(layout.latency_json.read_text())
    latency = latency_file["rows"]
    assert {"command", "commit", "dirty", "created", "versions", "cpu"} <= set(latency_file["provenance"])
    assert latency_file["provenance"]["cpu"]["model"]
    assert [r["p50_ms"] for r in summary["latency"]] == [r["p50_ms"] for r in latency]
    assert {r["backend"] for r in latency} == {"torch", "onnxruntime", "openvino", "triton"}
    assert all(r["status"] == "ok" for r in latency)
    assert summary["serving"]["images"] >= 1
    scene_summary = json.loads(layout.scene_summary.read_text())
    assert summary["scene"]["tiles"] == scene_summary["scenes"][0]["tiles"] >= 1
    assert summary["scene"]["metrics"] == scene_summary["metrics"] and "AP50" in scene_summary["metrics"]
    assert (layout.scene_detections / "scene.geojson").is_file()
    assert summary["pictures"]["latency_chart"] and summary["pictures"]["training_grids"]
    text = format_summary(summary)
    assert f"AP50 {evaluation['AP50']:.3f}" in text and "INT8 Q/DQ" in text and "| triton |" in text


def test_rerun_skips_finished_stages(demo_run, capsys):
    code = main(["--out", str(demo_run.work)])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("[skip]") == 7 and "[run ]" not in err
