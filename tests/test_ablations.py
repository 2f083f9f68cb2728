"""benchmarks/ablations.py: records -> mean ± sample std, table, chart; resume skips recorded runs; settings guard.

Training itself is stubbed here (each run is a full Trainer.fit, covered by tests/test_training.py); the real
command is validated by hand with a 1-epoch tiny run (docs/training.md "Ablations")."""
import json
import statistics

import pytest

from sdconet.benchmark import ablations


def _fake_run(calls):
    def run_one(config, overrides, schedule, seed, out_dir):
        calls.append((schedule, seed))
        has_sr = schedule in ("sr_only", "full", "joint")
        base = {"det_only": 0.1, "sr_only": 0.2, "saliency_only": 0.3, "full": 0.4, "joint": 0.35}[schedule]
        return {"schedule": schedule, "seed": seed, "epochs": 1, "train_time_s": 0.0, "run_dir": str(out_dir),
                "AP": base + 0.01 * seed, "AP50": 2 * base + 0.01 * seed, "APs": base / 2,
                "PSNR": 30.0 + seed if has_sr else None}
    return run_one


def test_ablations_summary_table_chart_and_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablations, "run_one", _fake_run(calls))
    out = tmp_path / "ablations.json"
    args = ["--config", "tiny", "--seeds", "3", "--json", str(out), "--out-dir", str(tmp_path / "runs"),
            "train.epochs=1"]
    assert ablations.main([*args, "--schedules", "det_only", "full"]) == 0
    assert len(calls) == 6
    result = json.loads(out.read_text())
    assert set(result) == {"settings", "records", "summary"} and len(result["records"]) == 6
    full = result["summary"]["full"]
    assert full["seeds"] == [0, 1, 2]
    assert full["AP"]["mean"] == pytest.approx(0.41)
    assert full["AP"]["std"] == pytest.approx(statistics.stdev([0.40, 0.41, 0.42]))  # sample std (ddof 1)
    assert full["PSNR"] == {"mean": pytest.approx(31.0), "std": pytest.approx(1.0)}
    assert result["summary"]["det_only"]["PSNR"] == {"mean": None, "std": None}
    table = out.with_suffix(".md").read_text()
    assert "| `full` |" in table and "0.410 ± 0.010" in table and "31.00 ± 1.00" in table
    assert out.with_suffix(".png").stat().st_size > 0
    # resume: the six recorded runs are skipped, only the missing rows train; table order follows Table VI
    calls.clear()
    assert ablations.main(args) == 0
    assert sorted(calls) == sorted((s, seed) for s in ("sr_only", "saliency_only", "joint") for seed in range(3))
    assert list(json.loads(out.read_text())["summary"]) == list(ablations.ROW_ORDER)
    # other settings are refused instead of being mixed into the same file
    calls.clear()
    assert ablations.main(["--config", "tiny", "--json", str(out), "train.epochs=2"]) == 2 and not calls


def test_single_seed_has_no_std():
    summary = ablations._summary([{"schedule": "full", "seed": 0, "AP": 0.5, "AP50": 0.7, "APs": 0.2, "PSNR": 30.0}])
    assert summary["full"]["AP"] == {"mean": 0.5, "std": None}


def test_parallel_jobs_record_every_run_in_plan_order(tmp_path, monkeypatch):
    """--jobs N: runs finish in any order, every one is recorded, the file keeps Table VI order per seed, and a failed
    run is reported without losing the others (workers are threads here; the CLI spawns processes)."""
    import concurrent.futures

    calls = []
    fake = _fake_run(calls)

    def flaky(config, overrides, schedule, seed, out_dir):
        if (schedule, seed) == ("joint", 1):
            raise RuntimeError("diverged")
        return fake(config, overrides, schedule, seed, out_dir)

    monkeypatch.setattr(ablations, "run_one", flaky)
    monkeypatch.setattr(ablations, "_executor", lambda jobs: concurrent.futures.ThreadPoolExecutor(jobs))
    out = tmp_path / "ablations.json"
    args = ["--config", "tiny", "--seeds", "2", "--jobs", "2", "--json", str(out), "--out-dir", str(tmp_path),
            "train.epochs=1"]
    assert ablations.main(args) == 1  # one run failed
    records = json.loads(out.read_text())["records"]
    expected = [(s, seed) for seed in range(2) for s in ablations.ROW_ORDER if (s, seed) != ("joint", 1)]
    assert [(r["schedule"], r["seed"]) for r in records] == expected
    # the rerun trains only the failed run
    monkeypatch.setattr(ablations, "run_one", fake)
    calls.clear()
    assert ablations.main(args) == 0 and calls == [("joint", 1)]
    assert ablations.main(["--config", "tiny", "--jobs", "0", "--json", str(out)]) == 2
