"""``GradScale``: identity forward, gradient times a constant backward.

An extension beyond the paper (``model.sr_grad_scale``, 1.0 = off in every preset). The paper's stage 2 trains the
SR decoder at rho * eta, but the SR loss still reaches the shared Swin encoder at full strength; the paper does not
say whether that is intended. A ``GradScale(s)`` on the encoder features that feed the SR decoder keeps the forward
pass bit-identical and multiplies the SR loss's gradient into the encoder by ``s`` (the detection loss's gradient is
untouched: it flows through the neck, not through this op). ``s = 0`` stops L_sr at the encoder.
"""
from __future__ import annotations

import torch
from torch import nn


class _GradScaleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)  # a view, not x itself: autograd needs a new tensor to attach backward to

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged forward; its gradient multiplied by ``scale`` backward (``scale == 1`` returns ``x``)."""
    if scale == 1.0:
        return x
    return _GradScaleFn.apply(x, scale)


class GradScale(nn.Module):
    """Module form of :func:`grad_scale`; ``scale`` must be >= 0 (a negative one would reverse the SR gradient)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        if not scale >= 0.0:
            raise ValueError(f"model.sr_grad_scale must be >= 0 (1.0 = off), got {scale}")
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_scale(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
