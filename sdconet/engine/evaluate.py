"""Evaluation: COCO box AP on HR coordinates (pycocotools) + PSNR/SSIM of the SR branch, and the epoch picture grid.

Predictions are the model's normalised cxcywh boxes, mapped to the annotation file's pixels with each target's
``size`` (the size the boxes were normalised to) by :func:`sdconet.engine.metrics.outputs_to_detections`, then
scored against the dataset's ``ann_file``
(top-100 per image, maxDets 100). PSNR/SSIM compare the de-normalised SR output, clipped to [0, 1], with the HR image
on each image's unpadded region, averaged over images.

Under DDP every rank evaluates its own shard of the validation set (:class:`sdconet.engine.distributed.ShardSampler`),
the detections and per-image PSNR/SSIM are gathered, and rank 0 alone runs COCOeval; the metrics are then broadcast,
so no rank waits in a barrier for the whole validation pass (the NCCL watchdog would kill a long one).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sdconet.engine.distributed import broadcast_from_main, gather_lists, is_distributed, unwrap_model
from sdconet.engine.metrics import coco_evaluate, outputs_to_detections, psnr, ssim
from sdconet.engine.routing import STAGE_JOINT
from sdconet.engine.visualize import grid_row, stack_rows
from sdconet.utils.image import denormalize
from sdconet.utils.logging import get_logger

logger = get_logger(__name__)

MAX_DETECTIONS = 100  # COCO maxDets


def move_batch(batch: dict, device: torch.device) -> dict:
    """Collated batch (docs/architecture.md) -> the same dict with its tensors on ``device``."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out["targets"] = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                       for k, v in t.items()} for t in batch["targets"]]
    return out


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``amp_dtype`` on ``device``; a no-op context when ``amp_dtype`` is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, dataset: Dataset, device: torch.device, run_sr: bool = False,
             amp_dtype: Optional[torch.dtype] = None, progress: bool = True,
             sharded: bool = False) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (+ PSNR, SSIM when ``run_sr`` and the model has an SR decoder).

    ``dataset`` provides ``ann_file`` and ``label_to_category_id``; ``loader`` iterates it (collated batches).
    ``sharded``: every rank calls this with ``loader`` over its own shard (disjoint, together the whole set);
    results are gathered, rank 0 scores them and every rank returns the same metrics.
    """
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    detections: list[dict] = []
    image_ids: list[int] = []
    psnr_values: list[float] = []
    ssim_values: list[float] = []
    run_sr = run_sr and getattr(module, "sr_decoder", None) is not None
    try:
        for batch in tqdm(loader, desc="evaluate", leave=False, disable=not progress, dynamic_ncols=True):
            batch = move_batch(batch, device)
            targets = batch["targets"]
            with autocast_context(device, amp_dtype):
                outputs = module(batch["images_lr"], batch["masks_lr"], None, run_sr=run_sr)
            detections += outputs_to_detections(outputs, targets, dataset.label_to_category_id, MAX_DETECTIONS)
            image_ids += [int(t["image_id"]) for t in targets]
            if run_sr:
                sr_images = denormalize(outputs["sr_image"].float()).clamp(0.0, 1.0)
                for b, target in enumerate(targets):
                    height, width = (int(s) for s in target["size"])
                    sr, hr = sr_images[b, :, :height, :width], batch["images_hr"][b, :, :height, :width]
                    psnr_values.append(float(psnr(sr, hr)))
                    ssim_values.append(float(ssim(sr, hr)))
    finally:
        module.train(was_training)
    if sharded and is_distributed():
        detections, image_ids, psnr_values, ssim_values = gather_lists(
            (detections, image_ids, psnr_values, ssim_values))
        result = None
        if torch.distributed.get_rank() == 0:
            try:
                result = ("ok", _score(dataset, detections, image_ids, psnr_values, ssim_values))
            except Exception as err:  # tell the other ranks instead of leaving them in the broadcast
                broadcast_from_main(("error", f"{type(err).__name__}: {err}"))
                raise
        status, value = broadcast_from_main(result)
        if status != "ok":
            raise RuntimeError(f"rank 0 could not score the sharded evaluation: {value}")
        return value
    return _score(dataset, detections, image_ids, psnr_values, ssim_values)


def _score(dataset: Dataset, detections: list[dict], image_ids: list[int], psnr_values: list[float],
           ssim_values: list[float]) -> dict[str, float]:
    """COCO metrics of ``detections`` on ``image_ids`` (+ mean PSNR/SSIM when there are values)."""
    metrics = coco_evaluate(dataset.ann_file, detections, image_ids=image_ids)
    if psnr_values:
        metrics["PSNR"] = float(np.mean(psnr_values))
        metrics["SSIM"] = float(np.mean(ssim_values))
    return metrics


@torch.no_grad()
def render_grid(model: nn.Module, dataset: Dataset, collate_fn: Callable, device: torch.device, run_sr: bool,
                num_images: int = 2, score_threshold: float = 0.3) -> np.ndarray:
    """The epoch picture (see :mod:`sdconet.engine.visualize`) for the first ``num_images`` items of ``dataset``.

    Detections come from the inference path (``model.infer``), as a user would get them; those scoring at least
    ``score_threshold`` are drawn.
    """
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    try:
        batch = move_batch(collate_fn([dataset[i] for i in range(min(num_images, len(dataset)))]), device)
        images_lr, masks_lr = batch["images_lr"], batch["masks_lr"]
        upscale = batch["images_hr"].shape[-1] // images_lr.shape[-1]
        detections = module.infer(images_lr, masks_lr)
        sr_images = None
        if run_sr and getattr(module, "sr_decoder", None) is not None:
            sr_images = denormalize(module(images_lr, masks_lr, None, run_sr=True)["sr_image"]).clamp(0.0, 1.0)
    finally:
        module.train(was_training)
    category_names = getattr(dataset, "category_names", ())
    rows = []
    for b, target in enumerate(batch["targets"]):
        height, width = (int(s) for s in target["size"])
        lr_height, lr_width = height // upscale, width // upscale
        keep = detections["scores"][b] >= score_threshold
        pred = {"boxes": detections["boxes"][b][keep] * upscale, "labels": detections["labels"][b][keep],
                "scores": detections["scores"][b][keep]}
        saliency = detections["saliency"][b, 0]
        # crop the saliency map to the image's unpadded part (it lives on the padded LR grid)
        sal_h = max(1, round(saliency.shape[0] * lr_height / images_lr.shape[-2]))
        sal_w = max(1, round(saliency.shape[1] * lr_width / images_lr.shape[-1]))
        has_saliency = bool(saliency.abs().sum() > 0)
        rows.append(grid_row(
            images_lr[b, :, :lr_height, :lr_width], batch["images_hr"][b, :, :height, :width],
            sr_images[b, :, :height, :width] if sr_images is not None else None,
            saliency[:sal_h, :sal_w] if has_saliency else None,
            pred, {"boxes": target["boxes_xyxy"]}, category_names))
    return stack_rows(rows)


def evaluate_checkpoint(checkpoint: str | Path | None, device: torch.device, overrides: Optional[dict] = None,
                        batch_size: Optional[int] = None, progress: bool = True) -> dict[str, Any]:
    """Rebuild the model from a weights file (its config travels in the metadata), evaluate on its validation set.

    ``checkpoint`` is a file, a run directory (``best`` preferred) or None (the latest run under ``runs/``).
    ``overrides`` replaces DataConfig fields (e.g. ``{"root": "/data/nwpu"}``). Returns ``{"metrics", "checkpoint",
    "config", "meta"}``. SR metrics are reported when the checkpoint was saved with the SR branch trained (stage 2).
    """
    import dataclasses

    from sdconet.data import build_dataset, collate_fn
    from sdconet.engine.checkpoint import load_model_weights, resolve_checkpoint
    from sdconet.models import build_model

    path = resolve_checkpoint(checkpoint)
    cfg, state_dict, meta = load_model_weights(path)
    if overrides:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **overrides))
    model = build_model(cfg.model)
    model.load_state_dict(state_dict)
    model.to(device)
    dataset = build_dataset(cfg.data, "val", cfg.model.upscale, train=False)
    loader = DataLoader(dataset, batch_size=batch_size or cfg.train.batch_size, shuffle=False, collate_fn=collate_fn,
                        num_workers=cfg.data.num_workers)
    run_sr = model.sr_decoder is not None and meta.get("stage", STAGE_JOINT) == STAGE_JOINT
    metrics = evaluate(model, loader, dataset, device, run_sr=run_sr, progress=progress)
    logger.info("evaluated %s on %d images: %s", path, len(dataset),
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {"metrics": metrics, "checkpoint": path, "config": cfg, "meta": meta}
