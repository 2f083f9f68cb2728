"""Eager PyTorch: the deploy graph (``InferenceGraph``) of a checkpoint, on CPU or CUDA, fp32 or autocast.

The graph is called with ``images`` only (no padding mask), exactly as the exported graphs are, so the torch runner
and every exported backend see identical tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from sdconet.config import Config, lr_image_size
from sdconet.runtime.base import Runner, RunnerError, RunnerUnavailable
from sdconet.utils.cpu import cpu_model_name, has_native_bf16

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
TRAINING_SIZE = "training"  # imgsz default: the run's training LR size


def default_imgsz(cfg: Config) -> int:
    """LR side the run was trained on (:func:`sdconet.config.lr_image_size`)."""
    return lr_image_size(cfg)


class TorchRunner(Runner):
    """A trained SDCoNet's deploy graph in eager PyTorch.

    Args:
        checkpoint: weights file or run directory (``resolve_checkpoint``); or give ``graph`` + ``cfg``, or ``cfg``
            (+ ``state_dict``; random weights without one).
        device: ``cpu`` / ``cuda[:i]`` (default: CUDA when available).
        msda_impl: MSDA implementation (default: ``gather`` on CPU, ``auto`` = the Triton kernel on CUDA); ignored
            with ``graph``.
        precision: ``fp32`` | ``bf16`` (autocast, CPU and CUDA) | ``fp16`` (CUDA autocast).
        imgsz: input side the runner accepts; default the run's training LR size; ``None`` accepts any size.
        with_saliency: return the saliency map (default: whether the model has saliency on).
        class_names: default: the checkpoint's ``category_names``, else ``class_<i>``.
    """

    backend = "torch"
    precisions = PRECISIONS

    def __init__(self, checkpoint: str | Path | None = None, *, graph: torch.nn.Module | None = None,
                 cfg: Config | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                 meta: Mapping[str, Any] | None = None, device: str | torch.device | None = None,
                 msda_impl: str | None = None, precision: str = "fp32", imgsz: int | None | str = TRAINING_SIZE,
                 with_saliency: bool | None = None, class_names: Sequence[str] | None = None,
                 runs_dir: str | Path = "runs") -> None:
        if precision not in PRECISIONS:
            raise RunnerError(f"torch runner: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RunnerUnavailable(f"torch runner: device {self.device} asked for, but no CUDA device is visible")
        if precision == "fp16" and self.device.type != "cuda":
            raise RunnerUnavailable("fp16 autocast needs a CUDA device (CPU autocast runs bf16: use precision bf16)")
        self.msda_impl = msda_impl or ("auto" if self.device.type == "cuda" else "gather")
        meta = dict(meta or {})
        if graph is None:
            from sdconet.engine.inference_graph import build_inference_graph, load_inference_graph

            if checkpoint is not None:
                from sdconet.engine.checkpoint import read_checkpoint_metadata, resolve_checkpoint

                path = resolve_checkpoint(checkpoint, runs_dir=runs_dir)
                cfg, _ = read_checkpoint_metadata(path)
                saliency = cfg.model.saliency.enabled if with_saliency is None else with_saliency
                graph, cfg, meta = load_inference_graph(path, msda_impl=self.msda_impl, with_saliency=saliency)
            elif cfg is not None:
                saliency = cfg.model.saliency.enabled if with_saliency is None else with_saliency
                graph = build_inference_graph(cfg, state_dict, msda_impl=self.msda_impl, with_saliency=saliency)
            else:
                raise RunnerError("torch runner: give a checkpoint, a cfg, or a graph and its cfg")
        elif cfg is None and imgsz == TRAINING_SIZE:
            raise RunnerError("torch runner: a prebuilt graph needs its cfg (or an explicit imgsz)")
        self.cfg = cfg
        self.graph = graph.eval().to(self.device)
        if class_names is None:
            class_names = meta.get("category_names") or None
        if class_names is None:
            if cfg is None:
                raise RunnerError("torch runner: a prebuilt graph without its cfg needs class_names (or meta with "
                                  "category_names)")
            class_names = [f"class_{i}" for i in range(cfg.model.detector.num_classes)]
        super().__init__(imgsz=default_imgsz(cfg) if imgsz == TRAINING_SIZE else imgsz, class_names=class_names,
                         precision=precision, max_batch=None,
                         has_saliency=bool(getattr(self.graph, "with_saliency", False)))
        self._autocast_dtype = _AUTOCAST.get(precision)
        self.compile_model = False  # benchmark variants (for_benchmark): torch.compile, CUDA-graph replay
        self.cuda_graphs = False

    def forward(self, images: torch.Tensor, module: Callable | None = None) -> dict[str, torch.Tensor]:
        """The graph's (or ``module``'s, e.g. its compiled form) outputs by name for a tensor already on
        ``self.device`` (no checks, no copies)."""
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self._autocast_dtype,
                                                    enabled=self._autocast_dtype is not None):
            return dict(zip(self.graph.output_names, (module or self.graph)(images)))

    def _run(self, images: np.ndarray) -> Mapping[str, Any]:
        return self.forward(torch.from_numpy(images).to(self.device))

    @property
    def uses_cuda(self) -> bool:
        return self.device.type == "cuda"

    # -- benchmarks -----------------------------------------------------------------------------------------------
    @classmethod
    def for_benchmark(cls, bench: Any, precision: str, compile_model: bool = False,
                      cuda_graphs: bool = False) -> "TorchRunner":
        """The benchmark's graph on CUDA when there is one, else CPU; bf16 autocast runs on both (on a CPU only
        with native bf16)."""
        if precision not in PRECISIONS:
            raise RunnerUnavailable(f"{precision} is measured on ONNX Runtime (Q/DQ) and TensorRT, not eager PyTorch")
        cuda = torch.cuda.is_available()
        if (compile_model or cuda_graphs) and not cuda:
            raise RunnerUnavailable("torch.compile / CUDA graphs are timed on GPU only; no CUDA device here")
        if precision == "bf16" and not cuda and not has_native_bf16():
            # emulated bf16 is many times slower than fp32: timing it says nothing about bf16 on capable CPUs
            raise RunnerUnavailable(f"bf16 autocast on this CPU ({cpu_model_name()}) would be emulated: it has no "
                                    f"AMX-BF16/AVX512-BF16")
        msda_impl = "auto" if cuda else "gather"  # auto = the Triton kernel on CUDA
        runner = cls(graph=bench.graph(msda_impl), cfg=bench.cfg, device="cuda" if cuda else "cpu",
                     msda_impl=msda_impl, precision=precision, imgsz=bench.imgsz)
        runner.compile_model, runner.cuda_graphs = compile_model, cuda_graphs
        return runner

    def timed_call(self, images: np.ndarray) -> Callable[[], Any]:
        staged = torch.from_numpy(self.check_input(images)).to(self.device)
        module = torch.compile(self.graph, mode="max-autotune-no-cudagraphs") if self.compile_model else None

        def call() -> Any:
            return self.forward(staged, module)

        return _capture_cuda_graph(call) if self.cuda_graphs else call

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"device": str(self.device), "msda_impl": self.msda_impl}

    def close(self) -> None:
        self.graph = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _capture_cuda_graph(call: Callable[[], Any]) -> Callable[[], Any]:
    """Warm up on a side stream, capture one call into a CUDA graph, and return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay
