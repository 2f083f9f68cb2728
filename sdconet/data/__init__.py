"""Data layer: COCO dataset + collate, degradation, augmentations, synthetic data, converters, splitter, stats.

The trainer, evaluator and exporter use :func:`build_dataset`, :func:`collate_fn` and :func:`degrade` (the one
HR -> LR function). The command line is ``python -m sdconet.data`` (see docs/data.md).
"""
from sdconet.data.dataset import CocoDetection, build_dataset, collate_fn
from sdconet.data.degradation import DEGRADATION_MODES, RealisticDegradation, degrade
from sdconet.data.synthetic import SYNTHETIC_CATEGORIES, ensure_synthetic_dataset
from sdconet.data.validation import DataError

__all__ = ["CocoDetection", "build_dataset", "collate_fn", "degrade", "RealisticDegradation", "DEGRADATION_MODES",
           "SYNTHETIC_CATEGORIES", "ensure_synthetic_dataset", "DataError"]
