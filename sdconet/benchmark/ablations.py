"""The paper's Table VI ablations with error bars: train + evaluate each ``train.schedule`` for several seeds.

``python benchmarks/ablations.py --config demo --seeds 3 --json benchmarks/results/ablations.json`` trains every
schedule (``det_only``, ``sr_only``, ``saliency_only``, ``full``, ``joint``; see :mod:`sdconet.engine.routing`)
once per seed, evaluates the last epoch on the validation set, and writes

* the JSON ``{"settings": {...}, "records": [...], "summary": {...}}``: one record per (schedule, seed) with
  ``AP``, ``AP50``, ``APs`` and ``PSNR`` (null without an SR branch); the summary holds, per schedule, the number of
  seeds and the mean and sample standard deviation (ddof 1; null for a single seed) of each metric;
* a markdown table (same stem, ``.md``) and a bar chart with one-standard-deviation error bars (``.png``).

``--jobs N`` trains N runs at once in separate processes with ``usable CPUs // N`` threads each: the tiny demo model
does not scale past one or two threads (a demo epoch takes about as long on 1 thread as on 2), so on a small CPU
two single-threaded runs finish in about half the wall time of two consecutive ones.

Resumable: the JSON is rewritten after every run, and a (schedule, seed) already recorded is skipped. The settings
(config, overrides, epochs) are stored with the records; a JSON written with other settings is refused rather than
mixed. Seed ``s`` sets ``train.seed`` and ``data.seed`` (initialisation, batch order, augmentation); the synthetic
dataset itself (``data.synthetic.seed``) is the same for every run.
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
from pathlib import Path
from typing import Any, Sequence

from sdconet.config import ConfigError, load_config
from sdconet.engine.routing import SCHEDULES
from sdconet.utils.cpu import threads_per_process
from sdconet.utils.io import save_figure, write_text_atomically

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


def _summary(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per schedule: ``seeds``, and ``{metric: {"mean", "std"}}`` (sample std; None for < 2 values or no value)."""
    out: dict[str, dict[str, Any]] = {}
    for schedule in [s for s in ROW_ORDER if any(r["schedule"] == s for r in records)]:
        rows = [r for r in records if r["schedule"] == schedule]
        entry: dict[str, Any] = {"seeds": sorted(r["seed"] for r in rows)}
        for metric in METRICS:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            entry[metric] = {"mean": statistics.fmean(values) if values else None,
                             "std": statistics.stdev(values) if len(values) > 1 else None}
        out[schedule] = entry
    return out


def _cell(stats: dict[str, Any], digits: int) -> str:
    if stats["mean"] is None:
        return "-"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The summary as a markdown table (mean ± sample std over the seeds), with the settings it was measured at."""
    settings = result["settings"]
    overrides = " ".join(settings["overrides"]) or "none"
    lines = [f"Config `{settings['config']}` ({settings['epochs']} epochs; overrides: {overrides}); "
             "mean ± sample std over the seeds; PSNR in dB on the validation set, '-' without an SR branch.", "",
             "| schedule | | seeds | AP | AP50 | APs | PSNR |", "|---|---|---:|---:|---:|---:|---:|"]
    for schedule, entry in result["summary"].items():
        lines.append(f"| `{schedule}` | {DESCRIPTIONS[schedule]} | {len(entry['seeds'])} | "
                     + " | ".join(_cell(entry[m], 2 if m == "PSNR" else 3) for m in METRICS) + " |")
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
        return {"settings": settings, "records": [], "summary": {}}
    try:
        result = json.loads(path.read_text())
        records = result["records"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an ablations JSON ({err}); pass another --json path") from None
    if result.get("settings") != settings:
        raise ValueError(f"{path} was written with settings {result.get('settings')}, not {settings}; pass another "
                         "--json path (or delete the file) instead of mixing runs")
    result["records"] = records
    return result


def save_result(result: dict[str, Any], path: Path) -> None:
    """JSON + markdown table + chart, each written atomically (the chart only once there is a record)."""
    result["summary"] = _summary(result["records"])
    write_text_atomically(path, json.dumps(result, indent=2) + "\n")
    write_text_atomically(path.with_suffix(".md"), markdown_table(result))
    if result["records"]:
        bar_chart(result, path.with_suffix(".png"))


def run_one(config: str, overrides: Sequence[str], schedule: str, seed: int, out_dir: Path) -> dict[str, Any]:
    """Train ``schedule`` with ``seed`` and return its record (last-epoch validation metrics)."""
    from sdconet.engine.trainer import Trainer

    cfg = load_config(config, [*overrides, f"train.schedule={schedule}", f"train.seed={seed}", f"data.seed={seed}"])
    # evaluate once, after the last epoch: intermediate evaluations would only cost time here
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_interval=cfg.train.epochs))
    started = time.perf_counter()
    summary = Trainer(cfg, out_dir).fit()
    metrics = summary["metrics"]
    record = {"schedule": schedule, "seed": seed, "epochs": cfg.train.epochs,
              "train_time_s": round(time.perf_counter() - started, 1), "run_dir": str(out_dir)}
    for metric in METRICS:
        value = metrics.get(metric)
        record[metric] = None if value is None or not math.isfinite(value) else float(value)
    return record


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
                        "`ablation_short` preset halves the time)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per schedule (default 3)")
    parser.add_argument("--schedules", nargs="+", default=list(ROW_ORDER), choices=list(ROW_ORDER),
                        help="subset of the Table VI rows (default all five)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ablations.json"),
                        help="result file; .md and .png are written next to it")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/ablations"),
                        help="run directories: OUT_DIR/<schedule>_seed<s> (default runs/ablations)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process with "
                        "usable CPUs/JOBS threads (default 1: one run at a time in this process)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides applied to every run (e.g. train.epochs=1)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    done = {(r["schedule"], r["seed"]) for r in result["records"]}
    plan = [(s, seed) for seed in range(args.seeds) for s in args.schedules if (s, seed) not in done]
    print(f"{len(done)} run(s) already in {args.json}; {len(plan)} to train")

    def record_done(index: int, record: dict[str, Any]) -> None:
        result["records"].append(record)
        save_result(result, args.json)  # after every run: an interrupted sweep keeps what finished
        print(f"[{index}/{len(plan)}] {record['schedule']} seed {record['seed']}: "
              + ", ".join(f"{m} {record[m]:.3f}" for m in METRICS if record[m] is not None), flush=True)

    def job(schedule: str, seed: int) -> tuple[Any, ...]:
        return args.config, list(args.overrides), schedule, seed, args.out_dir / f"{schedule}_seed{seed}"

    if args.jobs == 1 or len(plan) <= 1:
        for index, (schedule, seed) in enumerate(plan, 1):
            print(f"training {schedule} seed {seed}", flush=True)
            record_done(index, run_one(*job(schedule, seed)))
    else:
        with _executor(min(args.jobs, len(plan))) as pool:
            futures = {pool.submit(run_one, *job(schedule, seed)): (schedule, seed) for schedule, seed in plan}
            print(f"training {len(plan)} run(s), {min(args.jobs, len(plan))} at a time", flush=True)
            failed = []
            for index, future in enumerate(concurrent.futures.as_completed(futures), 1):
                try:
                    record = future.result()
                except Exception as err:  # one failed run must not throw away the others still training
                    failed.append(futures[future])
                    print(f"[{index}/{len(plan)}] {futures[future][0]} seed {futures[future][1]} failed: "
                          f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
                    continue
                record_done(index, record)  # outside the try: a JSON that cannot be written is no failed run
        # records arrive in completion order; keep the file in plan order so reruns diff cleanly
        result["records"].sort(key=lambda r: (r["seed"], ROW_ORDER.index(r["schedule"])))
        if failed:
            save_result(result, args.json)
            print(f"error: {len(failed)} run(s) failed: {failed}; rerun the same command to train only those",
                  file=sys.stderr)
            return 1
    save_result(result, args.json)
    print(markdown_table(result))
    print(f"wrote {args.json}, {args.json.with_suffix('.md')}" +
          (f", {args.json.with_suffix('.png')}" if result["records"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
