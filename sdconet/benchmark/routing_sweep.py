"""The routing question the paper leaves open: how much do rho and stage 1 matter?

``python benchmarks/routing_sweep.py --config demo --seeds 3 --jobs 2 --reuse benchmarks/results/ablations.json``
trains the ``full`` schedule at each ``--rhos`` value (SR decoder lr = rho * eta in stage 2) with the preset's
stage 1 (a third of the epochs), and the ``joint`` row (stage 1 = 0: the SR decoder trains from step 0) at the
preset's rho, for seeds 0..N-1, and writes ``routing_sweep.{json,md,png}``:

* JSON ``{"settings", "records": [{"rho", "stage1_epochs", "seed", "epochs", "AP", "AP50", "APs", "PSNR", "commit",
  ...}], "summary": {point: {metric: {"mean", "std", "n"}}}, "pairs": [...], "provenance": {...}}``; a point is
  named ``rho=<r>, stage1=<k>``; ``pairs`` are paired-by-seed differences against the default point with their 95 %
  t-intervals (as in :mod:`sdconet.benchmark.ablations`);
* a markdown table and a chart of AP50 / AP per point with every seed's value.

``--reuse`` takes the ``full`` and ``joint`` records of an ablation JSON measured at the same config and overrides
(they are the rho = default points) instead of training them again; those records keep their own provenance and
carry ``reused_from``. Same sweep mechanism, resume and guard as the ablations (one module:
:func:`sdconet.benchmark.ablations.run_sweep`). ``model.sr_grad_scale=<s>`` as an override sweeps the GradScale
extension the same way (it changes the settings, so it needs its own --json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from sdconet.benchmark import ablations
from sdconet.benchmark.ablations import METRICS, SweepPoint
from sdconet.config import ConfigError, load_config
from sdconet.utils.io import save_figure, write_text_atomically
from sdconet.utils.provenance import provenance

FIELDS = ("rho", "stage1_epochs")


def point_name(rho: float, stage1: int) -> str:
    return f"rho={rho:g}, stage1={stage1}"


def _name_of(record: dict[str, Any]) -> str:
    return point_name(record["rho"], record["stage1_epochs"])


def sweep_point(rho: float, stage1: int, seed: int) -> SweepPoint:
    """``full`` with routing for stage1 > 0; the ``joint`` schedule for stage1 = 0 (the same training)."""
    schedule = "full" if stage1 > 0 else "joint"
    overrides = (f"train.sr_lr_ratio={rho}",) + ((f"train.stage1_epochs={stage1}",) if stage1 > 0 else ())
    return SweepPoint(schedule, seed, overrides, (("rho", rho), ("stage1_epochs", stage1)))


def _point_of(record: dict[str, Any]) -> SweepPoint:
    return sweep_point(record["rho"], record["stage1_epochs"], record["seed"])


def reused_records(path: Path, settings: dict[str, Any], rho: float, stage1: int) -> list[dict[str, Any]]:
    """The ``full`` (rho, stage1) and ``joint`` (rho, 0) records of the ablation JSON at ``path``, which must have
    been measured with ``settings`` (same config, overrides, epochs)."""
    source = ablations.read_result(path)
    if source["settings"] != settings:
        raise ValueError(f"--reuse {path}: measured with {source['settings']}, this sweep is {settings}")
    out = []
    for record in source["records"]:
        if record["schedule"] in ("full", "joint"):
            point_stage1 = stage1 if record["schedule"] == "full" else 0
            out.append({**record, "rho": rho, "stage1_epochs": point_stage1, "reused_from": str(path)})
    return out


def _order(records: Sequence[dict[str, Any]]) -> list[str]:
    keys = sorted({(r["stage1_epochs"] == 0, r["rho"], r["stage1_epochs"]) for r in records})
    return [point_name(rho, stage1) for _, rho, stage1 in keys]


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    overrides = " ".join(settings["overrides"]) or "none"
    lines = [f"Config `{settings['config']}` ({settings['epochs']} epochs; overrides: {overrides}); mean ± sample std "
             "over the seeds (a single seed shows its value only); PSNR in dB on the validation set. rho = SR "
             "decoder lr / detector lr in stage 2; stage1 = epochs with the SR decoder frozen (0 = `joint`).", "",
             "| point | seeds | AP | AP50 | APs | PSNR | records |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, entry in result["summary"].items():
        reused = {r.get("reused_from") for r in result["records"] if _name_of(r) == name} - {None}
        source = "reused: " + ", ".join(f"`{Path(p).name}`" for p in sorted(reused)) if reused else "trained here"
        lines.append(f"| {name} | {len(entry['seeds'])} | "
                     + " | ".join(ablations._cell(entry[m], 2 if m == "PSNR" else 3) for m in METRICS)
                     + f" | {source} |")
    if result.get("pairs"):
        lines += ["", "Paired by seed against the default point: mean of (a − b), [95 % t-interval]; `*` = excludes 0; "
                  "no interval below 2 seeds.", ""]
        lines += ablations.pairs_table(result["pairs"])
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, metric in zip(axes, ("AP50", "AP", "PSNR")):
        for x, name in enumerate(names):
            values = [r[metric] for r in result["records"] if _name_of(r) == name and r.get(metric) is not None]
            if values:
                ax.bar(x, sum(values) / len(values), 0.6, color="tab:blue" if metric != "PSNR" else "tab:gray",
                       alpha=0.6)
                ax.plot([x] * len(values), values, "k.", markersize=8)
        ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names])
        ax.set_ylabel(metric)
        if metric == "PSNR":
            values = [r["PSNR"] for r in result["records"] if r.get("PSNR") is not None]
            if values:
                ax.set_ylim(bottom=max(0.0, min(values) - 3.0))
    fig.suptitle(f"routing sweep, config {result['settings']['config']}, {result['settings']['epochs']} epochs: "
                 "bars = mean, dots = seeds")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def save(result: dict[str, Any], path: Path) -> None:
    order = _order(result["records"])
    result["summary"] = ablations.summarise(result["records"], _name_of, order)
    default = result["settings"]["default_point"]
    result["pairs"] = [p for p in ablations.paired_differences(result["records"], _name_of, order)
                       if default in (p["a"], p["b"])]
    result["provenance"] = provenance()
    write_text_atomically(path, json.dumps(result, indent=2) + "\n")
    write_text_atomically(path.with_suffix(".md"), markdown(result))
    if result["records"]:
        chart(result, path.with_suffix(".png"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="preset name or YAML path (default demo)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per point (default 3)")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.1, 1.0],
                        help="rho values of the routed (`full`) points at the preset's stage 1 (default 0.1 1.0)")
    parser.add_argument("--no-joint", action="store_true", help="leave out the stage 1 = 0 (`joint`) point")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="ablation JSON (same config and overrides) whose full/joint records are reused")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/routing_sweep.json"),
                        help="result file; .md and .png are written next to it")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/routing_sweep"), help="run directories")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (as in benchmarks/ablations.py)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or any(r < 0 for r in args.rhos):
        print(f"error: --seeds and --jobs must be >= 1 and --rhos >= 0 (got {args.seeds}, {args.jobs}, "
              f"{args.rhos})", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rho, stage1 = cfg.train.sr_lr_ratio, cfg.train.stage1_epochs
    base_settings = {"config": args.config, "overrides": list(args.overrides), "epochs": cfg.train.epochs}
    settings = {**base_settings, "default_point": point_name(rho, stage1)}
    wanted = [(r, stage1) for r in args.rhos] + ([] if args.no_joint else [(rho, 0)])
    try:
        result = ablations.load_result(args.json, settings)
        result["records"] = [r for r in result["records"] if not r.get("reused_from")]
        ablations.check_records(result["records"], args.config, args.overrides, _point_of, args.json)
        if args.reuse is not None:
            result["records"] += [r for r in reused_records(args.reuse, base_settings, rho, stage1)
                                  if (r["rho"], r["stage1_epochs"]) in wanted and r["seed"] < args.seeds]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    done = {ablations.record_key(r, FIELDS) for r in result["records"]}
    plan = [sweep_point(r, k, seed) for seed in range(args.seeds) for r, k in wanted]
    plan = [p for p in plan if p.key not in done]
    print(f"{len(done)} run(s) already in {args.json} or reused; {len(plan)} to train")

    def sort_key(record: dict[str, Any]) -> tuple[Any, ...]:
        return record["seed"], record["stage1_epochs"] == 0, record["rho"]

    failed = ablations.run_sweep(plan, args.config, args.overrides, result, args.json, args.out_dir, args.jobs, save,
                                 sort_key)
    if failed:
        return ablations.report_failed_runs(failed)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
