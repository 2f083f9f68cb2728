"""Export report: parity figures, artifact list and a readable summary (``<name>.report.json`` + ``.report.md``).

Top-level JSON keys (stable, documented in docs/export.md): ``schema_version``, ``name``, ``created``,
``checkpoint``, ``options``, ``environment``, ``artifacts``, ``graphs``, ``parity``, ``int8``, ``engine``, ``triton``,
``skipped``, ``provenance`` (:mod:`sdconet.utils.provenance`: the command, commit, versions and CPU behind the figures,
the ``accuracy`` section's included).
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sdconet.utils.io import sha256_of  # noqa: F401  (re-exported: the exporter's artifact hashes)
from sdconet.utils.provenance import provenance

SCHEMA_VERSION = 1
BOX_TOLERANCE = 1e-3  # of the image size
SCORE_TOLERANCE = 1e-4
TOP_LABELS = 10  # detections per image whose labels must match


def parity_figures(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], image_size: int,
                   top_labels: int = TOP_LABELS) -> dict:
    """Compare (boxes, scores, labels) of two runs on the same images.

    Boxes: max abs difference in pixels and as a fraction of ``image_size`` (tolerance 1e-3). Scores: max abs
    difference (tolerance 1e-4). Labels: equal for the ``top_labels`` highest-scoring detections of each image
    (outputs are already sorted by score).
    """
    boxes_ref, scores_ref, labels_ref = (np.asarray(a) for a in reference[:3])
    boxes, scores, labels = (np.asarray(a) for a in candidate[:3])
    if boxes.shape != boxes_ref.shape or scores.shape != scores_ref.shape:
        raise ValueError(f"output shapes differ: boxes {boxes.shape} vs {boxes_ref.shape}, scores {scores.shape} vs "
                         f"{scores_ref.shape}")
    box_error = float(np.abs(boxes.astype(np.float64) - boxes_ref).max(initial=0.0))
    score_error = float(np.abs(scores.astype(np.float64) - scores_ref).max(initial=0.0))
    k = min(top_labels, labels.shape[1])
    labels_match = bool(np.array_equal(labels[:, :k].astype(np.int64), labels_ref[:, :k].astype(np.int64)))
    return {"max_box_error_px": box_error, "max_box_error_rel": box_error / image_size,
            "max_score_error": score_error, "top_labels_compared": k, "top_labels_match": labels_match,
            "tolerances": {"box_rel": BOX_TOLERANCE, "score": SCORE_TOLERANCE},
            "passed": bool(box_error / image_size <= BOX_TOLERANCE and score_error <= SCORE_TOLERANCE
                           and labels_match)}


def environment() -> dict:
    import onnx
    import onnxruntime
    import torch

    from sdconet.utils.tensorrt import tensorrt_version

    try:
        import onnxsim
        onnxsim_version = getattr(onnxsim, "__version__", "unknown")
    except ImportError:
        onnxsim_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxsim": onnxsim_version, "tensorrt": tensorrt_version(),
            "cuda_available": torch.cuda.is_available(), "host": platform.node()}


@dataclass
class ExportReport:
    """Collects what the exporter did; ``write`` produces the JSON and the Markdown summary."""

    name: str
    checkpoint: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)
    graphs: dict[str, dict] = field(default_factory=dict)
    parity: dict[str, dict] = field(default_factory=dict)
    int8: dict | None = None
    calibration: dict | None = None  # the INT8 paths' calibration inputs: count and source
    engine: dict | None = None
    # accuracy gate results (sdconet.deploy.accuracy.accuracy_gate) by artifact, e.g. "tensorrt_fp16"
    accuracy: dict[str, dict] = field(default_factory=dict)
    triton: dict | None = None
    skipped: list[dict] = field(default_factory=list)

    def add_artifact(self, kind: str, path: str | Path, **extra: Any) -> dict:
        path = Path(path)
        entry = {"kind": kind, "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_of(path), **extra}
        self.artifacts.append(entry)
        return entry

    def skip(self, step: str, reason: str) -> None:
        self.skipped.append({"step": step, "reason": reason})

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "name": self.name,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "checkpoint": self.checkpoint, "options": self.options, "environment": environment(),
                "artifacts": self.artifacts, "graphs": self.graphs, "parity": self.parity, "int8": self.int8,
                "calibration": self.calibration, "engine": self.engine, "accuracy": self.accuracy,
                "triton": self.triton, "skipped": self.skipped, "provenance": provenance()}

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        json_path = out_dir / f"{self.name}.report.json"
        json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        md_path = out_dir / f"{self.name}.report.md"
        md_path.write_text(render_summary(data))
        return json_path, md_path


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.2f} MiB"


def render_summary(data: dict) -> str:
    """Readable Markdown summary of a report dict (also printed by the CLI)."""
    lines = [f"# Export report: {data['name']}", "",
             f"checkpoint: `{data['checkpoint'].get('path')}`  ", f"created: {data['created']}", "",
             "## Artifacts", "", "| kind | file | size | sha256 |", "|---|---|---|---|"]
    for item in data["artifacts"]:
        lines.append(f"| {item['kind']} | `{Path(item['path']).name}` | {_mib(item['bytes'])} | "
                     f"{item['sha256'][:12]} |")
    lines += ["", "## Graphs", "", "| graph | nodes | custom nodes | TensorRT op check |", "|---|---|---|---|"]
    for kind, graph in data["graphs"].items():
        custom = sum(v for k, v in graph["op_counts"].items() if "::" in k)
        support = graph.get("op_support", {})
        verdict = "ok" if support.get("ok") else f"FAILS: {', '.join(support.get('offending_ops', []))}"
        lines.append(f"| {kind} | {graph['nodes']} | {custom} | {verdict} "
                     f"(TensorRT {support.get('tensorrt_version')}) |")
    lines += ["", "## Parity with PyTorch (ONNX Runtime CPU)", "",
              "| graph | max box error (px / rel) | max score error | top labels equal | passed |",
              "|---|---|---|---|---|"]
    for kind, figures in data["parity"].items():
        lines.append(f"| {kind} | {figures['max_box_error_px']:.3g} / {figures['max_box_error_rel']:.2e} | "
                     f"{figures['max_score_error']:.2e} | {figures['top_labels_match']} | {figures['passed']} |")
    if data.get("accuracy"):
        calib = data.get("calibration") or {}
        lines += ["", f"## Accuracy gates (calibration: {calib.get('images')} inputs from {calib.get('source')})", "",
                  gate_table(data["accuracy"])]
    engine = data.get("engine")
    if engine:
        lines += ["", "## TensorRT engine", "",
                  f"TensorRT {engine.get('tensorrt_version')} on {engine.get('gpu')}: {engine.get('precision')}, "
                  f"built in {engine.get('build_seconds')} s -> `{engine.get('path')}`"]
    if data.get("triton"):
        lines += ["", f"Triton repository: `{data['triton'].get('repo')}` (backend {data['triton'].get('backend')})"]
    if data["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- **{s['step']}**: {s['reason']}" for s in data["skipped"]]
    return "\n".join(lines) + "\n"


def gate_table(accuracy: dict[str, dict]) -> str:
    """Markdown table of ``report["accuracy"]`` (one row per gated artifact; the demo's summary shows it too)."""
    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| artifact | AP (fp32 -> candidate) | AP drop (pt) | AP50 drop (pt) | AP75 | agreement | int8 MAC share "
             "| images | gate |", "|---|---|---|---|---|---|---|---|---|"]
    for key, gate in accuracy.items():
        verdict = "passed" if gate.get("passed") else "FAILED: " + "; ".join(gate.get("reasons", []))
        lines.append(f"| {key} | {num(gate.get('AP_fp32'), '.4f')} -> {num(gate.get('AP'), '.4f')} | "
                     f"{num(gate.get('ap_drop_points'), '+.2f')} (<= {gate.get('max_ap_drop')}) | "
                     f"{num(gate.get('ap50_drop_points'), '+.2f')} | {num(gate.get('AP75'), '.4f')} | "
                     f"{num(gate.get('agreement'), '.3f')} (>= {gate.get('min_agreement')}) | "
                     f"{num(gate.get('int8_mac_fraction'), '.3f')} | {gate.get('images')} | {verdict} |")
    return "\n".join(lines)
