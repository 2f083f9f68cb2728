"""Triton model repository builder: renders the templates in ``triton_repo/`` for one deployment.

A built repository holds exactly the models the chosen deployment needs, so the server loads it without errors::

    <repo>/preprocess/{config.pbtxt, 1/model.py, 1/sdconet_processing.py}     python backend
    <repo>/detector_<backend>/{config.pbtxt, 1/model.(py+onnx | onnx | plan)}
    <repo>/postprocess/{config.pbtxt, 1/model.py, 1/sdconet_processing.py}    python backend
    <repo>/sdconet/{config.pbtxt, 1/}                                          ensemble
    <repo>/sdconet_scene/{config.pbtxt, 1/model.py + sdconet_{tiling,merge,processing}.py}   whole scenes (BLS)
    <repo>/sdconet_repo.json                                                   manifest (read by the launcher)

Backends: ``cpu`` (python backend running ONNX Runtime, or OpenVINO with the fused MSDA op whose library is copied
into ``detector_cpu/1/`` -- ``RepositoryOptions.cpu_runtime``; works with the python-only server bundled in
``nvidia-pytriton``), ``onnx`` (Triton's ``onnxruntime_onnx``, GPU or CPU, optional TensorRT accelerator) and ``trt``
(``tensorrt_plan``). The detector's tensor signature is read from the exported ONNX (for ``trt``: the ONNX the engine
was built from) and every written config is parsed with Triton's own ``ModelConfig`` schema.
"""
from __future__ import annotations

import json
import shutil
import string
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from sdconet.runtime.base import DEFAULT_SCORE_THRESHOLD
from sdconet.runtime.metadata import (DETECTOR_MODELS, MANIFEST_NAME, ORT_DOMAINS, RepositoryError,  # noqa: F401
                                      load_manifest)
from sdconet.scene import merge as scene_merge, tiling as scene_tiling
from sdconet.serve import processing
from sdconet.serve.python_env import DETECTOR_CPU_MODULES, PREPROCESS_MODULES, inspect_python_env
from sdconet.utils.io import sha256_of
from sdconet.utils.logging import get_logger

log = get_logger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "triton_repo"
BACKENDS = ("cpu", "onnx", "trt")
DETECTOR_PLATFORMS = {"cpu": "python", "onnx": "onnxruntime_onnx", "trt": "tensorrt_plan"}
ENSEMBLE_MODEL = "sdconet"
SCENE_MODEL = "sdconet_scene"
PROCESSING_MODULE_NAME = "sdconet_processing.py"
# the pure-NumPy modules the scene model imports, copied next to its model.py under these names
SCENE_MODULES = {"sdconet_tiling.py": scene_tiling, "sdconet_merge.py": scene_merge,
                 PROCESSING_MODULE_NAME: processing}
DETECTOR_INPUT = "images"
# outputs the postprocess step consumes; further ONNX outputs (e.g. saliency) are declared but not wired
DETECTOR_OUTPUTS = {"boxes": "TYPE_FP32", "scores": "TYPE_FP32", "labels": "TYPE_INT32"}
# detector_cpu: its runtimes (model.py), their precisions and what each needs in the python models' environment
CPU_RUNTIMES = ("auto", "onnxruntime", "openvino")
CPU_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
CPU_RUNTIME_MODULES = {"onnxruntime": DETECTOR_CPU_MODULES, "openvino": ("numpy", "openvino")}
EXTENSION_NAME = "libsdconet_msda_ov.so"  # the fused MSDA op's library, copied into detector_cpu/1/
# the ONNX node kinds that library maps to its op (sdconet/kernels/cpu/openvino_extension.cpp)
OPENVINO_MSDA_OPS = ("trt.plugins::MultiscaleDeformableAttnPlugin_TRT", "sdconet::MultiscaleDeformableAttn")

_ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32",
                   7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}


@dataclass(frozen=True)
class TensorSpec:
    """A model input/output as Triton sees it: dims exclude the batch axis (-1 = dynamic)."""

    name: str
    data_type: str  # Triton name, e.g. "TYPE_FP32"
    dims: tuple[int, ...]

    def to_pbtxt(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        return f'  {{ name: "{self.name}" data_type: {self.data_type} dims: [ {dims} ] }}'


@dataclass(frozen=True)
class RepositoryOptions:
    """Tuning knobs of a built repository (the defaults suit a single CPU or GPU)."""

    detector_instances: int = 1  # instance_group count of the detector
    python_instances: int = 1  # instance_group count of preprocess / postprocess
    max_queue_delay_us: int = 1000  # dynamic batcher: how long a request may wait for others
    cpu_threads: int = 0  # threads of detector_cpu's runtime (0 = the runtime's default)
    # detector_cpu's runtime (docs/deployment.md): "onnxruntime", "openvino" (the cpu model: plugin-mode ONNX with the
    # fused MSDA op, pure ONNX or IR) or "auto" = openvino when the cpu model needs it (MSDA plugin nodes, an IR) or
    # bf16 is asked for, else onnxruntime
    cpu_runtime: str = "auto"
    cpu_precision: str = "fp32"  # "fp32" | "bf16" (openvino's hint; needs BF16 hardware) | "int8" (a quantized model)
    # openvino: the static batch sizes compiled at load (a batch is padded to the next); None = 1, 2, 4, ... max_batch
    cpu_batch_sizes: Optional[tuple[int, ...]] = None
    max_image_pixels: int = processing.DEFAULT_MAX_IMAGE_PIXELS  # preprocess refuses larger images
    onnx_device: str = "gpu"  # detector_onnx instance kind: "gpu" | "cpu"
    onnx_tensorrt: bool = False  # detector_onnx: TensorRT execution accelerator (GPU only)
    onnx_tensorrt_precision: str = "FP16"  # "FP32" | "FP16" | "INT8" (INT8 needs onnx_tensorrt_calibration_table)
    # where ONNX Runtime's TensorRT accelerator keeps built engines on the serving machine (so a restart does not
    # rebuild them); must be writable by the server
    onnx_tensorrt_cache_path: str = "/tmp/sdconet_ort_trt_cache"
    onnx_tensorrt_calibration_table: Optional[str] = None  # INT8 calibration table name, in the cache path
    warmup: bool = True  # model_warmup of the GPU detectors: batch 1 and max_batch before the model is READY
    # TensorRT plugin libraries the engine needs (--plugin-lib): recorded in the manifest, loaded by the launcher
    plugin_libs: tuple[str, ...] = ()
    # sdconet_scene (whole scenes, tiled on the server): instances (scenes in flight at once), tile overlap in
    # network-input pixels (None = the scene CLI's default), tiles per detector request (None = half of max_batch),
    # detector requests in flight per scene, the decoded-pixel limit, the tile limit per scene, a cap on detections
    # per scene (0 = none) and the merge rule across tiles (sdconet.scene.merge)
    scene_instances: int = 2
    scene_overlap: Optional[int] = None
    scene_tiles_per_request: Optional[int] = None
    scene_requests_in_flight: int = 4
    max_scene_pixels: int = processing.DEFAULT_MAX_IMAGE_PIXELS
    scene_max_tiles: int = 4096
    scene_max_detections: int = 0
    scene_merge_rule: str = scene_merge.DEFAULT_MERGE_RULE
    # EXECUTION_ENV_PATH of the python models: an environment with numpy < 2 (see sdconet.serve.python_env);
    # None = the server's own Python. It is checked here unless check_python_env is False (an env on another machine).
    python_env: Optional[str] = sys.prefix
    check_python_env: bool = True


def _pbtxt_string(text: str) -> str:
    """Escape for a double-quoted protobuf text-format string (UTF-8 passes through)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_model_config(path: str | Path):
    """Parse a ``config.pbtxt`` with Triton's schema -> ``tritonclient.grpc.model_config_pb2.ModelConfig``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(path)
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise RepositoryError(f"{path}: not a valid Triton model config: {err}") from err


def _spec_from_config(tensor) -> TensorSpec:
    from tritonclient.grpc import model_config_pb2

    return TensorSpec(tensor.name, model_config_pb2.DataType.Name(tensor.data_type), tuple(tensor.dims))


def read_onnx_signature(onnx_path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec], bool]:
    """(inputs, outputs, dynamic_batch) of an ONNX graph; dims exclude the batch axis, symbolic dims are -1."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def specs(values) -> tuple[list[TensorSpec], list[bool]]:
        out, batch_dynamic = [], []
        for value in values:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            if tensor_type.elem_type not in _ONNX_TO_TRITON:
                raise RepositoryError(f"{onnx_path}: tensor '{value.name}' has unsupported element type "
                                      f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}")
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim]
            if not dims:
                raise RepositoryError(f"{onnx_path}: tensor '{value.name}' has no batch axis (rank 0)")
            batch_dynamic.append(dims[0] == -1)
            out.append(TensorSpec(value.name, _ONNX_TO_TRITON[tensor_type.elem_type], tuple(dims[1:])))
        return out, batch_dynamic

    inputs, inputs_dynamic = specs(model.graph.input)
    outputs, outputs_dynamic = specs(model.graph.output)
    return inputs, outputs, all(inputs_dynamic + outputs_dynamic)


def _custom_ops(onnx_path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ORT_DOMAINS})


def _external_data_files(onnx_path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return sorted({entry.value for init in graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
                   for entry in init.external_data if entry.key == "location"})


def check_detector_signature(onnx_path: str | Path, imgsz: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Check the exported detector against the serving contract; return its (inputs, outputs) specs.

    Contract: input ``images`` float32 ``[B, 3, imgsz, imgsz]`` (dynamic B); outputs ``boxes`` ``[B, K, 4]`` float32,
    ``scores`` ``[B, K]`` float32, ``labels`` ``[B, K]`` int32, optionally more (e.g. ``saliency``).
    """
    inputs, outputs, dynamic_batch = read_onnx_signature(onnx_path)
    where = f"{onnx_path}"
    if not dynamic_batch:
        raise RepositoryError(f"{where}: every input/output needs a dynamic batch axis for Triton's dynamic batching; "
                              f"re-export with a dynamic batch dimension")
    if [spec.name for spec in inputs] != [DETECTOR_INPUT]:
        raise RepositoryError(f"{where}: expected exactly one input '{DETECTOR_INPUT}', got "
                              f"{[spec.name for spec in inputs]}")
    image = inputs[0]
    if image.data_type != "TYPE_FP32" or len(image.dims) != 3 or image.dims[0] != 3:
        raise RepositoryError(f"{where}: input '{DETECTOR_INPUT}' must be float32 [B, 3, H, W], got "
                              f"{image.data_type} {list(image.dims)}")
    if any(d not in (-1, imgsz) for d in image.dims[1:]):
        raise RepositoryError(f"{where}: input '{DETECTOR_INPUT}' is {image.dims[1]}x{image.dims[2]} but imgsz is "
                              f"{imgsz}")
    by_name = {spec.name: spec for spec in outputs}
    missing = [name for name in DETECTOR_OUTPUTS if name not in by_name]
    if missing:
        raise RepositoryError(f"{where}: missing output(s) {missing}; outputs are {list(by_name)}")
    for name, data_type in DETECTOR_OUTPUTS.items():
        if by_name[name].data_type != data_type:
            raise RepositoryError(f"{where}: output '{name}' is {by_name[name].data_type}, the contract says "
                                  f"{data_type}")
    num = by_name["boxes"].dims[0]
    if (by_name["boxes"].dims != (num, 4) or by_name["scores"].dims != (num,)
            or by_name["labels"].dims != (num,)):
        raise RepositoryError(f"{where}: expected boxes [B, K, 4], scores [B, K], labels [B, K]; got "
                              f"{[list(by_name[n].dims) for n in DETECTOR_OUTPUTS]} (batch axis omitted)")
    # the config names the engine size even where the ONNX left H/W symbolic
    inputs = [TensorSpec(DETECTOR_INPUT, "TYPE_FP32", (3, imgsz, imgsz))]
    return inputs, outputs


def check_config_against_onnx(config_path: str | Path, onnx_path: str | Path) -> None:
    """Structural check of a detector ``config.pbtxt`` against the ONNX (names, dtypes, dims, batch).

    The batch axis must be dynamic in the ONNX and ``max_batch_size`` > 0; each config tensor must exist in the ONNX
    with the same data type and dims (an ONNX -1 admits any config value); every ONNX output must be declared.
    """
    config = parse_model_config(config_path)
    inputs, outputs, dynamic_batch = read_onnx_signature(onnx_path)
    problems = []
    if config.max_batch_size <= 0 or not dynamic_batch:
        problems.append(f"batching: max_batch_size={config.max_batch_size}, ONNX dynamic batch={dynamic_batch}")
    for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
        actual_by_name = {spec.name: spec for spec in actual}
        declared_specs = [_spec_from_config(tensor) for tensor in declared]
        for spec in declared_specs:
            model_spec = actual_by_name.get(spec.name)
            if model_spec is None:
                problems.append(f"{kind} '{spec.name}' is not in the ONNX ({list(actual_by_name)})")
                continue
            if spec.data_type != model_spec.data_type:
                problems.append(f"{kind} '{spec.name}': config {spec.data_type}, ONNX {model_spec.data_type}")
            if len(spec.dims) != len(model_spec.dims) or any(
                    m not in (-1, c) for c, m in zip(spec.dims, model_spec.dims)):
                problems.append(f"{kind} '{spec.name}': config dims {list(spec.dims)}, ONNX dims "
                                f"{list(model_spec.dims)} (batch axis omitted)")
        undeclared = sorted(set(actual_by_name) - {spec.name for spec in declared_specs})
        if undeclared:
            problems.append(f"ONNX {kind}(s) {undeclared} are not declared in the config")
    if problems:
        raise RepositoryError(f"{config_path} does not match {onnx_path}: " + "; ".join(problems))


def _render(template: Path, values: dict[str, object]) -> str:
    try:
        return string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})
    except KeyError as err:
        raise RepositoryError(f"{template}: placeholder {err} has no value") from err


def _onnx_optimization(options: RepositoryOptions) -> str:
    if not options.onnx_tensorrt:
        return ""
    if options.onnx_device != "gpu":
        raise RepositoryError("onnx_tensorrt needs onnx_device='gpu' (TensorRT is a GPU execution accelerator)")
    if options.onnx_tensorrt_precision == "INT8" and not options.onnx_tensorrt_calibration_table:
        raise RepositoryError("onnx_tensorrt_precision INT8 needs onnx_tensorrt_calibration_table: ONNX Runtime's "
                              "TensorRT accelerator quantizes implicitly from a calibration table and has none here; "
                              "serve the Q/DQ ONNX with FP16, or a TensorRT INT8 engine with backend 'trt'")
    parameters = {"precision_mode": options.onnx_tensorrt_precision, "trt_engine_cache_enable": "1",
                  "trt_engine_cache_path": options.onnx_tensorrt_cache_path}
    if options.onnx_tensorrt_calibration_table:
        parameters["int8_calibration_table_name"] = options.onnx_tensorrt_calibration_table
    lines = "".join(f'  parameters {{ key: "{key}" value: "{_pbtxt_string(str(value))}" }}\n'
                    for key, value in parameters.items())
    return ("optimization { execution_accelerators { gpu_execution_accelerator: [ {\n"
            '  name: "tensorrt"\n' + lines + "} ] } }")


def _detector_warmup(options: RepositoryOptions, inputs: Sequence[TensorSpec], max_batch: int) -> str:
    """``model_warmup`` of a GPU detector: random inputs at batch 1 and ``max_batch``, so the first client request
    does not pay for CUDA context, kernel selection (TensorRT) or accelerator engine builds (ONNX Runtime)."""
    if not options.warmup:
        return ""
    entries = []
    for batch in sorted({1, max_batch}):
        tensors = " ".join(f'inputs {{ key: "{spec.name}" value: {{ data_type: {spec.data_type} dims: '
                           f'[ {", ".join(str(d) for d in spec.dims)} ] random_data: true }} }}' for spec in inputs)
        entries.append(f'  {{ name: "random_batch{batch}" batch_size: {batch} {tensors} }}')
    return "model_warmup [\n" + ",\n".join(entries) + "\n]"


@dataclass(frozen=True)
class CPUDetector:
    """What ``detector_cpu`` runs, resolved when the repository is built (the manifest's ``cpu_runtime``)."""

    runtime: str  # "onnxruntime" | "openvino"
    precision: str
    model: Path  # the source model: ONNX, or OpenVINO IR .xml (its .bin next to it)
    model_file: str  # its name in detector_cpu/1/
    extension: Optional[Path] = None  # the fused MSDA op's library (plugin-mode models), copied next to the model
    openvino_version: str = ""  # the OpenVINO the extension was built against
    batch_sizes: tuple[int, ...] = ()  # openvino: static batch sizes compiled at load

    def manifest(self) -> dict:
        return {"runtime": self.runtime, "precision": self.precision, "source_model": str(self.model.resolve()),
                "model_file": self.model_file, "extension": EXTENSION_NAME if self.extension else None,
                "openvino_version": self.openvino_version or None, "batch_sizes": list(self.batch_sizes)}


def _is_quantized_onnx(path: Path) -> bool:
    import onnx

    from sdconet.runtime.metadata import graph_precision, read_onnx_metadata

    if read_onnx_metadata(path).get("precision") == "int8":
        return True
    return graph_precision(onnx.load(str(path), load_external_data=False)) == "int8"  # Q/DQ nodes


def resolve_cpu_detector(onnx_path: Path, cpu_model: Optional[Path], max_batch: int,
                         options: RepositoryOptions) -> CPUDetector:
    """Pick and check ``detector_cpu``'s runtime for ``cpu_model`` (default: ``onnx_path``): see
    ``RepositoryOptions.cpu_runtime``. Raises RepositoryError naming the model/option/value that cannot serve."""
    from sdconet.runtime.openvino_runner import _IR_CUSTOM_OPSET

    model = Path(cpu_model) if cpu_model is not None else onnx_path
    if not model.is_file():
        raise RepositoryError(f"cpu_model {model}: file not found")
    if options.cpu_runtime not in CPU_RUNTIMES:
        raise RepositoryError(f"cpu_runtime must be one of {CPU_RUNTIMES}, got {options.cpu_runtime!r}")
    if model.suffix == ".xml":
        if not model.with_suffix(".bin").is_file():
            raise RepositoryError(f"cpu_model {model}: an OpenVINO IR needs its weights {model.with_suffix('.bin')}")
        text = model.read_text(errors="ignore")
        is_ir, custom, quantized, needs_extension = True, [], "FakeQuantize" in text, _IR_CUSTOM_OPSET in text
    elif model.suffix == ".onnx":
        custom = _custom_ops(model)
        is_ir, quantized, needs_extension = False, _is_quantized_onnx(model), bool(custom)
    else:
        raise RepositoryError(f"cpu_model {model}: expected an ONNX (.onnx) or an OpenVINO IR (.xml)")
    runtime = options.cpu_runtime
    if runtime == "auto":
        runtime = "openvino" if needs_extension or is_ir or options.cpu_precision == "bf16" else "onnxruntime"
    precision = options.cpu_precision
    if precision not in CPU_PRECISIONS[runtime]:
        hint = "; ONNX Runtime's CPU provider has no bf16 path: use cpu_runtime 'openvino'" if precision == "bf16" \
            else ""
        raise RepositoryError(f"cpu_precision must be one of {CPU_PRECISIONS[runtime]} for cpu_runtime '{runtime}', "
                              f"got {precision!r}{hint}")
    if (precision == "int8") != quantized:
        raise RepositoryError(f"cpu_precision {precision!r} but {model} is " + (
            "quantized (INT8): use cpu_precision 'int8'" if quantized else
            "not quantized: int8 needs the CPU quantizer's model (sdconet.deploy.cpu_quantize) as cpu_model"))
    if runtime == "onnxruntime":
        if is_ir:
            raise RepositoryError(f"cpu_model {model} is an OpenVINO IR; ONNX Runtime cannot run it: use "
                                  f"cpu_runtime 'openvino'")
        if custom:
            raise RepositoryError(f"{model} contains custom operator(s) {custom} that ONNX Runtime cannot run "
                                  f"(TensorRT plugin nodes?); serve the pure-ONNX export with backend 'cpu', or use "
                                  f"cpu_runtime 'openvino' (the fused MSDA op)")
        return CPUDetector("onnxruntime", precision, model, "model.onnx")
    unknown = [op for op in custom if op not in OPENVINO_MSDA_OPS]
    if unknown:
        raise RepositoryError(f"{model} contains custom operator(s) {unknown} that OpenVINO cannot run (the fused "
                              f"MSDA extension maps {list(OPENVINO_MSDA_OPS)} only)")
    try:
        import openvino
    except ImportError as err:
        raise RepositoryError(f"cpu_runtime 'openvino' needs the openvino package where the repository is built "
                              f"({err}); pip install 'sdconet[cpu]', or use cpu_runtime 'onnxruntime'") from err
    extension = None
    if needs_extension:
        from sdconet.kernels.cpu import KernelBuildError, extension_path

        try:
            extension = extension_path()
        except KernelBuildError as err:
            raise RepositoryError(f"{model} has MSDA plugin nodes, which need the fused CPU kernel: {err}") from err
    if options.cpu_batch_sizes:
        sizes = tuple(sorted(set(int(s) for s in options.cpu_batch_sizes)))
    else:
        sizes = tuple(sorted({2 ** i for i in range(max_batch.bit_length()) if 2 ** i < max_batch} | {max_batch}))
    if sizes[0] < 1 or sizes[-1] != max_batch:
        raise RepositoryError(f"cpu_batch_sizes must be in [1, max_batch={max_batch}] and include max_batch, got "
                              f"{list(options.cpu_batch_sizes or ())}")
    return CPUDetector("openvino", precision, model, "model.xml" if is_ir else "model.onnx", extension,
                       openvino.get_version(), sizes)


def _copy_model(source: Path, target: Path) -> None:
    """Copy an ONNX with its external-data files, or an OpenVINO IR ``.xml`` with its ``.bin``, to ``target``."""
    shutil.copy2(source, target)
    if source.suffix == ".xml":
        shutil.copy2(source.with_suffix(".bin"), target.with_suffix(".bin"))
        return
    for name in _external_data_files(source):
        (target.parent / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.parent / name, target.parent / name)


def _checked_plugin_libs(plugin_libs: Sequence[str]) -> list[str]:
    """Absolute plugin library paths; a comma would split Triton's ``--backend-config`` value, so it is refused."""
    paths = []
    for lib in plugin_libs:
        path = Path(lib)
        if not path.is_file():
            raise RepositoryError(f"plugin library {lib}: file not found")
        if "," in str(path.resolve()) or ";" in str(path.resolve()):
            raise RepositoryError(f"plugin library {lib}: a ',' or ';' in the path cannot be passed to Triton's "
                                  f"--backend-config=tensorrt,plugins=...")
        paths.append(str(path.resolve()))
    return paths


def _check_arguments(backend: str, imgsz: int, max_batch: int, class_names: Sequence[str], score_threshold: float,
                     onnx_path: Optional[Path], engine_path: Optional[Path], options: RepositoryOptions) -> None:
    if backend not in BACKENDS:
        raise RepositoryError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if imgsz <= 0 or max_batch <= 0:
        raise RepositoryError(f"imgsz and max_batch must be positive, got imgsz={imgsz}, max_batch={max_batch}")
    if not class_names or not all(isinstance(n, str) and n for n in class_names):
        raise RepositoryError(f"class_names must be a non-empty list of non-empty strings, got {class_names!r}")
    if not 0.0 <= score_threshold <= 1.0:
        raise RepositoryError(f"score_threshold must be in [0, 1], got {score_threshold}")
    if onnx_path is None or not onnx_path.is_file():
        raise RepositoryError(f"onnx_path must name the exported detector ONNX (for backend 'trt': the ONNX the "
                              f"engine was built from, for its tensor signature), got {onnx_path}")
    if backend == "trt" and (engine_path is None or not engine_path.is_file()):
        raise RepositoryError(f"backend 'trt' needs engine_path, a TensorRT engine file; got {engine_path}")
    if options.onnx_device not in ("gpu", "cpu"):
        raise RepositoryError(f"onnx_device must be 'gpu' or 'cpu', got {options.onnx_device!r}")
    if options.onnx_tensorrt_precision not in ("FP32", "FP16", "INT8"):
        raise RepositoryError(f"onnx_tensorrt_precision must be FP32/FP16/INT8, got {options.onnx_tensorrt_precision}")
    for name in ("detector_instances", "python_instances", "max_image_pixels", "scene_instances",
                 "scene_requests_in_flight", "max_scene_pixels", "scene_max_tiles"):
        if getattr(options, name) <= 0:
            raise RepositoryError(f"{name} must be positive, got {getattr(options, name)}")
    if options.scene_overlap is not None and not 0 <= options.scene_overlap < imgsz:
        raise RepositoryError(f"scene_overlap must be in [0, imgsz={imgsz}), got {options.scene_overlap}")
    if options.scene_tiles_per_request is not None and not 1 <= options.scene_tiles_per_request <= max_batch:
        raise RepositoryError(f"scene_tiles_per_request must be in [1, max_batch={max_batch}], got "
                              f"{options.scene_tiles_per_request}")
    if options.scene_max_detections < 0:
        raise RepositoryError(f"scene_max_detections must be >= 0 (0 = no cap), got {options.scene_max_detections}")
    if options.scene_merge_rule not in scene_merge.MERGE_RULES:
        raise RepositoryError(f"scene_merge_rule must be one of {scene_merge.MERGE_RULES}, got "
                              f"{options.scene_merge_rule!r}")
    if not TEMPLATE_DIR.is_dir():
        raise RepositoryError(f"template directory {TEMPLATE_DIR} is missing (run from a source checkout)")


def _prepare_target(repo_dir: Path) -> None:
    if repo_dir.resolve() == TEMPLATE_DIR:
        raise RepositoryError(f"{repo_dir} is the template directory; build into another one, e.g. "
                              f"engines/triton_repo")
    if repo_dir.exists() and any(repo_dir.iterdir()) and not (repo_dir / MANIFEST_NAME).is_file():
        raise RepositoryError(f"{repo_dir} exists, is not empty and was not written by this builder (no "
                              f"{MANIFEST_NAME}); refusing to overwrite it")


def build_repository(repo_dir: str | Path, *, onnx_path: str | Path | None = None,
                     engine_path: str | Path | None = None, backend: str, imgsz: int, max_batch: int,
                     class_names: Sequence[str] | None = None, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                     options: RepositoryOptions | None = None, cpu_model: str | Path | None = None,
                     gate: dict | None = None, allow_failed_gate: bool = False) -> Path:
    """Write a Triton model repository for one deployment (``backend`` = ``cpu`` | ``onnx`` | ``trt``).

    ``onnx_path`` is the exported pure-ONNX detector (always needed: its tensor signature drives the detector config;
    copied for ``onnx``, and for ``cpu`` unless ``cpu_model`` is given), ``engine_path`` the TensorRT engine for
    ``trt``. ``cpu_model`` is what ``detector_cpu`` runs instead (``cpu`` only): the plugin-mode ONNX for OpenVINO's
    fused MSDA op, or a CPU INT8 model (``options.cpu_runtime`` / ``cpu_precision``). A previous repository written by this
    builder at ``repo_dir`` is replaced as a whole (so switching backend leaves no stale model behind).
    ``class_names`` default to the ONNX's ``sdconet.class_names`` metadata. ``gate``: the accuracy gate of the
    served model (``{"key", "passed", "reasons", ...}``, see :func:`sdconet.deploy.accuracy.accuracy_gate`); a
    failed one is refused unless ``allow_failed_gate``, and the manifest records it. Returns ``repo_dir``.
    """
    options = options or RepositoryOptions()
    if gate is not None and gate.get("passed") is False and not allow_failed_gate:
        raise RepositoryError(f"refusing to serve a model whose accuracy gate ({gate.get('key')}) failed: "
                              f"{'; '.join(gate.get('reasons') or ['no reason recorded'])} (allow_failed_gate / "
                              f"--allow-failed-gate serves it anyway)")
    repo_dir = Path(repo_dir)
    onnx_path = Path(onnx_path) if onnx_path is not None else None
    engine_path = Path(engine_path) if engine_path is not None else None
    if class_names is None and onnx_path is not None and onnx_path.is_file():
        from sdconet.runtime.metadata import read_onnx_metadata

        class_names = read_onnx_metadata(onnx_path).get("class_names")  # None for an ONNX exported before it
    _check_arguments(backend, imgsz, max_batch, class_names, score_threshold, onnx_path, engine_path, options)
    _prepare_target(repo_dir)
    if options.plugin_libs and backend != "trt":
        raise RepositoryError(f"plugin libraries {list(options.plugin_libs)} are for TensorRT engines; backend "
                              f"'{backend}' does not load them")
    plugin_libs = _checked_plugin_libs(options.plugin_libs)

    inputs, outputs = check_detector_signature(onnx_path, imgsz)
    if cpu_model is not None and backend != "cpu":
        raise RepositoryError(f"cpu_model {cpu_model} is the model of detector_cpu; backend '{backend}' serves "
                              f"{'the engine' if backend == 'trt' else 'onnx_path'}")
    cpu = resolve_cpu_detector(onnx_path, cpu_model and Path(cpu_model), max_batch, options) \
        if backend == "cpu" else None
    if backend in ("cpu", "onnx"):
        custom = _custom_ops(onnx_path)
        if custom:
            raise RepositoryError(f"{onnx_path} contains custom operator(s) {custom} that ONNX Runtime cannot run "
                                  f"(TensorRT plugin nodes?); serve the pure-ONNX export with backend '{backend}'")
    execution_env = ""
    python_env_version = None
    if options.python_env is not None:
        if options.check_python_env:
            modules = PREPROCESS_MODULES + (CPU_RUNTIME_MODULES[cpu.runtime] if cpu is not None else ())
            python_env_version = inspect_python_env(options.python_env, modules).version
        execution_env = (f'parameters {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: '
                         f'"{_pbtxt_string(str(options.python_env))}" }} }}')

    detector = DETECTOR_MODELS[backend]
    # the identity of what the detector runs (engine, cpu model or ONNX): in the manifest and the scene model's
    # parameters, so a client's resume marker can tell two deployments of different weights apart
    artifact = engine_path if backend == "trt" else (cpu.model if cpu is not None else onnx_path)
    detector_sha256 = sha256_of(artifact)
    num_detections = next(spec for spec in outputs if spec.name == "boxes").dims[0]
    values = {
        "max_batch_size": max_batch, "imgsz": imgsz, "num_detections": num_detections,
        "max_queue_delay_us": options.max_queue_delay_us, "python_instances": options.python_instances,
        "detector_instances": options.detector_instances, "cpu_threads": options.cpu_threads,
        "max_image_pixels": options.max_image_pixels, "score_threshold": repr(float(score_threshold)),
        "class_names": _pbtxt_string(json.dumps(list(class_names), ensure_ascii=False)),
        "execution_env": execution_env, "detector": detector,
        "detector_inputs": ",\n".join(spec.to_pbtxt() for spec in inputs),
        "detector_outputs": ",\n".join(spec.to_pbtxt() for spec in outputs),
        "onnx_instance_kind": "KIND_GPU" if options.onnx_device == "gpu" else "KIND_CPU",
        "onnx_optimization": _onnx_optimization(options) if backend == "onnx" else "",
        "detector_warmup": _detector_warmup(options, inputs, max_batch) if backend in ("onnx", "trt") else "",
        "scene_instances": options.scene_instances, "scene_overlap": scene_overlap(options, imgsz),
        "scene_tiles_per_request": options.scene_tiles_per_request or max(1, max_batch // 2),
        "scene_requests_in_flight": options.scene_requests_in_flight, "max_scene_pixels": options.max_scene_pixels,
        "scene_max_tiles": options.scene_max_tiles, "scene_max_detections": options.scene_max_detections,
        "scene_merge_rule": options.scene_merge_rule, "detector_sha256": detector_sha256,
        "cpu_runtime": cpu.runtime if cpu else "", "cpu_model_file": cpu.model_file if cpu else "",
        "cpu_precision": cpu.precision if cpu else "", "cpu_openvino_version": cpu.openvino_version if cpu else "",
        "cpu_extension": EXTENSION_NAME if cpu and cpu.extension else "",
        "cpu_batch_sizes": ",".join(str(s) for s in cpu.batch_sizes) if cpu else "",
    }

    repo_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repo_dir.name}.", dir=repo_dir.parent))
    try:
        for model in ("preprocess", detector, "postprocess", ENSEMBLE_MODEL, SCENE_MODEL):
            version_dir = staging / model / "1"
            version_dir.mkdir(parents=True)
            config_path = staging / model / "config.pbtxt"
            config_path.write_text(_render(TEMPLATE_DIR / model / "config.pbtxt.in", values))
            parsed = parse_model_config(config_path)
            if parsed.name != model:
                raise RepositoryError(f"{config_path}: name is '{parsed.name}', expected '{model}'")
            if (TEMPLATE_DIR / model / "model.py").is_file():
                shutil.copy2(TEMPLATE_DIR / model / "model.py", version_dir / "model.py")
            if model in ("preprocess", "postprocess"):
                shutil.copy2(processing.__file__, version_dir / PROCESSING_MODULE_NAME)
            if model == SCENE_MODEL:
                for name, module in SCENE_MODULES.items():
                    shutil.copy2(module.__file__, version_dir / name)
        detector_dir = staging / detector / "1"
        if backend == "trt":
            shutil.copy2(engine_path, detector_dir / "model.plan")
        elif cpu is not None:
            _copy_model(cpu.model, detector_dir / cpu.model_file)
            if cpu.model.suffix == ".onnx" and cpu.model != onnx_path:
                check_config_against_onnx(staging / detector / "config.pbtxt", cpu.model)
        else:
            _copy_model(onnx_path, detector_dir / "model.onnx")
        if cpu is not None and cpu.extension is not None:
            shutil.copy2(cpu.extension, detector_dir / EXTENSION_NAME)
        check_config_against_onnx(staging / detector / "config.pbtxt", onnx_path)
        manifest = {
            "backend": backend, "ensemble": ENSEMBLE_MODEL, "detector": detector, "scene_model": SCENE_MODEL,
            "models": ["preprocess", detector, "postprocess", ENSEMBLE_MODEL, SCENE_MODEL],
            "imgsz": imgsz, "max_batch": max_batch, "num_detections": num_detections,
            "class_names": list(class_names), "score_threshold": float(score_threshold),
            "source_onnx": str(onnx_path.resolve()),
            "source_engine": str(engine_path.resolve()) if engine_path is not None else None,
            "detector_artifact": {"file": str(Path(artifact).resolve()), "sha256": detector_sha256},
            "python_env_version": python_env_version, "plugin_libs": plugin_libs, "options": asdict(options),
            "cpu_runtime": cpu.manifest() if cpu is not None else None,
            "accuracy_gate": (None if gate is None else dict(gate) | {"allowed_failed": bool(
                gate.get("passed") is False and allow_failed_gate)}),
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if repo_dir.exists():
            shutil.rmtree(repo_dir)
        staging.rename(repo_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("Triton repository for backend '%s' written to %s (models: preprocess, %s, postprocess, %s, %s)",
             backend, repo_dir, detector, ENSEMBLE_MODEL, SCENE_MODEL)
    return repo_dir


def scene_overlap(options: RepositoryOptions, imgsz: int) -> int:
    """Tile overlap of ``sdconet_scene`` in network-input pixels: the option, or the scene core's default."""
    from sdconet.scene.core import DEFAULT_OVERLAP

    return options.scene_overlap if options.scene_overlap is not None else min(DEFAULT_OVERLAP, imgsz // 2)


