"""Detect objects in a folder of images: ``python train/predict.py --checkpoint RUN --images DIR --out DIR``.

Input images are HR by default (``--input hr``): each is degraded with the training degradation (the one
``sdconet.data.degrade``) exactly as in training and evaluation, and boxes come back in the file's pixels. With
``--input lr`` an image is fed to the network as it is. Images larger than the tile (default: the training image size)
are cut into overlapping tiles whose detections are shifted back and merged with class-wise NMS.

Writes ``OUT/detections.json`` (per image: file, size, detections with ``bbox`` xyxy in file pixels, ``score``,
``label``, ``category``) and ``OUT/annotated/<name>.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchvision.ops import batched_nms
from tqdm import tqdm

from sdconet.config import Config
from sdconet.scene.tiling import tile_starts
from sdconet.utils.logging import get_logger, setup_logging

logger = get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_TILE = 512  # HR pixels: the -Split datasets' window (DESIGN §4) when the run's image size is unknown
DEFAULT_OVERLAP = 128  # file pixels, capped at half the tile


def training_image_size(cfg: Config) -> int:
    """HR side of the images a run was trained on: the random crop, else the synthetic size, else 512."""
    if cfg.data.random_crop is not None:
        return cfg.data.random_crop
    if cfg.data.root is None:
        return cfg.data.synthetic.image_size
    return DEFAULT_TILE


@dataclass
class PredictOptions:
    tile: Optional[int] = None  # HR pixels of the file (LR pixels with input="lr"); None = training image size
    overlap: Optional[int] = None  # same unit as tile; None = DEFAULT_OVERLAP or half the tile, whichever is smaller
    score_threshold: float = 0.3
    nms_iou: float = 0.5
    max_detections: int = 100
    input: str = "hr"  # "hr": degrade like training; "lr": feed as is
    batch_size: int = 4


class Predictor:
    """A trained SDCoNet (from a checkpoint) that detects objects in images of any size.

    Args:
        checkpoint: weights file, run directory (best preferred) or None (the latest run under ``runs/``).
        device: where the network runs.
        options: tiling, thresholds and input mode.
    """

    def __init__(self, checkpoint: str | Path | None, device: torch.device, options: PredictOptions):
        from sdconet.engine.checkpoint import load_model_weights, resolve_checkpoint
        from sdconet.models import build_model

        if options.input not in ("hr", "lr"):
            raise ValueError(f"input must be 'hr' or 'lr', got {options.input!r}")
        self.checkpoint = resolve_checkpoint(checkpoint)
        cfg, state_dict, meta = load_model_weights(self.checkpoint)
        self.cfg, self.device, self.options = cfg, device, options
        self.model = build_model(cfg.model)
        self.model.load_state_dict(state_dict)
        self.model.to(device).eval()
        self.category_names: list[str] = list(meta.get("category_names") or [])
        self.scale = cfg.model.upscale if options.input == "hr" else 1  # file pixels per network-input pixel
        tile = options.tile or training_image_size(cfg) * self.scale // cfg.model.upscale  # file pixels
        overlap = min(DEFAULT_OVERLAP, tile // 2) if options.overlap is None else options.overlap
        self.tile_lr, self.overlap_lr = tile // self.scale, overlap // self.scale
        if overlap < 0 or self.overlap_lr >= self.tile_lr:
            raise ValueError(f"--tile {tile} / --overlap {overlap} (file pixels): the overlap must be >= 0 and the "
                             f"tile larger than the overlap by at least {self.scale} px")

    def category(self, label: int) -> str:
        return self.category_names[label] if label < len(self.category_names) else str(label)

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """[H, W, 3] uint8 file pixels -> [3, h, w] float network input (degraded when input is HR)."""
        from sdconet.data import degrade

        tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        if self.scale == 1:
            return tensor
        height, width = (s - s % self.scale for s in tensor.shape[-2:])  # crop at most scale-1 px bottom/right
        return degrade(tensor[:, :height, :width], self.scale, self.cfg.data.degradation, seed=0)

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        """Detections of one image: ``boxes`` [n, 4] xyxy file pixels, ``scores`` [n], ``labels`` [n] (n <= max)."""
        lr = self.network_input(image).to(self.device)
        height, width = lr.shape[-2:]
        windows = [(top, left) for top in tile_starts(height, self.tile_lr, self.overlap_lr)
                   for left in tile_starts(width, self.tile_lr, self.overlap_lr)]
        tile_h, tile_w = min(self.tile_lr, height), min(self.tile_lr, width)
        boxes, scores, labels = [], [], []
        for first in range(0, len(windows), self.options.batch_size):
            chunk = windows[first:first + self.options.batch_size]
            # every tile has the full tile size (a smaller image is padded bottom/right and masked), so the
            # network always sees the input size it was trained at
            batch = lr.new_zeros(len(chunk), 3, self.tile_lr, self.tile_lr)
            masks = torch.ones(len(chunk), self.tile_lr, self.tile_lr, dtype=torch.bool, device=self.device)
            for i, (top, left) in enumerate(chunk):
                batch[i, :, :tile_h, :tile_w] = lr[:, top:top + tile_h, left:left + tile_w]
                masks[i, :tile_h, :tile_w] = False
            out = self.model.infer(batch, masks)
            offsets = torch.tensor([[l, t, l, t] for t, l in chunk], dtype=out["boxes"].dtype, device=self.device)
            keep = out["scores"] >= self.options.score_threshold  # [b, K]
            boxes.append(((out["boxes"] + offsets[:, None]) * self.scale)[keep])
            scores.append(out["scores"][keep])
            labels.append(out["labels"][keep])
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        if len(windows) > 1:  # objects seen by two tiles: keep the best-scoring copy
            keep = batched_nms(boxes, scores, labels, self.options.nms_iou)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        order = scores.argsort(descending=True)[:self.options.max_detections]
        return {"boxes": boxes[order].cpu(), "scores": scores[order].cpu(), "labels": labels[order].cpu()}


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def predict_folder(predictor: Predictor, images: Path, out_dir: Path) -> dict:
    """Run ``predictor`` on every image under ``images``; write ``detections.json`` and annotated PNGs."""
    from sdconet.data import DataError
    from sdconet.data.image_io import load_image, save_image
    from sdconet.engine.visualize import PRED_COLOR, draw_boxes

    results, errors = [], []
    for path in tqdm(list_images(images), desc="predict", dynamic_ncols=True):
        relative = path.relative_to(images)
        try:
            image = load_image(path, predictor.cfg.data.max_image_pixels)
        except DataError as err:  # one unreadable file does not stop the folder
            logger.error("%s", err)
            errors.append({"file": str(relative), "error": str(err)})
            continue
        found = predictor.predict(image)
        detections = [{"bbox": [round(v, 2) for v in box], "score": round(score, 4), "label": label,
                       "category": predictor.category(label)}
                      for box, score, label in zip(found["boxes"].tolist(), found["scores"].tolist(),
                                                   found["labels"].tolist())]
        results.append({"file": str(relative), "width": image.shape[1], "height": image.shape[0],
                        "detections": detections})
        annotated = draw_boxes(image, found["boxes"], PRED_COLOR, found["labels"], found["scores"],
                               predictor.category_names)
        save_image(annotated, out_dir / "annotated" / relative.with_suffix(".png"))
    report = {"checkpoint": str(predictor.checkpoint), "input": predictor.options.input,
              "tile_network_px": predictor.tile_lr, "overlap_network_px": predictor.overlap_lr,
              "score_threshold": predictor.options.score_threshold, "images": results, "errors": errors}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "detections.json").write_text(json.dumps(report, indent=2))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train/predict.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="weights file or run directory (default: the latest run's best)")
    parser.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--input", choices=("hr", "lr"), default="hr",
                        help="hr: degrade like training (default); lr: feed images as they are")
    parser.add_argument("--tile", type=int, help="tile side in file pixels (default: the training image size)")
    parser.add_argument("--overlap", type=int,
                        help=f"tile overlap in file pixels (default {DEFAULT_OVERLAP}, at most half the tile)")
    parser.add_argument("--score-thresh", type=float, default=0.3, help="minimum score kept (default 0.3)")
    parser.add_argument("--nms-iou", type=float, default=0.5, help="IoU for merging tiles (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    from sdconet.engine.checkpoint import CheckpointError
    from sdconet.engine.distributed import resolve_device

    args = build_parser().parse_args(argv)
    setup_logging()
    options = PredictOptions(tile=args.tile, overlap=args.overlap, score_threshold=args.score_thresh,
                             nms_iou=args.nms_iou, input=args.input, batch_size=args.batch_size)
    try:
        predictor = Predictor(args.checkpoint, resolve_device(args.device), options)
        report = predict_folder(predictor, args.images, args.out)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = sum(len(r["detections"]) for r in report["images"])
    print(f"{len(report['images'])} image(s), {total} detection(s) >= {args.score_thresh}: "
          f"{args.out / 'detections.json'}; pictures in {args.out / 'annotated'}/")
    if report["errors"]:
        print(f"{len(report['errors'])} image(s) could not be read (listed under 'errors')")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
