"""Soak test of a served model: hours of mixed good and malformed traffic, server memory, injected stub crashes.

``python -m sdconet.loadgen (--repo DIR | --url HOST:PORT) --soak-seconds N ...`` calls :func:`run_soak`. ``C``
threads send requests back to back for ``W + N`` seconds (``W`` = warm-up, not counted). Request ``i`` is malformed
when ``floor((i + 1) F) > floor(i F)``, so the mix is fixed and ``F`` exact over any window; the malformed kinds
follow :data:`BAD_KINDS` in turn. Every second the resident memory of the server's whole process group
(tritonserver and its python backend stubs) is sampled.

Counting (only requests that start after the warm-up):

* ``requests_ok``: good requests answered; ``requests_lost``: good requests that failed outside an injected fault;
  ``requests_failed_in_fault``: good requests that failed while a fault was active (from a stub kill until the first
  good answer after it);
* ``bad_rejected`` / ``bad_accepted``: malformed requests answered with an error / with a result;
* ``rss_growth_mb`` = the largest sample in the second half of the measured period minus the sample at the end of
  the warm-up (Triton's L0_memory_growth criterion).
"""
from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from sdconet.runtime.triton_client import ENSEMBLE_MODEL, _protocol_module
from sdconet.serve.server import process_group_members, process_label, stub_pids
from sdconet.utils.io import save_figure, write_text_atomically
from sdconet.utils.logging import get_logger

log = get_logger(__name__)

SCENE_MODEL = "sdconet_scene"
# the pixel-limit parameter of each servable entry model's first step
_LIMIT_PARAMETER = {ENSEMBLE_MODEL: ("preprocess", "max_image_pixels"), SCENE_MODEL: (SCENE_MODEL, "max_scene_pixels")}
BAD_KINDS = ("garbage_bytes", "truncated_image", "bomb_header", "wrong_dtype", "wrong_shape", "both_inputs",
             "no_inputs", "oversize_array")
# an oversize raw array above this many bytes is not sent (the server's limit is then too large to probe cheaply)
MAX_OVERSIZE_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------------------------------
# Server memory
# ---------------------------------------------------------------------------------------------------------------------
def _status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def group_rss_mb(pgid: int) -> tuple[float, float, dict[str, float]]:
    """(total RSS in MB, total PSS in MB, RSS per process label) of the live processes of group ``pgid``.

    RSS counts a shared page once per process that maps it: the python backend's shared-memory pool (mapped by the
    server and every stub) is counted several times. PSS splits shared pages between their users, so its sum is
    the group's real footprint."""
    per_process: dict[str, float] = {}
    pss = 0.0
    for pid in process_group_members(pgid):
        label = process_label(pid)
        per_process[label] = per_process.get(label, 0.0) + _status_kb(pid, "VmRSS") / 1024
        pss += _pss_kb(pid) / 1024
    return sum(per_process.values()), pss, per_process


# ---------------------------------------------------------------------------------------------------------------------
# Malformed requests
# ---------------------------------------------------------------------------------------------------------------------
def bomb_png_header(width: int = 60000, height: int = 60000) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, followed by a few bytes of (empty) data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _tensor(module, name: str, array: np.ndarray, datatype: str):
    item = module.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def make_bad_inputs(module, kind: str, good_png: bytes, max_pixels: Optional[int]) -> Optional[list]:
    """Request inputs of one malformed ``kind`` (see :data:`BAD_KINDS`); None when the kind cannot be sent cheaply."""
    rng = np.random.default_rng(len(kind))
    as_bytes = lambda data: _tensor(module, "IMAGE_BYTES", np.array([[data]], dtype=object), "BYTES")  # noqa: E731
    if kind == "garbage_bytes":
        return [as_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(4096))]
    if kind == "truncated_image":
        return [as_bytes(good_png[: len(good_png) // 2])]
    if kind == "bomb_header":
        return [as_bytes(bomb_png_header())]
    if kind == "wrong_dtype":
        return [_tensor(module, "IMAGE", np.zeros((1, 16, 16, 3), np.float32), "FP32")]
    if kind == "wrong_shape":
        return [_tensor(module, "IMAGE", np.zeros((1, 16, 16, 4), np.uint8), "UINT8")]
    if kind == "both_inputs":
        return [as_bytes(good_png), _tensor(module, "IMAGE", np.zeros((1, 16, 16, 3), np.uint8), "UINT8")]
    if kind == "no_inputs":
        return []
    if kind == "oversize_array":
        if max_pixels is None:
            return None
        width = 1024
        height = max_pixels // width + 1
        if height * width * 3 > MAX_OVERSIZE_BYTES:
            return None
        return [_tensor(module, "IMAGE", np.zeros((1, height, width, 3), np.uint8), "UINT8")]
    raise ValueError(f"unknown malformed request kind {kind!r}; kinds are {BAD_KINDS}")


def is_bad(index: int, bad_fraction: float) -> bool:
    """Request ``index`` of the fixed mix is malformed (exactly ``bad_fraction`` of any long run)."""
    return int((index + 1) * bad_fraction) > int(index * bad_fraction)


# ---------------------------------------------------------------------------------------------------------------------
# The soak
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Fault:
    """A stub kill: which model, when (s since the start), and when the first good answer came after it."""

    model: str
    pids: list[int]
    t_s: float
    recovered_at_s: Optional[float] = None

    @property
    def recovery_s(self) -> Optional[float]:
        return None if self.recovered_at_s is None else self.recovered_at_s - self.t_s


@dataclass
class SoakReport:
    model: str
    url: str
    protocol: str
    soak_seconds: float
    warmup_seconds: float
    concurrency: int
    bad_fraction: float
    requests_ok: int = 0
    requests_lost: int = 0
    requests_failed_in_fault: int = 0
    bad_rejected: int = 0
    bad_accepted: int = 0
    p50_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    rss_mb: list[list[float]] = field(default_factory=list)  # [[t_s, mb], ...]
    rss_growth_mb: Optional[float] = None
    pss_mb: list[list[float]] = field(default_factory=list)  # [[t_s, mb], ...] shared pages split between users
    pss_growth_mb: Optional[float] = None
    rss_by_process_mb: dict[str, list[float]] = field(default_factory=dict)  # label -> [at warm-up end, at the end]
    bad_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    bad_kinds_skipped: list[str] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    latency_ms: list[list[float]] = field(default_factory=list)  # [[t_s at completion, ms], ...] good requests
    lost_errors: list[str] = field(default_factory=list)  # first few messages of lost requests
    accepted_bad_kinds: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _growth(samples: Sequence[Sequence[float]], warmup_s: float, end_s: float) -> Optional[float]:
    """max RSS over the second half of [warmup_s, end_s] minus the last sample at or before ``warmup_s``."""
    if not samples:
        return None
    before = [mb for t, mb in samples if t <= warmup_s]
    base = before[-1] if before else samples[0][1]
    half = warmup_s + (end_s - warmup_s) / 2
    late = [mb for t, mb in samples if t >= half]
    return (max(late) - base) if late else None


def run_soak(url: str, *, protocol: str = "http", model: str = ENSEMBLE_MODEL, soak_seconds: float,
             concurrency: int, bad_fraction: float, warmup_seconds: float = 20.0, good_images: Sequence[bytes],
             server_pgid: Optional[int] = None, kill_stubs: Sequence[tuple[str, float]] = (),
             timeout_s: float = 60.0, on_request: Optional[Callable[[], None]] = None,
             heal: Optional[Callable[[], list[str]]] = None) -> SoakReport:
    """Soak ``model`` at ``url`` (see the module docstring).

    ``server_pgid``: the server's process group for the RSS samples (None: no memory figures). ``kill_stubs``:
    ``(model, t_s)`` pairs: SIGKILL that model's python backend stub(s) ``t_s`` seconds after the warm-up ends.
    ``heal``: called once a second, e.g. :meth:`TritonServer.heal` when this process launched the server (with
    ``--url`` the launcher ``python -m sdconet.serve`` runs its own watch).
    """
    if soak_seconds <= 0 or warmup_seconds < 0:
        raise ValueError(f"soak_seconds must be > 0 and warmup_seconds >= 0, got {soak_seconds}, {warmup_seconds}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not 0.0 <= bad_fraction < 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1), got {bad_fraction}")
    if not good_images:
        raise ValueError("need at least one good image")
    if kill_stubs and server_pgid is None:
        raise ValueError("killing stubs needs the server's process group (start it with --repo, or pass its pid)")
    module = _protocol_module(protocol, asynchronous=False)
    report = SoakReport(model=model, url=url, protocol=protocol, soak_seconds=soak_seconds,
                        warmup_seconds=warmup_seconds, concurrency=concurrency, bad_fraction=bad_fraction)

    probe = module.InferenceServerClient(url)
    try:
        limit_model, limit_key = _LIMIT_PARAMETER.get(model, (model, "max_image_pixels"))
        config = probe.get_model_config(limit_model) if protocol == "http" else \
            probe.get_model_config(limit_model, as_json=True)["config"]
        value = config.get("parameters", {}).get(limit_key, {}).get("string_value")
        max_pixels = int(value) if value else None
    finally:
        probe.close()
    bad_inputs = {}
    for kind in BAD_KINDS:
        inputs = make_bad_inputs(module, kind, good_images[0], max_pixels)
        if inputs is None:
            report.bad_kinds_skipped.append(kind)
            log.warning("soak: malformed kind '%s' skipped (server pixel limit %s needs more than %d MB)", kind,
                        max_pixels, MAX_OVERSIZE_BYTES >> 20)
        else:
            bad_inputs[kind] = inputs
    kinds = [k for k in BAD_KINDS if k in bad_inputs]
    report.bad_by_kind = {k: {"rejected": 0, "accepted": 0} for k in kinds}

    lock = threading.Lock()
    counter = iter(range(1 << 62))
    started = time.monotonic()
    end = started + warmup_seconds + soak_seconds
    faults: list[Fault] = []
    good_outcomes: list[tuple[float, float, bool, str]] = []  # (start, end, ok, error) measured good requests
    latencies: list[tuple[float, float]] = []

    def now() -> float:
        return time.monotonic() - started

    def worker() -> None:
        client = module.InferenceServerClient(url, **({"network_timeout": timeout_s, "connection_timeout": timeout_s}
                                                      if protocol == "http" else {}))
        try:
            while time.monotonic() < end:
                with lock:
                    index = next(counter)
                bad = bool(kinds) and is_bad(index, bad_fraction)
                kind = kinds[int(index * bad_fraction) % len(kinds)] if bad else None
                if bad:
                    inputs = bad_inputs[kind]
                else:
                    inputs = _good_inputs(module, good_images[index % len(good_images)])
                t0 = now()
                ok, error = True, ""
                try:
                    if protocol == "http":
                        client.infer(model, inputs)
                    else:
                        client.infer(model, inputs, client_timeout=timeout_s)
                except Exception as err:  # every outcome is counted below
                    ok, error = False, f"{type(err).__name__}: {err}"
                t1 = now()
                with lock:
                    if not bad and ok:
                        for fault in faults:
                            if fault.recovered_at_s is None and t0 >= fault.t_s:
                                fault.recovered_at_s = t1
                    if t0 >= warmup_seconds:
                        if bad:
                            report.bad_by_kind[kind]["accepted" if ok else "rejected"] += 1
                        else:
                            good_outcomes.append((t0, t1, ok, error))
                            if ok:
                                latencies.append((t1, (t1 - t0) * 1e3))
                if on_request is not None:
                    on_request()
        finally:
            client.close()

    def sampler() -> None:
        pending = sorted(kill_stubs, key=lambda item: item[1])
        warm_split: Optional[dict[str, float]] = None
        while time.monotonic() < end:
            t = now()
            if server_pgid is not None:
                total, pss, per_process = group_rss_mb(server_pgid)
                report.rss_mb.append([round(t, 2), round(total, 1)])
                report.pss_mb.append([round(t, 2), round(pss, 1)])
                if warm_split is None and t >= warmup_seconds:
                    warm_split = per_process
                report.rss_by_process_mb = {label: [round((warm_split or {}).get(label, 0.0), 1), round(mb, 1)]
                                            for label, mb in per_process.items()}
            while pending and t >= warmup_seconds + pending[0][1]:
                target, _ = pending.pop(0)
                pids = stub_pids(server_pgid, target)
                if not pids:
                    log.error("soak: no python backend stub of model '%s' found to kill", target)
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                with lock:
                    faults.append(Fault(target, pids, now()))
                log.warning("soak: killed the stub(s) %s of model '%s' at t=%.1f s", pids, target, now())
            time.sleep(max(0.0, 1.0 - (now() - t)))

    def healer() -> None:
        # its own thread: a reload takes seconds, and the memory samples must go on meanwhile
        while time.monotonic() < end:
            try:
                heal()
            except Exception as err:  # logged; the soak goes on and counts what fails
                log.error("soak: the server could not heal itself: %s", err)
            time.sleep(1.0)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    if heal is not None:
        threads.append(threading.Thread(target=healer, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    def in_fault(t0: float, t1: float) -> bool:
        # a request overlapping [kill, first good answer after it] met the fault
        return any(t1 >= f.t_s and (f.recovered_at_s is None or t0 <= f.recovered_at_s) for f in faults)

    for t0, t1, ok, error in good_outcomes:
        if ok:
            report.requests_ok += 1
        elif in_fault(t0, t1):
            report.requests_failed_in_fault += 1
        else:
            report.requests_lost += 1
            if len(report.lost_errors) < 5:
                report.lost_errors.append(error)
    report.bad_rejected = sum(v["rejected"] for v in report.bad_by_kind.values())
    report.bad_accepted = sum(v["accepted"] for v in report.bad_by_kind.values())
    report.accepted_bad_kinds = [k for k, v in report.bad_by_kind.items() if v["accepted"]]
    if latencies:
        values = np.array([ms for _, ms in latencies])
        report.p50_ms, report.p99_ms = float(np.percentile(values, 50)), float(np.percentile(values, 99))
    report.latency_ms = [[round(t, 3), round(ms, 2)] for t, ms in latencies]
    report.rss_growth_mb = _growth(report.rss_mb, warmup_seconds, warmup_seconds + soak_seconds)
    report.pss_growth_mb = _growth(report.pss_mb, warmup_seconds, warmup_seconds + soak_seconds)
    report.faults = [{"model": f.model, "pids": f.pids, "t_s": round(f.t_s, 2),
                      "recovered_at_s": None if f.recovered_at_s is None else round(f.recovered_at_s, 2),
                      "recovery_s": None if f.recovery_s is None else round(f.recovery_s, 2)} for f in faults]
    return report


def _good_inputs(module, image: bytes) -> list:
    return [_tensor(module, "IMAGE_BYTES", np.array([[image]], dtype=object), "BYTES")]


def write_report(report: SoakReport, path: Path) -> Path:
    """``path`` (JSON) and ``path.with_suffix('.png')``: RSS and good-request latency over time. Returns the PNG."""
    write_text_atomically(path, json.dumps(report.to_dict(), indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if report.rss_mb:
        t, mb = zip(*report.rss_mb)
        top.plot(t, mb, color="tab:blue", label="RSS (sum)")
    if report.pss_mb:
        t, mb = zip(*report.pss_mb)
        top.plot(t, mb, color="tab:green", label="PSS (sum)")
        top.legend(loc="lower right")
    top.set_ylabel("server process group (MB)")
    top.set_title(f"{report.model}: {report.concurrency} clients, {report.bad_fraction:.0%} malformed; growth "
                  f"{report.rss_growth_mb if report.rss_growth_mb is None else round(report.rss_growth_mb, 1)} MB, "
                  f"lost {report.requests_lost}, bad accepted {report.bad_accepted}")
    if report.latency_ms:
        t, ms = zip(*report.latency_ms)
        bottom.plot(t, ms, ".", markersize=2, color="tab:orange")
    bottom.set_ylabel("good request latency (ms)")
    bottom.set_xlabel("time since start (s)")
    for axis in (top, bottom):
        axis.axvline(report.warmup_seconds, color="gray", linestyle="--", linewidth=1)
        for fault in report.faults:
            axis.axvline(fault["t_s"], color="red", linewidth=1)
    figure.tight_layout()
    return save_figure(figure, path.with_suffix(".png"), dpi=100)
