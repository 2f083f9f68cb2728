"""Graph surgery around MSDA plugin nodes: plugin nodes <-> pure-ONNX (gather) MSDA subgraphs, for quantizers that
cannot see through a custom node and for the op benchmark.

The node itself (spec, export symbolic, NumPy reference, ONNX Runtime binding) is :mod:`sdconet.kernels.msda_plugin`;
its names are re-exported here so that ``sdconet.deploy.msda_plugin.trt_plugin_spec`` and friends keep working.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sdconet.kernels.msda_plugin import (ORT_CONTRIB_DOMAIN, PLUGIN_DOMAIN, TRT_PLUGIN_OP_TYPE,  # noqa: F401
                                         PluginSpec, msda_plugin, msda_plugin_reference, ort_compatible_model,
                                         register_ort_custom_op, sdconet_plugin_available, sdconet_plugin_spec,
                                         trt_plugin_spec, use_plugin_spec)
from sdconet.ops.msda import SpatialShapes, level_start_index_for, msda_gather, spatial_shapes_as_ints  # noqa: F401
from sdconet.runtime.onnxruntime_runner import ort_session  # noqa: F401  (re-export: the one place sessions open)


# ----------------------------------------------------------------------------------------------------------------
# Graph surgery: plugin nodes <-> pure-ONNX (gather) MSDA subgraphs
# ----------------------------------------------------------------------------------------------------------------
MSDA_SUBGRAPH_PREFIX = "msda_onnx"  # node-name prefix of spliced subgraphs: msda_onnx<i>/...
# node names of those subgraphs: what quantizers exclude (ModelOpt exclude_nodes, NNCF IgnoredScope patterns)
MSDA_EXCLUDE_PATTERN = f"{MSDA_SUBGRAPH_PREFIX}[0-9]+/.*"


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


def tensor_elem_types(model) -> dict[str, int]:
    """Element type (``onnx.TensorProto`` enum) of every tensor whose type the graph states or ONNX shape inference
    can infer (custom nodes' outputs only where ``value_info`` declares them)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an uninferable graph still has its declared types
        inferred = model
    graph = inferred.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for info in (*graph.input, *graph.value_info, *graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def _declare_type(model, name: str, elem_type: int) -> None:
    import onnx

    for info in model.graph.value_info:
        if info.name == name:
            info.type.tensor_type.elem_type = elem_type
            return
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem_type, None))


def onnx_msda_to_plugin_nodes(model, plugin_model, op_types: Sequence[str], cast_float_inputs: bool = False):
    """Swap the ``msda_onnx<i>/`` subgraphs of ``model`` (e.g. its Q/DQ version) for ``plugin_model``'s plugin nodes.

    ``model`` must come from :func:`plugin_nodes_to_onnx` on ``plugin_model`` (possibly transformed by a tool that
    keeps node and boundary tensor names, as ModelOpt does with the subgraphs excluded from quantization).
    ``cast_float_inputs`` puts a Cast-to-FP32 on the plugin's float inputs: in a mixed-precision (AutoCast) graph
    their producers may differ in type, and the plugin needs one type for all of them. The plugin then computes in
    FP32, so its output is cast back to the type the replaced subgraph produced (FP16 in an INT8 graph made with
    ``high_precision_dtype=fp16``): a strongly typed network (TensorRT 11) must not see a consumer such as the
    output projection's MatMul fed FP32 and FP16. The plugin's own output type is declared in ``value_info``, since
    ONNX shape inference cannot infer a custom node's.
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
        produced_types = tensor_elem_types(model)  # before the swap: what each replaced subgraph produced
        for index, node in enumerate(new_nodes):
            for slot in (0, 3, 4):  # value, sampling_locations, attention_weights
                cast_name = f"{node.input[slot]}_fp32_for_plugin{index}"
                extra_nodes.append(onnx.helper.make_node("Cast", [node.input[slot]], [cast_name],
                                                         name=f"plugin{index}_cast{slot}", to=onnx.TensorProto.FLOAT))
                node.input[slot] = cast_name
            original = node.output[0]
            wanted = produced_types.get(original, onnx.TensorProto.FLOAT)
            if wanted != onnx.TensorProto.FLOAT:
                node.output[0] = f"{original}_fp32_from_plugin{index}"
                extra_nodes.append(onnx.helper.make_node("Cast", [node.output[0]], [original],
                                                         name=f"plugin{index}_cast_out", to=wanted))
            _declare_type(model, node.output[0], onnx.TensorProto.FLOAT)
    del model.graph.node[:]
    model.graph.node.extend(kept + extra_nodes + new_nodes)
    existing = {o.domain for o in model.opset_import}
    model.opset_import.extend(copy.deepcopy(o) for o in plugin_model.opset_import if o.domain not in existing)
    return prune_dead_nodes(topological_sort(model))

