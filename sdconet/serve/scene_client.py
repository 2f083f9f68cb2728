"""Client of the served scene model ``sdconet_scene``: whole scenes in, scene detections out (tiling on the server).

    from sdconet.serve.scene_client import TritonSceneClient
    with TritonSceneClient("127.0.0.1:8000", retries=3) as client:
        result = client.detect_scene("scene.png")   # a path (sent as its encoded bytes), bytes, or [H, W, 3] uint8
        result["boxes"], result["scores"], result["labels"], result["class_names"], result["tiles"]

Boxes are xyxy in scene pixels (the pixels of the image sent: the server tiles the scene at its native resolution,
it never resizes it). A path is sent as the file's encoded bytes, so the request stays as small as the file and the
server checks its pixel limit from the header before decoding; send an array only for pixels you have already
decoded yourself (e.g. a GeoTIFF window read by ``sdconet.scene.raster``). ``server_options()`` reports the tile
size, overlap, merge rule and limits the server was built with.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

from sdconet.serve.client import RetryPolicy, SDCoNetClient, make_inputs, parse_result

SCENE_MODEL = "sdconet_scene"
SceneInput = Union[str, Path, bytes, np.ndarray]
# model config parameters of sdconet_scene that describe how it tiles and what it refuses
_OPTION_TYPES = {"imgsz": int, "overlap": int, "tiles_per_request": int, "max_scene_pixels": int, "max_tiles": int,
                 "max_detections": int, "merge_rule": str, "score_threshold": float, "detector": str}


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

    def detect_scene(self, scene: SceneInput) -> dict:
        """Detections of one whole scene: ``{"boxes": [n, 4] float32 xyxy scene pixels, "scores": [n] float32,
        "labels": [n] int64, "class_names": list[str], "tiles": int}``, in descending score order."""
        if isinstance(scene, (str, Path)):
            path = Path(scene)
            if not path.is_file():
                raise FileNotFoundError(f"scene file {path} does not exist")
            scene = path.read_bytes()
        result = self._client.infer(make_inputs(self._client._module, scene))
        detections = parse_result(result)[0]
        return {"boxes": detections.boxes.reshape(-1, 4), "scores": detections.scores, "labels": detections.labels,
                "class_names": detections.class_names, "tiles": int(result.as_numpy("num_tiles")[0, 0])}

    def server_options(self) -> dict:
        """Tile size, overlap, merge rule, score threshold and limits of the served scene model."""
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
