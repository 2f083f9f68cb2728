"""MSDA plugin node: TensorRT layout, ONNX Runtime custom op, simplification around it, plugin <-> pure-ONNX swap."""
import numpy as np
import onnx
import pytest
import torch

from sdconet.deploy import msda_plugin as mp
from sdconet.deploy.onnx_export import check_model, export_module, op_counts, simplify_around_custom_nodes
from sdconet.models.deformable_attention import MSDeformAttn
from sdconet.ops.msda import msda_grid_sample, msda_naive, multi_scale_deformable_attn

SHAPES = [(8, 8), (4, 4)]
TOKENS = sum(h * w for h, w in SHAPES)


class MSDAOnly(torch.nn.Module):
    """Self-attention over two levels with fixed reference points that reach outside [0, 1] (zero padding)."""

    def __init__(self, impl: str) -> None:
        super().__init__()
        self.attn = MSDeformAttn(d_model=32, num_levels=2, num_heads=4, num_points=2, impl=impl)
        self.register_buffer("reference", torch.rand(1, TOKENS, 2, 2) * 1.4 - 0.2)
        for p in self.attn.parameters():
            torch.nn.init.normal_(p, std=0.3)

    def forward(self, tokens):  # [B, S, 32]
        starts = torch.tensor(mp.level_start_index_for(SHAPES))
        reference = self.reference.expand(tokens.shape[0], -1, -1, -1)
        return self.attn(tokens, reference, tokens, SHAPES, starts)


def _export(version: int = 1):
    module = MSDAOnly("plugin").eval()
    tokens = torch.randn(2, TOKENS, 32)
    with mp.use_plugin_spec(mp.trt_plugin_spec(version)):
        exported = export_module(module, tokens, input_name="tokens", output_names=["out"],
                                 custom_domains=[mp.PLUGIN_DOMAIN])
    return module, simplify_around_custom_nodes(exported)


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    return _export(1)


def _random_msda_inputs(batch=2, queries=5, heads=3, dim=4, points=2):
    value = torch.randn(batch, TOKENS, heads, dim)
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(SHAPES), points).softmax(-1)
    return value, locations, weights


def test_ort_plugin_op_matches_grid_sample():
    value, locations, weights = _random_msda_inputs()
    starts = np.array(mp.level_start_index_for(SHAPES), dtype=np.int32)
    out = mp.msda_plugin_reference(value.numpy(), np.array(SHAPES, dtype=np.int32), starts, locations.numpy(),
                                   weights.numpy())
    reference = msda_grid_sample(value, SHAPES, None, locations, weights)
    assert out.shape == (2, 5, 3, 4)  # the plugin's [N, Lq, M, D]
    np.testing.assert_allclose(out.reshape(2, 5, 12), reference.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="level_start_index"):
        mp.msda_plugin_reference(value.numpy(), np.array(SHAPES, dtype=np.int32), starts[::-1].copy(),
                                 locations.numpy(), weights.numpy())


def test_plugin_impl_eager_matches_grid_sample_and_the_naive_loop():
    """The eager ``plugin`` path runs the gather form: check it against the two forms it is not built on."""
    value, locations, weights = _random_msda_inputs()
    out = multi_scale_deformable_attn(value, SHAPES, None, locations, weights, impl="plugin")
    torch.testing.assert_close(out, msda_grid_sample(value, SHAPES, None, locations, weights), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, msda_naive(value, SHAPES, None, locations, weights), atol=1e-5, rtol=0)


# A case small enough to compute by hand from the plugin's documented semantics: value [N=1, S=8, M=2, D=2] with
# value[0, s, m, d] = s + 10 d + 100 m; two levels (H, W) = (2, 3) and (1, 2), so level 1 starts at token 6; one
# query, P = 2 points per level, locations (x, y) in [0, 1] with pixel x * W - 0.5 (zero outside the map).
HAND_SHAPES = [(2, 3), (1, 2)]
HAND_LOCATIONS = [  # [M][L][P] -> (x, y)
    [[(2.5 / 3, 0.75), (0.0, 0.25)],  # head 0, level 0: token 5 (row 1, col 2); half of token 0 (x at -0.5)
     [(0.75, 0.5), (0.5, 0.5)]],      # head 0, level 1: token 7; the mean of tokens 6 and 7
    [[(0.5 / 3, 0.25), (0.5, 0.75)],  # head 1, level 0: token 0; token 4 (row 1, col 1)
     [(0.25, 0.5), (1.5, 0.5)]],      # head 1, level 1: token 6; fully outside (x at 2.5): 0
]
HAND_WEIGHTS = [[[0.4, 0.2], [0.3, 0.1]], [[0.1, 0.6], [0.2, 0.1]]]  # [M][L][P]
# with c = 10 d + 100 m: head 0 = 0.4 (5 + c) + 0.2 (0 + c) / 2 + 0.3 (7 + c) + 0.1 (13 + 2 c) / 2 = 4.75 + 0.9 c;
# head 1 = 0.1 (0 + c) + 0.6 (4 + c) + 0.2 (6 + c) + 0 = 3.6 + 0.9 c
HAND_EXPECTED = [[4.75, 13.75], [93.6, 102.6]]  # [M][D]


def _hand_inputs():
    s = np.arange(8, dtype=np.float32)[:, None, None]
    value = (s + 10 * np.arange(2)[None, None, :] + 100 * np.arange(2)[None, :, None])[None].astype(np.float32)
    locations = np.array(HAND_LOCATIONS, np.float32)[None, None]  # [1, 1, M, L, P, 2]
    weights = np.array(HAND_WEIGHTS, np.float32)[None, None]  # [1, 1, M, L, P]
    return value, np.array(HAND_SHAPES, np.int32), np.array([0, 6], np.int32), locations, weights


def test_plugin_stand_in_reproduces_a_hand_computed_case():
    """The ONNX Runtime stand-in of the TensorRT plugin, as a one-node graph in the plugin's input order, gives the
    hand-computed output: value layout [N, S, M, D], spatial shapes (H, W), level start index, (x, y) order."""
    inputs = _hand_inputs()
    names = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"]
    kinds = [onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT32, onnx.TensorProto.FLOAT,
             onnx.TensorProto.FLOAT]
    node = onnx.helper.make_node(mp.TRT_PLUGIN_OP_TYPE, names, ["out"], domain=mp.PLUGIN_DOMAIN, plugin_version="1")
    graph = onnx.helper.make_graph(
        [node], "msda_hand", [onnx.helper.make_tensor_value_info(n, k, a.shape) for n, k, a in zip(names, kinds, inputs)],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 1, 2, 2])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid(mp.PLUGIN_DOMAIN, 1)])
    (out,) = mp.ort_session(model).run(None, dict(zip(names, inputs)))
    np.testing.assert_allclose(out[0, 0], HAND_EXPECTED, atol=1e-4)
    np.testing.assert_allclose(mp.msda_plugin_reference(*inputs)[0, 0], HAND_EXPECTED, atol=1e-4)
    # and every PyTorch form agrees with the hand figures
    value, _, _, locations, weights = (torch.from_numpy(a) for a in inputs)
    for impl in ("grid_sample", "gather", "naive"):
        got = multi_scale_deformable_attn(value, HAND_SHAPES, None, locations, weights, impl=impl)
        np.testing.assert_allclose(got.view(2, 2).numpy(), HAND_EXPECTED, atol=1e-4, err_msg=impl)


def _plugin_attributes(model):
    (node,) = [n for n in model.graph.node if n.domain == mp.PLUGIN_DOMAIN]
    assert node.op_type == mp.TRT_PLUGIN_OP_TYPE
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_plugin_version_attribute(exported):
    assert _plugin_attributes(exported[1]) == {"plugin_version": b"1"}
    assert _plugin_attributes(_export(2)[1]) == {"plugin_version": b"2"}  # IPluginV3 variant, TensorRT >= 10.11


def test_plugin_node_inputs_in_tensorrt_order(exported):
    _, model = exported
    check_model(model)
    (node,) = [n for n in model.graph.node if n.op_type == mp.TRT_PLUGIN_OP_TYPE]
    assert len(node.input) == 5 and len(node.output) == 1
    from sdconet.deploy.onnx_export import constant_values, custom_node_inputs

    values = custom_node_inputs(model)
    value, shapes, starts, locations, weights = (values[name] for name in node.input)
    assert value.shape == (1, TOKENS, 4, 8)  # [N, S, M, D]
    assert shapes.dtype == np.int32 and shapes.tolist() == [list(s) for s in SHAPES]
    assert starts.dtype == np.int32 and starts.tolist() == [0, 64]
    assert locations.shape == (1, TOKENS, 4, 2, 2, 2)  # [N, Lq, M, L, P, 2]
    assert weights.shape == (1, TOKENS, 4, 2, 2)  # [N, Lq, M, L, P]
    # the spatial shapes are graph constants (TensorRT needs them as build-time values)
    assert node.input[1] in constant_values(model)


def test_plugin_graph_on_onnxruntime_matches_pytorch(exported):
    module, model = exported
    session = mp.ort_session(model)
    for batch in (2, 3):  # dynamic batch
        tokens = torch.randn(batch, TOKENS, 32)
        with torch.no_grad():
            reference = module(tokens).numpy()
        (out,) = session.run(None, {"tokens": tokens.numpy()})
        np.testing.assert_allclose(out, reference, atol=1e-5, rtol=1e-5)


def test_simplification_keeps_plugin_and_folds_the_rest(exported):
    module, simplified = exported
    with mp.use_plugin_spec(mp.trt_plugin_spec(1)):
        raw = export_module(module, torch.randn(2, TOKENS, 32), input_name="tokens", output_names=["out"],
                            custom_domains=[mp.PLUGIN_DOMAIN])
    assert op_counts(simplified)[f"{mp.PLUGIN_DOMAIN}::{mp.TRT_PLUGIN_OP_TYPE}"] == 1
    assert len(simplified.graph.node) < len(raw.graph.node)
    assert [o.name for o in simplified.graph.output] == ["out"]
    assert [i.name for i in simplified.graph.input] == ["tokens"]


def test_swap_plugin_nodes_for_onnx_and_back(exported):
    module, plugin_model = exported
    pure = mp.plugin_nodes_to_onnx(plugin_model, [mp.TRT_PLUGIN_OP_TYPE])
    check_model(pure)
    assert not [n for n in pure.graph.node if n.domain not in ("", "ai.onnx")]
    assert "GridSample" not in op_counts(pure)  # TensorRT's GridSample has wrong-result bugs
    tokens = torch.randn(2, TOKENS, 32)
    with torch.no_grad():
        reference = module(tokens).numpy()
    (out,) = mp.ort_session(pure).run(None, {"tokens": tokens.numpy()})
    np.testing.assert_allclose(out, reference, atol=1e-5, rtol=1e-5)

    back = mp.onnx_msda_to_plugin_nodes(pure, plugin_model, [mp.TRT_PLUGIN_OP_TYPE])
    check_model(back)
    assert op_counts(back) == op_counts(plugin_model)
    (out_back,) = mp.ort_session(back).run(None, {"tokens": tokens.numpy()})
    np.testing.assert_allclose(out_back, reference, atol=1e-5, rtol=1e-5)


def test_plugin_version_is_validated():
    with pytest.raises(ValueError, match="plugin-version"):
        mp.trt_plugin_spec(3)


def test_sdconet_plugin_node_matches_the_kernel_plugin_signature():
    """``--msda sdconet``: our AOT plugin's node, checked with the kernel package's own signature check."""
    from sdconet.deploy.op_support import check_tensorrt_support
    from sdconet.kernels import trt_plugin

    spec = mp.sdconet_plugin_spec()
    torch.manual_seed(0)
    module = MSDAOnly("plugin").eval()
    tokens = torch.randn(2, TOKENS, 32)
    with mp.use_plugin_spec(spec):
        raw = export_module(module, tokens, input_name="tokens", output_names=["out"], custom_domains=[spec.domain])
    model = simplify_around_custom_nodes(raw)
    check_model(model)
    (node,) = [n for n in model.graph.node if n.domain == trt_plugin.PLUGIN_NAMESPACE]
    trt_plugin.check_msda_node(node, onnx.shape_inference.infer_shapes(model).graph)
    assert check_tensorrt_support(model, plugins={spec.op_type: [trt_plugin.PLUGIN_VERSION]}).ok
    assert not check_tensorrt_support(model).ok  # unknown to TensorRT unless its plugin is declared
    with torch.no_grad():
        reference = module(tokens).numpy()
    (out,) = mp.ort_session(model).run(None, {"tokens": tokens.numpy()})
    np.testing.assert_allclose(out, reference, atol=1e-5, rtol=1e-5)
    pure = mp.plugin_nodes_to_onnx(model, [spec.op_type])
    (out_pure,) = mp.ort_session(pure).run(None, {"tokens": tokens.numpy()})
    np.testing.assert_allclose(out_pure, reference, atol=1e-5, rtol=1e-5)


# ops whose inputs must all have one element type (ONNX type constraint T): where an FP32 plugin output meeting FP16
# weights would make a strongly typed TensorRT network fail
SAME_TYPE_OPS = {"MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Concat", "Where"}


def _fp16_after_msda(pure):
    """What ModelOpt's ``high_precision_dtype=fp16`` does around an unquantized MSDA subgraph, by hand: the subgraph
    ends in FP16 and everything downstream of it runs in FP16 (weights converted), the graph output cast back."""
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(pure)
    graph = model.graph
    (boundary,) = [o for n in graph.node if n.name.startswith(mp.MSDA_SUBGRAPH_PREFIX) for o in n.output
                   if any(o in m.input for m in graph.node if not m.name.startswith(mp.MSDA_SUBGRAPH_PREFIX))]
    producer = next(n for n in graph.node if boundary in n.output)
    producer.output[list(producer.output).index(boundary)] = boundary + "_f32"
    graph.node.append(helper.make_node("Cast", [boundary + "_f32"], [boundary], to=TensorProto.FLOAT16,
                                       name=f"{mp.MSDA_SUBGRAPH_PREFIX}0/to_fp16"))
    downstream, frontier = set(), {boundary}
    while frontier:
        frontier = {o for n in graph.node if set(n.input) & frontier for o in n.output} - downstream
        downstream |= frontier
    inits = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if set(node.input) & (downstream | {boundary}):
            for name in node.input:
                if name in inits and inits[name].data_type == TensorProto.FLOAT:
                    inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name])
                                                                 .astype(np.float16), name))
    (out,) = graph.output
    last = next(n for n in graph.node if out.name in n.output)
    last.output[list(last.output).index(out.name)] = out.name + "_f16"
    graph.node.append(helper.make_node("Cast", [out.name + "_f16"], [out.name], to=TensorProto.FLOAT))
    del graph.value_info[:]
    from sdconet.deploy.onnx_export import topological_sort

    return topological_sort(model), boundary


def _type_disagreements(model):
    """Nodes of SAME_TYPE_OPS whose inputs' element types differ, after shape inference. A custom node's output type
    is its declared value_info; the plugin computes in its value input's type, which must agree with it."""
    types = mp.tensor_elem_types(model)
    problems = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            declared = types.get(node.output[0])
            assert declared is not None, f"custom node {node.name}: output type not declared"
            assert declared == types[node.input[0]], (node.name, declared, types[node.input[0]])
        elif node.op_type in SAME_TYPE_OPS:
            data_inputs = node.input[1:] if node.op_type == "Where" else node.input  # Where's condition is bool
            seen = {name: types.get(name) for name in data_inputs if name}
            if len(set(seen.values())) > 1:
                problems.append((node.op_type, node.name, seen))
    return problems


def test_int8_fp16_plugin_swap_keeps_consumer_types_consistent(exported):
    """high_precision_dtype=fp16: the plugin's inputs are cast to FP32, so its output must be cast back to the FP16
    the replaced subgraph produced, or the output projection's MatMul sees FP32 and FP16 (issue 24)."""
    module, plugin_model = exported
    pure = mp.plugin_nodes_to_onnx(plugin_model, [mp.TRT_PLUGIN_OP_TYPE])
    half, boundary = _fp16_after_msda(pure)
    check_model(half)
    tokens = torch.randn(2, TOKENS, 32)
    (out_half,) = mp.ort_session(half).run(None, {"tokens": tokens.numpy()})  # ONNX Runtime accepts its types
    with torch.no_grad():
        np.testing.assert_allclose(out_half, module(tokens).numpy(), atol=2e-2, rtol=2e-2)

    swapped = mp.onnx_msda_to_plugin_nodes(half, plugin_model, [mp.TRT_PLUGIN_OP_TYPE], cast_float_inputs=True)
    check_model(swapped)
    assert _type_disagreements(swapped) == []
    types = mp.tensor_elem_types(swapped)
    assert types[boundary] == onnx.TensorProto.FLOAT16  # what the replaced subgraph produced
    (plugin,) = [n for n in swapped.graph.node if n.op_type == mp.TRT_PLUGIN_OP_TYPE]
    assert types[plugin.output[0]] == onnx.TensorProto.FLOAT  # it computes in FP32 (inputs cast)

    fp32_swap = mp.onnx_msda_to_plugin_nodes(pure, plugin_model, [mp.TRT_PLUGIN_OP_TYPE], cast_float_inputs=True)
    assert "plugin0_cast_out" in {n.name for n in swapped.graph.node}
    assert "plugin0_cast_out" not in {n.name for n in fp32_swap.graph.node}  # FP32 graph: inputs cast, no cast back
    assert _type_disagreements(fp32_swap) == []
