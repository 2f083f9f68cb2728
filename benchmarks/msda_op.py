#!/usr/bin/env python
"""Micro-benchmark of the MSDA op alone: grid_sample reference, gather form and the Triton kernel.

Shapes are the paper's (256x256 LR input): value tokens S = 32^2 + 16^2 + 8^2 + 4^2 = 1360, 4 levels, 8 heads of 32
channels, 4 points; 898 queries (saliency-filtered encoder) and 300 (decoder). Every row also records the largest
absolute difference to the fp32 grid_sample reference, so a fast wrong kernel cannot pass unnoticed.

On a CPU-only machine the Triton rows are recorded as ``skipped: no CUDA device``; ``--interpret`` runs the kernel
under Triton's CPU interpreter instead, for correctness only (its time is labelled as not a speed figure).

    python benchmarks/msda_op.py                       # all forms, fp32 (+ fp16 on CUDA)
    python benchmarks/msda_op.py --json runs/msda_op.json --iters 200
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

LEVEL_SHAPES = [(32, 32), (16, 16), (8, 8), (4, 4)]
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
FORMS = ("grid_sample", "gather", "triton")
SPEEDUP_TARGET = 5.0  # Triton kernel vs grid_sample reference on a GPU (issue 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--queries", type=int, nargs="+", default=[898, 300],
                        help="query counts Lq (898 = encoder tokens after saliency filtering, 300 = decoder queries)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "fp16"], default=None,
                        help="default: fp32 on CPU, fp32 and fp16 on CUDA")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--interpret", action="store_true",
                        help="without CUDA, run the Triton kernel under TRITON_INTERPRET=1 (correctness only)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report to this file")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_inputs(batch: int, queries: int, dtype, device, seed: int) -> dict[str, Any]:
    """Paper-shaped MSDA inputs; locations spill slightly outside [0, 1] to exercise zero padding."""
    import torch

    from sdconet.ops.msda import level_start_index_for

    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in LEVEL_SHAPES)
    levels = len(LEVEL_SHAPES)
    value = torch.randn(batch, s, NUM_HEADS, HEAD_DIM, generator=g)
    loc = torch.rand(batch, queries, NUM_HEADS, levels, NUM_POINTS, 2, generator=g) * 1.1 - 0.05
    attn = torch.rand(batch, queries, NUM_HEADS, levels, NUM_POINTS, generator=g).flatten(-2).softmax(-1)
    attn = attn.view(batch, queries, NUM_HEADS, levels, NUM_POINTS)
    shapes = torch.tensor(LEVEL_SHAPES, dtype=torch.int32)
    starts = torch.tensor(level_start_index_for(LEVEL_SHAPES), dtype=torch.int32)
    return {"value": value.to(device, dtype), "sampling_locations": loc.to(device, dtype),
            "attention_weights": attn.to(device, dtype), "shapes_device": shapes.to(device),
            "starts_device": starts.to(device)}


def form_call(form: str, inputs: dict[str, Any]):
    """A zero-argument callable running one form on ``inputs`` the way the model calls it."""
    from sdconet.ops.msda import multi_scale_deformable_attn

    value, loc, attn = inputs["value"], inputs["sampling_locations"], inputs["attention_weights"]
    if form == "triton":
        # device-resident int32 shapes/starts: what the exported graph and a CUDA model hold; no host sync per call
        shapes, starts = inputs["shapes_device"], inputs["starts_device"]
    else:
        shapes, starts = LEVEL_SHAPES, None  # the reference forms need host ints (a device tensor would sync)
    return lambda: multi_scale_deformable_attn(value, shapes, starts, loc, attn, impl=form)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from sdconet.benchmark.device import describe, device_facts
    from sdconet.benchmark.timing import time_calls
    from sdconet.utils.logging import get_logger

    log = get_logger("sdconet.benchmarks.msda_op")
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = args.dtypes or (["fp32", "fp16"] if cuda else ["fp32"])
    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    triton_skip, interpreter = None, False
    if not cuda and not args.interpret:
        triton_skip = "skipped: no CUDA device" if not torch.cuda.is_available() else "skipped: --device cpu"
    else:
        try:
            from sdconet.kernels import msda_triton  # registers impl "triton"

            interpreter = msda_triton.interpreter_enabled()
        except ImportError as err:
            triton_skip = f"skipped: triton unavailable ({err})"

    cases = [(dtype, queries, form) for dtype in dtypes for queries in args.queries for form in FORMS]
    rows: list[dict[str, Any]] = []
    references: dict[tuple[str, int], torch.Tensor] = {}
    with torch.no_grad():
        for dtype, queries, form in tqdm(cases, desc="msda_op", unit="case"):
            inputs = make_inputs(args.batch, queries, torch_dtypes[dtype], device, args.seed)
            row: dict[str, Any] = {"form": form, "dtype": dtype, "batch": args.batch, "queries": queries,
                                   "value_tokens": sum(h * w for h, w in LEVEL_SHAPES), "device": device.type,
                                   "p50_ms": None, "mean_ms": None, "max_abs_err": None, "speedup_vs_grid_sample": None}
            if form == "triton" and triton_skip:
                rows.append({**row, "status": triton_skip})
                continue
            interpreted = form == "triton" and interpreter
            call = form_call(form, inputs)
            key = (dtype, queries)
            if key not in references:  # fp32 grid_sample on the same (possibly half-rounded) inputs
                fp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
                references[key] = form_call("grid_sample", fp32)()
            try:
                started = time.perf_counter()
                out = call()
                first_call_ms = (time.perf_counter() - started) * 1000.0
            except (RuntimeError, TypeError) as err:  # e.g. an op without a half kernel on this device
                rows.append({**row, "status": f"error: {err}"})
                log.warning("%s %s Lq=%d failed: %s", form, dtype, queries, err)
                continue
            row["max_abs_err"] = float((out.float() - references[key]).abs().max())
            if interpreted:  # one emulated call is slow enough; its time only shows the interpreter's cost
                row.update(p50_ms=first_call_ms, mean_ms=first_call_ms, status="interpreter: not a speed figure")
            else:
                stats = time_calls(call, warmup=args.warmup, iters=args.iters, cuda=cuda).summary(args.batch)
                row.update(p50_ms=stats["p50_ms"], mean_ms=stats["mean_ms"], status="ok")
            rows.append(row)

    for row in rows:
        base = next(r for r in rows if r["form"] == "grid_sample" and r["dtype"] == row["dtype"]
                    and r["queries"] == row["queries"])
        if row["status"] == "ok" and base["status"] == "ok" and row["p50_ms"]:
            row["speedup_vs_grid_sample"] = base["p50_ms"] / row["p50_ms"]
    triton_speedups = [r["speedup_vs_grid_sample"] for r in rows if r["form"] == "triton" and r["status"] == "ok"]
    facts = device_facts()
    return {"device": describe(facts), "device_facts": facts,
            "shapes": {"level_shapes": LEVEL_SHAPES, "heads": NUM_HEADS, "head_dim": HEAD_DIM,
                       "points": NUM_POINTS},
            "timing": {"warmup": args.warmup, "iters": args.iters,
                       "method": "CUDA events around each call" if cuda else "perf_counter around each call"},
            "target": {"triton_speedup_min": SPEEDUP_TARGET,
                       "met": (min(triton_speedups) >= SPEEDUP_TARGET) if triton_speedups else None},
            "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"MSDA op on {report['device']}",
             "| form | dtype | batch | Lq | p50 ms | mean ms | max abs err | speedup vs grid_sample | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['form']} | {r['dtype']} | {r['batch']} | {r['queries']} | {fmt(r['p50_ms'], '.4f')} | "
                     f"{fmt(r['mean_ms'], '.4f')} | {fmt(r['max_abs_err'], '.2e')} | "
                     f"{fmt(r['speedup_vs_grid_sample'], '.2f')} | {r['status']} |")
    target = report["target"]
    met = "not measured (no GPU run)" if target["met"] is None else ("met" if target["met"] else "NOT met")
    lines.append(f"target: Triton >= {target['triton_speedup_min']}x faster than grid_sample on a GPU: {met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`
    from sdconet.utils.logging import setup_logging

    setup_logging()
    report = run(args)
    print(markdown(report))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
