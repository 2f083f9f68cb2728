"""Triton python model ``sdconet_scene``: one whole scene per request -> detections in scene pixels (BLS).

Inputs (exactly one): ``IMAGE_BYTES`` ``[1, 1]`` (an encoded PNG/JPEG/TIFF; the pixel limit is checked from its
header before decoding) or ``IMAGE`` ``[1, H, W, 3]`` uint8 RGB, plus optionally ``VALID`` ``[1, H, W]`` bool with
``IMAGE`` (False = nodata: those pixels are fed as zeros and a tile with no valid pixel is not run, as in the local
scene core). The scene is the network (LR) input at its native resolution: it is cut into ``imgsz`` tiles
overlapping by ``overlap`` px (``sdconet_tiling``), the edge tiles zero-padded bottom/right, and the tiles go to the
detector model as BLS requests of ``tiles_per_request`` tiles, at most ``max_requests_in_flight`` at a time (in one
task group: the first failed request cancels the others), so the detector's dynamic batcher groups tiles of this
and other scenes. Per tile, detections with ``score >= score_threshold`` are clipped to the tile (boxes left with no
area dropped), flagged when they touch an inner tile edge, shifted to scene pixels, then merged across tiles
(``sdconet_merge``, rule ``merge_rule``).

Request parameters (Triton's per-request ``parameters``) override the built defaults within the server's limits:
``score_threshold`` (0-1), ``overlap`` (0 .. imgsz - 1 px), ``merge_rule``, ``merge_threshold`` (0-1) and ``tile``
(only ``imgsz``: the detector has a fixed input size).

``sdconet_tiling``, ``sdconet_merge`` and ``sdconet_processing`` are copies of ``sdconet/scene/tiling.py``,
``sdconet/scene/merge.py`` and ``sdconet/serve/processing.py`` placed here by the repository builder.

A scene over ``max_scene_pixels`` or needing more than ``max_tiles`` tiles, and any other bad request, gets an error
response (INVALID_ARG); the instance goes on serving. A failed detector request fails only its scene.
"""
import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from sdconet_merge import MERGE_RULES, merge_detections
from sdconet_processing import InvalidImageError, check_pixel_limit, decode_image
from sdconet_tiling import inner_edges, place_tile_boxes, tile_extents, tile_grid

try:
    from sdconet_processing import ENCODED_INPUT, image_input
except ImportError as err:  # this model.py next to the sdconet_processing.py of an older build
    raise ImportError("sdconet_scene: the sdconet_processing.py next to this model.py is older than it (no "
                      "image_input); rebuild the repository with export/build_engine.py --triton-repo (or "
                      "sdconet.serve.triton_repo.build_repository) instead of copying model.py files") from err

DETECTOR_OUTPUTS = ["boxes", "scores", "labels"]
VALID_INPUT = "VALID"


class DetectorFailed(RuntimeError):
    """A BLS request to the detector came back with an error."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.detector = parameters["detector"]
        self.size = int(parameters["imgsz"])
        self.overlap = int(parameters["overlap"])
        self.tiles_per_request = int(parameters["tiles_per_request"])
        self.in_flight = int(parameters["max_requests_in_flight"])
        self.max_pixels = int(parameters["max_scene_pixels"])
        self.max_tiles = int(parameters["max_tiles"])
        self.max_detections = int(parameters["max_detections"])  # 0 = no cap
        self.merge_rule = parameters["merge_rule"]
        self.score_threshold = float(parameters["score_threshold"])
        self.class_names = [name.encode("utf-8") for name in json.loads(parameters["class_names"])]

    def _scene(self, request):
        """The request's scene as (``[H, W, 3]`` uint8, ``[H, W]`` bool valid mask or None), after the pixel limit."""
        kind, tensor = image_input(lambda name: pb_utils.get_input_tensor_by_name(request, name),
                                   "an encoded scene")
        valid = pb_utils.get_input_tensor_by_name(request, VALID_INPUT)
        if kind == ENCODED_INPUT:
            if valid is not None:
                raise InvalidImageError(f"{VALID_INPUT} goes with IMAGE (decoded pixels), not with IMAGE_BYTES")
            return decode_image(bytes(tensor.as_numpy().reshape(-1)[0]), self.max_pixels), None
        scene = tensor.as_numpy()[0]
        check_pixel_limit(scene.shape[0], scene.shape[1], self.max_pixels)
        if valid is None:
            return scene, None
        mask = valid.as_numpy()
        if mask.shape != (1, *scene.shape[:2]):
            raise InvalidImageError(f"{VALID_INPUT} must be [1, {scene.shape[0]}, {scene.shape[1]}] like the image, "
                                    f"got {list(mask.shape)}")
        return scene, mask[0].astype(bool)

    def _settings(self, request):
        """This request's (overlap, score_threshold, merge_rule, merge_threshold): the built defaults, overridden by
        request parameters within the server's limits (``InvalidImageError`` naming the parameter otherwise)."""
        try:
            given = json.loads(request.parameters() or "{}")
        except (AttributeError, ValueError):
            given = {}
        unknown = sorted(set(given) - {"tile", "overlap", "score_threshold", "merge_rule", "merge_threshold"})
        if unknown:
            raise InvalidImageError(f"unknown request parameter(s) {unknown}; known: tile, overlap, "
                                    f"score_threshold, merge_rule, merge_threshold")
        if "tile" in given and int(given["tile"]) != self.size:
            raise InvalidImageError(f"tile {given['tile']}: this server's detector takes {self.size} px tiles only")
        overlap = int(given.get("overlap", self.overlap))
        if not 0 <= overlap < self.size:
            raise InvalidImageError(f"overlap {overlap}: must be in [0, {self.size}) (below the tile size)")
        threshold = float(given.get("score_threshold", self.score_threshold))
        if not 0.0 <= threshold <= 1.0:
            raise InvalidImageError(f"score_threshold {threshold}: must be in [0, 1]")
        rule = str(given.get("merge_rule", self.merge_rule))
        if rule not in MERGE_RULES:
            raise InvalidImageError(f"merge_rule {rule!r}: must be one of {', '.join(MERGE_RULES)}")
        merge_threshold = given.get("merge_threshold")
        if merge_threshold is not None:
            merge_threshold = float(merge_threshold)
            if not 0.0 <= merge_threshold <= 1.0:
                raise InvalidImageError(f"merge_threshold {merge_threshold}: must be in [0, 1]")
        return overlap, threshold, rule, merge_threshold

    async def _run_tiles(self, scene, valid, tiles):
        """Detector outputs of ``tiles``: (boxes [n, K, 4], scores [n, K], labels [n, K]) in tile pixels."""
        gate = asyncio.Semaphore(self.in_flight)

        async def one_request(start):
            async with gate:
                chunk = tiles[start:start + self.tiles_per_request]
                # cut and converted only when the request is sent, so memory stays bounded on large scenes
                batch = np.zeros((len(chunk), 3, self.size, self.size), np.float32)
                for i, (top, left, height, width) in enumerate(chunk):
                    pixels = scene[top:top + height, left:left + width].transpose(2, 0, 1).astype(np.float32) / 255.0
                    if valid is not None:
                        pixels *= valid[top:top + height, left:left + width]
                    batch[i, :, :height, :width] = pixels
                response = await pb_utils.InferenceRequest(
                    model_name=self.detector, requested_output_names=DETECTOR_OUTPUTS,
                    inputs=[pb_utils.Tensor("images", batch)]).async_exec()
                if response.has_error():
                    raise DetectorFailed(f"{self.detector}: {response.error().message()}")
                return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in DETECTOR_OUTPUTS]

        # a task group, not gather: when one request fails the others are cancelled instead of running on for a
        # scene whose answer is already an error
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one_request(start)) for start in range(0, len(tiles),
                                                                                  self.tiles_per_request)]
        except BaseExceptionGroup as failures:  # the first failure is the scene's error
            raise failures.exceptions[0] from None
        parts = [task.result() for task in tasks]
        return tuple(np.concatenate([part[k] for part in parts]) for k in range(len(DETECTOR_OUTPUTS)))

    def _merge(self, scene_shape, tiles, boxes, scores, labels, threshold, rule, merge_threshold):
        """Per-tile outputs -> scene detections (boxes [k, 4] scene pixels, scores [k], labels [k])."""
        height, width = scene_shape
        inner = inner_edges(tiles, height, width)
        all_boxes, all_scores, all_labels, all_tiles, all_edges = [], [], [], [], []
        for index, tile in enumerate(tiles):
            keep = np.flatnonzero(scores[index] >= threshold)
            scene_boxes, touches, kept = place_tile_boxes(boxes[index][keep], tile, inner[index])
            keep = keep[kept]
            all_boxes.append(scene_boxes)
            all_edges.append(touches)
            all_scores.append(scores[index][keep])
            all_labels.append(labels[index][keep])
            all_tiles.append(np.full(len(keep), index, np.int64))
        merged_boxes, merged_scores, merged_labels = merge_detections(
            np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_labels), rule=rule,
            tile_index=np.concatenate(all_tiles), touches_edge=np.concatenate(all_edges),
            tile_boxes=tile_extents(tiles), threshold=merge_threshold)
        if self.max_detections > 0:
            merged_boxes, merged_scores, merged_labels = (merged_boxes[:self.max_detections],
                                                          merged_scores[:self.max_detections],
                                                          merged_labels[:self.max_detections])
        return merged_boxes, merged_scores, merged_labels

    async def _detect(self, request):
        overlap, threshold, rule, merge_threshold = self._settings(request)
        scene, valid = self._scene(request)
        tiles = tile_grid(scene.shape[0], scene.shape[1], self.size, overlap)
        if len(tiles) > self.max_tiles:
            raise InvalidImageError(f"a {scene.shape[1]}x{scene.shape[0]} scene needs {len(tiles)} tiles of "
                                    f"{self.size} px (overlap {overlap}); the server limit is {self.max_tiles} "
                                    f"tiles per request")
        total = len(tiles)
        if valid is not None:  # tiles wholly nodata are not run (the local scene core skips them too)
            tiles = tiles[[bool(valid[t:t + h, l:l + w].any()) for t, l, h, w in tiles.tolist()]]
        skipped = total - len(tiles)
        if len(tiles):
            boxes, scores, labels = self._merge(scene.shape[:2], tiles, *await self._run_tiles(scene, valid, tiles),
                                                threshold, rule, merge_threshold)
        else:
            boxes, scores, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32)
        count = len(scores)
        names = np.array([[self.class_names[int(v)] if 0 <= int(v) < len(self.class_names) else str(int(v)).encode()
                           for v in labels]], dtype=object).reshape(1, count)
        return [pb_utils.Tensor("num_detections", np.array([[count]], np.int32)),
                pb_utils.Tensor("num_tiles", np.array([[len(tiles)]], np.int32)),
                pb_utils.Tensor("num_tiles_skipped", np.array([[skipped]], np.int32)),
                pb_utils.Tensor("detection_boxes", boxes.astype(np.float32).reshape(1, count, 4)),
                pb_utils.Tensor("detection_scores", scores.astype(np.float32).reshape(1, count)),
                pb_utils.Tensor("detection_labels", labels.astype(np.int32).reshape(1, count)),
                pb_utils.Tensor("detection_classes", names)]

    async def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=await self._detect(request)))
            except InvalidImageError as err:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"sdconet_scene: {err}", pb_utils.TritonError.INVALID_ARG)))
            except DetectorFailed as err:  # e.g. the detector's stub restarting: the client may retry
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"sdconet_scene: {err}", pb_utils.TritonError.UNAVAILABLE)))
            except Exception as err:  # never let one request take the instance down
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"sdconet_scene: unexpected failure: {err!r}")))
        return responses
