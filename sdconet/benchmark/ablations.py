"""The paper's Table VI ablations with error bars: train + evaluate each ``train.schedule`` for several seeds.

``python benchmarks/ablations.py --config demo --seeds 3 --jobs 2 --json benchmarks/results/ablations.json`` trains
every schedule (``det_only``, ``sr_only``, ``saliency_only``, ``full``, ``joint``; see :mod:`sdconet.engine.routing`)
once per seed, evaluates the last epoch on the validation set, and writes

* the JSON ``{"settings", "records", "summary", "pairs", "provenance"}``: one record per (schedule, seed) with
  ``AP``, ``AP50``, ``APs``, ``PSNR`` (null without an SR branch) and the run's provenance (``commit``, ``dirty``,
  ``config_hash``, ``code_hash``, ``started``, ``finished``); ``summary`` per schedule and metric
  ``{"mean", "std", "n"}`` (sample std, ddof 1; null below two values); ``pairs`` the paired-by-seed differences
  ``a − b`` of every two rows (b first in Table VI's order) with their 95 % t-interval ``ci95``;
* a markdown table of both (same stem, ``.md``) and a bar chart with one-standard-deviation error bars (``.png``).

``--jobs N`` trains N runs at once in separate processes with ``usable CPUs // N`` threads each: the tiny demo model
does not scale past one or two threads (a demo epoch takes about as long on 1 thread as on 2), so on a small CPU
two single-threaded runs finish in about half the wall time of two consecutive ones.

Resumable: the JSON is rewritten after every run, and a (schedule, seed) already recorded is skipped. A JSON written
with other settings (config, overrides, epochs) is refused rather than mixed, and so is a record whose ``code_hash``
(the training code, :data:`sdconet.utils.provenance.TRAINING_CODE`) differs from this tree's or whose
``config_hash`` differs from what its schedule and seed resolve to now. ``--report`` recomputes the statistics of an
existing file without training. Seed ``s`` sets ``train.seed`` and ``data.seed`` (initialisation, batch order,
augmentation); the synthetic dataset itself (``data.synthetic.seed``) is the same for every run.

The sweep mechanism (:class:`SweepPoint`, :func:`run_sweep`, :func:`check_records`) is shared with
:mod:`sdconet.benchmark.routing_sweep`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sdconet.config import Config, ConfigError, config_to_dict, load_config
from sdconet.engine.routing import SCHEDULES
from sdconet.utils.cpu import threads_per_process
from sdconet.utils.io import save_figure, write_text_atomically
from sdconet.utils.provenance import code_hash, config_hash, git_state, provenance, utc_now

METRICS = ("AP", "AP50", "APs", "PSNR")
# Table VI order: baseline first, the full method last but one, joint (no routing) last
ROW_ORDER = ("det_only", "sr_only", "saliency_only", "full", "joint")
DESCRIPTIONS = {
    "det_only": "DINO only (no SR, no saliency)",
    "sr_only": "+ SR with gradient routing",
    "saliency_only": "+ saliency filtering",
    "full": "SDCoNet (SR + saliency + routing)",
    "joint": "SDCoNet without routing (joint from epoch 1)",
}


def _key_fn(record: dict[str, Any]) -> str:
    return record["schedule"]


def summarise(records: list[dict[str, Any]], key: Callable[[dict[str, Any]], str] = _key_fn,
              order: Sequence[str] = ROW_ORDER) -> dict[str, dict[str, Any]]:
    """Per group (``key(record)``, in ``order``): ``seeds``, and ``{metric: {"mean", "std", "n"}}`` (sample std,
    ddof 1; None for < 2 values; mean None without a value)."""
    out: dict[str, dict[str, Any]] = {}
    for group in [g for g in order if any(key(r) == g for r in records)]:
        rows = [r for r in records if key(r) == group]
        entry: dict[str, Any] = {"seeds": sorted(r["seed"] for r in rows)}
        for metric in METRICS:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            entry[metric] = {"mean": statistics.fmean(values) if values else None,
                             "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}
        out[group] = entry
    return out


_summary = summarise


def t_interval(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    """Two-sided ``level`` t-interval of the mean of ``values`` (n - 1 degrees of freedom); None for n < 2."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return [mean - half, mean + half]


def paired_differences(records: list[dict[str, Any]], key: Callable[[dict[str, Any]], str] = _key_fn,
                       order: Sequence[str] = ROW_ORDER) -> list[dict[str, Any]]:
    """``a − b`` per metric, paired by seed (a seed counts where both groups have a value), for every pair of groups
    with ``b`` before ``a`` in ``order`` (Table VI's order: b's row first).

    Each entry: ``a``, ``b``, ``metric``, ``n``, ``seeds``, ``diff_mean``, ``ci95`` ([lo, hi], the t-interval of the
    mean paired difference; None below 2 seeds) and ``excludes_zero`` (None without an interval). Pairing removes
    what a seed does to both runs (the same initialisation draw and batch order), so the interval is narrower than
    comparing two means with their own stds whenever the seeds' effects are shared.
    """
    groups = [g for g in order if any(key(r) == g for r in records)]
    pairs = []
    for i, b in enumerate(groups):
        for a in groups[i + 1:]:
            for metric in METRICS:
                values_a = {r["seed"]: r[metric] for r in records if key(r) == a and r.get(metric) is not None}
                values_b = {r["seed"]: r[metric] for r in records if key(r) == b and r.get(metric) is not None}
                seeds = sorted(set(values_a) & set(values_b))
                if not seeds:
                    continue
                diffs = [values_a[s] - values_b[s] for s in seeds]
                ci = t_interval(diffs)
                pairs.append({"a": a, "b": b, "metric": metric, "n": len(seeds), "seeds": seeds,
                              "diff_mean": statistics.fmean(diffs), "ci95": ci,
                              "excludes_zero": None if ci is None else bool(ci[0] > 0 or ci[1] < 0)})
    return pairs


def _cell(stats: dict[str, Any], digits: int) -> str:
    if stats["mean"] is None:
        return "-"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def pairs_table(pairs: list[dict[str, Any]], metrics: Sequence[str] = ("AP", "AP50", "APs", "PSNR")) -> list[str]:
    """Markdown lines: one row per pair, ``diff_mean [lo, hi]`` per metric, ``*`` where the interval excludes 0."""
    lines = ["| a − b | seeds | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for pair in pairs:
        rows.setdefault((pair["a"], pair["b"]), {})[pair["metric"]] = pair
    for (a, b), by_metric in rows.items():
        cells = []
        for metric in metrics:
            pair = by_metric.get(metric)
            if pair is None:
                cells.append("-")
                continue
            digits = 2 if metric == "PSNR" else 3
            cell = _signed(pair["diff_mean"], digits)
            if pair["ci95"] is not None:
                lo, hi = pair["ci95"]
                cell += f" [{_signed(lo, digits)}, {_signed(hi, digits)}]" + ("*" if pair["excludes_zero"] else "")
            cells.append(cell)
        n = max(p["n"] for p in by_metric.values())
        lines.append(f"| `{a}` − `{b}` | {n} | " + " | ".join(cells) + " |")
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    """The summary (mean ± sample std over the seeds) and the paired differences with their 95 % intervals."""
    settings = result["settings"]
    overrides = " ".join(settings["overrides"]) or "none"
    lines = [f"Config `{settings['config']}` ({settings['epochs']} epochs; overrides: {overrides}); "
             "mean ± sample std over the seeds; PSNR in dB on the validation set, '-' without an SR branch.", "",
             "| schedule | | seeds | AP | AP50 | APs | PSNR |", "|---|---|---:|---:|---:|---:|---:|"]
    for schedule, entry in result["summary"].items():
        lines.append(f"| `{schedule}` | {DESCRIPTIONS[schedule]} | {len(entry['seeds'])} | "
                     + " | ".join(_cell(entry[m], 2 if m == "PSNR" else 3) for m in METRICS) + " |")
    if result.get("pairs"):
        lines += ["", "Paired by seed: mean of (a − b) over the seeds both rows ran, [95 % t-interval, n − 1 degrees "
                  "of freedom]; `*` = the interval excludes 0. Rows b before a in Table VI's order.", ""]
        lines += pairs_table(result["pairs"])
    return "\n".join(lines) + "\n"


def bar_chart(result: dict[str, Any], path: str | Path) -> Path:
    """AP / AP50 / APs bars per schedule (left) and PSNR (right), error bars = one sample std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    schedules = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / 3
    for i, metric in enumerate(("AP", "AP50", "APs")):
        means = [summary[s][metric]["mean"] or 0.0 for s in schedules]
        stds = [summary[s][metric]["std"] or 0.0 for s in schedules]
        left.bar([x + (i - 1) * width for x in range(len(schedules))], means, width, yerr=stds, capsize=3,
                 label=metric)
    left.set_xticks(range(len(schedules)), schedules)
    left.set_ylabel("COCO metric")
    left.set_ylim(bottom=0.0)
    left.legend()
    with_sr = [s for s in schedules if summary[s]["PSNR"]["mean"] is not None]
    right.bar(range(len(with_sr)), [summary[s]["PSNR"]["mean"] for s in with_sr],
              yerr=[summary[s]["PSNR"]["std"] or 0.0 for s in with_sr], capsize=3, color="tab:gray")
    right.set_xticks(range(len(with_sr)), with_sr)
    right.set_ylabel("PSNR (dB)")
    if with_sr:
        low = min(summary[s]["PSNR"]["mean"] for s in with_sr)
        right.set_ylim(bottom=max(0.0, low - 3.0))
    fig.suptitle(f"Table VI ablations, config {result['settings']['config']}, error bars: 1 sample std")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def load_result(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON at ``path`` (empty when absent); refuses one written with other ``settings``."""
    if not path.exists():
        return {"settings": settings, "records": [], "summary": {}, "pairs": []}
    result = read_result(path)
    if result.get("settings") != settings:
        raise ValueError(f"{path} was written with settings {result.get('settings')}, not {settings}; pass another "
                         "--json path (or delete the file) instead of mixing runs")
    return result


def read_result(path: Path) -> dict[str, Any]:
    """An ablation/sweep JSON as written by :func:`save_result`; ValueError naming the file when it is not one."""
    try:
        result = json.loads(path.read_text())
        if not isinstance(result["records"], list) or not isinstance(result["settings"], dict):
            raise TypeError("'records' must be a list and 'settings' a mapping")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an ablations JSON ({err}); pass another --json path") from None
    return result


def save_result(result: dict[str, Any], path: Path) -> None:
    """JSON + markdown table + chart, each written atomically (the chart only once there is a record)."""
    result["summary"] = summarise(result["records"])
    result["pairs"] = paired_differences(result["records"])
    result["provenance"] = provenance()
    write_text_atomically(path, json.dumps(result, indent=2) + "\n")
    write_text_atomically(path.with_suffix(".md"), markdown_table(result))
    if result["records"]:
        bar_chart(result, path.with_suffix(".png"))


# --------------------------------------------------------------------------------------------------------------------
# The one sweep mechanism (this table and benchmarks/routing_sweep.py): points -> runs -> records, resumable
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepPoint:
    """One training run: a schedule and seed, extra overrides on top of the sweep's, and the record fields that
    name it beside schedule and seed (the routing sweep's ``rho`` / ``stage1_epochs``)."""

    schedule: str
    seed: int
    overrides: tuple[str, ...] = ()
    fields: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.schedule, self.seed, self.fields)

    @property
    def run_name(self) -> str:
        extra = "".join(f"_{name}{value}" for name, value in self.fields)
        return f"{self.schedule}{extra}_seed{self.seed}"


def record_key(record: dict[str, Any], field_names: Sequence[str] = ()) -> tuple[Any, ...]:
    return (record["schedule"], record["seed"], tuple((name, record[name]) for name in field_names))


def resolve_config(config: str, overrides: Sequence[str], schedule: str, seed: int) -> Config:
    """The config a sweep run trains with: ``config`` + overrides, the schedule and seed, one evaluation at the end."""
    cfg = load_config(config, [*overrides, f"train.schedule={schedule}", f"train.seed={seed}", f"data.seed={seed}"])
    # evaluate once, after the last epoch: intermediate evaluations would only cost time here
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_interval=cfg.train.epochs))


def run_one(config: str, overrides: Sequence[str], schedule: str, seed: int, out_dir: Path) -> dict[str, Any]:
    """Train ``schedule`` with ``seed`` and return its record: last-epoch validation metrics and provenance
    (``commit``, ``dirty``, ``config_hash`` of the resolved config, ``code_hash`` of the training code,
    ``started`` / ``finished`` ISO 8601 UTC)."""
    from sdconet.engine.trainer import Trainer

    cfg = resolve_config(config, overrides, schedule, seed)
    commit, dirty = git_state()
    stamp = {"commit": commit, "dirty": dirty, "config_hash": config_hash(config_to_dict(cfg)),
             "code_hash": code_hash(), "started": utc_now()}
    started = time.perf_counter()
    summary = Trainer(cfg, out_dir).fit()
    metrics = summary["metrics"]
    record = {"schedule": schedule, "seed": seed, "epochs": cfg.train.epochs,
              "train_time_s": round(time.perf_counter() - started, 1), "run_dir": str(out_dir)}
    for metric in METRICS:
        value = metrics.get(metric)
        record[metric] = None if value is None or not math.isfinite(value) else float(value)
    return {**record, **stamp, "finished": utc_now()}


def check_records(records: Sequence[dict[str, Any]], config: str, overrides: Sequence[str],
                  point_of: Callable[[dict[str, Any]], SweepPoint], path: Path) -> None:
    """The resume guard: every trained record must carry this tree's ``code_hash`` and the ``config_hash`` its point
    resolves to now, so a sweep may span days and commits that leave training alone, and no other. Reused records
    (``reused_from``) were checked where they were trained."""
    current = code_hash()
    for record in records:
        if record.get("reused_from"):
            continue
        name = f"{path}: record {record['schedule']} seed {record['seed']}"
        if record.get("code_hash") is None:
            raise ValueError(f"{name} has no code_hash (written before records carried provenance), so it cannot be "
                             "checked against this code; pass another --json path")
        if record["code_hash"] != current:
            raise ValueError(f"{name} was trained with code_hash {record['code_hash'][:12]}, this tree's training "
                             f"code is {current[:12]} (sdconet.utils.provenance.TRAINING_CODE changed); pass another "
                             "--json path instead of mixing code versions")
        point = point_of(record)
        expected = config_hash(config_to_dict(resolve_config(config, [*overrides, *point.overrides], point.schedule,
                                                             point.seed)))
        if record.get("config_hash") != expected:
            raise ValueError(f"{name} has config_hash {str(record.get('config_hash'))[:12]}, but its schedule and seed "
                             f"resolve to {expected[:12]} now; pass another --json path")


def report_failed_runs(failed: Sequence[SweepPoint]) -> int:
    """Name the failed runs of a sweep on stderr; the exit code (1) of a sweep CLI that has some."""
    print(f"error: {len(failed)} run(s) failed: {[p.run_name for p in failed]}; rerun the same command to train "
          "only those", file=sys.stderr)
    return 1


def run_sweep(plan: Sequence[SweepPoint], config: str, overrides: Sequence[str], result: dict[str, Any],
              path: Path, out_dir: Path, jobs: int, save: Callable[[dict[str, Any], Path], None],
              sort_key: Callable[[dict[str, Any]], Any]) -> list[SweepPoint]:
    """Train ``plan`` (``jobs`` at a time), appending each record to ``result`` and saving after every run; returns
    the points that failed (a failed run does not stop the others)."""
    def record_done(index: int, point: SweepPoint, record: dict[str, Any]) -> None:
        result["records"].append({**record, **dict(point.fields)})
        save(result, path)  # after every run: an interrupted sweep keeps what finished
        print(f"[{index}/{len(plan)}] {point.run_name}: "
              + ", ".join(f"{m} {record[m]:.3f}" for m in METRICS if record[m] is not None), flush=True)

    def job(point: SweepPoint) -> tuple[Any, ...]:
        return config, [*overrides, *point.overrides], point.schedule, point.seed, out_dir / point.run_name

    failed: list[SweepPoint] = []
    if jobs == 1 or len(plan) <= 1:
        for index, point in enumerate(plan, 1):
            print(f"training {point.run_name}", flush=True)
            record_done(index, point, run_one(*job(point)))
    else:
        with _executor(min(jobs, len(plan))) as pool:
            futures = {pool.submit(run_one, *job(point)): point for point in plan}
            print(f"training {len(plan)} run(s), {min(jobs, len(plan))} at a time", flush=True)
            for index, future in enumerate(concurrent.futures.as_completed(futures), 1):
                try:
                    record = future.result()
                except Exception as err:  # one failed run must not throw away the others still training
                    failed.append(futures[future])
                    print(f"[{index}/{len(plan)}] {futures[future].run_name} failed: {type(err).__name__}: {err}",
                          file=sys.stderr, flush=True)
                    continue
                record_done(index, futures[future], record)  # outside the try: an unwritable JSON is no failed run
    # records arrive in completion order; keep the file in plan order so reruns diff cleanly
    result["records"].sort(key=sort_key)
    save(result, path)
    return failed


def _limit_threads(threads: int) -> None:
    """Worker initializer: ``threads`` intra-op threads, so N parallel runs do not oversubscribe the CPU."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _executor(jobs: int) -> concurrent.futures.Executor:
    """``jobs`` worker processes (spawned: no forked torch/OpenMP state), each with its share of the cores."""
    threads = threads_per_process(jobs)
    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_limit_threads, initargs=(threads,))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="preset name or YAML path (default demo; the shorter "
                        "`ablation_short` preset is a quarter of the epochs)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per schedule (default 3)")
    parser.add_argument("--schedules", nargs="+", default=list(ROW_ORDER), choices=list(ROW_ORDER),
                        help="subset of the Table VI rows (default all five)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ablations.json"),
                        help="result file; .md and .png are written next to it")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/ablations"),
                        help="run directories: OUT_DIR/<schedule>_seed<s> (default runs/ablations)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process with "
                        "usable CPUs/JOBS threads (default 1: one run at a time in this process)")
    parser.add_argument("--report", action="store_true", help="train nothing: recompute summary, pairs, table and "
                        "chart from the records in --json (any settings; no resume guard)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides applied to every run (e.g. train.epochs=1)")
    return parser.parse_args(argv)


def _plan_sort_key(record: dict[str, Any]) -> tuple[int, int]:
    return record["seed"], ROW_ORDER.index(record["schedule"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        try:
            result = read_result(args.json)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        save_result(result, args.json)
        print(markdown_table(result))
        return 0
    if args.seeds < 1 or args.jobs < 1:
        print(f"error: --seeds and --jobs must be >= 1 (got {args.seeds}, {args.jobs})", file=sys.stderr)
        return 2
    assert set(ROW_ORDER) == set(SCHEDULES), "Table VI rows and train.schedule names must match"
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = {"config": args.config, "overrides": list(args.overrides), "epochs": cfg.train.epochs}
    try:
        result = load_result(args.json, settings)
        check_records(result["records"], args.config, args.overrides,
                      lambda r: SweepPoint(r["schedule"], r["seed"]), args.json)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    done = {record_key(r) for r in result["records"]}
    plan = [SweepPoint(s, seed) for seed in range(args.seeds) for s in args.schedules
            if (s, seed, ()) not in done]
    print(f"{len(done)} run(s) already in {args.json}; {len(plan)} to train")
    failed = run_sweep(plan, args.config, args.overrides, result, args.json, args.out_dir, args.jobs, save_result,
                       _plan_sort_key)
    if failed:
        return report_failed_runs(failed)
    print(markdown_table(result))
    print(f"wrote {args.json}, {args.json.with_suffix('.md')}" +
          (f", {args.json.with_suffix('.png')}" if result["records"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
