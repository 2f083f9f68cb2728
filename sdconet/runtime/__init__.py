"""Runtimes: one runner interface (``Runner``), one module per runtime, one factory (``open_runner``).

Each runtime lives in its own module and registers itself in ``RUNNERS`` under its backend name; adding a runtime is
one new file plus one line here. Heavy imports (onnxruntime, openvino, tensorrt, tritonclient) happen inside the
runtime's module, so importing this package is cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from sdconet.runtime.base import (DEFAULT_SCORE_THRESHOLD, DETECTION_KEYS, SALIENCY_KEY, Runner, RunnerError,
                                  RunnerUnavailable, normalize_outputs, pad_to_input, sorted_by_score)

# backend name -> "module:class"; modules are imported on first use
RUNNERS: dict[str, str] = {
    "torch": "sdconet.runtime.torch_runner:TorchRunner",
    "onnxruntime": "sdconet.runtime.onnxruntime_runner:OnnxRuntimeRunner",
    "openvino": "sdconet.runtime.openvino_runner:OpenVINORunner",
    "tensorrt": "sdconet.runtime.tensorrt_runner:TensorRTRunner",
    "triton": "sdconet.runtime.triton_runner:TritonRunner",
}


def runner_class(backend: str) -> type[Runner]:
    """The runner class of ``backend`` (see ``RUNNERS``), its module imported on first use."""
    if backend not in RUNNERS:
        raise RunnerError(f"unknown backend {backend!r}; choose from {', '.join(sorted(RUNNERS))}")
    module_name, class_name = RUNNERS[backend].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def open_runner(backend: str, **kwargs: Any) -> Runner:
    """Open a runner of ``backend`` (see ``RUNNERS``); keyword arguments go to that runner's constructor."""
    return runner_class(backend)(**kwargs)


__all__ = ["DEFAULT_SCORE_THRESHOLD", "DETECTION_KEYS", "RUNNERS", "Runner", "RunnerError", "RunnerUnavailable",
           "SALIENCY_KEY", "normalize_outputs", "open_runner", "pad_to_input", "runner_class", "sorted_by_score"]
