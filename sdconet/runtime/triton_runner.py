"""Triton: network-input batches sent straight to a repository's detector model (``detector_cpu`` /
``detector_onnx`` / ``detector_trt``), bypassing the ensemble's letterboxing preprocess.

The input size and max batch come from the detector's model config, the class names from the postprocess model's
``class_names`` parameter (or a repository manifest ``sdconet_repo.json`` when given), so what the server serves is
described by the server itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sdconet.runtime.base import Runner, RunnerError, RunnerUnavailable

PROTOCOLS = ("http", "grpc")
POSTPROCESS_MODEL = "postprocess"


def _detector_models() -> tuple[str, ...]:
    from sdconet.runtime.metadata import DETECTOR_MODELS

    return tuple(DETECTOR_MODELS[b] for b in ("trt", "onnx", "cpu"))  # the first one ready wins


def _strip_scheme(url: str) -> str:
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    return url


class TritonRunner(Runner):
    """A Triton server's detector model as a runner.

    Args:
        url: ``host:port`` of the server's HTTP or gRPC endpoint.
        protocol: ``http`` | ``grpc``.
        model: detector model name (default: the first ready of detector_trt, detector_onnx, detector_cpu).
        class_names: override the names the server's postprocess config carries.
        repo: a repository directory written by ``build_repository``; its manifest supplies names and precision.
        timeout_s: network timeout of each request.
    """

    backend = "triton"

    def __init__(self, url: str, protocol: str = "http", model: str | None = None, *,
                 class_names: Sequence[str] | None = None, repo: str | Path | None = None,
                 timeout_s: float = 60.0) -> None:
        if protocol not in PROTOCOLS:
            raise RunnerError(f"triton runner: protocol must be http or grpc, got {protocol!r}")
        try:
            if protocol == "http":
                import tritonclient.http as client_module
            else:
                import tritonclient.grpc as client_module
        except ImportError as err:
            raise RunnerUnavailable(f"tritonclient[{protocol}] is not installed (pip install 'sdconet[serving]'): "
                                    f"{err}") from err
        from tritonclient.utils import InferenceServerException

        self._errors = InferenceServerException
        self._module = client_module
        self.protocol = protocol
        self.url = _strip_scheme(url)
        kwargs = ({"connection_timeout": timeout_s, "network_timeout": timeout_s} if protocol == "http" else {})
        self._timeout = timeout_s
        self.client = client_module.InferenceServerClient(self.url, **kwargs)
        try:  # a server that is not there, or serves no detector, leaves no open connection behind
            self._open(model, class_names, repo)
        except BaseException:
            self.close()
            raise

    def _open(self, model: str | None, class_names: Sequence[str] | None, repo: str | Path | None) -> None:
        """Check the server and the detector model, then set the runner's properties from its config."""
        try:
            live = self.client.is_server_live()
        except Exception as err:  # connection refused, DNS, timeout: all mean "no server here"
            raise RunnerUnavailable(f"no Triton server at {self.url} ({self.protocol}): {err}") from err
        if not live:
            raise RunnerUnavailable(f"Triton server at {self.url} is not live")
        if model is None:
            ready = [m for m in _detector_models() if self._ready(m)]
            if not ready:
                raise RunnerError(f"Triton server at {self.url} serves none of the detector models "
                                  f"{list(_detector_models())}; pass model=<name>")
            model = ready[0]
        elif not self._ready(model):
            raise RunnerError(f"Triton server at {self.url}: model {model!r} is not ready")
        self.model = model
        config = self._config(model)
        inputs = config.get("input", [])
        if len(inputs) != 1:
            raise RunnerError(f"Triton model {model!r} has {len(inputs)} inputs; a detector takes one ([B, 3, S, S])")
        self.input_name = inputs[0]["name"]
        dims = [int(d) for d in inputs[0].get("dims", [])]
        if len(dims) != 3 or dims[0] != 3:
            raise RunnerError(f"Triton model {model!r}: input {self.input_name!r} dims {dims} are not [3, S, S]")
        self.output_names = [o["name"] for o in config.get("output", [])]
        max_batch = int(config.get("max_batch_size", 0)) or None
        manifest = self._manifest(repo)
        if class_names is None:
            class_names = manifest.get("class_names") or self._postprocess_class_names()
        super().__init__(imgsz=dims[1] if dims[1] == dims[2] and dims[1] > 0 else None, class_names=class_names,
                         precision=self._precision(manifest), max_batch=max_batch,
                         has_saliency="saliency" in self.output_names)

    # -- server facts ---------------------------------------------------------------------------------------------
    def _ready(self, model: str) -> bool:
        try:
            return bool(self.client.is_model_ready(model))
        except self._errors:
            return False

    def _config(self, model: str) -> dict[str, Any]:
        if self.protocol == "http":
            return self.client.get_model_config(model)
        return self.client.get_model_config(model, as_json=True).get("config", {})

    def _postprocess_class_names(self) -> list[str]:
        if not self._ready(POSTPROCESS_MODEL):
            return []
        value = self._config(POSTPROCESS_MODEL).get("parameters", {}).get("class_names", {}).get("string_value")
        try:
            return [str(n) for n in json.loads(value)] if value else []
        except ValueError as err:
            raise RunnerError(f"Triton model {POSTPROCESS_MODEL!r}: parameter class_names {value!r} is not a JSON "
                              f"list ({err})") from err

    @staticmethod
    def _manifest(repo: str | Path | None) -> dict[str, Any]:
        if repo is None:
            return {}
        from sdconet.runtime.metadata import load_manifest

        return load_manifest(repo)

    def _precision(self, manifest: Mapping[str, Any]) -> str:
        """From the artifact the repository was built from: the engine's sidecar, else the ONNX metadata."""
        if manifest.get("source_engine"):
            from sdconet.runtime.metadata import read_engine_metadata

            found = read_engine_metadata(manifest["source_engine"]).get("precision")
            if found:
                return found
        if manifest.get("source_onnx") and Path(manifest["source_onnx"]).is_file():
            from sdconet.runtime.metadata import graph_precision, read_onnx_metadata

            import onnx

            model = onnx.load(manifest["source_onnx"], load_external_data=False)
            return read_onnx_metadata(model).get("precision") or graph_precision(model)
        return "unknown (pass repo= to read it from the repository manifest)"

    # -- the Runner interface -------------------------------------------------------------------------------------
    def _run(self, images: np.ndarray) -> Mapping[str, Any]:
        infer_input = self._module.InferInput(self.input_name, list(images.shape), "FP32")
        infer_input.set_data_from_numpy(images)
        outputs = [self._module.InferRequestedOutput(name) for name in self.output_names]
        kwargs = {"client_timeout": self._timeout} if self.protocol == "grpc" else {}
        try:
            result = self.client.infer(self.model, [infer_input], outputs=outputs, **kwargs)
        except self._errors as err:
            raise RunnerError(f"Triton {self.url} model {self.model!r}: inference failed: {err}") from err
        return {name: result.as_numpy(name) for name in self.output_names}

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"url": self.url, "protocol": self.protocol, "model": self.model}

    def close(self) -> None:
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            client.close()
