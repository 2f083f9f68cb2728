"""Every writer of a ``benchmarks/results/`` JSON stamps one ``provenance`` object (sdconet.utils.provenance), each
run here at a tiny size or through its JSON-writing function; the latency reader takes the new ``{rows,
provenance}`` document and the bare record lists of the files committed before it."""
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdconet.utils.provenance import ISA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE_KEYS = {"command", "commit", "dirty", "created", "versions", "cpu"}


def assert_provenance(record, script=None):
    """The fields of a provenance object, with sane values (this checkout, now, this CPU)."""
    assert PROVENANCE_KEYS <= set(record), record
    assert isinstance(record["command"], list) and record["command"]
    if script is not None:
        assert any(str(part).endswith(script) for part in record["command"]), record["command"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert record["commit"] == head and isinstance(record["dirty"], bool)
    created = dt.datetime.fromisoformat(record["created"])
    assert created.tzinfo is not None and abs(dt.datetime.now(dt.timezone.utc) - created) < dt.timedelta(hours=1)
    assert record["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["versions"]["torch"]
    assert record["cpu"]["model"] and set(record["cpu"]["isa"]) <= set(ISA_FLAGS)
    assert "kernel_path" in record["cpu"]


def _latency_record(**extra):
    from sdconet.benchmark.report import REQUIRED_KEYS

    record = {k: None for k in REQUIRED_KEYS}
    return record | {"backend": "torch", "precision": "fp32", "batch": 1, "imgsz": 64, "p50_ms": 2.0,
                     "status": "ok"} | extra


# ---- 1. benchmarks/latency.py -----------------------------------------------------------------------------------
def test_latency_json_is_rows_and_provenance(tmp_path):
    from sdconet.benchmark.report import load_results, write_records

    path = tmp_path / "run.json"
    write_records([_latency_record()], path)
    document = json.loads(path.read_text())
    assert set(document) == {"rows", "provenance"} and document["rows"][0]["p50_ms"] == 2.0
    assert_provenance(document["provenance"])
    records, prov = load_results(path)
    assert records == document["rows"] and prov == document["provenance"]


def test_latency_reader_takes_old_lists_and_new_documents(tmp_path):
    from sdconet.benchmark.report import load_records, load_results, rows_of

    old = tmp_path / "old.json"
    old.write_text(json.dumps([_latency_record()]))
    assert load_results(old) == ([_latency_record()], None)
    assert load_records(old) == [_latency_record()]
    committed = ROOT / "benchmarks" / "results" / "cpu_paper_256.json"  # either format, whichever is committed
    assert load_records(committed) and all(r["backend"] for r in load_records(committed))
    assert rows_of({"rows": [], "provenance": {}}) == [] and rows_of([]) == []
    with pytest.raises(ValueError, match="expected"):
        rows_of({"records": []}, "x.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"backend": "torch"}], "provenance": {}}))
    with pytest.raises(ValueError, match="record 0 lacks"):
        load_records(bad)


def test_compare_reads_both_formats_and_names_the_sources(tmp_path, capsys):
    from sdconet.benchmark.cli import main
    from sdconet.benchmark.report import write_records

    new, old = tmp_path / "new.json", tmp_path / "old.json"
    write_records([_latency_record()], new)
    old.write_text(json.dumps([_latency_record(p50_ms=4.0)]))
    assert main(["--compare", str(new), str(old), "--chart", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| torch/fp32/b1 | 2.00 | 4.00 |" in out
    assert "old: no provenance" in out
    assert next(line for line in out.splitlines() if line.startswith("new: ")).count("commit") == 1


def test_demo_summary_reads_both_latency_formats(tmp_path):
    from sdconet.benchmark.report import write_records
    from sdconet.pipeline.demo import DemoLayout, collect_summary

    layout = DemoLayout(tmp_path)
    write_records([_latency_record()], layout.latency_json)
    assert [r["p50_ms"] for r in collect_summary(layout)["latency"]] == [2.0]
    layout.latency_json.write_text(json.dumps([_latency_record(p50_ms=3.0)]))
    assert [r["p50_ms"] for r in collect_summary(layout)["latency"]] == [3.0]


# ---- 2. benchmarks/flops.py (sdconet.models.summary) -------------------------------------------------------------
def test_flops_json_carries_provenance(tmp_path):
    from sdconet.models.summary import main

    path = tmp_path / "cost.json"
    cost = main(["--config", "tiny", "--imgsz", "64", "--no-ablations", "--no-serial", "--json", str(path)])
    document = json.loads(path.read_text())
    assert_provenance(document["provenance"])
    assert {k: v for k, v in document.items() if k != "provenance"} == json.loads(json.dumps(cost))
    assert "provenance" not in cost  # the returned dict stays the cost figures


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"provenance_test_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- 3. benchmarks/msda_op.py --------------------------------------------------------------------------------------
def test_msda_op_json_carries_provenance(tmp_path):
    bench = _load_script("msda_op")
    path = tmp_path / "msda.json"
    assert bench.main(["--lr", "64", "--queries", "8", "--iters", "1", "--warmup", "0", "--threads", "1",
                       "--forms", "grid_sample", "gather", "--json", str(path)]) == 0
    document = json.loads(path.read_text())
    assert [r["status"] for r in document["rows"]] == ["ok", "ok"]
    assert_provenance(document["provenance"])


# ---- 4. benchmarks/gpu_check.py ------------------------------------------------------------------------------------
def test_gpu_check_report_and_plan_carry_provenance(tmp_path):
    import torch

    gpu_check = _load_script("gpu_check")
    args = gpu_check.parse_args(["--json", str(tmp_path / "r.json")])
    report = gpu_check.Report(args.json, args)
    report.save()
    assert_provenance(json.loads(args.json.read_text())["provenance"])
    if not torch.cuda.is_available():  # with CUDA main() would run the whole check
        plan = tmp_path / "plan.json"
        assert gpu_check.main(["--json", str(plan)]) == 0
        assert_provenance(json.loads(plan.read_text())["provenance"])


_BARE_GPU_MACHINE = r"""
import sys
from importlib.machinery import PathFinder
BLOCKED = ("onnx", "onnxruntime", "onnxsim", "pycocotools", "scipy", "tensorrt", "tritonclient", "openvino",
           "rasterio", "cv2", "yaml")

class Hiding(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in BLOCKED else PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [Hiding if finder is PathFinder else finder for finder in sys.meta_path]
import importlib.util, json
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
record = gpu_check.run_provenance()
assert "error" not in record, record
print("LEAKED", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m == "torch"))
"""


def test_gpu_check_provenance_needs_nothing_a_bare_gpu_machine_lacks(tmp_path):
    """sdconet.utils.provenance is stdlib only: no onnx, openvino, PyYAML, not even torch (versions come from the
    installed metadata), and outside a git checkout commit/dirty are null rather than an error."""
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", _BARE_GPU_MACHINE, str(ROOT / "benchmarks" / "gpu_check.py")],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LEAKED []" in result.stdout


def test_provenance_outside_a_git_checkout_is_null_not_an_error(monkeypatch, tmp_path):
    from sdconet.utils import provenance as prov

    monkeypatch.setattr(prov, "_REPO_ROOT", tmp_path)  # not a checkout (pytest's tmp dirs are outside the repo)
    record = prov.provenance(["gpu_check.py"])
    assert record["commit"] is None and record["dirty"] is None and record["cpu"]["model"]


# ---- 6. the exporter's <name>.report.json ------------------------------------------------------------------------
def test_export_report_carries_provenance(tmp_path):
    from sdconet.deploy.report import ExportReport

    report = ExportReport("tiny", accuracy={"onnxruntime_int8": {"AP": 0.5, "passed": True}})
    json_path, _ = report.write(tmp_path)
    data = json.loads(json_path.read_text())
    assert_provenance(data["provenance"])
    assert data["accuracy"]["onnxruntime_int8"]["AP"] == 0.5


def test_every_committed_result_says_where_it_came_from():
    """Issue 23 item 6: each JSON in benchmarks/results/ carries one provenance object with the command, the commit
    and the CPU (files recorded before the helper existed carry a reconstructed one, marked as such)."""
    results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert results
    missing = []
    for path in results:
        document = json.loads(path.read_text())
        record = document.get("provenance") if isinstance(document, dict) else None
        if not (isinstance(record, dict) and record.get("command") and "commit" in record
                and record.get("cpu", {}).get("model")):
            missing.append(path.name)
    assert not missing, f"results without a provenance object: {missing}"
