import pytest
import torch
import torch.nn.functional as F

from sdconet.config import DataConfig
from sdconet.data.degradation import RealisticDegradation, degrade


@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_is_exactly_the_design_formula(scale):
    hr = torch.rand(2, 3, 64, 96)
    expected = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", align_corners=False)
    assert torch.equal(degrade(hr, scale), expected)
    assert torch.equal(degrade(hr[1], scale), expected[1])  # unbatched input gives the same pixels
    if scale == 2:
        assert torch.equal(degrade(hr), F.interpolate(hr, scale_factor=0.5, mode="bicubic", align_corners=False))


@pytest.mark.parametrize("scale", [2, 4])
def test_realistic_is_seeded_quantised_and_degrades(scale):
    hr = torch.rand(1, 3, 32, 32)
    hr = F.interpolate(hr, size=(64, 64), mode="bilinear", align_corners=False)  # smooth content
    a = degrade(hr, scale, "realistic", seed=3)
    assert a.shape == (1, 3, 64 // scale, 64 // scale)
    assert torch.equal(a, degrade(hr, scale, "realistic", seed=3))
    assert not torch.equal(a, degrade(hr, scale, "realistic", seed=4))
    assert a.min() >= 0 and a.max() <= 1
    assert torch.allclose(a * 255, (a * 255).round(), atol=1e-4)  # JPEG output: 8-bit levels
    bicubic = degrade(hr, scale)
    assert 0 < (a - bicubic).abs().mean() < 0.2  # a degraded version of the same picture


def test_realistic_ranges_come_from_config_and_matter():
    hr = torch.rand(2, 3, 64, 64)
    params = RealisticDegradation.from_config(DataConfig(blur_sigma=(2.0, 2.0), noise_std=(0.0, 0.0),
                                                         jpeg_quality=(95, 95)))
    assert params.blur_sigma == (2.0, 2.0) and params.jpeg_quality == (95, 95)
    strong_blur = degrade(hr, 2, "realistic", seed=0, realistic=params)
    light = degrade(hr, 2, "realistic", seed=0, realistic=RealisticDegradation((0.2, 0.2), (0.0, 0.0), (95, 95)))
    # heavy blur removes most of the per-pixel variance of random noise content
    assert strong_blur.std() < 0.6 * light.std()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="not divisible by the scale 2"):
        degrade(torch.rand(3, 65, 64))
    with pytest.raises(ValueError, match="unknown degradation mode 'nearest'"):
        degrade(torch.rand(3, 64, 64), 2, "nearest")
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        degrade(torch.rand(1, 64, 64))
