"""Moved: the TensorRT runtime is :mod:`sdconet.runtime.tensorrt_runner`; this name stays for old imports."""
from sdconet.runtime.tensorrt_runner import TensorRTRunner, profile_error

__all__ = ["TensorRTRunner", "profile_error"]
