"""The one TensorRT import guard, below everything that touches TensorRT (the engine builder in ``sdconet.deploy``,
the plugin in ``sdconet.kernels``, the runner in ``sdconet.runtime``): importing, versions, logger and plugin
libraries.

The PyPI ``tensorrt`` wheels are download stubs that raise at import time with arbitrary exception types (not only
ImportError), so everything is caught and named here; callers get :class:`TensorRTUnavailable` with the reason.
"""
from __future__ import annotations

import re
from typing import Sequence

from sdconet.utils.logging import get_logger

LOG = get_logger(__name__)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message is the exact reason."""


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` with the reason.

    The one import guard for TensorRT in this package: the PyPI ``tensorrt`` wheels are download stubs that raise at
    import time with arbitrary exception types (not only ImportError), so everything is caught and named here.
    """
    try:
        import tensorrt
    except Exception as err:  # noqa: BLE001 - the stub's exception type is not ImportError
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise TensorRTUnavailable(
            f"tensorrt not importable ({type(err).__name__}: {first_line}); the PyPI 'tensorrt' wheels are download "
            f"stubs that need NVIDIA's package index, and TensorRT needs an NVIDIA GPU") from err
    if not hasattr(tensorrt, "__version__") or not hasattr(tensorrt, "Builder"):
        raise TensorRTUnavailable(f"the importable 'tensorrt' ({getattr(tensorrt, '__file__', '?')}) is not NVIDIA's "
                                  f"TensorRT Python bindings (no __version__/Builder)")
    return tensorrt


def tensorrt_unavailable_reason() -> str | None:
    """None when an engine can be built here, else the precise reason (used by the exporter and test skips)."""
    try:
        import_tensorrt()
    except TensorRTUnavailable as err:
        return str(err)
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False): TensorRT builds need an NVIDIA GPU"
    return None


def tensorrt_version() -> str | None:
    try:
        return import_tensorrt().__version__
    except TensorRTUnavailable:
        return None


def version_major(version: str) -> int:
    """``"10.13.0.35"`` -> 10."""
    match = re.match(r"\s*(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a major version from TensorRT version {version!r}")
    return int(match.group(1))


def tensorrt_major() -> int:
    return version_major(import_tensorrt().__version__)


def is_strongly_typed_only(version: str) -> bool:
    """TensorRT 11 removed weak typing: precision comes from the network's own tensor types."""
    return version_major(version) >= 11


def trt_logger():
    trt = import_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def load_plugins(logger, plugin_libs: Sequence[str] = ()) -> None:
    """Register TensorRT's built-in plugins and load extra plugin libraries into the global registry."""
    trt = import_tensorrt()
    trt.init_libnvinfer_plugins(logger, "")
    registry = trt.get_plugin_registry()
    for lib in plugin_libs:
        LOG.info("loading TensorRT plugin library %s", lib)
        if registry.load_library(str(lib)) is None:
            raise RuntimeError(f"TensorRT could not load the plugin library {lib} (see the TensorRT log above)")
