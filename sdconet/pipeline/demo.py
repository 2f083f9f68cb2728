"""The whole product, offline, in one command (``make demo`` = ``python -m sdconet.pipeline.demo``).

Stages (each one a real CLI of the project, logged to ``<out>/logs/<stage>.log``):

1. ``train``     ``train/run.py`` — synthetic dataset (generated on first use), tiny model, full routing schedule;
                 on a CPU-only machine with 2+ cores as 2 single-threaded data-parallel processes (``--nproc 2``)
2. ``evaluate``  ``train/run.py --eval-only`` on the best checkpoint (COCO AP on HR pixels, PSNR/SSIM)
3. ``export``    ``export/build_engine.py`` — ONNX (plugin + pure), parity, INT8 Q/DQ + AP comparison, Triton
                 repository (cpu deployment; TensorRT engine only where TensorRT and a GPU exist)
4. ``serve``     a real Triton server (bundled with nvidia-pytriton) + ``python -m sdconet.client`` on held-out images
5. ``scene-data`` ``python -m sdconet.data synth-scene`` — a georeferenced 2048² GeoTIFF scene + its COCO JSON
6. ``scene``     ``python -m sdconet.predict`` — the whole scene through the OpenVINO CPU runtime (fused MSDA op),
                 HR evaluation protocol, GeoJSON + preview + saliency, whole-scene COCO AP
7. ``benchmark`` ``benchmarks/latency.py`` — torch, ONNX Runtime, OpenVINO, Triton on the exported graph, plus a chart

A failed stage stops the demo naming the stage and its log; earlier outputs stay, and a rerun resumes at the failed
stage. The summary is computed only from the files the stages wrote (:func:`collect_summary`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from sdconet.benchmark.report import REQUIRED_KEYS, markdown_table, rows_of
from sdconet.pipeline.stages import Stage, StageFailed, StageRunner
from sdconet.utils.cpu import usable_cpus

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPORT_NAME = "sdconet"
SCENE_NAME = "scene"
SCENE_SIZE = 2048  # HR pixels of the demo scene (81 tiles of the demo model's 128² LR input, 64 px overlap)
SCENE_SEED = 7  # not a seed of the training images


class DemoLayout:
    """Where each stage writes, under one work directory."""

    def __init__(self, work: Path):
        self.work = work
        self.train = work / "train"
        self.engines = work / "engines"
        self.triton_repo = work / "triton_repo"
        self.detections = work / "detections"
        self.scenes = work / "scenes"
        self.scene_detections = work / "scene_detections"
        self.latency_json = work / "latency.json"
        self.latency_chart = work / "latency.png"
        self.summary_json = work / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.train / "metrics.json"

    @property
    def best_checkpoint(self) -> Path:
        return self.train / "checkpoints" / "best.safetensors"

    @property
    def eval_report(self) -> Path:
        return self.train / "eval_best.json"

    @property
    def export_report(self) -> Path:
        return self.engines / f"{EXPORT_NAME}.report.json"

    @property
    def onnx(self) -> Path:
        return self.engines / f"{EXPORT_NAME}.onnx"

    @property
    def plugin_onnx(self) -> Path:
        return self.engines / f"{EXPORT_NAME}.plugin.onnx"

    @property
    def scene(self) -> Path:
        return self.scenes / f"{SCENE_NAME}.tif"

    @property
    def scene_summary(self) -> Path:
        return self.scene_detections / "summary.json"


def _trained_config(layout: DemoLayout):
    """The config the train stage saved, with its relative data paths made relative to the repository root (the
    directory the stages run in)."""
    from sdconet.config import load_config

    cfg = load_config(layout.train / "config.yaml")
    cfg.data.cache_dir = str(REPO_ROOT / cfg.data.cache_dir)
    if cfg.data.root is not None:
        cfg.data.root = str(REPO_ROOT / cfg.data.root)
    return cfg


def heldout_images(layout: DemoLayout, count: int) -> list[str]:
    """The first ``count`` validation images of the dataset the demo trained on (never seen in training)."""
    from sdconet.data import build_dataset

    cfg = _trained_config(layout)
    dataset = build_dataset(cfg.data, "val", cfg.model.upscale, train=False)
    return [str(Path(dataset.image_path(i)).resolve()) for i in range(min(count, len(dataset)))]


def lr_size(layout: DemoLayout) -> int:
    """The LR side the demo model was trained at (= the export size): the same rule as prediction's default tile."""
    from sdconet.config import lr_image_size

    return lr_image_size(_trained_config(layout))


class _Server:
    """Start/stop hooks around the client stage: a real Triton server on free loopback ports."""

    def __init__(self, layout: DemoLayout):
        self.layout = layout
        self.server = None

    def start(self) -> None:
        from sdconet.serve.server import TritonServer

        # port 0: distinct free ports, picked again if another process takes one before Triton binds it
        self.server = TritonServer(self.layout.triton_repo, http_port=0, grpc_port=0, metrics_port=0,
                                   log_file=self.layout.work / "logs" / "tritonserver.log")
        self.server.start()
        self.server.wait_ready()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def url(self) -> str:
        return self.server.endpoints.http


def default_train_processes() -> int:
    """2 on a CPU-only machine with at least 2 cores, else 1: the demo model does not scale past one thread, so two
    single-threaded DDP processes train it in about half the time of one process with two threads."""
    import torch

    return 2 if not torch.cuda.is_available() and usable_cpus() >= 2 else 1


def build_stages(layout: DemoLayout, python: str = sys.executable, train_args: Sequence[str] = (),
                 calib_images: int | None = None, gate_count: int | None = None, bench_iters: int = 20,
                 clients: int = 4,
                 scene_size: int = SCENE_SIZE) -> list[Stage]:
    server = _Server(layout)
    given = any(a == "--nproc" or a.startswith("--nproc=") for a in train_args)
    nproc = [] if given else ["--nproc", str(default_train_processes())]
    client_argv = lambda: [python, "-m", "sdconet.client", *heldout_images(layout, clients), "--url",  # noqa: E731
                           server.url, "--out", str(layout.detections), "--annotate"]
    return [
        Stage("train", [python, "train/run.py", "--out", str(layout.train), *nproc, *train_args],
              outputs=[layout.metrics, layout.best_checkpoint]),
        Stage("evaluate", [python, "train/run.py", "--eval-only", "--checkpoint", str(layout.best_checkpoint)],
              outputs=[layout.eval_report]),
        Stage("export", lambda: [python, "export/build_engine.py", "--checkpoint", str(layout.best_checkpoint),
                                 "--out", str(layout.engines), "--name", EXPORT_NAME, "--imgsz", str(lr_size(layout)),
                                 "--int8", "--cpu-int8", "onnxruntime", "--cpu-int8", "openvino",
                                 # None: the shipped calibration default (256 inputs), as the issue asks
                                 *(["--calib-images", str(calib_images)] if calib_images else []),
                                 *(["--gate-count", str(gate_count)] if gate_count else []),
                                 "--with-saliency",
                                 "--triton-repo", str(layout.triton_repo)],
              outputs=[layout.export_report, layout.onnx, layout.triton_repo]),
        Stage("serve", client_argv, outputs=[layout.detections], before=server.start, after=server.stop),
        Stage("scene-data", [python, "-m", "sdconet.data", "synth-scene", "--out", str(layout.scenes), "--size",
                             str(scene_size), "--geotiff", "--crs", "EPSG:32633", "--seed", str(SCENE_SEED),
                             "--name", SCENE_NAME],
              outputs=[layout.scene]),
        Stage("scene", [python, "-m", "sdconet.predict", str(layout.scene), "--backend", "openvino", "--model",
                        str(layout.plugin_onnx), "--input", "hr", "--ann", str(layout.scenes / f"{SCENE_NAME}.json"),
                        "--out", str(layout.scene_detections), "--no-progress"],
              outputs=[layout.scene_summary]),
        Stage("benchmark", lambda: [python, "benchmarks/latency.py", "--checkpoint", str(layout.best_checkpoint),
                                    "--imgsz", str(lr_size(layout)), "--backend", "torch", "onnxruntime", "openvino",
                                    "triton",
                                    "--iters", str(bench_iters), "--warmup", "3",
                                    "--work-dir", str(layout.work / "bench"),
                                    "--json", str(layout.latency_json), "--chart", str(layout.latency_chart)],
              outputs=[layout.latency_json, layout.latency_chart]),
    ]


# ------------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def collect_summary(layout: DemoLayout) -> dict[str, Any]:
    """Everything the summary shows, read from the files the stages wrote (missing stages give None entries)."""
    history = _read_json(layout.metrics) or []
    evaluation = _read_json(layout.eval_report)
    report = _read_json(layout.export_report) or {}
    latency = rows_of(_read_json(layout.latency_json) or [], layout.latency_json)  # {rows, provenance} or old list
    int8 = report.get("int8") or {}
    scene_summary = _read_json(layout.scene_summary) or {}
    scenes = scene_summary.get("scenes") or []
    from sdconet.serve.client import FAILURES_FILE

    detections = (sorted(p for p in layout.detections.glob("*.json") if p.name != FAILURES_FILE)
                  if layout.detections.is_dir() else [])
    failures = _read_json(layout.detections / FAILURES_FILE) or []
    pictures = {
        "training_grids": sorted(str(p) for p in (layout.train / "pictures").glob("*.png")),
        "detections": sorted(str(p) for p in layout.detections.glob("*.png")) if layout.detections.is_dir() else [],
        "latency_chart": str(layout.latency_chart) if layout.latency_chart.is_file() else None,
    }
    return {
        "work_dir": str(layout.work),
        "training": {"epochs": len(history), "last": history[-1] if history else None},
        "evaluation": evaluation,
        "export": {
            "parity": {kind: {"max_box_error_px": v["max_box_error_px"], "max_score_error": v["max_score_error"],
                              "passed": v["passed"]} for kind, v in (report.get("parity") or {}).items()},
            "int8": ({"fp32_AP": int8["fp32"]["AP"], "int8_AP": int8["int8"]["AP"],
                      "ap_drop_points": int8["ap_drop_points"]} if "fp32" in int8 else None),
            "calibration": report.get("calibration"),
            "accuracy": report.get("accuracy") or {},
            "skipped": report.get("skipped", []),
        },
        "serving": {"images": len(detections), "failures": len(failures),
                    "detections": sum(_read_json(p).get("num_detections", 0) for p in detections)},
        "scene": ({"file": scenes[0].get("file"), "tiles": scenes[0].get("tiles"),
                   "detections": scenes[0].get("detections"), "seconds": scenes[0].get("seconds"),
                   "metrics": scene_summary.get("metrics")} if scenes else None),
        "latency": [{k: r.get(k) for k in REQUIRED_KEYS} for r in latency],
        "pictures": pictures,
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"SDCoNet demo summary ({summary['work_dir']})", ""]
    metrics = summary["evaluation"] or (summary["training"]["last"] or {})
    if metrics:
        coco = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("AP", "AP50", "APs") if k in metrics)
        sr = f", PSNR {metrics['PSNR']:.2f} dB" if metrics.get("PSNR") is not None else ""
        lines.append(f"detection (val, HR pixels): {coco}{sr}")
    for kind, parity in summary["export"]["parity"].items():
        lines.append(f"export parity {kind}: max box error {parity['max_box_error_px']:.2e} px, max score error "
                     f"{parity['max_score_error']:.2e} -> {'ok' if parity['passed'] else 'FAILED'}")
    int8 = summary["export"]["int8"]
    if int8:
        lines.append(f"INT8 Q/DQ: AP {int8['fp32_AP']:.4f} (fp32) -> {int8['int8_AP']:.4f} (int8), drop "
                     f"{int8['ap_drop_points']:.2f} points")
    accuracy = summary["export"].get("accuracy") or {}
    if accuracy:
        from sdconet.deploy.report import gate_table

        calib = summary["export"].get("calibration") or {}
        lines += ["", f"accuracy gates ({calib.get('images')} calibration inputs from {calib.get('source')}):",
                  gate_table(accuracy), ""]
    for skipped in summary["export"]["skipped"]:
        lines.append(f"skipped {skipped['step']}: {skipped['reason']}")
    serving = summary["serving"]
    lines.append(f"Triton: {serving['detections']} detections on {serving['images']} held-out images"
                 + (f", {serving['failures']} failed (see failures.json)" if serving.get("failures") else ""))
    scene = summary.get("scene")
    if scene:
        metrics = scene["metrics"] or {}
        coco = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("AP", "AP50", "APs") if k in metrics)
        lines.append(f"whole scene {scene['file']}: {scene['tiles']} tiles, {scene['detections']} detections in "
                     f"{scene['seconds']:.1f} s" + (f"; {coco}" if coco else ""))
    if summary["latency"]:
        lines += ["", markdown_table(summary["latency"])]
    pictures = summary["pictures"]
    lines += ["", "pictures:"]
    if pictures["training_grids"]:
        lines.append(f"  training grids (LR / SR / HR / saliency / detections): {pictures['training_grids'][-1]}")
    if pictures["detections"]:
        lines.append(f"  served detections: {pictures['detections'][0]} (+{len(pictures['detections']) - 1} more)")
    if pictures["latency_chart"]:
        lines.append(f"  latency chart: {pictures['latency_chart']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdconet.pipeline.demo", description=__doc__.split("\n\n")[0],
                                     epilog="Extra arguments after -- go to train/run.py (e.g. -- --epochs 2).")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="work directory (default runs/demo)")
    parser.add_argument("--calib-images", type=int, default=None,
                        help="INT8 calibration inputs (default: the exporter's shipped default, 256)")
    parser.add_argument("--gate-count", type=int, default=None,
                        help="held-out images of the accuracy gates (default: the exporter's, 200)")
    parser.add_argument("--bench-iters", type=int, default=20, help="measured calls per benchmark configuration")
    parser.add_argument("--scene-size", type=int, default=SCENE_SIZE,
                        help=f"side in HR pixels of the synthetic GeoTIFF scene (default {SCENE_SIZE})")
    parser.add_argument("--summary-only", action="store_true", help="print the summary of an earlier run and exit")
    args, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    layout = DemoLayout(args.out.resolve())
    if not args.summary_only:
        runner = StageRunner(layout.work, cwd=REPO_ROOT)
        try:
            runner.run_all(build_stages(layout, train_args=train_args, calib_images=args.calib_images,
                                             gate_count=args.gate_count,
                                        bench_iters=args.bench_iters, scene_size=args.scene_size))
        except StageFailed as err:
            print(f"\ndemo stopped: {err}\nearlier stages' outputs are kept in {layout.work}; run the same command "
                  "again to resume from this stage.", file=sys.stderr)
            return 1
    summary = collect_summary(layout)
    layout.summary_json.write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    print(f"\nsummary JSON: {layout.summary_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
