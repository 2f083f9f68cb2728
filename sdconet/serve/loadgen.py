"""Load generator for the served ``sdconet`` ensemble: a concurrency sweep with latency percentiles, throughput,
errors and Triton's own split of each model's time into queueing and compute (``python -m sdconet.loadgen``).

Per concurrency level: ``warmup`` untimed requests, a statistics snapshot, ``requests`` timed requests with
``concurrency`` of them in flight (asyncio client), a second snapshot. The snapshot difference gives, per model of the
ensemble, the requests served, the executions (fewer executions than inferences = dynamic batching at work), the
average batch, and the average queue and compute (input + infer + output) time per request.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from sdconet.runtime.triton_client import (ENSEMBLE_MODEL, PROTOCOLS, AsyncSDCoNetClient, ImageInput, composing_models,
                                  default_url)
from sdconet.utils.logging import get_logger, setup_logging

log = get_logger(__name__)


@dataclass
class ModelTiming:
    """One model's share of a level, from the difference of two statistics snapshots."""

    model: str
    requests: int  # successful requests (an inference_stats.success count)
    inferences: int  # images inferred (sum of batch sizes)
    executions: int  # model executions; < inferences when requests were batched
    avg_batch: float
    queue_ms: float  # mean time a request waited in the scheduler queue
    compute_ms: float  # mean compute (input + infer + output) per request


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    throughput_rps: float  # successful requests per second
    latency_ms: dict[str, float]  # p50, p90, p99, mean, max of successful requests
    models: list[ModelTiming] = field(default_factory=list)
    first_error: Optional[str] = None


def synthetic_image(size: int = 512, seed: int = 0) -> bytes:
    """A PNG with a textured background and a few bright rectangles (a stand-in scene for load tests)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 90 + 40 * np.sin(6 * np.pi * xx) * np.cos(4 * np.pi * yy)
    image = np.clip(base[..., None] + rng.normal(0, 12, (size, size, 3)), 0, 255)
    for _ in range(12):
        x, y = rng.integers(0, size - 24, 2)
        w, h = rng.integers(6, 24, 2)
        image[y:y + h, x:x + w] = rng.integers(150, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def timing_delta(before: dict[str, dict], after: dict[str, dict], model: str) -> ModelTiming:
    """Per-request averages of ``model`` between two :func:`normalize_statistics` snapshots."""

    def stat(snapshot: dict, *keys: str) -> int:
        node = snapshot.get(model, {})
        for key in keys:
            node = node.get(key, {})
        return int(node) if not isinstance(node, dict) else 0

    def delta(*keys: str) -> int:
        return stat(after, *keys) - stat(before, *keys)

    requests = delta("inference_stats", "success", "count")
    inferences, executions = delta("inference_count"), delta("execution_count")
    compute_ns = sum(delta("inference_stats", part, "ns") for part in ("compute_input", "compute_infer",
                                                                        "compute_output"))
    per_request = max(requests, 1)
    return ModelTiming(model=model, requests=requests, inferences=inferences, executions=executions,
                       avg_batch=inferences / executions if executions else 0.0,
                       queue_ms=delta("inference_stats", "queue", "ns") / per_request / 1e6,
                       compute_ms=compute_ns / per_request / 1e6)


async def _run_level(client: AsyncSDCoNetClient, images: Sequence[ImageInput], concurrency: int, requests: int,
                     on_request: Optional[Callable[[], None]]) -> tuple[list[float], list[str], float]:
    """``requests`` requests with ``concurrency`` workers -> (latencies in s, error messages, wall time in s)."""
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                await client.detect(images[index % len(images)])
                latencies.append(time.perf_counter() - started)
            except Exception as err:  # counted, the sweep goes on
                errors.append(str(err))
            if on_request is not None:
                on_request()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


async def sweep_async(url: Optional[str], protocol: str, images: Sequence[ImageInput],
                      concurrency_levels: Sequence[int], requests: int, warmup: int = 4,
                      model_name: str = ENSEMBLE_MODEL, timeout_s: float = 60.0,
                      on_request: Optional[Callable[[], None]] = None) -> list[LevelResult]:
    if not images:
        raise ValueError("need at least one image")
    if requests < 1 or any(c < 1 for c in concurrency_levels):
        raise ValueError(f"requests and concurrency levels must be >= 1, got {requests}, {list(concurrency_levels)}")
    results = []
    async with AsyncSDCoNetClient(url, protocol, model_name, timeout_s) as client:
        models = [model_name] + composing_models(await client.model_config())
        for concurrency in concurrency_levels:
            await _run_level(client, images, concurrency, warmup, None)
            before = await client.statistics()
            latencies, errors, wall_s = await _run_level(client, images, concurrency, requests, on_request)
            after = await client.statistics()
            latency_ms = np.array(latencies) * 1e3
            summary = ({"p50": float(np.percentile(latency_ms, 50)), "p90": float(np.percentile(latency_ms, 90)),
                        "p99": float(np.percentile(latency_ms, 99)), "mean": float(latency_ms.mean()),
                        "max": float(latency_ms.max())} if len(latencies) else {})
            results.append(LevelResult(concurrency=concurrency, requests=requests, errors=len(errors),
                                       wall_s=wall_s, throughput_rps=len(latencies) / wall_s, latency_ms=summary,
                                       models=[timing_delta(before, after, m) for m in models],
                                       first_error=errors[0] if errors else None))
    return results


def sweep(url: Optional[str], protocol: str, images: Sequence[ImageInput], concurrency_levels: Sequence[int],
          requests: int, warmup: int = 4, model_name: str = ENSEMBLE_MODEL, timeout_s: float = 60.0,
          on_request: Optional[Callable[[], None]] = None) -> list[LevelResult]:
    """Blocking :func:`sweep_async`: one :class:`LevelResult` per concurrency level."""
    return asyncio.run(sweep_async(url, protocol, images, concurrency_levels, requests, warmup, model_name,
                                   timeout_s, on_request))


def format_table(results: Sequence[LevelResult]) -> str:
    """Human tables: latency/throughput per level, then queue vs compute per model and level."""
    lines = [f"{'conc':>4} {'reqs':>5} {'errors':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>8}"]
    for r in results:
        lat = r.latency_ms
        lines.append(f"{r.concurrency:>4} {r.requests:>5} {r.errors:>6} {lat.get('p50', float('nan')):>8.2f} "
                     f"{lat.get('p90', float('nan')):>8.2f} {lat.get('p99', float('nan')):>8.2f} "
                     f"{r.throughput_rps:>8.1f}")
    lines.append("")
    lines.append(f"{'conc':>4} {'model':<16} {'reqs':>5} {'execs':>6} {'batch':>6} {'queue ms':>9} "
                 f"{'compute ms':>10}")
    for r in results:
        for m in r.models:
            lines.append(f"{r.concurrency:>4} {m.model:<16} {m.requests:>5} {m.executions:>6} {m.avg_batch:>6.2f} "
                         f"{m.queue_ms:>9.3f} {m.compute_ms:>10.3f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdconet.loadgen",
        description="Concurrency sweep against a running SDCoNet Triton server: p50/p90/p99 latency, throughput, "
                    "errors, and Triton's queue vs compute time per model.")
    parser.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8000 http / :8001 grpc)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http")
    parser.add_argument("--model", default=ENSEMBLE_MODEL)
    parser.add_argument("--images", type=Path, nargs="*", default=None,
                        help="images to send in turn (default: one synthetic 512x512 PNG)")
    parser.add_argument("--concurrency", default=None,
                        help="comma-separated levels (default 1,2,4,8); in the soak mode one number (default 16)")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per level (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed requests before each level")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    soak = parser.add_argument_group(
        "soak mode", "--soak-seconds N: mixed good and malformed traffic for N s at one concurrency; writes the "
                     "soak report to --json and its RSS/latency chart next to it (.png)")
    soak.add_argument("--soak-seconds", type=float, default=None, help="run a soak of this many measured seconds")
    soak.add_argument("--warmup-seconds", type=float, default=20.0, help="soak warm-up, not counted (default 20)")
    soak.add_argument("--bad-fraction", type=float, default=0.2, help="share of malformed requests (default 0.2)")
    soak.add_argument("--repo", type=Path, default=None,
                      help="start a server on this repository for the soak (free loopback ports) instead of --url")
    soak.add_argument("--server-pid", type=int, default=None,
                      help="with --url: pid of the tritonserver, for the RSS samples of its process group")
    soak.add_argument("--kill-stub", action="append", default=[], metavar="MODEL@T",
                      help="SIGKILL the python backend stub of MODEL T s after the warm-up (repeatable)")
    soak.add_argument("--recovery-target-s", type=float, default=30.0,
                      help="a killed stub's model must answer correctly again within this many seconds, else the "
                           "run fails (default %(default)s)")
    soak.add_argument("--check-every", type=int, default=1, metavar="N",
                      help="compare every N-th good answer with the reference computed once at the start (default "
                           "%(default)s: all)")
    soak.add_argument("--max-oversize-mb", type=float, default=256.0,
                      help="skip the oversize_array kind when an array over the server's pixel limit exceeds this "
                           "(default %(default)s; 201 MB at the default 8192^2 limit)")
    soak.add_argument("--oversize-interval-s", type=float, default=30.0,
                      help="send an oversize array over 16 MB at most once per this many seconds, one at a time "
                           "(default %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    missing = [str(p) for p in args.images or () if not p.is_file()]
    if missing:
        parser.error(f"image file(s) not found: {', '.join(missing)}")
    if args.soak_seconds is not None:
        return _soak_main(parser, args)
    if args.repo is not None or args.kill_stub or args.server_pid is not None:
        parser.error("--repo, --server-pid and --kill-stub belong to the soak mode (--soak-seconds N)")
    args.concurrency = args.concurrency or "1,2,4,8"
    try:
        levels = [int(v) for v in args.concurrency.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if args.images:
        images: list[ImageInput] = [p.read_bytes() for p in args.images]
    else:
        images = [synthetic_image()]

    from tqdm import tqdm

    url = args.url or default_url(args.protocol)
    with tqdm(total=len(levels) * args.requests, desc="requests", unit="req", file=sys.stderr) as bar:
        results = sweep(url, args.protocol, images, levels, args.requests, args.warmup, args.model, args.timeout,
                        on_request=bar.update)
    print(f"{args.model} at {url} ({args.protocol}), {args.requests} requests per level")
    print(format_table(results))
    for r in results:
        if r.first_error:
            log.error("concurrency %d: %d error(s), first: %s", r.concurrency, r.errors, r.first_error)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"url": url, "protocol": args.protocol, "model": args.model, "requests_per_level": args.requests,
                   "levels": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log.info("results written to %s", args.json)
    return 1 if any(r.errors for r in results) else 0


def _soak_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The soak mode of :func:`main` (see :mod:`sdconet.serve.soak`)."""
    from sdconet.serve.soak import run_soak, write_report

    if (args.repo is None) == (args.url is None):
        parser.error("the soak mode needs exactly one of --repo DIR (start a server) or --url HOST:PORT")
    try:
        concurrency = int(args.concurrency or 16)
    except ValueError:
        parser.error(f"in the soak mode --concurrency is one integer, got {args.concurrency!r}")
    kills = []
    for spec in args.kill_stub:
        model, _, at = spec.rpartition("@")
        try:
            kills.append((model, float(at)))
        except ValueError:
            parser.error(f"--kill-stub must be MODEL@SECONDS, got {spec!r}")
        if not model:
            parser.error(f"--kill-stub must be MODEL@SECONDS, got {spec!r}")
    if args.json is None:
        parser.error("the soak mode needs --json OUT (the report; OUT.png is the chart)")
    if args.images:
        images = [p.read_bytes() for p in args.images]
    else:
        images = [synthetic_image()]  # for sdconet_scene a 512x512 scene: 9 tiles at 256 px, 49 at 128

    from contextlib import ExitStack

    from tqdm import tqdm

    from sdconet.serve.server import TritonServer

    with ExitStack() as stack:
        if args.repo is not None:
            server = stack.enter_context(TritonServer(args.repo, http_port=0, grpc_port=0, metrics_port=0))
            url = server.endpoints.http if args.protocol == "http" else server.endpoints.grpc
            pgid, heal = server.process.pid, server.heal
            log.info("soak: server on %s, log %s", url, server.log_path)
        else:
            url, pgid = args.url, (os.getpgid(args.server_pid) if args.server_pid is not None else None)
            heal = None  # the launcher of that server watches its stubs
        total = args.warmup_seconds + args.soak_seconds
        with tqdm(total=round(total), desc="soak", unit="s", file=sys.stderr) as bar:
            started = time.monotonic()

            def tick() -> None:
                elapsed = min(int(time.monotonic() - started), bar.total)
                if elapsed != bar.n:  # once a second, not per request
                    bar.n = elapsed
                    bar.refresh()

            try:
                report = run_soak(url, protocol=args.protocol, model=args.model, soak_seconds=args.soak_seconds,
                                  concurrency=concurrency, bad_fraction=args.bad_fraction,
                                  warmup_seconds=args.warmup_seconds, good_images=images, server_pgid=pgid,
                                  kill_stubs=kills, timeout_s=args.timeout, on_request=tick, heal=heal,
                                  recovery_target_s=args.recovery_target_s, check_every=args.check_every,
                                  max_oversize_bytes=int(args.max_oversize_mb * (1 << 20)),
                                  oversize_interval_s=args.oversize_interval_s)
            except ValueError as err:
                parser.error(str(err))
    png = write_report(report, args.json)
    growth = "n/a" if report.rss_growth_mb is None else f"{report.rss_growth_mb:.1f} MB"
    print(f"soak of {args.model} at {url}: {report.requests_ok} ok, {report.requests_wrong} wrong (of "
          f"{report.requests_checked} checked), {report.requests_lost} lost, {report.requests_failed_in_fault} failed "
          f"in faults, {report.bad_rejected} bad rejected, {report.bad_accepted} bad accepted, p50 {report.p50_ms} "
          f"ms, p99 {report.p99_ms} ms, RSS growth {growth}")
    print(f"  status classes: good {report.status_classes['good']}, bad {report.status_classes['bad']}")
    for fault in report.faults:
        print(f"  killed {fault['model']} stub at {fault['t_s']} s: serving again after {fault['recovery_s']} s")
    for failure in report.failures:
        print(f"  FAILED: {failure}")
    log.info("soak report written to %s and %s", args.json, png)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
