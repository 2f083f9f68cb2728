"""TensorRT engine build through the documented Python API (TensorRT 10.x and 11.x).

* TensorRT 10: weakly typed network; ``BuilderFlag.FP16`` for FP16, ``FP16 + INT8`` for a Q/DQ (explicitly quantized)
  ONNX — implicit INT8 calibrators are deprecated since 10.6 and never used here.
* TensorRT 11: strongly typed only (the builder flags above are gone); precision comes from the ONNX itself: an FP16
  ONNX from ModelOpt AutoCast, or the Q/DQ ONNX for INT8. A graph whose types do not give the requested precision is
  refused (an FP32 ONNX would silently build an FP32 engine). ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is set
  only there (every 11.x network is strongly typed, the flag is accepted); 10.x builds stay weakly typed, so that the
  FP32 ONNX builds FP16 with the flag.

Both: ``init_libnvinfer_plugins`` (TensorRT's built-in plugins, incl. ``MultiscaleDeformableAttnPlugin_TRT``), extra
plugin libraries loaded into the plugin registry (``--plugin-lib``), one optimisation profile over the batch range,
a timing cache read before and written after the build (checked: a cache from another TensorRT version or GPU is
replaced by a fresh one; the default file is keyed by both), and a ``<engine>.json`` sidecar with the build facts —
above all the precision the engine actually has, which runners and benchmarks report instead of a CLI flag.

The one TensorRT import guard is :mod:`sdconet.utils.tensorrt` (re-exported here); the sidecar format lives with the
other artifact formats in :mod:`sdconet.runtime.metadata`.
"""
from __future__ import annotations

import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from sdconet.runtime.metadata import engine_metadata_path, read_engine_metadata, write_engine_metadata  # noqa: F401
from sdconet.utils.io import write_atomically
from sdconet.utils.logging import get_logger
from sdconet.utils.tensorrt import (TensorRTUnavailable, import_tensorrt, is_strongly_typed_only,  # noqa: F401
                                    load_plugins, tensorrt_major, tensorrt_unavailable_reason, tensorrt_version,
                                    trt_logger, version_major)

LOG = get_logger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class EngineBuildOptions:
    """What to build: precision, batch range (one optimisation profile), workspace, caches, plugin libraries."""

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_gib: float = 4.0
    timing_cache: str | None = None  # explicit cache file; None = default_timing_cache_path(timing_cache_dir, ...)
    timing_cache_dir: str | None = None  # where the default, version- and GPU-keyed cache lives; None = no cache
    plugin_libs: Sequence[str] = field(default_factory=tuple)
    sdconet_plugin: bool = False  # register our AOT Python plugin (sdconet.kernels.trt_plugin) before parsing
    builder_optimization_level: int | None = None

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got '{self.precision}'")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min_batch}, "
                             f"{self.opt_batch}, {self.max_batch}")
        for lib in self.plugin_libs:
            if not Path(lib).is_file():
                raise FileNotFoundError(f"--plugin-lib {lib}: file not found")


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# --------------------------------------------------------------------------------------------------------------------
# Timing cache
# --------------------------------------------------------------------------------------------------------------------
def default_timing_cache_path(directory: str | Path, trt_version: str, gpu: str | None) -> Path:
    """``<directory>/timing_trt<version>_<gpu>.cache``: TensorRT rejects a cache from another version or device, so
    each (version, GPU) pair gets its own file instead of one file that every other machine would invalidate."""
    gpu_slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu or "unknown-gpu").strip("-") or "unknown-gpu"
    version_slug = re.sub(r"[^A-Za-z0-9.]+", "-", trt_version)
    return Path(directory) / f"timing_trt{version_slug}_{gpu_slug}.cache"


def attach_timing_cache(config, cache_bytes: bytes, source: str) -> str:
    """Give ``config`` (an ``IBuilderConfig``) a timing cache: the serialized one in ``cache_bytes`` when TensorRT
    accepts it, else a fresh one. Returns ``"loaded"``, ``"fresh"`` (nothing to load) or ``"rejected"``.

    ``set_timing_cache(cache, ignore_mismatch=False)`` returns False for a cache written by another TensorRT version
    or GPU; without this check the build would run without a cache and ``get_timing_cache()`` afterwards may fail.
    """
    if cache_bytes:
        cache = config.create_timing_cache(cache_bytes)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return "loaded"
        LOG.warning("TensorRT rejected the timing cache %s (written by another TensorRT version or GPU, or corrupt); "
                    "building with a fresh cache, which will replace it", source)
        status = "rejected"
    else:
        status = "fresh"
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise RuntimeError("TensorRT could not create an empty timing cache")
    return status


# --------------------------------------------------------------------------------------------------------------------
# Precision of a strongly typed build
# --------------------------------------------------------------------------------------------------------------------
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def onnx_precision_evidence(onnx_path: str | Path) -> dict[str, int]:
    """What in an ONNX file fixes its precision under strong typing (TensorRT 11 takes types from the graph).

    Returns counts: ``qdq_nodes`` (QuantizeLinear/DequantizeLinear), ``fp16_tensors`` (FP16 initializers, typed
    values and Constant nodes) and ``fp16_casts`` (Cast nodes to FP16). Weights are not loaded.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    fp16 = onnx.TensorProto.FLOAT16
    typed = (*graph.input, *graph.value_info, *graph.output)
    fp16_tensors = sum(v.type.tensor_type.elem_type == fp16 for v in typed)
    fp16_tensors += sum(init.data_type == fp16 for init in graph.initializer)
    fp16_casts = 0
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == fp16:
                fp16_casts += 1
            elif node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == fp16:
                fp16_tensors += 1
    qdq = sum(node.op_type in _QDQ_OPS for node in graph.node)
    return {"qdq_nodes": qdq, "fp16_tensors": fp16_tensors, "fp16_casts": fp16_casts}


def precision_from_evidence(evidence: dict[str, int]) -> str:
    """The precision a strongly typed engine of a graph with ``evidence`` runs in: int8 with Q/DQ, fp16 with FP16
    tensors, else fp32."""
    if evidence.get("qdq_nodes", 0):
        return "int8"
    if evidence.get("fp16_tensors", 0) or evidence.get("fp16_casts", 0):
        return "fp16"
    return "fp32"


def check_build_precision(requested: str, evidence: dict[str, int], strongly_typed: bool, what: str) -> str:
    """The precision the engine will actually have, or ``ValueError`` when it would not be ``requested``.

    Weakly typed builds (TensorRT < 11) get FP16 from the builder flag, so any FP32 ONNX builds FP16; INT8 always
    needs Q/DQ nodes (no calibrator is used). Strongly typed builds (TensorRT 11) take every type from the graph: an
    FP32 ONNX builds an FP32 engine whatever was requested, so it is refused instead of mislabelled.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{requested}'")
    if requested == "int8" and not evidence.get("qdq_nodes", 0):
        raise ValueError(f"{what}: INT8 needs a Q/DQ ONNX (explicit quantization, e.g. export/build_engine.py "
                         f"--int8); this graph has no QuantizeLinear/DequantizeLinear node")
    if not strongly_typed:
        return requested
    actual = precision_from_evidence(evidence)
    if actual != requested:
        fix = {"fp16": "pass the ModelOpt AutoCast FP16 ONNX (export/build_engine.py --fp16 writes "
                       "<name>.fp16.onnx)",
               "fp32": "pass the FP32 ONNX", "int8": "pass the Q/DQ ONNX"}[requested]
        raise ValueError(f"{what}: TensorRT 11 builds strongly typed engines whose precision comes from the graph; "
                         f"this graph would build an {actual.upper()} engine ({evidence}), not the requested "
                         f"{requested.upper()}: {fix}")
    return actual


def network_precision_evidence(network, trt) -> dict[str, int]:
    """:func:`onnx_precision_evidence` for a parsed ``INetworkDefinition`` (what the builder really sees)."""
    qdq_types = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
    qdq = fp16 = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        qdq += layer.type in qdq_types
        fp16 += sum(layer.get_output(j).dtype == trt.float16 for j in range(layer.num_outputs))
    return {"qdq_nodes": qdq, "fp16_tensors": fp16, "fp16_casts": 0}


# --------------------------------------------------------------------------------------------------------------------
def build_engine(onnx_path: str | Path, engine_path: str | Path, options: EngineBuildOptions) -> dict:
    """Parse ``onnx_path``, build and write the serialized engine and its ``.json`` sidecar; returns the build facts.

    For TensorRT 11 the ONNX must already carry its precision (FP16 AutoCast ONNX or Q/DQ ONNX): a graph whose types
    do not give ``options.precision`` is refused (:func:`check_build_precision`). For TensorRT 10 the FP32 or Q/DQ
    ONNX is built with the precision flags of ``options.precision``. ``facts["precision"]`` is the engine's actual
    precision.
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        raise TensorRTUnavailable(reason)
    trt = import_tensorrt()

    options.validate()
    strongly_typed = is_strongly_typed_only(trt.__version__)
    check_build_precision(options.precision, onnx_precision_evidence(onnx_path), strongly_typed, str(onnx_path))
    logger = trt_logger()
    load_plugins(logger, options.plugin_libs)
    plugin_facts: dict = {}
    if options.sdconet_plugin:
        from sdconet.kernels.trt_plugin import compiled_kernel_facts, register_msda_plugin

        register_msda_plugin()
        compiled_kernel_facts.clear()  # an earlier build in this process compiled its own kernels
        plugin_facts = compiled_kernel_facts  # filled by the plugin's aot_impl while the builder runs
    major = version_major(trt.__version__)
    builder = trt.Builder(logger)
    if strongly_typed:  # every TensorRT 11 network is strongly typed; the flag is accepted there and says so
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif major < 10:  # TensorRT 8.x (JetPack 5/6.0): the ONNX parser needs an explicit-batch network
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    else:  # TensorRT 10: explicit batch is the only mode; weakly typed, precision from the builder flags below
        flags = 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}")
    network_evidence = network_precision_evidence(network, trt)
    precision = check_build_precision(options.precision, network_evidence, strongly_typed,
                                      f"{onnx_path} (as parsed by TensorRT)")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    if options.builder_optimization_level is not None:
        config.builder_optimization_level = options.builder_optimization_level
    if not strongly_typed and options.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # layers left unquantized by Q/DQ run in FP16
        if options.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # enables the explicit Q/DQ INT8 kernels; no calibrator

    profile = builder.create_optimization_profile()
    shapes = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        dims = list(tensor.shape)
        if any(d < 0 for d in dims[1:]):
            raise RuntimeError(f"input '{tensor.name}' has dynamic non-batch dims {dims}; export a fixed --imgsz")
        sizes = [[batch, *dims[1:]] for batch in (options.min_batch, options.opt_batch, options.max_batch)]
        profile.set_shape(tensor.name, *sizes)
        shapes[tensor.name] = {"min": sizes[0], "opt": sizes[1], "max": sizes[2]}
    config.add_optimization_profile(profile)

    device = gpu_name()
    if options.timing_cache:
        cache_path: Path | None = Path(options.timing_cache)
    elif options.timing_cache_dir:
        cache_path = default_timing_cache_path(options.timing_cache_dir, trt.__version__, device)
    else:
        cache_path = None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache_status = attach_timing_cache(config, cache_bytes, str(cache_path))

    LOG.info("building TensorRT %s engine (%s, batch %d..%d) from %s", trt.__version__, precision,
             options.min_batch, options.max_batch, onnx_path)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    # atomic writes: a build killed or out of disk here leaves the previous engine / cache, never a truncated one
    engine_path = write_atomically(engine_path, lambda tmp: tmp.write_bytes(bytes(serialized)))
    if cache_path:
        cache = bytes(config.get_timing_cache().serialize())
        write_atomically(cache_path, lambda tmp: tmp.write_bytes(cache))
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    facts = {"precision": precision, "requested_precision": options.precision, "tensorrt_version": trt.__version__,
             "strongly_typed": strongly_typed, "network_types": network_evidence, "gpu": device,
             "host": platform.node(), "build_seconds": round(seconds, 1), "input_shapes": shapes, "outputs": outputs,
             "plugin_libs": [str(Path(p).resolve()) for p in options.plugin_libs],
             "timing_cache": {"path": str(cache_path) if cache_path else None, "status": cache_status},
             "options": asdict(options) | {"plugin_libs": [str(p) for p in options.plugin_libs]}}
    if plugin_facts:
        facts["sdconet_plugin_kernels"] = {f"{k[0]}/block_q{k[1]}": v for k, v in dict(plugin_facts).items()}
    write_engine_metadata(engine_path, facts)
    return facts
