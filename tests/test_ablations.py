"""benchmarks/ablations.py and benchmarks/routing_sweep.py: records -> mean ± sample std, paired t-intervals, table,
chart; resume skips recorded runs; settings, code_hash and config_hash guards.

Training itself is stubbed here (each run is a full Trainer.fit, covered by tests/test_training.py); the stub stamps
its record as ``run_one`` does (the real config resolution and hashes). The real command is validated by hand with a
1-epoch tiny run (docs/training.md "Ablations")."""
import json
import statistics

import pytest
from scipy import stats

from sdconet.benchmark import ablations, routing_sweep
from sdconet.config import config_to_dict
from sdconet.utils.provenance import code_hash, config_hash


def _stamp(config, overrides, schedule, seed):
    cfg = ablations.resolve_config(config, overrides, schedule, seed)
    return {"commit": "0" * 40, "dirty": False, "config_hash": config_hash(config_to_dict(cfg)),
            "code_hash": code_hash(), "started": "2026-12-07T00:00:00+00:00", "finished": "2026-12-07T00:01:00+00:00"}


def _fake_run(calls):
    def run_one(config, overrides, schedule, seed, out_dir):
        calls.append((schedule, seed))
        has_sr = schedule in ("sr_only", "full", "joint")
        base = {"det_only": 0.1, "sr_only": 0.2, "saliency_only": 0.3, "full": 0.4, "joint": 0.35}[schedule]
        return {"schedule": schedule, "seed": seed, "epochs": 1, "train_time_s": 0.0, "run_dir": str(out_dir),
                "AP": base + 0.01 * seed, "AP50": 2 * base + 0.01 * seed, "APs": base / 2,
                "PSNR": 30.0 + seed if has_sr else None, **_stamp(config, overrides, schedule, seed)}
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
    assert set(result) == {"settings", "records", "summary", "pairs", "provenance"} and len(result["records"]) == 6
    assert {"commit", "dirty", "config_hash", "code_hash", "started", "finished"} <= set(result["records"][0])
    full = result["summary"]["full"]
    assert full["seeds"] == [0, 1, 2]
    assert full["AP"]["mean"] == pytest.approx(0.41) and full["AP"]["n"] == 3
    assert full["AP"]["std"] == pytest.approx(statistics.stdev([0.40, 0.41, 0.42]))  # sample std (ddof 1)
    assert full["PSNR"] == {"mean": pytest.approx(31.0), "std": pytest.approx(1.0), "n": 3}
    assert result["summary"]["det_only"]["PSNR"] == {"mean": None, "std": None, "n": 0}
    # full - det_only: the same 0.3 AP on every seed, so the paired interval has zero width
    pair = next(p for p in result["pairs"] if (p["a"], p["b"], p["metric"]) == ("full", "det_only", "AP"))
    assert pair["diff_mean"] == pytest.approx(0.3) and pair["ci95"] == pytest.approx([0.3, 0.3])
    assert not any(p["metric"] == "PSNR" for p in result["pairs"])  # det_only has no PSNR to pair with
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
    summary = ablations.summarise([{"schedule": "full", "seed": 0, "AP": 0.5, "AP50": 0.7, "APs": 0.2, "PSNR": 30.0}])
    assert summary["full"]["AP"] == {"mean": 0.5, "std": None, "n": 1}


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


def _record(schedule, seed, ap, **extra):
    return {"schedule": schedule, "seed": seed, "AP": ap, "AP50": ap, "APs": ap, "PSNR": None, **extra}


def test_paired_differences_use_the_seed_pairs_and_a_t_interval_in_table_vi_order():
    # seed effects shared by both rows (0.0 / 0.2 / 0.4) vanish in the paired difference (0.2, 0.3, 0.4)
    records = [_record("det_only", s, base) for s, base in enumerate((0.0, 0.2, 0.4))]
    records += [_record("full", s, base + d) for s, (base, d) in enumerate(zip((0.0, 0.2, 0.4), (0.2, 0.3, 0.4)))]
    records.append(_record("full", 7, 0.9))  # no det_only partner: left out of the pairing
    records += [_record("sr_only", 0, 0.5)]  # a single shared seed: mean only
    pairs = ablations.paired_differences(records)
    assert [(p["a"], p["b"]) for p in pairs if p["metric"] == "AP"] == [
        ("sr_only", "det_only"), ("full", "det_only"), ("full", "sr_only")]
    pair = next(p for p in pairs if (p["a"], p["b"], p["metric"]) == ("full", "det_only", "AP"))
    half = stats.t.ppf(0.975, 2) * 0.1 / 3 ** 0.5  # sd of (0.2, 0.3, 0.4) = 0.1, n = 3: t = 4.30, half 0.248
    assert pair["n"] == 3 and pair["seeds"] == [0, 1, 2] and pair["diff_mean"] == pytest.approx(0.3)
    assert pair["ci95"] == pytest.approx([0.3 - half, 0.3 + half]) and pair["excludes_zero"] is True
    single = next(p for p in pairs if (p["a"], p["b"], p["metric"]) == ("sr_only", "det_only", "AP"))
    assert single["n"] == 1 and single["ci95"] is None and single["excludes_zero"] is None
    table = ablations.pairs_table(pairs)
    assert any(line.startswith("| `full` − `det_only` | 3 | +0.300 [+0.052, +0.548]*") and "]*" in line for line in table)


def test_resume_guard_refuses_other_code_or_config_and_unstamped_records(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ablations, "run_one", _fake_run(calls))
    out = tmp_path / "ablations.json"
    args = ["--config", "tiny", "--seeds", "1", "--schedules", "full", "--json", str(out), "--out-dir",
            str(tmp_path), "train.epochs=1"]
    assert ablations.main(args) == 0
    good = json.loads(out.read_text())
    assert ablations.main(args) == 0 and len(calls) == 1  # same code and config: resumes, nothing to train
    for field, value, message in (("code_hash", "f" * 64, "code_hash"), ("config_hash", "e" * 64, "resolve to"),
                                  ("code_hash", None, "no code_hash")):
        tampered = json.loads(json.dumps(good))
        tampered["records"][0][field] = value
        out.write_text(json.dumps(tampered))
        capsys.readouterr()
        assert ablations.main(args) == 2 and len(calls) == 1, field
        assert message in capsys.readouterr().err
    # a change to what the point resolves to (here a preset default the record did not see) is refused as well
    out.write_text(json.dumps(good))
    real_resolve = ablations.resolve_config
    monkeypatch.setattr(ablations, "resolve_config", lambda c, o, s, seed: real_resolve(c, [*o, "train.lr=1e-3"],
                                                                                         s, seed))
    assert ablations.main(args) == 2 and len(calls) == 1


def test_report_recomputes_statistics_of_records_without_provenance(tmp_path):
    out = tmp_path / "old.json"
    records = [_record(s, seed, 0.1 * i + 0.01 * seed) for seed in range(2) for i, s in enumerate(("det_only", "full"))]
    out.write_text(json.dumps({"settings": {"config": "x", "overrides": [], "epochs": 15}, "records": records,
                               "summary": {}}))
    assert ablations.main(["--report", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["records"] == records and result["summary"]["full"]["AP"]["n"] == 2
    assert result["pairs"][0]["diff_mean"] == pytest.approx(0.1)
    assert "Paired by seed" in out.with_suffix(".md").read_text()


def test_routing_sweep_reuses_full_and_joint_and_trains_the_other_rho(tmp_path, monkeypatch):
    calls = []
    seen = []

    def fake(config, overrides, schedule, seed, out_dir):
        calls.append((schedule, seed))
        seen.append(list(overrides))
        return {"schedule": schedule, "seed": seed, "epochs": 2, "train_time_s": 0.0, "run_dir": str(out_dir),
                "AP": 0.2 + 0.01 * seed, "AP50": 0.5, "APs": 0.2, "PSNR": 20.0,
                **_stamp(config, overrides, schedule, seed)}

    monkeypatch.setattr(ablations, "run_one", fake)
    overrides = ["train.epochs=2", "train.stage1_epochs=1"]
    source = tmp_path / "ablations_short.json"
    source_records = [_record(s, seed, 0.1 + 0.01 * seed, PSNR=19.0) for seed in range(2) for s in
                      ("det_only", "full", "joint")]
    source.write_text(json.dumps({"settings": {"config": "tiny", "overrides": overrides, "epochs": 2},
                                  "records": source_records}))
    out = tmp_path / "routing_sweep.json"
    args = ["--config", "tiny", "--seeds", "2", "--reuse", str(source), "--json", str(out), "--out-dir",
            str(tmp_path / "runs"), *overrides]
    assert routing_sweep.main(args) == 0
    assert calls == [("full", 0), ("full", 1)]  # rho = 1.0 only; rho = 0.1 (full) and stage 1 = 0 (joint) reused
    assert all("train.sr_lr_ratio=1.0" in o and "train.stage1_epochs=1" in o for o in seen)
    result = json.loads(out.read_text())
    assert set(result) == {"settings", "records", "summary", "pairs", "provenance"}
    for record in result["records"]:
        assert {"rho", "stage1_epochs", "seed", "epochs", "AP", "AP50", "APs", "PSNR", "commit"} <= set(record) or \
            record.get("reused_from") == str(source)
    assert list(result["summary"]) == ["rho=0.1, stage1=1", "rho=1, stage1=1", "rho=0.1, stage1=0"]
    assert result["summary"]["rho=1, stage1=1"]["AP"]["n"] == 2
    pair = next(p for p in result["pairs"] if p["a"] == "rho=1, stage1=1" and p["metric"] == "AP")
    assert pair["b"] == "rho=0.1, stage1=1" and pair["diff_mean"] == pytest.approx(0.1)
    assert out.with_suffix(".png").stat().st_size > 0 and "reused" in out.with_suffix(".md").read_text()
    calls.clear()
    assert routing_sweep.main(args) == 0 and calls == []  # resumed: everything recorded or reused
