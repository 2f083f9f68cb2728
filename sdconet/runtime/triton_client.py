"""Triton client of the served SDCoNet models, HTTP or gRPC: the one client that the scene CLI, the server tools,
the load generator and ``python -m sdconet.client`` all use.

* :class:`SDCoNetClient` / :class:`AsyncSDCoNetClient` / :func:`detect_many`: images to the ``sdconet`` ensemble;
* :class:`TritonSceneClient`: whole scenes to ``sdconet_scene`` (tiling on the server);
* :class:`RetryPolicy`: ``retries=N`` resends a request that met a connection error or an UNAVAILABLE answer
  (exponential backoff); an invalid request is never retried.

Boxes are xyxy in the pixels of the image sent. (The per-tile :class:`sdconet.runtime.triton_runner.TritonRunner`
talks to the detector models behind the ensemble.)

    from sdconet.runtime.triton_client import SDCoNetClient, TritonSceneClient
    with SDCoNetClient("127.0.0.1:8000", protocol="http") as client:
        detections = client.detect("scene.png")          # a path, encoded bytes or an [H, W, 3] uint8 RGB array
    with TritonSceneClient("127.0.0.1:8000", retries=3) as client:
        result = client.detect_scene("scene.png")   # result["boxes"], ["scores"], ["labels"], ["class_names"], ["tiles"]
        # per request, within the server's limits: a lower threshold (e.g. for AP), another overlap or merge rule
        result = client.detect_scene(pixels, valid=mask, score_threshold=0.001, overlap=26)

A scene path is sent as the file's encoded bytes, so the request stays as small as the file and the server checks its
pixel limit from the header before decoding; send an array only for pixels you decoded yourself (e.g. a GeoTIFF
window read by ``sdconet.data.raster``). ``server_options()`` reports the tile size, overlap, merge rule and limits
the server was built with, its class list and the detector's SHA-256. ``result["class_names"]`` holds one name per
detection; ``server_options()["class_names"]`` is the model's list.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from sdconet.utils.logging import get_logger

log = get_logger(__name__)

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # tritonserver's own defaults
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


# ------------------------------------------------------------------------------------------------------------------
# Whole scenes: the sdconet_scene model (tiling on the server)
# ------------------------------------------------------------------------------------------------------------------
SCENE_MODEL = "sdconet_scene"
SceneInput = Union[str, Path, bytes, np.ndarray]
# model config parameters of sdconet_scene that describe how it tiles and what it refuses
_OPTION_TYPES = {"imgsz": int, "overlap": int, "tiles_per_request": int, "max_scene_pixels": int, "max_tiles": int,
                 "max_detections": int, "merge_rule": str, "score_threshold": float, "detector": str,
                 "class_names": json.loads, "detector_sha256": str}
# what a scene request may set per request (sdconet_scene checks them against its limits)
REQUEST_PARAMETERS = ("tile", "overlap", "score_threshold", "merge_rule", "merge_threshold")


class TritonSceneClient:
    """Blocking client of ``sdconet_scene`` over HTTP (``host:8000``) or gRPC (``host:8001``).

    Args:
        url: ``host:port`` (default the protocol's local default port).
        protocol: ``"http"`` or ``"grpc"``.
        timeout_s: per-request timeout; a large scene takes its tiles' time, so the default is generous.
        retries, backoff_s: resend a scene after a connection error or an UNAVAILABLE answer up to ``retries``
            times, waiting ``backoff_s * 2**k`` (at most 30 s) before retry ``k + 1``; invalid scenes are never
            retried.
    """

    def __init__(self, url: Optional[str] = None, protocol: str = "http", model_name: str = SCENE_MODEL,
                 timeout_s: float = 600.0, retries: int = 0, backoff_s: float = 0.5):
        self._client = SDCoNetClient(url, protocol, model_name, timeout_s,
                                     RetryPolicy(retries=retries, backoff_s=backoff_s))

    @property
    def url(self) -> str:
        return self._client.url

    def detect_scene(self, scene: SceneInput, valid: Optional[np.ndarray] = None, **parameters: Any) -> dict:
        """Detections of one whole scene: ``{"boxes": [n, 4] float32 xyxy scene pixels, "scores": [n] float32,
        "labels": [n] int64, "class_names": one str per detection, "tiles": tiles run, "tiles_skipped": tiles with
        no valid pixel}``, in descending score order. ``valid`` ([H, W] bool, with an array scene): False marks
        nodata, sent as zeros and never run alone. ``parameters``: any of ``REQUEST_PARAMETERS`` (None = the
        server's)."""
        unknown = sorted(set(parameters) - set(REQUEST_PARAMETERS))
        if unknown:
            raise TypeError(f"unknown scene parameter(s) {unknown}; known: {', '.join(REQUEST_PARAMETERS)}")
        if isinstance(scene, (str, Path)):
            path = Path(scene)
            if not path.is_file():
                raise FileNotFoundError(f"scene file {path} does not exist")
            scene = path.read_bytes()
        inputs = make_inputs(self._client._module, scene)
        if valid is not None:
            if not isinstance(scene, np.ndarray):
                raise ValueError("a valid mask goes with an array scene ([H, W, 3] uint8), not with encoded bytes")
            valid = np.asarray(valid, dtype=bool)
            if valid.shape != scene.shape[:2]:
                raise ValueError(f"valid mask {list(valid.shape)} does not match the scene {list(scene.shape[:2])}")
            mask = self._client._module.InferInput("VALID", [1, *valid.shape], "BOOL")
            mask.set_data_from_numpy(np.ascontiguousarray(valid)[None])
            inputs.append(mask)
        sent = {key: value for key, value in parameters.items() if value is not None}
        result = self._client.infer(inputs, parameters=sent or None)
        detections = parse_result(result)[0]
        return {"boxes": detections.boxes.reshape(-1, 4), "scores": detections.scores, "labels": detections.labels,
                "class_names": detections.class_names, "tiles": int(result.as_numpy("num_tiles")[0, 0]),
                "tiles_skipped": int(result.as_numpy("num_tiles_skipped")[0, 0])}

    def server_options(self) -> dict:
        """Tile size, overlap, merge rule, score threshold, limits, class list and detector SHA-256 of the served
        scene model (keys of ``_OPTION_TYPES`` the server has)."""
        parameters = self._client.model_config().get("parameters", {})
        return {key: cast(parameters[key]["string_value"]) for key, cast in _OPTION_TYPES.items()
                if key in parameters}

    def is_ready(self) -> bool:
        return self._client.is_ready()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "TritonSceneClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
