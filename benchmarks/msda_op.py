#!/usr/bin/env python
"""Micro-benchmark of the MSDA op alone: grid_sample reference, gather form, the Triton kernel, and on the CPU the
gather-decomposed ONNX graph on ONNX Runtime and the fused C++ op (sdconet.kernels.cpu) on OpenVINO.

Shapes are the paper's: at 256x256 LR value tokens S = 32^2 + 16^2 + 8^2 + 4^2 = 1360 (512x512 LR: 64^2 ... 8^2 =
5440), 4 levels, 8 heads of 32 channels, 4 points; queries = the saliency-filtered encoder tokens (898 at 256, 3596
at 512) and 300 (decoder). Every row also records the largest absolute difference to the fp32 grid_sample reference,
so a fast wrong kernel cannot pass unnoticed.

CPU forms (fp32 only): ``onnx_gather`` = the exact subgraph the pure-ONNX export splices in for one MSDA call
(``sdconet.deploy.msda_plugin``), on ONNX Runtime; ``ov_gather`` = the same graph on OpenVINO; ``fused`` = the
plugin node read by OpenVINO as the fused op (what ``OpenVINORunner`` runs). Target: fused >= 10x onnx_gather.

On a CPU-only machine the Triton rows are recorded as ``skipped: no CUDA device``; ``--interpret`` runs the kernel
under Triton's CPU interpreter instead, for correctness only (its time is labelled as not a speed figure).

    python benchmarks/msda_op.py                       # all forms, fp32 (+ fp16 on CUDA)
    python benchmarks/msda_op.py --json runs/msda_op.json --iters 200
    python benchmarks/msda_op.py --lr 256 512 --threads 2 --forms grid_sample gather onnx_gather ov_gather fused
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

LEVEL_SHAPES = [(32, 32), (16, 16), (8, 8), (4, 4)]  # 256x256 LR
LEVEL_STRIDES = (8, 16, 32, 64)
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
DECODER_QUERIES = 300
FORMS = ("grid_sample", "gather", "triton", "onnx_gather", "ov_gather", "fused")
CPU_FORMS = ("onnx_gather", "ov_gather", "fused")  # NumPy fp32 on the host
SPEEDUP_TARGET = 5.0  # Triton kernel vs grid_sample reference on a GPU (issue 8)
FUSED_TARGET = 10.0  # fused CPU op vs the gather ONNX graph on ONNX Runtime (issue 13)


def level_shapes_for(lr: int) -> list[tuple[int, int]]:
    """Neck level sizes (strides 8/16/32/64, the extra level a stride-2 conv) for an ``lr`` x ``lr`` input."""
    shapes, side = [], lr
    for stride in LEVEL_STRIDES:
        side = -(-lr // stride) if stride != LEVEL_STRIDES[-1] else -(-side // 2)
        shapes.append((side, side))
    return shapes


def encoder_queries(levels: list[tuple[int, int]]) -> int:
    """Tokens the saliency filter keeps (the first encoder layer's queries) with the paper's level ratios."""
    from sdconet.config import SaliencyConfig
    from sdconet.models.deformable_encoder import level_keep_counts

    return sum(level_keep_counts(levels, SaliencyConfig().level_ratio))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--queries", type=int, nargs="+", default=None,
                        help="query counts Lq (default: the encoder tokens after saliency filtering, 898 at 256 LR, "
                             "and 300 decoder queries)")
    parser.add_argument("--lr", type=int, nargs="+", default=[256], help="LR input sides whose level shapes to use")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch, ONNX Runtime and OpenVINO (default: their own choice)")
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


def make_inputs(batch: int, queries: int, dtype, device, seed: int,
                levels_hw: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Paper-shaped MSDA inputs; locations spill slightly outside [0, 1] to exercise zero padding."""
    import torch

    from sdconet.ops.msda import level_start_index_for

    level_hw = list(levels_hw or LEVEL_SHAPES)
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in level_hw)
    levels = len(level_hw)
    value = torch.randn(batch, s, NUM_HEADS, HEAD_DIM, generator=g)
    loc = torch.rand(batch, queries, NUM_HEADS, levels, NUM_POINTS, 2, generator=g) * 1.1 - 0.05
    attn = torch.rand(batch, queries, NUM_HEADS, levels, NUM_POINTS, generator=g).flatten(-2).softmax(-1)
    attn = attn.view(batch, queries, NUM_HEADS, levels, NUM_POINTS)
    shapes = torch.tensor(level_hw, dtype=torch.int32)
    starts = torch.tensor(level_start_index_for(level_hw), dtype=torch.int32)
    return {"value": value.to(device, dtype), "sampling_locations": loc.to(device, dtype),
            "attention_weights": attn.to(device, dtype), "shapes_device": shapes.to(device),
            "starts_device": starts.to(device), "levels": level_hw}


def cpu_form_call(form: str, inputs: dict[str, Any], threads: int | None):
    """A zero-argument callable running a CPU form (ONNX Runtime / OpenVINO) on NumPy copies of ``inputs``."""
    import numpy as np
    import torch

    from sdconet.deploy import msda_plugin

    feeds = {name: inputs[name].cpu().numpy() for name in ("value", "sampling_locations", "attention_weights")}
    n, _, m, d = feeds["value"].shape
    lq = feeds["sampling_locations"].shape[1]
    from sdconet.kernels.cpu import plugin_node_model

    model = plugin_node_model(inputs["levels"], feeds["value"].shape, feeds["sampling_locations"].shape)
    if form in ("onnx_gather", "ov_gather"):  # the very splice the pure-ONNX export makes
        model = msda_plugin.plugin_nodes_to_onnx(model, [msda_plugin.TRT_PLUGIN_OP_TYPE])
    if form == "onnx_gather":
        from sdconet.runtime.onnxruntime_runner import ort_session

        session = ort_session(model, threads)

        def run():
            return session.run(None, feeds)[0]
    else:
        import openvino as ov

        core = ov.Core()
        if form == "fused":
            from sdconet.kernels.cpu import extension_path

            core.add_extension(str(extension_path()))
        ov_model = core.read_model(model.SerializeToString(), ov.Tensor(np.empty(0, np.uint8)))
        ov_model.reshape({name: list(array.shape) for name, array in feeds.items()})  # static, as the runner does
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        request = core.compile_model(ov_model, "CPU", config).create_infer_request()

        def run():
            return request.infer(feeds, share_inputs=True)[0]  # zero-copy, as ONNX Runtime takes NumPy
    return lambda: torch.from_numpy(run()).view(n, lq, m * d)


def form_call(form: str, inputs: dict[str, Any]):
    """A zero-argument callable running one form on ``inputs`` the way the model calls it."""
    from sdconet.ops.msda import multi_scale_deformable_attn

    value, loc, attn = inputs["value"], inputs["sampling_locations"], inputs["attention_weights"]
    level_hw = inputs.get("levels", LEVEL_SHAPES)
    if form == "triton":
        # device-resident int32 shapes/starts: what the exported graph and a CUDA model hold; no host sync per call
        shapes, starts = inputs["shapes_device"], inputs["starts_device"]
    else:
        shapes, starts = level_hw, None  # the reference forms need host ints (a device tensor would sync)
    return lambda: multi_scale_deformable_attn(value, shapes, starts, loc, attn, impl=form)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from sdconet.benchmark.device import describe, device_facts
    from sdconet.benchmark.timing import time_calls
    from sdconet.utils.logging import get_logger
    from sdconet.utils.provenance import provenance

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

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [(lr, dtype, queries, form) for lr in args.lr
             for queries in (args.queries or [encoder_queries(level_shapes_for(lr)), DECODER_QUERIES])
             for dtype in dtypes for form in args.forms]
    if "grid_sample" not in args.forms:
        raise SystemExit("--forms must include grid_sample (the reference every row is checked against)")
    rows: list[dict[str, Any]] = []
    references: dict[tuple[int, str, int], torch.Tensor] = {}
    with torch.no_grad():
        for lr, dtype, queries, form in tqdm(cases, desc="msda_op", unit="case"):
            levels = level_shapes_for(lr)
            inputs = make_inputs(args.batch, queries, torch_dtypes[dtype], device, args.seed, levels)
            row: dict[str, Any] = {"form": form, "dtype": dtype, "batch": args.batch, "lr": lr, "queries": queries,
                                   "value_tokens": sum(h * w for h, w in levels), "device": device.type,
                                   "p50_ms": None, "mean_ms": None, "max_abs_err": None, "speedup_vs_grid_sample": None}
            if form == "triton" and triton_skip:
                rows.append({**row, "status": triton_skip})
                continue
            if form in CPU_FORMS and (dtype != "fp32" or device.type != "cpu"):
                rows.append({**row, "status": "skipped: CPU forms run fp32 on the CPU"})
                continue
            interpreted = form == "triton" and interpreter
            try:
                call = cpu_form_call(form, inputs, args.threads) if form in CPU_FORMS else form_call(form, inputs)
            except ImportError as err:  # onnxruntime / openvino missing
                rows.append({**row, "status": f"skipped: {err}"})
                continue
            key = (lr, dtype, queries)
            if key not in references:  # fp32 grid_sample on the same (possibly half-rounded) inputs
                fp32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                        for k, v in inputs.items()}
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

    def same_case(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return (a["lr"], a["dtype"], a["queries"]) == (b["lr"], b["dtype"], b["queries"])

    for row in rows:
        base = next(r for r in rows if r["form"] == "grid_sample" and same_case(r, row))
        if row["status"] == "ok" and base["status"] == "ok" and row["p50_ms"]:
            row["speedup_vs_grid_sample"] = base["p50_ms"] / row["p50_ms"]
        gather = next((r for r in rows if r["form"] == "onnx_gather" and same_case(r, row)), None)
        if row["form"] == "fused" and row["status"] == "ok" and gather and gather["status"] == "ok":
            row["speedup_vs_onnx_gather"] = gather["p50_ms"] / row["p50_ms"]
    triton_speedups = [r["speedup_vs_grid_sample"] for r in rows if r["form"] == "triton" and r["status"] == "ok"]
    fused_speedups = [r["speedup_vs_onnx_gather"] for r in rows if "speedup_vs_onnx_gather" in r]
    facts = device_facts()
    return {"device": describe(facts), "device_facts": facts,
            "shapes": {"level_shapes": {lr: level_shapes_for(lr) for lr in args.lr}, "heads": NUM_HEADS,
                       "head_dim": HEAD_DIM, "points": NUM_POINTS},
            "timing": {"warmup": args.warmup, "iters": args.iters, "threads": args.threads,
                       "method": "CUDA events around each call" if cuda else "perf_counter around each call"},
            "target": {"triton_speedup_min": SPEEDUP_TARGET,
                       "met": (min(triton_speedups) >= SPEEDUP_TARGET) if triton_speedups else None},
            "target_cpu": {"fused_speedup_vs_onnx_gather_min": FUSED_TARGET,
                           "met": (min(fused_speedups) >= FUSED_TARGET) if fused_speedups else None},
            "rows": rows, "provenance": provenance()}  # after the runs: it names the fused kernel they loaded


def markdown(report: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"MSDA op on {report['device']}",
             "| form | dtype | batch | LR | Lq | p50 ms | mean ms | max abs err | speedup vs grid_sample | "
             "speedup vs onnx_gather | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['form']} | {r['dtype']} | {r['batch']} | {r.get('lr', '-')} | {r['queries']} | "
                     f"{fmt(r['p50_ms'], '.4f')} | {fmt(r['mean_ms'], '.4f')} | {fmt(r['max_abs_err'], '.2e')} | "
                     f"{fmt(r['speedup_vs_grid_sample'], '.2f')} | {fmt(r.get('speedup_vs_onnx_gather'), '.1f')} | "
                     f"{r['status']} |")
    target = report["target"]
    met = "not measured (no GPU run)" if target["met"] is None else ("met" if target["met"] else "NOT met")
    lines.append(f"target: Triton >= {target['triton_speedup_min']}x faster than grid_sample on a GPU: {met}")
    cpu_target = report.get("target_cpu")
    if cpu_target:
        met = "not measured" if cpu_target["met"] is None else ("met" if cpu_target["met"] else "NOT met")
        lines.append(f"target: fused CPU op >= {cpu_target['fused_speedup_vs_onnx_gather_min']}x faster than the "
                     f"gather ONNX graph on ONNX Runtime: {met}")
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
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
