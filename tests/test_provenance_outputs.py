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
