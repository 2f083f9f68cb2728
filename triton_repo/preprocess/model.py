"""Triton python model ``preprocess``: an image -> the detector's input at the engine size + ``image_info``.

Inputs (give exactly one per request): ``IMAGE_BYTES`` (encoded PNG/JPEG/TIFF bytes, one element per image) or
``IMAGE`` (``[H, W, 3]`` uint8 RGB). Outputs: ``images`` ``[3, S, S]`` float32 in [0, 1] and ``image_info`` ``[4]`` =
(H, W, scale_y, scale_x) for mapping boxes back (see ``sdconet_processing``, copied here from
``sdconet/serve/processing.py`` by the repository builder). A bad request gets an error response; the instance lives on.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from sdconet_processing import InvalidImageError, decode_image, letterbox, check_pixel_limit

try:
    from sdconet_processing import ENCODED_INPUT, image_input
except ImportError as err:  # this model.py next to the sdconet_processing.py of an older build
    raise ImportError("preprocess: the sdconet_processing.py next to this model.py is older than it (no "
                      "image_input); rebuild the repository with export/build_engine.py --triton-repo (or "
                      "sdconet.serve.triton_repo.build_repository) instead of copying model.py files") from err


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.size = int(parameters["imgsz"])
        self.max_pixels = int(parameters["max_image_pixels"])

    def _prepare(self, request):
        """One request (a batch of B images) -> (images [B, 3, S, S], image_info [B, 4])."""
        kind, tensor = image_input(lambda name: pb_utils.get_input_tensor_by_name(request, name), "encoded image")
        if kind == ENCODED_INPUT:
            arrays = (decode_image(bytes(item[0]), self.max_pixels) for item in tensor.as_numpy())
        else:
            batch = tensor.as_numpy()
            check_pixel_limit(batch.shape[1], batch.shape[2], self.max_pixels)
            arrays = iter(batch)
        prepared = [letterbox(np.ascontiguousarray(array), self.size) for array in arrays]
        return np.stack([p[0] for p in prepared]), np.stack([p[1] for p in prepared])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images, image_info = self._prepare(request)
            except InvalidImageError as err:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"preprocess: {err}", pb_utils.TritonError.INVALID_ARG)))
                continue
            except Exception as err:  # never let one request take the instance down
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"preprocess: unexpected failure: {err!r}")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("images", images), pb_utils.Tensor("image_info", image_info)]))
        return responses
