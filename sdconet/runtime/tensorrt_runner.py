"""TensorRT: a serialized engine (``.plan``) run with ``execute_async_v3`` on a CUDA stream of its own.

Two entry points:

* ``run(images)`` — the :class:`~sdconet.runtime.base.Runner` interface: NumPy ``[B, 3, S, S]`` in, NumPy out.
* ``infer(inputs)`` — the fast path the benchmarks time: a tensor (or ``{name: tensor}``) in, ``{name: tensor}`` out.
  With a CUDA build of torch, I/O are torch CUDA tensors bound by address; without one (a Jetson image with a CPU
  torch) pycuda device buffers are used and I/O are NumPy arrays.

Output buffers are allocated once per input shape (the first call with a new batch size, or :meth:`prepare`) and
reused: ``infer`` returns those buffers, so a caller keeping results across calls of the same shape clones them.
``set_input_shape`` is checked: a batch outside the engine's optimisation profile is an error naming the engine and
its profile range. The precision is the one the engine's ``.plan.json`` sidecar records (written at build time by
``sdconet.deploy.tensorrt_build``), never a flag; plugin libraries recorded there (or passed in) are loaded before
the engine is deserialized.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sdconet.runtime.base import Runner, RunnerError, RunnerUnavailable
from sdconet.utils.logging import get_logger

LOG = get_logger(__name__)
IO_MODES = ("auto", "torch", "pycuda")


def profile_error(engine: str | Path, name: str, shape: Sequence[int], low: Sequence[int],
                  high: Sequence[int]) -> str | None:
    """Why ``shape`` does not fit the profile ``low..high`` of input ``name`` (None when it fits)."""
    shape, low, high = list(shape), list(low), list(high)
    if len(shape) == len(low) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
        return None
    what = (f"batch {shape[0]}" if len(shape) == len(low) and shape[1:] == low[1:] == high[1:]
            else f"shape {shape}")
    return (f"{engine}: {what} is outside the engine's optimisation profile for input '{name}' ({low} .. {high}); "
            f"split the batch or rebuild the engine with a larger --max-batch")


def pick_engine(engines: Sequence[str | Path], precision: str) -> Path:
    """The first of ``engines`` whose ``.plan.json`` records ``precision``, else the first one (its record then
    carries the engine's own precision). RunnerUnavailable when there is none."""
    from sdconet.runtime.metadata import read_engine_metadata

    if not engines:
        raise RunnerUnavailable("no engine given: build one with `python export/build_engine.py --fp16` and pass "
                                "--engine engines/<name>.plan")
    matching = [e for e in engines if Path(e).is_file() and read_engine_metadata(e).get("precision") == precision]
    return Path((matching or list(engines))[0])


def _torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class TensorRTRunner(Runner):
    """A deserialized engine + one execution context + one CUDA stream.

    Args:
        engine_path: the ``.plan`` file (its ``.plan.json`` sidecar, when present, gives precision, class names and
            plugin libraries).
        plugin_libs: extra TensorRT plugin libraries to load (added to those the sidecar records).
        io: ``torch`` (torch CUDA tensors), ``pycuda`` (NumPy I/O) or ``auto`` (torch when it has CUDA).
        class_names: override the sidecar's class names.
    """

    backend = "tensorrt"
    precisions = ("fp32", "fp16", "int8")
    uses_cuda = True

    def __init__(self, engine_path: str | Path, plugin_libs: Sequence[str] = (), io: str = "auto", *,
                 class_names: Sequence[str] | None = None) -> None:
        from sdconet.runtime.metadata import read_engine_metadata
        from sdconet.utils.tensorrt import TensorRTUnavailable, import_tensorrt, load_plugins, trt_logger

        try:
            trt = import_tensorrt()
        except TensorRTUnavailable as err:
            raise RunnerUnavailable(str(err)) from err
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {', '.join(IO_MODES)}, got {io!r}")
        self.io = ("torch" if _torch_cuda_available() else "pycuda") if io == "auto" else io
        if self.io == "pycuda":
            try:
                import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
                import pycuda.driver as cuda
            except Exception as err:  # ImportError, or pycuda's cuInit failure without a GPU
                raise RunnerUnavailable(f"TensorRT needs CUDA: torch has no CUDA device and pycuda is unusable "
                                        f"({type(err).__name__}: {err})") from err
            self._pycuda_stream = cuda.Stream()
        else:
            import torch

            self._torch_stream = torch.cuda.Stream()
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise RunnerError(f"engine not found: {self.path}")
        try:
            self.metadata = read_engine_metadata(self.path)
        except ValueError as err:
            raise RunnerError(str(err)) from err
        # resolved, so a library named both in the sidecar and by the caller is loaded once
        libs = list(dict.fromkeys(str(Path(p).resolve()) for p in [*self.metadata.get("plugin_libs", []),
                                                                   *plugin_libs]))
        missing = [lib for lib in libs if not Path(lib).is_file()]
        if missing:
            raise RunnerError(f"{self.path}: plugin libraries {missing} (from its .plan.json or plugin_libs) not found")
        logger = trt_logger()
        load_plugins(logger, libs)
        if (self.metadata.get("options") or {}).get("sdconet_plugin"):
            from sdconet.kernels.trt_plugin import register_msda_plugin

            register_msda_plugin()  # the AOT plugin must be registered before deserialization
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RunnerError(f"{self.path}: TensorRT {trt.__version__} could not deserialize the engine (built with "
                              f"another TensorRT version or GPU, or a plugin library is missing?); sidecar: "
                              f"TensorRT {self.metadata.get('tensorrt_version', '?')} on "
                              f"{self.metadata.get('gpu', '?')}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # profile 0 (the only one the builder makes): name -> (min, opt, max) shapes
        self.profiles = {n: tuple(tuple(int(d) for d in dims) for dims in self.engine.get_tensor_profile_shape(n, 0))
                         for n in self.input_names}
        self._buffers: dict[tuple, dict[str, Any]] = {}

        first = self.input_names[0]
        dims = tuple(self.engine.get_tensor_shape(first))
        imgsz = int(dims[2]) if len(dims) == 4 and dims[2] > 0 and dims[2] == dims[3] else None
        if class_names is None:
            class_names = self.metadata.get("class_names") or self._class_names_from_onnx()
        super().__init__(imgsz=imgsz, class_names=class_names,
                         precision=self.metadata.get("precision", "unknown (no .plan.json sidecar)"),
                         max_batch=self.profiles[first][2][0], has_saliency="saliency" in self.output_names)

    def _class_names_from_onnx(self) -> list[str]:
        """Names from the ONNX the engine was built from (its metadata or export report), else none (warned)."""
        onnx_path = self.metadata.get("onnx")
        if onnx_path and Path(onnx_path).is_file():
            import onnx

            from sdconet.runtime.metadata import onnx_model_info

            try:
                return onnx_model_info(onnx.load(onnx_path, load_external_data=False), onnx_path)["class_names"]
            except RunnerError as err:
                LOG.warning("%s", err)
        LOG.warning("%s: no class names in its .plan.json nor in the ONNX it was built from; pass class_names "
                    "(labels are reported as numbers)", self.path)
        return []

    # -- the Runner interface -----------------------------------------------------------------------------------
    def check_input(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 4:
            reason = profile_error(self.path, self.input_names[0], images.shape, self.profiles[self.input_names[0]][0],
                                   self.profiles[self.input_names[0]][2])
            if reason:
                raise ValueError(reason)
        return super().check_input(images)

    def _run(self, images: np.ndarray) -> Mapping[str, Any]:
        if self.io == "torch":
            import torch

            return self.infer(torch.from_numpy(images).cuda())
        return self.infer(images)

    # -- the fast path --------------------------------------------------------------------------------------------
    def infer(self, inputs) -> dict[str, Any]:
        """``{output name: tensor}`` for a tensor (the first input) or ``{input name: tensor}``; see the module
        docstring for buffer reuse."""
        if not isinstance(inputs, Mapping):
            inputs = {self.input_names[0]: inputs}
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise KeyError(f"{self.path}: missing engine inputs {sorted(missing)} (engine inputs: {self.input_names})")
        return self._infer_torch(inputs) if self.io == "torch" else self._infer_pycuda(inputs)

    def prepare(self, batch: int) -> None:
        """Set the input shape for ``batch`` and allocate its output buffers now (outside any timed region)."""
        shapes = {n: (batch, *self.profiles[n][1][1:]) for n in self.input_names}
        self._buffers_for(shapes)

    def _set_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                low, _, high = self.profiles[name]
                raise RunnerError(profile_error(self.path, name, shape, low, high)
                                  or f"{self.path}: set_input_shape({name!r}, {list(shape)}) was refused")

    def _buffers_for(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """Output buffers for these input shapes, allocated on first use; the context's shapes are set."""
        key = tuple(sorted((n, tuple(s)) for n, s in shapes.items()))
        self._set_shapes(shapes)
        if key in self._buffers:
            return self._buffers[key]
        out_shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in self.output_names}
        bad = {n: s for n, s in out_shapes.items() if any(d < 0 for d in s)}
        if bad:
            raise RunnerError(f"{self.path}: output shapes {bad} unresolved for inputs {dict(shapes)}")
        if self.io == "torch":
            import torch

            buffers = {n: torch.empty(s, dtype=_torch_dtype(self.dtypes[n]), device="cuda")
                       for n, s in out_shapes.items()}
        else:
            import pycuda.driver as cuda

            buffers = {}
            for name, shape in out_shapes.items():
                host = cuda.pagelocked_empty(shape, self.dtypes[name])
                buffers[name] = (host, cuda.mem_alloc(max(host.nbytes, 1)))
            for name, shape in shapes.items():
                nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
                buffers["__input__" + name] = cuda.mem_alloc(max(nbytes, 1))
        self._buffers[key] = buffers
        return buffers

    def _infer_torch(self, inputs: Mapping) -> dict[str, Any]:
        import torch

        stream = self._torch_stream
        stream.wait_stream(torch.cuda.current_stream())  # inputs may still be written on the caller's stream
        with torch.cuda.stream(stream):
            tensors = {n: torch.as_tensor(inputs[n]).to(device="cuda", dtype=_torch_dtype(self.dtypes[n]))
                       .contiguous() for n in self.input_names}
            outputs = self._buffers_for({n: tuple(t.shape) for n, t in tensors.items()})
            for name, tensor in tensors.items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            for name, tensor in outputs.items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RunnerError(f"{self.path}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        stream.synchronize()
        return dict(outputs)

    def _infer_pycuda(self, inputs: Mapping) -> dict[str, Any]:
        import pycuda.driver as cuda

        stream = self._pycuda_stream
        hosts = {n: np.ascontiguousarray(np.asarray(inputs[n], dtype=self.dtypes[n])) for n in self.input_names}
        buffers = self._buffers_for({n: h.shape for n, h in hosts.items()})
        for name, host in hosts.items():
            device = buffers["__input__" + name]
            cuda.memcpy_htod_async(device, host, stream)
            self.context.set_tensor_address(name, int(device))
        for name in self.output_names:
            self.context.set_tensor_address(name, int(buffers[name][1]))
        if not self.context.execute_async_v3(stream.handle):
            raise RunnerError(f"{self.path}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        for name in self.output_names:
            host, device = buffers[name]
            cuda.memcpy_dtoh_async(host, device, stream)
        stream.synchronize()
        return {name: np.array(buffers[name][0]) for name in self.output_names}

    # -- benchmarks -----------------------------------------------------------------------------------------------
    def timed_call(self, images: np.ndarray) -> Callable[[], Any]:
        checked = self.check_input(images)
        batch = checked.shape[0]
        self.prepare(batch)
        if self.io == "torch":
            import torch

            staged = torch.from_numpy(checked).cuda()
            return lambda: self.infer(staged)
        return lambda: self.infer(checked)

    @classmethod
    def for_benchmark(cls, bench, precision: str, **options: Any) -> "TensorRTRunner":
        """The ``--engine`` whose sidecar precision is ``precision`` (else the first one: the record then carries
        the engine's own precision, and the benchmark times it once)."""
        from sdconet.utils.tensorrt import TensorRTUnavailable, import_tensorrt

        try:
            import_tensorrt()
        except TensorRTUnavailable as err:
            raise RunnerUnavailable(str(err)) from err
        if not _torch_cuda_available():
            raise RunnerUnavailable("no CUDA device (torch.cuda.is_available() is False)")
        return cls(pick_engine(getattr(bench, "engine_paths", None) or [], precision), **options)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"engine": str(self.path), "io": self.io,
                                     "tensorrt_version": self.metadata.get("tensorrt_version")}

    def close(self) -> None:
        self._buffers.clear()
        self.context = None
        self.engine = None


def _torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype)).dtype
