"""The benchmark loop over the runtime layer: every backend registered in ``sdconet.runtime.RUNNERS`` is timed on the
same deploy graph (``sdconet.deploy.InferenceGraph``) through its runner; a backend that cannot run here returns a
record with ``status = "skipped: <reason>"`` (the runner's ``RunnerUnavailable`` message) instead of vanishing.

Each runner class opens itself for a benchmark (``Runner.for_benchmark(ctx, precision, **options)``) from what the
context offers (the graph, the fp32 / INT8 ONNX made on the fly, the ``--engine`` files), so a runtime added later is
timed by registering it; nothing here changes. Triton is timed end to end through a real server and the load
generator (``run_triton``), not as a runner.

Records carry ``backend, precision, batch, imgsz, p50_ms, p90_ms, p99_ms, mean_ms, throughput, peak_mem_mb, device,
status`` (+ ``variant`` and backend-specific notes). ``precision`` is the one the timed artifact runs in (a TensorRT
engine's sidecar, an ONNX's metadata); when it differs from the one asked for, ``requested_precision`` says so, and
an artifact already timed at that precision is not timed twice under another name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdconet.benchmark.device import describe, device_facts
from sdconet.benchmark.timing import peak_rss_mb, reset_peak_rss, time_calls
from sdconet.config import Config
from sdconet.runtime import RUNNERS as RUNTIME_RUNNERS
from sdconet.runtime import Runner, RunnerError, RunnerUnavailable, runner_class
from sdconet.utils.logging import get_logger

log = get_logger(__name__)

# int8 on a CPU backend = that runtime's own quantizer (ONNX Runtime quantize_static QDQ, NNCF for OpenVINO);
# int8-qdq = ModelOpt's explicit Q/DQ graph, made for TensorRT (timed on ONNX Runtime under its own label)
BASE_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-qdq")
# describe() keys every runner has; the others (provider, msda_impl, engine, ...) become record notes
_BASE_DESCRIBE = ("backend", "precision", "imgsz", "max_batch", "num_classes", "has_saliency")


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
    engine_paths: list[Path] = field(default_factory=list)  # TensorRT engines (their sidecars give the precision)
    threads: int | None = None
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

    def images(self, batch: int) -> np.ndarray:
        """``[batch, 3, imgsz, imgsz]`` float32 uniform noise, the same for every backend."""
        generator = torch.Generator().manual_seed(0)
        return torch.rand(batch, 3, self.imgsz, self.imgsz, generator=generator).numpy()

    @property
    def class_names(self) -> list[str]:
        return [f"class_{i}" for i in range(self.cfg.model.detector.num_classes)]

    def graph(self, msda_impl: str = "gather"):
        from sdconet.engine.inference_graph import build_inference_graph

        key = f"graph:{msda_impl}"
        if key not in self._cache:
            self._cache[key] = build_inference_graph(self.cfg, self.state_dict, msda_impl=msda_impl)
        return self._cache[key]

    def onnx(self, precision: str) -> Path:
        """The ONNX of ``precision``: fp32 = the user's or the pure-ONNX export of the graph the torch runner times;
        int8 = ONNX Runtime's static QDQ quantization of it (training-split calibration images); int8-qdq = the
        user's ``--int8-onnx`` or ModelOpt's Q/DQ quantization (same images). RunnerUnavailable otherwise."""
        if precision == "fp32":
            return self.fp32_onnx()
        if precision in ("int8", "int8-qdq"):
            path = _cached_artifact(self, precision, lambda: self._quantize_onnx(precision))
            if isinstance(path, str):  # a reason, not a path
                raise RunnerUnavailable(path)
            return path
        raise RunnerUnavailable(f"no {precision} ONNX here: the exporter's AutoCast step (export/build_engine.py "
                                f"--fp16) writes the FP16 ONNX, for TensorRT")

    def plugin_onnx(self) -> Path:
        """Plugin-mode ONNX (TensorRT's MSDA plugin nodes, which OpenVINO maps to the fused op) of the graph, exported
        once into the work folder: the same export the exporter's plugin artifact gets."""
        if "onnx_plugin" not in self._cache:
            from sdconet.deploy import msda_plugin
            from sdconet.engine.inference_graph import DETECTION_OUTPUTS, INPUT_NAME
            from sdconet.deploy.onnx_export import export_module, save_model, simplify_around_custom_nodes
            from sdconet.runtime.metadata import write_onnx_metadata

            spec = msda_plugin.trt_plugin_spec(1)
            with msda_plugin.use_plugin_spec(spec):
                model = export_module(self.graph("plugin"), torch.from_numpy(self.images(1)), input_name=INPUT_NAME,
                                      output_names=DETECTION_OUTPUTS, custom_domains=[spec.domain])
            model = simplify_around_custom_nodes(model)
            write_onnx_metadata(model, class_names=self.class_names, imgsz=self.imgsz, msda="plugin",
                                outputs=DETECTION_OUTPUTS, precision="fp32")
            self._cache["onnx_plugin"] = save_model(model, Path(self.work_dir) / "bench_fp32.plugin.onnx")
        return self._cache["onnx_plugin"]

    def fp32_onnx(self) -> Path:
        if self.onnx_path is not None:
            return self.onnx_path
        if "onnx" not in self._cache:
            from sdconet.engine.inference_graph import DETECTION_OUTPUTS, INPUT_NAME
            from sdconet.deploy.onnx_export import export_module, save_model, simplify
            from sdconet.runtime.metadata import write_onnx_metadata

            model = simplify(export_module(self.graph("gather"), torch.from_numpy(self.images(1)),
                                           input_name=INPUT_NAME, output_names=DETECTION_OUTPUTS))
            write_onnx_metadata(model, class_names=self.class_names, imgsz=self.imgsz, msda="onnx",
                                outputs=DETECTION_OUTPUTS, precision="fp32")
            self._cache["onnx"] = save_model(model, self.work_dir / "bench_fp32.onnx")
        return self._cache["onnx"]

    def calibration(self) -> np.ndarray:
        """``calib_images`` LR images of the config's training split (synthetic by default), never random tensors."""
        if "calibration" not in self._cache:
            from sdconet.data import build_dataset
            from sdconet.deploy.quantize import calibration_images

            dataset = build_dataset(self.cfg.data, "train", self.cfg.model.upscale, train=False)
            self._cache["calibration"] = calibration_images(dataset, self.calib_images, self.imgsz)
        return self._cache["calibration"]

    def _quantize_onnx(self, precision: str) -> Path:
        if precision == "int8-qdq":
            if self.int8_onnx_path is not None:
                return self.int8_onnx_path
            from sdconet.deploy.exporter import DEFAULT_INT8_EXCLUDE, DEFAULT_INT8_OP_TYPES, MSDA_EXCLUDE_PATTERN
            from sdconet.deploy.quantize import quantize_int8, write_calibration_data

            fp32 = self.fp32_onnx()  # an export failure is an error of its own, not a quantization one
            calib = write_calibration_data(self.calibration(), self.work_dir / "bench_calib.npz")
            out = self.work_dir / "bench_int8_qdq.onnx"
            # the exporter's shipped INT8 defaults (exclusions, op types), so the timed graph is the one it gates
            quantize_int8(fp32, out, calib, exclude_nodes=[MSDA_EXCLUDE_PATTERN, *DEFAULT_INT8_EXCLUDE],
                          op_types_to_quantize=DEFAULT_INT8_OP_TYPES)
            return out
        from sdconet.deploy.cpu_quantize import quantize_onnxruntime_int8
        from sdconet.deploy.exporter import DEFAULT_INT8_EXCLUDE

        fp32 = self.fp32_onnx()
        out = self.work_dir / "bench_cpu_int8.onnx"
        quantize_onnxruntime_int8(fp32, out, self.calibration(), exclude=DEFAULT_INT8_EXCLUDE)
        return out

    def openvino_int8(self) -> Path:
        """NNCF INT8 IR (training-split calibration images), made once: of the plugin-mode ONNX (the fused MSDA op
        stays fp32, the OpenVINO fp32 rows' graph), or of the user's ``--onnx`` as given."""
        def make() -> Path:
            from sdconet.deploy.cpu_quantize import quantize_openvino_int8
            from sdconet.deploy.exporter import DEFAULT_INT8_EXCLUDE

            out = self.work_dir / "bench_openvino_int8.xml"
            quantize_openvino_int8(self.onnx_path or self.plugin_onnx(), out, self.calibration(),
                                   exclude=DEFAULT_INT8_EXCLUDE)
            return out

        path = _cached_artifact(self, "openvino_int8", make)
        if isinstance(path, str):
            raise RunnerUnavailable(path)
        return path

    def runner(self, backend: str, precision: str, **options: Any) -> Runner:
        """The runner of ``backend`` for ``precision``, opened once per (backend, precision, options)."""
        key = ("runner", backend, precision, tuple(sorted(options.items())))
        if key not in self._cache:
            try:
                self._cache[key] = runner_class(backend).for_benchmark(self, precision, **options)
            except RunnerUnavailable as err:
                self._cache[key] = err
        value = self._cache[key]
        if isinstance(value, RunnerUnavailable):
            raise value
        return value

    def close(self) -> None:
        for key, value in list(self._cache.items()):
            if isinstance(value, Runner):
                value.close()
                del self._cache[key]


def _skipped(record: dict[str, Any], reason: str) -> dict[str, Any]:
    record["status"] = f"skipped: {reason}"
    return record


def _fill(record: dict[str, Any], stats, batch: int, peak_mb: float) -> dict[str, Any]:
    record.update(stats.summary(batch))
    record["peak_mem_mb"] = round(peak_mb, 1)
    return record


def variant_of(options: dict[str, Any]) -> str | None:
    names = (("compile", "compile_model"), ("cudagraphs", "cuda_graphs"))
    return "+".join(name for name, key in names if options.get(key)) or None


# ----------------------------------------------------------------------------------------------------------------
def run_runner(ctx: BenchContext, backend: str, precision: str, batch: int, **options: Any) -> dict[str, Any]:
    """Time ``backend`` at ``precision`` (as its runner opens it) on ``batch`` images; a record either way."""
    record = ctx.base_record(backend, precision, batch, variant_of(options))
    try:
        runner = ctx.runner(backend, precision, **options)
    except RunnerUnavailable as err:
        return _skipped(record, str(err))
    except RunnerError as err:  # e.g. an --engine that does not deserialize here
        record["status"] = f"error: {err}"
        return record
    except Exception as err:  # noqa: BLE001 - e.g. the on-the-fly export failed: say so in the record, go on
        log.exception("%s/%s: could not open the runner", backend, precision)
        record["status"] = f"error: {type(err).__name__}: {err}"
        return record
    label_matches = runner.precision == precision or (precision == "int8-qdq" and runner.precision == "int8")
    if not label_matches:  # the artifact decides (e.g. one TensorRT engine asked for as fp32 and fp16)
        record["precision"], record["requested_precision"] = runner.precision, precision
    notes = {k: v for k, v in runner.describe().items() if k not in _BASE_DESCRIBE and k not in record}
    record.update(notes)
    # the same artifact (engine / model file, provider, ...) at the same precision is timed once
    identity = json.dumps([backend, record["precision"], batch, record.get("variant"), notes], sort_keys=True,
                          default=str)
    timed = ctx._cache.setdefault("timed", {})
    if identity in timed:
        return _skipped(record, f"the same {backend} artifact ({runner.precision}) is already timed in the record "
                                f"asked for as {timed[identity]}")
    try:
        call: Callable[[], Any] = runner.timed_call(ctx.images(batch))
    except (RunnerError, ValueError) as err:  # e.g. a batch above the engine's profile
        return _skipped(record, str(err))
    timed[identity] = f"{precision}/b{batch}"  # only once it is really timed
    cuda = runner.uses_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    stats = time_calls(call, ctx.warmup, ctx.iters, cuda=cuda)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return _fill(record, stats, batch, peak)


def _cached_artifact(ctx: BenchContext, key: str, make: Callable[[], Path]) -> Path | str:
    """``make()`` once per context; a failure is cached as its reason (a string) so the other records still run."""
    key = f"artifact:{key}"
    if key not in ctx._cache:
        try:
            ctx._cache[key] = make()
        except Exception as err:  # noqa: BLE001 - a quantizer missing/failing skips its rows, not the benchmark
            log.exception("%s could not be made", key)
            ctx._cache[key] = f"{key.split(':', 1)[1]} quantization failed: {type(err).__name__}: {err}"
    return ctx._cache[key]


# ----------------------------------------------------------------------------------------------------------------
def run_triton(ctx: BenchContext, precision: str, batch: int, protocol: str = "http",
               cpu_runtime: str = "auto") -> dict[str, Any]:
    """End-to-end through a real Triton server (the cpu deployment) with the load generator.

    ``cpu_runtime`` is detector_cpu's runtime (``RepositoryOptions.cpu_runtime``): ``onnxruntime`` on the fp32 pure
    ONNX, ``openvino`` on the plugin-mode ONNX with the fused MSDA op (fp32, bf16 where the CPU has it), ``auto`` =
    openvino where openvino and the fused kernel are available, as the exporter decides. ``batch`` is the number of
    requests in flight (one image each); the server's dynamic batcher forms the batches. Images are sent as raw
    uint8 arrays already at the engine size, so preprocessing only converts them.
    """
    if cpu_runtime == "auto":
        from sdconet.kernels.cpu import fused_cpu_kernel_ready

        cpu_runtime = "openvino" if fused_cpu_kernel_ready() else "onnxruntime"
    record = ctx.base_record("triton", precision, batch, variant=f"{protocol}+{cpu_runtime}")
    supported = {"onnxruntime": ("fp32",), "openvino": ("fp32", "bf16")}.get(cpu_runtime)
    if supported is None:
        return _skipped(record, f"unknown cpu runtime {cpu_runtime!r} (onnxruntime, openvino or auto)")
    if precision not in supported:
        return _skipped(record, f"the cpu deployment on {cpu_runtime} serves {', '.join(supported)} here")
    try:
        from sdconet.serve.triton_repo import RepositoryOptions, build_repository
        from sdconet.serve.loadgen import sweep
        from sdconet.serve.server import ServerError, TritonServer
    except ImportError as err:
        return _skipped(record, f"serving extras missing ({err}); pip install 'sdconet[serving]'")
    key = f"triton_repo:{cpu_runtime}:{precision}"
    repo = ctx._cache.get(key)
    if repo is None:
        cpu_model = None
        if cpu_runtime == "openvino":
            from sdconet.runtime.openvino_runner import cpu_capabilities

            if precision == "bf16" and "BF16" not in cpu_capabilities():
                return _skipped(record, f"bf16 needs a CPU with AVX512-BF16 or AMX (OpenVINO reports "
                                        f"{', '.join(cpu_capabilities())})")
            cpu_model = ctx.onnx_path or ctx.plugin_onnx()
        repo = build_repository(ctx.work_dir / f"triton_repo_{cpu_runtime}_{precision}", onnx_path=ctx.fp32_onnx(),
                                backend="cpu", imgsz=ctx.imgsz, max_batch=max(8, batch),
                                class_names=ctx.class_names, cpu_model=cpu_model,
                                options=RepositoryOptions(cpu_runtime=cpu_runtime, cpu_precision=precision,
                                                          cpu_threads=ctx.threads or 0))
        ctx._cache[key] = repo
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (ctx.imgsz, ctx.imgsz, 3), dtype=np.uint8) for _ in range(4)]
    try:
        with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:  # distinct free ports
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


# backends timed by something other than their runner (end to end through a server)
SERVING_BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {"triton": run_triton}
BACKENDS = tuple(RUNTIME_RUNNERS)


def _known_precisions() -> tuple[str, ...]:
    """The base precisions plus any other a registered runner class declares (its ``precisions`` attribute)."""
    found = list(BASE_PRECISIONS)
    for backend in RUNTIME_RUNNERS:
        try:
            runner_cls = runner_class(backend)
        except Exception as err:  # noqa: BLE001 - a broken optional runtime must not break the CLI
            log.debug("cannot import %s (%s)", RUNTIME_RUNNERS[backend], err)
            continue
        found += [p for p in getattr(runner_cls, "precisions", ()) if p not in found]
    return tuple(found)


PRECISIONS = _known_precisions()


def run_benchmark(ctx: BenchContext, backend: str, precision: str, batch: int, **options: Any) -> dict[str, Any]:
    """One record for (backend, precision, batch, options)."""
    if backend in SERVING_BENCHMARKS:
        return SERVING_BENCHMARKS[backend](ctx, precision, batch, **options)
    return run_runner(ctx, backend, precision, batch, **options)

