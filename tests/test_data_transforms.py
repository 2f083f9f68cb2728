import numpy as np
import pytest
import torch

from sdconet.data.transforms import (RandomGeometry, clip_boxes_to_window, crop, crop_to_multiple, hflip, rot90,
                                     vflip)


def _painted(height: int, width: int, boxes: torch.Tensor) -> torch.Tensor:
    """An image whose channel 0 is 1 inside each (integer) box; channel 1 carries a per-box id."""
    image = torch.zeros(3, height, width)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        image[0, y1:y2, x1:x2] = 1.0
        image[1, y1:y2, x1:x2] = k + 1
    return image


def _boxes_from_pixels(image: torch.Tensor, count: int) -> torch.Tensor:
    """Tight xyxy box of the pixels carrying each box id."""
    out = []
    for k in range(count):
        ys, xs = torch.nonzero(image[1] == k + 1, as_tuple=True)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32)


BOXES = torch.tensor([[2.0, 3.0, 10.0, 7.0], [20.0, 1.0, 31.0, 18.0], [0.0, 15.0, 4.0, 24.0]])


@pytest.mark.parametrize("op", [hflip, vflip, lambda i, b: rot90(i, b, 1), lambda i, b: rot90(i, b, 2),
                                lambda i, b: rot90(i, b, 3)])
def test_box_transform_matches_pixel_transform(op):
    image = _painted(24, 32, BOXES)
    out_image, out_boxes = op(image, BOXES)
    assert torch.equal(out_boxes, _boxes_from_pixels(out_image, len(BOXES)))


def test_flip_twice_and_four_quarter_turns_are_identity():
    image = torch.rand(3, 24, 32)
    for op in (hflip, vflip):
        twice_image, twice_boxes = op(*op(image, BOXES))
        assert torch.equal(twice_image, image) and torch.equal(twice_boxes, BOXES)
    turned_image, turned_boxes = rot90(image, BOXES, 1)
    assert turned_image.shape == (3, 32, 24)
    back_image, back_boxes = rot90(turned_image, turned_boxes, 3)
    assert torch.equal(back_image, image) and torch.equal(back_boxes, BOXES)
    full_image, full_boxes = rot90(image, BOXES, 4)
    assert torch.equal(full_image, image) and torch.equal(full_boxes, BOXES)


def test_clip_keeps_boxes_by_area_fraction():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],   # fully inside
                          [15.0, 0.0, 25.0, 10.0],  # half inside
                          [18.0, 0.0, 28.0, 10.0],  # 20% inside
                          [30.0, 30.0, 40.0, 40.0]])  # outside
    clipped, keep = clip_boxes_to_window(boxes, (0.0, 0.0, 20.0, 20.0), min_area_fraction=0.5)
    assert keep.tolist() == [True, True, False, False]
    assert torch.equal(clipped[1], torch.tensor([15.0, 0.0, 20.0, 10.0]))
    shifted, keep = clip_boxes_to_window(boxes, (10.0, 0.0, 30.0, 20.0), min_area_fraction=0.0)
    assert keep.tolist() == [False, True, True, False]  # zero-area intersections never count
    assert torch.equal(shifted[2], torch.tensor([8.0, 0.0, 18.0, 10.0]))  # in window coordinates


def test_crop_and_crop_to_multiple():
    image = _painted(24, 32, BOXES)
    out, boxes, keep = crop(image, BOXES, top=2, left=1, height=16, width=16, min_area_fraction=0.3)
    assert out.shape == (3, 16, 16)
    assert keep.tolist() == [True, False, False]
    assert torch.equal(boxes, torch.tensor([[1.0, 1.0, 9.0, 5.0]]))
    odd = torch.rand(3, 25, 33)
    out, boxes, keep = crop_to_multiple(odd, BOXES, 4, 0.5)
    assert out.shape == (3, 24, 32) and torch.equal(out, odd[:, :24, :32]) and keep.all()
    same, same_boxes, _ = crop_to_multiple(out, BOXES, 4, 0.5)
    assert same is out and same_boxes is BOXES


def test_random_geometry_is_reproducible_and_consistent():
    image = _painted(24, 32, BOXES)
    augment = RandomGeometry(crop_size=20, min_area_fraction=0.2)
    seen_shapes = set()
    for seed in range(12):
        a_image, a_boxes, a_keep = augment(image, BOXES, np.random.default_rng(seed))
        b_image, b_boxes, b_keep = augment(image, BOXES, np.random.default_rng(seed))
        assert torch.equal(a_image, b_image) and torch.equal(a_boxes, b_boxes) and torch.equal(a_keep, b_keep)
        assert a_image.shape[-2:] == (20, 20)
        # every kept box still encloses exactly the visible pixels of its object
        ids = torch.nonzero(a_keep).flatten()
        for row, k in enumerate(ids.tolist()):
            ys, xs = torch.nonzero(a_image[1] == k + 1, as_tuple=True)
            assert a_boxes[row].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1,
                                             ys.max().item() + 1]
        seen_shapes.add(tuple(a_boxes.flatten().tolist()))
    assert len(seen_shapes) > 4  # different seeds give different augmentations
