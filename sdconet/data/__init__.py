"""Data layer: COCO dataset + collate, degradation, augmentations, synthetic data, converters, splitter, stats.

The trainer, evaluator and exporter use :func:`build_dataset`, :func:`collate_fn` and :func:`degrade` (the one
HR -> LR function). The command line is ``python -m sdconet.data`` (see docs/data.md).
"""
from __future__ import annotations

import importlib

# lazy (PEP 562): reading a raster (sdconet.data.raster) or an image must not pull in torch and the dataset stack
_EXPORTS = {"CocoDetection": "dataset", "build_dataset": "dataset", "collate_fn": "dataset",
            "DEGRADATION_MODES": "degradation", "RealisticDegradation": "degradation", "degrade": "degradation",
            "SYNTHETIC_CATEGORIES": "synthetic", "ensure_synthetic_dataset": "synthetic", "DataError": "validation"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sdconet.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sdconet.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
