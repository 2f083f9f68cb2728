"""Evaluation metrics: COCO AP on hand-made cases (expected values derived in the comments), PSNR, SSIM."""
import json
import logging
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from sdconet.engine.metrics import coco_evaluate, load_coco, outputs_to_detections, psnr, ssim

SMALL = [10.0, 10.0, 20.0, 20.0]  # xywh, area 400 < 32^2 -> "small"
MEDIUM = [50.0, 40.0, 50.0, 50.0]  # area 2500 -> "medium"
OTHER = [5.0, 60.0, 30.0, 30.0]  # area 900 -> "small", category 7


@pytest.fixture
def gt_file(tmp_path):
    """Two images 100x100 (H x W), categories 3 and 7 (non-contiguous ids), no large objects."""
    anns = [(1, 1, 3, SMALL), (2, 1, 3, MEDIUM), (3, 2, 7, OTHER)]
    data = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"},
                   {"id": 2, "width": 100, "height": 100, "file_name": "b.png"}],
        "categories": [{"id": 3, "name": "ship"}, {"id": 7, "name": "plane"}],
        "annotations": [{"id": i, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0} for i, img, cat, box in anns],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_perfect_detections_give_ap_one(gt_file):
    detections = [det(1, 3, SMALL, 0.9), det(1, 3, MEDIUM, 0.8), det(2, 7, OTHER, 0.7)]
    metrics = coco_evaluate(gt_file, detections)
    for key in ("AP", "AP50", "AP75", "APs", "APm"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["APl"] == -1.0  # pycocotools: no large ground truth


def test_known_miss(gt_file):
    # category 3 has 2 GT; only SMALL is found (precision 1 up to recall 0.5, nothing beyond). COCO interpolates
    # precision on 101 recall points 0, 0.01, ..., 1: 51 of them (<= 0.5) have precision 1 -> AP(cat 3) = 51/101.
    # Category 7 is found perfectly -> 1. AP = mean over categories = (51/101 + 1) / 2.
    # APs: both small GTs found -> 1. APm: the medium GT is missed (SMALL's detection is ignored there) -> 0.
    metrics = coco_evaluate(gt_file, [det(1, 3, SMALL, 0.9), det(2, 7, OTHER, 0.7)])
    assert metrics["AP"] == pytest.approx((51 / 101 + 1) / 2)
    assert metrics["AP50"] == pytest.approx((51 / 101 + 1) / 2)
    assert metrics["APs"] == pytest.approx(1.0)
    assert metrics["APm"] == pytest.approx(0.0)


def test_false_positive_ranked_first(gt_file):
    # category 7: a false positive (score 0.9, wrong place) above the true positive (0.8): precision is 1/2 at recall
    # 1, and the interpolated precision (max precision at recall >= r) is 1/2 for every r -> AP(cat 7) = 0.5.
    detections = [det(1, 3, SMALL, 0.9), det(1, 3, MEDIUM, 0.8),
                  det(2, 7, [60.0, 5.0, 30.0, 30.0], 0.9), det(2, 7, OTHER, 0.8)]
    assert coco_evaluate(gt_file, detections)["AP"] == pytest.approx((1.0 + 0.5) / 2)


def test_crowd_ground_truth_is_an_ignore_region(tmp_path):
    # a detection on an iscrowd box is neither TP nor FP: ranking it first does not lower AP (it would be 0.5)
    data = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": MEDIUM, "area": 2500, "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": OTHER, "area": 900, "iscrowd": 1}]}
    path = tmp_path / "crowd.json"
    path.write_text(json.dumps(data))
    metrics = coco_evaluate(path, [det(1, 1, OTHER, 0.9), det(1, 1, MEDIUM, 0.8)])
    assert metrics["AP"] == pytest.approx(1.0)


def test_zero_detections(gt_file):
    metrics = coco_evaluate(gt_file, [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["APs"] == 0.0
    assert metrics["APl"] == -1.0


def test_image_subset_and_bad_input(gt_file):
    # evaluating only image 2 leaves category 7's perfect detection -> AP 1 (category 3 has no GT there)
    assert coco_evaluate(gt_file, [det(2, 7, OTHER, 0.7)], image_ids=[2])["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image_id 9"):
        coco_evaluate(gt_file, [det(9, 3, SMALL, 0.9)])
    with pytest.raises(ValueError, match="category_id 4"):
        coco_evaluate(gt_file, [det(1, 4, SMALL, 0.9)])
    with pytest.raises(ValueError, match="lacks"):
        coco_evaluate(gt_file, [{"image_id": 1, "bbox": SMALL, "score": 0.5}])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_evaluate(gt_file.parent / "nope.json", [])


def test_pycocotools_prints_go_to_the_log(gt_file, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="sdconet.engine.metrics"):
        coco_evaluate(gt_file, [det(1, 3, SMALL, 0.9)])
    assert capsys.readouterr().out == ""
    assert any("Average Precision" in record.getMessage() for record in caplog.records)


def test_missing_area_is_filled_from_bbox(tmp_path):
    data = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": MEDIUM, "iscrowd": 0}]}
    path = tmp_path / "noarea.json"
    path.write_text(json.dumps(data))
    assert load_coco(path).anns[1]["area"] == 2500.0
    assert coco_evaluate(path, [det(1, 1, MEDIUM, 0.5)])["APm"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------------
# model outputs -> detections
# ----------------------------------------------------------------------------------------------------------------------
def test_outputs_to_detections_coordinates_and_topk():
    logits = torch.full((1, 4, 2), -8.0)
    logits[0, 2, 1] = 3.0  # best: query 2, label 1
    logits[0, 0, 0] = 1.0  # second: query 0, label 0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.1, 0.2], [0.9, 0.9, 0.3, 0.3]]])
    targets = [{"image_id": 5, "size": (100, 200)}]  # H x W the boxes are normalised to
    dets = outputs_to_detections({"pred_logits": logits, "pred_boxes": boxes}, targets, [3, 7], top_k=2)
    assert [d["category_id"] for d in dets] == [7, 3]
    assert dets[0]["score"] == pytest.approx(1 / (1 + math.exp(-3.0)))
    # query 2: cx 0.25*200=50, cy 0.75*100=75, w 20, h 20 -> xywh (40, 65, 20, 20)
    assert dets[0]["bbox"] == pytest.approx([40.0, 65.0, 20.0, 20.0])
    # query 0: (100, 50, 40, 40) -> (80, 30, 40, 40)
    assert dets[1]["bbox"] == pytest.approx([80.0, 30.0, 40.0, 40.0])
    assert all(d["image_id"] == 5 for d in dets)
    # query 3 reaches past the image: clipped to it when it is selected
    every = outputs_to_detections({"pred_logits": logits, "pred_boxes": boxes}, targets, {0: 3, 1: 7}, top_k=8)
    assert len(every) == 8
    x, y, w, h = [d for d in every if d["bbox"][0] == pytest.approx(150.0)][0]["bbox"]
    assert (x + w, y + h) == pytest.approx((200.0, 100.0))
    with pytest.raises(ValueError, match="label_to_category"):
        outputs_to_detections({"pred_logits": logits, "pred_boxes": boxes}, targets, [3])


def test_odd_sized_image_boxes_map_back_exactly(tmp_path):
    # the loader crops a 65x47 image to 64x46 (scale 2) and normalises boxes to the cropped size: a model that
    # predicts exactly the loader's normalised boxes must land on the annotation file's boxes (AP 1), not on boxes
    # stretched by 65/64 and 47/46
    from PIL import Image
    from sdconet.config import DataConfig
    from sdconet.data.dataset import CocoDetection
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((47, 65, 3), 90, dtype=np.uint8)).save(tmp_path / "images" / "odd.png")
    gt_boxes = [[40.0, 28.0, 20.0, 16.0], [4.0, 6.0, 10.0, 8.0]]
    gt = {"images": [{"id": 1, "width": 65, "height": 47, "file_name": "odd.png"}],
          "categories": [{"id": 3, "name": "ship"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 3, "bbox": b, "area": b[2] * b[3],
                           "iscrowd": 0} for i, b in enumerate(gt_boxes)]}
    ann_file = tmp_path / "gt.json"
    ann_file.write_text(json.dumps(gt))
    dataset = CocoDetection(tmp_path / "images", ann_file, DataConfig(cache_dir=str(tmp_path / "c")), upscale=2)
    target = dataset[0]["target"]
    assert target["size"].tolist() == [46, 64] and target["orig_size"].tolist() == [47, 65]
    logits = torch.full((1, 2, 1), 9.0)
    dets = outputs_to_detections({"pred_logits": logits, "pred_boxes": target["boxes"][None]}, [target], [3])
    assert torch.allclose(torch.tensor(sorted(d["bbox"] for d in dets)), torch.tensor(sorted(gt_boxes)), atol=1e-4)
    metrics = coco_evaluate(ann_file, dets)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(1.0)


def test_outputs_of_a_perfect_model_score_ap_one(gt_file):
    # normalised cxcywh of every GT, confident logits for its class -> through both helpers -> AP 1
    gt = load_coco(gt_file)
    label_of = {3: 0, 7: 1}
    logits = torch.full((2, 5, 2), -9.0)
    boxes = torch.full((2, 5, 4), 0.5)
    targets = []
    for b, image_id in enumerate((1, 2)):
        for q, ann in enumerate(gt.imgToAnns[image_id]):
            x, y, w, h = ann["bbox"]
            boxes[b, q] = torch.tensor([(x + w / 2) / 100, (y + h / 2) / 100, w / 100, h / 100])
            logits[b, q, label_of[ann["category_id"]]] = 9.0
        targets.append({"image_id": image_id, "size": (100, 100)})
    dets = outputs_to_detections({"pred_logits": logits, "pred_boxes": boxes}, targets, [3, 7])
    assert coco_evaluate(gt_file, dets)["AP"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------------
# PSNR / SSIM
# ----------------------------------------------------------------------------------------------------------------------
def test_psnr_known_values():
    a = torch.rand(2, 3, 16, 16)
    assert torch.isinf(psnr(a, a)).all()
    # constant 0.5 vs 0.6: MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    b = torch.full((3, 8, 8), 0.5, dtype=torch.float64)  # float64: exact 0.1 steps
    assert psnr(b, b + 0.1).item() == pytest.approx(20.0, abs=1e-6)
    # MSE 0.0001 on image 0 and 0.01 on image 1 -> 40 dB and 20 dB
    c = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    d = c.clone()
    d[0] += 0.01
    d[1] += 0.1
    assert psnr(c, d).tolist() == pytest.approx([40.0, 20.0], abs=1e-6)
    # padding excluded: a large error in padded pixels does not count
    d[1, :, 6:, :] = 1.0
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[1, 6:, :] = True
    assert psnr(c, d, padding_mask=mask).tolist() == pytest.approx([40.0, 20.0], abs=1e-6)


def _reference_ssim(a, b):
    """SSIM with scipy's Gaussian filter (radius int(3.5 * 1.5 + 0.5) = 5 -> 11 taps), borders cropped."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for x, y in zip(a.double().numpy(), b.double().numpy()):
        f = lambda img: gaussian_filter(img, sigma=1.5, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cov = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())
    return float(np.mean(values))


def test_ssim_identity_constant_and_reference():
    a = torch.rand(3, 32, 32)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)
    # constant images: variances and covariance are 0, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    c1 = 0.01 ** 2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)
    assert ssim(torch.full((3, 16, 16), 0.5), torch.full((3, 16, 16), 0.25)).item() == pytest.approx(expected)
    # random image vs a noisy copy: equals an independent scipy implementation of the same definition
    noisy = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    value = ssim(a, noisy).item()
    assert value == pytest.approx(_reference_ssim(a, noisy), abs=1e-9)
    assert 0.2 < value < 0.95
    assert ssim(noisy, a).item() == pytest.approx(value, abs=1e-12)
    batched = ssim(torch.stack((a, a)), torch.stack((a, noisy)))
    assert batched.tolist() == pytest.approx([1.0, value])
    with pytest.raises(ValueError, match="window"):
        ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))
