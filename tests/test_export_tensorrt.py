"""TensorRT engine build: the bookkeeping that runs without TensorRT (import guard, timing cache fallback, precision
of strongly typed builds, the engine sidecar, PTX facts of the plugin kernel), then engine build + runtime on an MSDA
plugin graph, skipped with the exact reason without TensorRT/GPU."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sdconet.deploy import msda_plugin as mp
from sdconet.deploy.onnx_export import export_module, save_model, simplify_around_custom_nodes
from sdconet.deploy.tensorrt_build import (EngineBuildOptions, TensorRTUnavailable, attach_timing_cache,
                                           build_engine, check_build_precision, default_timing_cache_path,
                                           import_tensorrt, onnx_precision_evidence, read_engine_metadata,
                                           tensorrt_major, tensorrt_unavailable_reason, write_engine_metadata)
from sdconet.kernels.trt_plugin import ptx_facts
from sdconet.models.deformable_attention import MSDeformAttn
from needs import optional_import

REASON = tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(REASON is not None, reason=REASON or "")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Without TensorRT
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_tensorrt_dir(tmp_path, monkeypatch):
    """A folder first on sys.path for a stand-in ``tensorrt.py``; whatever ``tensorrt`` module the test imports is
    dropped afterwards (monkeypatch.delitem of an absent key restores nothing, so an imported fake would stay in
    sys.modules and every later test would see it)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = sys.modules.pop("tensorrt", None)
    yield tmp_path
    sys.modules.pop("tensorrt", None)
    if saved is not None:
        sys.modules["tensorrt"] = saved


def test_import_guard_turns_any_import_error_into_tensorrt_unavailable(fake_tensorrt_dir):
    # the PyPI stub raises at import with its own exception types, not ImportError
    (fake_tensorrt_dir / "tensorrt.py").write_text("raise OSError('stub wheel: install from pypi.nvidia.com')\n")
    with pytest.raises(TensorRTUnavailable, match=r"OSError: stub wheel"):
        import_tensorrt()
    assert "OSError: stub wheel" in tensorrt_unavailable_reason()


def test_import_guard_refuses_a_module_that_is_not_tensorrt(fake_tensorrt_dir):
    (fake_tensorrt_dir / "tensorrt.py").write_text("__version__ = '0.0.1'\n")
    with pytest.raises(TensorRTUnavailable, match="not NVIDIA's TensorRT Python bindings"):
        import_tensorrt()


def test_default_timing_cache_is_keyed_by_version_and_gpu(tmp_path):
    h200 = default_timing_cache_path(tmp_path, "10.13.0.35", "NVIDIA H200")
    assert h200 == tmp_path / "timing_trt10.13.0.35_NVIDIA-H200.cache"
    assert default_timing_cache_path(tmp_path, "11.1.0", "NVIDIA H200") != h200
    assert default_timing_cache_path(tmp_path, "10.13.0.35", "Orin (nvgpu)") == \
        tmp_path / "timing_trt10.13.0.35_Orin-nvgpu.cache"


class FakeBuilderConfig:
    """Records what attach_timing_cache does with an IBuilderConfig (bookkeeping only: no engine is built)."""

    def __init__(self, accept_blob: bool) -> None:
        self.accept_blob = accept_blob
        self.attached = []

    def create_timing_cache(self, blob: bytes):
        return ("cache", bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False  # a mismatched cache must be reported, never used
        accepted = self.accept_blob or cache[1] == b""
        if accepted:
            self.attached.append(cache)
        return accepted


def test_timing_cache_loaded_when_accepted():
    config = FakeBuilderConfig(accept_blob=True)
    assert attach_timing_cache(config, b"blob", "x.cache") == "loaded"
    assert config.attached == [("cache", b"blob")]


def test_timing_cache_rejected_falls_back_to_fresh_with_warning(caplog):
    config = FakeBuilderConfig(accept_blob=False)
    with caplog.at_level(logging.WARNING, logger="sdconet.deploy.tensorrt_build"):
        assert attach_timing_cache(config, b"from another gpu", "old.cache") == "rejected"
    assert config.attached == [("cache", b"")]
    assert "rejected the timing cache old.cache" in caplog.text


def test_timing_cache_fresh_without_file():
    config = FakeBuilderConfig(accept_blob=False)
    assert attach_timing_cache(config, b"", "none") == "fresh"
    assert config.attached == [("cache", b"")]


def _tiny_onnx(path: Path, kind: str) -> Path:
    """x [B,4] -> MatMul(W) -> y: FP32, FP16 inside (Cast + FP16 weight, FP32 I/O as AutoCast keeps them) or Q/DQ."""
    weight = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
    nodes, inits = [], []
    x = "x"
    if kind == "fp16":
        inits.append(onnx.numpy_helper.from_array(weight.astype(np.float16), "W"))
        nodes += [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
                  helper.make_node("MatMul", ["x16", "W"], ["y16"]),
                  helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    else:
        inits.append(onnx.numpy_helper.from_array(weight, "W"))
        if kind == "int8":
            inits += [onnx.numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
                      onnx.numpy_helper.from_array(np.array(0, np.int8), "zero")]
            nodes += [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
                      helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xdq"])]
            x = "xdq"
        nodes.append(helper.make_node("MatMul", [x, "W"], ["y"]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind, expected", [("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8")])
def test_strongly_typed_precision_comes_from_the_graph(tmp_path, kind, expected):
    evidence = onnx_precision_evidence(_tiny_onnx(tmp_path / f"{kind}.onnx", kind))
    assert check_build_precision(expected, evidence, strongly_typed=True, what=kind) == expected


def test_strongly_typed_fp16_build_refuses_an_fp32_onnx(tmp_path):
    evidence = onnx_precision_evidence(_tiny_onnx(tmp_path / "fp32.onnx", "fp32"))
    assert evidence == {"qdq_nodes": 0, "fp16_tensors": 0, "fp16_casts": 0}
    with pytest.raises(ValueError, match=r"would build an FP32 engine .* not the requested FP16: pass the ModelOpt "
                                         r"AutoCast FP16 ONNX"):
        check_build_precision("fp16", evidence, strongly_typed=True, what="fp32.onnx")
    # TensorRT 10 is weakly typed: the FP16 builder flag makes the same ONNX an FP16 engine
    assert check_build_precision("fp16", evidence, strongly_typed=False, what="fp32.onnx") == "fp16"


@pytest.mark.parametrize("strongly_typed", [False, True])
def test_int8_build_needs_qdq_nodes(tmp_path, strongly_typed):
    evidence = onnx_precision_evidence(_tiny_onnx(tmp_path / "fp16.onnx", "fp16"))
    with pytest.raises(ValueError, match="INT8 needs a Q/DQ ONNX"):
        check_build_precision("int8", evidence, strongly_typed=strongly_typed, what="fp16.onnx")


def test_engine_sidecar_round_trip_and_bad_json(tmp_path):
    engine = tmp_path / "m.fp16.plan"
    assert read_engine_metadata(engine) == {}  # an engine built elsewhere (trtexec) has no sidecar
    path = write_engine_metadata(engine, {"precision": "fp16", "plugin_libs": ["/opt/libx.so"]})
    assert path.name == "m.fp16.plan.json"
    assert read_engine_metadata(engine)["precision"] == "fp16"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="m.fp16.plan.json: not valid JSON"):
        read_engine_metadata(engine)


def test_ptx_facts_parse_directives():
    ptx = "//\n// Generated by LLVM NVPTX Back-End\n//\n\n.version 8.7\n.target sm_90a\n.address_size 64\n"
    assert ptx_facts(ptx) == {"ptx_version": "8.7", "ptx_target": "sm_90a", "min_driver_cuda": "12.8"}
    assert ptx_facts(ptx.replace("8.7", "7.5"))["min_driver_cuda"] is None  # outside the table: unknown, not a guess
    with pytest.raises(ValueError, match=".version or .target"):
        ptx_facts(".address_size 64\n")


_PTX_SCRIPT = r"""
import json
from triton.backends.compiler import GPUTarget
from sdconet.kernels.trt_plugin import compile_msda_kernel, ptx_facts
kernel = compile_msda_kernel("fp16", num_heads=2, head_dim=8, num_levels=2, num_points=2, block_q=16,
                             target=GPUTarget("cuda", 87, 32))
print(json.dumps(ptx_facts(kernel.ptx)))
"""


def test_ptx_facts_of_the_compiled_plugin_kernel():
    optional_import("triton", "the `triton` package is not installed (it ships with Linux CUDA torch wheels)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["ptx_target"] == "sm_87"  # the Jetson Orin target asked for
    major, minor = (int(part) for part in facts["ptx_version"].split("."))
    assert major >= 7


# ---------------------------------------------------------------------------------------------------------------
# With TensorRT and a GPU
# ---------------------------------------------------------------------------------------------------------------

SHAPES = [(16, 16), (8, 8)]
TOKENS = sum(h * w for h, w in SHAPES)


class MSDAEncoderLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = MSDeformAttn(d_model=64, num_levels=2, num_heads=4, num_points=4, impl="plugin")
        self.register_buffer("reference", torch.rand(1, TOKENS, 2, 2))

    def forward(self, tokens):
        starts = torch.tensor(mp.level_start_index_for(SHAPES))
        return self.attn(tokens, self.reference.expand(tokens.shape[0], -1, -1, -1), tokens, SHAPES, starts)


@pytest.fixture(scope="module")
def plugin_onnx(tmp_path_factory):
    torch.manual_seed(0)
    module = MSDAEncoderLayer().eval()
    spec = mp.trt_plugin_spec(2 if tensorrt_major() >= 11 else 1)
    with mp.use_plugin_spec(spec):
        model = export_module(module, torch.randn(2, TOKENS, 64), input_name="tokens", output_names=["out"],
                              custom_domains=[mp.PLUGIN_DOMAIN])
    path = save_model(simplify_around_custom_nodes(model), tmp_path_factory.mktemp("trt") / "msda.onnx")
    return module, path


@needs_tensorrt
def test_fp32_engine_matches_onnxruntime(plugin_onnx, tmp_path):
    from sdconet.deploy.trt_runtime import TensorRTRunner

    _, onnx_path = plugin_onnx
    cache = tmp_path / "timing.cache"
    facts = build_engine(onnx_path, tmp_path / "msda.engine",
                         EngineBuildOptions(precision="fp32", max_batch=4, timing_cache=str(cache)))
    assert cache.stat().st_size > 0
    assert facts["input_shapes"]["tokens"]["max"] == [4, TOKENS, 64]
    assert facts["timing_cache"]["status"] in ("fresh", "loaded")
    assert read_engine_metadata(tmp_path / "msda.engine")["precision"] == facts["precision"] == "fp32"
    engine = TensorRTRunner(tmp_path / "msda.engine")
    tokens = torch.randn(3, TOKENS, 64)
    out = engine.infer(tokens.cuda())["out"].cpu().numpy()
    (reference,) = mp.ort_session(onnx_path).run(None, {"tokens": tokens.numpy()})
    np.testing.assert_allclose(out, reference, atol=1e-4, rtol=1e-4)


@needs_tensorrt
def test_fp16_engine_close_to_fp32(plugin_onnx, tmp_path):
    from sdconet.deploy.trt_runtime import TensorRTRunner

    module, onnx_path = plugin_onnx
    if tensorrt_major() >= 11:  # strongly typed: an FP32 ONNX cannot give an FP16 engine, and says so
        with pytest.raises(ValueError, match="would build an FP32 engine"):
            build_engine(onnx_path, tmp_path / "msda16.engine", EngineBuildOptions(precision="fp16", max_batch=2))
        return
    build_engine(onnx_path, tmp_path / "msda16.engine", EngineBuildOptions(precision="fp16", max_batch=2))
    tokens = torch.randn(2, TOKENS, 64)
    out = TensorRTRunner(tmp_path / "msda16.engine").infer(tokens.cuda())["out"].float().cpu()
    with torch.no_grad():
        reference = module(tokens)
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)
