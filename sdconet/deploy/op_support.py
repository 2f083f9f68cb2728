"""Static check that TensorRT's ONNX parser can import every node of a graph, before any engine build.

The op table (``trt_onnx_ops.json`` next to this file) is the Operator Support Matrix of onnx-tensorrt's
``docs/operators.md``; its ``source``/``tensorrt_version`` fields say which release it was copied from. A node passes
when it is a supported standard op (and meets the restrictions we can check statically: TopK's ``sorted``/``K``,
zero Q/DQ zero-points, the opset range) or a custom node that names a known plugin (TensorRT's built-in plugins, or
the plugins a ``--plugin-lib`` provides). Subgraphs of If/Loop/Scan are checked too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx

from sdconet.deploy.onnx_export import STANDARD_DOMAINS, constant_values

OP_TABLE_PATH = Path(__file__).with_name("trt_onnx_ops.json")
TOPK_MAX_K = 3840  # "K input must be less than 3840"


class UnsupportedOpError(RuntimeError):
    """The graph holds ops TensorRT's ONNX parser cannot import; the message names them."""


@dataclass
class OpIssue:
    op_type: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} (node '{self.node}'): {self.reason}"


@dataclass
class OpSupportReport:
    tensorrt_version: str
    source: str
    opset: int
    op_counts: dict[str, int] = field(default_factory=dict)
    errors: list[OpIssue] = field(default_factory=list)
    warnings: list[OpIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def offending_ops(self) -> list[str]:
        return sorted({issue.op_type for issue in self.errors})

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tensorrt_version": self.tensorrt_version, "source": self.source, "opset": self.opset,
                "offending_ops": self.offending_ops, "errors": [str(e) for e in self.errors],
                "warnings": [str(w) for w in self.warnings]}


@lru_cache(maxsize=1)
def load_op_table() -> dict:
    return json.loads(OP_TABLE_PATH.read_text())


def _walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _walk_nodes(sub)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _restriction_issues(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> list[str]:
    reasons = []
    if node.op_type == "TopK":
        if _attr(node, "sorted", 1) != 1:
            reasons.append("TopK needs sorted=1")
        k = constants.get(node.input[1]) if len(node.input) > 1 else None
        if k is None:
            reasons.append("TopK's K must be a build-time constant")
        elif int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
            reasons.append(f"TopK's K={int(np.asarray(k).reshape(-1)[0])} must be below {TOPK_MAX_K}")
    elif node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
        zero_point = constants.get(node.input[2])
        if zero_point is not None and np.any(np.asarray(zero_point) != 0):
            reasons.append(f"{node.op_type} needs a zero zero-point")
    return reasons


def check_tensorrt_support(model: onnx.ModelProto, plugins: Mapping[str, Sequence[str]] | None = None
                           ) -> OpSupportReport:
    """Check every node against the op table; ``plugins`` maps extra plugin op types to their allowed versions."""
    table = load_op_table()
    supported = set(table["supported"])
    known_plugins = {name: set(versions) for name, versions in table["builtin_plugins"].items()}
    for name, versions in (plugins or {}).items():
        known_plugins.setdefault(name, set()).update(str(v) for v in versions)
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)
    report = OpSupportReport(table["tensorrt_version"], table["source"], opset)
    if not table["opset_min"] <= opset <= table["opset_max"]:
        report.errors.append(OpIssue("<opset>", "<model>", f"opset {opset} outside TensorRT {table['tensorrt_version']}"
                                     f"'s range {table['opset_min']}..{table['opset_max']}"))
    constants = constant_values(model)
    for node in _walk_nodes(model.graph):
        name = node.name or (node.output[0] if node.output else "?")
        if node.domain in STANDARD_DOMAINS:
            key = node.op_type
            if node.op_type not in supported:
                why = ("listed as unsupported" if node.op_type in table["unsupported"] else "not in the table")
                report.errors.append(OpIssue(node.op_type, name, f"{why} for TensorRT {table['tensorrt_version']}'s "
                                                                  f"ONNX parser"))
            else:
                report.errors.extend(OpIssue(node.op_type, name, r) for r in _restriction_issues(node, constants))
                if node.op_type == "GridSample":
                    report.warnings.append(OpIssue(node.op_type, name, table["restrictions"]["GridSample"]))
        else:
            key = f"{node.domain}::{node.op_type}"
            version = _attr(node, "plugin_version", b"1")
            version = version.decode() if isinstance(version, bytes) else str(version)
            if node.op_type not in known_plugins:
                report.errors.append(OpIssue(node.op_type, name, f"custom op in domain '{node.domain}' is not a "
                                                                  f"known TensorRT plugin (load its library with "
                                                                  f"--plugin-lib)"))
            elif version not in known_plugins[node.op_type]:
                report.errors.append(OpIssue(node.op_type, name, f"plugin_version {version} not available (known: "
                                                                  f"{', '.join(sorted(known_plugins[node.op_type]))})"))
        report.op_counts[key] = report.op_counts.get(key, 0) + 1
    report.op_counts = dict(sorted(report.op_counts.items()))
    return report


def assert_tensorrt_support(model: onnx.ModelProto, plugins: Mapping[str, Sequence[str]] | None = None,
                            what: str = "model") -> OpSupportReport:
    """:func:`check_tensorrt_support`, raising :class:`UnsupportedOpError` that names the offending ops."""
    report = check_tensorrt_support(model, plugins)
    if not report.ok:
        details = "\n  ".join(str(e) for e in report.errors[:20])
        more = f"\n  ... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        raise UnsupportedOpError(f"{what}: ops not importable by TensorRT {report.tensorrt_version}'s ONNX parser: "
                                 f"{', '.join(report.offending_ops)}\n  {details}{more}")
    return report
