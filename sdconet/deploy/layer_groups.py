"""Names, layer groups and MAC shares of the exported graph's compute nodes (Conv / MatMul / Gemm).

Three things the INT8 paths share (issue 21):

* :func:`name_compute_nodes` — onnxsim fuses ``MatMul + Add`` into ``Gemm_<k>`` nodes that have lost their module
  scope. Each such node is renamed after the module its weights belong to (``model.detector.encoder.layers.0.attn.
  sampling_offsets/Gemm``) or, for folded biases, after the scope of the nodes around it, so that ``--int8-exclude
  REGEX`` and the study's groups can address every layer by name.
* :data:`LAYER_GROUPS` / :func:`node_groups` — the groups of the sensitivity study (encoder stages, neck, each
  deformable layer's four projections, FFNs, decoder layers, heads, the proposal head), as regexes over those names.
* :func:`compute_macs` / :func:`int8_mac_fraction` — MACs per compute node (from ONNX shape inference at batch 1) and
  the share of them a quantized graph runs in INT8: a node counts when its data *and* weight inputs come out of a
  ``DequantizeLinear`` (ONNX QDQ) or a ``FakeQuantize`` / int8 constant (OpenVINO IR).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
# (group, regex over node names); a node belongs to the first group that matches (order matters)
_ENC, _DEC = r"(?:/encoder/layers\.|encoder\.layers\.)", r"(?:/decoder/layers\.|decoder\.layers\.)"
LAYER_GROUPS: tuple[tuple[str, str], ...] = (
    ("swin.patch_embed", r".*patch_embed.*"),
    *((f"swin.stage{i}", rf".*(?:/encoder/layers_{i}/|swin\.layers_{i}\.).*") for i in range(4)),
    ("neck", r".*neck.*"),
    ("saliency_head", r".*saliency.*"),
    ("encoder.foreground_attn", r".*foreground_attn.*"),
    *((f"encoder.layer{i}.{part}", rf".*{_ENC}{i}[/.]attn[/.]{part}.*") for i in range(6)
      for part in ("value_proj", "sampling_offsets", "attention_weights", "output_proj")),
    *((f"encoder.layer{i}.ffn", rf".*{_ENC}{i}[/.]ffn.*") for i in range(6)),
    ("proposal_head", r".*query_selection.*"),
    ("decoder.ref_point_head", r".*ref_point_head.*"),
    *((f"decoder.layer{i}.self_attn", rf".*{_DEC}{i}[/.]self_attn.*") for i in range(6)),
    *((f"decoder.layer{i}.cross_attn.{part}", rf".*{_DEC}{i}[/.]cross_attn[/.]{part}.*") for i in range(6)
      for part in ("value_proj", "sampling_offsets", "attention_weights", "output_proj")),
    *((f"decoder.layer{i}.ffn", rf".*{_DEC}{i}[/.]ffn.*") for i in range(6)),
    ("decoder.box_heads", r".*box_heads.*"),
    ("decoder.class_heads", r".*class_heads.*"),
)
_TRANSPARENT = ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Flatten")


def _scope(name: str) -> str | None:
    """The module scope of a torch-exported node name (``/a/b/Op`` -> ``/a/b``), None for an unscoped name."""
    return name.rsplit("/", 1)[0] if name.startswith("/") and name.count("/") > 1 else None


def name_compute_nodes(model) -> int:
    """Rename, in place, the compute nodes of ``model`` whose name carries no module scope; returns how many.

    First choice: the module path of a ``model.*`` initializer the node reads (its weight or bias); else the scope
    of the node's consumers (then producers). Names stay unique (``_<k>`` suffix on a clash).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    used = {node.name for node in model.graph.node}
    renamed = 0
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or _scope(node.name) or "/" in node.name:
            continue
        base = next((name.rsplit(".", 1)[0] for name in node.input[1:] if name.startswith("model.")), None)
        if base is None:
            around = [n.name for out in node.output for n in consumers.get(out, [])]
            around += [producers[i].name for i in node.input[:1] if i in producers]
            base = next((s for s in map(_scope, around) if s), None)
        if base is None:
            continue
        name, k = f"{base}/{node.op_type}", 1
        while name in used:
            name, k = f"{base}/{node.op_type}_{k}", k + 1
        used.add(name)
        node.name = name
        renamed += 1
    return renamed


def node_groups(names: Iterable[str], groups: Sequence[tuple[str, str]] = LAYER_GROUPS) -> dict[str, list[str]]:
    """``{group: [node names]}`` for the groups that match at least one of ``names`` (first match wins)."""
    compiled = [(group, re.compile(pattern)) for group, pattern in groups]
    found: dict[str, list[str]] = {}
    for name in names:
        for group, pattern in compiled:
            if pattern.fullmatch(name):
                found.setdefault(group, []).append(name)
                break
    return {group: found[group] for group, _ in groups if group in found}


def matching_nodes(model, patterns: Sequence[str], op_types: Sequence[str] | None = None) -> list[str]:
    """Names of ``model``'s nodes (of ``op_types``, default all) that fully match any regex in ``patterns``."""
    compiled = [re.compile(p) for p in patterns]
    return [node.name for node in model.graph.node if (op_types is None or node.op_type in op_types)
            and any(p.fullmatch(node.name) for p in compiled)]


def check_patterns(patterns: Sequence[str]) -> None:
    """A clear error naming the bad ``--int8-exclude`` regex."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"--int8-exclude {pattern!r} is not a valid regular expression: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# MACs
# ----------------------------------------------------------------------------------------------------------------
def _static_shapes(model) -> dict[str, list[int]]:
    """Tensor shapes of ``model`` at batch 1 (ONNX shape inference with the batch axis fixed)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _run_shapes(model, names: Sequence[str]) -> dict[str, list[int]]:
    """Shapes of the tensors ``names`` in one ONNX Runtime run of ``model`` on a zero batch of 1."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in model.graph.output} | {i.name for i in model.graph.initializer}
    wanted = [n for n in dict.fromkeys(names) if n not in known]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in value.shape]
        feed[value.name] = np.zeros(shape, dtype=np.float32)
    outputs = session.run(wanted, feed)
    return {name: list(array.shape) for name, array in zip(wanted, outputs)}


def compute_macs(model) -> dict[str, int]:
    """MACs of each Conv / MatMul / Gemm of ``model`` (ONNX ModelProto) per image; nodes whose shapes cannot be
    inferred are left out (a ValueError when that is every node)."""
    shapes = _static_shapes(model)
    missing = [n for n in model.graph.node if n.op_type in COMPUTE_OPS
               and not all(t in shapes for t in (n.output[0], *n.input[:2]))]
    if missing:  # data-dependent shapes (after TopK: the decoder's queries): measured by one run at batch 1
        shapes.update(_run_shapes(model, [t for n in missing for t in (n.output[0], *n.input[:2])]))
    macs: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        out = shapes.get(node.output[0])
        a, b = (shapes.get(name) for name in node.input[:2])
        if out is None or b is None:
            continue
        if node.op_type == "Conv":  # out elements x (Cin/groups x kernel)
            macs[node.name] = int(np.prod(out)) * int(np.prod(b[1:]))
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            macs[node.name] = int(np.prod(out)) * int(b[1] if trans_b else b[0])
        else:
            k = a[-1] if a else (b[-2] if len(b) >= 2 else b[0])
            macs[node.name] = int(np.prod(out)) * int(k)
    if not macs:
        raise ValueError("no compute node has inferable shapes: cannot count MACs")
    return macs


def _from_dequantize(name: str, producers: dict) -> bool:
    node = producers.get(name)
    while node is not None and node.op_type in _TRANSPARENT:
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "DequantizeLinear"


def quantized_compute_nodes(model) -> list[str]:
    """Compute nodes of a QDQ ONNX whose first two inputs both come out of a DequantizeLinear."""
    producers = {out: node for node in model.graph.node for out in node.output}
    return [node.name for node in model.graph.node if node.op_type in COMPUTE_OPS
            and all(_from_dequantize(i, producers) for i in node.input[:2])]


def int8_mac_fraction(model, macs: dict[str, int] | None = None) -> dict:
    """Share of the compute MACs a QDQ ONNX (path or ModelProto) runs in INT8:
    ``{"int8_mac_fraction", "int8_macs", "total_macs", "int8_nodes", "compute_nodes"}``."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    macs = compute_macs(model) if macs is None else macs
    quantized = set(quantized_compute_nodes(model)) & set(macs)
    int8 = sum(v for k, v in macs.items() if k in quantized)
    total = sum(macs.values())
    return {"int8_mac_fraction": round(int8 / total, 4), "int8_macs": int(int8), "total_macs": int(total),
            "int8_nodes": len(quantized), "compute_nodes": len(macs)}


def openvino_int8_mac_fraction(model) -> dict:
    """The same share for an OpenVINO model (``ov.Model``, static shapes): MatMul / Convolution nodes whose data input
    comes from a FakeQuantize and whose weight from a FakeQuantize or an int8 constant (compressed weights)."""
    transparent = ("Convert", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Multiply", "Subtract")

    def origin(value):
        node = value.get_source_output().get_node()
        while node.get_type_name() in transparent and node.inputs():
            if node.get_type_name() == "Convert" and node.input(0).get_element_type().get_type_name() in ("i8",
                                                                                                        "u8"):
                return "int8"
            node = node.input(0).get_source_output().get_node()
        if node.get_type_name() == "FakeQuantize":
            return "int8"
        if node.get_type_name() == "Constant" and node.get_output_element_type(0).get_type_name() in ("i8", "u8"):
            return "int8"
        return node.get_type_name()

    total = int8 = nodes = quantized = 0
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind not in ("MatMul", "Convolution"):
            continue
        out = list(op.get_output_shape(0))
        a, b = (list(op.input(i).get_shape()) for i in (0, 1))
        if kind == "Convolution":
            count = int(np.prod(out)) * int(np.prod(b[1:]))
        else:
            transpose_a = op.get_attributes().get("transpose_a", False)
            k = (a[-2] if transpose_a else a[-1]) if len(a) > 1 else a[0]
            count = int(np.prod(out)) * int(k)
        total += count
        nodes += 1
        if all(origin(op.input(i)) == "int8" for i in (0, 1)):
            int8 += count
            quantized += 1
    if not total:
        raise ValueError("the OpenVINO model has no MatMul / Convolution: cannot count MACs")
    return {"int8_mac_fraction": round(int8 / total, 4), "int8_macs": int(int8), "total_macs": int(total),
            "int8_nodes": quantized, "compute_nodes": nodes}
