"""benchmarks/latency.py: each CPU backend runs with tiny settings and writes well-formed JSON; unavailable backends
are reported as skipped with the reason; --compare renders the table and a PNG."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdconet.benchmark.report import REQUIRED_KEYS, load_records

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd=ROOT, timeout=600):
    proc = subprocess.run([sys.executable, "benchmarks/latency.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path = out / "tiny.json"
    proc = _run(["--config", "tiny", "--imgsz", "64", "--warmup", "1", "--iters", "3", "--threads", "1",
                 "--backend", "torch", "onnxruntime", "tensorrt", "--precision", "fp32", "fp16", "bf16",
                 "--work-dir", str(out / "work"), "--json", str(json_path)])
    return json_path, load_records(json_path), proc.stdout


def test_cpu_backends_write_wellformed_records(tiny_records):
    _, records, stdout = tiny_records
    assert "| backend | precision |" in stdout
    by_key = {(r["backend"], r["precision"]): r for r in records}
    assert len(records) == 9
    for backend in ("torch", "onnxruntime"):
        record = by_key[(backend, "fp32")]
        assert record["status"] == "ok"
        assert all(k in record for k in REQUIRED_KEYS)
        assert 0 < record["p50_ms"] <= record["p90_ms"] <= record["p99_ms"]
        assert record["throughput"] == pytest.approx(1000.0 / record["mean_ms"])
        assert record["peak_mem_mb"] > 0 and record["imgsz"] == 64 and record["batch"] == 1


def test_unavailable_backends_are_skipped_with_reason(tiny_records):
    _, records, _ = tiny_records
    import torch

    statuses = {(r["backend"], r["precision"]): r["status"] for r in records}
    from sdconet.deploy.tensorrt_build import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason and reason.startswith("tensorrt not importable"):
        assert statuses[("tensorrt", "fp32")] == f"skipped: {reason}"
    if not torch.cuda.is_available():
        assert statuses[("torch", "fp16")] == ("skipped: fp16 autocast needs a CUDA device (CPU autocast runs bf16: "
                                               "use precision bf16)")
    assert statuses[("onnxruntime", "fp16")].startswith("skipped: fp16 ONNX variants are built for TensorRT only")
    assert statuses[("onnxruntime", "bf16")].startswith("skipped:")


def test_torch_bf16_autocast_is_timed_on_cpu_too(tiny_records):
    from sdconet.utils.cpu import has_native_bf16

    _, records, _ = tiny_records
    record = next(r for r in records if (r["backend"], r["precision"]) == ("torch", "bf16"))
    if not has_native_bf16():  # emulated bf16 is not timed: the record says why
        assert record["status"].startswith("skipped:") and "AMX-BF16/AVX512-BF16" in record["status"]
        return
    assert record["status"] == "ok" and record["p50_ms"] > 0
    assert record["msda_impl"] in ("gather", "auto") and "requested_precision" not in record


def test_onnxruntime_record_names_its_provider(tiny_records):
    _, records, _ = tiny_records
    record = next(r for r in records if (r["backend"], r["precision"]) == ("onnxruntime", "fp32"))
    assert record["provider"] == "CPUExecutionProvider" and record["msda"] == "onnx"


def test_one_artifact_is_timed_once_under_its_own_precision(tmp_path, monkeypatch):
    """Bookkeeping only (no engine runs): a runner whose artifact is fp16 whatever precision is asked for, as one
    TensorRT engine is under ``--precision fp32 fp16``."""
    import numpy as np

    from sdconet.benchmark import runners
    from sdconet.config import load_config
    from sdconet.runtime import Runner

    class FixedArtifact(Runner):
        backend = "fixed"

        def __init__(self):
            super().__init__(imgsz=32, class_names=["a"], precision="fp16")

        @classmethod
        def for_benchmark(cls, bench, precision, **options):
            return cls()

        def describe(self):
            return super().describe() | {"engine": "one.plan"}

        def _run(self, images):
            n = images.shape[0]
            return {"boxes": np.zeros((n, 1, 4)), "scores": np.zeros((n, 1)), "labels": np.zeros((n, 1))}

    monkeypatch.setitem(runners.RUNTIME_RUNNERS, "fixed", f"{__name__}:FixedArtifact")
    monkeypatch.setitem(globals(), "FixedArtifact", FixedArtifact)
    ctx = runners.BenchContext(cfg=load_config("tiny"), state_dict=None, imgsz=32, warmup=0, iters=2,
                               work_dir=tmp_path)
    first, second = (runners.run_benchmark(ctx, "fixed", p, 1) for p in ("fp32", "fp16"))
    assert first["status"] == "ok" and first["precision"] == "fp16" and first["requested_precision"] == "fp32"
    assert first["engine"] == "one.plan"
    assert second["status"] == "skipped: the same fixed artifact (fp16) is already timed in the record asked for as " \
                               "fp32/b1"
    assert runners.run_benchmark(ctx, "fixed", "fp16", 2)["status"] == "ok"  # another batch is another record


def test_compare_renders_table_and_png(tiny_records, tmp_path):
    json_path, records, _ = tiny_records
    other = tmp_path / "other.json"
    slower = [dict(r, p50_ms=(r["p50_ms"] or 0) * 2) for r in records]
    other.write_text(json.dumps(slower))
    chart = tmp_path / "chart.png"
    proc = _run(["--compare", str(json_path), str(other), "--chart", str(chart)])
    assert "| configuration | tiny p50 ms | other p50 ms |" in proc.stdout
    assert "torch/fp32/b1" in proc.stdout
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_rejects_malformed_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"backend": "torch"}]))
    with pytest.raises(ValueError, match="record 0 lacks"):
        load_records(bad)


def test_overrides_with_a_checkpoint_are_refused(tmp_path, capsys):
    from sdconet.benchmark.cli import main

    code = main(["--checkpoint", str(tmp_path / "run"), "model.detector.num_queries=10"])
    assert code == 2
    assert "model.detector.num_queries=10" in capsys.readouterr().err
