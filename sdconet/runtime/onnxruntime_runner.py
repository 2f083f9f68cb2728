"""ONNX Runtime: the one place ONNX Runtime sessions are opened (:func:`ort_session`) and its runner.

Both MSDA modes run: a pure graph as it is, a plugin-node graph (TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` or
our own plugin) with the nodes bound to the NumPy implementation of the plugin's semantics through
onnxruntime-extensions (:mod:`sdconet.kernels.msda_plugin`); the artifact on disk is never changed.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sdconet.runtime.base import Runner, RunnerError, RunnerUnavailable
from sdconet.runtime.metadata import ORT_DOMAINS, onnx_model_info

# tried in this order when the caller names no providers; only those this onnxruntime build has are used
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in PREFERRED_PROVIDERS if p in available]


def ort_session(model, threads: int | None = None, providers: Sequence[str] | None = None, *,
                log_severity: int | None = None, optimization_level: str | None = None):
    """An ``onnxruntime.InferenceSession`` for ``model`` (path or ``onnx.ModelProto``), pure or plugin-node graph.

    Nodes outside ONNX Runtime's domains are taken to be MSDA plugin nodes (the only custom nodes this package
    exports) and run on CPU as the plugin's NumPy reference; such graphs get ``CPUExecutionProvider`` only.
    ``providers`` default to ``CPUExecutionProvider``. ``optimization_level``: ``disable`` | ``basic`` | ``extended``
    | ``all`` (ONNX Runtime's default).
    """
    import onnx
    import onnxruntime as ort

    from sdconet.kernels import msda_plugin

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if log_severity is not None:
        options.log_severity_level = log_severity
    if optimization_level is not None:
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization_level not in levels:
            raise ValueError(f"optimization_level must be one of {sorted(levels)}, got {optimization_level!r}")
        options.graph_optimization_level = levels[optimization_level]
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    plugin_types = sorted({n.op_type for n in model.graph.node if n.domain not in ORT_DOMAINS})
    if plugin_types:
        model = msda_plugin.ort_compatible_model(model, plugin_types)
        for op_type in plugin_types:
            attributes = {a.name: a.type for n in model.graph.node if n.op_type == op_type for a in n.attribute}
            library = msda_plugin.register_ort_custom_op(op_type, attributes)
        options.register_custom_ops_library(library)
        providers = ["CPUExecutionProvider"]  # the Python custom op runs on host memory
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


class OnnxRuntimeRunner(Runner):
    """An exported detector ONNX (pure or plugin-node) on ONNX Runtime.

    Args:
        model: path of the ONNX, or an ``onnx.ModelProto``.
        threads: intra-op threads (default: ONNX Runtime's choice, all cores).
        providers: execution providers (default: the best of TensorRT, CUDA, CPU this build has).
        class_names: override the names the ONNX (or its export report) carries.
    """

    backend = "onnxruntime"
    precisions = ("fp32", "int8")

    def __init__(self, model, threads: int | None = None, providers: Sequence[str] | None = None, *,
                 class_names: Sequence[str] | None = None, optimization_level: str | None = None) -> None:
        if importlib.util.find_spec("onnxruntime") is None:
            raise RunnerUnavailable("onnxruntime is not installed (pip install 'sdconet[export]')")
        import onnx

        self.path = None if isinstance(model, onnx.ModelProto) else Path(model)
        if self.path is not None:
            if not self.path.is_file():
                raise RunnerError(f"ONNX model not found: {self.path}")
            model = onnx.load(str(self.path))
        info = onnx_model_info(model, self.path, class_names)
        self.info = info
        dims = model.graph.input[0].type.tensor_type.shape.dim
        static_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        super().__init__(imgsz=info["imgsz"], class_names=info["class_names"], precision=info["precision"],
                         max_batch=static_batch, has_saliency="saliency" in info["outputs"])
        self.msda = info["msda"]
        self.session = ort_session(model, threads, providers or default_providers(),
                                   optimization_level=optimization_level)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def _run(self, images: np.ndarray) -> Mapping[str, Any]:
        return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: images})))

    @classmethod
    def for_benchmark(cls, bench: Any, precision: str, **options: Any) -> "OnnxRuntimeRunner":
        """The benchmark's fp32 ONNX, its ONNX Runtime INT8 (``int8``) or ModelOpt Q/DQ (``int8-qdq``) version, all
        graph optimisations on."""
        if precision in ("fp16", "bf16"):
            raise RunnerUnavailable(f"{precision} ONNX variants are built for TensorRT only (use --backend tensorrt)")
        # the class names do not change latency, and a quantized ONNX made on the fly carries none
        return cls(bench.onnx(precision), threads=bench.threads, optimization_level="all",
                   class_names=bench.class_names, **options)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"provider": self.provider, "msda": self.msda,
                                     "onnx": str(self.path) if self.path else None}

    def close(self) -> None:
        self.session = None
