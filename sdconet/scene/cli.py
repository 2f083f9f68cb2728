"""Detect objects in whole scenes with any backend: ``python -m sdconet.predict SCENE_OR_DIR... --out DIR``.

  python -m sdconet.predict scenes/ --backend torch --checkpoint runs/demo --out detections/
  python -m sdconet.predict big.tif --backend onnxruntime --model engines/sdconet.onnx --out detections/
  python -m sdconet.predict big.png --backend triton --url 127.0.0.1:8000 --out detections/
  python -m sdconet.predict bgrnir.tif --bands 3 2 1 --backend torch --checkpoint runs/demo --out detections/

Scenes are fed at their native resolution (``--input lr``, the default: the file is the network input); ``--input
hr`` reproduces the evaluation protocol (degrade x upscale like training, boxes back in file pixels). ``--tile`` and
``--overlap`` are in network-input (LR) pixels; a fixed-size model (ONNX, OpenVINO, TensorRT, Triton) needs the tile
to equal its input size. With ``--backend triton`` the server's scene model ``sdconet_scene`` tiles and merges.

Per scene, mirroring its path relative to the folder given (or its name for a file): ``OUT/<stem>.geojson``,
``OUT/<stem>.json``, ``OUT/<stem>_preview.png``, ``OUT/<stem>_saliency.{png,tif}`` and the done-marker
``OUT/<stem>.done.json``; for the job ``OUT/summary.json`` = ``{"scenes", "errors", "metrics"}``. A rerun on the same
``--out`` skips the scenes already done with the same model and options (``--force`` redoes them). Exit status: 0 all
scenes done, 1 some scene failed (listed under ``errors``), 2 bad arguments or a model that cannot be opened.
Guide: docs/scenes.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from sdconet.runtime.base import DEFAULT_SCORE_THRESHOLD
from sdconet.scene.core import INPUTS, SceneInferencer, SceneOptions, SceneResult
from sdconet.scene.merge import DEFAULT_EDGE_IOU, DEFAULT_IOS, DEFAULT_MERGE_RULE, DEFAULT_NMS_IOU, MERGE_RULES
from sdconet.utils.io import sha256_of
from sdconet.utils.logging import get_logger, setup_logging
from sdconet.utils.process import pid_alive

logger = get_logger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt", "triton")
# what a folder is searched for (a file given directly may be any format GDAL reads); .img = Erdas Imagine (HFA)
SCENE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".jp2", ".j2k", ".vrt", ".img")
SUMMARY_NAME = "summary.json"
DONE_SUFFIX = ".done.json"
MARKER_VERSION = 2  # bump when the outputs of the same model + options change (2: cross-tile merge, issue 22)
DEFAULT_EVAL_SCORE_THRESHOLD = 0.001  # --ann scores the curve down to here (the usual COCO evaluation cut)


class UsageError(ValueError):
    """Bad arguments or an unusable model: exit status 2 with the message."""


@dataclass
class Scene:
    path: Path  # the file
    relative: Path  # its path under the input folder (its name for a file given directly)

    @property
    def stem(self) -> Path:
        """Output prefix relative to OUT: the relative path without its suffix."""
        return self.relative.with_suffix("")


def collect_scenes(inputs: Sequence[str | Path]) -> list[Scene]:
    """Scene files of ``inputs`` (files, or folders searched recursively), refusing missing paths, empty folders
    and two scenes whose outputs would collide (same relative path without suffix, or the reserved ``summary``)."""
    scenes: list[Scene] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in SCENE_SUFFIXES)
            found = _withoutvrt_sources(found)
            if not found:
                raise UsageError(f"{item}: no scenes ({', '.join(SCENE_SUFFIXES)})")
            scenes += [Scene(p, p.relative_to(item)) for p in found]
        elif item.is_file():
            scenes.append(Scene(item, Path(item.name)))
        else:
            raise UsageError(f"scene or folder not found: {item}")
    seen: dict[str, Path] = {}
    for scene in scenes:
        key = scene.stem.as_posix()
        if key == Path(SUMMARY_NAME).stem:
            raise UsageError(f"{scene.path}: a scene may not be named 'summary' at the top of --out "
                             f"(OUT/{SUMMARY_NAME} is the job's summary); rename it or put it in a folder")
        if key in seen:
            raise UsageError(f"{seen[key]} and {scene.path} would both write OUT/{key}.*; give them different "
                             f"names or folders")
        seen[key] = scene.path
    return scenes


def _withoutvrt_sources(found: list[Path]) -> list[Path]:
    """``found`` less the files that one of its VRTs reads (a mosaic's tiles, the GeoTIFF under a VRT): they are
    detected once, through the VRT, and do not collide with it on the output name. A VRT that cannot be opened is
    kept, to fail with its own message when its turn comes."""
    vrts = [p for p in found if p.suffix.lower() == ".vrt"]
    if not vrts:
        return found
    import rasterio
    from sdconet.data.raster import vrt_sources

    sources: set[Path] = set()
    for vrt in vrts:
        try:
            with rasterio.Env(), rasterio.open(vrt) as ds:
                sources.update(Path(name).resolve() for name in vrt_sources(ds) if not name.startswith("/vsi"))
        except rasterio.errors.RasterioError:
            continue
    kept = [p for p in found if p.resolve() not in sources or p in vrts]
    if len(kept) < len(found):
        logger.info("%d file(s) read through a VRT of the folder are not detected on their own", len(found) - len(kept))
    return kept


# -- backends: what runs one scene ----------------------------------------------------------------------------------
class LocalScenes:
    """A runner in this process + the scene core (torch, onnxruntime, openvino, tensorrt)."""

    def __init__(self, runner, options: SceneOptions, model_id: dict[str, Any]) -> None:
        self.runner, self.options = runner, options
        self.inferencer = SceneInferencer(runner, options)
        self.class_names = runner.class_names
        self.model_id = model_id

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "runner": self.runner.describe(), "scene": self.inferencer.describe()}

    def detect(self, reader) -> SceneResult:
        return self.inferencer.run(reader)

    def close(self) -> None:
        self.runner.close()


class TritonScenes:
    """The served scene model ``sdconet_scene`` (tiling and merging on the server). The scene's tiling, thresholds
    and merge rule travel as request parameters, so the server applies the same options a local backend would."""

    def __init__(self, url: str, options: SceneOptions, protocol: str, timeout_s: float, retries: int) -> None:
        from sdconet.runtime.triton_client import TritonSceneClient

        if options.input != "lr":
            raise UsageError("--backend triton tiles scenes at their native resolution on the server: "
                             "--input hr is not available there (use a local backend)")
        self.client = TritonSceneClient(url, protocol=protocol, timeout_s=timeout_s, retries=retries)
        try:
            self.server = self.client.server_options()
        except Exception as err:  # connection refused, model not loaded: tritonclient raises its own types
            self.client.close()
            raise UsageError(f"triton server {url}: cannot read the sdconet_scene model's options ({err})") from err
        imgsz = self.server.get("imgsz")
        if options.tile is not None and imgsz is not None and options.tile != imgsz:
            self.client.close()
            raise UsageError(f"--tile {options.tile}: the served detector takes {imgsz} px tiles; leave --tile out "
                             f"or serve a model of that size")
        self.tile = options.tile or imgsz
        self.overlap = options.overlap if options.overlap is not None else self.server.get("overlap")
        if self.tile is not None and self.overlap is not None and not 0 <= self.overlap < self.tile:
            self.client.close()
            raise UsageError(f"--overlap {self.overlap}: need 0 <= overlap < the {self.tile} px tile")
        self.options, self.url = options, url
        self.class_names: list[str] = list(self.server.get("class_names") or [])

    def describe(self) -> dict[str, Any]:
        return {"model": {"url": self.url, "server": self.server},
                "scene": {"tile": self.tile, "overlap": self.overlap, "merge": self.options.merge,
                          "merge_threshold": self.options.merge_threshold,
                          "score_threshold": self.options.score_threshold,
                          "eval_score_threshold": self.options.eval_score_threshold,
                          "max_detections": self.options.max_detections}}

    def _request(self, rgb: np.ndarray, valid: Optional[np.ndarray], threshold: float) -> dict[str, Any]:
        found = self.client.detect_scene(rgb, valid=valid, score_threshold=threshold, overlap=self.overlap,
                                         merge_rule=self.options.merge,
                                         merge_threshold=self.options.merge_threshold)
        labels = found["labels"].astype(np.int64)
        if self.class_names:  # the server names every detection; the outputs name them from the model's list
            expected = [self.class_names[v] if 0 <= v < len(self.class_names) else str(v) for v in labels.tolist()]
            if list(found["class_names"]) != expected:
                raise ValueError(f"{self.url}: the served detections' class names disagree with the model's class "
                                 f"list {self.class_names} (a repository built from another model?)")
        keep = np.flatnonzero(found["scores"] >= threshold)[:self.options.max_detections]
        return {"boxes": found["boxes"][keep].astype(np.float32), "scores": found["scores"][keep].astype(np.float32),
                "labels": labels[keep], "tiles": int(found["tiles"]), "tiles_skipped": int(found["tiles_skipped"])}

    def detect(self, reader) -> SceneResult:
        from sdconet.data.raster import Window
        from sdconet.scene.tiling import tile_grid

        started = time.perf_counter()
        limit = self.server.get("max_scene_pixels")
        if limit is not None and reader.width * reader.height > limit:
            raise ValueError(f"{reader.path}: {reader.width}x{reader.height} px exceeds the server's "
                             f"max_scene_pixels={limit}; use a local backend for this scene")
        max_tiles = self.server.get("max_tiles")
        if max_tiles is not None and self.tile is not None and self.overlap is not None:
            needed = len(tile_grid(reader.height, reader.width, self.tile, self.overlap))
            if needed > max_tiles:  # refused before the upload, not after it
                raise ValueError(f"{reader.path}: {reader.width}x{reader.height} px needs {needed} tiles of "
                                 f"{self.tile} px (overlap {self.overlap}); the server's max_tiles is {max_tiles}; "
                                 f"use a local backend for this scene")
        rgb, valid = reader.read(Window(0, 0, reader.height, reader.width))
        rgb = np.ascontiguousarray(rgb)
        if valid.all():
            valid = None
        else:  # nodata goes as zeros, and the server does not run tiles without a valid pixel
            rgb = np.where(valid[..., None], rgb, 0).astype(np.uint8)
        found = self._request(rgb, valid, self.options.score_threshold)
        evaluation = None
        if self.options.eval_score_threshold is not None:
            evaluation = (found if self.options.eval_score_threshold == self.options.score_threshold else
                          self._request(rgb, valid, self.options.eval_score_threshold))  # merged on its own
            evaluation = {key: evaluation[key] for key in ("boxes", "scores", "labels")}
        return SceneResult(found["boxes"], found["scores"], found["labels"], None, tiles=found["tiles"],
                           tiles_skipped=found["tiles_skipped"], seconds=time.perf_counter() - started,
                           evaluation=evaluation)

    def close(self) -> None:
        self.client.close()


def open_backend(args: argparse.Namespace, options: SceneOptions):
    """The backend the arguments ask for; ``UsageError`` for a wrong combination or an unusable model."""
    from sdconet.runtime import RunnerError, open_runner

    sources = {"--checkpoint": args.checkpoint, "--model": args.model, "--url": args.url}
    given = [flag for flag, value in sources.items() if value is not None]
    wanted = {"torch": "--checkpoint", "triton": "--url"}.get(args.backend, "--model")
    if given != [wanted]:
        raise UsageError(f"--backend {args.backend} takes {wanted} (got {', '.join(given) or 'none'})")
    if args.backend == "triton":
        return TritonScenes(args.url, options, args.protocol, args.timeout, args.retries)
    try:
        if args.backend == "torch":
            from sdconet.engine.checkpoint import CheckpointError, resolve_checkpoint
            from sdconet.runtime.torch_runner import TRAINING_SIZE

            try:
                checkpoint = resolve_checkpoint(args.checkpoint)
            except CheckpointError as err:
                raise UsageError(str(err)) from err
            runner = open_runner("torch", checkpoint=checkpoint, device=args.device,
                                 precision=args.precision or "fp32",
                                 imgsz=options.tile if options.tile is not None else TRAINING_SIZE)
            model_path = checkpoint
        else:
            model_path = Path(args.model)
            if not model_path.is_file():
                raise UsageError(f"--model {model_path}: file not found")
            if args.backend == "onnxruntime":
                runner = open_runner("onnxruntime", model=model_path, threads=args.threads)
            elif args.backend == "openvino":
                runner = open_runner("openvino", model=model_path, precision=args.precision or "fp32",
                                     threads=args.threads)
            else:
                runner = open_runner("tensorrt", engine_path=model_path, plugin_libs=args.plugin or ())
    except RunnerError as err:
        raise UsageError(str(err)) from err
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as err:  # e.g. a corrupt model file: the runtime's own parser error, named with the file
        source = args.checkpoint if args.backend == "torch" else args.model
        raise UsageError(f"{source}: the {args.backend} backend cannot open it ({type(err).__name__}: {err})") from err
    if args.precision and runner.precision != args.precision:
        runner.close()
        raise UsageError(f"--precision {args.precision}: {model_path} runs in {runner.precision}")
    model_id = {"backend": args.backend, "file": str(model_path.resolve()), "sha256": sha256_of(model_path),
                "precision": runner.precision}
    try:
        return LocalScenes(runner, options, model_id)
    except ValueError as err:
        runner.close()
        raise UsageError(str(err)) from err


# -- one scene, resumable -----------------------------------------------------------------------------------------
def scene_key(job: dict[str, Any], scene: Scene) -> str:
    """Hash of what determines a scene's outputs: model, options, output settings and the input file's identity."""
    stat = scene.path.stat()
    material = {"version": MARKER_VERSION, "job": job, "file": str(scene.path.resolve()), "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def read_marker(path: Path) -> Optional[dict[str, Any]]:
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # absent or unreadable: the scene is redone
    return marker if isinstance(marker, dict) else None


def run_scene(backend, scene: Scene, out: Path, job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Detect one scene and write its outputs, the done-marker last; or return the recorded entry of a scene
    already done with the same key."""
    from sdconet.utils.process import peak_rss_mb
    from sdconet.scene.outputs import EVAL_SUFFIX, write_evaluation_detections, write_scene_outputs
    from sdconet.data.raster import open_scene
    from sdconet.utils.io import write_text_atomically

    out_dir = out / scene.stem.parent
    stem = scene.stem.name
    marker_path = out_dir / f"{stem}{DONE_SUFFIX}"
    key = scene_key(job, scene)
    marker = None if args.force else read_marker(marker_path)
    evaluating = backend.options.eval_score_threshold is not None
    if (marker is not None and marker.get("key") == key and (out_dir / f"{stem}.json").is_file()
            and (not evaluating or (out_dir / f"{stem}{EVAL_SUFFIX}").is_file())):
        logger.info("%s: done already with the same model and options (--force redoes it)", scene.relative)
        return marker["scene"]
    with open_scene(scene.path, max_unwindowed_pixels=args.max_unwindowed_pixels, bands=args.bands) as reader:
        result = backend.detect(reader)
        written = write_scene_outputs(out_dir, stem, reader, result.detections, backend.class_names,
                                      geojson_crs=args.geojson_crs, saliency=result.saliency)
        if result.evaluation is not None:
            written["eval"] = write_evaluation_detections(out_dir, stem, scene.relative.as_posix(),
                                                          result.evaluation, backend.class_names,
                                                          backend.options.eval_score_threshold)
        megapixels = reader.width * reader.height / 1e6
        entry = {"file": scene.relative.as_posix(), "width": reader.width, "height": reader.height,
                 "tiles": result.tiles, "tiles_skipped": result.tiles_skipped, "detections": len(result.scores),
                 "outputs": {kind: (scene.stem.parent / path.name).as_posix()
                             for kind, path in written.items() if path is not None},
                 "seconds": round(result.seconds, 3),
                 "tiles_per_s": round(result.tiles / result.seconds, 3) if result.seconds > 0 else None,
                 "megapixels_per_s": round(megapixels / result.seconds, 3) if result.seconds > 0 else None,
                 "peak_rss_mb": round(peak_rss_mb(), 1)}
    write_text_atomically(marker_path, json.dumps({"key": key, "scene": entry}, indent=2))
    return entry


# -- evaluation ---------------------------------------------------------------------------------------------------
def evaluate_scenes(ann_file: Path, out: Path, entries: Sequence[dict[str, Any]],
                    score_threshold: Optional[float] = None) -> dict[str, Any]:
    """COCO metrics of the whole-scene detections at the evaluation threshold (read back from each
    ``<stem>.eval.json``; ``<stem>.json`` for entries without one) against ``ann_file``,
    whose ``file_name``s are the scenes' relative paths (or names); categories matched to class names by name;
    maxDets = max(100, the largest ground-truth count of a scene)."""
    from sdconet.engine.metrics import coco_evaluate, load_coco

    coco = load_coco(ann_file)
    by_name = {img["file_name"]: img["id"] for img in coco.dataset.get("images", [])}
    by_base = {Path(name).name: image_id for name, image_id in by_name.items()}
    category = {cat["name"]: cat["id"] for cat in coco.dataset.get("categories", [])}
    detections, image_ids, unmatched_names = [], [], set()
    for entry in entries:
        image_id = by_name.get(entry["file"], by_base.get(Path(entry["file"]).name))
        if image_id is None:
            logger.warning("%s: not in %s; left out of the metrics", entry["file"], ann_file)
            continue
        image_ids.append(image_id)
        record = json.loads((out / entry["outputs"].get("eval", entry["outputs"]["json"])).read_text())
        for det in record["detections"]:
            if det["class_name"] not in category:
                unmatched_names.add(det["class_name"])
                continue
            x1, y1, x2, y2 = det["bbox_xyxy"]
            detections.append({"image_id": image_id, "category_id": category[det["class_name"]],
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": det["score"]})
    if not image_ids:
        raise UsageError(f"--ann {ann_file}: none of the scenes is among its images' file_name")
    if unmatched_names:
        logger.warning("classes %s are not categories of %s: their detections are left out",
                       sorted(unmatched_names), ann_file)
    counts = [len(coco.getAnnIds(imgIds=[i])) for i in image_ids]
    max_dets = max(100, *counts)
    metrics = coco_evaluate(coco, detections, image_ids=image_ids, max_detections=max_dets)
    return metrics | {"max_dets": max_dets, "images": len(image_ids), "detections": len(detections),
                      "score_threshold": score_threshold}


# -- CLI ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdconet.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenes", nargs="+", metavar="SCENE_OR_DIR", help="scene files or folders (recursive)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="runtime (default torch)")
    parser.add_argument("--checkpoint", help="torch: weights file or run directory")
    parser.add_argument("--model", help="onnxruntime/openvino: an .onnx (or OpenVINO .xml); tensorrt: an engine")
    parser.add_argument("--url", help="triton: HOST:PORT of a server with the sdconet_scene model")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--input", choices=INPUTS, default="lr",
                        help="lr: the file is the network input (default); hr: degrade like training first")
    parser.add_argument("--tile", type=int, help="tile side in LR pixels (default: the model's input size)")
    parser.add_argument("--overlap", type=int, help="tile overlap in LR pixels (default 64, at most half the tile)")
    parser.add_argument("--batch", type=int, help="tiles per runner call (default: the model's max batch, else 4)")
    parser.add_argument("--score-threshold", "--score-thresh", dest="score_threshold", type=float,
                        default=DEFAULT_SCORE_THRESHOLD,
                        help=f"minimum score kept (default {DEFAULT_SCORE_THRESHOLD})")
    parser.add_argument("--eval-score-threshold", type=float, default=DEFAULT_EVAL_SCORE_THRESHOLD,
                        help=f"with --ann: minimum score of the detections scored (merged on their own, written "
                             f"to OUT/<stem>.eval.json; default {DEFAULT_EVAL_SCORE_THRESHOLD}, independent of "
                             f"--score-threshold)")
    parser.add_argument("--max-detections", type=int, help="cap per scene (default: none)")
    parser.add_argument("--merge", choices=MERGE_RULES, default=DEFAULT_MERGE_RULE,
                        help=f"cross-tile merge rule (default {DEFAULT_MERGE_RULE}; docs/scenes.md)")
    parser.add_argument("--merge-threshold", type=float, default=None,
                        help=f"the rule's match threshold: IoS for ios (default {DEFAULT_IOS}), NMS IoU for edge "
                             f"(default {DEFAULT_EDGE_IOU}) and nms (default {DEFAULT_NMS_IOU})")
    parser.add_argument("--ann", type=Path, help="COCO JSON whose file_names are the scenes: whole-scene metrics")
    parser.add_argument("--force", action="store_true", help="redo scenes already done in --out")
    parser.add_argument("--precision", help="check the model runs in this precision (torch: fp32|bf16|fp16)")
    parser.add_argument("--geojson-crs", choices=("wgs84", "native"), default="wgs84",
                        help="GeoJSON coordinates of georeferenced scenes (default wgs84 lon/lat)")
    parser.add_argument("--device", default=None, help="torch: cpu | cuda | cuda:N (default: CUDA when available)")
    parser.add_argument("--threads", type=int, help="onnxruntime/openvino: intra-op threads")
    parser.add_argument("--plugin", action="append", help="tensorrt: plugin library (repeatable)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http", help="triton protocol")
    parser.add_argument("--timeout", type=float, default=600.0, help="triton: seconds per scene request")
    parser.add_argument("--retries", type=int, default=0,
                        help="triton: resend a scene after a connection error or UNAVAILABLE (backoff doubles)")
    parser.add_argument("--bands", type=int, nargs="+", metavar="N", default=None,
                        help="band numbers (1-based, as gdal_translate -b) read as R G B, e.g. --bands 3 2 1 for a "
                             "B,G,R,NIR file, or one band read as grey (default: from the colour interpretation: "
                             "1/3 bands, 4 = RGB+alpha or RGB+NIR; docs/scenes.md). Put it after the scene paths or before another option: "
                             "it takes every number that follows")
    parser.add_argument("--max-unwindowed-pixels", type=int, default=None,
                        help="largest PNG/JPEG/strip TIFF decoded whole (default: the reader's limit)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_bands(bands: Sequence[int]) -> None:
    """``--bands`` without a file: 1 or 3 band numbers, each >= 1 (the upper bound is each file's band count,
    checked when the scene is opened)."""
    if len(bands) not in (1, 3):
        raise UsageError(f"--bands {' '.join(map(str, bands))}: give 3 band numbers (R G B) or 1 (grey), "
                         f"got {len(bands)}")
    for band in bands:
        if band < 1:
            raise UsageError(f"--bands {' '.join(map(str, bands))}: band {band} does not exist; band numbers "
                             f"start at 1 (GDAL convention, as gdal_translate -b)")


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    from sdconet.utils.io import write_text_atomically

    write_text_atomically(out / SUMMARY_NAME, json.dumps(summary, indent=2))


# write_atomically's temporary name: .<stem>.<pid>-<8 hex>.tmp<suffix>
_TEMPORARY = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp(\.[^.]+)?$")


def remove_stale_temporaries(out: Path) -> int:
    """Delete the temporary files that a killed job's atomic writes left under ``out`` (those whose writing process
    is gone); returns how many. A live writer's temporaries are left alone."""
    removed = 0
    for path in out.rglob(".*.tmp*"):
        match = _TEMPORARY.match(path.name)
        if match is None or not path.is_file():
            continue
        if pid_alive(int(match.group(1))):
            continue  # its writer still runs
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    from sdconet.data.raster import DEFAULT_MAX_UNWINDOWED_PIXELS

    args = build_parser().parse_args(argv)
    setup_logging()
    if args.max_unwindowed_pixels is None:
        args.max_unwindowed_pixels = DEFAULT_MAX_UNWINDOWED_PIXELS
    options = SceneOptions(input=args.input, tile=args.tile, overlap=args.overlap,
                           score_threshold=args.score_threshold, max_detections=args.max_detections,
                           batch=args.batch, merge=args.merge, merge_threshold=args.merge_threshold,
                           eval_score_threshold=args.eval_score_threshold if args.ann is not None else None,
                           progress=not args.no_progress)
    try:
        if args.bands is not None:
            check_bands(args.bands)
        if args.ann is not None and not args.ann.is_file():
            raise UsageError(f"--ann {args.ann}: file not found")
        scenes = collect_scenes(args.scenes)
        backend = open_backend(args, options)
    except (UsageError, ValueError, OSError) as err:  # OSError: an unreadable model file
        print(f"error: {err}", file=sys.stderr)
        return 2
    job = {"backend": backend.describe(), "geojson_crs": args.geojson_crs}
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission: bad arguments, not a crash
        backend.close()
        print(f"error: --out {args.out}: cannot create the folder ({err.strerror or err})", file=sys.stderr)
        return 2
    if args.bands is not None:  # only when given, so the markers of jobs run without --bands stay valid
        job["bands"] = list(args.bands)
    summary: dict[str, Any] = {"backend": args.backend, "settings": job, "scenes": [], "errors": [],
                               "metrics": None}
    stale = remove_stale_temporaries(args.out)
    if stale:
        logger.info("%s: removed %d temporary file(s) of an interrupted run", args.out, stale)
    try:
        for scene in scenes:
            try:
                summary["scenes"].append(run_scene(backend, scene, args.out, job, args))
            except Exception as err:  # one bad scene is an entry in errors; the others still run
                logger.error("%s", err if str(scene.path) in str(err) else f"{scene.path}: {err}")
                summary["errors"].append({"file": scene.relative.as_posix(), "error": f"{type(err).__name__}: {err}"})
            write_summary(args.out, summary)
    finally:
        backend.close()
    if args.ann is not None and summary["scenes"]:
        try:
            summary["metrics"] = evaluate_scenes(args.ann, args.out, summary["scenes"], args.eval_score_threshold)
        except (UsageError, ValueError, KeyError) as err:
            summary["errors"].append({"file": str(args.ann), "error": f"evaluation: {err}"})
    write_summary(args.out, summary)
    total = sum(entry["detections"] for entry in summary["scenes"])
    print(f"{len(summary['scenes'])} scene(s), {total} detection(s) >= {args.score_threshold}: "
          f"{args.out / SUMMARY_NAME}")
    if summary["errors"]:
        print(f"{len(summary['errors'])} scene(s) failed (listed under 'errors')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
