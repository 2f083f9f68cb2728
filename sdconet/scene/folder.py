"""Detect objects in a folder of images: ``python train/predict.py --checkpoint RUN --images DIR --out DIR``.

The PyTorch entry of the scene-inference core (``sdconet.scene.core``; ``python -m sdconet.predict`` is the CLI for
every backend and for GeoTIFF scenes, docs/scenes.md). Input images are HR by default (``--input hr``): each window
is degraded with the training degradation (the one ``sdconet.data.degrade``) exactly as in training and evaluation,
and boxes come back in the file's pixels. With ``--input lr`` an image is fed to the network as it is. Images larger
than the tile (default: the training image size) are cut into overlapping tiles, padded bottom/right with zeros like
every exported backend, and merged across tiles with the core's rule (``merge.DEFAULT_MERGE_RULE``; ``--nms-iou``
asks for plain NMS).
Here ``--tile`` / ``--overlap`` are in file pixels (the scene CLI's are in network pixels).

Writes ``OUT/detections.json`` (per image: file, size, detections with ``bbox`` xyxy in file pixels, ``score``,
``label``, ``category``) and ``OUT/annotated/<name>.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from sdconet.config import DEFAULT_TRAINING_TILE as DEFAULT_TILE, training_image_size  # noqa: F401
from sdconet.runtime.base import DEFAULT_SCORE_THRESHOLD
# DEFAULT_OVERLAP: network (LR) pixels; in file pixels x the file pixels per network pixel (x2 for HR input at x2),
# capped at half the tile
from sdconet.scene.core import DEFAULT_OVERLAP
from sdconet.scene.merge import DEFAULT_MERGE_RULE
from sdconet.utils.logging import get_logger, setup_logging

logger = get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class PredictOptions:
    tile: Optional[int] = None  # HR pixels of the file (LR pixels with input="lr"); None = training image size
    overlap: Optional[int] = None  # same unit as tile; None = DEFAULT_OVERLAP network px or half the tile, the smaller
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    nms_iou: Optional[float] = None  # set: merge tiles by class-wise NMS at this IoU instead of the default rule
    max_detections: Optional[int] = None  # per image; None = no cap
    input: str = "hr"  # "hr": degrade like training; "lr": feed as is
    batch_size: int = 4


class Predictor:
    """A trained SDCoNet (from a checkpoint) that detects objects in images of any size, through the scene core
    with the torch runner.

    Args:
        checkpoint: weights file, run directory (best preferred) or None (the latest run under ``runs/``).
        device: where the network runs.
        options: tiling, thresholds and input mode.
    """

    def __init__(self, checkpoint: str | Path | None, device: torch.device, options: PredictOptions):
        from sdconet.engine.checkpoint import read_checkpoint_metadata, resolve_checkpoint
        from sdconet.runtime.torch_runner import TorchRunner
        from sdconet.scene.core import SceneInferencer, SceneOptions

        if options.input not in ("hr", "lr"):
            raise ValueError(f"input must be 'hr' or 'lr', got {options.input!r}")
        self.checkpoint = resolve_checkpoint(checkpoint)
        cfg, meta = read_checkpoint_metadata(self.checkpoint)
        self.cfg, self.device, self.options = cfg, device, options
        self.scale = cfg.model.upscale if options.input == "hr" else 1  # file pixels per network-input pixel
        tile = options.tile or training_image_size(cfg) * self.scale // cfg.model.upscale  # file pixels
        overlap = min(DEFAULT_OVERLAP * self.scale, tile // 2) if options.overlap is None else options.overlap
        self.tile_lr, self.overlap_lr = tile // self.scale, overlap // self.scale
        if overlap < 0 or self.overlap_lr >= self.tile_lr:
            raise ValueError(f"--tile {tile} / --overlap {overlap} (file pixels): the overlap must be >= 0 and the "
                             f"tile larger than the overlap by at least {self.scale} px")
        self.runner = TorchRunner(self.checkpoint, device=device, imgsz=self.tile_lr, with_saliency=False)
        self.category_names: list[str] = list(meta.get("category_names") or [])
        self.inferencer = SceneInferencer(self.runner, SceneOptions(
            input=options.input, tile=self.tile_lr, overlap=self.overlap_lr, score_threshold=options.score_threshold,
            max_detections=options.max_detections, batch=options.batch_size,
            merge="nms" if options.nms_iou is not None else DEFAULT_MERGE_RULE, merge_threshold=options.nms_iou,
            upscale=cfg.model.upscale, degradation=cfg.data.degradation, progress=False))

    def category(self, label: int) -> str:
        return self.category_names[label] if label < len(self.category_names) else str(label)

    def predict(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        """Detections of one [H, W, 3] uint8 image: ``boxes`` [n, 4] xyxy file pixels, ``scores`` [n], ``labels``
        [n], in descending score order."""
        from sdconet.scene.core import ArrayScene

        result = self.inferencer.run(ArrayScene(image))
        return {key: torch.from_numpy(value) for key, value in result.detections.items()}


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
                        help=f"tile overlap in file pixels (default {DEFAULT_OVERLAP} network px: {2 * DEFAULT_OVERLAP} "
                             "file px for --input hr at x2; at most half the tile)")
    parser.add_argument("--score-threshold", "--score-thresh", dest="score_threshold", type=float,
                        default=DEFAULT_SCORE_THRESHOLD,
                        help=f"minimum score kept (default {DEFAULT_SCORE_THRESHOLD})")
    parser.add_argument("--nms-iou", type=float,
                        help="merge tiles by class-wise NMS at this IoU (default: the scene core's rule, "
                             f"{DEFAULT_MERGE_RULE})")
    parser.add_argument("--max-detections", type=int, help="cap per image (default: none)")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    from sdconet.engine.checkpoint import CheckpointError
    from sdconet.engine.distributed import resolve_device

    args = build_parser().parse_args(argv)
    setup_logging()
    options = PredictOptions(tile=args.tile, overlap=args.overlap, score_threshold=args.score_threshold,
                             nms_iou=args.nms_iou, max_detections=args.max_detections, input=args.input,
                             batch_size=args.batch_size)
    try:
        predictor = Predictor(args.checkpoint, resolve_device(args.device), options)
        report = predict_folder(predictor, args.images, args.out)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = sum(len(r["detections"]) for r in report["images"])
    print(f"{len(report['images'])} image(s), {total} detection(s) >= {args.score_threshold}: "
          f"{args.out / 'detections.json'}; pictures in {args.out / 'annotated'}/")
    if report["errors"]:
        print(f"{len(report['errors'])} image(s) could not be read (listed under 'errors')")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
