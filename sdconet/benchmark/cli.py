"""``python benchmarks/latency.py``: latency/throughput of every backend on the same deploy graph."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from sdconet.benchmark.report import (compare_chart, compare_table, load_results, markdown_table, write_records)
from sdconet.benchmark.runners import BACKENDS, PRECISIONS, BenchContext, run_benchmark
from sdconet.config import ConfigError, load_config
from sdconet.utils.logging import get_logger, setup_logging

log = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/latency.py",
        description="Time the SDCoNet deploy graph (encoder + neck + saliency-filtered DINO, no SR decoder) on every "
                    "backend. With no model given, the paper-size model with random weights is timed (weights do not "
                    "change latency) and whatever a backend needs (ONNX, INT8 Q/DQ) is exported on the fly.")
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=["torch", "onnxruntime"],
                        help="backends to time (default: torch onnxruntime)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                        help="precisions (torch: bf16 autocast on CPU and GPU, fp16 on GPU; int8 on onnxruntime/openvino: "
                             "the runtime's own quantizer (quantize_static QDQ / NNCF) calibrated on training images; "
                             "int8-qdq: ModelOpt's Q/DQ graph for TensorRT, timed on onnxruntime; tensorrt: the --engine whose .plan.json has that precision). Records carry the "
                             "precision the artifact really runs in")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes (triton: requests in flight)")
    parser.add_argument("--imgsz", type=int, default=256, help="LR input side (default 256)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured calls before timing")
    parser.add_argument("--iters", type=int, default=30, help="measured calls per configuration")
    parser.add_argument("--config", default="paper", help="model preset or YAML when no checkpoint is given")
    parser.add_argument("--checkpoint", help="trained weights (.safetensors or run dir); default: random weights")
    parser.add_argument("--onnx", type=Path, help="fp32 ONNX to time instead of exporting one")
    parser.add_argument("--int8-onnx", type=Path, help="Q/DQ ONNX (e.g. the exporter's ModelOpt one) to time as int8-qdq instead of "
                             "quantizing one")
    parser.add_argument("--engine", type=Path, nargs="+", default=[],
                        help="TensorRT engine(s) for --backend tensorrt; each is timed under the precision its "
                             ".plan.json sidecar records, and once only")
    parser.add_argument("--compile", action="store_true", help="torch: also time torch.compile (GPU)")
    parser.add_argument("--cuda-graphs", action="store_true", help="torch: also time CUDA-graph replay (GPU)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http", help="triton client protocol")
    parser.add_argument("--triton-cpu-runtime", nargs="+", choices=("auto", "onnxruntime", "openvino"),
                        default=["auto"],
                        help="triton: runtime(s) of the cpu deployment's detector, one server each (auto = openvino "
                             "with the fused MSDA op where it builds, else onnxruntime)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: all)")
    parser.add_argument("--work-dir", type=Path, help="where on-the-fly exports go (default: a temp dir)")
    parser.add_argument("--json", type=Path,
                        help='write {"rows": [records], "provenance": {...}} here (--compare also reads the bare '
                             'record lists of older files)')
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="JSON",
                        help="render a side-by-side table and a PNG chart of earlier --json files, then exit")
    parser.add_argument("--chart", type=Path, default=None,
                        help="PNG chart of the records (with --compare: of the compared runs; default there "
                             "benchmarks/results/compare.png)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.detector.num_queries=100")
    return parser


def _compare(paths: Sequence[Path], chart: Path) -> int:
    runs, sources = {}, {}
    for path in paths:
        name = path.stem if path.stem not in runs else str(path)
        runs[name], sources[name] = load_results(path)
    print(compare_table(runs))
    for name, prov in sources.items():  # where each run came from (older files carry no provenance)
        where = (f"{(prov.get('cpu') or {}).get('model')}, commit {str(prov.get('commit'))[:12]}"
                 f"{' (dirty)' if prov.get('dirty') else ''}, {prov.get('created')}" if prov else "no provenance")
        print(f"{name}: {where}")
    print(f"\nchart: {compare_chart(runs, chart)}")
    return 0


def _context(args: argparse.Namespace, work_dir: Path) -> BenchContext:
    state_dict = None
    if args.checkpoint:
        from sdconet.engine.checkpoint import load_model_weights, resolve_checkpoint

        if args.overrides:
            raise ConfigError(f"overrides {args.overrides} apply to --config; with --checkpoint the model is the one "
                              f"stored in the checkpoint")
        cfg, state_dict, _ = load_model_weights(resolve_checkpoint(args.checkpoint))
    else:
        cfg = load_config(args.config, args.overrides)
    work_dir.mkdir(parents=True, exist_ok=True)
    return BenchContext(cfg=cfg, state_dict=state_dict, imgsz=args.imgsz, warmup=args.warmup, iters=args.iters,
                        work_dir=work_dir, onnx_path=args.onnx, int8_onnx_path=args.int8_onnx,
                        engine_paths=list(args.engine), threads=args.threads)


def _plan(args: argparse.Namespace) -> list[tuple[str, str, int, dict]]:
    """(backend, precision, batch, runner options) for every configuration asked for: the plain ones, then the
    torch.compile / CUDA-graph variants."""
    triton = [{"protocol": args.protocol, "cpu_runtime": r} for r in dict.fromkeys(args.triton_cpu_runtime)]
    plan = [(b, p, n, options) for b in args.backend for options in (triton if b == "triton" else [{}])
            for p in args.precision for n in args.batch]
    if "torch" in args.backend:
        variants = [options for options, wanted in (({"compile_model": True}, args.compile),
                                                    ({"cuda_graphs": True}, args.cuda_graphs)) if wanted]
        plan += [("torch", p, n, options) for options in variants for p in args.precision for n in args.batch]
    return plan


def _run_one(ctx: BenchContext, args: argparse.Namespace, backend: str, precision: str, batch: int,
             options: dict) -> dict:
    record = run_benchmark(ctx, backend, precision, batch, **options)
    record["device_facts"] = ctx.facts
    record["model"] = {"config": ctx.cfg.name, "checkpoint": args.checkpoint or "random weights"}
    tqdm.write(f"{backend}/{precision}/b{batch}: {record['status']}"
               + (f", p50 {record['p50_ms']:.2f} ms" if record["status"] == "ok" else ""))
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.compare:
        return _compare(args.compare, args.chart or Path("benchmarks/results/compare.png"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # on-the-fly exports go to --work-dir, or to a temporary folder removed when the run ends
    with tempfile.TemporaryDirectory(prefix="sdconet-bench-") as scratch:
        try:
            ctx = _context(args, args.work_dir or Path(scratch))
        except (ConfigError, RuntimeError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            records = [_run_one(ctx, args, *item) for item in tqdm(_plan(args), desc="benchmark", unit="config")]
        finally:
            ctx.close()
    table = markdown_table(records)
    print(table)
    if args.json:
        write_records(records, args.json)
        print(f"\nrecords: {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    if args.chart:
        label = args.json.stem if args.json else "latency"
        print(f"chart: {compare_chart({label: records}, args.chart)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
