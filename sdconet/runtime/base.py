"""The one runner interface every runtime implements (torch, ONNX Runtime, OpenVINO, TensorRT, Triton).

A runner holds one deployed detector and maps a batch of network inputs to the detector's outputs:

    runner.run(images)   images: float32 [B, 3, S, S] RGB in [0, 1] (NumPy), S = runner.imgsz
                         -> {"boxes": [B, K, 4] float32 xyxy in network-input pixels,
                             "scores": [B, K] float32, "labels": [B, K] int64,
                             "saliency": [B, 1, h, w] float32 (only when runner.has_saliency)}

Tiles smaller than ``imgsz`` are zero-padded bottom/right by the caller (``pad_to_input``): the exported graphs take
only ``images`` (no padding mask), so every backend sees identical tensors and agrees with the others.

Properties: ``imgsz`` (fixed input side; ``None`` = any size, e.g. eager torch), ``class_names``, ``precision``
(the precision the artifact actually runs in, read from its metadata, never from a CLI flag), ``max_batch``
(``None`` = unbounded), ``has_saliency``, ``backend``. Runners are context managers; ``close()`` frees them.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Mapping, Sequence

import numpy as np

DETECTION_KEYS = ("boxes", "scores", "labels")
SALIENCY_KEY = "saliency"
# The one default score threshold of the project: pictures, GeoJSON, the client and the server's postprocess.
DEFAULT_SCORE_THRESHOLD = 0.3


class RunnerError(RuntimeError):
    """A runner cannot be opened or run; the message names the artifact and what to do."""


class RunnerUnavailable(RunnerError):
    """The runtime is not installed or the hardware is missing (tests skip with this message)."""


class Runner(abc.ABC):
    """Base class of every runtime. Subclasses set the attributes below in ``__init__`` and implement ``_run``."""

    backend: str = "?"
    uses_cuda: bool = False  # benchmarks synchronise CUDA around each timed call and report CUDA peak memory
    precisions: tuple[str, ...] = ("fp32",)  # what the runtime can run (the benchmark CLI offers their union)

    def __init__(self, *, imgsz: int | None, class_names: Sequence[str], precision: str,
                 max_batch: int | None = None, has_saliency: bool = False) -> None:
        self.imgsz = imgsz
        self.class_names = list(class_names)
        self.precision = precision
        self.max_batch = max_batch
        self.has_saliency = has_saliency

    # -- the interface ----------------------------------------------------------------------------------------
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Detector outputs for ``images`` [B, 3, S, S] float32 in [0, 1] (see the module docstring)."""
        images = self.check_input(images)
        outputs = self._run(images)
        return normalize_outputs(outputs)

    __call__ = run

    @abc.abstractmethod
    def _run(self, images: np.ndarray) -> Mapping[str, Any]:
        """Backend-specific forward pass on a checked, contiguous float32 batch."""

    def close(self) -> None:
        """Free sessions, engines, connections. Idempotent."""

    def describe(self) -> dict[str, Any]:
        """What a report records about this runner."""
        return {"backend": self.backend, "precision": self.precision, "imgsz": self.imgsz,
                "max_batch": self.max_batch, "num_classes": len(self.class_names),
                "has_saliency": self.has_saliency}

    # -- benchmarks (sdconet.benchmark.runners) --------------------------------------------------------------------
    @classmethod
    def for_benchmark(cls, bench: Any, precision: str, **options: Any) -> "Runner":
        """This runtime opened on the benchmark's model at ``precision``, or RunnerUnavailable(reason) when it cannot
        run here or has no such precision (the record then reads ``skipped: <reason>``).

        ``bench`` is a ``sdconet.benchmark.runners.BenchContext``: ``cfg``, ``state_dict``, ``imgsz``, ``threads``,
        ``graph(msda_impl)``, ``onnx(precision)`` (the ONNX of that precision, exported on the fly; raises
        RunnerUnavailable), ``engine_paths``, ``work_dir``. The record's precision is the opened runner's
        ``precision`` (the artifact's), not the one asked for. A new runtime is timed by implementing this hook.
        """
        raise RunnerUnavailable(f"the {cls.backend} runtime has no benchmark hook (Runner.for_benchmark)")

    def timed_call(self, images: np.ndarray) -> Callable[[], Any]:
        """A zero-argument call of the backend's forward on ``images``, with everything that can be staged done
        beforehand (input checks, device copies, buffer allocation): what the benchmarks time."""
        checked = self.check_input(images)
        return lambda: self._run(checked)

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shared checks --------------------------------------------------------------------------------------
    def check_input(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.backend} runner: images must be [B, 3, H, W], got shape {list(images.shape)}")
        if self.imgsz is not None and images.shape[2:] != (self.imgsz, self.imgsz):
            raise ValueError(f"{self.backend} runner: this model takes {self.imgsz}x{self.imgsz} inputs, got "
                             f"{images.shape[2]}x{images.shape[3]} (pad tiles with pad_to_input)")
        if self.max_batch is not None and images.shape[0] > self.max_batch:
            raise ValueError(f"{self.backend} runner: batch {images.shape[0]} exceeds the model's max batch "
                             f"{self.max_batch}")
        return np.ascontiguousarray(images, dtype=np.float32)


def normalize_outputs(outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Outputs as NumPy with the contract's dtypes (labels int64, the rest float32); unknown keys dropped."""
    result: dict[str, np.ndarray] = {}
    for key in DETECTION_KEYS + (SALIENCY_KEY,):
        if key not in outputs or outputs[key] is None:
            continue
        value = outputs[key]
        if hasattr(value, "detach"):  # torch tensor on any device
            value = value.detach().float().cpu().numpy() if key != "labels" else value.detach().cpu().numpy()
        value = np.asarray(value)
        result[key] = value.astype(np.int64 if key == "labels" else np.float32, copy=False)
    missing = [k for k in DETECTION_KEYS if k not in result]
    if missing:
        raise RunnerError(f"runner output lacks {missing} (got {sorted(outputs)})")
    return result


def sorted_by_score(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Boxes/scores/labels of each image in descending score order (ties broken by x1), so that the outputs of two
    backends, whose top-k may order equal scores differently, compare one to one. Shapes as in ``run``."""
    result: dict[str, list[np.ndarray]] = {key: [] for key in DETECTION_KEYS}
    for b in range(outputs["scores"].shape[0]):
        order = np.lexsort((outputs["boxes"][b, :, 0], -outputs["scores"][b]))
        for key in DETECTION_KEYS:
            result[key].append(np.asarray(outputs[key][b])[order])
    return {key: np.stack(values) for key, values in result.items()}


def pad_to_input(tiles: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Stack ``[3, h, w]`` float tiles (h, w <= size) into ``[B, 3, size, size]``, zero-padded bottom/right."""
    batch = np.zeros((len(tiles), 3, size, size), dtype=np.float32)
    for i, tile in enumerate(tiles):
        if tile.shape[0] != 3 or tile.shape[1] > size or tile.shape[2] > size:
            raise ValueError(f"tile {i} of shape {list(tile.shape)} does not fit a {size}x{size} input")
        batch[i, :, :tile.shape[1], :tile.shape[2]] = tile
    return batch
