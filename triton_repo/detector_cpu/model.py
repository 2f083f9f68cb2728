"""Triton python model ``detector_cpu``: the exported detector on a CPU runtime inside the python backend.

The runtime is chosen when the repository is built (config parameter ``runtime``):

* ``onnxruntime`` -- the pure ONNX on ONNX Runtime's CPU provider (dynamic batch). A config without the parameter (a
  repository built before it existed) means this runtime.
* ``openvino`` -- the model on OpenVINO's CPU plugin: the plugin-mode ONNX, whose MSDA nodes become the fused C++ op
  of the extension library carried in this version folder (parameter ``extension``), or an OpenVINO IR (INT8 from
  NNCF). OpenVINO's CPU plugin is faster on static shapes, so the model is compiled in ``initialize`` once per batch
  size of ``batch_sizes`` (the model is READY only after that), and a batch is zero-padded up to the next compiled
  size; the padded rows are dropped from the outputs.

Parameters: ``model_file`` (``onnx_file`` in older repositories), ``intra_op_threads`` (0 = the runtime's default),
``precision`` (openvino: ``fp32`` | ``bf16`` inference-precision hint | ``int8`` = a quantized model),
``extension``, ``openvino_version`` (the OpenVINO the extension was built against: another one refuses to load it)
and ``batch_sizes``. The file is self-contained: the python backend's environment has numpy (< 2) and the chosen
runtime, not the sdconet package. Requests gathered by the dynamic batcher run as one call and are split back; a call
that fails fails those requests only, never the instance.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

RUNTIMES = ("onnxruntime", "openvino")
_OV_PRECISION_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 layers come from the model itself


class _OnnxRuntime:
    def __init__(self, model_path, threads, input_name, output_names):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_name, self.output_names = input_name, output_names

    def run(self, images):
        return self.session.run(self.output_names, {self.input_name: images})


class _OpenVINO:
    def __init__(self, model_path, threads, parameters, version_dir, input_dims, output_names):
        import openvino as ov

        core = ov.Core()
        extension = parameters.get("extension", "")
        if extension:
            built_for = parameters.get("openvino_version", "")
            if built_for and built_for != ov.get_version():
                raise RuntimeError(f"the fused MSDA extension {extension} was built against OpenVINO {built_for}, "
                                   f"this environment has {ov.get_version()}: rebuild the repository here")
            core.add_extension(str(version_dir / extension))
        precision = parameters.get("precision", "fp32")
        if precision not in _OV_PRECISION_HINT:
            raise ValueError(f"parameter 'precision' must be one of {sorted(_OV_PRECISION_HINT)}, got {precision!r}")
        capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        if precision == "bf16" and "BF16" not in capabilities:
            raise RuntimeError(f"precision bf16 needs a CPU with AVX512-BF16 or AMX; this one "
                               f"({core.get_property('CPU', 'FULL_DEVICE_NAME')}) reports {capabilities}: rebuild "
                               f"the repository with precision fp32")
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": _OV_PRECISION_HINT[precision]}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        model = core.read_model(str(model_path))
        self.sizes = sorted(int(size) for size in parameters["batch_sizes"].split(","))
        self.compiled = {}
        for size in self.sizes:  # all compiles happen here, none on a request's path
            shaped = model.clone()
            shaped.reshape({shaped.inputs[0]: [size, *input_dims]})
            compiled = core.compile_model(shaped, "CPU", config)
            ports = []
            for name in output_names:  # OpenVINO may list a tensor under several names
                port = next((p for p in compiled.outputs if name in p.get_names()), None)
                if port is None:
                    raise RuntimeError(f"{model_path} has no output '{name}' (outputs: "
                                       f"{[sorted(p.get_names()) for p in compiled.outputs]})")
                ports.append(port)
            self.compiled[size] = (compiled.create_infer_request(), ports)

    def run(self, images):
        count = images.shape[0]
        size = next((s for s in self.sizes if s >= count), None)
        if size is None:
            raise ValueError(f"batch {count} exceeds the largest compiled batch size {self.sizes[-1]}")
        if size > count:
            images = np.concatenate([images, np.zeros((size - count, *images.shape[1:]), images.dtype)])
        request, ports = self.compiled[size]
        result = request.infer({0: images})
        # copies: the request's output memory is reused by its next call
        return [np.array(result[port][:count]) for port in ports]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.runtime = parameters.get("runtime", "onnxruntime")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"detector_cpu: parameter 'runtime' must be one of {RUNTIMES}, got {self.runtime!r}")
        model_path = version_dir / (parameters.get("model_file") or parameters["onnx_file"])
        threads = int(parameters.get("intra_op_threads", "0"))
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        if self.runtime == "onnxruntime":
            self.engine = _OnnxRuntime(model_path, threads, self.input_name, self.output_names)
        else:
            input_dims = [int(d) for d in config["input"][0]["dims"]]
            self.engine = _OpenVINO(model_path, threads, parameters, version_dir, input_dims, self.output_names)

    def execute(self, requests):
        try:
            batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
            outputs = self.engine.run(np.ascontiguousarray(np.concatenate(batches), dtype=np.float32))
        except Exception as err:  # e.g. out of memory: fail these requests, keep the instance
            error = pb_utils.TritonError(f"detector_cpu: {self.runtime} failed: {err!r}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for batch in batches:
            stop = start + batch.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(value[start:stop]))
                for name, value in zip(self.output_names, outputs)]))
            start = stop
        return responses
