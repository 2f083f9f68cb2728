"""A small TensorRT runtime wrapper (``execute_async_v3``) used by benchmarks and serving.

``TensorRTRunner(path)(images)`` takes a ``[B, 3, H, W]`` float32 tensor (or a dict by input name) and returns a dict
of output tensors. With a CUDA build of torch, I/O are torch CUDA tensors bound by address
(``set_tensor_address``) and the engine runs on torch's current stream. Without CUDA torch (e.g. a Jetson image with a
CPU torch) it falls back to pycuda device buffers; inputs/outputs are then NumPy arrays.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sdconet.deploy.tensorrt_build import TensorRTUnavailable, trt_logger, load_plugins
from sdconet.utils.logging import get_logger

LOG = get_logger(__name__)


def _torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class TensorRTRunner:
    """Deserialized engine + one execution context; call it with inputs, get ``{name: output}``."""

    def __init__(self, engine_path: str | Path, plugin_libs: Sequence[str] = (), backend: str = "auto") -> None:
        try:
            import tensorrt as trt
        except Exception as err:
            raise TensorRTUnavailable(f"tensorrt not importable ({type(err).__name__}: {err})") from err
        if backend not in ("auto", "torch", "pycuda"):
            raise ValueError(f"backend must be auto, torch or pycuda, got '{backend}'")
        self.backend = ("torch" if _torch_cuda_available() else "pycuda") if backend == "auto" else backend
        if self.backend == "pycuda":
            import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
        logger = trt_logger()
        load_plugins(logger, plugin_libs)
        self._runtime = trt.Runtime(logger)
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise FileNotFoundError(f"engine not found: {engine_path}")
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not deserialize the engine (built with another "
                               f"TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}

    def __call__(self, inputs) -> dict:
        if not isinstance(inputs, Mapping):
            inputs = {self.input_names[0]: inputs}
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise KeyError(f"missing engine inputs {sorted(missing)} (engine inputs: {self.input_names})")
        return self._run_torch(inputs) if self.backend == "torch" else self._run_pycuda(inputs)

    def _run_torch(self, inputs: Mapping) -> dict:
        import torch

        keep_alive = []
        for name in self.input_names:
            dtype = torch.from_numpy(np.empty(0, self.dtypes[name])).dtype
            tensor = torch.as_tensor(inputs[name]).to(device="cuda", dtype=dtype).contiguous()
            keep_alive.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            dtype = torch.from_numpy(np.empty(0, self.dtypes[name])).dtype
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return outputs

    def _run_pycuda(self, inputs: Mapping) -> dict:
        import pycuda.driver as cuda

        stream = cuda.Stream()
        device_buffers = []
        for name in self.input_names:
            host = np.ascontiguousarray(np.asarray(inputs[name], dtype=self.dtypes[name]))
            device = cuda.mem_alloc(max(host.nbytes, 1))
            cuda.memcpy_htod_async(device, host, stream)
            device_buffers.append(device)
            self.context.set_input_shape(name, host.shape)
            self.context.set_tensor_address(name, int(device))
        host_outputs = {}
        for name in self.output_names:
            host = cuda.pagelocked_empty(tuple(self.context.get_tensor_shape(name)), self.dtypes[name])
            device = cuda.mem_alloc(max(host.nbytes, 1))
            device_buffers.append(device)
            host_outputs[name] = (host, device)
            self.context.set_tensor_address(name, int(device))
        if not self.context.execute_async_v3(stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for host, device in host_outputs.values():
            cuda.memcpy_dtoh_async(host, device, stream)
        stream.synchronize()
        return {name: np.array(host) for name, (host, _) in host_outputs.items()}
