"""SDCoNet training losses: DINO set losses (+ auxiliary, encoder-proposal, denoising) + saliency + SR.

``SetCriterion(outputs, targets, images_hr=None, masks_hr=None)`` takes the model's training output dict
(docs/architecture.md, "Model -> criterion") and the collated targets, and returns named, already weighted loss terms
plus their sum under ``"loss"``:

* ``loss_class``, ``loss_l1``, ``loss_giou`` -- final decoder layer, Hungarian-matched (focal x class_weight,
  L1 x l1_weight, GIoU x giou_weight);
* the same with suffix ``_aux{i}`` -- decoder layer i (``aux_outputs[i]``), each matched on its own;
* suffix ``_enc`` -- the encoder proposals (``enc_outputs``), matched on their own;
* suffix ``_dn`` / ``_dn_aux{i}`` -- denoising queries of the last / i-th decoder layer (fixed indices, no matching);
* ``loss_saliency`` (x saliency_weight) when ``saliency_logits`` is present;
* ``loss_sr`` (x sr_weight) when ``sr_image`` is present.

Normalisation follows DINO: every detection term is a sum over the batch divided by ``num_boxes`` (non-ignored targets
in the batch, averaged over DDP ranks, at least 1); denoising terms divide by ``num_boxes * num_groups``. The saliency
loss divides by its number of positive tokens, averaged over ranks the same way.

Ignored targets (``ignore=True``): never matched and not counted in ``num_boxes``; a query that is not matched but whose
predicted box overlaps an ignored box with IoU >= ``LossConfig.ignore_iou_threshold`` gets no classification loss
(neither foreground nor background), so the model is not taught that a difficult object is background. Their denoising
positive queries get no loss at all; their denoising negatives stay background. Denoising slots that only pad an image
with fewer than ``max_gt`` targets get no loss (``loss.dn_padding: ignore``) or a background class loss
(``background``, as DINO and mmdet).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from sdconet.config import Config, LossConfig, SaliencyConfig
from sdconet.utils.distributed import reduce_mean
from sdconet.losses.matcher import HungarianMatcher, ignore_flags
from sdconet.losses.saliency_targets import count_positives, saliency_loss, saliency_targets
from sdconet.losses.sr_loss import sr_l1_loss

DN_PADDING_MODES = ("ignore", "background")
from sdconet.ops.box_ops import box_cxcywh_to_xyxy, box_iou

Indices = list[tuple[torch.Tensor, torch.Tensor]]


class SetCriterion(nn.Module):
    """All SDCoNet training losses; see the module docstring for the terms and their normalisation.

    Args:
        loss_cfg: loss weights, focal parameters, matcher costs, ignore threshold.
        saliency_cfg: saliency target definition (mode, sigma, level ranges); defaults to ``SaliencyConfig()``.
    """

    def __init__(self, loss_cfg: LossConfig, saliency_cfg: Optional[SaliencyConfig] = None) -> None:
        super().__init__()
        if loss_cfg.dn_padding not in DN_PADDING_MODES:
            raise ValueError(f"loss.dn_padding must be one of {DN_PADDING_MODES}, got {loss_cfg.dn_padding!r}")
        self.cfg = loss_cfg
        self.saliency_cfg = saliency_cfg or SaliencyConfig()
        self.matcher = HungarianMatcher.from_config(loss_cfg)

    @classmethod
    def from_config(cls, cfg: Config) -> "SetCriterion":
        return cls(cfg.loss, cfg.model.saliency)

    # ---------------------------------------------------------------------------------------------------------------
    # building blocks
    # ---------------------------------------------------------------------------------------------------------------
    def _box_set_losses(self, output: dict, targets: list[dict], indices: Indices, class_weights: torch.Tensor,
                        normaliser: float) -> dict[str, torch.Tensor]:
        """Unweighted class / L1 / GIoU losses of one output set for given (query, target) pairs.

        Args:
            output: ``pred_logits`` ``[B, Q, C]``, ``pred_boxes`` ``[B, Q, 4]``.
            indices: per image (query_idx, target_idx).  class_weights: ``[B, Q]`` weight of each query's class loss.
        """
        logits, boxes = output["pred_logits"].float(), output["pred_boxes"].float()
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        target_labels = torch.cat([t["labels"][j.to(t["labels"].device)].to(logits.device, torch.int64)
                                   for t, (_, j) in zip(targets, indices)])
        target_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)].to(boxes.device).float()
                                  for t, (_, j) in zip(targets, indices)]).view(-1, 4)

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, target_labels] = 1.0
        focal = sigmoid_focal_loss(logits, onehot, alpha=self.cfg.focal_alpha, gamma=self.cfg.focal_gamma)
        loss_class = (focal * class_weights.unsqueeze(-1)).sum() / normaliser

        matched_boxes = boxes[batch_idx, query_idx]
        loss_l1 = (matched_boxes - target_boxes).abs().sum() / normaliser
        # elementwise 1 - GIoU of each matched pair (not the pairwise matrix: dn sets have hundreds of pairs)
        loss_giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes),
                                             reduction="sum") / normaliser
        return {"class": loss_class, "l1": loss_l1, "giou": loss_giou}

    def _matched_class_weights(self, boxes: torch.Tensor, targets: list[dict], indices: Indices) -> torch.Tensor:
        """``[B, Q]``: 0 for unmatched queries overlapping an ignored box (IoU >= threshold), else 1."""
        weights = torch.ones(boxes.shape[:2], device=boxes.device)
        for b, (target, (query_idx, _)) in enumerate(zip(targets, indices)):
            ignored = ignore_flags(target, len(target["labels"]), boxes.device)
            if not ignored.any():
                continue
            ignored_boxes = box_cxcywh_to_xyxy(target["boxes"].to(boxes.device).float()[ignored])
            iou, _ = box_iou(box_cxcywh_to_xyxy(boxes[b].detach().float()), ignored_boxes)
            weights[b, iou.amax(dim=1) >= self.cfg.ignore_iou_threshold] = 0.0
            weights[b, query_idx.to(boxes.device)] = 1.0
        return weights

    @staticmethod
    def _dn_indices(targets: list[dict], dn_meta: dict, num_dn_queries: int,
                    device: torch.device, padding: str = "ignore") -> tuple[Indices, torch.Tensor]:
        """Fixed denoising assignment and class-loss weights.

        Group g's positive query for target j is ``g * single_pad + j`` (class + box losses), its negative
        ``g * single_pad + max_gt + j`` (background class only). The positives of ignored targets get no loss;
        padding queries of images with fewer than max_gt targets get none (``padding="ignore"``) or a background
        class loss (``padding="background"``).
        Returns (indices, class_weights ``[B, pad_size]``).
        """
        try:
            num_groups, single_pad, pad_size = (int(dn_meta[k]) for k in ("num_groups", "single_pad", "pad_size"))
        except KeyError as err:
            raise ValueError(f"dn_meta lacks key {err}; expected num_groups, single_pad, pad_size") from None
        if pad_size != num_groups * single_pad or pad_size != num_dn_queries or single_pad % 2:
            raise ValueError(f"inconsistent dn_meta {dict(dn_meta)} for {num_dn_queries} denoising queries "
                             "(need pad_size = num_groups * single_pad, single_pad = 2 * max_gt)")
        max_gt = single_pad // 2
        group_offsets = torch.arange(num_groups, device=device) * single_pad  # [G]
        if padding not in DN_PADDING_MODES:
            raise ValueError(f"loss.dn_padding must be one of {DN_PADDING_MODES}, got {padding!r}")
        indices = []
        weights = torch.zeros(len(targets), pad_size, device=device)
        for b, target in enumerate(targets):
            n = len(target["labels"])
            if n > max_gt:
                raise ValueError(f"image {b} (image_id={target.get('image_id')}) has {n} targets but dn_meta allows "
                                 f"max_gt={max_gt}")
            kept = (~ignore_flags(target, n, device)).nonzero().squeeze(1)  # [n_kept]
            positives = (group_offsets[:, None] + kept[None, :]).flatten()  # [G * n_kept]
            negatives = (group_offsets[:, None] + max_gt + torch.arange(n, device=device)[None, :]).flatten()
            if padding == "background":  # every slot, then the positives of ignored targets back to no loss
                slots = torch.arange(max_gt, device=device)
                pad_slots = slots[slots >= n]
                pad_positives = (group_offsets[:, None] + pad_slots[None, :]).flatten()
                weights[b, pad_positives] = 1.0
                weights[b, pad_positives + max_gt] = 1.0
            weights[b, positives] = 1.0
            weights[b, negatives] = 1.0
            indices.append((positives.cpu(), kept.repeat(num_groups).cpu()))
        return indices, weights

    # ---------------------------------------------------------------------------------------------------------------
    def forward(self, outputs: dict, targets: list[dict], images_hr: Optional[torch.Tensor] = None,
                masks_hr: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Compute every loss term present in ``outputs``.

        Args:
            outputs: the model's training output dict (docs/architecture.md).
            targets: B target dicts (``labels``, ``boxes`` normalised cxcywh, ``size``, optional ``ignore``).
            images_hr: ``[B, 3, H, W]`` in [0, 1]; required when ``outputs`` has ``sr_image``.
            masks_hr: ``[B, H, W]`` bool, True = padding; optional.
        Returns:
            ``{"loss_class": ..., ..., "loss": total}`` (weighted scalar tensors).
        """
        device = outputs["pred_logits"].device
        num_classes = outputs["pred_logits"].shape[-1]
        for target in targets:
            labels = target["labels"]
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(f"image_id={target.get('image_id')}: labels {labels.tolist()} outside "
                                 f"0..{num_classes - 1} (the model predicts {num_classes} classes: check "
                                 "model.detector.num_classes)")
        counts = {"num_boxes": sum(int((~ignore_flags(t, len(t["labels"]), device)).sum()) for t in targets)}
        saliency = None
        if outputs.get("saliency_logits") is not None:
            saliency = self._saliency_targets(outputs, targets)
            counts["num_positives"] = count_positives(*saliency)
        counts = reduce_mean(counts, device)  # one collective for every normaliser
        num_boxes = max(counts["num_boxes"], 1.0)
        weights = {"class": self.cfg.class_weight, "l1": self.cfg.l1_weight, "giou": self.cfg.giou_weight}
        losses: dict[str, torch.Tensor] = {}

        def add(terms: dict[str, torch.Tensor], suffix: str) -> None:
            for name, value in terms.items():
                losses[f"loss_{name}{suffix}"] = weights[name] * value

        matched_sets = [(outputs, "")]
        matched_sets += [(aux, f"_aux{i}") for i, aux in enumerate(outputs.get("aux_outputs") or [])]
        if outputs.get("enc_outputs") is not None:
            matched_sets.append((outputs["enc_outputs"], "_enc"))
        for output, suffix in matched_sets:
            indices = self.matcher(output, targets)
            class_weights = self._matched_class_weights(output["pred_boxes"], targets, indices)
            add(self._box_set_losses(output, targets, indices, class_weights, num_boxes), suffix)

        dn_outputs = outputs.get("dn_outputs")
        if dn_outputs:
            dn_meta = outputs.get("dn_meta")
            if dn_meta is None:
                raise ValueError("outputs has dn_outputs but no dn_meta")
            indices, class_weights = self._dn_indices(targets, dn_meta, dn_outputs[-1]["pred_logits"].shape[1],
                                                      device, self.cfg.dn_padding)
            dn_normaliser = num_boxes * int(dn_meta["num_groups"])
            for i, dn_output in enumerate(dn_outputs):
                suffix = "_dn" if i == len(dn_outputs) - 1 else f"_dn_aux{i}"
                add(self._box_set_losses(dn_output, targets, indices, class_weights, dn_normaliser), suffix)

        if saliency is not None:
            values, ignored, level_masks = saliency
            losses["loss_saliency"] = self.cfg.saliency_weight * saliency_loss(
                outputs["saliency_logits"], values, ignored, level_masks, alpha=self.cfg.focal_alpha,
                gamma=self.cfg.focal_gamma, num_positives=counts["num_positives"])

        if outputs.get("sr_image") is not None:
            if images_hr is None:
                raise ValueError("outputs has sr_image but images_hr was not passed to the criterion")
            losses["loss_sr"] = self.cfg.sr_weight * sr_l1_loss(outputs["sr_image"], images_hr.to(device),
                                                                None if masks_hr is None else masks_hr.to(device))

        losses["loss"] = sum(losses.values())
        return losses

    def _saliency_targets(self, outputs: dict, targets: list[dict]) -> tuple[list, list, Optional[list]]:
        """(values, ignored, level_masks) for the saliency loss."""
        for key in ("spatial_shapes", "valid_ratios"):
            if outputs.get(key) is None:
                raise ValueError(f"outputs has saliency_logits but no '{key}' (needed for the saliency targets)")
        values, ignored = saliency_targets(targets, outputs["spatial_shapes"], outputs["valid_ratios"],
                                           self.saliency_cfg)
        return values, ignored, outputs.get("level_masks")
