"""The inference forward makes no tensor from host data after its warm-up call (issue 24): each such tensor is a
pageable host->device copy plus a stream sync on a GPU and is illegal under CUDA-graph capture; and Dynamo captures
the whole inference forward as one graph."""
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from sdconet.config import load_config
from sdconet.models import build_model
from sdconet.utils.constants import clear_constant_cache

# the torch entry points that build a tensor from Python/numpy data (torch.from_numpy is not dispatched through
# __torch_function__, so it is wrapped below)
HOST_DATA_FUNCTIONS = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class HostTensorRecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_DATA_FUNCTIONS:
            self.calls.append(f"{func.__name__}{tuple(np.shape(args[-1])) if args else ''}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(load_config("tiny").model).eval()


def test_inference_forward_makes_no_tensor_from_host_data(tiny_model, monkeypatch):
    clear_constant_cache()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = tiny_model.infer(images)  # the warm-up call (before a CUDA-graph capture) builds the constants
        recorder = HostTensorRecorder()
        from_numpy = torch.from_numpy

        def recording_from_numpy(array):
            recorder.calls.append(f"from_numpy{array.shape}")
            return from_numpy(array)

        monkeypatch.setattr(torch, "from_numpy", recording_from_numpy)
        with recorder:
            second = tiny_model.infer(images)
            tiny_model.infer(torch.rand(1, 3, 64, 64))  # another batch size: same shape tables
    assert recorder.calls == [], f"tensors built from host data inside forward: {recorder.calls}"
    for key in first:  # the cached constants change nothing
        assert torch.equal(first[key], second[key]), key


def test_warm_and_cold_forward_are_bit_identical(tiny_model):
    images = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clear_constant_cache()
        cold = tiny_model.infer(images)
        warm = tiny_model.infer(images)
    for key in cold:
        assert torch.equal(cold[key], warm[key]), key


def test_inference_forward_compiles_as_one_graph(tiny_model):
    """fullgraph=True raises at the first graph break. backend="eager" runs Dynamo's capture (what decides graph
    breaks) without Inductor's code generation, which takes minutes on a 2-core CPU."""
    torch._dynamo.reset()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = tiny_model.infer(images)
        compiled = torch.compile(tiny_model.infer, fullgraph=True, backend="eager")(images)
    for key in eager:
        assert torch.equal(eager[key], compiled[key]), key
