"""The package's layers (docs/architecture.md): the import-linter contract, no import cycle, and the old import paths
of moved modules."""
from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from sdconet.utils.moved import MOVED_MODULES
from sdconet.utils.process import pid_alive

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sdconet"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # import-linter is a dev requirement: never skipped


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))  # grimp scans the package found on the path: this tree's
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "pyproject.toml"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contract_is_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "sdconet", ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    victim = tmp_path / "sdconet" / "kernels" / "msda_plugin.py"
    lines = victim.read_text().splitlines()
    victim.write_text("\n".join(lines + ["", "", "def _upward():", "    from sdconet.deploy import exporter", ""]))
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "sdconet.kernels is not allowed to import sdconet.deploy" in result.stdout
    assert f"sdconet.kernels.msda_plugin -> sdconet.deploy.exporter (l.{len(lines) + 4})" in result.stdout


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every sdconet module ``path`` imports, function bodies included (``from a import b`` counts a.b when b is a
    module, else a)."""
    name, found = _module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("sdconet")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def test_no_import_cycle_between_files_or_sub_packages():
    files = _import_graph()
    assert _cycles(files) == []

    def package_of(name: str) -> str:
        return ".".join(name.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for name, targets in files.items():
        # the root package's own modules (sdconet/__init__.py, the top-level CLI shims) sit outside the layers
        if name.count(".") >= 1:
            packages.setdefault(package_of(name), set()).update(
                package_of(t) for t in targets if t.count(".") >= 1 and package_of(t) != package_of(name))
    assert _cycles(packages) == []


def test_the_cycle_scan_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_a_moved_module_keeps_its_old_import_path(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    parent, _, leaf = old.rpartition(".")
    assert getattr(importlib.import_module(parent), leaf) is module
    assert not (ROOT / (old.replace(".", "/") + ".py")).exists()  # the table, not a second copy, answers


def test_nothing_in_the_project_uses_an_old_path():
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / "train").glob("*.py"), *(ROOT / "export").glob("*.py"),
               *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    users = {str(p.relative_to(ROOT)): sorted(_imports(p) & set(MOVED_MODULES)) for p in sources
             if p.name != "test_architecture.py"}
    assert {k: v for k, v in users.items() if v} == {}


def test_re_exported_names_are_the_moved_objects():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these old attribute paths goes through the moved-module table
        from sdconet.benchmark.timing import peak_rss_mb
        from sdconet.deploy.exporter import MSDA_EXCLUDE_PATTERN, fused_cpu_kernel_ready
        from sdconet.deploy.msda_plugin import ort_session, trt_plugin_spec
        from sdconet.deploy.tensorrt_build import import_tensorrt, read_engine_metadata
        from sdconet.engine.distributed import reduce_mean
        from sdconet.engine.visualize import resize
        from sdconet.serve.client import SDCoNetClient
        from sdconet.serve.scene_client import TritonSceneClient
    from sdconet import kernels, runtime, utils  # noqa: F401
    from sdconet.deploy import msda_plugin
    import sdconet.kernels.cpu
    import sdconet.kernels.msda_plugin
    import sdconet.runtime.metadata
    import sdconet.runtime.onnxruntime_runner
    import sdconet.runtime.triton_client
    import sdconet.utils.distributed
    import sdconet.utils.image
    import sdconet.utils.process
    import sdconet.utils.tensorrt

    assert peak_rss_mb is sdconet.utils.process.peak_rss_mb
    assert MSDA_EXCLUDE_PATTERN == msda_plugin.MSDA_EXCLUDE_PATTERN
    assert fused_cpu_kernel_ready is sdconet.kernels.cpu.fused_cpu_kernel_ready
    assert ort_session is sdconet.runtime.onnxruntime_runner.ort_session
    assert trt_plugin_spec is sdconet.kernels.msda_plugin.trt_plugin_spec
    assert import_tensorrt is sdconet.utils.tensorrt.import_tensorrt
    assert read_engine_metadata is sdconet.runtime.metadata.read_engine_metadata
    assert reduce_mean is sdconet.utils.distributed.reduce_mean
    assert resize is sdconet.utils.image.resize
    assert SDCoNetClient is sdconet.runtime.triton_client.SDCoNetClient
    assert TritonSceneClient is sdconet.runtime.triton_client.TritonSceneClient


def test_pid_alive():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)  # reaped: the pid names no process (reuse within this instant is not plausible)
