"""Clients for the served ``sdconet`` ensemble (HTTP or gRPC), a concurrent mode, and ``python -m sdconet.client``.

Library::

    from sdconet.serve.client import SDCoNetClient, detect_many
    with SDCoNetClient("127.0.0.1:8000", protocol="http") as client:
        detections = client.detect("scene.png")          # a path, encoded bytes or an [H, W, 3] uint8 RGB array
    results = detect_many(["a.png", "b.png"], protocol="grpc", concurrency=8)   # asyncio under the hood

``AsyncSDCoNetClient`` is the asyncio API (``await client.detect(...)``, ``await client.detect_many(...)``).
Boxes are xyxy in the pixels of the image sent. ``retries=N`` retries a request that met a connection error or an
UNAVAILABLE answer (exponential backoff, :class:`RetryPolicy`); an invalid request is never retried.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence, Union

import numpy as np

from sdconet.serve.server import DEFAULT_PORTS
from sdconet.utils.logging import get_logger, setup_logging

log = get_logger(__name__)
FAILURES_FILE = "failures.json"  # per-image failures of a client run, next to the detection JSONs

ENSEMBLE_MODEL = "sdconet"
PROTOCOLS = ("http", "grpc")
OUTPUT_NAMES = ("num_detections", "detection_boxes", "detection_scores", "detection_labels", "detection_classes")
# integer fields of Triton's statistics (gRPC's JSON renders uint64 as strings)
_STAT_INT_KEYS = {"count", "ns", "inference_count", "execution_count", "batch_size", "last_inference"}

ImageInput = Union[str, Path, bytes, np.ndarray]
# Triton answers that mean "not now" (server starting or stopping, a backend restarting): safe to send again
_RETRYABLE_STATUS = {"StatusCode.UNAVAILABLE", "503"}


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one request: attempt ``k`` (0-based) waits ``min(backoff_s * 2**k, max_backoff_s)`` before the
    next. Only connection errors and UNAVAILABLE answers are retried (:func:`is_retryable`)."""

    retries: int = 0
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"retries, backoff_s and max_backoff_s must be >= 0, got {self}")

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s)


def is_retryable(err: BaseException) -> bool:
    """True for errors a resend can cure: the connection failed (refused, reset, timed out) or Triton answered
    UNAVAILABLE. An invalid request (INVALID_ARGUMENT / HTTP 400) or an internal error is not retried."""
    from tritonclient.utils import InferenceServerException

    if isinstance(err, InferenceServerException):
        status = str(err.status() or "")
        # the HTTP client reports a dropped connection as an exception without a status
        return status in _RETRYABLE_STATUS or (not status and "connect" in str(err).lower())
    if isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    try:  # the asyncio HTTP client: refused, reset, "Server disconnected" mid-request
        import aiohttp
    except ImportError:
        aiohttp = None
    if aiohttp is not None and isinstance(err, aiohttp.ClientConnectionError):
        return True
    return type(err).__module__.startswith(("geventhttpclient", "gevent")) and isinstance(err, OSError)


def call_with_retries(call: Callable[[], object], policy: RetryPolicy, what: str = "request"):
    """``call()``, retried per ``policy``; the last error is raised with ``attempts`` set on it."""
    for attempt in range(policy.retries + 1):
        try:
            return call()
        except Exception as err:
            if not _will_retry(err, attempt, policy, what):
                raise
            time.sleep(policy.delay(attempt))


async def acall_with_retries(call: Callable[[], object], policy: RetryPolicy, what: str = "request"):
    """The asyncio form of :func:`call_with_retries` (``call()`` returns an awaitable)."""
    for attempt in range(policy.retries + 1):
        try:
            return await call()
        except Exception as err:
            if not _will_retry(err, attempt, policy, what):
                raise
            await asyncio.sleep(policy.delay(attempt))


def _will_retry(err: Exception, attempt: int, policy: RetryPolicy, what: str) -> bool:
    """Whether attempt ``attempt`` (0-based), failed with ``err``, is followed by another (logged); when not,
    ``err.attempts`` records how many were made."""
    if attempt == policy.retries or not is_retryable(err):
        err.attempts = attempt + 1
        return False
    log.warning("%s: %s (attempt %d of %d); retrying in %.1f s", what, _describe(err), attempt + 1,
                policy.retries + 1, policy.delay(attempt))
    return True


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def failure_record(err: BaseException) -> dict:
    """What a per-image failure report says: the error, whether it was retryable, how many attempts were made."""
    return {"error": _describe(err), "retryable": is_retryable(err), "attempts": getattr(err, "attempts", 1)}


@dataclass
class Detections:
    """One image's detections: ``boxes`` ``[n, 4]`` xyxy original pixels, ``scores`` ``[n]``, ``labels`` ``[n]``."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, score_threshold: float) -> "Detections":
        """The detections with ``score >= score_threshold``."""
        keep = np.flatnonzero(self.scores >= score_threshold)
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep],
                          [self.class_names[i] for i in keep])

    def to_dict(self) -> dict:
        return {"num_detections": len(self), "detections": [
            {"box_xyxy": [round(float(v), 3) for v in box], "score": round(float(score), 5), "label": int(label),
             "class_name": name}
            for box, score, label, name in zip(self.boxes, self.scores, self.labels, self.class_names)]}


def default_url(protocol: str) -> str:
    return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"


def _protocol_module(protocol: str, asynchronous: bool) -> ModuleType:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "http":
        import tritonclient.http as module
        if asynchronous:
            import tritonclient.http.aio  # noqa: F401  (registers module.aio)
    else:
        import tritonclient.grpc as module
        if asynchronous:
            import tritonclient.grpc.aio  # noqa: F401
    return module


def make_inputs(module: ModuleType, image: ImageInput) -> list:
    """Request inputs for one image: a path or bytes go as ``IMAGE_BYTES`` (decoded by the server), an
    ``[H, W, 3]`` uint8 array as ``IMAGE``."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be [H, W, 3] uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        tensor = module.InferInput("IMAGE", [1, *image.shape], "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(image)[None])
        return [tensor]
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    tensor = module.InferInput("IMAGE_BYTES", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data]], dtype=object))
    return [tensor]


def parse_result(result) -> list[Detections]:
    """An ``sdconet`` response (either protocol) -> one :class:`Detections` per image of the request."""
    counts, boxes, scores, labels, names = (result.as_numpy(name) for name in OUTPUT_NAMES)
    out = []
    for i, count in enumerate(counts[:, 0]):
        n = int(count)
        out.append(Detections(boxes[i, :n].astype(np.float32), scores[i, :n].astype(np.float32),
                              labels[i, :n].astype(np.int64),
                              [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in names[i, :n]]))
    return out


def normalize_statistics(stats: dict) -> dict[str, dict]:
    """Triton's statistics response (HTTP dict or gRPC JSON) -> ``{model_name: model_stats}`` with int counters."""

    def convert(value, key=None):
        if isinstance(value, dict):
            return {k: convert(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if key in _STAT_INT_KEYS and isinstance(value, str):
            return int(value)
        return value

    return {entry["name"]: convert(entry) for entry in stats.get("model_stats", [])}


def composing_models(config: dict) -> list[str]:
    """Model names an ensemble config (HTTP dict or gRPC JSON ``{"config": ...}``) runs, in step order."""
    config = config.get("config", config)
    return [step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])]


class SDCoNetClient:
    """Blocking client for the ``sdconet`` ensemble over HTTP (``host:8000``) or gRPC (``host:8001``)."""

    def __init__(self, url: Optional[str] = None, protocol: str = "http", model_name: str = ENSEMBLE_MODEL,
                 timeout_s: float = 60.0, retry: Optional[RetryPolicy] = None):
        self.protocol, self.model_name, self.timeout_s = protocol, model_name, timeout_s
        self.retry = retry or RetryPolicy()
        self.url = url or default_url(protocol)
        self._module = _protocol_module(protocol, asynchronous=False)
        if protocol == "http":
            self._client = self._module.InferenceServerClient(self.url, connection_timeout=timeout_s,
                                                              network_timeout=timeout_s)
        else:
            self._client = self._module.InferenceServerClient(self.url)

    def infer(self, inputs: list, parameters: Optional[dict] = None):
        """One request to ``model_name`` with retries (see :class:`RetryPolicy`) -> the raw result; ``parameters``
        are Triton request parameters (the model reads them with ``request.parameters()``)."""
        if self.protocol == "http":
            call = lambda: self._client.infer(self.model_name, inputs, parameters=parameters)  # noqa: E731
        else:
            call = lambda: self._client.infer(self.model_name, inputs, client_timeout=self.timeout_s,  # noqa: E731
                                              parameters=parameters)
        return call_with_retries(call, self.retry, f"{self.model_name} at {self.url}")

    def detect(self, image: ImageInput) -> Detections:
        return parse_result(self.infer(make_inputs(self._module, image)))[0]

    def is_ready(self) -> bool:
        return bool(self._client.is_server_ready()) and bool(self._client.is_model_ready(self.model_name))

    def statistics(self, model_name: str = "") -> dict[str, dict]:
        """Per-model inference statistics (all models when ``model_name`` is empty)."""
        if self.protocol == "http":
            return normalize_statistics(self._client.get_inference_statistics(model_name))
        return normalize_statistics(self._client.get_inference_statistics(model_name, as_json=True))

    def model_config(self, model_name: Optional[str] = None) -> dict:
        name = model_name or self.model_name
        if self.protocol == "http":
            return self._client.get_model_config(name)
        return self._client.get_model_config(name, as_json=True)["config"]

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "SDCoNetClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSDCoNetClient:
    """asyncio client: many requests in flight over one connection pool (HTTP) or channel (gRPC)."""

    def __init__(self, url: Optional[str] = None, protocol: str = "http", model_name: str = ENSEMBLE_MODEL,
                 timeout_s: float = 60.0, retry: Optional[RetryPolicy] = None):
        self.protocol, self.model_name, self.timeout_s = protocol, model_name, timeout_s
        self.retry = retry or RetryPolicy()
        self.url = url or default_url(protocol)
        self._module = _protocol_module(protocol, asynchronous=True)
        if protocol == "http":
            self._client = self._module.aio.InferenceServerClient(self.url, conn_timeout=timeout_s)
        else:
            self._client = self._module.aio.InferenceServerClient(self.url)

    async def detect(self, image: ImageInput) -> Detections:
        inputs = make_inputs(self._module, image)
        if self.protocol == "http":
            call = lambda: self._client.infer(self.model_name, inputs)  # noqa: E731
        else:
            call = lambda: self._client.infer(self.model_name, inputs, client_timeout=self.timeout_s)  # noqa: E731
        result = await acall_with_retries(call, self.retry, f"{self.model_name} at {self.url}")
        return parse_result(result)[0]

    async def detect_many(self, images: Sequence[ImageInput], concurrency: int = 8,
                          on_done: Optional[Callable[[int, Union[Detections, Exception]], None]] = None
                          ) -> list[Union[Detections, Exception]]:
        """Detect on every image with at most ``concurrency`` requests in flight; results in input order, a failed
        request's slot holds its exception. ``on_done(index, result)`` is called as each finishes."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int, image: ImageInput) -> Union[Detections, Exception]:
            async with gate:
                try:
                    result: Union[Detections, Exception] = await self.detect(image)
                except Exception as err:  # reported per image, the others go on
                    result = err
            if on_done is not None:
                on_done(index, result)
            return result

        return list(await asyncio.gather(*(one(i, image) for i, image in enumerate(images))))

    async def statistics(self, model_name: str = "") -> dict[str, dict]:
        if self.protocol == "http":
            return normalize_statistics(await self._client.get_inference_statistics(model_name))
        return normalize_statistics(await self._client.get_inference_statistics(model_name, as_json=True))

    async def model_config(self, model_name: Optional[str] = None) -> dict:
        name = model_name or self.model_name
        if self.protocol == "http":
            return await self._client.get_model_config(name)
        return (await self._client.get_model_config(name, as_json=True))["config"]

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncSDCoNetClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def detect_many(images: Sequence[ImageInput], url: Optional[str] = None, protocol: str = "http",
                model_name: str = ENSEMBLE_MODEL, concurrency: int = 8, timeout_s: float = 60.0,
                on_done: Optional[Callable[[int, Union[Detections, Exception]], None]] = None,
                retry: Optional[RetryPolicy] = None) -> list[Union[Detections, Exception]]:
    """Blocking wrapper over :meth:`AsyncSDCoNetClient.detect_many` (not callable from a running event loop)."""

    async def run() -> list[Union[Detections, Exception]]:
        async with AsyncSDCoNetClient(url, protocol, model_name, timeout_s, retry) as client:
            return await client.detect_many(images, concurrency, on_done)

    return asyncio.run(run())


def annotate(image_path: Path, detections: Detections) -> np.ndarray:
    """The image with its detections drawn (``[H, W, 3]`` uint8)."""
    from sdconet.data.image_io import load_image
    from sdconet.engine.visualize import PRED_COLOR, draw_boxes

    pixels = load_image(image_path)
    # one caption per detection: index i names detection i
    return draw_boxes(pixels, detections.boxes, color=PRED_COLOR, labels=np.arange(len(detections)),
                      scores=detections.scores, category_names=detections.class_names)


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems for per-image outputs, unique even when inputs share a name (a later ``a.png`` takes the first
    free ``a_<k>``; "failures" is reserved for failures.json)."""
    stems, used = [], {"failures"}
    for path in paths:
        stem, count = path.stem, 0
        while stem in used:
            count += 1
            stem = f"{path.stem}_{count}"
        used.add(stem)
        stems.append(stem)
    return stems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdconet.client",
        description="Send images to a running SDCoNet Triton server and write/print the detections as JSON. By "
                    "default each image goes to the tile ensemble 'sdconet', which resizes (letterboxes) it to the "
                    "network size; --scene sends whole scenes to 'sdconet_scene', which tiles them at their native "
                    "resolution on the server.")
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, TIFF, ...)")
    parser.add_argument("--scene", action="store_true",
                        help="whole-scene mode: send each file (its encoded bytes) to sdconet_scene; boxes come back "
                             "in scene pixels")
    parser.add_argument("--url", default=None, help="server host:port (default 127.0.0.1:8000 for http, "
                                                    "127.0.0.1:8001 for grpc)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http")
    parser.add_argument("--model", default=None, help="model name (default sdconet, with --scene sdconet_scene)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for <image>.json per image (default: print one JSON list to stdout)")
    parser.add_argument("--annotate", action="store_true", help="also write <image>.png with the boxes drawn "
                                                                "(needs --out)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="per-request timeout in seconds (default 60, with --scene 600)")
    parser.add_argument("--retries", type=int, default=3,
                        help="resend a request after a connection error or an UNAVAILABLE answer up to this many "
                             "times, with exponential backoff (default %(default)s; invalid requests are never "
                             "retried)")
    parser.add_argument("--retry-backoff", type=float, default=1.0,
                        help="seconds before the first retry, doubled for each next one up to 30 (default 1)")
    parser.add_argument("--score-threshold", "--score-thresh", dest="score_threshold", type=float, default=None,
                        help="keep detections with score >= this (applied to the server's answer, so only values "
                             "above the threshold the repository was built with have an effect; default: the "
                             "server's)")
    args = parser.parse_args(argv)
    setup_logging()
    model = args.model or ("sdconet_scene" if args.scene else ENSEMBLE_MODEL)
    timeout = args.timeout if args.timeout is not None else (600.0 if args.scene else 60.0)
    try:
        retry = RetryPolicy(retries=args.retries, backoff_s=args.retry_backoff)
    except ValueError as err:
        parser.error(str(err))
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.annotate and args.out is None:
        parser.error("--annotate needs --out DIR")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        parser.error(f"image file(s) not found: {', '.join(missing)}")

    from tqdm import tqdm

    with tqdm(total=len(args.images), desc="detect", unit="img", file=sys.stderr) as bar:
        results = detect_many(args.images, args.url, args.protocol, model, args.concurrency, timeout,
                              on_done=lambda index, result: bar.update(), retry=retry)
    records, failures = [], []
    for path, stem, result in zip(args.images, _output_stems(args.images), results):
        if isinstance(result, Exception):
            record = {"image": str(path), **failure_record(result)}
            failures.append(record)
            log.error("%s: failed after %d attempt(s): %s", path, record["attempts"], record["error"])
        else:
            if args.score_threshold is not None:
                result = result.above(args.score_threshold)
            record = {"image": str(path), **result.to_dict()}
            top = ", ".join(f"{n} {s:.2f}" for n, s in zip(result.class_names[:3], result.scores[:3]))
            log.info("%s: %d detection(s)%s", path, len(result), f" (top: {top})" if top else "")
        records.append(record)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            if args.annotate and not isinstance(result, Exception):
                from sdconet.data.image_io import save_image

                save_image(annotate(path, result), args.out / f"{stem}.png")
    if args.out is None:
        json.dump(records, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        (args.out / FAILURES_FILE).write_text(json.dumps(failures, indent=2, ensure_ascii=False) + "\n")
        log.info("wrote %d JSON file(s)%s to %s (%d failure(s) listed in failures.json)", len(records),
                 " and annotated PNGs" if args.annotate else "", args.out, len(failures))
    if failures:
        log.error("%d of %d image(s) failed", len(failures), len(records))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
