import torch

from sdconet.ops.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou,
                                 inverse_sigmoid)


def test_conversions_roundtrip():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.05, 0.1]])
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes, atol=1e-7)
    assert torch.allclose(box_cxcywh_to_xyxy(boxes)[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))


def test_iou_and_giou_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 4.0, 5.0, 5.0]])
    iou, _ = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    giou = generalized_box_iou(a, b)
    # hull of a and b[2] is 5x5=25, union 5 -> giou = 0 - 20/25
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 1.0, -0.8]]), atol=1e-6)


def test_inverse_sigmoid():
    x = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(torch.sigmoid(inverse_sigmoid(x)), x, atol=1e-6)
