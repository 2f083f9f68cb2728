"""The deploy graph: one wrapper module used by ONNX export, benchmarks and parity tests.

``InferenceGraph(model)(images)`` with ``images [B, 3, H, W]`` float32 RGB in [0, 1] (the model normalises
internally) returns ``(boxes [B, K, 4] xyxy input pixels, scores [B, K], labels [B, K] int32)`` plus
``saliency [B, 1, H_0, W_0]`` (finest level) when built with ``with_saliency=True``. No SR decoder, no denoising:
it is ``SDCoNet.infer``. Shapes are static for a fixed input size; only the batch varies.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from sdconet.config import Config

INPUT_NAME = "images"
DETECTION_OUTPUTS = ("boxes", "scores", "labels")
SALIENCY_OUTPUT = "saliency"


class InferenceGraph(nn.Module):
    """``model.infer`` with int32 labels and a fixed output tuple (ONNX/TensorRT/Triton friendly)."""

    def __init__(self, model: nn.Module, with_saliency: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.with_saliency = with_saliency

    @property
    def output_names(self) -> tuple[str, ...]:
        return DETECTION_OUTPUTS + ((SALIENCY_OUTPUT,) if self.with_saliency else ())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.infer(images)
        outputs = (out["boxes"], out["scores"], out["labels"].to(torch.int32))
        return outputs + ((out["saliency"],) if self.with_saliency else ())


def build_inference_graph(cfg: Config, state_dict: dict[str, torch.Tensor] | None, *, msda_impl: str,
                          with_saliency: bool = False) -> InferenceGraph:
    """Build ``cfg``'s model with MSDA implementation ``msda_impl`` (``gather`` for pure ONNX, ``plugin`` for the
    plugin node), load ``state_dict`` (weights of any MSDA implementation are interchangeable) and wrap it."""
    from sdconet.models import build_model

    cfg = copy.deepcopy(cfg)
    cfg.model.detector.msda_impl = msda_impl
    model = build_model(cfg.model)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        # the SR decoder is absent when the checkpoint comes from an sr=False run, and vice versa: both are harmless
        # for inference, but anything else missing means the checkpoint does not fit this config
        missing = [k for k in missing if not k.startswith("sr_decoder")]
        unexpected = [k for k in unexpected if not k.startswith("sr_decoder")]
        if any(k.endswith(".input_amax") for k in unexpected):
            raise RuntimeError("these weights hold QAT fake-quant ranges (*.input_amax) but the checkpoint has no "
                               "meta.qat: export a QAT run's own checkpoints (python export/build_engine.py "
                               "--checkpoint <qat run>/checkpoints/best.safetensors --int8), which rebuild the "
                               "fake-quant layers")
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the model config: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    return InferenceGraph(model, with_saliency=with_saliency).eval()


def load_inference_graph(checkpoint: str | Path, *, msda_impl: str, with_saliency: bool = False
                         ) -> tuple[InferenceGraph, Config, dict]:
    """(graph, config, checkpoint meta) from a weights file written by the trainer."""
    from sdconet.engine.checkpoint import load_model_weights

    cfg, state_dict, meta = load_model_weights(checkpoint)
    return build_inference_graph(cfg, state_dict, msda_impl=msda_impl, with_saliency=with_saliency), cfg, meta
