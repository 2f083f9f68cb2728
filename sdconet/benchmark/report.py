"""Benchmark records: JSON files, markdown tables, side-by-side comparison and a PNG chart.

A results file is ``{"rows": [record, ...], "provenance": {...}}`` (:func:`sdconet.utils.provenance.provenance`);
files written before results carried provenance are a bare list of records, and every reader here takes both."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from sdconet.utils.io import save_figure
from sdconet.utils.provenance import provenance as _provenance

REQUIRED_KEYS = ("backend", "precision", "batch", "imgsz", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput",
                 "peak_mem_mb", "device", "status")


def config_label(record: dict[str, Any]) -> str:
    """``backend/precision/bN`` (+ variant such as ``compile`` when present)."""
    variant = f"+{record['variant']}" if record.get("variant") else ""
    return f"{record['backend']}{variant}/{record['precision']}/b{record['batch']}"


def _labels(runs: dict[str, list[dict[str, Any]]], ok_only: bool = False) -> list[str]:
    """Every configuration label in ``runs``, in first-seen order (only measured ones when ``ok_only``)."""
    labels: list[str] = []
    for records in runs.values():
        for r in records:
            if (r["status"] == "ok" or not ok_only) and config_label(r) not in labels:
                labels.append(config_label(r))
    return labels


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(records: Iterable[dict[str, Any]]) -> str:
    header = "| backend | precision | batch | imgsz | p50 ms | p90 ms | p99 ms | mean ms | img/s | peak MB | status |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        backend = r["backend"] + (f"+{r['variant']}" if r.get("variant") else "")
        lines.append(f"| {backend} | {r['precision']} | {r['batch']} | {r['imgsz']} | {_fmt(r.get('p50_ms'))} | "
                     f"{_fmt(r.get('p90_ms'))} | {_fmt(r.get('p99_ms'))} | {_fmt(r.get('mean_ms'))} | "
                     f"{_fmt(r.get('throughput'), 1)} | {_fmt(r.get('peak_mem_mb'), 0)} | {r['status']} |")
    return "\n".join(lines)


def rows_of(data: Any, source: str | Path = "benchmark JSON") -> list[dict[str, Any]]:
    """The records of a parsed results document: the ``rows`` of ``{"rows", "provenance"}`` or an old bare list."""
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        return data["rows"]
    if isinstance(data, list):
        return data
    raise ValueError(f"{source}: expected {{\"rows\": [...], \"provenance\": {{...}}}} or a list of records")


def load_results(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Read a benchmark JSON, checking the required keys: (records, provenance; None for an old bare-list file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable benchmark JSON ({err})") from err
    records = rows_of(data, path)
    for i, record in enumerate(records):
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {', '.join(missing)}")
    return records, (data.get("provenance") if isinstance(data, dict) else None)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a benchmark JSON (either format), checking the required keys."""
    return load_results(path)[0]


def write_records(records: list[dict[str, Any]], path: str | Path,
                  provenance: dict[str, Any] | None = None) -> None:
    """Write ``{"rows": records, "provenance": ...}``; the provenance defaults to this process's (taken now, so
    it names the kernel the runs loaded)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    document = {"rows": records, "provenance": provenance if provenance is not None else _provenance()}
    Path(path).write_text(json.dumps(document, indent=2) + "\n")


def compare_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """p50 latency of each configuration (rows) in each run (columns); '-' where a run lacks it or skipped it."""
    labels = _labels(runs)
    names = list(runs)
    lines = ["| configuration | " + " | ".join(f"{n} p50 ms" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label in labels:
        cells = []
        for name in names:
            match = [r for r in runs[name] if config_label(r) == label]
            cells.append(_fmt(match[0]["p50_ms"]) if match and match[0]["status"] == "ok" else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_chart(runs: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Grouped horizontal bars of p50 latency per configuration, one colour per run; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels(runs, ok_only=True)
    height = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.45 * max(1, len(labels)) * max(1, len(runs)) ** 0.5))
    for k, (name, records) in enumerate(runs.items()):
        values = []
        for label in labels:
            match = [r for r in records if config_label(r) == label and r["status"] == "ok"]
            values.append(match[0]["p50_ms"] if match else 0.0)
        ax.barh([i + k * height for i in range(len(labels))], values, height=height, label=name)
    ax.set_yticks([i + height * (len(runs) - 1) / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("p50 latency (ms, lower is better)")
    ax.legend(loc="best", fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
