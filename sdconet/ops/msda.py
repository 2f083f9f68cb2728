"""Multi-scale deformable attention (MSDA) core: bilinear sampling + weighted sum over levels and points.

All implementations share TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` layout:

* ``value``               ``[N, S, M, D]``   S = sum_l H_l * W_l tokens, M heads, D channels per head
* ``spatial_shapes``      ``[L, 2]``         (H_l, W_l) per level (tensor or sequence of int pairs)
* ``level_start_index``   ``[L]``            offset of each level in S
* ``sampling_locations``  ``[N, Lq, M, L, P, 2]``  normalised (x, y) in [0, 1]
* ``attention_weights``   ``[N, Lq, M, L, P]``     already softmaxed over L * P
* returns                 ``[N, Lq, M * D]``

Coordinate convention (= ``grid_sample(align_corners=False, padding_mode="zeros")``): a location x in [0, 1] maps to
pixel ``x * W - 0.5``; corners outside the feature map contribute zero.

Implementations, selected by name (``model.detector.msda_impl``):

* ``grid_sample`` — reference, one ``F.grid_sample`` per level.
* ``gather``      — export-friendly: explicit bilinear interpolation with ``torch.gather`` (no GridSample op in ONNX).
* ``naive``       — per-point Python loop, for tests only.
* ``triton``      — OpenAI Triton kernel (``sdconet.kernels``), registered when that module is imported.
* ``auto``        — ``triton`` on CUDA when available, else ``grid_sample`` (on a CPU its forward + backward is 3-4x
  faster than ``gather``'s gather/scatter-add at the demo's shapes; ``gather`` stays the export path).

Other modules add implementations with :func:`register_msda_impl` (the registry exists because the Triton kernel
and the export-time plugin node live in packages with optional heavy dependencies).
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

SpatialShapes = Union[torch.Tensor, Sequence[Sequence[int]]]
MSDAFn = Callable[..., torch.Tensor]

_IMPLS: dict[str, MSDAFn] = {}
# implementations that live in optional modules: importing the module registers them
_LAZY_MODULES = {"triton": "sdconet.kernels.msda_triton", "plugin": "sdconet.kernels.msda_plugin"}


def register_msda_impl(name: str, fn: MSDAFn) -> None:
    _IMPLS[name] = fn


def available_msda_impls() -> list[str]:
    return sorted(set(_IMPLS) | set(_LAZY_MODULES))


def spatial_shapes_as_ints(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """``[L, 2]`` tensor or sequence of (H_l, W_l) -> list of int pairs (a host sync for a device tensor)."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def level_start_index_for(shapes: Sequence[tuple[int, int]]) -> list[int]:
    """Offset of each level's first token when the levels' ``H_l * W_l`` tokens are stored back to back."""
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    return starts


def msda_grid_sample(value: torch.Tensor, spatial_shapes: SpatialShapes, level_start_index: torch.Tensor | None,
                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Reference MSDA with ``F.grid_sample`` (see module docstring for shapes)."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    shapes = spatial_shapes_as_ints(spatial_shapes)
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = values[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)  # [N*M, D, H, W]
        g = grids[:, :, :, level].transpose(1, 2).reshape(n * m, lq, p, 2)  # [N*M, Lq, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [N*M, D, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * p)
    out = (stacked * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def msda_gather(value: torch.Tensor, spatial_shapes: SpatialShapes, level_start_index: torch.Tensor | None,
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """MSDA by explicit bilinear interpolation with ``gather`` (exports to ONNX without GridSample)."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    shapes = spatial_shapes_as_ints(spatial_shapes)
    values = value.split([h * w for h, w in shapes], dim=1)
    out = value.new_zeros(n * m, lq, d)
    for level, (h, w) in enumerate(shapes):
        v = values[level].permute(0, 2, 1, 3).reshape(n * m, h * w, d)  # [N*M, HW, D]
        loc = sampling_locations[:, :, :, level].transpose(1, 2).reshape(n * m, lq * p, 2)
        # Sampling positions in float; everything that becomes an index is integer from the floor on, so every
        # gather index is in range whatever float precision a runtime picks for the rest (bf16 holds integers
        # exactly only up to 256, fp16 up to 2048: y * W + x computed in float broke at 512² LR).
        # Clamping to [-1, W] first changes no result (further out, both corners are outside) and keeps the
        # float -> int cast finite.
        x = (loc[..., 0] * w - 0.5).clamp(-1, w)
        y = (loc[..., 1] * h - 0.5).clamp(-1, h)
        x0f = torch.floor(x)
        y0f = torch.floor(y)
        fx = x - x0f
        fy = y - y0f
        x0 = x0f.to(torch.int64)
        y0 = y0f.to(torch.int64)
        corner_idx, corner_w = [], []
        for dy, wy in ((0, 1.0 - fy), (1, fy)):
            for dx, wx in ((0, 1.0 - fx), (1, fx)):
                cx = x0 + dx
                cy = y0 + dy
                inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
                corner_idx.append(cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1))
                corner_w.append(wx * wy * inside.to(value.dtype))
        idx = torch.cat(corner_idx, dim=1)  # [N*M, 4*Lq*P] int64
        weight = torch.cat(corner_w, dim=1)  # [N*M, 4*Lq*P]
        gathered = torch.gather(v, 1, idx.unsqueeze(-1).expand(-1, -1, d))  # [N*M, 4*Lq*P, D]
        attn = attention_weights[:, :, :, level].transpose(1, 2).reshape(n * m, 1, lq * p).repeat(1, 4, 1)
        contrib = gathered * (weight * attn.flatten(1)).unsqueeze(-1)
        out = out + contrib.view(n * m, 4, lq, p, d).sum(dim=(1, 3))
    return out.view(n, m, lq, d).transpose(1, 2).reshape(n, lq, m * d)


def msda_naive(value: torch.Tensor, spatial_shapes: SpatialShapes, level_start_index: torch.Tensor | None,
               sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Per-point loop written straight from the definition; slow, for tests only."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    shapes = spatial_shapes_as_ints(spatial_shapes)
    starts = level_start_index_for(shapes)
    out = value.new_zeros(n, lq, m, d)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for level, (h, w) in enumerate(shapes):
                    for point in range(p):
                        x = float(sampling_locations[b, q, head, level, point, 0]) * w - 0.5
                        y = float(sampling_locations[b, q, head, level, point, 1]) * h - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        acc = value.new_zeros(d)
                        for cy in (y0, y0 + 1):
                            for cx in (x0, x0 + 1):
                                if 0 <= cx < w and 0 <= cy < h:
                                    wgt = (1 - abs(x - cx)) * (1 - abs(y - cy))
                                    acc = acc + wgt * value[b, starts[level] + cy * w + cx, head]
                        out[b, q, head] += attention_weights[b, q, head, level, point] * acc
    return out.reshape(n, lq, m * d)


register_msda_impl("grid_sample", msda_grid_sample)
register_msda_impl("gather", msda_gather)
register_msda_impl("naive", msda_naive)


def resolve_msda_impl(impl: str, device: torch.device | None = None) -> str:
    """Turn ``auto`` into a concrete implementation name for ``device``."""
    if impl != "auto":
        return impl
    if device is not None and device.type == "cuda":
        try:
            importlib.import_module(_LAZY_MODULES["triton"])
            if "triton" in _IMPLS:
                return "triton"
        except ImportError:
            pass
    return "grid_sample"


def multi_scale_deformable_attn(value: torch.Tensor, spatial_shapes: SpatialShapes,
                                level_start_index: torch.Tensor | None, sampling_locations: torch.Tensor,
                                attention_weights: torch.Tensor, impl: str = "gather") -> torch.Tensor:
    """Dispatch to the named MSDA implementation (shapes in the module docstring)."""
    impl = resolve_msda_impl(impl, value.device)
    if impl not in _IMPLS and impl in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[impl])
    if impl not in _IMPLS:
        raise ValueError(f"unknown MSDA implementation '{impl}' (available: {', '.join(available_msda_impls())})")
    return _IMPLS[impl](value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
