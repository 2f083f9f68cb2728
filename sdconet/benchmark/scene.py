"""Scene benchmarks: the seam-merge study (which merge rule leaves one box per object) and scene throughput.

Seam study (no model): objects are planted on a scene with many of them across tile seams and in overlaps; a
simulated detector returns, for every tile, the visible part of every object that shows at least ``min_visible`` of
its area in that tile (jittered, with a score); each merge rule then has to give back one box per object. Reported
per rule: detections per object, objects found (IoU >= 0.5, one-to-one), duplicates, mean IoU of the matches.

Throughput: ``python benchmarks/scene.py --help``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sdconet.scene.merge import MERGE_RULES, merge_detections
from sdconet.scene.tiling import inner_edges, place_tile_boxes, tile_extents, tile_grid

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# (overlap, object side range, objects a scene, max IoS between objects) of the seam study in docs/scenes.md
SEAM_SETUPS = ((64, (8, 48), 40, 0.0), (32, (30, 90), 40, 0.0), (32, (8, 48), 120, 0.4))


# -- seam study ------------------------------------------------------------------------------------------------------
def plant_seam_objects(tiles: np.ndarray, height: int, width: int, count: int, size: tuple[int, int],
                       rng: np.random.Generator, max_overlap: float = 0.0) -> np.ndarray:
    """``count`` boxes [count, 4] xyxy of side in ``size``, two thirds of them centred on an inner tile edge (cut by
    a seam or inside an overlap), the rest anywhere; two objects overlap by at most ``max_overlap`` IoS (0: apart,
    about 0.3: a crowded parking lot)."""
    edges_x = sorted({int(t[1]) for t in tiles if t[1] > 0} | {int(t[1] + t[3]) for t in tiles if t[1] + t[3] < width})
    edges_y = sorted({int(t[0]) for t in tiles if t[0] > 0} | {int(t[0] + t[2]) for t in tiles if t[0] + t[2] < height})
    boxes: list[np.ndarray] = []
    for _ in range(count * 50):
        if len(boxes) == count:
            break
        w, h = rng.integers(size[0], size[1] + 1, 2)
        cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
        if rng.random() < 2 / 3 and (edges_x or edges_y):
            if edges_x and (not edges_y or rng.random() < 0.5):
                cx = float(np.clip(rng.choice(edges_x) + rng.uniform(-w / 3, w / 3), w / 2, width - w / 2))
            else:
                cy = float(np.clip(rng.choice(edges_y) + rng.uniform(-h / 3, h / 3), h / 2, height - h / 2))
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=np.float32)
        if boxes:
            others = np.stack(boxes)
            inter = ((np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])).clip(0) *
                     (np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])).clip(0))
            smaller = np.minimum((box[2] - box[0]) * (box[3] - box[1]),
                                 (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]))
            if (inter / smaller > max_overlap).any() or (max_overlap == 0 and (inter > 0).any()):
                continue
        boxes.append(box)
    return np.stack(boxes) if boxes else np.zeros((0, 4), np.float32)


def simulate_tile_detections(objects: np.ndarray, tiles: np.ndarray, rng: np.random.Generator,
                             min_visible: float = 0.25, jitter: float = 0.5) -> list[dict[str, np.ndarray]]:
    """Per tile, what a detector would return: the visible part of every object (tile pixels, jittered by
    ``jitter`` px) showing at least ``min_visible`` of its area, scored lower the more of it is cut."""
    areas = (objects[:, 2] - objects[:, 0]) * (objects[:, 3] - objects[:, 1])
    results = []
    for top, left, tile_h, tile_w in tiles.tolist():
        clipped = objects.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(left, left + tile_w)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(top, top + tile_h)
        visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]) / areas
        seen = visible >= min_visible
        boxes = clipped[seen] - np.array([left, top, left, top], np.float32)
        boxes = boxes + rng.normal(0, jitter, boxes.shape).astype(np.float32)
        scores = (0.5 + 0.4 * visible[seen] + rng.uniform(-0.05, 0.05, seen.sum())).astype(np.float32)
        results.append({"boxes": boxes, "scores": scores, "labels": np.zeros(seen.sum(), np.int64)})
    return results


def match_objects(found: np.ndarray, objects: np.ndarray, iou_threshold: float = 0.5) -> tuple[int, list[float]]:
    """Greedy one-to-one matching by IoU (found boxes in the given order): (matched count, IoU of each match)."""
    used = np.zeros(len(objects), dtype=bool)
    ious: list[float] = []
    for box in found:
        inter_w = (np.minimum(box[2], objects[:, 2]) - np.maximum(box[0], objects[:, 0])).clip(0)
        inter_h = (np.minimum(box[3], objects[:, 3]) - np.maximum(box[1], objects[:, 1])).clip(0)
        inter = inter_w * inter_h
        union = ((box[2] - box[0]) * (box[3] - box[1]) +
                 (objects[:, 2] - objects[:, 0]) * (objects[:, 3] - objects[:, 1]) - inter)
        iou = np.where(used, 0.0, inter / union)
        best = int(iou.argmax()) if len(iou) else -1
        if best >= 0 and iou[best] >= iou_threshold:
            used[best] = True
            ious.append(float(iou[best]))
    return int(used.sum()), ious


# the merge study's rules: the CLI's, plus the IoS rule as it was before issue 22 (every same-class pair, whole boxes)
LEGACY_IOS = "ios-all-pairs"
STUDY_RULES = (*MERGE_RULES, LEGACY_IOS)


def merge_tiles(per_tile: Sequence[dict[str, np.ndarray]], tiles: np.ndarray, height: int, width: int,
                rule: str, edge_margin: float = 2.0, threshold: float | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shift per-tile detections to scene pixels and merge them with ``rule`` (one of ``STUDY_RULES``; the same
    steps as the scene core)."""
    inner = inner_edges(tiles, height, width)
    boxes, scores, labels, tile_index, touches = [], [], [], [], []
    for index, (tile, found) in enumerate(zip(tiles, per_tile)):
        scene_boxes, touching, kept = place_tile_boxes(found["boxes"], tile, inner[index], margin=edge_margin)
        boxes.append(scene_boxes)
        scores.append(np.asarray(found["scores"])[kept])
        labels.append(np.asarray(found["labels"])[kept])
        tile_index.append(np.full(len(kept), index))
        touches.append(touching)
    legacy = rule == LEGACY_IOS
    return merge_detections(np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels),
                            rule="ios" if legacy else rule, tile_index=np.concatenate(tile_index),
                            touches_edge=np.concatenate(touches), threshold=threshold,
                            tile_boxes=None if legacy else tile_extents(tiles))


def seam_study(scenes: int = 20, size: int = 600, tile: int = 256, overlap: int = 64,
               object_size: tuple[int, int] = (8, 48), objects: int = 40, max_overlap: float = 0.0,
               seed: int = 0) -> dict[str, Any]:
    """Every merge rule on the same ``scenes`` synthetic seam scenes; figures per rule (module docstring)."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(scenes):
        tiles = tile_grid(size, size, tile, overlap)
        planted = plant_seam_objects(tiles, size, size, objects, object_size, rng, max_overlap)
        cases.append((tiles, planted, simulate_tile_detections(planted, tiles, rng)))
    figures: dict[str, Any] = {}
    for rule in STUDY_RULES:
        total_objects = found_total = detections = 0
        ious: list[float] = []
        for tiles, planted, per_tile in cases:
            boxes, _, _ = merge_tiles(per_tile, tiles, size, size, rule)
            matched, match_ious = match_objects(boxes, planted)
            total_objects += len(planted)
            found_total += matched
            detections += len(boxes)
            ious += match_ious
        figures[rule] = {"objects": total_objects, "detections": detections,
                         "detections_per_object": round(detections / total_objects, 4),
                         "recall_iou50": round(found_total / total_objects, 4),
                         "extra_boxes": detections - found_total,
                         "mean_iou": round(float(np.mean(ious)), 4) if ious else None}
    return {"setup": {"scenes": scenes, "size": size, "tile": tile, "overlap": overlap,
                      "object_size": list(object_size), "objects_per_scene": objects,
                      "max_overlap": max_overlap, "seed": seed}, "rules": figures}


def seam_study_markdown(study: dict[str, Any]) -> str:
    lines = ["| merge rule | detections / object | recall (IoU ≥ 0.5) | extra boxes | mean IoU |",
             "|---|---|---|---|---|"]
    for rule, f in study["rules"].items():
        lines.append(f"| {rule} | {f['detections_per_object']:.3f} | {f['recall_iou50']:.3f} | {f['extra_boxes']} | "
                     f"{f['mean_iou']:.3f} |")
    return "\n".join(lines)


# -- scene throughput ----------------------------------------------------------------------------------------------
def _open_local_runner(backend: str, args: argparse.Namespace):
    from sdconet.runtime import open_runner

    if backend == "torch":
        return open_runner("torch", checkpoint=args.checkpoint, device=args.device, imgsz=args.tile)
    flag, model = {"onnxruntime": ("--onnx", args.onnx), "openvino": ("--openvino", args.openvino),
                   "tensorrt": ("--engine", args.engine)}[backend]
    if model is None:
        raise ValueError(f"backend {backend} needs {flag} FILE")
    if backend == "onnxruntime":
        return open_runner("onnxruntime", model=model, threads=args.threads)
    if backend == "openvino":
        return open_runner("openvino", model=model, threads=args.threads)
    return open_runner("tensorrt", engine_path=model)


def scene_throughput(runner, scene_path: Path, batch: int, overlap: int | None, repeats: int = 1) -> dict[str, Any]:
    """Best of ``repeats`` whole-scene runs of ``scene_path`` through ``runner`` in tile batches of ``batch``."""
    from sdconet.scene.core import SceneInferencer, SceneOptions
    from sdconet.data.raster import open_scene

    inferencer = SceneInferencer(runner, SceneOptions(batch=batch, overlap=overlap, progress=False))
    runner.run(np.zeros((batch, 3, inferencer.tile, inferencer.tile), np.float32))  # warm-up: first-call setup
    best = None
    with open_scene(scene_path) as reader:
        megapixels = reader.width * reader.height / 1e6
        for _ in range(repeats):
            result = inferencer.run(reader)
            if best is None or result.seconds < best.seconds:
                best = result
    return {"megapixels": round(megapixels, 3), "tiles": best.tiles, "detections": len(best.scores),
            "seconds": round(best.seconds, 3), "megapixels_per_s": round(megapixels / best.seconds, 4),
            "tiles_per_s": round(best.tiles / best.seconds, 2)}


def triton_concurrency(url: str, scene_path: Path, concurrency: int, scenes_per_client: int) -> dict[str, Any]:
    """``concurrency`` clients each sending ``scenes_per_client`` copies of the scene to ``sdconet_scene``."""
    from concurrent.futures import ThreadPoolExecutor

    from sdconet.data.raster import Window, open_scene
    from sdconet.runtime.triton_client import TritonSceneClient

    with open_scene(scene_path) as reader:
        rgb, _ = reader.read(Window(0, 0, reader.height, reader.width))
        megapixels = reader.width * reader.height / 1e6

    def client_loop(_: int) -> int:
        tiles = 0
        with TritonSceneClient(url) as client:
            for _ in range(scenes_per_client):
                tiles += client.detect_scene(rgb)["tiles"]
        return tiles

    with TritonSceneClient(url) as client:
        client.detect_scene(rgb)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tiles = sum(pool.map(client_loop, range(concurrency)))
    seconds = time.perf_counter() - started
    scenes = concurrency * scenes_per_client
    return {"megapixels": round(megapixels, 3), "scenes": scenes, "tiles": tiles, "seconds": round(seconds, 3),
            "megapixels_per_s": round(scenes * megapixels / seconds, 4), "tiles_per_s": round(tiles / seconds, 2)}


def cli_peak_rss(args: argparse.Namespace, scene_path: Path, out_dir: Path) -> dict[str, Any]:
    """Run the scene CLI on ``scene_path`` in a fresh process and report what its summary records (peak RSS of
    the whole process: reader, runner, merge and writers)."""
    import subprocess

    command = [sys.executable, "-m", "sdconet.predict", str(scene_path), "--backend", args.rss_backend,
               "--out", str(out_dir), "--force", "--no-progress"]
    if args.rss_backend == "torch":
        command += ["--checkpoint", str(args.checkpoint), "--device", args.device or "cpu"]
    else:
        command += ["--model", str({"onnxruntime": args.onnx, "openvino": args.openvino}[args.rss_backend])]
    if args.overlap is not None:
        command += ["--overlap", str(args.overlap)]
    command += ["--input", args.rss_input]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"status": "failed", "reason": result.stderr.strip().splitlines()[-1:] or ["?"]}
    entry = json.loads((out_dir / "summary.json").read_text())["scenes"][0]
    return {"status": "ok", "backend": args.rss_backend, "input": args.rss_input, "file": str(scene_path),
            "width": entry["width"],
            "height": entry["height"], "tiles": entry["tiles"], "detections": entry["detections"],
            "seconds": entry["seconds"], "wall_s": round(wall, 1), "megapixels_per_s": entry["megapixels_per_s"],
            "peak_rss_mb": entry["peak_rss_mb"]}


def markdown_report(report: dict[str, Any]) -> str:
    lines = [f"# Scene throughput ({report['device']})", "", f"Command: `{report['command']}`", ""]
    if report["throughput"]:
        lines += [f"Scene: {report['scene']} ({report['throughput'][0].get('megapixels', '?')} Mpx), "
                  f"tile {report['tile']}, overlap {report['overlap']}", "",
                  "| backend | tile batch | tiles | seconds | Mpx/s | tiles/s | detections | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["throughput"]:
            lines.append(f"| {r['backend']} | {r['batch']} | {r.get('tiles', '-')} | {r.get('seconds', '-')} | "
                         f"{r.get('megapixels_per_s', '-')} | {r.get('tiles_per_s', '-')} | "
                         f"{r.get('detections', '-')} | {r['status']} |")
    if report["triton"]:
        lines += ["", "Triton `sdconet_scene` (tiling on the server), concurrent scenes:", "",
                  "| concurrent scenes | scenes | seconds | Mpx/s | tiles/s | status |", "|---|---|---|---|---|---|"]
        for r in report["triton"]:
            lines.append(f"| {r['concurrency']} | {r.get('scenes', '-')} | {r.get('seconds', '-')} | "
                         f"{r.get('megapixels_per_s', '-')} | {r.get('tiles_per_s', '-')} | {r['status']} |")
    if report["rss"]:
        r = report["rss"]
        lines += ["", "Peak RSS of the CLI on a large scene:", ""]
        if r["status"] == "ok":
            lines.append(f"- {r['file']} ({r['width']}x{r['height']}, {r['tiles']} tiles, {r['backend']}): "
                         f"peak RSS **{r['peak_rss_mb']} MB**, {r['seconds']} s ({r['megapixels_per_s']} Mpx/s)")
        else:
            lines.append(f"- failed: {r['reason']}")
    for name, study in (report["seam_study"] or {}).items():
        lines += ["", f"Seam-merge study, {name} ({study['setup']['scenes']} scenes of {study['setup']['size']}² px, "
                  f"tile {study['setup']['tile']}, simulated detector):", "", seam_study_markdown(study)]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/scene.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", type=Path, help="scene for the throughput table (e.g. a synth-scene PNG)")
    parser.add_argument("--backends", default="torch,onnxruntime", help="comma list: torch,onnxruntime,openvino,"
                        "tensorrt (default torch,onnxruntime)")
    parser.add_argument("--batches", default="1,4,8", help="tile batch sizes (default 1,4,8)")
    parser.add_argument("--checkpoint", help="torch: weights file or run directory")
    parser.add_argument("--onnx", help="onnxruntime: ONNX file (its batch must allow the largest --batches)")
    parser.add_argument("--openvino", help="openvino: ONNX or IR file")
    parser.add_argument("--engine", help="tensorrt: engine file")
    parser.add_argument("--tile", type=int, help="torch: tile (LR px); default the run's training size")
    parser.add_argument("--overlap", type=int, help="LR px (default: the core's)")
    parser.add_argument("--threads", type=int, help="onnxruntime/openvino intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration, best kept")
    parser.add_argument("--triton-url", help="HOST:PORT of a server with sdconet_scene")
    parser.add_argument("--triton-repo", type=Path, help="start the bundled server on this repository instead")
    parser.add_argument("--concurrency", default="1,4,8", help="concurrent Triton scenes (default 1,4,8)")
    parser.add_argument("--scenes-per-client", type=int, default=2)
    parser.add_argument("--rss-scene", type=Path, help="large scene for the CLI's peak RSS (the 20000^2 GeoTIFF)")
    parser.add_argument("--rss-backend", default="onnxruntime", choices=("torch", "onnxruntime", "openvino"))
    parser.add_argument("--rss-input", choices=("lr", "hr"), default="lr",
                        help="the CLI's --input for the peak-RSS run (hr: degrade x2 first, a quarter of the tiles)")
    parser.add_argument("--seam-study", action="store_true", help="also run the merge-rule study")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "scene_cpu",
                        help="result stem: writes STEM.json and STEM.md (default benchmarks/results/scene_cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import tempfile

    from sdconet.benchmark.device import describe, device_facts
    from sdconet.runtime import RunnerError

    args = build_parser().parse_args(argv)
    for flag, path in (("--scene", args.scene), ("--rss-scene", args.rss_scene)):
        if path is not None and not path.is_file():
            print(f"error: {flag} {path}: file not found", file=sys.stderr)
            return 2
    facts = device_facts()
    report: dict[str, Any] = {"device": describe(facts), "facts": facts,
                              "command": " ".join(["python benchmarks/scene.py", *(argv or sys.argv[1:])]),
                              "scene": str(args.scene) if args.scene else None, "tile": args.tile,
                              "overlap": args.overlap, "throughput": [], "triton": [], "rss": None,
                              "seam_study": None}
    if args.scene is not None:
        for backend in [b for b in args.backends.split(",") if b]:
            for batch in [int(b) for b in args.batches.split(",") if b]:
                record: dict[str, Any] = {"backend": backend, "batch": batch}
                try:
                    with _open_local_runner(backend, args) as runner:
                        report["tile"] = runner.imgsz
                        record |= scene_throughput(runner, args.scene, batch, args.overlap, args.repeats)
                        record["status"] = "ok"
                except (RunnerError, ValueError, OSError) as err:
                    record |= {"status": "skipped", "reason": str(err)}
                print(json.dumps(record), flush=True)
                report["throughput"].append(record)
    if args.scene is not None and (args.triton_url or args.triton_repo):
        levels = [int(c) for c in args.concurrency.split(",") if c]
        if args.triton_repo is not None:
            from sdconet.serve.server import TritonServer

            with TritonServer(args.triton_repo, http_port=0, grpc_port=0, metrics_port=0) as server:  # free ports
                report["triton"] = [_triton_level(server.endpoints.http, args, c) for c in levels]
        else:
            report["triton"] = [_triton_level(args.triton_url, args, c) for c in levels]
    if args.rss_scene is not None:
        with tempfile.TemporaryDirectory(prefix="scene_rss_") as tmp:
            report["rss"] = cli_peak_rss(args, args.rss_scene, Path(tmp))
        print(json.dumps(report["rss"]), flush=True)
    if args.seam_study:
        report["seam_study"] = {f"overlap {overlap}, objects {lo}-{hi} px, {count} a scene, overlapping <= {crowd} IoS":
                                seam_study(overlap=overlap, object_size=(lo, hi), objects=count, max_overlap=crowd)
                                for overlap, (lo, hi), count, crowd in SEAM_SETUPS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown_report(report))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


def _triton_level(url: str, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    record: dict[str, Any] = {"concurrency": concurrency}
    try:
        record |= triton_concurrency(url, args.scene, concurrency, args.scenes_per_client) | {"status": "ok"}
    except Exception as err:  # a server error is a row of the table, not a crash of the benchmark
        record |= {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
    print(json.dumps(record), flush=True)
    return record
