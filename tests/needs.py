"""Skip-or-fail rules shared by the test modules.

Dependencies that ``make setup`` installs (torch, torchvision, timm, scipy, rasterio, onnx, onnxruntime, openvino,
nncf, tritonclient, nvidia-pytriton) are imported plainly by the test modules: a broken install fails the run
instead of skipping a module. What is left here is for the parts that may truly be absent:

* :func:`optional_import` skips only when the top package itself is missing (``ModuleNotFoundError`` naming it);
  any other import error (a broken wheel, a missing shared library, a missing submodule) propagates and fails.
* :func:`unavailable` skips with the reason, except under ``CI=true`` where a part that ``make setup`` provides
  (the ModelOpt venv once it exists, the fused MSDA CPU kernel, the bundled tritonserver) must work: there it fails.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def optional_import(name: str, reason: str | None = None) -> ModuleType:
    """``import name``; skip only if its top-level package is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name.split(".")[0]:
            raise  # the package is there but broken (or one of its own imports is missing): fail
        pytest.skip(reason or f"{name} is not installed")


def unavailable(reason: str) -> None:
    """Skip with ``reason``; under CI=true fail instead (the part is one that ``make setup`` provides)."""
    if in_ci():
        pytest.fail(f"CI=true and a part that `make setup` provides is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def require_modelopt() -> None:
    """Skip when no ModelOpt interpreter exists; when one exists but cannot import ModelOpt, fail under CI=true."""
    from sdconet.deploy.quantize import modelopt_python, modelopt_unavailable_reason

    reason = modelopt_unavailable_reason()
    if reason is None:
        return
    if modelopt_python().exists():
        unavailable(f"ModelOpt is broken: {reason}")
    pytest.skip(f"INT8 export needs ModelOpt: {reason}")
