"""Fused multi-scale deformable attention for x86 CPUs, as an OpenVINO extension (docs/cpu-runtime.md).

The C++ sources next to this file build into one shared library (:mod:`sdconet.kernels.cpu.build`) that

* adds the op ``sdconet::MultiscaleDeformableAttn`` to OpenVINO and maps the plugin-mode ONNX nodes
  (``MultiscaleDeformableAttnPlugin_TRT`` and our own ``sdconet`` plugin node) to it: ``core.add_extension(path)``
  before reading the plugin-mode ONNX (:class:`sdconet.runtime.openvino_runner.OpenVINORunner` does this);
* exports a C entry point used here (:func:`msda_forward`) by the tests and ``benchmarks/msda_op.py``.

``SDCONET_CPU_ISA=avx512|avx2|scalar`` forces a code path (default: the best this CPU supports); it is read on every
call, and forcing a path this CPU lacks is an error.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Sequence

import numpy as np

from sdconet.kernels.cpu.build import KernelBuildError, build_extension, extension_path
from sdconet.utils.logging import get_logger

_LOG = get_logger(__name__)
ISAS = ("avx512", "avx2", "scalar")
_ERROR_SIZE = 512


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    import openvino  # noqa: F401  (loads libopenvino/libtbb the extension links to)

    path = extension_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:  # e.g. replaced by a foreign file after its build record was checked
        raise KernelBuildError(f"cannot load the fused MSDA CPU kernel {path} ({err}); rebuild it with "
                               f"`python -m sdconet.kernels.cpu --force`") from err
    i64, f32p, i64p = ctypes.c_int64, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int64)
    lib.sdconet_msda_forward_f32.argtypes = [f32p, i64p, i64p, f32p, f32p, f32p] + [i64] * 7 + [
        ctypes.c_char_p, ctypes.c_size_t]
    lib.sdconet_msda_forward_f32.restype = ctypes.c_int
    lib.sdconet_msda_isa.restype = ctypes.c_char_p
    lib.sdconet_msda_cpu_supports.argtypes = [ctypes.c_char_p]
    lib.sdconet_msda_cpu_supports.restype = ctypes.c_int
    return lib


def selected_isa() -> str:
    """The path the kernel takes now (``SDCONET_CPU_ISA`` or the best supported); raises on a bad override."""
    answer = _library().sdconet_msda_isa().decode()
    if answer.startswith("error: "):
        raise ValueError(answer[len("error: "):])
    return answer


def cpu_supports(isa: str) -> bool:
    """Whether this CPU can run the ``isa`` path (``avx512``, ``avx2`` or ``scalar``)."""
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}; choose from {', '.join(ISAS)}")
    return bool(_library().sdconet_msda_cpu_supports(isa.encode()))


def msda_forward(value: np.ndarray, spatial_shapes: Sequence[Sequence[int]] | np.ndarray,
                 level_start_index: Sequence[int] | np.ndarray, sampling_locations: np.ndarray,
                 attention_weights: np.ndarray) -> np.ndarray:
    """Fused MSDA on float32 arrays in the plugin layout: ``value [N,S,M,D]`` ... -> ``[N,Lq,M,D]`` float32."""
    value = np.ascontiguousarray(value, dtype=np.float32)
    loc = np.ascontiguousarray(sampling_locations, dtype=np.float32)
    attn = np.ascontiguousarray(attention_weights, dtype=np.float32)
    shapes = np.ascontiguousarray(spatial_shapes, dtype=np.int64).reshape(-1, 2)
    starts = np.ascontiguousarray(level_start_index, dtype=np.int64).reshape(-1)
    if value.ndim != 4 or loc.ndim != 6 or loc.shape[-1] != 2:
        raise ValueError(f"msda_forward: value must be [N,S,M,D] and sampling_locations [N,Lq,M,L,P,2], got "
                         f"{list(value.shape)} and {list(loc.shape)}")
    n, s, m, d = value.shape
    _, lq, _, levels, points, _ = loc.shape
    if loc.shape[:3] != (n, lq, m) or attn.shape != loc.shape[:-1]:
        raise ValueError(f"msda_forward: sampling_locations {list(loc.shape)} / attention_weights "
                         f"{list(attn.shape)} do not match value {list(value.shape)}")
    if shapes.shape[0] != levels or starts.shape[0] != levels:
        raise ValueError(f"msda_forward: {levels} levels in sampling_locations but spatial_shapes has "
                         f"{shapes.shape[0]} rows and level_start_index {starts.shape[0]} entries")
    out = np.empty((n, lq, m, d), dtype=np.float32)
    error = ctypes.create_string_buffer(_ERROR_SIZE)

    def ptr(array: np.ndarray, kind):
        return array.ctypes.data_as(ctypes.POINTER(kind))

    rc = _library().sdconet_msda_forward_f32(
        ptr(value, ctypes.c_float), ptr(shapes, ctypes.c_int64), ptr(starts, ctypes.c_int64),
        ptr(loc, ctypes.c_float), ptr(attn, ctypes.c_float), ptr(out, ctypes.c_float),
        n, s, m, d, lq, levels, points, error, _ERROR_SIZE)
    if rc != 0:
        raise ValueError(error.value.decode())
    return out


def plugin_node_model(levels: Sequence[Sequence[int]], value_shape: Sequence[int], locations_shape: Sequence[int], *,
                      op_type: str | None = None, domain: str | None = None, float_type: int | None = None):
    """One MSDA plugin node as the plugin-mode export writes it (int32 shape constants, dynamic batch): the op alone,
    for the op benchmark and the tests. ``value_shape [N,S,M,D]``, ``locations_shape [N,Lq,M,L,P,2]``; default node
    = TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` in ``trt.plugins``; ``float_type`` an ``onnx.TensorProto``
    float type (default FLOAT)."""
    from onnx import TensorProto, helper

    from sdconet.kernels import msda_plugin
    from sdconet.ops.msda import level_start_index_for

    levels = [tuple(int(v) for v in level) for level in levels]
    op_type = op_type or msda_plugin.TRT_PLUGIN_OP_TYPE
    domain = domain or msda_plugin.PLUGIN_DOMAIN
    float_type = TensorProto.FLOAT if float_type is None else float_type
    names = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"]
    node = helper.make_node(op_type, names, ["output"], domain=domain, plugin_version="1")
    graph = helper.make_graph(
        [node], "msda",
        [helper.make_tensor_value_info("value", float_type, ["batch", *value_shape[1:]]),
         helper.make_tensor_value_info("sampling_locations", float_type, ["batch", *locations_shape[1:]]),
         helper.make_tensor_value_info("attention_weights", float_type, ["batch", *locations_shape[1:-1]])],
        [helper.make_tensor_value_info("output", float_type, ["batch", locations_shape[1], *value_shape[2:]])],
        initializer=[helper.make_tensor("spatial_shapes", TensorProto.INT32, [len(levels), 2],
                                        [v for level in levels for v in level]),
                     helper.make_tensor("level_start_index", TensorProto.INT32, [len(levels)],
                                        level_start_index_for(levels))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])


def fused_cpu_kernel_ready(fallback: str = "Triton cpu runtime: onnxruntime") -> bool:
    """openvino is installed and the fused MSDA CPU kernel builds here; when not, the log says why and what the
    caller does instead (``fallback``)."""
    try:
        import openvino  # noqa: F401
    except ImportError as err:
        _LOG.info("%s (%s)", fallback, err)
        return False
    try:
        extension_path()
    except KernelBuildError as err:
        _LOG.warning("%s, the fused MSDA CPU kernel cannot be built (%s)", fallback, err)
        return False
    return True


__all__ = ["ISAS", "KernelBuildError", "build_extension", "cpu_supports", "extension_path", "fused_cpu_kernel_ready",
           "msda_forward", "plugin_node_model", "selected_isa"]
