"""Triton python model ``detector_cpu``: the exported detector ONNX run by ONNX Runtime on CPU.

This deployment works with any Triton that has the python backend, including the python-only ``tritonserver``
bundled in the ``nvidia-pytriton`` wheel. Requests gathered by the dynamic batcher are concatenated into one ONNX
Runtime call (the ONNX has a dynamic batch axis) and the outputs are split back per request.
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        model_path = Path(args["model_repository"]) / args["model_version"] / parameters["onnx_file"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]

    def execute(self, requests):
        try:
            batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
            outputs = self.session.run(self.output_names, {self.input_name: np.concatenate(batches)})
        except Exception as err:  # e.g. out of memory: fail these requests, keep the instance
            error = pb_utils.TritonError(f"detector_cpu: ONNX Runtime failed: {err!r}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for batch in batches:
            stop = start + batch.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(value[start:stop]))
                for name, value in zip(self.output_names, outputs)]))
            start = stop
        return responses
