"""ONNX export of a module with a dynamic batch, simplification around custom nodes, and graph helpers.

Exporter choice: torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). It needs no extra
package and emits custom nodes from an ``autograd.Function.symbolic`` (with ``autograd_inlining=False``, otherwise
its peephole pass fails on a Function whose eager forward differs from its symbolic). The dynamo exporter needs
``onnxscript`` and a custom translation table for the same result; see docs/export.md.

Custom nodes (the MSDA plugin) are kept out of onnxsim: :func:`simplify_around_custom_nodes` cuts them out (their
inputs become graph outputs and their outputs graph inputs with known shapes), simplifies the standard-op graph and
puts the nodes back. onnxsim's shape inference and constant folding therefore never meet an unknown op.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

from sdconet.utils.logging import get_logger

LOG = get_logger(__name__)

DEFAULT_OPSET = 17
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class CutNode:
    """A custom node removed from the graph while it is simplified (a copy of the NodeProto)."""

    node: onnx.NodeProto


def _stable_sort_symbolic(g, self, *args):
    """``aten::sort`` including the ``stable=`` overload (``sort(self, stable, dim, descending)``), which torch's
    built-in symbolic misreads. ONNX TopK over the whole axis puts equal values in index order, i.e. it is stable."""
    from torch.onnx import symbolic_helper

    dim, descending = (args[-2], args[-1])
    dim = symbolic_helper._maybe_get_const(dim, "i")
    descending = symbolic_helper._maybe_get_const(descending, "b")
    axis_size = g.op("Gather", g.op("Shape", self), g.op("Constant", value_t=torch.tensor([dim], dtype=torch.int64)))
    return g.op("TopK", self, axis_size, axis_i=dim, largest_i=int(bool(descending)), sorted_i=1, outputs=2)


@contextlib.contextmanager
def _export_symbolics(opset: int):
    torch.onnx.register_custom_op_symbolic("aten::sort", _stable_sort_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::sort", opset)


def export_module(module: torch.nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], *,
                  input_name: str | Sequence[str], output_names: Sequence[str], opset: int = DEFAULT_OPSET,
                  custom_domains: Sequence[str] = ()) -> onnx.ModelProto:
    """Trace ``module(*example_inputs)`` into an ONNX model with a dynamic batch axis on every input/output.

    ``input_name`` names the input (one name per tensor when ``example_inputs`` is a tuple).
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization and the TensorRT 10 parser), got {opset}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    input_names = [input_name] if isinstance(input_name, str) else list(input_name)
    dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    buffer = io.BytesIO()
    module.eval()
    with torch.no_grad(), _export_symbolics(opset), warnings.catch_warnings():
        # tracing constant shapes is the point (static export); the TorchScript exporter is chosen on purpose
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(module, tuple(example_inputs), buffer, dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=list(output_names), dynamic_axes=dynamic_axes,
                          do_constant_folding=True, autograd_inlining=False,
                          custom_opsets={domain: 1 for domain in custom_domains})
    return onnx.load_from_string(buffer.getvalue())


def is_custom(node: onnx.NodeProto) -> bool:
    return node.domain not in STANDARD_DOMAINS


def _value_info_by_name(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    infos = {}
    for info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        infos[info.name] = info
    return infos


def cut_custom_nodes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[CutNode]]:
    """Remove custom-domain nodes: their inputs become extra graph outputs, their outputs extra graph inputs.

    Every custom output must have a known type (the plugin symbolic sets it), so shapes keep flowing downstream.
    """
    cut_model = copy.deepcopy(model)
    infos = _value_info_by_name(onnx.shape_inference.infer_shapes(model))
    initializers = {init.name for init in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    cut: list[CutNode] = []
    kept = []
    for node in cut_model.graph.node:
        (cut.append(CutNode(copy.deepcopy(node))) if is_custom(node) else kept.append(node))
    if not cut:
        return cut_model, []
    del cut_model.graph.node[:]
    cut_model.graph.node.extend(kept)
    for item in cut:
        for name in item.node.output:
            if name not in infos or not infos[name].type.tensor_type.HasField("shape"):
                raise RuntimeError(f"custom node {item.node.op_type} ({item.node.name}): output '{name}' has no "
                                   f"shape in the exported graph, cannot simplify around it")
            cut_model.graph.input.append(copy.deepcopy(infos[name]))
        for name in item.node.input:
            if name in initializers or name in graph_outputs or not name:
                continue
            if name not in infos:
                raise RuntimeError(f"custom node {item.node.op_type} ({item.node.name}): input '{name}' has no "
                                   f"type after shape inference, cannot simplify around it")
            cut_model.graph.output.append(copy.deepcopy(infos[name]))
            graph_outputs.add(name)
    return cut_model, cut


def restore_custom_nodes(cut_model: onnx.ModelProto, cut: Sequence[CutNode], original: onnx.ModelProto
                         ) -> onnx.ModelProto:
    """Inverse of :func:`cut_custom_nodes` on a (simplified) cut model; returns a topologically sorted model."""
    model = copy.deepcopy(cut_model)
    custom_outputs = {name for item in cut for name in item.node.output}
    real_outputs = [o.name for o in original.graph.output]
    # the temporary inputs/outputs become internal tensors again; their types stay as value_info
    inputs = [i for i in model.graph.input if i.name not in custom_outputs]
    model.graph.value_info.extend(copy.deepcopy(i) for i in model.graph.input if i.name in custom_outputs)
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    outputs = {o.name: o for o in model.graph.output}
    model.graph.value_info.extend(copy.deepcopy(o) for name, o in outputs.items() if name not in real_outputs)
    del model.graph.output[:]
    model.graph.output.extend(copy.deepcopy(outputs[name]) for name in real_outputs)
    model.graph.node.extend(item.node for item in cut)
    existing = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in original.opset_import if o.domain not in existing)
    return topological_sort(model)


def topological_sort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Order nodes so that each comes after the producers of its inputs (ONNX requires it)."""
    available = {i.name for i in model.graph.input} | {init.name for init in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered = []
    while pending:
        progressed = False
        remaining = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                remaining.append(node)
        if not progressed:
            missing = sorted({n for node in remaining for n in node.input if n not in available})[:5]
            raise RuntimeError(f"graph has a cycle or dangling inputs: {missing}")
        pending = remaining
    sorted_nodes = [copy.deepcopy(n) for n in ordered]
    del model.graph.node[:]
    model.graph.node.extend(sorted_nodes)
    return model


@contextlib.contextmanager
def _native_output_to_log():
    """onnxsim's C++ core prints one line per node it cannot fold; send that to the debug log, not the console."""
    import os
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            lines = sink.read().decode(errors="replace").splitlines()
            if lines:
                LOG.debug("onnxsim printed %d lines, e.g.: %s", len(lines), lines[0])


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim on a standard-op model; raises if onnxsim's own check fails."""
    import onnxsim

    with _native_output_to_log():
        simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    return simplified


def simplify_around_custom_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Simplify with onnxsim while custom nodes are out of the graph, then insert them again."""
    cut_model, cut = cut_custom_nodes(model)
    simplified = simplify(cut_model)
    if not cut:
        return simplified
    restored = restore_custom_nodes(simplified, cut, model)
    # value_info of the cut-model outputs/inputs stays useful for TensorRT; drop stale entries for removed names
    produced = {name for node in restored.graph.node for name in node.output}
    infos = [v for v in restored.graph.value_info if v.name in produced]
    del restored.graph.value_info[:]
    restored.graph.value_info.extend(infos)
    return restored


def check_model(model: onnx.ModelProto | str | Path) -> None:
    """``onnx.checker`` (the path form also handles models above 2 GB); raises ``onnx.checker.ValidationError``."""
    onnx.checker.check_model(str(model) if isinstance(model, (str, Path)) else model)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type (``domain::op`` for custom domains), main graph only."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if not is_custom(node) else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def prune_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes (and initializers) that no graph output depends on."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # names used inside If/Loop bodies
                if attr.type == onnx.AttributeProto.GRAPH:
                    needed.update(n for sub in attr.g.node for n in sub.input)
    kept.reverse()
    del model.graph.node[:]
    model.graph.node.extend(kept)
    initializers = [init for init in model.graph.initializer if init.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    return model


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of initializers and ``Constant`` node outputs, by tensor name."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and not is_custom(node):
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def custom_node_inputs(model: onnx.ModelProto, batch: int = 1) -> dict[str, np.ndarray]:
    """Values of every custom node's inputs for an all-zero input batch, computed with ONNX Runtime on the graph
    with the custom nodes cut out (so no custom-op library is needed). Gives their static shapes and constants."""
    from sdconet.runtime.onnxruntime_runner import ort_session

    cut_model, cut = cut_custom_nodes(model)
    feeds = {}
    for info in cut_model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in info.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        feeds[info.name] = np.zeros(dims, dtype=dtype)
    wanted = [name for item in cut for name in item.node.input if name]
    # log severity 3: the cut-out nodes' constant inputs are "unused initializers": not news
    session = ort_session(cut_model, log_severity=3)
    available = {o.name for o in session.get_outputs()}
    constants = constant_values(cut_model)
    names = [n for n in wanted if n in available]
    values = dict(zip(names, session.run(names, feeds)))
    values.update({n: constants[n] for n in wanted if n not in values and n in constants})
    return values
