"""MSDA core: the grid_sample reference, the gather form and a naive per-point loop agree."""
import pytest
import torch

from sdconet.ops.msda import available_msda_impls, multi_scale_deformable_attn

SHAPES = [(7, 9), (5, 3), (3, 2), (1, 1)]  # sides that are not powers of two, a 1x1 level


def _inputs(n=2, lq=5, m=2, d=4, p=3, shapes=SHAPES, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g)
    # locations slightly outside [0, 1] too, to exercise zero padding at the borders
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g) * 1.2 - 0.1
    attn = torch.rand(n, lq, m, len(shapes), p, generator=g)
    attn = (attn / attn.sum(dim=(-1, -2), keepdim=True))
    spatial = torch.tensor(shapes, dtype=torch.long)
    start = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
    if requires_grad:
        value.requires_grad_(True)
        loc.requires_grad_(True)
        attn.requires_grad_(True)
    return value, spatial, start, loc, attn


def test_forms_agree_with_naive_loop():
    value, spatial, start, loc, attn = _inputs()
    ref = multi_scale_deformable_attn(value, spatial, start, loc, attn, impl="naive")
    assert ref.shape == (2, 5, 2 * 4)
    for impl in ("grid_sample", "gather"):
        out = multi_scale_deformable_attn(value, spatial, start, loc, attn, impl=impl)
        assert (out - ref).abs().max().item() <= 1e-5, impl


def test_forms_agree_at_paper_like_shapes():
    shapes = [(32, 32), (16, 16), (8, 8), (4, 4)]
    value, spatial, start, loc, attn = _inputs(n=1, lq=64, m=8, d=32, p=4, shapes=shapes, seed=3)
    a = multi_scale_deformable_attn(value, spatial, start, loc, attn, impl="grid_sample")
    b = multi_scale_deformable_attn(value, [tuple(s) for s in shapes], start, loc, attn, impl="gather")
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("impl", ["grid_sample", "gather"])
def test_gradients_flow_and_match(impl):
    value, spatial, start, loc, attn = _inputs(requires_grad=True, seed=1)
    out = multi_scale_deformable_attn(value, spatial, start, loc, attn, impl=impl)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (value, loc, attn)]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # gradients of the two PyTorch forms agree with each other
    value2, spatial2, start2, loc2, attn2 = _inputs(requires_grad=True, seed=1)
    other = "gather" if impl == "grid_sample" else "grid_sample"
    multi_scale_deformable_attn(value2, spatial2, start2, loc2, attn2, impl=other).square().sum().backward()
    assert torch.allclose(value.grad, value2.grad, atol=1e-5)
    assert torch.allclose(attn.grad, attn2.grad, atol=1e-5)
    # the sampling-location gradient: the bilinear weights' slopes, where a swapped x/y or a wrong W/H scale shows
    torch.testing.assert_close(loc.grad, loc2.grad, atol=1e-4, rtol=1e-4)


def test_unknown_impl_is_named():
    value, spatial, start, loc, attn = _inputs()
    with pytest.raises(ValueError, match="unknown MSDA implementation 'bogus'"):
        multi_scale_deformable_attn(value, spatial, start, loc, attn, impl="bogus")
    assert {"gather", "grid_sample", "naive"} <= set(available_msda_impls())
