"""One runner per backend. Every runner times the same deploy graph (``sdconet.deploy.InferenceGraph``) and returns
a record; a backend that cannot run here returns a record with ``status = "skipped: <reason>"`` instead of vanishing.

Records carry ``backend, precision, batch, imgsz, p50_ms, p90_ms, p99_ms, mean_ms, throughput, peak_mem_mb, device,
status`` (+ ``variant`` and backend-specific notes).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdconet.benchmark.device import describe, device_facts
from sdconet.benchmark.timing import peak_rss_mb, reset_peak_rss, time_calls
from sdconet.config import Config
from sdconet.utils.logging import get_logger

log = get_logger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt", "triton")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass
class BenchContext:
    """What every runner shares: the model (config + weights), sizes, loop lengths and an artifact folder."""

    cfg: Config
    state_dict: dict[str, torch.Tensor] | None
    imgsz: int
    warmup: int
    iters: int
    work_dir: Path
    onnx_path: Path | None = None  # user-given fp32 ONNX; exported on the fly when None
    int8_onnx_path: Path | None = None
    engine_path: Path | None = None
    calib_images: int = 16
    facts: dict[str, Any] = field(default_factory=device_facts)
    _cache: dict[str, Any] = field(default_factory=dict)

    def base_record(self, backend: str, precision: str, batch: int, variant: str | None = None) -> dict[str, Any]:
        record = {"backend": backend, "precision": precision, "batch": batch, "imgsz": self.imgsz,
                  "p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None, "throughput": None,
                  "peak_mem_mb": None, "device": describe(self.facts), "status": "ok"}
        if variant:
            record["variant"] = variant
        return record

    def images(self, batch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.rand(batch, 3, self.imgsz, self.imgsz, generator=generator)

    def graph(self, msda_impl: str = "gather"):
        from sdconet.deploy.inference_graph import build_inference_graph

        key = f"graph:{msda_impl}"
        if key not in self._cache:
            self._cache[key] = build_inference_graph(self.cfg, self.state_dict, msda_impl=msda_impl)
        return self._cache[key]

    def fp32_onnx(self) -> Path:
        """The user's ONNX, or the pure-ONNX export of the same graph the torch runner times."""
        if self.onnx_path is not None:
            return self.onnx_path
        if "onnx" not in self._cache:
            from sdconet.deploy.inference_graph import DETECTION_OUTPUTS, INPUT_NAME
            from sdconet.deploy.onnx_export import export_module, save_model, simplify

            model = export_module(self.graph("gather"), self.images(1), input_name=INPUT_NAME,
                                  output_names=DETECTION_OUTPUTS)
            self._cache["onnx"] = save_model(simplify(model), self.work_dir / "bench_fp32.onnx")
        return self._cache["onnx"]


def _skipped(record: dict[str, Any], reason: str) -> dict[str, Any]:
    record["status"] = f"skipped: {reason}"
    return record


def _fill(record: dict[str, Any], stats, batch: int, peak_mb: float) -> dict[str, Any]:
    record.update(stats.summary(batch))
    record["peak_mem_mb"] = round(peak_mb, 1)
    return record


# ----------------------------------------------------------------------------------------------------------------
def run_torch(ctx: BenchContext, precision: str, batch: int, compile_model: bool = False,
              cuda_graphs: bool = False) -> dict[str, Any]:
    """Eager PyTorch fp32 (CPU/GPU); AMP fp16/bf16 on GPU; optional torch.compile / CUDA graphs on GPU."""
    variant = "+".join(v for v, on in (("compile", compile_model), ("cudagraphs", cuda_graphs)) if on) or None
    record = ctx.base_record("torch", precision, batch, variant)
    cuda = torch.cuda.is_available()
    if precision == "int8":
        return _skipped(record, "int8 is measured on ONNX Runtime (Q/DQ) and TensorRT, not eager PyTorch")
    if precision in ("fp16", "bf16") and not cuda:
        return _skipped(record, f"{precision} autocast is timed on GPU only; no CUDA device here")
    if (compile_model or cuda_graphs) and not cuda:
        return _skipped(record, "torch.compile / CUDA graphs are timed on GPU only; no CUDA device here")
    device = torch.device("cuda" if cuda else "cpu")
    msda_impl = "auto" if cuda else "gather"  # auto = the Triton kernel on CUDA
    graph = ctx.graph(msda_impl).to(device)
    images = ctx.images(batch).to(device)
    fn: Callable[[], Any] = graph
    if compile_model:
        fn = torch.compile(graph, mode="max-autotune-no-cudagraphs")
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def call() -> Any:
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            return fn(images)

    if cuda_graphs:
        call = _capture_cuda_graph(call)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    stats = time_calls(call, ctx.warmup, ctx.iters, cuda=cuda)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    record["msda_impl"] = msda_impl
    return _fill(record, stats, batch, peak)


def _capture_cuda_graph(call: Callable[[], Any]) -> Callable[[], Any]:
    """Warm up on a side stream, capture one call into a CUDA graph, and return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


# ----------------------------------------------------------------------------------------------------------------
def _ort_providers() -> list[str]:
    import onnxruntime as ort

    wanted = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in wanted if p in ort.get_available_providers()]


def run_onnxruntime(ctx: BenchContext, precision: str, batch: int) -> dict[str, Any]:
    """ONNX Runtime with the best available execution provider; fp32 ONNX or the INT8 Q/DQ ONNX."""
    record = ctx.base_record("onnxruntime", precision, batch)
    if importlib.util.find_spec("onnxruntime") is None:
        return _skipped(record, "onnxruntime is not installed (pip install 'sdconet[export]')")
    import onnxruntime as ort

    if precision == "int8":
        path = ctx.int8_onnx_path or _int8_onnx(ctx)
        if isinstance(path, str):  # a reason, not a path
            return _skipped(record, path)
    elif precision == "fp32":
        path = ctx.fp32_onnx()
    else:
        return _skipped(record, f"{precision} ONNX variants are built for TensorRT only (use --backend tensorrt)")
    providers = _ort_providers()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=providers)
    feed = {session.get_inputs()[0].name: ctx.images(batch).numpy()}
    record["provider"] = session.get_providers()[0]
    reset_peak_rss()
    stats = time_calls(lambda: session.run(None, feed), ctx.warmup, ctx.iters)
    return _fill(record, stats, batch, peak_rss_mb())


def _int8_onnx(ctx: BenchContext) -> Path | str:
    """Q/DQ ONNX via the exporter's ModelOpt step; returns a reason string when it cannot run here."""
    if "int8" in ctx._cache:
        return ctx._cache["int8"]
    try:
        from sdconet.deploy.quantize import quantize_int8_random_calibration
    except ImportError as err:
        ctx._cache["int8"] = f"INT8 quantization unavailable ({err})"
        return ctx._cache["int8"]
    try:
        ctx._cache["int8"] = quantize_int8_random_calibration(ctx.fp32_onnx(), ctx.work_dir / "bench_int8.onnx",
                                                              imgsz=ctx.imgsz, num_images=ctx.calib_images)
    except Exception as err:  # ModelOpt missing/failed: report, keep benchmarking the rest
        ctx._cache["int8"] = f"INT8 quantization failed: {err}"
    return ctx._cache["int8"]


# ----------------------------------------------------------------------------------------------------------------
def run_tensorrt(ctx: BenchContext, precision: str, batch: int) -> dict[str, Any]:
    """A serialized engine (``--engine``) through the project's TensorRT runtime wrapper."""
    record = ctx.base_record("tensorrt", precision, batch)
    if importlib.util.find_spec("tensorrt") is None:
        return _skipped(record, "tensorrt is not importable (PyPI's wheels are download stubs without NVIDIA's "
                                "index; use NVIDIA's container or JetPack)")
    if not torch.cuda.is_available():
        return _skipped(record, "no CUDA device")
    if ctx.engine_path is None:
        return _skipped(record, "no engine given: build one with `python export/build_engine.py --fp16` and pass "
                                "--engine engines/<name>.plan")
    from sdconet.deploy.trt_runtime import TensorRTRunner

    runner = TensorRTRunner(ctx.engine_path)
    images = ctx.images(batch).cuda()
    torch.cuda.reset_peak_memory_stats()
    stats = time_calls(lambda: runner(images), ctx.warmup, ctx.iters, cuda=True)
    return _fill(record, stats, batch, torch.cuda.max_memory_allocated() / 2**20)


# ----------------------------------------------------------------------------------------------------------------
def run_triton(ctx: BenchContext, precision: str, batch: int, protocol: str = "http") -> dict[str, Any]:
    """End-to-end through a real Triton server (cpu deployment of the fp32 ONNX) with the load generator.

    ``batch`` is the number of requests in flight (one image each); the server's dynamic batcher forms the batches.
    Images are sent as raw uint8 arrays already at the engine size, so preprocessing only converts them.
    """
    record = ctx.base_record("triton", precision, batch, variant=protocol)
    if precision != "fp32":
        return _skipped(record, "the CPU (python/ONNX Runtime) deployment serves the fp32 ONNX only")
    try:
        from sdconet.deploy.triton_repo import build_repository
        from sdconet.serve.loadgen import sweep
        from sdconet.serve.server import ServerError, TritonServer, free_port
    except ImportError as err:
        return _skipped(record, f"serving extras missing ({err}); pip install 'sdconet[serving]'")
    repo = ctx._cache.get("triton_repo")
    if repo is None:
        repo = build_repository(ctx.work_dir / "triton_repo", onnx_path=ctx.fp32_onnx(), backend="cpu",
                                imgsz=ctx.imgsz, max_batch=max(8, batch),
                                class_names=[f"class_{i}" for i in range(ctx.cfg.model.detector.num_classes)])
        ctx._cache["triton_repo"] = repo
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (ctx.imgsz, ctx.imgsz, 3), dtype=np.uint8) for _ in range(4)]
    try:
        with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
            url = server.endpoints.http if protocol == "http" else server.endpoints.grpc
            results = sweep(url, protocol, images, [batch], requests=ctx.iters, warmup=ctx.warmup)
    except ServerError as err:
        return _skipped(record, f"Triton server could not start: {err}")
    level = results[0]
    if level.errors:
        record["status"] = f"error: {level.errors}/{level.requests} requests failed ({level.first_error})"
        return record
    lat = level.latency_ms
    record.update(p50_ms=lat["p50"], p90_ms=lat["p90"], p99_ms=lat["p99"], mean_ms=lat["mean"],
                  throughput=level.throughput_rps, concurrency=batch,
                  server_models={m.model: {"avg_batch": m.avg_batch, "queue_ms": m.queue_ms,
                                           "compute_ms": m.compute_ms} for m in level.models})
    return record


RUNNERS = {"torch": run_torch, "onnxruntime": run_onnxruntime, "tensorrt": run_tensorrt, "triton": run_triton}

