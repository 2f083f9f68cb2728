"""SaliencyDINO: the detection branch of SDCoNet (DINO with Salience-DETR-style hierarchical token filtering).

Pipeline (``d`` = ``detector.d_model``, ``L`` = 4 levels, finest first, ``S = sum_l H_l W_l`` tokens):

    neck maps [B, d, H_l, W_l] --flatten--> tokens [B, S, d] + (sine pos + level embedding)
      -> saliency predictor on the encoder-proposal projection of (tokens + pos)     (skipped when disabled)
      -> saliency-filtered deformable encoder (or the plain one)                     -> memory [B, S, d]
      -> two-stage query selection (top-Q encoder proposals)
      -> [CDN queries | Q matching queries] -> DINO decoder -> logits/boxes per layer

Every count is a Python int derived from the feature shapes (and, for padded batches, from the masks), so for a fixed
input size without masks the inference graph has static shapes (ONNX/TensorRT export).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sdconet.config import ModelConfig
from sdconet.models.deformable_encoder import (DeformableEncoder, SaliencyFilteredEncoder, layer_token_counts,
                                               level_keep_counts)
from sdconet.models.denoising import ContrastiveDenoising, DenoisingQueries
from sdconet.models.dino_decoder import DINODecoder, TwoStageQuerySelection, proposal_grid
from sdconet.models.position_encoding import SinePositionEncoding
from sdconet.models.saliency import SaliencyPredictor
from sdconet.ops.msda import level_start_index_for, spatial_shapes_as_ints
from sdconet.utils.constants import constant_tensor


class SaliencyDINO(nn.Module):
    """DINO detector with saliency-driven query filtering, built from ``ModelConfig`` (``detector``, ``saliency``).

    Attributes reported per component: ``saliency`` (the :class:`SaliencyPredictor`, None when
    ``saliency.enabled=False``), ``encoder``, ``query_selection``, ``decoder``, ``denoising``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        det, sal = cfg.detector, cfg.saliency
        num_levels = cfg.neck.num_levels
        if cfg.neck.channels != det.d_model:
            raise ValueError(f"model.neck.channels ({cfg.neck.channels}) must equal model.detector.d_model "
                             f"({det.d_model}): the detector consumes the neck maps directly")
        if 2 * det.pos_num_feats != det.d_model:
            raise ValueError(f"model.detector.pos_num_feats ({det.pos_num_feats}) must be d_model / 2 "
                             f"({det.d_model // 2}): x and y features are concatenated")
        self.num_levels = num_levels
        self.num_queries = det.num_queries
        self.num_classes = det.num_classes
        self.level_ratio = tuple(sal.level_ratio)
        self.layer_ratio = tuple(sal.layer_ratio)
        self.position_encoding = SinePositionEncoding(det.pos_num_feats, det.pos_temperature)
        self.level_embed = nn.Parameter(torch.empty(num_levels, det.d_model).normal_())

        layer_args = dict(num_layers=det.num_encoder_layers, d_model=det.d_model, ffn_dim=det.ffn_dim,
                          dropout=det.dropout, num_heads=det.num_heads, num_levels=num_levels,
                          num_points=det.num_points, msda_impl=det.msda_impl)
        self.saliency: SaliencyPredictor | None
        if sal.enabled:
            if len(self.level_ratio) != num_levels:
                raise ValueError(f"model.saliency.level_ratio has {len(self.level_ratio)} entries; "
                                 f"model.neck.num_levels is {num_levels}")
            self.saliency = SaliencyPredictor(det.d_model, sal.hidden_dim, num_levels, sal.alpha_init_range,
                                              sal.modulation)
            self.encoder = SaliencyFilteredEncoder(**layer_args, layer_ratio=self.layer_ratio,
                                                   foreground_topk=sal.foreground_topk, background=sal.background)
        else:
            self.saliency = None
            self.encoder = DeformableEncoder(**layer_args)
        self.query_selection = TwoStageQuerySelection(det.d_model, det.num_classes, det.num_queries)
        self.decoder = DINODecoder(det.num_decoder_layers, det.d_model, det.num_classes, det.ffn_dim, det.dropout,
                                   det.num_heads, num_levels, det.num_points, det.msda_impl,
                                   det.reference_update)
        self.denoising = ContrastiveDenoising(det.num_classes, det.d_model, det.num_dn_queries,
                                              det.label_noise_ratio, det.box_noise_scale)

    # ----------------------------------------------------------------------------------------------------------------
    def encoder_token_counts(self, spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> list[int]:
        """Tokens each encoder layer updates for unpadded maps of these ``(H_l, W_l)`` shapes."""
        shapes = spatial_shapes_as_ints(spatial_shapes)
        if self.saliency is None:
            return [sum(h * w for h, w in shapes)] * len(self.encoder.layers)
        return layer_token_counts(sum(level_keep_counts(shapes, self.level_ratio)), self.layer_ratio)

    def _check_inputs(self, features: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None) -> None:
        if len(features) != self.num_levels:
            raise ValueError(f"SaliencyDINO expects {self.num_levels} feature maps (finest first), got {len(features)}")
        if masks is not None:
            if len(masks) != len(features):
                raise ValueError(f"got {len(masks)} masks for {len(features)} feature maps")
            for level, (feature, mask) in enumerate(zip(features, masks)):
                if mask.shape != (feature.shape[0], *feature.shape[2:]):
                    raise ValueError(f"mask of level {level} has shape {tuple(mask.shape)}; expected "
                                     f"{(feature.shape[0], *feature.shape[2:])} (True = padding)")

    def _run(self, features: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None,
             denoising: DenoisingQueries | None) -> dict:
        self._check_inputs(features, masks)
        batch = features[0].shape[0]
        shapes = [(int(f.shape[2]), int(f.shape[3])) for f in features]
        keep_per_level = self._keep_per_level(shapes, masks) if self.saliency is not None else []
        if masks is None:
            masks = [torch.zeros(batch, h, w, dtype=torch.bool, device=features[0].device) for h, w in shapes]
        sizes = [h * w for h, w in shapes]
        # per-shape cached device constants: no host->device copy inside forward (CUDA-graph capture)
        level_start_index = constant_tensor(tuple(level_start_index_for(shapes)), torch.long, features[0].device)

        tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)  # [B, S, d]
        pos = torch.cat([(self.position_encoding(m).to(tokens.dtype).flatten(2).transpose(1, 2) + embed)
                         for m, embed in zip(masks, self.level_embed)], dim=1)
        padding = torch.cat([m.flatten(1) for m in masks], dim=1)  # [B, S]
        valid_ratios = torch.stack([self._valid_ratio(m) for m in masks], dim=1)  # [B, L, 2]
        proposal_logits, invalid = proposal_grid(shapes, valid_ratios, padding)

        out: dict = {}
        if self.saliency is not None:
            projected = self.query_selection.project(tokens + pos, invalid)
            level_padding = padding.split(sizes, dim=1)
            saliency_logits = self.saliency(projected.split(sizes, dim=1), level_padding, shapes)
            memory, tokens_per_layer = self.encoder(
                tokens, pos, shapes, level_start_index, valid_ratios, padding, saliency_logits,
                keep_per_level, self.query_selection.class_head)
            out["saliency_logits"] = saliency_logits
        else:
            memory = self.encoder(tokens, pos, shapes, level_start_index, valid_ratios, padding)
            tokens_per_layer = [tokens.shape[1]] * len(self.encoder.layers)

        content, reference, enc_logits, enc_boxes = self.query_selection(memory, proposal_logits, invalid)
        attn_mask = None
        if denoising is not None:
            content = torch.cat((denoising.content, content), dim=1)
            reference = torch.cat((denoising.reference_logits.sigmoid(), reference), dim=1)
            attn_mask = denoising.attn_mask
        all_logits, all_boxes = self.decoder(content, reference, memory, shapes, level_start_index, valid_ratios,
                                             padding, attn_mask)

        pad_size = denoising.meta["pad_size"] if denoising is not None else 0
        layers = [{"pred_logits": logits[:, pad_size:], "pred_boxes": boxes[:, pad_size:]}
                  for logits, boxes in zip(all_logits, all_boxes)]
        out.update(layers[-1])
        out["aux_outputs"] = layers[:-1]
        out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes}
        if denoising is not None:
            out["dn_outputs"] = [{"pred_logits": logits[:, :pad_size], "pred_boxes": boxes[:, :pad_size]}
                                 for logits, boxes in zip(all_logits, all_boxes)]
            out["dn_meta"] = denoising.meta
        else:
            out["dn_outputs"] = None
            out["dn_meta"] = None
        out["spatial_shapes"] = constant_tensor(tuple(shapes), torch.long, tokens.device)
        out["level_masks"] = [m.flatten(1) for m in masks]
        out["valid_ratios"] = valid_ratios
        out["encoder_tokens_per_layer"] = tokens_per_layer
        return out

    @staticmethod
    def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """``mask [B, H, W]`` -> ``[B, 2]`` (valid width fraction, valid height fraction); padding is bottom/right."""
        height, width = mask.shape[1:]
        # at least one valid row/column: a zero ratio would turn reference points into NaN (inf * 0)
        valid_h = (~mask[:, :, 0]).sum(1).float().clamp(min=1.0)
        valid_w = (~mask[:, 0, :]).sum(1).float().clamp(min=1.0)
        return torch.stack((valid_w / width, valid_h / height), dim=-1)

    def _keep_per_level(self, shapes: list[tuple[int, int]],
                        masks: Sequence[torch.Tensor] | None) -> list[int]:
        """Per-level token budget. Without masks it depends on the shapes only (static); with masks it is sized by
        the image with the most valid tokens (one host sync; the export graph passes no masks)."""
        if masks is None:
            return level_keep_counts(shapes, self.level_ratio)
        valid_counts = [int((~m).flatten(1).sum(1).max()) for m in masks]
        return level_keep_counts(shapes, self.level_ratio, valid_counts)

    # ----------------------------------------------------------------------------------------------------------------
    def forward(self, features: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None = None,
                targets: list[dict] | None = None) -> dict:
        """Training/evaluation outputs (the "Model -> criterion" contract of docs/architecture.md, minus sr_image).

        ``features``: 4 neck maps ``[B, d, H_l, W_l]`` finest first; ``masks``: ``[B, H_l, W_l]`` bool (True =
        padding) or None; ``targets``: dicts with ``labels [n]`` and normalised cxcywh ``boxes [n, 4]`` — contrastive
        denoising queries are added only in training mode with targets.
        """
        denoising = None
        if self.training and targets is not None:
            if len(targets) != features[0].shape[0]:
                raise ValueError(f"got {len(targets)} target dicts for a batch of {features[0].shape[0]}")
            denoising = self.denoising(targets, self.num_queries)
        out = self._run(features, masks, denoising)
        if self.training and targets is not None and denoising is None:
            # a batch without boxes has no denoising queries: keep the label embedding in the graph with a zero
            # term, so every parameter gets a (zero) gradient and DDP needs no unused-parameter search
            out["pred_logits"] = out["pred_logits"] + 0.0 * self.denoising.label_embed.weight.sum()
        return out

    def infer(self, features: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None = None) -> dict:
        """Inference outputs: ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]`` (normalised cxcywh) and
        ``saliency [B, 1, H_0, W_0]`` (sigmoid of the finest level; zeros when saliency is disabled)."""
        out = self._run(features, masks, denoising=None)
        batch, _, height, width = features[0].shape
        if "saliency_logits" in out:
            saliency = out["saliency_logits"][0].sigmoid().view(batch, 1, height, width)
        else:
            saliency = features[0].new_zeros(batch, 1, height, width)
        return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"], "saliency": saliency}
