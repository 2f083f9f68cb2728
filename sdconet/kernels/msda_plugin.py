"""MSDA as a TensorRT plugin node: the ``plugin`` implementation of :mod:`sdconet.ops.msda` and its ONNX Runtime
binding (the graph surgery around such nodes is export work: :mod:`sdconet.deploy.msda_plugin`).

In eager mode the ``plugin`` implementation computes the real result (the gather form), so a model built with
``model.detector.msda_impl=plugin`` runs and trains like any other. Under ``torch.onnx.export`` (TorchScript
exporter, ``dynamo=False``, ``autograd_inlining=False``) each call becomes one custom node whose op type, domain and
attributes come from the active :class:`PluginSpec` (set with :func:`use_plugin_spec`):

* ``trt``     — ``MultiscaleDeformableAttnPlugin_TRT`` from ``libnvinfer_plugin`` (``plugin_version`` "1" =
  IPluginV2DynamicExt, "2" = IPluginV3 since TensorRT 10.11). Inputs in TensorRT's order: ``value [N,S,M,D]``,
  ``spatial_shapes [L,2]`` int32, ``level_start_index [L]`` int32, ``sampling_locations [N,Lq,M,L,P,2]``,
  ``attention_weights [N,Lq,M,L,P]``; output ``[N,Lq,M,D]``; no plugin fields.
* ``sdconet`` — our own plugin (``sdconet.kernels.trt_plugin``), same inputs and output, op type / namespace /
  attributes read from that module.

TensorRT's ONNX parser imports an unknown node as the plugin whose name is the node's op type, version its
``plugin_version`` attribute (default "1") and namespace its ``plugin_namespace`` attribute (default "", falling
back to the node's domain); the remaining attributes become plugin fields.

For ONNX Runtime the node is executed by :func:`register_ort_custom_op`, which runs :func:`msda_plugin_reference`
(the gather form of :mod:`sdconet.ops.msda` on the node's inputs, in the plugin's layout): inputs wired in the wrong
order or layout show up as a parity failure against the PyTorch model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from sdconet.ops.msda import (SpatialShapes, level_start_index_for, msda_gather, register_msda_impl,
                              spatial_shapes_as_ints)

TRT_PLUGIN_OP_TYPE = "MultiscaleDeformableAttnPlugin_TRT"
PLUGIN_DOMAIN = "trt.plugins"  # custom ops need a non-default domain for onnx.checker; TensorRT ignores it here
ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"  # the domain onnxruntime-extensions registers Python ops in


@dataclass(frozen=True)
class PluginSpec:
    """Which custom node an MSDA call exports to (op type, ONNX domain, node attributes)."""

    op_type: str
    domain: str = PLUGIN_DOMAIN
    attributes: dict[str, str | int | float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        version = self.attributes.get("plugin_version", "1")
        return f"{self.op_type} v{version}"


def trt_plugin_spec(version: int = 1) -> PluginSpec:
    """TensorRT's built-in ``MultiscaleDeformableAttnPlugin_TRT`` (version 1 or 2)."""
    if version not in (1, 2):
        raise ValueError(f"--plugin-version must be 1 (IPluginV2, TensorRT >= 8.4) or 2 (IPluginV3, TensorRT "
                         f">= 10.11), got {version}")
    return PluginSpec(TRT_PLUGIN_OP_TYPE, PLUGIN_DOMAIN, {"plugin_version": str(version)})


def sdconet_plugin_spec() -> PluginSpec:
    """Our own TensorRT plugin, described by constants in ``sdconet.kernels.trt_plugin``.

    That module must define ``PLUGIN_OP_TYPE`` and ``PLUGIN_VERSION``; ``PLUGIN_NAMESPACE`` and ``PLUGIN_ATTRIBUTES``
    are optional. Inputs/output follow the TensorRT plugin's layout (module docstring).
    """
    try:
        from sdconet.kernels import trt_plugin as module
    except ImportError as err:
        raise RuntimeError(f"--msda sdconet needs sdconet.kernels.trt_plugin, which cannot be imported "
                           f"({err})") from err
    missing = [name for name in ("PLUGIN_OP_TYPE", "PLUGIN_VERSION") if not hasattr(module, name)]
    if missing:
        raise RuntimeError(f"sdconet.kernels.trt_plugin does not define {', '.join(missing)}")
    namespace = getattr(module, "PLUGIN_NAMESPACE", "")
    attributes: dict[str, str | int | float] = {"plugin_version": str(module.PLUGIN_VERSION)}
    if namespace:
        attributes["plugin_namespace"] = namespace
    attributes.update(getattr(module, "PLUGIN_ATTRIBUTES", {}))
    return PluginSpec(module.PLUGIN_OP_TYPE, namespace or PLUGIN_DOMAIN, attributes)


def sdconet_plugin_available() -> bool:
    try:
        sdconet_plugin_spec()
    except RuntimeError:
        return False
    return True


_ACTIVE_SPEC: list[PluginSpec] = [trt_plugin_spec(1)]


@contextlib.contextmanager
def use_plugin_spec(spec: PluginSpec) -> Iterator[PluginSpec]:
    """Within this block, ``plugin`` MSDA calls export as ``spec``'s node."""
    _ACTIVE_SPEC.append(spec)
    try:
        yield spec
    finally:
        _ACTIVE_SPEC.pop()


class _MSDAPluginFunction(torch.autograd.Function):
    """Eager: gather-form MSDA returning ``[N, Lq, M, D]``. Export: one custom node (see module docstring)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, spec):
        n, _, m, d = value.shape
        out = msda_gather(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return out.view(n, sampling_locations.shape[1], m, d)

    @staticmethod
    def symbolic(g, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, spec):
        from torch.onnx import symbolic_helper

        attrs = {}
        for key, val in spec.attributes.items():  # TorchScript's g.op encodes the attribute type in the suffix
            suffix = "s" if isinstance(val, str) else "i" if isinstance(val, int) else "f"
            attrs[f"{key}_{suffix}"] = val
        out = g.op(f"{spec.domain}::{spec.op_type}", value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, **attrs)
        value_sizes = symbolic_helper._get_tensor_sizes(value)
        loc_sizes = symbolic_helper._get_tensor_sizes(sampling_locations)
        if value_sizes is not None and loc_sizes is not None:
            # batch left symbolic; torch cannot infer a custom op's output otherwise
            out.setType(value.type().with_sizes([None, loc_sizes[1], value_sizes[2], value_sizes[3]]))
        return out


def msda_plugin(value: torch.Tensor, spatial_shapes: SpatialShapes, level_start_index: torch.Tensor | None,
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """``plugin`` MSDA implementation: ``[N, Lq, M * D]`` like every other implementation."""
    shapes = spatial_shapes_as_ints(spatial_shapes)
    # int32 constants, as the plugin requires; the start index is recomputed from the shapes so that it is a
    # constant of the exported graph whatever the caller passed
    shapes_t = torch.tensor(shapes, dtype=torch.int32, device=value.device)
    starts_t = torch.tensor(level_start_index_for(shapes), dtype=torch.int32, device=value.device)
    out = _MSDAPluginFunction.apply(value, shapes_t, starts_t, sampling_locations, attention_weights,
                                    _ACTIVE_SPEC[-1])
    return out.flatten(2)


register_msda_impl("plugin", msda_plugin)


# ----------------------------------------------------------------------------------------------------------------
# ONNX Runtime: the plugin node as a Python custom op (onnxruntime-extensions)
# ----------------------------------------------------------------------------------------------------------------
def msda_plugin_reference(value: np.ndarray, spatial_shapes: np.ndarray, level_start_index: np.ndarray,
                          sampling_locations: np.ndarray, attention_weights: np.ndarray) -> np.ndarray:
    """The plugin node's computation on NumPy arrays: ``value [N,S,M,D]`` ... -> ``[N,Lq,M,D]`` float32.

    The plugin reads level ``l`` from token ``level_start_index[l]``; the gather form reads the levels back to back,
    so the index must be the contiguous one (what :func:`msda_plugin` exports).
    """
    shapes = spatial_shapes_as_ints(np.asarray(spatial_shapes).tolist())
    expected_starts = level_start_index_for(shapes)
    if [int(s) for s in np.asarray(level_start_index)] != expected_starts:
        raise ValueError(f"MSDA plugin node: level_start_index {np.asarray(level_start_index).tolist()} is not the "
                         f"contiguous {expected_starts} for spatial_shapes {shapes}")
    value_t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    n, _, m, d = value_t.shape
    out = msda_gather(value_t, shapes, None, torch.from_numpy(np.ascontiguousarray(sampling_locations, np.float32)),
                      torch.from_numpy(np.ascontiguousarray(attention_weights, np.float32)))
    return out.view(n, -1, m, d).numpy()


_REGISTERED_ORT_OPS: set[str] = set()


def register_ort_custom_op(op_type: str = TRT_PLUGIN_OP_TYPE, attributes: dict[str, int] | None = None) -> str:
    """Register ``op_type`` as an onnxruntime-extensions Python op implementing the plugin; returns its library path.

    ``attributes`` maps the node's attribute names to their ``onnx.AttributeProto`` type (default: the string
    ``plugin_version``). Nodes must sit in the ``ai.onnx.contrib`` domain to bind to it: see
    :func:`ort_compatible_model`.
    """
    import onnx
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    kinds = {onnx.AttributeProto.STRING: PyCustomOpDef.dt_string, onnx.AttributeProto.INT: PyCustomOpDef.dt_int64,
             onnx.AttributeProto.FLOAT: PyCustomOpDef.dt_float}
    attributes = {"plugin_version": onnx.AttributeProto.STRING} if attributes is None else attributes
    if op_type not in _REGISTERED_ORT_OPS:
        @onnx_op(op_type=op_type,
                 inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int32,
                         PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
                 outputs=[PyCustomOpDef.dt_float],
                 attrs={name: kinds[kind] for name, kind in attributes.items()})
        def _plugin(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, **_attrs):
            return msda_plugin_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights)

        _REGISTERED_ORT_OPS.add(op_type)
    return get_library_path()


def ort_compatible_model(model, op_types: Sequence[str] = (TRT_PLUGIN_OP_TYPE,)):
    """A copy of ``model`` whose plugin nodes live in the onnxruntime-extensions domain (the artifact is untouched)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type in op_types:
            node.domain = ORT_CONTRIB_DOMAIN
            for attr in list(node.attribute):
                if attr.name == "plugin_namespace":
                    node.attribute.remove(attr)
    if not any(o.domain == ORT_CONTRIB_DOMAIN for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid(ORT_CONTRIB_DOMAIN, 1))
    return copy
