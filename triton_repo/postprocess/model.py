"""Triton python model ``postprocess``: raw detector output -> detections in original-image pixels.

Inputs per image: ``boxes`` ``[K, 4]`` xyxy in network-input pixels, ``scores`` ``[K]``, ``labels`` ``[K]`` int32 and
``image_info`` ``[4]`` from ``preprocess``. Keeps ``score >= score_threshold`` (model parameter), maps boxes back with
``sdconet_processing`` (a copy of ``sdconet/serve/processing.py``) and names the classes. Outputs per image:
``num_detections`` ``[1]``, ``detection_boxes`` ``[n, 4]``, ``detection_scores`` ``[n]``, ``detection_labels`` ``[n]``,
``detection_classes`` ``[n]`` (bytes); in a request of several images, ``n`` is that request's largest count and the
rows past ``num_detections`` are zero/empty padding.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from sdconet_processing import select_detections


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.score_threshold = float(parameters["score_threshold"])
        self.class_names = [name.encode("utf-8") for name in json.loads(parameters["class_names"])]

    def _class_name(self, label):
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label).encode()

    def _postprocess(self, request):
        boxes, scores, labels, image_info = (pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                                             for name in ("boxes", "scores", "labels", "image_info"))
        per_image = [select_detections(boxes[i], scores[i], labels[i], image_info[i], self.score_threshold)
                     for i in range(boxes.shape[0])]
        batch, width = len(per_image), max(len(d[1]) for d in per_image)
        out_boxes = np.zeros((batch, width, 4), np.float32)
        out_scores = np.zeros((batch, width), np.float32)
        out_labels = np.full((batch, width), -1, np.int32)
        out_classes = np.full((batch, width), b"", dtype=object)
        counts = np.zeros((batch, 1), np.int32)
        for i, (image_boxes, image_scores, image_labels) in enumerate(per_image):
            n = len(image_scores)
            counts[i, 0] = n
            out_boxes[i, :n], out_scores[i, :n], out_labels[i, :n] = image_boxes, image_scores, image_labels
            out_classes[i, :n] = [self._class_name(int(label)) for label in image_labels]
        return [pb_utils.Tensor("num_detections", counts), pb_utils.Tensor("detection_boxes", out_boxes),
                pb_utils.Tensor("detection_scores", out_scores), pb_utils.Tensor("detection_labels", out_labels),
                pb_utils.Tensor("detection_classes", out_classes)]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._postprocess(request)))
            except Exception as err:  # answer this request with an error, keep serving the others
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"postprocess: {err!r}")))
        return responses
