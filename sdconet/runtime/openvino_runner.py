"""OpenVINO on the CPU: an exported detector (plugin-mode ONNX with the fused MSDA op, pure ONNX, or an INT8 model).

* plugin-mode ONNX (``MultiscaleDeformableAttnPlugin_TRT`` / our ``sdconet`` plugin nodes): the nodes become the
  fused C++ op of :mod:`sdconet.kernels.cpu` (built at setup, or here at first use); the fastest path
  (docs/cpu-runtime.md);
* pure ONNX: the gather-decomposed MSDA runs as OpenVINO's own ops;
* ``precision="bf16"``: OpenVINO's ``INFERENCE_PRECISION_HINT`` (matrix work on AVX512-BF16 / AMX); refused on a CPU
  whose OpenVINO plugin does not report BF16;
* ``precision="int8"``: an NNCF-quantized model (OpenVINO IR ``.xml`` or ONNX with Q/DQ nodes), e.g. from
  ``sdconet.deploy.cpu_quantize``, which quantizes the plugin-mode ONNX so that the IR keeps the fused MSDA op in
  fp32 (loaded here like for the ONNX); the model must be quantized, the flag alone quantizes nothing.

Models are compiled for a static batch (OpenVINO's CPU plugin is faster on static shapes): one compiled model per
batch size seen, compiled at its first call (a few seconds for the paper-size model).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sdconet.runtime.base import Runner, RunnerError, RunnerUnavailable

PRECISIONS = ("fp32", "bf16", "int8")
HINTS = ("latency", "throughput")
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 layers come from the model's FakeQuantize
# IR op set of the fused op (sdconet::MultiscaleDeformableAttn): an IR holding it needs the extension too
_IR_CUSTOM_OPSET = 'version="sdconet"'


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def cpu_capabilities() -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU (e.g. ``FP32``, ``BF16``, ``INT8``)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@functools.lru_cache(maxsize=None)
def _pinned_library(path: str) -> ctypes.CDLL:
    """A process-lifetime handle on the extension library. OpenVINO unloads an extension's library with the last
    ``ov.Core`` that added it, while models read by that core may still hold the fused op, whose destructor then
    jumps into unmapped code (a segfault seen when a quantizer's local core was released before its model)."""
    return ctypes.CDLL(path)


def load_msda_extension(core) -> Path:
    """Add the fused MSDA extension (:mod:`sdconet.kernels.cpu`, built at first use) to ``core``; returns its path.
    Raises :class:`sdconet.kernels.cpu.KernelBuildError` when it cannot be built here."""
    import openvino  # noqa: F401  (libopenvino, which the extension links to, is loaded first)

    from sdconet.kernels.cpu import extension_path

    path = extension_path()
    _pinned_library(str(path))
    core.add_extension(str(path))
    return path


def _model_info(path: Path, class_names: Sequence[str] | None) -> tuple[dict[str, Any], bool]:
    """(metadata as :func:`sdconet.runtime.metadata.onnx_model_info` gives it, needs the MSDA extension)."""
    from sdconet.runtime.metadata import onnx_model_info

    if path.suffix == ".xml":
        # an IR carries no ONNX metadata: use the ONNX it was converted from when it lies next to it
        sibling = next((p for p in (path.with_suffix(".onnx"), path.with_suffix(".plugin.onnx")) if p.is_file()),
                       None)
        needs_extension = _IR_CUSTOM_OPSET in path.read_text(errors="ignore")
        if sibling is not None:
            import onnx

            info = onnx_model_info(onnx.load(str(sibling), load_external_data=False), sibling, class_names)
        elif class_names:
            info = {"class_names": list(class_names), "imgsz": None, "outputs": None, "msda": None,
                    "precision": None, "version": None}
        else:
            raise RunnerError(f"{path}: an OpenVINO IR carries no class names and no ONNX of the same name lies "
                              f"next to it; pass class_names")
        return info, needs_extension
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    info = onnx_model_info(model, path, class_names)
    return info, info["msda"] not in (None, "onnx")


class OpenVINORunner(Runner):
    """An exported detector on OpenVINO's CPU plugin.

    Args:
        model: path of a plugin-mode or pure ONNX (``.onnx``) or an OpenVINO IR (``.xml``).
        precision: ``fp32`` | ``bf16`` (inference precision hint; needs BF16 hardware) | ``int8`` (the model must be
            quantized: Q/DQ ONNX or an NNCF IR).
        threads: ``INFERENCE_NUM_THREADS`` (default: OpenVINO's choice, all cores).
        hint: ``latency`` (one stream using every thread, the batch in one request) or ``throughput`` (several
            streams; each image of a batch is one request, run asynchronously).
        streams: ``NUM_STREAMS`` of the throughput hint (default: OpenVINO's choice; on 2 cores it picks 2 streams
            of 1 thread, the config measured best for batch > 1 on a loaded 2-core machine, docs/cpu-runtime.md).
        class_names: override the names the model (or its export report) carries.
        config: extra OpenVINO CPU properties, passed to ``compile_model`` as they are.
    """

    backend = "openvino"
    precisions = PRECISIONS

    def __init__(self, model: str | Path, precision: str = "fp32", threads: int | None = None, *,
                 hint: str = "latency", streams: int | None = None, class_names: Sequence[str] | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        if not openvino_available():
            raise RunnerUnavailable("openvino is not installed (pip install 'sdconet[cpu]')")
        if precision not in PRECISIONS:
            raise RunnerError(f"openvino runner: precision must be one of {', '.join(PRECISIONS)}, got "
                              f"{precision!r}")
        if hint not in HINTS:
            raise RunnerError(f"openvino runner: hint must be one of {', '.join(HINTS)}, got {hint!r}")
        if threads is not None and threads < 1:
            raise RunnerError(f"openvino runner: threads must be >= 1, got {threads}")
        if streams is not None and (hint != "throughput" or streams < 1):
            raise RunnerError(f"openvino runner: streams={streams} needs hint='throughput' and streams >= 1 (the "
                              f"latency hint runs one stream)")
        import openvino as ov

        self.path = Path(model)
        if not self.path.is_file():
            raise RunnerError(f"openvino runner: model not found: {self.path}")
        info, needs_extension = _model_info(self.path, class_names)
        self.info = info
        artifact_int8 = info["precision"] == "int8" or (self.path.suffix == ".xml" and "FakeQuantize" in
                                                        self.path.read_text(errors="ignore"))
        if precision == "int8" and not artifact_int8:
            raise RunnerError(f"openvino runner: precision int8 needs a quantized model (NNCF IR or Q/DQ ONNX, "
                              f"sdconet/deploy/cpu_quantize.py); {self.path} is not quantized")
        if precision != "int8" and artifact_int8:
            raise RunnerError(f"openvino runner: {self.path} is an INT8 model; open it with precision='int8'")
        self.core = ov.Core()
        if precision == "bf16" and "BF16" not in cpu_capabilities():
            raise RunnerUnavailable(
                f"openvino runner: bf16 needs a CPU with AVX512-BF16 or AMX; this one "
                f"({self.core.get_property('CPU', 'FULL_DEVICE_NAME')}) reports "
                f"{', '.join(cpu_capabilities())} only: use precision fp32 (or int8)")
        self.extension = None
        if needs_extension:
            from sdconet.kernels.cpu import KernelBuildError

            try:
                self.extension = load_msda_extension(self.core)
            except KernelBuildError as err:
                raise RunnerUnavailable(f"openvino runner: {self.path} has MSDA plugin nodes, which need the fused "
                                        f"CPU kernel: {err}") from err
        try:
            self.model = self.core.read_model(str(self.path))
        except RuntimeError as err:
            raise RunnerError(f"openvino runner: cannot read {self.path}: {err}") from err
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": hint.upper(),
                                       "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision]}
        if threads is not None:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        if streams is not None:
            self.config["NUM_STREAMS"] = int(streams)
        self.config.update(config or {})
        self.hint, self.threads, self.streams = hint, threads, streams
        batch_dim = self.model.inputs[0].get_partial_shape()[0]
        static_batch = batch_dim.get_length() if batch_dim.is_static else None
        if static_batch == 1 and self.path.suffix == ".xml":
            # NNCF's IR is quantized at batch 1 (sdconet.deploy.cpu_quantize) but reshapes to any batch at compile
            # time (the export's reshapes read ShapeOf, no batch is baked in); the throughput hint runs batch-1
            # requests anyway
            static_batch = None
        outputs = info["outputs"] or [o.get_any_name() for o in self.model.outputs]
        self.output_names = list(outputs)
        super().__init__(imgsz=info["imgsz"] or _static_side(self.model), class_names=info["class_names"],
                         precision=precision, max_batch=static_batch,
                         has_saliency="saliency" in outputs)
        self.msda = "fused" if needs_extension else "onnx"
        self._compiled: dict[int, Any] = {}
        self._queue = None  # AsyncInferQueue of the throughput hint, made at its first batch

    @classmethod
    def for_benchmark(cls, bench: Any, precision: str, **options: Any) -> "OpenVINORunner":
        """fp32/bf16: the plugin-mode ONNX of the benchmark's graph (fused MSDA), or the user's ``--onnx`` as given;
        int8: the benchmark's NNCF IR (``bench.openvino_int8()``)."""
        if precision not in cls.precisions:
            raise RunnerUnavailable(f"openvino runs {', '.join(cls.precisions)}, not {precision}")
        if not openvino_available():
            raise RunnerUnavailable("openvino is not installed (pip install 'sdconet[cpu]')")
        if precision == "int8":
            path = bench.openvino_int8()  # NNCF IR, made once per benchmark
        else:
            path = bench.onnx_path or bench.plugin_onnx()
        return cls(path, precision=precision, threads=bench.threads, class_names=bench.class_names, **options)

    # ------------------------------------------------------------------------------------------------------------
    def compiled(self, batch: int):
        """(compiled model, its infer request) for a static ``batch`` (cached per batch size)."""
        if batch not in self._compiled:
            model = self.model.clone()
            side = self.imgsz
            if side is None:
                raise RunnerError(f"openvino runner: {self.path} has no fixed input size to compile for")
            model.reshape({model.inputs[0]: [batch, 3, side, side]})
            try:
                compiled = self.core.compile_model(model, "CPU", self.config)
            except RuntimeError as err:
                raise RunnerError(f"openvino runner: compiling {self.path} for batch {batch} failed: {err}") from err
            self._compiled[batch] = (compiled, compiled.create_infer_request())
        return self._compiled[batch]

    def _run(self, images: np.ndarray) -> Mapping[str, Any]:
        batch = images.shape[0]
        if self.hint == "throughput" and batch > 1:
            return self._run_streams(images)
        compiled, request = self.compiled(batch)
        result = request.infer({0: images}, share_inputs=True)  # no copy of the checked, contiguous batch
        return {self._output_name(out): np.array(result[out]) for out in compiled.outputs}

    def _output_name(self, output) -> str:
        """The contract name of an output (OpenVINO may list a tensor under several names, e.g. '/Mod_output_0')."""
        names = output.get_names()
        return next((n for n in self.output_names if n in names), output.get_any_name())

    def _run_streams(self, images: np.ndarray) -> Mapping[str, Any]:
        """Throughput hint: one batch-1 request per image, run asynchronously on the streams OpenVINO chose."""
        import openvino as ov

        if self._queue is None:
            compiled = self.compiled(1)[0]
            self._queue = ov.AsyncInferQueue(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        results: list[Any] = [None] * images.shape[0]

        def done(request, index: int) -> None:
            results[index] = {self._output_name(out): np.array(request.get_tensor(out).data)
                              for out in request.model_outputs}

        self._queue.set_callback(done)
        for index in range(images.shape[0]):
            self._queue.start_async({0: images[index:index + 1]}, index)
        self._queue.wait_all()
        return {key: np.concatenate([r[key] for r in results]) for key in results[0]}

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"model": str(self.path), "msda": self.msda, "hint": self.hint,
                                     "threads": self.threads, "streams": self.streams,
                                     "extension": str(self.extension) if self.extension else None}

    def close(self) -> None:
        self._queue = None
        self._compiled.clear()


def _static_side(model) -> int | None:
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.get_length() == 4 and shape[2].is_static and shape[2] == shape[3]:
        return shape[2].get_length()
    return None

