"""SDCoNet: a shared Swin encoder feeding a saliency-driven DINO detector and (training only) a U-Net SR decoder.

::

    LR image [B,3,h,w] in [0,1] -> normalise -> SwinEncoder -> s4..s32 maps + patch tokens
        s8/s16/s32 -> ChannelMapperNeck -> 4 levels -> SaliencyDINO -> detections
        all maps + patch tokens -> SRDecoder -> SR image [B,3,upscale*h,upscale*w] (normalised space)

:class:`SerialBaseline` is the cascade the paper compares against: an SR network (its own encoder + SR decoder)
produces the HR image that an independent detector then processes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from sdconet.config import ModelConfig
from sdconet.models.detector import SaliencyDINO
from sdconet.models.encoder import SwinEncoder
from sdconet.models.grad_scale import GradScale
from sdconet.models.neck import ChannelMapperNeck
from sdconet.models.postprocess import full_image_sizes, select_topk_detections, valid_image_sizes
from sdconet.models.sr_decoder import SRDecoder
from sdconet.utils.image import denormalize, normalize


def build_sr_decoder(encoder: SwinEncoder, cfg: ModelConfig) -> SRDecoder:
    """The SR decoder matching ``encoder``'s widths."""
    return SRDecoder(encoder.channels, encoder.patch_channels, encoder.patch_size, cfg.sr_decoder, cfg.upscale)


class SDCoNet(nn.Module):
    """The parallel multi-task network (DESIGN.md §2).

    Attributes: ``encoder`` (:class:`SwinEncoder`), ``neck`` (:class:`ChannelMapperNeck`), ``detector``
    (:class:`SaliencyDINO`), ``sr_decoder`` (:class:`SRDecoder`, None when ``cfg.sr`` is False).
    """

    # every trainable parameter is in the graph of each training step (the SR decoder when run_sr is True), so DDP
    # needs no unused-parameter search (sdconet.engine.distributed.needs_unused_parameter_search)
    uses_all_parameters = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.upscale = cfg.upscale
        self.num_detections = cfg.detector.num_detections
        if not 1 <= self.num_detections <= cfg.detector.num_queries * cfg.detector.num_classes:
            raise ValueError(f"model.detector.num_detections={self.num_detections} must be in [1, num_queries x "
                             f"num_classes = {cfg.detector.num_queries * cfg.detector.num_classes}]")
        self.encoder = SwinEncoder(cfg.encoder)
        self.neck = ChannelMapperNeck(self.encoder.channels[1:], cfg.neck)
        self.detector = SaliencyDINO(cfg)
        self.sr_decoder: Optional[SRDecoder] = build_sr_decoder(self.encoder, cfg) if cfg.sr else None
        # extension (1.0 = off, the paper): scales L_sr's gradient into the shared encoder, not the SR decoder's own
        self.sr_grad_scale = GradScale(cfg.sr_grad_scale)

    def forward(self, images_lr: torch.Tensor, masks_lr: Optional[torch.Tensor] = None,
                targets: Optional[list[dict]] = None, run_sr: bool = True) -> dict:
        """Training/evaluation outputs (docs/architecture.md, "Model -> criterion").

        Args:
            images_lr: ``[B, 3, h, w]`` in [0, 1].
            masks_lr: ``[B, h, w]`` bool, True = padding (bottom/right), or None.
            targets: per-image dicts (``labels``, normalised cxcywh ``boxes``) for contrastive denoising.
            run_sr: run the SR decoder (stage 1 of gradient routing passes False: the decoder is not executed).

        Returns:
            The detector's dict plus ``sr_image`` ``[B, 3, upscale*h, upscale*w]`` (normalised space) when the SR
            decoder exists and ``run_sr`` is True.
        """
        encoded = self.encoder(normalize(images_lr))
        levels, level_masks = self.neck(encoded.features[1:], masks_lr)
        out = self.detector(levels, level_masks, targets)
        if self.sr_decoder is not None and run_sr:
            features = [self.sr_grad_scale(f) for f in encoded.features]
            out["sr_image"] = self.sr_decoder(features, self.sr_grad_scale(encoded.patch_tokens),
                                              images_lr.shape[-2:])
        return out

    def infer(self, images_lr: torch.Tensor, masks_lr: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Inference path (no SR decoder, no denoising; static shapes for a fixed input size).

        Returns ``boxes`` ``[B, K, 4]`` xyxy in input (LR) pixels of each unpadded image, ``scores`` ``[B, K]``,
        ``labels`` ``[B, K]`` int64 and ``saliency`` ``[B, 1, H_0, W_0]`` (finest level; zeros without saliency),
        K = ``cfg.detector.num_detections``. Call under ``torch.no_grad()`` in eval mode.
        """
        encoded = self.encoder(normalize(images_lr))
        levels, level_masks = self.neck(encoded.features[1:], masks_lr)
        out = self.detector.infer(levels, level_masks)
        sizes = full_image_sizes(images_lr) if masks_lr is None else valid_image_sizes(masks_lr)
        detections = select_topk_detections(out["pred_logits"], out["pred_boxes"], sizes, self.num_detections)
        detections["saliency"] = out["saliency"]
        return detections


class SRNetwork(nn.Module):
    """Stand-alone SR network of the serial baseline: ``[B, 3, h, w]`` in [0, 1] -> normalised-space
    ``[B, 3, upscale*h, upscale*w]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = SwinEncoder(cfg.encoder)
        self.sr_decoder = build_sr_decoder(self.encoder, cfg)

    def forward(self, images_lr: torch.Tensor) -> torch.Tensor:
        encoded = self.encoder(normalize(images_lr))
        return self.sr_decoder(encoded.features, encoded.patch_tokens, images_lr.shape[-2:])


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, h, w]`` padding mask -> ``[B, factor*h, factor*w]``."""
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


class SerialBaseline(nn.Module):
    """SR first, then detect: ``sr_network`` (encoder + SR decoder) makes the HR image, which ``detection_network``
    (an independent encoder + neck + SaliencyDINO) processes at HR size. Same call signatures as :class:`SDCoNet`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.upscale = cfg.upscale
        self.sr_network = SRNetwork(cfg)
        self.detection_network = SDCoNet(dataclasses.replace(cfg, sr=False))

    def _super_resolve(self, images_lr: torch.Tensor, masks_lr: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        sr_image = self.sr_network(images_lr)
        images_hr = denormalize(sr_image).clamp(0.0, 1.0)
        masks_hr = None if masks_lr is None else upsample_mask(masks_lr, self.upscale)
        return sr_image, images_hr, masks_hr

    def forward(self, images_lr: torch.Tensor, masks_lr: Optional[torch.Tensor] = None,
                targets: Optional[list[dict]] = None, run_sr: bool = True) -> dict:
        """As :meth:`SDCoNet.forward` (boxes are normalised, so they need no rescaling); ``sr_image`` is always
        returned because detection needs it (``run_sr`` is accepted for signature compatibility)."""
        sr_image, images_hr, masks_hr = self._super_resolve(images_lr, masks_lr)
        out = self.detection_network(images_hr, masks_hr, targets, run_sr=False)
        out["sr_image"] = sr_image
        return out

    def infer(self, images_lr: torch.Tensor, masks_lr: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """As :meth:`SDCoNet.infer`; boxes in LR pixels, saliency at the HR detector's finest level."""
        _, images_hr, masks_hr = self._super_resolve(images_lr, masks_lr)
        out = self.detection_network.infer(images_hr, masks_hr)
        out["boxes"] = out["boxes"] / self.upscale
        return out


def build_model(cfg: ModelConfig) -> SDCoNet:
    """The SDCoNet described by ``cfg`` (random init; encoder ImageNet weights from ``cfg.encoder.pretrained_file``)."""
    return SDCoNet(cfg)
