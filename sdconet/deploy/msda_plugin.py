"""MSDA as a TensorRT plugin node: the ``plugin`` implementation of :mod:`sdconet.ops.msda`.

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
import importlib
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
        module = importlib.import_module("sdconet.kernels.trt_plugin")
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


# ----------------------------------------------------------------------------------------------------------------
# Graph surgery: plugin nodes <-> pure-ONNX (gather) MSDA subgraphs
# ----------------------------------------------------------------------------------------------------------------
MSDA_SUBGRAPH_PREFIX = "msda_onnx"  # node-name prefix of spliced subgraphs: msda_onnx<i>/...


class _GatherMSDA(torch.nn.Module):
    """One MSDA call with constant shapes, exported as the pure-ONNX replacement of a plugin node."""

    def __init__(self, spatial_shapes: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.spatial_shapes = [tuple(s) for s in spatial_shapes]

    def forward(self, value, sampling_locations, attention_weights):
        n, _, m, d = value.shape
        out = msda_gather(value, self.spatial_shapes, None, sampling_locations, attention_weights)
        return out.view(n, sampling_locations.shape[1], m, d)


def _gather_subgraph(spatial_shapes: Sequence[tuple[int, int]], value_shape: Sequence[int],
                     locations_shape: Sequence[int], opset: int):
    """Simplified ONNX model of :class:`_GatherMSDA` (dynamic batch) for one plugin-node signature."""
    from sdconet.deploy.onnx_export import export_module, simplify

    value = torch.rand(2, *value_shape[1:])
    locations = torch.rand(2, *locations_shape[1:])
    weights = torch.rand(2, *locations_shape[1:-1])
    exported = export_module(_GatherMSDA(spatial_shapes), (value, locations, weights), opset=opset,
                             input_name=["value", "sampling_locations", "attention_weights"],
                             output_names=["output"])
    return simplify(exported)


def plugin_nodes_to_onnx(model, op_types: Sequence[str]):
    """Replace every plugin node (``op_types``) by the pure-ONNX gather subgraph computing the same result.

    Spliced nodes are named ``msda_onnx<i>/...`` so that :func:`onnx_msda_to_plugin_nodes` can swap them back (after
    quantization, for instance). Tensor names at the boundary stay those of the plugin node.
    """
    import copy

    import onnx

    from sdconet.deploy.onnx_export import custom_node_inputs, prune_dead_nodes, topological_sort

    model = copy.deepcopy(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    arrays = custom_node_inputs(model)  # batch-1 values: static shapes and the spatial_shapes constants
    cache: dict[tuple, object] = {}
    kept, spliced_nodes, spliced_inits = [], [], []
    index = 0
    for node in model.graph.node:
        if node.op_type not in op_types:
            kept.append(node)
            continue
        shapes = [tuple(int(v) for v in row) for row in arrays[node.input[1]].tolist()]
        value_shape = arrays[node.input[0]].shape
        loc_shape = arrays[node.input[3]].shape
        key = (tuple(shapes), tuple(value_shape[1:]), tuple(loc_shape[1:]))
        if key not in cache:
            cache[key] = _gather_subgraph(shapes, value_shape, loc_shape, opset)
        sub = cache[key]
        prefix = f"{MSDA_SUBGRAPH_PREFIX}{index}/"
        index += 1
        rename = {"value": node.input[0], "sampling_locations": node.input[3], "attention_weights": node.input[4],
                  "output": node.output[0]}
        for init in sub.graph.initializer:
            new = copy.deepcopy(init)
            new.name = rename.setdefault(init.name, prefix + init.name)
            spliced_inits.append(new)
        for sub_node in sub.graph.node:
            new = copy.deepcopy(sub_node)
            new.name = prefix + (sub_node.name or sub_node.op_type)
            new.input[:] = [rename.setdefault(n, prefix + n) if n else n for n in sub_node.input]
            new.output[:] = [rename.setdefault(n, prefix + n) for n in sub_node.output]
            spliced_nodes.append(new)
    if not index:
        return model
    del model.graph.node[:]
    model.graph.node.extend(kept + spliced_nodes)
    model.graph.initializer.extend(spliced_inits)
    domains = {n.domain for n in model.graph.node}
    opsets = [o for o in model.opset_import if o.domain in domains or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return prune_dead_nodes(topological_sort(model))


def onnx_msda_to_plugin_nodes(model, plugin_model, op_types: Sequence[str], cast_float_inputs: bool = False):
    """Swap the ``msda_onnx<i>/`` subgraphs of ``model`` (e.g. its Q/DQ version) for ``plugin_model``'s plugin nodes.

    ``model`` must come from :func:`plugin_nodes_to_onnx` on ``plugin_model`` (possibly transformed by a tool that
    keeps node and boundary tensor names, as ModelOpt does with the subgraphs excluded from quantization).
    ``cast_float_inputs`` puts a Cast-to-FP32 on the plugin's float inputs: in a mixed-precision (AutoCast) graph
    their producers may differ in type, and the plugin needs one type for all of them.
    """
    import copy

    import onnx

    from sdconet.deploy.onnx_export import prune_dead_nodes, topological_sort

    model = copy.deepcopy(model)
    plugin_nodes = [n for n in plugin_model.graph.node if n.op_type in op_types]
    kept = [n for n in model.graph.node if not n.name.startswith(MSDA_SUBGRAPH_PREFIX)]
    produced = {name for n in kept for name in n.output} | {i.name for i in model.graph.input}
    produced |= {init.name for init in model.graph.initializer}
    constants = {init.name: init for init in plugin_model.graph.initializer}
    constant_nodes = {n.output[0]: n for n in plugin_model.graph.node if n.op_type == "Constant"}
    extra_nodes = []
    for node in plugin_nodes:
        for name in node.input:
            if name in produced:
                continue
            if name in constants:
                model.graph.initializer.append(copy.deepcopy(constants[name]))
            elif name in constant_nodes:
                extra_nodes.append(copy.deepcopy(constant_nodes[name]))
            else:
                raise RuntimeError(f"cannot swap in plugin node {node.name}: its input '{name}' is missing from the "
                                   f"transformed model (a tool renamed boundary tensors)")
            produced.add(name)
    new_nodes = [copy.deepcopy(n) for n in plugin_nodes]
    if cast_float_inputs:
        for index, node in enumerate(new_nodes):
            for slot in (0, 3, 4):  # value, sampling_locations, attention_weights
                cast_name = f"{node.input[slot]}_fp32_for_plugin{index}"
                extra_nodes.append(onnx.helper.make_node("Cast", [node.input[slot]], [cast_name],
                                                         name=f"plugin{index}_cast{slot}", to=onnx.TensorProto.FLOAT))
                node.input[slot] = cast_name
    del model.graph.node[:]
    model.graph.node.extend(kept + extra_nodes + new_nodes)
    existing = {o.domain for o in model.opset_import}
    model.opset_import.extend(copy.deepcopy(o) for o in plugin_model.opset_import if o.domain not in existing)
    return prune_dead_nodes(topological_sort(model))


def ort_session(model, threads: int | None = None):
    """ONNX Runtime CPU session for a pure or plugin-mode model (see :func:`sdconet.runtime.onnxruntime_runner.
    ort_session`, the one place sessions are opened)."""
    from sdconet.runtime.onnxruntime_runner import ort_session as open_session

    return open_session(model, threads)
