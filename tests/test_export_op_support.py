"""Static TensorRT op-support check: accepts supported ops and known plugins, rejects the rest by name."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdconet.deploy.op_support import (UnsupportedOpError, assert_tensorrt_support, check_tensorrt_support,
                                       load_op_table)


def _model(nodes, initializers=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def test_op_table_names_its_source():
    table = load_op_table()
    assert "operators.md" in table["source"] and table["tensorrt_version"]
    assert {"Conv", "MatMul", "TopK", "GatherElements", "LayerNormalization"} <= set(table["supported"])
    assert not set(table["supported"]) & set(table["unsupported"])


def test_supported_graph_passes():
    report = assert_tensorrt_support(_model([helper.make_node("Relu", ["x"], ["h"]),
                                             helper.make_node("Sigmoid", ["h"], ["y"])]))
    assert report.ok and report.op_counts == {"Relu": 1, "Sigmoid": 1}


def test_unsupported_op_is_rejected_by_name():
    model = _model([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Unique", ["h"], ["y"], name="uniq")])
    with pytest.raises(UnsupportedOpError, match="Unique") as info:
        assert_tensorrt_support(model, what="model.onnx")
    assert "node 'uniq'" in str(info.value) and str(info.value).startswith("model.onnx")
    assert check_tensorrt_support(model).offending_ops == ["Unique"]  # Relu is fine


def test_unknown_custom_op_is_rejected_and_known_plugin_accepted():
    custom = helper.make_node("MyFancyOp", ["x"], ["y"], domain="com.example")
    report = check_tensorrt_support(_model([custom], extra_opsets=["com.example"]))
    assert report.offending_ops == ["MyFancyOp"]
    accepted = check_tensorrt_support(_model([custom], extra_opsets=["com.example"]), plugins={"MyFancyOp": ["1"]})
    assert accepted.ok


def test_plugin_version_must_exist():
    node = helper.make_node("MultiscaleDeformableAttnPlugin_TRT", ["x"], ["y"], domain="trt.plugins",
                            plugin_version="7")
    report = check_tensorrt_support(_model([node], extra_opsets=["trt.plugins"]))
    assert report.offending_ops == ["MultiscaleDeformableAttnPlugin_TRT"]
    assert "plugin_version 7" in report.errors[0].reason


def test_topk_restrictions():
    k_big = numpy_helper.from_array(np.array([4000], dtype=np.int64), "k")
    topk = helper.make_node("TopK", ["x", "k"], ["y", "idx"])
    report = check_tensorrt_support(_model([topk], [k_big]))
    assert report.offending_ops == ["TopK"] and "3840" in report.errors[0].reason
    k_ok = numpy_helper.from_array(np.array([4], dtype=np.int64), "k")
    assert check_tensorrt_support(_model([topk], [k_ok])).ok


def test_opset_outside_parser_range_is_rejected():
    report = check_tensorrt_support(_model([helper.make_node("Relu", ["x"], ["y"])], opset=8))
    assert "<opset>" in report.offending_ops


def test_ops_inside_subgraphs_are_checked():
    then_graph = helper.make_graph([helper.make_node("Unique", ["x"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "cond")
    model = _model([helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)], [cond])
    assert check_tensorrt_support(model).offending_ops == ["Unique"]
