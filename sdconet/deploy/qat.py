"""Quantization-aware training (issue 21 item 3): fake-quant ``Linear`` / ``Conv2d`` layers in the INT8 scheme the
PTQ paths write, a short fine-tune of an FP32 checkpoint through the normal trainer, and the QAT checkpoint that the
exporter turns into a Q/DQ ONNX.

The scheme is TensorRT's explicit quantization, the one ModelOpt's ONNX PTQ writes: symmetric INT8 (zero point 0),
per-output-channel weight scales (``amax / 127`` of each channel), one per-tensor scale per activation input
(``amax`` calibrated as the maximum ``|x|`` over the calibration images, then fixed). Weights and inputs go through
``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine``, whose gradient is the
straight-through estimator inside the range and zero outside; torch's ONNX exporter writes them as
``QuantizeLinear`` / ``DequantizeLinear`` pairs, so the exported graph needs no extra tooling. This is torch's own
fake quantization, not ModelOpt's PyTorch quantizer: ModelOpt lives in a separate virtual environment
(``.venv-modelopt``, it pins its own onnx / numpy and pulls onnxruntime-gpu), which suits a one-shot ONNX subprocess
but not a training loop over this package; the two write the same Q/DQ format.

Layers kept in float are selected by regexes over module names (:data:`DEFAULT_QAT_EXCLUDE`): fewer than PTQ's
(``sdconet.deploy.exporter.DEFAULT_INT8_EXCLUDE``), because training recovers what PTQ loses in the Swin stem, the
neck and the deformable encoder; only the small heads that decide which tokens and boxes survive stay float.
The attention's activation x activation matmuls stay float (as ``MatMulConstBOnly`` does for ONNX Runtime), and the
MSDA sampling itself is never quantized (TensorRT's MSDA plugin has no INT8 kernel).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdconet.utils.logging import get_logger

QMIN, QMAX = -128, 127  # the ONNX int8 range; symmetric scales put weights in [-127, 127]
AMAX_SUFFIX = "input_amax"
LOG = get_logger(__name__)
# module-name regexes kept in float by default: the saliency (token selection) head, the foreground attention, the
# encoder-output proposal head and the decoder's box heads (together about 2 % of the MACs), plus the Swin patch
# embedding, the most sensitive small group of the INT8 study (benchmarks/results/int8_study.md, ~1 % of the MACs):
# calibrated with it in INT8 the scheme agreed 0.941 with FP32, without it 0.967 (INT8 MAC share 0.820; keeping the
# deformable encoder's value projections in float as well did not help: 0.963 at 0.801)
DEFAULT_QAT_EXCLUDE: tuple[str, ...] = (r".*saliency.*", r".*foreground_attn.*", r".*query_selection.*",
                                        r".*box_heads.*", r"sr_decoder\..*", r".*patch_embed.*")


class QATError(RuntimeError):
    """A QAT model or checkpoint cannot be built; the message says which file / field and why."""


class _FakeQuant:
    """Shared state and the two quantizers of :class:`QuantLinear` / :class:`QuantConv2d`.

    ``input_amax`` (buffer, scalar): the activation range, 0 until calibrated. ``quant_enabled``: fake quantization
    on (training, Q/DQ export) or off (the float twin of the same weights). ``calibrating``: record ``max |x|``.
    """

    quant_enabled: bool
    calibrating: bool
    input_amax: torch.Tensor

    def _init_quant(self) -> None:
        self.register_buffer(AMAX_SUFFIX, torch.zeros(()))
        self.quant_enabled = True
        self.calibrating = False

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.input_amax.copy_(torch.maximum(self.input_amax, x.detach().abs().max().float()))
            return x
        if not self.quant_enabled:
            return x
        if float(self.input_amax) <= 0:
            raise QATError("a fake-quant layer runs before calibration (input_amax is 0): call calibrate() first")
        scale = (self.input_amax / QMAX).to(x.dtype).reshape(1)
        return torch.fake_quantize_per_tensor_affine(x, scale, torch.zeros(1, dtype=torch.int32), QMIN, QMAX)

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled or self.calibrating:
            return weight
        amax = weight.detach().abs().amax(dim=tuple(range(1, weight.dim()))).clamp_min(1e-8)
        zero = torch.zeros(weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, amax / QMAX, zero, 0, QMIN, QMAX)


class QuantLinear(nn.Linear, _FakeQuant):
    """``nn.Linear`` with fake-quantized input (per tensor) and weight (per output channel). Same parameters and
    state-dict keys as the float layer, plus ``input_amax``. Shapes: ``[..., in_features] -> [..., out_features]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_quant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantize_weight(self.weight), self.bias)


class QuantConv2d(nn.Conv2d, _FakeQuant):
    """``nn.Conv2d`` with fake-quantized input and weight, as :class:`QuantLinear`. Shapes: ``[B, C_in, H, W] ->
    [B, C_out, H', W']``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantize_weight(self.weight), self.bias)


def _quant_twin(module: nn.Module) -> nn.Module:
    """The fake-quant layer that shares ``module``'s parameters (so an optimizer built afterwards trains them)."""
    if type(module) is nn.Linear:
        twin = QuantLinear(module.in_features, module.out_features, bias=module.bias is not None)
    else:
        twin = QuantConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                           padding=module.padding, dilation=module.dilation, groups=module.groups,
                           bias=module.bias is not None, padding_mode=module.padding_mode)
    twin.weight, twin.bias = module.weight, module.bias
    twin.train(module.training)
    return twin.to(module.weight.device)


def check_exclude(patterns: Iterable[str]) -> list[str]:
    patterns = list(patterns)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise QATError(f"QAT exclude pattern {pattern!r} is not a valid regex: {err}") from err
    return patterns


def prepare_qat(model: nn.Module, exclude: Sequence[str] = DEFAULT_QAT_EXCLUDE) -> list[str]:
    """Swap, in place, every plain ``nn.Linear`` / ``nn.Conv2d`` of ``model`` whose module name matches none of
    ``exclude`` for its fake-quant twin; returns the quantized module names (sorted). Idempotent."""
    patterns = [re.compile(p) for p in check_exclude(exclude)]
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) not in (nn.Linear, nn.Conv2d) or any(p.fullmatch(name) for p in patterns):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quant_twin(module))
        swapped.append(name)
    swapped += [n for n, m in model.named_modules() if isinstance(m, _FakeQuant) and n not in swapped]
    return sorted(set(swapped))


def quant_layers(model: nn.Module) -> dict[str, _FakeQuant]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _FakeQuant)}


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Fake quantization on (the INT8 model) or off (the float model of the same weights)."""
    for layer in quant_layers(model).values():
        layer.quant_enabled = enabled


@torch.no_grad()
def calibrate(model: nn.Module, images: np.ndarray | torch.Tensor, *, batch_size: int = 8) -> int:
    """Set every fake-quant layer's ``input_amax`` to ``max |x|`` over ``images`` (``[N, 3, S, S]`` LR images,
    run through ``model`` in eval mode as the inference graph runs them); returns how many layers saw data.
    Max, not a percentile: on the demo checkpoint the 99.99th / 99.9th percentile ranges cost agreement (0.83 /
    0.71 against 0.90 for max, before any training)."""
    layers = quant_layers(model)
    if not layers:
        raise QATError("calibrate: the model has no fake-quant layers (call prepare_qat first)")
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    was_training = model.training
    model.eval()
    for layer in layers.values():
        layer.input_amax.zero_()
        layer.calibrating = True
    try:
        for start in range(0, images.shape[0], batch_size):
            model(images[start:start + batch_size])
    finally:
        for layer in layers.values():
            layer.calibrating = False
        model.train(was_training)
    unseen = [name for name, layer in layers.items() if float(layer.input_amax) <= 0]
    if unseen:  # a layer the inference forward never runs (or that saw only zeros) cannot be quantized
        raise QATError(f"calibration left {len(unseen)} fake-quant layers without a range: {unseen[:5]}")
    return len(layers)


def split_qat_state(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(float weights, ``*.input_amax`` entries) of a QAT state dict."""
    amax = {k: v for k, v in state_dict.items() if k.endswith("." + AMAX_SUFFIX)}
    return {k: v for k, v in state_dict.items() if k not in amax}, amax


def load_qat_ranges(model: nn.Module, amax: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Load the ``input_amax`` of a QAT checkpoint into a prepared ``model`` (every layer needs one)."""
    layers = quant_layers(model)
    prefix_free = {k[: -len(AMAX_SUFFIX) - 1]: v for k, v in amax.items()}
    missing = sorted(set(layers) - set(prefix_free))
    extra = sorted(set(prefix_free) - set(layers))
    if missing or extra:
        raise QATError(f"{source}: the QAT ranges do not match the model's fake-quant layers (missing {missing[:3]}, "
                       f"unexpected {extra[:3]}); the checkpoint's qat.exclude must be the one it was trained with")
    for name, layer in layers.items():
        layer.input_amax.copy_(prefix_free[name])


def qat_meta(exclude: Sequence[str], quantized: Sequence[str], *, source: dict[str, Any],
             calibration_images: int) -> dict[str, Any]:
    """The ``qat`` entry of a QAT checkpoint's metadata (the exporter rebuilds the fake-quant model from it)."""
    return {"scheme": "int8 symmetric, per-channel weights, per-tensor activations (max calibration)",
            "exclude": list(exclude), "quantized_layers": len(quantized), "source": source,
            "calibration_images": int(calibration_images)}


# ----------------------------------------------------------------------------------------------------------------
# distillation from the FP32 model
# ----------------------------------------------------------------------------------------------------------------
DISTILL_MODES = ("pseudo", "none")
DEFAULT_DISTILL = "pseudo"
# teacher detections kept as targets: the gate's reference threshold (0.3) minus its margin, so every detection the
# agreement counts is a target, and the ones just under it keep their place in the ranking
DEFAULT_PSEUDO_THRESHOLD = 0.25
# 10: of 1 / 10 / 100 the best agreement at the default exclusions (docs/export.md, QAT table; SPR, demo checkpoint)
DEFAULT_FEATURE_WEIGHT = 10.0
# the activations the feature term compares: the neck's maps (what the quantized Swin encoder hands on) and the
# deformable encoder's memory (what the decoder reads); both have one row per spatial position, so they need no
# query alignment, which the top-k selections in between make unstable
FEATURE_MODULES = ("neck", "detector.encoder")


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a hooked module's output: the neck's ``(levels, masks)`` -> the level maps, the saliency
    encoder's ``(memory, tokens_per_layer)`` -> memory."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and output:
        first = output[0]
        return list(first) if isinstance(first, (tuple, list)) else [first] if isinstance(first, torch.Tensor) else []
    return []


class FP32Distiller:
    """Distillation of the QAT student from the FP32 model it starts from (the ``distiller`` of the Trainer).

    The gate asks INT8 to reproduce the FP32 model's boxes (IoU >= 0.9 with each FP32 detection >= 0.3), while
    training on ground truth lets QAT move them wherever the loss likes: on the demo checkpoint four epochs held AP
    (+0.15 pt) but kept only 0.59 of the FP32 detections. Two terms pull the student back to the teacher:

    * ``pseudo`` targets: each training batch's targets are replaced by the teacher's own detections scoring
      ``>= pseudo_threshold`` on the same (augmented) LR images, so the matching, box and denoising losses train
      the student towards the teacher's boxes and classes (hard labels, as DINO's self-training uses them);
    * a feature term, ``feature_weight`` x the mean squared error of the student's neck maps and encoder memory
      to the teacher's, each divided by the teacher's mean square (scale free): it needs no query alignment.

    ``prepare(batch)`` runs the teacher (no gradient) and returns the batch to train on; ``losses()`` returns the
    feature term of the step just run (``{"loss_distill_feat": ...}``, weighted).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, mode: str = DEFAULT_DISTILL,
                 pseudo_threshold: float = DEFAULT_PSEUDO_THRESHOLD,
                 feature_weight: float = DEFAULT_FEATURE_WEIGHT) -> None:
        if mode not in DISTILL_MODES:
            raise QATError(f"QAT distillation mode must be one of {DISTILL_MODES}, got {mode!r}")
        if not 0.0 < pseudo_threshold < 1.0:
            raise QATError(f"QAT pseudo-target threshold must be in (0, 1), got {pseudo_threshold}")
        if feature_weight < 0:
            raise QATError(f"QAT feature-distillation weight must be >= 0, got {feature_weight}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.mode, self.pseudo_threshold, self.feature_weight = mode, pseudo_threshold, feature_weight
        self._teacher_features: dict[str, list[torch.Tensor]] = {}
        self._student_features: dict[str, list[torch.Tensor]] = {}
        if feature_weight > 0:
            for name in FEATURE_MODULES:
                teacher.get_submodule(name).register_forward_hook(self._recorder(self._teacher_features, name))
                student.get_submodule(name).register_forward_hook(self._recorder(self._student_features, name))

    @staticmethod
    def _recorder(store: dict[str, list[torch.Tensor]], name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store[name] = _tensors(output)
        return hook

    @torch.no_grad()
    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        from sdconet.models.postprocess import full_image_sizes, valid_image_sizes
        from sdconet.ops.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

        self._student_features.clear()
        if self.mode == "none" and self.feature_weight == 0:
            return batch
        images, masks = batch["images_lr"], batch["masks_lr"]
        found = self.teacher.infer(images, masks)
        if self.mode == "none":
            return batch
        sizes = full_image_sizes(images) if masks is None else valid_image_sizes(masks)  # [B, 2] (h, w)
        targets = []
        for index, target in enumerate(batch["targets"]):
            keep = found["scores"][index] >= self.pseudo_threshold
            height, width = (float(v) for v in sizes[index])
            scale = found["boxes"].new_tensor([width, height, width, height])
            boxes = box_xyxy_to_cxcywh(found["boxes"][index][keep]) / scale
            hr = target["size"].to(boxes.device).flip(0).repeat(2).float()  # (w, h, w, h) of the HR image
            labels = found["labels"][index][keep].to(torch.int64)
            targets.append(dict(target, boxes=boxes, labels=labels, boxes_xyxy=box_cxcywh_to_xyxy(boxes) * hr,
                                ignore=torch.zeros(len(labels), dtype=torch.bool, device=boxes.device)))
        return dict(batch, targets=targets)

    def losses(self) -> dict[str, torch.Tensor]:
        if self.feature_weight == 0 or not self._student_features:
            return {}
        terms = []
        for name, student in self._student_features.items():
            for s, t in zip(student, self._teacher_features.get(name, [])):
                if s.shape == t.shape:
                    terms.append(F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12))
        self._student_features.clear()
        if not terms:
            return {}
        return {"loss_distill_feat": self.feature_weight * torch.stack(terms).mean()}


# ----------------------------------------------------------------------------------------------------------------
# the QAT fine-tune (driven by ``python train/run.py --qat``)
# ----------------------------------------------------------------------------------------------------------------
# a hundredth of the checkpoint's training lr: 0.1x moved the boxes away from the FP32 model (agreement 0.74 vs
# 0.89 at 0.01x, docs/export.md QAT table); 0.03x fell between (0.85)
DEFAULT_QAT_LR_SCALE = 0.01
DEFAULT_QAT_CALIB_IMAGES = 256
# which weights the run keeps as best.safetensors: "closest" = of the calibrated start (the scheme with no training)
# and the trained best, the one whose detections agree better with the FP32 model's on the validation split (what
# the INT8 gate asks for: measured here, training at any lr tried moved the boxes more than it repaired, table in
# docs/export.md); "trained" = the trained best by AP, as any training run
KEEP_MODES = ("closest", "trained")
DEFAULT_KEEP = "closest"


@torch.no_grad()
def agreement_with(teacher: nn.Module, student: nn.Module, loader, device: torch.device) -> dict[str, Any]:
    """:func:`sdconet.deploy.accuracy.detection_agreement` of ``student``'s detections with ``teacher``'s over
    ``loader``'s batches (``images_lr``, ``masks_lr``), both in eval mode, the gate's IoU and score thresholds."""
    from sdconet.deploy.accuracy import detection_agreement

    reference, candidate = [], []
    modes = (teacher.training, student.training)
    teacher.eval(), student.eval()
    try:
        for batch in loader:
            images, masks = batch["images_lr"].to(device), batch["masks_lr"].to(device)
            for store, model in ((reference, teacher), (candidate, student)):
                found = model.infer(images, masks)
                store.extend({key: found[key][i].float().cpu().numpy() if key != "labels" else
                              found[key][i].cpu().numpy() for key in ("boxes", "scores", "labels")}
                             for i in range(images.shape[0]))
    finally:
        teacher.train(modes[0]), student.train(modes[1])
    return detection_agreement(reference, candidate)


def keep_closest(trainer, teacher: nn.Module, calibrated: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Of the trained best checkpoint and the calibrated start, keep as ``best.safetensors`` the one whose
    detections agree better with ``teacher``'s on the validation split (ties keep the trained one); returns the
    record of the choice (also written into the kept file's ``meta.qat.selection``)."""
    from sdconet.engine.checkpoint import load_model_weights, save_model_weights
    from sdconet.engine.distributed import unwrap_model

    model, best = unwrap_model(trainer.model), trainer.paths.best
    _, trained_state, meta = load_model_weights(best)
    model.load_state_dict(trained_state)
    trained = agreement_with(teacher, model, trainer.val_loader, trainer.device)
    model.load_state_dict(calibrated)
    start = agreement_with(teacher, model, trainer.val_loader, trainer.device)
    kept = "calibrated" if (start["agreement"] or 0.0) > (trained["agreement"] or 0.0) else "trained"
    record = {"criterion": "agreement with the FP32 model on the validation split (the gate's IoU and score)",
              "images": len(trainer.val_set), "trained": trained, "calibrated": start, "kept": kept}
    if kept == "calibrated":
        metrics = trainer.evaluate()
        meta = meta | {"metrics": metrics, "epoch": 0, "note": "QAT: the calibrated start (no training) agreed "
                                                                "better with the FP32 model than the trained best"}
    else:
        model.load_state_dict(trained_state)
    meta["qat"] = dict(meta.get("qat", {}), selection=record)
    save_model_weights(model, trainer.cfg, best, meta)
    LOG.info("QAT keeps the %s weights: agreement with FP32 on %d validation images %.3f (trained) vs %.3f "
             "(calibrated)", kept, record["images"], trained["agreement"] or 0.0, start["agreement"] or 0.0)
    return record


def run_qat(checkpoint: str, out_dir: str, *, epochs: int = 4, lr_scale: float = DEFAULT_QAT_LR_SCALE,
            exclude: Sequence[str] = DEFAULT_QAT_EXCLUDE, calib_images: int = DEFAULT_QAT_CALIB_IMAGES,
            distill: str = DEFAULT_DISTILL, pseudo_threshold: float = DEFAULT_PSEUDO_THRESHOLD,
            feature_weight: float = DEFAULT_FEATURE_WEIGHT, keep: str = DEFAULT_KEEP,
            configure: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Fine-tune FP32 ``checkpoint`` with fake quantization for ``epochs`` at ``lr_scale`` x its training lr.

    Steps: build the checkpoint's model and load its weights, swap in the fake-quant layers (:func:`prepare_qat`),
    calibrate the activation ranges on ``calib_images`` training-split LR inputs (augmented crops when the split is
    smaller), then train with the normal :class:`sdconet.engine.trainer.Trainer` (same losses, schedule routing and
    checkpoints, all in routing stage 1: the SR decoder is not deployed, so it neither runs nor trains), distilled from the FP32 model
    (:class:`FP32Distiller`: ``distill`` "pseudo" trains on its detections >= ``pseudo_threshold`` instead of the
    ground truth, "none" on the ground truth; ``feature_weight`` > 0 adds the feature term). Every checkpoint of the run
    carries ``meta["qat"]`` (exclusions, source checkpoint, calibration size), which is what the exporter needs to
    write the Q/DQ ONNX (``python export/build_engine.py --checkpoint <out>/checkpoints/best.safetensors --int8``).
    ``configure``: applied to the checkpoint's config first (overrides, batch size, device).
    Returns the trainer's summary with ``qat`` added.
    """
    import copy
    import dataclasses
    import time
    from pathlib import Path

    from sdconet.config import ConfigError, lr_image_size
    from sdconet.data import build_dataset
    from sdconet.deploy.quantize import calibration_images
    from sdconet.engine.checkpoint import load_model_weights, resolve_checkpoint
    from sdconet.engine.distributed import resolve_device
    from sdconet.engine.inference_graph import InferenceGraph
    from sdconet.engine.routing import scale_epochs
    from sdconet.engine.trainer import Trainer
    from sdconet.models import build_model
    from sdconet.utils.io import sha256_of

    if epochs < 1:
        raise ConfigError(f"--qat needs --epochs >= 1, got {epochs}")
    if not lr_scale > 0:
        raise ConfigError(f"QAT lr scale must be > 0, got {lr_scale}")
    if keep not in KEEP_MODES:
        raise ConfigError(f"QAT keep must be one of {KEEP_MODES}, got {keep!r}")
    path = resolve_checkpoint(checkpoint)
    cfg, state_dict, meta = load_model_weights(path)
    if meta.get("qat"):
        raise QATError(f"{path} is already a QAT checkpoint (meta.qat); start QAT from the FP32 checkpoint "
                       f"{meta['qat'].get('source', {}).get('path', '(see its meta.qat.source)')}")
    if configure is not None:  # the CLI's overrides and flags (train/run.py), through its one config path
        cfg = configure(cfg)
    train = scale_epochs(cfg.train, epochs)
    # the whole run in routing stage 1: the QAT run trains the deployed detector; the SR decoder is neither run nor
    # trained (its loss would reach the shared encoder and move the features the gate compares)
    schedule = "full" if train.schedule == "joint" else train.schedule
    train = dataclasses.replace(train, lr=cfg.train.lr * lr_scale, stage1_epochs=train.epochs, schedule=schedule)
    cfg = dataclasses.replace(cfg, train=train)

    model = build_model(cfg.model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise QATError(f"{path} does not match its own config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    distilling = distill != "none" or feature_weight > 0
    teacher = copy.deepcopy(model) if distilling or keep == "closest" else None
    quantized = prepare_qat(model, exclude)
    distiller = (FP32Distiller(teacher, model, mode=distill, pseudo_threshold=pseudo_threshold,
                               feature_weight=feature_weight) if distilling else None)
    start = time.perf_counter()
    calib_set = build_dataset(cfg.data, "train", cfg.model.upscale, train=False)
    calib = calibration_images(calib_set, calib_images, lr_image_size(cfg))
    calibrate(InferenceGraph(model), calib)
    calib_seconds = time.perf_counter() - start
    info = qat_meta(exclude, quantized, source={"path": str(path), "sha256": sha256_of(path),
                                                 "metrics": meta.get("metrics", {})},
                    calibration_images=calib.shape[0])
    info["distillation"] = {"mode": distill, "pseudo_threshold": pseudo_threshold, "feature_weight": feature_weight,
                            "feature_modules": list(FEATURE_MODULES) if feature_weight > 0 else []}
    device = resolve_device(cfg.train.device)
    if teacher is not None:
        teacher.to(device)
    calibrated = {key: value.detach().clone() for key, value in model.state_dict().items()}
    trainer = Trainer(cfg, Path(out_dir), model=model, device=device, checkpoint_meta={"qat": info},
                      distiller=distiller)
    summary = trainer.fit()
    if keep == "closest":
        info["selection"] = keep_closest(trainer, teacher, calibrated)
    return dict(summary) | {"qat": info | {"epochs": epochs, "lr": train.lr, "calibration_seconds":
                                           round(calib_seconds, 1)}}
