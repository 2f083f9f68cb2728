"""INT8 for CPU runtimes, made by each runtime's own quantizer (issue 13 item 3); one function per quantizer.

``int8`` on a CPU backend means one of these models; the TensorRT-oriented ModelOpt Q/DQ graph
(:mod:`sdconet.deploy.quantize`) is labelled ``int8-qdq`` in benchmarks and stays for TensorRT.

* :func:`quantize_onnxruntime_int8` — ONNX Runtime ``quantize_static`` in QDQ format, the options its documentation
  gives for x86: signed int8 activations and weights (S8S8, its recommended default for QDQ), per-channel weights,
  ``reduce_range`` (7-bit weights) only on CPUs without VNNI (AVX2 / AVX-512 without VNNI can saturate the u8·s8
  multiply-add), only the compute ops (Conv, MatMul with a constant weight, Gemm) quantized so that ONNX Runtime
  fuses each Q/DQ pair into an integer kernel instead of running ~3000 extra Q/DQ nodes.
* :func:`quantize_openvino_int8` — NNCF post-training quantization of the OpenVINO model (``nncf.quantize`` with a
  calibration ``nncf.Dataset``, transformer model type), written as OpenVINO IR (``.xml`` + ``.bin``). Given the
  plugin-mode ONNX (the default of the exporter and the benchmark), the model is read by an ``ov.Core`` holding the
  fused MSDA extension (:mod:`sdconet.kernels.cpu`): NNCF quantizes the MatMuls and convolutions and leaves the
  fused op (``sdconet::MultiscaleDeformableAttn``) in fp32, so the INT8 IR keeps the ~1 op per attention layer
  instead of the ~3000-node gather graph of the pure ONNX. On CPUs without VNNI every layer gets 7-bit weights
  (NNCF's overflow fix), as ONNX Runtime's ``reduce_range`` does: the AVX2 u8 x s8 multiply-add saturates otherwise
  (detection agreement 0.57 -> 0.87 on the demo checkpoint, docs/cpu-runtime.md).

Both calibrate on LR images of the training split (:func:`sdconet.deploy.quantize.calibration_images`), never on
random tensors, and leave MSDA in float (the pure graph's ``msda_onnx<i>/...`` subgraphs, or the fused op): its
location and index arithmetic must stay exact (see :mod:`sdconet.ops.msda`), and a sampled value is a 4-corner
weighted sum that INT8 buys nothing for.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from sdconet.deploy.layer_groups import COMPUTE_OPS, matching_nodes, name_compute_nodes
from sdconet.deploy.msda_plugin import MSDA_EXCLUDE_PATTERN, TRT_PLUGIN_OP_TYPE
from sdconet.kernels.cpu import fused_cpu_kernel_ready
from sdconet.kernels.trt_plugin import SDCONET_MSDA_OP_TYPE
from sdconet.utils.logging import get_logger
from sdconet.utils.cpu import has_int8_dot

LOG = get_logger(__name__)

ORT_INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")
ORT_CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class CPUQuantizationError(RuntimeError):
    """A CPU quantizer is missing or failed; the message names the tool and the artifact."""


def msda_node_names(model) -> list[str]:
    """Names of the nodes of the pure graph's MSDA subgraphs (excluded from every quantizer)."""
    pattern = re.compile(MSDA_EXCLUDE_PATTERN)
    return [node.name for node in model.graph.node if pattern.fullmatch(node.name)]


def _check_calibration(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"calibration images must be [N >= 1, 3, S, S], got shape {list(images.shape)}")
    # bicubic LR images overshoot [0, 1] a little: only the type and finiteness are checked
    if images.dtype != np.float32 or not np.isfinite(images).all():
        raise ValueError(f"calibration images must be finite float32 (dataset LR images), got {images.dtype}")
    return np.ascontiguousarray(images)


def _batches(images: np.ndarray) -> Iterator[np.ndarray]:
    for index in range(images.shape[0]):
        yield images[index:index + 1]


# ----------------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------------------------
def quantize_onnxruntime_int8(onnx_path: str | Path, output_path: str | Path, calibration: np.ndarray, *,
                              input_name: str = "images", activation_type: str = "int8",
                              per_channel: bool = True, reduce_range: bool | None = None,
                              calibration_method: str = "minmax", preprocess: bool = True,
                              exclude: Sequence[str] = ()) -> dict:
    """Static QDQ INT8 model of the pure graph ``onnx_path`` for ONNX Runtime CPU.

    ``calibration`` ``[N, 3, S, S]`` float32 (about [0, 1]): training-split LR images, fed one by one.
    ``activation_type`` ``int8`` (S8S8) or ``uint8`` (U8S8); weights are always int8. ``reduce_range=None`` picks
    7-bit weights exactly when the CPU has no VNNI. ``preprocess`` runs ONNX Runtime's recommended
    ``quant_pre_process`` (shape inference + graph optimisation) first. ``exclude``: node-name regexes kept in float
    (``--int8-exclude``; matched after pre-processing, whose fused nodes are renamed after their module as in the
    export). Returns a summary for the export report.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibration_method not in methods:
        raise ValueError(f"calibration_method must be one of {', '.join(methods)}, got {calibration_method!r}")
    activation_types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if activation_type not in activation_types:
        raise ValueError(f"activation_type must be int8 or uint8, got {activation_type!r}")
    images = _check_calibration(calibration)
    vnni = has_int8_dot()
    reduce_range = (not vnni) if reduce_range is None else reduce_range
    onnx_path, output_path = Path(onnx_path), Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._iter = _batches(images)

        def get_next(self):
            batch = next(self._iter, None)
            return None if batch is None else {input_name: batch}

    start = time.perf_counter()
    source: Path | onnx.ModelProto = onnx_path
    if preprocess:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        prepared = output_path.with_name(output_path.stem + ".prep.onnx")
        try:
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
            prepared_model = onnx.load(str(prepared))
            if name_compute_nodes(prepared_model):
                onnx.save(prepared_model, str(prepared))
            source = prepared
        except Exception as err:  # the optimiser may reject a graph; quantizing the unprocessed one is still valid
            LOG.warning("ONNX Runtime quant_pre_process failed on %s (%s): quantizing without it", onnx_path, err)
            preprocess = False
    source_model = onnx.load(str(source))
    excluded = msda_node_names(source_model)  # names after pre-processing
    user_excluded = matching_nodes(source_model, list(exclude), COMPUTE_OPS)
    excluded += user_excluded
    try:
        quantize_static(str(source), str(output_path), _Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(ORT_INT8_OP_TYPES), per_channel=per_channel,
                        reduce_range=reduce_range, activation_type=activation_types[activation_type],
                        weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                        calibrate_method=methods[calibration_method],
                        # attention's activation x activation MatMuls stay float: only weights are worth int8
                        extra_options={"MatMulConstBOnly": True})
    except Exception as err:
        raise CPUQuantizationError(f"ONNX Runtime quantize_static failed on {onnx_path}: {err}") from err
    finally:
        if preprocess and isinstance(source, Path) and source != onnx_path:
            source.unlink(missing_ok=True)
    quantized = onnx.load(str(output_path))
    # keep the source's sdconet.* metadata (class names, size, ...) so runners open the artifact like its source
    metadata = {prop.key: prop.value for prop in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    if metadata:
        metadata["sdconet.precision"] = "int8"
        onnx.helper.set_model_props(quantized, metadata)
        onnx.save(quantized, str(output_path))
    dq_nodes = sum(node.op_type == "DequantizeLinear" for node in quantized.graph.node)
    if not dq_nodes:
        raise CPUQuantizationError(f"ONNX Runtime wrote {output_path} without any DequantizeLinear node")
    quantized_msda = [n.name for n in quantized.graph.node if n.op_type == "QuantizeLinear"
                      and re.fullmatch(MSDA_EXCLUDE_PATTERN, n.name)]
    if quantized_msda:
        raise CPUQuantizationError(f"{output_path}: MSDA nodes were quantized ({quantized_msda[:3]})")
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "activation_type": activation_type, "weight_type": "int8", "per_channel": per_channel,
            "reduce_range": reduce_range, "cpu_vnni": vnni, "op_types": list(ORT_INT8_OP_TYPES),
            "calibration_method": calibration_method, "calibration_images": int(images.shape[0]),
            "preprocessed": preprocess, "excluded_nodes": len(excluded), "exclude": list(exclude),
            "excluded_compute_nodes": user_excluded, "dequantize_linear": dq_nodes,
            "quantize_linear": sum(node.op_type == "QuantizeLinear" for node in quantized.graph.node),
            "seconds": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------------------------------------------
# OpenVINO (NNCF)
# ----------------------------------------------------------------------------------------------------------------
# ONNX op types of the MSDA plugin nodes (TensorRT's built-in plugin, our own) that the fused CPU extension maps
MSDA_PLUGIN_OP_TYPES = (TRT_PLUGIN_OP_TYPE, SDCONET_MSDA_OP_TYPE)
FUSED_MSDA_OV_TYPE = "MultiscaleDeformableAttn"  # the extension's op (opset "sdconet") in the OpenVINO model


def has_msda_plugin_nodes(onnx_path: str | Path) -> bool:
    """Whether the ONNX at ``onnx_path`` is plugin-mode (MSDA as one custom node per attention layer)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.op_type in MSDA_PLUGIN_OP_TYPES for node in model.graph.node)


def msda_projection_names(model, max_depth: int = 12) -> list[str]:
    """Friendly names of the MatMuls that compute the fused MSDA ops' ``sampling_locations`` (input 3) and
    ``attention_weights`` (input 4) of an OpenVINO ``model``: the first MatMul on each path back from those inputs
    (through reshapes, softmax and the reference-point arithmetic), at most ``max_depth`` nodes away."""
    names: list[str] = []
    for op in model.get_ops():
        if op.get_type_name() != FUSED_MSDA_OV_TYPE:
            continue
        stack = [(op.input(i).get_source_output().get_node(), 0) for i in (3, 4)]
        seen: set[str] = set()
        while stack:
            node, depth = stack.pop()
            name = node.get_friendly_name()
            if name in seen or depth > max_depth or node.get_type_name() in ("Constant", "Parameter"):
                continue
            seen.add(name)
            if node.get_type_name() == "MatMul":
                names.append(name)
                continue
            stack.extend((v.get_source_output().get_node(), depth + 1) for v in node.inputs())
    return sorted(set(names))


def activation_matmul_names(model) -> list[str]:
    """Friendly names of the MatMuls of an OpenVINO ``model`` with no constant operand (attention's Q·Kᵀ and A·V):
    the ones ONNX Runtime's ``MatMulConstBOnly`` leaves in float too."""
    def constant(value) -> bool:
        node = value.get_source_output().get_node()
        while node.get_type_name() in ("Convert", "Transpose", "Reshape", "Unsqueeze") and node.inputs():
            node = node.input(0).get_source_output().get_node()
        return node.get_type_name() == "Constant"

    return sorted(op.get_friendly_name() for op in model.get_ops()
                  if op.get_type_name() == "MatMul" and not any(constant(v) for v in op.inputs()))


def openvino_names_of_onnx_nodes(model, onnx_path: str | Path, patterns: Sequence[str]) -> list[str]:
    """Friendly names of the OpenVINO MatMul / Convolution ops that implement the ONNX compute nodes of
    ``onnx_path`` matching ``patterns``: found by the nodes' output tensor names (a Gemm becomes MatMul + Add, so the
    search walks back through Add / Reshape to the MatMul)."""
    import onnx

    source = onnx.load(str(onnx_path), load_external_data=False)
    wanted = set(matching_nodes(source, list(patterns), COMPUTE_OPS))
    tensors = {node.output[0] for node in source.graph.node if node.name in wanted}
    names = []
    for op in model.get_ops():
        if not any(tensors & set(out.get_names()) for out in op.outputs()):
            continue
        node = op
        for _ in range(4):
            if node.get_type_name() in ("MatMul", "Convolution"):
                names.append(node.get_friendly_name())
                break
            if not node.inputs():
                break
            node = node.input(0).get_source_output().get_node()
    return sorted(set(names))


def quantize_openvino_int8(onnx_path: str | Path, output_path: str | Path, calibration: np.ndarray, *,
                           preset: str = "performance", fast_bias_correction: bool = True,
                           fp32_msda_projections: bool = False, fp32_activation_matmuls: bool = False,
                           overflow_fix: str | None = None, exclude: Sequence[str] = (),
                           accuracy_control: dict | None = None) -> dict:
    """NNCF post-training INT8 for OpenVINO of a plugin-mode or pure ONNX, written as IR ``output_path``
    (``.xml`` + ``.bin``).

    ``calibration`` as in :func:`quantize_onnxruntime_int8`. ``preset`` ``performance`` (symmetric) or ``mixed``
    (asymmetric activations). Plugin-mode ONNX: read with the fused MSDA extension loaded, the fused op is NNCF's
    ignored scope by type and stays fp32 (the IR then needs the extension to be read, which
    :class:`sdconet.runtime.openvino_runner.OpenVINORunner` loads); pure ONNX: the MSDA subgraphs are the ignored
    scope by name pattern. The IR has a static batch of 1 (see below): ``model.reshape`` it to the batch to run
    before compiling. ``exclude``: ONNX node-name regexes (``--int8-exclude``) kept fp32, mapped to the OpenVINO
    ops through the nodes' output tensors.

    ``accuracy_control`` ``{"validation": [N, 3, S, S] images, "validate": fn(compiled_model, items) -> metric,
    "max_drop": float}``: NNCF's accuracy-controlled quantization (``nncf.quantize_with_accuracy_control``), which
    returns layers to fp32, most sensitive first, until the metric drops by at most ``max_drop`` (absolute).
    """
    try:
        import nncf
        import openvino as ov
    except ImportError as err:
        raise CPUQuantizationError(f"OpenVINO INT8 needs the openvino and nncf packages ({err}); "
                                   f"pip install openvino nncf") from err
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    if preset not in presets:
        raise ValueError(f"preset must be one of {', '.join(presets)}, got {preset!r}")
    images = _check_calibration(calibration)
    output_path = Path(output_path)
    if output_path.suffix != ".xml":
        raise ValueError(f"OpenVINO IR path must end in .xml, got {output_path}")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    core = ov.Core()
    fused = has_msda_plugin_nodes(onnx_path)
    if fused:
        from sdconet.kernels.cpu import KernelBuildError
        from sdconet.runtime.openvino_runner import load_msda_extension

        try:
            load_msda_extension(core)  # pinned: `model` outlives this local core
        except KernelBuildError as err:
            raise CPUQuantizationError(f"{onnx_path} has MSDA plugin nodes, which need the fused CPU kernel to be "
                                       f"quantized by NNCF: {err}; quantize the pure ONNX instead") from err
    try:
        model = core.read_model(str(onnx_path))
    except RuntimeError as err:
        raise CPUQuantizationError(f"OpenVINO cannot read {onnx_path}: {err}") from err
    fused_ops = sum(op.get_type_name() == FUSED_MSDA_OV_TYPE for op in model.get_ops())
    if fused and not fused_ops:
        raise CPUQuantizationError(f"{onnx_path}: the MSDA plugin nodes did not become the fused op "
                                   f"{FUSED_MSDA_OV_TYPE} (is the extension the one built from this checkout?)")
    # static batch 1: with the dynamic batch axis, OpenVINO 2026.4's low-precision ReshapeTransformation fails at
    # compile time on the quantized Gemm -> Reshape of the token projections; runners reshape to their batch
    model.reshape({model.inputs[0]: [1, *images.shape[1:]]})
    dataset = nncf.Dataset(list(_batches(images)))
    # NNCF would not quantize an op type it does not know, but say so: the fused op's inputs stay fp32
    kept = msda_projection_names(model) if fused and fp32_msda_projections else []
    kept += activation_matmul_names(model) if fp32_activation_matmuls else []
    user_kept = openvino_names_of_onnx_nodes(model, onnx_path, exclude) if exclude else []
    kept += user_kept
    ignored = (nncf.IgnoredScope(types=[FUSED_MSDA_OV_TYPE], names=kept, validate=False) if fused else
               nncf.IgnoredScope(patterns=[MSDA_EXCLUDE_PATTERN], names=kept, validate=False))
    fixes = {"enable": nncf.OverflowFix.ENABLE, "first_layer": nncf.OverflowFix.FIRST_LAYER,
             "disable": nncf.OverflowFix.DISABLE}
    vnni = has_int8_dot()
    # without VNNI the u8 x s8 multiply-add (vpmaddubsw) saturates its int16 pair sums on 8-bit weights: every
    # layer's weights get 7 bits there (NNCF's overflow fix), as ONNX Runtime's reduce_range does
    overflow_fix = overflow_fix or ("first_layer" if vnni else "enable")
    if overflow_fix not in fixes:
        raise ValueError(f"overflow_fix must be one of {', '.join(fixes)}, got {overflow_fix!r}")
    advanced = nncf.AdvancedQuantizationParameters(overflow_fix=fixes[overflow_fix])
    try:
        if accuracy_control:
            validation = nncf.Dataset(list(_batches(_check_calibration(accuracy_control["validation"]))))
            quantized = nncf.quantize_with_accuracy_control(
                model, dataset, validation, validation_fn=accuracy_control["validate"],
                max_drop=float(accuracy_control["max_drop"]), drop_type=nncf.DropType.ABSOLUTE,
                preset=presets[preset], subset_size=int(images.shape[0]), model_type=nncf.ModelType.TRANSFORMER,
                fast_bias_correction=fast_bias_correction, ignored_scope=ignored,
                advanced_quantization_parameters=advanced)
        else:
            quantized = nncf.quantize(model, dataset, preset=presets[preset], subset_size=int(images.shape[0]),
                                      model_type=nncf.ModelType.TRANSFORMER,
                                      fast_bias_correction=fast_bias_correction, ignored_scope=ignored,
                                      advanced_parameters=advanced)
    except Exception as err:
        raise CPUQuantizationError(f"nncf.quantize failed on {onnx_path}: {err}") from err
    from sdconet.deploy.layer_groups import openvino_int8_mac_fraction

    macs = openvino_int8_mac_fraction(quantized)  # FakeQuantize-fed MatMul / Convolution, before weight compression
    ov.save_model(quantized, str(output_path), compress_to_fp16=False)  # float parts stay fp32
    ops = quantized.get_ops()
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in ops)
    if not fake_quantize:
        raise CPUQuantizationError(f"NNCF wrote {output_path} without any FakeQuantize node")
    fed_by_fq = [op.get_friendly_name() for op in ops if op.get_type_name() == FUSED_MSDA_OV_TYPE
                 and any(v.get_source_output().get_node().get_type_name() == "FakeQuantize" for v in op.inputs())]
    if fed_by_fq:
        raise CPUQuantizationError(f"{output_path}: fused MSDA ops read quantized inputs ({fed_by_fq[:3]})")
    return {"tool": "nncf.quantize", "nncf_version": nncf.__version__, "openvino_version": ov.__version__,
            "preset": preset, "model_type": "transformer", "calibration_images": int(images.shape[0]),
            "static_batch": 1, "source": str(onnx_path), "msda": "fused" if fused else "onnx",
            "fused_msda_ops": fused_ops, "fp32_matmuls": len(kept), "exclude": list(exclude),
            "excluded_compute_nodes": user_kept, "accuracy_control": (
                {"max_drop": accuracy_control["max_drop"], "validation_images": len(accuracy_control["validation"])}
                if accuracy_control else None),
            "overflow_fix": overflow_fix, "cpu_vnni": vnni,
            "ignored_scope": [f"type:{FUSED_MSDA_OV_TYPE}"] if fused else [MSDA_EXCLUDE_PATTERN],
            "fake_quantize": fake_quantize, "macs": macs, "seconds": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------------------------------------------
# CLI: quantize an exported fp32 ONNX (no re-export) and time it against fp32 in one process
# ----------------------------------------------------------------------------------------------------------------
def time_against_fp32(fp32_path: str | Path, int8_path: str | Path, images: np.ndarray, *, iters: int = 10,
                      threads: int | None = None) -> dict:
    """p50 latency (ms) of the fp32 and the INT8 ONNX on ONNX Runtime CPU, runs alternating so that a shared
    machine's load hits both alike; ``images`` ``[B, 3, S, S]`` is the batch timed."""
    from sdconet.runtime.onnxruntime_runner import ort_session

    sessions = {"fp32": ort_session(fp32_path, threads), "int8": ort_session(int8_path, threads)}
    feeds = {name: {s.get_inputs()[0].name: images} for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():
        session.run(None, feeds[name])  # warm-up
    for _ in range(iters):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    p50 = {name: float(np.median(values) * 1000.0) for name, values in times.items()}
    return {"fp32_ms": round(p50["fp32"], 3), "int8_ms": round(p50["int8"], 3),
            "int8_over_fp32": round(p50["int8"] / p50["fp32"], 3), "iters": iters, "threads": threads,
            "batch": int(images.shape[0])}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="CPU INT8 of an exported fp32 pure ONNX by the CPU runtimes' own "
                                                 "quantizers, calibrated on training-split images")
    parser.add_argument("--onnx", required=True, type=Path,
                        help="fp32 pure ONNX (export/build_engine.py output); openvino quantizes its plugin-mode "
                             "sibling <stem>.plugin.onnx (fused MSDA op) when it lies next to it")
    parser.add_argument("--backend", nargs="+", choices=("onnxruntime", "openvino"), default=["onnxruntime"])
    parser.add_argument("--config", default="paper", help="preset whose data section gives the training split")
    parser.add_argument("--checkpoint", help="take the config (and data) of this run instead of --config")
    parser.add_argument("--calib-images", type=int, default=32, help="training images for calibration")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: next to --onnx")
    parser.add_argument("--time", type=int, default=0, metavar="ITERS",
                        help="ONNX Runtime: also time fp32 vs INT8 alternating, ITERS runs each (batch 1)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for --time")
    args = parser.parse_args(argv)

    import onnx

    from sdconet.data import build_dataset
    from sdconet.deploy.quantize import calibration_images

    if not args.onnx.is_file():
        parser.error(f"--onnx {args.onnx}: file not found")
    if args.checkpoint:
        from sdconet.engine.checkpoint import read_checkpoint_metadata, resolve_checkpoint

        cfg, _ = read_checkpoint_metadata(resolve_checkpoint(args.checkpoint))
    else:
        from sdconet.config import load_config

        cfg = load_config(args.config)
    dims = onnx.load(str(args.onnx), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    imgsz = int(dims[-1].dim_value)
    train_set = build_dataset(cfg.data, "train", cfg.model.upscale, train=False)
    calib = calibration_images(train_set, args.calib_images, imgsz)
    out_dir = args.out_dir or args.onnx.parent
    stem = args.onnx.name.removesuffix(".onnx")
    results: dict = {}
    for backend in args.backend:
        if backend == "onnxruntime":
            path = out_dir / f"{stem}.cpu_int8.onnx"
            results[backend] = quantize_onnxruntime_int8(args.onnx, path, calib) | {"path": str(path)}
            if args.time:
                results[backend]["timing"] = time_against_fp32(args.onnx, path, calib[:1], iters=args.time,
                                                               threads=args.threads)
        else:
            # the plugin-mode sibling keeps the fused MSDA op in the INT8 IR (the exporter writes both); without
            # the fused kernel the pure ONNX given is quantized, as the exporter does
            plugin = args.onnx.with_name(f"{stem}.plugin.onnx")
            source = (plugin if plugin.is_file() and not has_msda_plugin_nodes(args.onnx)
                      and fused_cpu_kernel_ready(f"OpenVINO INT8 of {args.onnx}") else args.onnx)
            path = out_dir / f"{stem.removesuffix('.plugin')}.openvino_int8.xml"
            results[backend] = quantize_openvino_int8(source, path, calib) | {"path": str(path)}
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
