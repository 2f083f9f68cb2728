"""Multi-scale deformable attention (MSDA) as OpenAI Triton kernels: forward and backward.

Same layout and coordinate convention as the PyTorch reference (:mod:`sdconet.ops.msda`, TensorRT's plugin layout):
``value [N, S, M, D]``, ``spatial_shapes [L, 2]`` (H, W), ``level_start_index [L]``,
``sampling_locations [N, Lq, M, L, P, 2]`` normalised (x, y), ``attention_weights [N, Lq, M, L, P]``; a location x
maps to pixel ``x * W - 0.5`` and corners outside the map contribute zero.

One program computes ``BLOCK_Q`` queries of one (batch, head) pair for all ``D`` channels: per level and point it
gathers the four bilinear corners as ``[BLOCK_Q, D]`` rows (``D`` contiguous channels per token, so the loads are
coalesced) and accumulates in fp32. Heads, channels, levels and points are compile-time constants; the level and
point loops stay loops (fully unrolled, ptxas spilled ~1 KB per thread at the paper's shapes; as loops the forward
kernel needs 64 registers on sm_90 at BLOCK_Q 16, docs/kernels.md). Batch, value length and query count are runtime
scalars, so one compiled kernel serves every batch size. The PTX is Triton's: triton 3.8 writes ``.version 8.8`` and
``.target sm_90a`` for Hopper (an arch-specific target: that PTX runs on sm_90 only), and a driver loads PTX only up
to the ISA version it knows, hence the ``.plan.json`` records both for engines that embed the kernel. The forward
kernel's argument order (input pointers, int32 scalars, output pointer) is the calling convention of TensorRT's
ahead-of-time Python plugins, so :mod:`sdconet.kernels.trt_plugin` compiles this very kernel into engines.

Importing this module registers the ``triton`` implementation with :func:`sdconet.ops.msda.register_msda_impl`
(``model.detector.msda_impl: auto`` picks it on CUDA). It imports without a GPU; running the kernels needs CUDA
tensors, or ``TRITON_INTERPRET=1`` set before the first ``import triton`` (slow CPU emulation, used by the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdconet.ops.msda import SpatialShapes, register_msda_impl, spatial_shapes_as_ints
from sdconet.utils.constants import constant_tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_BLOCK_Q = 16  # queries per program; TensorRT times 16/32/64 as tactics (trt_plugin.TACTIC_BLOCK_Q)
NUM_WARPS = 4


def interpreter_enabled() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import time)."""
    return not isinstance(msda_forward_kernel, triton.runtime.JITFunction)


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_corner(value_base, corner_x, corner_y, height_f, width_f, width, level_start, channels, channel_mask,
                 query_mask, TOKEN_STRIDE: tl.constexpr):
    """Gather one bilinear corner for ``BLOCK_Q`` queries: ([BLOCK_Q, BLOCK_D] fp32 values, token index, valid)."""
    valid = (corner_x >= 0) & (corner_x <= width_f - 1) & (corner_y >= 0) & (corner_y <= height_f - 1) & query_mask
    # clamp before the int cast so that masked-off lanes still form in-range addresses
    xi = tl.minimum(tl.maximum(corner_x, 0.0), width_f - 1).to(tl.int32)
    yi = tl.minimum(tl.maximum(corner_y, 0.0), height_f - 1).to(tl.int32)
    token = level_start + yi * width + xi
    ptrs = value_base + token[:, None] * TOKEN_STRIDE + channels[None, :]
    values = tl.load(ptrs, mask=valid[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
    return values, token, valid


@triton.jit
def _scatter_corner(grad_value_base, token, valid, weight, scaled_grad, channels, channel_mask,
                    TOKEN_STRIDE: tl.constexpr):
    """grad_value[token, :] += weight * attn * grad_out for the valid lanes of one corner."""
    ptrs = grad_value_base + token[:, None] * TOKEN_STRIDE + channels[None, :]
    tl.atomic_add(ptrs, weight[:, None] * scaled_grad, mask=valid[:, None] & channel_mask[None, :])


@triton.jit
def _sample_point(value_base, sampling_locations_ptr, attention_weights_ptr, sample, query_mask, height, width,
                  level_start, channels, channel_mask, TOKEN_STRIDE: tl.constexpr):
    """One sampling point of ``BLOCK_Q`` queries: its attention weight, the bilinear fractions (fx, fy) and the four
    corners as (values, token index, valid) in the order (x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1)."""
    height_f = height.to(tl.float32)
    width_f = width.to(tl.float32)
    x = tl.load(sampling_locations_ptr + 2 * sample, mask=query_mask, other=0.0).to(tl.float32) * width_f - 0.5
    y = tl.load(sampling_locations_ptr + 2 * sample + 1, mask=query_mask, other=0.0).to(tl.float32) * height_f - 0.5
    attn = tl.load(attention_weights_ptr + sample, mask=query_mask, other=0.0).to(tl.float32)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    c00 = _load_corner(value_base, x0, y0, height_f, width_f, width, level_start, channels, channel_mask,
                       query_mask, TOKEN_STRIDE)
    c01 = _load_corner(value_base, x0 + 1, y0, height_f, width_f, width, level_start, channels, channel_mask,
                       query_mask, TOKEN_STRIDE)
    c10 = _load_corner(value_base, x0, y0 + 1, height_f, width_f, width, level_start, channels, channel_mask,
                       query_mask, TOKEN_STRIDE)
    c11 = _load_corner(value_base, x0 + 1, y0 + 1, height_f, width_f, width, level_start, channels, channel_mask,
                       query_mask, TOKEN_STRIDE)
    return attn, x - x0, y - y0, c00, c01, c10, c11


@triton.jit
def msda_forward_kernel(
    value_ptr, spatial_shapes_ptr, level_start_index_ptr, sampling_locations_ptr, attention_weights_ptr,
    batch, num_value, num_query,
    out_ptr,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[n, q, m, :] = sum_{l, p} attn[n, q, m, l, p] * bilinear(value level l, loc[n, q, m, l, p]).

    Grid: (cdiv(num_query, BLOCK_Q), batch * NUM_HEADS). ``out`` is ``[N, Lq, M, D]``. ``batch`` is unused by the
    body but part of the AOT plugin's scalar arguments (the grid is derived from it).
    """
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = pid_nm // NUM_HEADS
    m = pid_nm % NUM_HEADS
    queries = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    query_mask = queries < num_query
    channel_mask = channels < HEAD_DIM
    rows = (n * num_query + queries) * NUM_HEADS + m  # [BLOCK_Q] index of (n, q, m)
    value_base = value_ptr + n.to(tl.int64) * num_value * NUM_HEADS * HEAD_DIM + m * HEAD_DIM

    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in range(NUM_LEVELS):
        height = tl.load(spatial_shapes_ptr + 2 * level)
        width = tl.load(spatial_shapes_ptr + 2 * level + 1)
        level_start = tl.load(level_start_index_ptr + level)
        for point in range(NUM_POINTS):
            sample = (rows * NUM_LEVELS + level) * NUM_POINTS + point
            attn, fx, fy, c00, c01, c10, c11 = _sample_point(
                value_base, sampling_locations_ptr, attention_weights_ptr, sample, query_mask, height, width,
                level_start, channels, channel_mask, NUM_HEADS * HEAD_DIM)
            bilinear = (((1 - fy) * (1 - fx))[:, None] * c00[0] + ((1 - fy) * fx)[:, None] * c01[0]
                        + (fy * (1 - fx))[:, None] * c10[0] + (fy * fx)[:, None] * c11[0])
            acc += attn[:, None] * bilinear

    out_offsets = rows[:, None] * HEAD_DIM + channels[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty),
             mask=query_mask[:, None] & channel_mask[None, :])


@triton.jit
def msda_backward_kernel(
    value_ptr, spatial_shapes_ptr, level_start_index_ptr, sampling_locations_ptr, attention_weights_ptr, grad_out_ptr,
    num_value, num_query,
    grad_value_ptr, grad_locations_ptr, grad_weights_ptr,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients of the forward kernel; same grid. All three gradient buffers are fp32.

    ``grad_value`` is scattered with atomic adds (many queries sample the same token); the location and weight
    gradients are per sample, reduced over the ``D`` channels inside the program.
    """
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = pid_nm // NUM_HEADS
    m = pid_nm % NUM_HEADS
    queries = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    query_mask = queries < num_query
    channel_mask = channels < HEAD_DIM
    tile_mask = query_mask[:, None] & channel_mask[None, :]
    rows = (n * num_query + queries) * NUM_HEADS + m
    value_offset = n.to(tl.int64) * num_value * NUM_HEADS * HEAD_DIM + m * HEAD_DIM
    value_base = value_ptr + value_offset
    grad_value_base = grad_value_ptr + value_offset
    grad_out = tl.load(grad_out_ptr + rows[:, None] * HEAD_DIM + channels[None, :], mask=tile_mask,
                       other=0.0).to(tl.float32)

    for level in range(NUM_LEVELS):
        height = tl.load(spatial_shapes_ptr + 2 * level)
        width = tl.load(spatial_shapes_ptr + 2 * level + 1)
        level_start = tl.load(level_start_index_ptr + level)
        height_f = height.to(tl.float32)
        width_f = width.to(tl.float32)
        for point in range(NUM_POINTS):
            sample = (rows * NUM_LEVELS + level) * NUM_POINTS + point
            attn, fx, fy, c00, c01, c10, c11 = _sample_point(
                value_base, sampling_locations_ptr, attention_weights_ptr, sample, query_mask, height, width,
                level_start, channels, channel_mask, NUM_HEADS * HEAD_DIM)
            v00, t00, ok00 = c00
            v01, t01, ok01 = c01
            v10, t10, ok10 = c10
            v11, t11, ok11 = c11
            w00 = (1 - fy) * (1 - fx)
            w01 = (1 - fy) * fx
            w10 = fy * (1 - fx)
            w11 = fy * fx
            bilinear = w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
            tl.store(grad_weights_ptr + sample, tl.sum(grad_out * bilinear, axis=1), mask=query_mask)

            # d bilinear / d fx and d fy; d fx / d loc_x = W, d fy / d loc_y = H
            d_fx = (1 - fy)[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)
            d_fy = (1 - fx)[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)
            grad_x = attn * width_f * tl.sum(grad_out * d_fx, axis=1)
            grad_y = attn * height_f * tl.sum(grad_out * d_fy, axis=1)
            tl.store(grad_locations_ptr + 2 * sample, grad_x, mask=query_mask)
            tl.store(grad_locations_ptr + 2 * sample + 1, grad_y, mask=query_mask)

            scaled = attn[:, None] * grad_out
            _scatter_corner(grad_value_base, t00, ok00, w00, scaled, channels, channel_mask, NUM_HEADS * HEAD_DIM)
            _scatter_corner(grad_value_base, t01, ok01, w01, scaled, channels, channel_mask, NUM_HEADS * HEAD_DIM)
            _scatter_corner(grad_value_base, t10, ok10, w10, scaled, channels, channel_mask, NUM_HEADS * HEAD_DIM)
            _scatter_corner(grad_value_base, t11, ok11, w11, scaled, channels, channel_mask, NUM_HEADS * HEAD_DIM)


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------
def _prepare(value: torch.Tensor, spatial_shapes: SpatialShapes, level_start_index: torch.Tensor | None,
             sampling_locations: torch.Tensor, attention_weights: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes/dtypes/devices; return contiguous tensors and int32 shapes/starts on the value's device."""
    if value.dim() != 4:
        raise ValueError(f"MSDA value must be [N, S, M, D], got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"MSDA sampling_locations must be [N, Lq, M, L, P, 2], got {tuple(sampling_locations.shape)}")
    n, s, m, _ = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
        raise ValueError(f"MSDA sampling_locations {tuple(sampling_locations.shape)} does not match value "
                         f"{tuple(value.shape)} in batch or heads")
    if tuple(attention_weights.shape) != (n, lq, m, num_levels, p):
        raise ValueError(f"MSDA attention_weights must be {(n, lq, m, num_levels, p)}, "
                         f"got {tuple(attention_weights.shape)}")
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"Triton MSDA: {name} dtype {tensor.dtype} is not supported (float32/float16/bfloat16)")
        if tensor.device != value.device:
            raise ValueError(f"Triton MSDA: {name} is on {tensor.device} but value is on {value.device}")
    if value.device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(f"the Triton MSDA kernel needs CUDA tensors (got {value.device}); use impl='gather' on CPU, "
                           "or set TRITON_INTERPRET=1 before importing triton for a slow CPU emulation")

    if isinstance(spatial_shapes, torch.Tensor) and spatial_shapes.device.type == "cuda":
        shapes = spatial_shapes.to(device=value.device, dtype=torch.int32)  # no host sync: trust the caller's sizes
    else:
        shape_list = spatial_shapes_as_ints(spatial_shapes)
        if sum(h * w for h, w in shape_list) != s:
            raise ValueError(f"MSDA spatial_shapes {shape_list} hold {sum(h * w for h, w in shape_list)} tokens but "
                             f"value has S={s}")
        shapes = constant_tensor(tuple(shape_list), torch.int32, value.device)  # once per shape, not per call
    if tuple(shapes.shape) != (num_levels, 2):
        raise ValueError(f"MSDA spatial_shapes must be [L={num_levels}, 2], got {tuple(shapes.shape)}")
    if level_start_index is None:
        starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1].to(torch.int32)])
    else:
        if tuple(level_start_index.shape) != (num_levels,):
            raise ValueError(f"MSDA level_start_index must be [L={num_levels}], got {tuple(level_start_index.shape)}")
        starts = level_start_index.to(device=value.device, dtype=torch.int32)
    return (value.contiguous(), shapes.contiguous(), starts.contiguous(), sampling_locations.contiguous(),
            attention_weights.contiguous())


def _launch_shape(value: torch.Tensor, sampling_locations: torch.Tensor, block_q: int) -> tuple[tuple[int, int], dict]:
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    grid = (triton.cdiv(lq, block_q), n * m)
    meta = dict(NUM_HEADS=m, HEAD_DIM=d, NUM_LEVELS=num_levels, NUM_POINTS=p, BLOCK_Q=block_q,
                BLOCK_D=triton.next_power_of_2(d))
    return grid, meta


def msda_triton_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                        sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                        block_q: int = DEFAULT_BLOCK_Q) -> torch.Tensor:
    """Forward kernel on prepared inputs (contiguous, int32 shapes/starts on device): returns ``[N, Lq, M, D]``.

    The output dtype follows PyTorch's promotion of the three float inputs (= value's dtype when they agree).
    """
    n, s, m, d = value.shape
    lq = sampling_locations.shape[1]
    out_dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                    attention_weights.dtype)
    out = torch.empty((n, lq, m, d), dtype=out_dtype, device=value.device)
    if out.numel() == 0:
        return out
    grid, meta = _launch_shape(value, sampling_locations, block_q)
    msda_forward_kernel[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                              n, s, lq, out, num_warps=NUM_WARPS, **meta)
    return out


def msda_triton_backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                         level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                         attention_weights: torch.Tensor, block_q: int = DEFAULT_BLOCK_Q
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. value, sampling_locations and attention_weights, each in its input's dtype."""
    s, lq = value.shape[1], sampling_locations.shape[1]
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_locations = torch.zeros(sampling_locations.shape, dtype=torch.float32, device=value.device)
    grad_weights = torch.zeros(attention_weights.shape, dtype=torch.float32, device=value.device)
    if grad_weights.numel() > 0:
        grid, meta = _launch_shape(value, sampling_locations, block_q)
        msda_backward_kernel[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                   grad_out.contiguous(), s, lq, grad_value, grad_locations, grad_weights,
                                   num_warps=NUM_WARPS, **meta)
    return (grad_value.to(value.dtype), grad_locations.to(sampling_locations.dtype),
            grad_weights.to(attention_weights.dtype))


class MSDATritonFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward (no gradient for shapes / start indices)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return msda_triton_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = msda_triton_backward(
            grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        needs = ctx.needs_input_grad
        return (grad_value if needs[0] else None, None, None, grad_locations if needs[3] else None,
                grad_weights if needs[4] else None)


def msda_triton(value: torch.Tensor, spatial_shapes: SpatialShapes, level_start_index: torch.Tensor | None,
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """MSDA with the Triton kernels (shapes in the module docstring); returns ``[N, Lq, M * D]``, differentiable."""
    value, shapes, starts, locations, weights = _prepare(value, spatial_shapes, level_start_index,
                                                         sampling_locations, attention_weights)
    out = MSDATritonFunction.apply(value, shapes, starts, locations, weights)
    return out.flatten(2)


register_msda_impl("triton", msda_triton)
