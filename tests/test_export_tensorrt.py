"""TensorRT engine build + runtime on an MSDA plugin graph. Skipped, with the exact reason, without TensorRT/GPU."""
import json

import numpy as np
import pytest
import torch

from sdconet.deploy import msda_plugin as mp
from sdconet.deploy.onnx_export import export_module, save_model, simplify_around_custom_nodes
from sdconet.deploy.tensorrt_build import (EngineBuildOptions, build_engine, tensorrt_major,
                                           tensorrt_unavailable_reason)
from sdconet.models.deformable_attention import MSDeformAttn

REASON = tensorrt_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

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


def test_fp32_engine_matches_onnxruntime(plugin_onnx, tmp_path):
    from sdconet.deploy.trt_runtime import TensorRTRunner

    _, onnx_path = plugin_onnx
    cache = tmp_path / "timing.cache"
    facts = build_engine(onnx_path, tmp_path / "msda.engine",
                         EngineBuildOptions(precision="fp32", max_batch=4, timing_cache=str(cache)))
    assert cache.stat().st_size > 0
    assert facts["input_shapes"]["tokens"]["max"] == [4, TOKENS, 64]
    json.dumps(facts)  # metadata must be JSON-serialisable
    engine = TensorRTRunner(tmp_path / "msda.engine")
    tokens = torch.randn(3, TOKENS, 64)
    out = engine(tokens.cuda())["out"].cpu().numpy()
    (reference,) = mp.ort_session(onnx_path).run(None, {"tokens": tokens.numpy()})
    np.testing.assert_allclose(out, reference, atol=1e-4, rtol=1e-4)


def test_fp16_engine_close_to_fp32(plugin_onnx, tmp_path):
    if tensorrt_major() >= 11:
        pytest.skip("TensorRT 11 is strongly typed: FP16 comes from an AutoCast ONNX (covered by the exporter)")
    from sdconet.deploy.trt_runtime import TensorRTRunner

    module, onnx_path = plugin_onnx
    build_engine(onnx_path, tmp_path / "msda16.engine", EngineBuildOptions(precision="fp16", max_batch=2))
    tokens = torch.randn(2, TOKENS, 64)
    out = TensorRTRunner(tmp_path / "msda16.engine")(tokens.cuda())["out"].float().cpu()
    with torch.no_grad():
        reference = module(tokens)
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)
