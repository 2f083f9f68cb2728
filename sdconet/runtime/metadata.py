"""What a deployment artifact says about itself, written by the exporter/builders and read by every runner: the
one place for these file formats.

* ONNX ``metadata_props`` (below);
* the TensorRT engine sidecar ``<engine>.json`` (e.g. ``model.fp16.plan.json``: :func:`read_engine_metadata`);
* the Triton repository manifest ``sdconet_repo.json`` (:func:`load_manifest`).

ONNX ``metadata_props``:

Keys (all strings, as ONNX stores them): ``sdconet.class_names`` (JSON list), ``sdconet.imgsz`` (int),
``sdconet.msda`` (``onnx`` for pure graphs, ``plugin`` / ``sdconet`` for plugin-node graphs), ``sdconet.outputs``
(JSON list of output names), ``sdconet.precision`` (``fp32`` | ``fp16`` | ``int8``) and ``sdconet.version`` (the
package version that wrote it).

ONNX files exported before these keys existed still open: :func:`onnx_model_info` takes what the graph itself says
(input size, outputs, custom nodes, Q/DQ nodes) and the class names from the export report (``<name>.report.json``)
the exporter wrote next to them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from sdconet.runtime.base import RunnerError
from sdconet.utils.io import write_text_atomically

PREFIX = "sdconet."
# operator domains ONNX Runtime runs itself; any other domain is one of our MSDA plugin nodes
ORT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
_JSON_KEYS = ("class_names", "outputs")
_INT_KEYS = ("imgsz",)
REEXPORT_HINT = ("re-export it with `python export/build_engine.py --checkpoint RUN` (the ONNX then carries its class "
                 "names), or pass class_names explicitly")


def write_onnx_metadata(model, *, class_names: Sequence[str], imgsz: int, msda: str, outputs: Sequence[str],
                        precision: str) -> Any:
    """Set the ``sdconet.*`` metadata_props of ``model`` (an ``onnx.ModelProto``, changed in place and returned).

    Existing ``sdconet.*`` entries are replaced; other tools' entries are kept.
    """
    from sdconet import __version__

    if not class_names or not all(isinstance(n, str) and n for n in class_names):
        raise ValueError(f"ONNX metadata: class_names must be a non-empty list of names, got {list(class_names)!r}")
    values = {"class_names": json.dumps(list(class_names), ensure_ascii=False), "imgsz": str(int(imgsz)),
              "msda": msda, "outputs": json.dumps(list(outputs)), "precision": precision, "version": __version__}
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for prop in kept:
        model.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in values.items():
        model.metadata_props.add(key=PREFIX + key, value=value)
    return model


def read_onnx_metadata(model) -> dict[str, Any]:
    """The ``sdconet.*`` metadata of ``model`` (path or ``onnx.ModelProto``) without the prefix, values parsed
    (lists, int); ``{}`` for an ONNX exported before the metadata existed. A malformed value names file and key."""
    import onnx

    where = "ONNX model" if isinstance(model, onnx.ModelProto) else str(model)
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    result: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith(PREFIX):
            continue
        key = prop.key[len(PREFIX):]
        try:
            result[key] = (json.loads(prop.value) if key in _JSON_KEYS else
                           int(prop.value) if key in _INT_KEYS else prop.value)
        except ValueError as err:
            raise RunnerError(f"{where}: metadata {prop.key}={prop.value!r} is malformed ({err})") from err
    return result


def graph_precision(model) -> str:
    """``int8`` when the graph has Q/DQ nodes, ``fp16`` when its float initializers are half, else ``fp32``."""
    import onnx

    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    halves = sum(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    floats = sum(init.data_type == onnx.TensorProto.FLOAT for init in model.graph.initializer)
    return "fp16" if halves > floats else "fp32"


def _static_input_size(model) -> int | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 4 and dims[2].HasField("dim_value") and dims[2].dim_value == dims[3].dim_value > 0:
        return int(dims[2].dim_value)
    return None


def _class_names_from_report(path: Path) -> list[str] | None:
    """Class names from the export report next to ``path`` that lists it as an artifact (or shares its stem)."""
    for report in sorted(path.parent.glob("*.report.json")):
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            continue
        listed = {Path(a.get("path", "")).name for a in data.get("artifacts", [])}
        if path.name not in listed and not path.name.startswith(report.name[:-len(".report.json")] + "."):
            continue
        names = (data.get("checkpoint", {}).get("meta") or {}).get("category_names")
        if names:
            return [str(n) for n in names]
    return None


def onnx_model_info(model, path: str | Path | None = None, class_names: Sequence[str] | None = None
                    ) -> dict[str, Any]:
    """Everything a runner needs about an exported detector: ``class_names, imgsz, msda, outputs, precision,
    version`` (``None`` when unknown), from the metadata, else the graph itself and the export report next to
    ``path``. ``class_names`` given by the caller win. Raises RunnerError naming the file when the class names
    cannot be found anywhere."""
    where = str(path) if path is not None else "ONNX model"
    info = read_onnx_metadata(model)
    info.setdefault("version", None)
    if "imgsz" not in info:
        info["imgsz"] = _static_input_size(model)
    if "outputs" not in info:
        info["outputs"] = [o.name for o in model.graph.output]
    if "msda" not in info:
        info["msda"] = "plugin" if any(n.domain not in ORT_DOMAINS for n in model.graph.node) else "onnx"
    if "precision" not in info:
        info["precision"] = graph_precision(model)
    if class_names:
        info["class_names"] = list(class_names)
    elif "class_names" not in info:
        names = _class_names_from_report(Path(path)) if path is not None else None
        if not names:
            raise RunnerError(f"{where} carries no sdconet.class_names metadata and no export report "
                              f"(<name>.report.json) with category names lies next to it: {REEXPORT_HINT}")
        info["class_names"] = names
    return info


# --------------------------------------------------------------------------------------------------------------------
# Engine metadata sidecar (<engine>.json, e.g. model.fp16.plan.json)
# --------------------------------------------------------------------------------------------------------------------
def engine_metadata_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_engine_metadata(engine_path: str | Path, metadata: dict) -> Path:
    text = json.dumps(metadata, indent=2, default=str) + "\n"
    return write_text_atomically(engine_metadata_path(engine_path), text)


def read_engine_metadata(engine_path: str | Path) -> dict:
    """The sidecar of ``engine_path``; ``{}`` when there is none (an engine built elsewhere, e.g. by trtexec).

    Keys runners read: ``precision`` (what the engine actually runs in), ``plugin_libs`` (libraries to load before
    deserializing), ``input_shapes`` (the profile), ``tensorrt_version``, ``gpu``.
    """
    path = engine_metadata_path(engine_path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------------------------
# Triton repository manifest (written by sdconet.serve.triton_repo.build_repository)
# --------------------------------------------------------------------------------------------------------------------
DETECTOR_MODELS = {"cpu": "detector_cpu", "onnx": "detector_onnx", "trt": "detector_trt"}  # by repository backend
MANIFEST_NAME = "sdconet_repo.json"


class RepositoryError(ValueError):
    """The repository cannot be built or does not match the model; the message names the file/field/value."""


def load_manifest(repo_dir: str | Path) -> dict:
    """The manifest a built repository carries; a clear error if ``repo_dir`` was not written by this builder."""
    path = Path(repo_dir) / MANIFEST_NAME
    if not path.is_file():
        raise RepositoryError(f"{repo_dir} has no {MANIFEST_NAME}: build it with sdconet.serve.triton_repo."
                              f"build_repository (export/build_engine.py --triton-repo)")
    return json.loads(path.read_text())
