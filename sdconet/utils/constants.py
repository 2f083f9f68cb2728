"""Small constant tensors (shape tables, normalisers, masks) built once per (key, dtype, device), not per forward.

A ``torch.tensor(python_list, device="cuda")`` inside ``forward`` is a pageable host->device copy and a stream
sync on every call, and is illegal while a CUDA graph is being captured. These helpers build each constant on its
first use (the warm-up forward before a capture) and hand the same device tensor back afterwards.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch

MAX_ENTRIES = 1024  # distinct input shapes x dtypes x devices; whole-scene tiling uses a handful
_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def cached_tensor(key: Hashable, make: Callable[[], torch.Tensor], dtype: torch.dtype,
                  device: torch.device | str) -> torch.Tensor:
    """``make()`` (a host-built tensor) cast to ``dtype`` on ``device``, built once per key and reused.

    Tensors made under ``torch.inference_mode()`` cannot be saved for backward, so inference-mode entries are kept
    apart from the others. The cached tensor is shared: callers must not modify it in place.
    """
    if torch.compiler.is_compiling():
        # Dynamo/export: the constant goes into the graph (built once when compiled), and a traced tensor must not
        # outlive its trace in the cache
        return make().to(device=device, dtype=dtype)
    full_key = (key, dtype, torch.device(device), torch.is_inference_mode_enabled())
    tensor = _cache.get(full_key)
    if tensor is None:
        tensor = _cache[full_key] = make().to(device=device, dtype=dtype)
        if len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)
    return tensor


def constant_tensor(values: tuple, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` for hashable (nested tuple) ``values``, built once."""
    return cached_tensor(("values", values), lambda: torch.tensor(values, dtype=dtype), dtype, device)


def clear_constant_cache() -> None:
    """Drop every cached constant (tests; or to free device memory after a device goes away)."""
    _cache.clear()
