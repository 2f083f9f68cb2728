"""Client of the served scene model ``sdconet_scene``: whole scenes in, scene detections out (tiling on the server).

    from sdconet.serve.scene_client import TritonSceneClient
    with TritonSceneClient("127.0.0.1:8000", retries=3) as client:
        result = client.detect_scene("scene.png")   # a path (sent as its encoded bytes), bytes, or [H, W, 3] uint8
        result["boxes"], result["scores"], result["labels"], result["class_names"], result["tiles"]
        # per request, within the server's limits: a lower threshold (e.g. for AP), another overlap or merge rule
        result = client.detect_scene(pixels, valid=mask, score_threshold=0.001, overlap=26)

Boxes are xyxy in scene pixels (the pixels of the image sent: the server tiles the scene at its native resolution,
it never resizes it). A path is sent as the file's encoded bytes, so the request stays as small as the file and the
server checks its pixel limit from the header before decoding; send an array only for pixels you have already
decoded yourself (e.g. a GeoTIFF window read by ``sdconet.scene.raster``). ``server_options()`` reports the tile
size, overlap, merge rule and limits the server was built with, its class list and the detector's SHA-256.
``result["class_names"]`` holds one name per detection; ``server_options()["class_names"]`` is the model's list.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from sdconet.serve.client import RetryPolicy, SDCoNetClient, make_inputs, parse_result

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
