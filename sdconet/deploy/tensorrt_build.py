"""TensorRT engine build through the documented Python API (TensorRT 10.x and 11.x).

* TensorRT 10: weakly typed network; ``BuilderFlag.FP16`` for FP16, ``FP16 + INT8`` for a Q/DQ (explicitly quantized)
  ONNX — implicit INT8 calibrators are deprecated since 10.6 and never used here.
* TensorRT 11: strongly typed only (the builder flags above are gone); precision comes from the ONNX itself: an FP16
  ONNX from ModelOpt AutoCast, or the Q/DQ ONNX for INT8. ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is set
  (required to opt in on 10.x, accepted and ignored on 11.x).

Both: ``init_libnvinfer_plugins`` (TensorRT's built-in plugins, incl. ``MultiscaleDeformableAttnPlugin_TRT``), extra
plugin libraries loaded into the plugin registry (``--plugin-lib``), one optimisation profile over the batch range,
and a timing cache that is read before and written after the build.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from sdconet.utils.logging import get_logger

LOG = get_logger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message is the exact reason."""


def tensorrt_unavailable_reason() -> str | None:
    """None when an engine can be built here, else the precise reason (used by the exporter and test skips)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # the PyPI stub raises at import time without NVIDIA's index
        return (f"tensorrt not importable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                f"the PyPI 'tensorrt' wheels are download stubs that need NVIDIA's package index, and TensorRT "
                f"needs an NVIDIA GPU")
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False): TensorRT builds need an NVIDIA GPU"
    return None


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except Exception:
        return None
    return trt.__version__


def tensorrt_major() -> int:
    import tensorrt as trt

    return int(trt.__version__.split(".")[0])


@dataclass
class EngineBuildOptions:
    """What to build: precision, batch range (one optimisation profile), workspace, caches, plugin libraries."""

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_gib: float = 4.0
    timing_cache: str | None = None
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


def trt_logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def load_plugins(logger, plugin_libs: Sequence[str] = ()) -> None:
    """Register TensorRT's built-in plugins and load extra plugin libraries into the global registry."""
    import tensorrt as trt

    trt.init_libnvinfer_plugins(logger, "")
    registry = trt.get_plugin_registry()
    for lib in plugin_libs:
        LOG.info("loading TensorRT plugin library %s", lib)
        registry.load_library(str(lib))


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: EngineBuildOptions) -> dict:
    """Parse ``onnx_path``, build and write the serialized engine; returns build facts for the metadata JSON.

    For TensorRT 11 the ONNX must already carry its precision (FP16 ONNX or Q/DQ ONNX); for TensorRT 10 the FP32 or
    Q/DQ ONNX is built with the precision flags of ``options.precision``.
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt

    options.validate()
    logger = trt_logger()
    load_plugins(logger, options.plugin_libs)
    if options.sdconet_plugin:
        from sdconet.kernels.trt_plugin import register_msda_plugin

        register_msda_plugin()
    major = tensorrt_major()
    strongly_typed = major >= 11
    builder = trt.Builder(logger)
    if strongly_typed:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif major < 10:  # TensorRT 8.x (JetPack 5/6.0): the ONNX parser needs an explicit-batch network
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    else:  # explicit batch is the only mode from TensorRT 10 on
        flags = 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}")

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

    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.exists() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    LOG.info("building TensorRT %s engine (%s, batch %d..%d) from %s", trt.__version__, options.precision,
             options.min_batch, options.max_batch, onnx_path)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    return {"tensorrt_version": trt.__version__, "strongly_typed": strongly_typed, "gpu": gpu_name(),
            "host": platform.node(), "build_seconds": round(seconds, 1), "input_shapes": shapes, "outputs": outputs,
            "options": asdict(options) | {"plugin_libs": [str(p) for p in options.plugin_libs]}}
