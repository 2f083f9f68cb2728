"""Soak test of a served model: hours of mixed good and malformed traffic, server memory, injected stub crashes.

``python -m sdconet.loadgen (--repo DIR | --url HOST:PORT) --soak-seconds N ...`` calls :func:`run_soak`. Before the
load starts, each good image is sent once to the idle server and its answer kept as the **reference** (computed
once). ``C`` threads then send requests back to back for ``W + N`` seconds (``W`` = warm-up, not counted). Request
``i`` is malformed when ``floor((i + 1) F) > floor(i F)``, so the mix is fixed and ``F`` exact over any window; the
malformed kinds follow :data:`BAD_KINDS` in turn. Every second the resident memory of the server's whole process
group (tritonserver and its python backend stubs) is sampled, per process also split into anonymous, shared-memory
and file-backed pages (:data:`MEMORY_KINDS`).

Counting (only requests that start after the warm-up):

* ``requests_ok``: good requests answered correctly (checked answers matched the reference; unchecked ones count
  as answered); ``requests_wrong``: checked answers whose detections differ from the reference beyond the
  tolerance (every ``check_every``-th good request is checked); ``requests_lost``: good requests that failed outside
  an injected fault; ``requests_failed_in_fault``: good requests that failed while a fault was active (from a stub
  kill until the first good answer after it, at most ``recovery_target_s``);
* ``bad_rejected`` / ``bad_accepted``: malformed requests answered with an error / with a result;
* ``status_classes``: ``{"good": {...}, "bad": {...}}``, each ``{"200", "400", "5xx", "timeout", "connection",
  "other"}`` counts (HTTP status, or the gRPC code mapped to it);
* ``rss_growth_mb`` = the largest sample in the second half of the measured period minus the sample at the end of
  the warm-up (Triton's L0_memory_growth criterion), over the samples taken while no large oversize array was in
  flight (such an array is memory the server holds only while it receives and refuses it; ``rss_peak_mb`` and
  ``rss_growth_all_samples_mb`` keep the figures over every sample).

The run **fails** (``failures`` non-empty, exit code 1) when a good request is lost or answered wrong, a malformed
one is accepted, or an injected fault did not recover within ``recovery_target_s`` (or not at all).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from sdconet.runtime.triton_client import ENSEMBLE_MODEL, Detections, _protocol_module, parse_result
from sdconet.serve.server import process_group_members, process_label, stub_pids
from sdconet.utils.io import save_figure, write_text_atomically
from sdconet.utils.logging import get_logger

log = get_logger(__name__)

SCENE_MODEL = "sdconet_scene"
# the pixel-limit parameter of each servable entry model's first step, and the model that applies the score threshold
_LIMIT_PARAMETER = {ENSEMBLE_MODEL: ("preprocess", "max_image_pixels"), SCENE_MODEL: (SCENE_MODEL, "max_scene_pixels")}
_THRESHOLD_MODEL = {ENSEMBLE_MODEL: "postprocess", SCENE_MODEL: SCENE_MODEL}
BAD_KINDS = ("garbage_bytes", "truncated_image", "bomb_header", "wrong_dtype", "wrong_shape", "both_inputs",
             "no_inputs", "oversize_array")
# an oversize raw array above this many bytes is not sent. The default pixel limit (8192^2) makes the array one row
# over it 201 MB: it fits (the first soaks capped this at 64 MB and so skipped the kind on the demo repository)
MAX_OVERSIZE_BYTES = 256 << 20
# an oversize array above this size is paced: at most one in flight, at most one per oversize_interval_s (the other
# slots of its turn take the next kind), because receiving and refusing one costs the server its size in memory and
# a copy; smaller ones go in turn like every other kind
PACED_OVERSIZE_BYTES = 16 << 20
STATUS_CLASSES = ("200", "400", "5xx", "timeout", "connection", "other")


# ---------------------------------------------------------------------------------------------------------------------
# Server memory
# ---------------------------------------------------------------------------------------------------------------------
def parse_kb_fields(text: str) -> dict[str, int]:
    """``Name: <n> kB`` lines of ``/proc/<pid>/status`` or ``/proc/<pid>/smaps_rollup`` -> {name: kB}; other lines
    (the rollup's address header, fields that are not in kB) are skipped."""
    fields = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0])
    return fields


def _read_kb_fields(path: str) -> dict[str, int]:
    try:
        return parse_kb_fields(Path(path).read_text())
    except (OSError, UnicodeDecodeError):
        return {}  # the process exited meanwhile


# the kinds of resident memory recorded per process (rss_by_process_kind_mb), from /proc/<pid>/status (the three RSS
# kinds sum to VmRSS) and /proc/<pid>/smaps_rollup (the PSS split):
#   anon:  anonymous pages (heap, malloc arenas, thread stacks, ONNX Runtime / OpenVINO buffers): private memory
#   shmem: shared memory (the python backend's pools in /dev/shm, mapped by the server and the stubs)
#   file:  file-backed pages (the binaries and libraries, the model files)
MEMORY_KINDS = ("anon", "shmem", "file", "pss_anon", "pss_shmem", "pss_file")
_KIND_FIELDS = {"anon": ("status", "RssAnon"), "shmem": ("status", "RssShmem"), "file": ("status", "RssFile"),
                "pss_anon": ("rollup", "Pss_Anon"), "pss_shmem": ("rollup", "Pss_Shmem"),
                "pss_file": ("rollup", "Pss_File")}


def memory_kinds_kb(status: dict[str, int], rollup: dict[str, int]) -> dict[str, int]:
    """:data:`MEMORY_KINDS` -> kB from the parsed ``status`` and ``smaps_rollup`` fields of one process (a field the
    kernel does not have counts 0)."""
    sources = {"status": status, "rollup": rollup}
    return {kind: sources[source].get(name, 0) for kind, (source, name) in _KIND_FIELDS.items()}


@dataclass
class GroupMemory:
    """One sample of the server's process group: RSS and PSS sums (MB), RSS per process label, and per label the
    :data:`MEMORY_KINDS` (MB, summed over the label's processes)."""

    rss_mb: float
    pss_mb: float
    rss_by_process: dict[str, float]
    kinds_by_process: dict[str, dict[str, float]]


def group_memory(pgid: int) -> GroupMemory:
    """The memory of the live processes of group ``pgid``.

    RSS counts a shared page once per process that maps it: the python backend's shared-memory pool (mapped by the
    server and every stub) is counted several times. PSS splits shared pages between their users, so its sum is
    the group's real footprint."""
    per_process: dict[str, float] = {}
    kinds: dict[str, dict[str, float]] = {}
    pss = 0.0
    for pid in process_group_members(pgid):
        label = process_label(pid)
        status, rollup = _read_kb_fields(f"/proc/{pid}/status"), _read_kb_fields(f"/proc/{pid}/smaps_rollup")
        per_process[label] = per_process.get(label, 0.0) + status.get("VmRSS", 0) / 1024
        pss += rollup.get("Pss", 0) / 1024
        into = kinds.setdefault(label, {kind: 0.0 for kind in MEMORY_KINDS})
        for kind, kb in memory_kinds_kb(status, rollup).items():
            into[kind] += kb / 1024
    return GroupMemory(sum(per_process.values()), pss, per_process, kinds)


def group_rss_mb(pgid: int) -> tuple[float, float, dict[str, float]]:
    """(total RSS in MB, total PSS in MB, RSS per process label) of the live processes of group ``pgid``."""
    memory = group_memory(pgid)
    return memory.rss_mb, memory.pss_mb, memory.rss_by_process


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


def make_bad_inputs(module, kind: str, good_png: bytes, max_pixels: Optional[int],
                    max_oversize_bytes: int = MAX_OVERSIZE_BYTES) -> Optional[list]:
    """Request inputs of one malformed ``kind`` (see :data:`BAD_KINDS`); None when the kind cannot be sent (the
    server has no pixel limit, or an array over it would exceed ``max_oversize_bytes``)."""
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
        if _oversize_nbytes(max_pixels) > max_oversize_bytes:
            return None
        return [_tensor(module, "IMAGE", np.zeros((1, max_pixels // 1024 + 1, 1024, 3), np.uint8), "UINT8")]
    raise ValueError(f"unknown malformed request kind {kind!r}; kinds are {BAD_KINDS}")


def is_bad(index: int, bad_fraction: float) -> bool:
    """Request ``index`` of the fixed mix is malformed (exactly ``bad_fraction`` of any long run)."""
    return int((index + 1) * bad_fraction) > int(index * bad_fraction)


# ---------------------------------------------------------------------------------------------------------------------
# Outcomes: status classes and answer checks
# ---------------------------------------------------------------------------------------------------------------------
_GRPC_CLASS = {"INVALID_ARGUMENT": "400", "UNAVAILABLE": "5xx", "INTERNAL": "5xx", "UNKNOWN": "5xx",
               "RESOURCE_EXHAUSTED": "5xx", "DEADLINE_EXCEEDED": "timeout"}


def status_class(err: Optional[BaseException]) -> str:
    """The class of one outcome (see :data:`STATUS_CLASSES`): ``None`` = answered (200); an HTTP status or a gRPC
    code from the server; a timeout or a connection failure on the client side; anything else is "other"."""
    if err is None:
        return "200"
    status = getattr(err, "status", None)
    status = status() if callable(status) else status
    if status:
        status = str(status)
        code = status.rsplit(".", 1)[-1]
        if code in _GRPC_CLASS:
            return _GRPC_CLASS[code]
        if status == "400":
            return "400"
        if status.startswith("5") and status[:3].isdigit():
            return "5xx"
    text = f"{type(err).__name__}: {err}".lower()
    if isinstance(err, (TimeoutError, socket.timeout)) or "timed out" in text or "timeout" in text or \
            "deadline exceeded" in text:
        return "timeout"
    if isinstance(err, ConnectionError) or (isinstance(err, OSError) and err.errno in (
            errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)) or \
            any(word in text for word in ("connection", "disconnect", "broken pipe", "failed to connect")):
        return "connection"
    return "other"


def compare_detections(reference: Detections, answer: Detections, score_threshold: float,
                       score_tol: float = 1e-3, box_tol: float = 0.5) -> Optional[str]:
    """None when ``answer`` has the reference's detections (same label, every box coordinate within ``box_tol``
    pixels, score within ``score_tol``); else what differs.

    A detection one side has and the other lacks is excused only where a rounding difference can decide it: its
    score is within ``score_tol`` of the server's ``score_threshold``, or (both lists equally long, i.e. cut at the
    detection cap) of the lowest score the other side kept."""
    free = list(range(len(answer)))
    unmatched_ref = []
    for i in np.argsort(-reference.scores, kind="stable"):
        best, best_diff = None, None
        for j in free:
            if answer.labels[j] != reference.labels[i]:
                continue
            diff = abs(float(answer.scores[j]) - float(reference.scores[i]))
            if diff <= score_tol and float(np.abs(answer.boxes[j] - reference.boxes[i]).max()) <= box_tol and \
                    (best_diff is None or diff < best_diff):
                best, best_diff = j, diff
        if best is None:
            unmatched_ref.append(int(i))
        else:
            free.remove(best)

    def excused(score: float, other: Detections) -> bool:
        if score < score_threshold + score_tol:
            return True
        return len(other) == len(reference) == len(answer) and len(other) > 0 and \
            score <= float(other.scores.min()) + score_tol

    missing = [i for i in unmatched_ref if not excused(float(reference.scores[i]), answer)]
    extra = [j for j in free if not excused(float(answer.scores[j]), reference)]
    if not missing and not extra:
        return None

    def describe(dets: Detections, k: int) -> str:
        return (f"label {int(dets.labels[k])} score {float(dets.scores[k]):.4f} box "
                f"{[round(float(v), 1) for v in dets.boxes[k]]}")

    parts = [f"{len(answer)} detections, reference {len(reference)}"]
    if missing:
        parts.append(f"{len(missing)} reference detection(s) missing, e.g. {describe(reference, missing[0])}")
    if extra:
        parts.append(f"{len(extra)} unexpected, e.g. {describe(answer, extra[0])}")
    return "; ".join(parts)


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
    recovery_target_s: float = 30.0
    check_every: int = 1
    requests_ok: int = 0
    requests_wrong: int = 0
    requests_checked: int = 0
    reference_detections: list[int] = field(default_factory=list)  # per good image: detections in its reference
    requests_lost: int = 0
    requests_failed_in_fault: int = 0
    bad_rejected: int = 0
    bad_accepted: int = 0
    p50_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    rss_mb: list[list[float]] = field(default_factory=list)  # [[t_s, mb], ...]
    rss_growth_mb: Optional[float] = None
    rss_growth_all_samples_mb: Optional[float] = None  # including samples taken while a large oversize array was in
    rss_peak_mb: Optional[float] = None  # flight (rss_samples_excluded_s: those samples' times)
    rss_samples_excluded_s: list[float] = field(default_factory=list)
    pss_mb: list[list[float]] = field(default_factory=list)  # [[t_s, mb], ...] shared pages split between users
    pss_growth_mb: Optional[float] = None
    rss_by_process_mb: dict[str, list[float]] = field(default_factory=dict)  # label -> [at warm-up end, at the end]
    # label -> kind (MEMORY_KINDS: anon, shmem, file and their PSS) -> [[t_s, mb], ...]: which kind of memory moved
    rss_by_process_kind_mb: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    # label -> kind -> [at warm-up end, at the end]
    rss_kind_by_process_mb: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    bad_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    bad_kinds_skipped: list[str] = field(default_factory=list)
    oversize_bytes: Optional[int] = None  # size of the oversize array sent (None: kind skipped)
    status_classes: dict[str, dict[str, int]] = field(default_factory=dict)  # {"good": {...}, "bad": {...}}
    faults: list[dict] = field(default_factory=list)
    latency_ms: list[list[float]] = field(default_factory=list)  # [[t_s at completion, ms], ...] good requests
    lost_errors: list[str] = field(default_factory=list)  # first few messages of lost requests
    accepted_bad_kinds: list[str] = field(default_factory=list)
    wrong_examples: list[str] = field(default_factory=list)  # first few differences from the reference
    failures: list[str] = field(default_factory=list)  # why the run failed; empty = passed

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _growth(samples: Sequence[Sequence[float]], warmup_s: float, end_s: float,
            exclude: Sequence[float] = ()) -> Optional[float]:
    """max RSS over the second half of [warmup_s, end_s] minus the last sample at or before ``warmup_s``, over the
    samples whose time is not in ``exclude``."""
    excluded = set(exclude)
    samples = [sample for sample in samples if sample[0] not in excluded]
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
             heal: Optional[Callable[[], list[str]]] = None, recovery_target_s: float = 30.0,
             check_every: int = 1, score_tol: float = 1e-3, box_tol: float = 0.5,
             max_oversize_bytes: int = MAX_OVERSIZE_BYTES, oversize_interval_s: float = 30.0) -> SoakReport:
    """Soak ``model`` at ``url`` (see the module docstring).

    ``server_pgid``: the server's process group for the RSS samples (None: no memory figures). ``kill_stubs``:
    ``(model, t_s)`` pairs: SIGKILL that model's python backend stub(s) ``t_s`` seconds after the warm-up ends.
    ``heal``: called once a second, e.g. :meth:`TritonServer.heal` when this process launched the server (with
    ``--url`` the launcher ``python -m sdconet.serve`` runs its own watch). ``recovery_target_s``: a fault must see
    a correct good answer within this many seconds. ``check_every``: every n-th good request is compared with the
    reference (:func:`compare_detections` with ``score_tol``/``box_tol``). ``max_oversize_bytes`` /
    ``oversize_interval_s``: see :data:`MAX_OVERSIZE_BYTES` and :data:`PACED_OVERSIZE_BYTES`.
    """
    if soak_seconds <= 0 or warmup_seconds < 0:
        raise ValueError(f"soak_seconds must be > 0 and warmup_seconds >= 0, got {soak_seconds}, {warmup_seconds}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not 0.0 <= bad_fraction < 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1), got {bad_fraction}")
    if not good_images:
        raise ValueError("need at least one good image")
    if recovery_target_s <= 0 or check_every < 1:
        raise ValueError(f"recovery_target_s must be > 0 and check_every >= 1, got {recovery_target_s}, "
                         f"{check_every}")
    if kill_stubs and server_pgid is None:
        raise ValueError("killing stubs needs the server's process group (start it with --repo, or pass its pid)")
    module = _protocol_module(protocol, asynchronous=False)
    report = SoakReport(model=model, url=url, protocol=protocol, soak_seconds=soak_seconds,
                        warmup_seconds=warmup_seconds, concurrency=concurrency, bad_fraction=bad_fraction,
                        recovery_target_s=recovery_target_s, check_every=check_every)
    client_options = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}

    probe = module.InferenceServerClient(url)
    try:
        limit_model, limit_key = _LIMIT_PARAMETER.get(model, (model, "max_image_pixels"))
        config = probe.get_model_config(limit_model) if protocol == "http" else \
            probe.get_model_config(limit_model, as_json=True)["config"]
        value = config.get("parameters", {}).get(limit_key, {}).get("string_value")
        max_pixels = int(value) if value else None
        threshold_model = _THRESHOLD_MODEL.get(model, model)
        config = probe.get_model_config(threshold_model) if protocol == "http" else \
            probe.get_model_config(threshold_model, as_json=True)["config"]
        score_threshold = float(config.get("parameters", {}).get("score_threshold", {}).get("string_value") or 0.0)
    finally:
        probe.close()
    references = _reference_answers(module, url, protocol, model, good_images, timeout_s, client_options)
    report.reference_detections = [len(ref) for ref in references]
    if not any(report.reference_detections):
        # the check then only catches spurious detections, not changed ones: say so instead of a silent "0 wrong"
        log.warning("soak: no good image has a detection above the server's score threshold %s; the answer check "
                    "compares empty answers (pass --images with objects the model finds)", score_threshold)
    bad_inputs = {}
    for kind in BAD_KINDS:
        inputs = make_bad_inputs(module, kind, good_images[0], max_pixels, max_oversize_bytes)
        if inputs is None:
            report.bad_kinds_skipped.append(kind)
            log.warning("soak: malformed kind '%s' skipped (server pixel limit %s; an array over it would exceed "
                        "%d MB)", kind, max_pixels, max_oversize_bytes >> 20)
        else:
            bad_inputs[kind] = inputs
    if "oversize_array" in bad_inputs:
        report.oversize_bytes = _oversize_nbytes(max_pixels)
    paced = report.oversize_bytes is not None and report.oversize_bytes > PACED_OVERSIZE_BYTES
    kinds = [k for k in BAD_KINDS if k in bad_inputs]
    report.bad_by_kind = {k: {"rejected": 0, "accepted": 0} for k in kinds}

    lock = threading.Lock()
    counter = iter(range(1 << 62))
    started = time.monotonic()
    end = started + warmup_seconds + soak_seconds
    faults: list[Fault] = []
    # measured good requests: (start, end, answered, error, status class, checked, difference from the reference)
    good_outcomes: list[tuple[float, float, bool, str, str, bool, Optional[str]]] = []
    latencies: list[tuple[float, float]] = []
    report.status_classes = {side: {c: 0 for c in STATUS_CLASSES} for side in ("good", "bad")}
    oversize = {"in_flight": 0, "last_start": -1e9, "last_end": -1e9}

    def now() -> float:
        return time.monotonic() - started

    def pick_kind(index: int) -> str:
        position = int(index * bad_fraction) % len(kinds)
        kind = kinds[position]
        if kind == "oversize_array" and paced:
            with lock:
                t = now()
                if oversize["in_flight"] == 0 and t - oversize["last_start"] >= oversize_interval_s:
                    oversize["in_flight"], oversize["last_start"] = 1, t
                    return kind
            kind = kinds[(position + 1) % len(kinds)]  # not now: the next kind takes this slot
        return kind

    def worker() -> None:
        client = module.InferenceServerClient(url, **client_options)
        try:
            while time.monotonic() < end:
                with lock:
                    index = next(counter)
                bad = bool(kinds) and is_bad(index, bad_fraction)
                kind = pick_kind(index) if bad else None
                image_index = index % len(good_images)
                if bad:
                    inputs = bad_inputs[kind]
                else:
                    inputs = _good_inputs(module, good_images[image_index])
                check = not bad and index % check_every == 0
                t0 = now()
                ok, error, failure, difference = True, "", None, None
                try:
                    if protocol == "http":
                        result = client.infer(model, inputs)
                    else:
                        result = client.infer(model, inputs, client_timeout=timeout_s)
                except Exception as err:  # every outcome is counted below
                    ok, error, failure = False, f"{type(err).__name__}: {err}", err
                t1 = now()
                if ok and check:
                    try:
                        difference = compare_detections(references[image_index], parse_result(result)[0],
                                                        score_threshold, score_tol, box_tol)
                    except Exception as err:  # an answer without the expected outputs is a wrong answer
                        difference = f"unreadable answer ({type(err).__name__}: {err})"
                with lock:
                    if kind == "oversize_array" and paced:
                        oversize["in_flight"], oversize["last_end"] = 0, t1
                    if not bad and ok and difference is None:
                        for fault in faults:
                            if fault.recovered_at_s is None and t0 >= fault.t_s:
                                fault.recovered_at_s = t1
                    if t0 >= warmup_seconds:
                        report.status_classes["bad" if bad else "good"][status_class(failure)] += 1
                        if bad:
                            report.bad_by_kind[kind]["accepted" if ok else "rejected"] += 1
                        else:
                            good_outcomes.append((t0, t1, ok, error, status_class(failure), check, difference))
                            if ok:
                                latencies.append((t1, (t1 - t0) * 1e3))
                if on_request is not None:
                    on_request()
        finally:
            client.close()

    def sampler() -> None:
        pending = sorted(kill_stubs, key=lambda item: item[1])
        warm_split: Optional[dict[str, float]] = None
        warm_kinds: dict[str, dict[str, float]] = {}
        while time.monotonic() < end:
            t = now()
            if server_pgid is not None:
                memory = group_memory(server_pgid)
                total, pss, per_process = memory.rss_mb, memory.pss_mb, memory.rss_by_process
                report.rss_mb.append([round(t, 2), round(total, 1)])
                report.pss_mb.append([round(t, 2), round(pss, 1)])
                with lock:  # a large oversize array in flight, or answered < 2 s ago (the server frees it after)
                    if paced and (oversize["in_flight"] or now() - oversize["last_end"] < 2.0):
                        report.rss_samples_excluded_s.append(round(t, 2))
                for label, kinds in memory.kinds_by_process.items():
                    series = report.rss_by_process_kind_mb.setdefault(label, {kind: [] for kind in MEMORY_KINDS})
                    for kind, mb in kinds.items():
                        series[kind].append([round(t, 2), round(mb, 1)])
                if warm_split is None and t >= warmup_seconds:
                    warm_split, warm_kinds = per_process, memory.kinds_by_process
                report.rss_by_process_mb = {label: [round((warm_split or {}).get(label, 0.0), 1), round(mb, 1)]
                                            for label, mb in per_process.items()}
                report.rss_kind_by_process_mb = {
                    label: {kind: [round(warm_kinds.get(label, {}).get(kind, 0.0), 1), round(mb, 1)]
                            for kind, mb in kinds.items()} for label, kinds in memory.kinds_by_process.items()}
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

    def window_end(fault: Fault) -> float:
        # a fault excuses failures until it recovered, and never beyond the recovery target: later failures are lost
        target_end = fault.t_s + recovery_target_s
        return target_end if fault.recovered_at_s is None else min(fault.recovered_at_s, target_end)

    def in_fault(t0: float, t1: float) -> bool:
        return any(t1 >= f.t_s and t0 <= window_end(f) for f in faults)

    for t0, t1, ok, error, _, checked, difference in good_outcomes:
        report.requests_checked += int(ok and checked)
        if ok and difference is not None:
            report.requests_wrong += 1
            if len(report.wrong_examples) < 5:
                report.wrong_examples.append(f"t={t0:.1f} s: {difference}")
        elif ok:
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
    end_s = warmup_seconds + soak_seconds
    report.rss_growth_mb = _growth(report.rss_mb, warmup_seconds, end_s, report.rss_samples_excluded_s)
    report.pss_growth_mb = _growth(report.pss_mb, warmup_seconds, end_s, report.rss_samples_excluded_s)
    report.rss_growth_all_samples_mb = _growth(report.rss_mb, warmup_seconds, end_s)
    report.rss_peak_mb = max((mb for _, mb in report.rss_mb), default=None)
    report.faults = [{"model": f.model, "pids": f.pids, "t_s": round(f.t_s, 2),
                      "recovered_at_s": None if f.recovered_at_s is None else round(f.recovered_at_s, 2),
                      "recovery_s": None if f.recovery_s is None else round(f.recovery_s, 2)} for f in faults]
    report.failures = _failures(report, faults, end_s)
    for failure in report.failures:
        log.error("soak: %s", failure)
    return report


def _failures(report: SoakReport, faults: Sequence[Fault], end_s: float) -> list[str]:
    """Why the run fails (see the module docstring); empty when it passes."""
    failures = []
    if report.requests_lost:
        failures.append(f"{report.requests_lost} good request(s) lost outside a fault window, first: "
                        f"{report.lost_errors[:1]}")
    if report.requests_wrong:
        failures.append(f"{report.requests_wrong} of {report.requests_checked} checked answers differ from the "
                        f"reference, first: {report.wrong_examples[:1]}")
    if report.bad_accepted:
        failures.append(f"{report.bad_accepted} malformed request(s) accepted ({report.accepted_bad_kinds})")
    for fault in faults:
        if not fault.pids:
            failures.append(f"no stub of model '{fault.model}' was found to kill at t={fault.t_s:.1f} s")
        elif fault.recovery_s is None:
            failures.append(f"model '{fault.model}' never served a correct answer after its stub was killed at "
                            f"t={fault.t_s:.1f} s ({end_s - fault.t_s:.0f} s to the end of the soak; target "
                            f"{report.recovery_target_s:g} s)")
        elif fault.recovery_s > report.recovery_target_s:
            failures.append(f"model '{fault.model}' recovered {fault.recovery_s:.1f} s after its stub was killed at "
                            f"t={fault.t_s:.1f} s, over the target of {report.recovery_target_s:g} s")
    return failures


def _reference_answers(module, url: str, protocol: str, model: str, images: Sequence[bytes], timeout_s: float,
                       client_options: dict) -> list[Detections]:
    """Each good image's answer from the idle server, once, before the load: what every checked answer must match."""
    client = module.InferenceServerClient(url, **client_options)
    references = []
    try:
        for number, image in enumerate(images):
            for attempt in range(5):  # a server that has just started may not answer the very first request
                try:
                    kwargs = {} if protocol == "http" else {"client_timeout": timeout_s}
                    references.append(parse_result(client.infer(model, _good_inputs(module, image), **kwargs))[0])
                    break
                except Exception as err:
                    if attempt == 4:
                        raise RuntimeError(f"soak: the reference answer for good image {number} failed: "
                                           f"{type(err).__name__}: {err}") from err
                    time.sleep(1.0)
    finally:
        client.close()
    return references


def _oversize_nbytes(max_pixels: int) -> int:
    """Bytes of the oversize array: 1024 pixels wide, one row more than ``max_pixels`` allows."""
    return (max_pixels // 1024 + 1) * 1024 * 3


def _good_inputs(module, image: bytes) -> list:
    return [_tensor(module, "IMAGE_BYTES", np.array([[image]], dtype=object), "BYTES")]


def write_report(report: SoakReport, path: Path, command: Optional[Sequence[str]] = None) -> Path:
    """``path`` (JSON, with the ``provenance`` object of :mod:`sdconet.utils.provenance`; ``command`` defaults to
    this process's command line) and ``path.with_suffix('.png')``: RSS and good-request latency over time. Returns
    the PNG."""
    from sdconet.utils.provenance import provenance

    write_text_atomically(path, json.dumps({**report.to_dict(), "provenance": provenance(command)}, indent=1) + "\n")
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
    server_kinds = report.rss_by_process_kind_mb.get("tritonserver", {})
    for kind, color in (("anon", "tab:purple"), ("shmem", "tab:brown")):
        if server_kinds.get(kind):
            t, mb = zip(*server_kinds[kind])
            top.plot(t, mb, color=color, linestyle=":", label=f"tritonserver {kind}")
    if report.pss_mb or server_kinds:
        top.legend(loc="lower right", fontsize=8)
    top.set_ylabel("server process group (MB)")
    top.set_title(f"{report.model}: {report.concurrency} clients, {report.bad_fraction:.0%} malformed; growth "
                  f"{report.rss_growth_mb if report.rss_growth_mb is None else round(report.rss_growth_mb, 1)} MB, "
                  f"lost {report.requests_lost}, wrong {report.requests_wrong}, bad accepted {report.bad_accepted}")
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
