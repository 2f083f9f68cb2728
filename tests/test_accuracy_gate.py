"""Accuracy gate (sdconet.deploy.accuracy): agreement on constructed detections, and the gate on runners."""
import numpy as np
import pytest

from sdconet.deploy.accuracy import GATE_TARGETS, accuracy_gate, detection_agreement
from sdconet.runtime.base import DEFAULT_SCORE_THRESHOLD, Runner

IMGSZ = 64


def _image(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, dtype=np.float32), "scores": np.asarray(scores, dtype=np.float32),
            "labels": np.asarray(labels, dtype=np.int64)}


REFERENCE = [_image([[10, 10, 30, 30], [40, 40, 60, 60], [0, 0, 5, 5]], [0.9, 0.6, 0.1], [1, 2, 0]),
             _image([[5, 5, 25, 45]], [0.8], [0])]


def test_identical_detections_agree_fully():
    result = detection_agreement(REFERENCE, REFERENCE)
    assert result["agreement"] == 1.0
    assert result["reference_detections"] == 3  # the 0.1 detection is below the default threshold
    assert result["matched"] == 3 and result["extra"] == 0


def test_shifted_boxes_lower_the_agreement():
    shifted = [dict(img, boxes=img["boxes"] + np.array([2, 0, 2, 0], np.float32)) for img in REFERENCE]
    # a 2 px shift of a 20 px box: IoU 18/22 = 0.82 < 0.9 -> unmatched; the 20x40 box: IoU 0.82 too
    assert detection_agreement(REFERENCE, shifted)["agreement"] == 0.0
    assert detection_agreement(REFERENCE, shifted, iou=0.8)["agreement"] == 1.0
    tiny_shift = [dict(img, boxes=img["boxes"] + np.array([0.5, 0, 0.5, 0], np.float32)) for img in REFERENCE]
    assert detection_agreement(REFERENCE, tiny_shift)["agreement"] == 1.0  # IoU 0.95


def test_label_score_and_one_to_one_matching():
    relabelled = [dict(REFERENCE[0], labels=np.array([1, 3, 0])), REFERENCE[1]]
    assert detection_agreement(REFERENCE, relabelled)["agreement"] == pytest.approx(2 / 3)
    # a score just under the threshold still counts (margin), a collapsed one does not
    lower = [dict(REFERENCE[0], scores=np.array([0.9, 0.27, 0.1])), REFERENCE[1]]
    assert detection_agreement(REFERENCE, lower)["agreement"] == 1.0
    collapsed = [dict(REFERENCE[0], scores=np.array([0.9, 0.05, 0.1])), REFERENCE[1]]
    assert detection_agreement(REFERENCE, collapsed)["agreement"] == pytest.approx(2 / 3)
    # two reference boxes on the same spot need two candidate boxes
    twice = [_image([[10, 10, 30, 30], [10, 10, 30, 30]], [0.9, 0.8], [1, 1])]
    once = [_image([[10, 10, 30, 30]], [0.9], [1])]
    assert detection_agreement(twice, once)["agreement"] == 0.5
    extra = detection_agreement(once, twice)
    assert extra["agreement"] == 1.0 and extra["extra"] == 1


def test_no_reference_detection_is_not_agreement():
    empty = [_image(np.zeros((2, 4)), [0.1, 0.05], [0, 1])]
    assert detection_agreement(empty, empty)["agreement"] is None
    with pytest.raises(ValueError, match="same images"):
        detection_agreement(REFERENCE, REFERENCE[:1])


class _TableRunner(Runner):
    """Answers each image with the detections stored for its mean pixel value (the dataset's image id)."""

    backend = "table"

    def __init__(self, table, precision):
        super().__init__(imgsz=IMGSZ, class_names=["a", "b", "c"], precision=precision, max_batch=2)
        self.table = table

    def _run(self, images):
        keys = [int(round(float(img.mean()) * 10)) for img in images]
        return {k: np.stack([self.table[key][k] for key in keys]) for k in ("boxes", "scores", "labels")}


class _Dataset:
    """Minimal COCO dataset of the data layer's contract: three LR images, one ground-truth box each."""

    def __init__(self, tmp_path):
        import json

        import torch

        self.label_to_category_id = {0: 1, 1: 2, 2: 3}
        self.items = []
        images, annotations = [], []
        for index in range(3):
            image_id = index + 1
            self.items.append({"image_lr": torch.full((3, IMGSZ, IMGSZ), image_id / 10.0),
                               "target": {"image_id": image_id, "orig_size": (2 * IMGSZ, 2 * IMGSZ)}})
            images.append({"id": image_id, "width": 2 * IMGSZ, "height": 2 * IMGSZ, "file_name": f"{image_id}.png"})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": 2, "bbox": [20, 20, 40, 40],
                                "area": 1600, "iscrowd": 0})
        self.ann_file = tmp_path / "val.json"
        self.ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                             "categories": [{"id": i, "name": str(i)} for i in (1, 2, 3)]}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def _table(shift=0.0, drop_label=False):
    # each image: the true box (HR [20, 60] -> LR [10, 30]) with label 1 (category 2) and two low-score boxes
    table = {}
    for image_id in (1, 2, 3):
        boxes = np.array([[10 + shift, 10, 30 + shift, 30], [40, 40, 50, 50], [0, 0, 8, 8]], np.float32)
        labels = np.array([0 if drop_label else 1, 2, 0])
        table[image_id] = _image(boxes, [0.95, 0.4, 0.05], labels)
    return table


def test_gate_passes_identical_and_fails_a_broken_candidate(tmp_path):
    dataset = _Dataset(tmp_path)
    reference = _TableRunner(_table(), "fp32")
    full = {"int8_mac_fraction": 1.0}
    same = accuracy_gate(reference, _TableRunner(_table(), "int8"), dataset, macs=full)
    assert same["passed"] and same["agreement"] == 1.0
    assert same["AP50"] == same["AP50_fp32"] > 0.9 and same["ap50_drop_points"] == 0.0
    assert same["images"] == 3 and same["reference_detections"] == 6
    assert same["min_agreement"] == GATE_TARGETS["int8"]["min_agreement"]
    assert same["score_threshold"] == DEFAULT_SCORE_THRESHOLD

    shifted = accuracy_gate(reference, _TableRunner(_table(shift=4.0), "int8"), dataset, macs=full)
    assert not shifted["passed"] and shifted["agreement"] == 0.5  # the true boxes moved, the others did not
    assert any("agreement" in reason for reason in shifted["reasons"])

    relabelled = accuracy_gate(reference, _TableRunner(_table(drop_label=True), "bf16"), dataset)
    assert not relabelled["passed"] and relabelled["AP50"] < relabelled["AP50_fp32"]
    assert relabelled["min_agreement"] == GATE_TARGETS["bf16"]["min_agreement"]
    assert any("AP50 drop" in reason for reason in relabelled["reasons"])


def test_gate_refuses_mismatched_sizes(tmp_path):
    dataset = _Dataset(tmp_path)
    other = _TableRunner(_table(), "int8")
    other.imgsz = 128
    with pytest.raises(ValueError, match="both must take"):
        accuracy_gate(_TableRunner(_table(), "fp32"), other, dataset)


def test_gate_checks_the_ap_drop_the_mac_share_and_reuses_the_reference(tmp_path):
    """AP@[.5:.95] drop against max_ap_drop (per path: 0.5 for the Q/DQ graph, 1.0 for CPU INT8), the INT8 share of
    the MACs, and one fp32 pass for several candidates."""
    from sdconet.deploy.accuracy import reference_results

    dataset = _Dataset(tmp_path)
    fp32 = _TableRunner(_table(), "fp32")
    reference = reference_results(fp32, dataset, IMGSZ)
    # a 1 px shift of a 20 px box: AP50 is unchanged, AP@[.5:.95] drops (IoU 0.82 fails the 0.85..0.95 thresholds)
    moved = _TableRunner(_table(shift=1.0), "int8")
    qdq = accuracy_gate(fp32, moved, dataset, reference=reference, macs={"int8_mac_fraction": 0.9},
                        target="int8-qdq")
    assert qdq["ap50_drop_points"] == 0.0 and qdq["ap_drop_points"] > 0.5
    assert qdq["max_ap_drop"] == GATE_TARGETS["int8-qdq"]["max_ap_drop"] == 0.5
    assert qdq["AP75"] <= qdq["AP75_fp32"] and any("AP drop" in r for r in qdq["reasons"])
    loose = accuracy_gate(fp32, moved, dataset, reference=reference, macs={"int8_mac_fraction": 0.9},
                          max_ap_drop=100.0, min_agreement=0.0)
    assert loose["passed"] and loose["int8_mac_fraction"] == 0.9
    # everything kept in float: the same detections, but not an INT8 model
    floated = accuracy_gate(fp32, _TableRunner(_table(), "int8"), dataset, reference=reference,
                            macs={"int8_mac_fraction": 0.1})
    assert not floated["passed"] and floated["reasons"] == ["int8_mac_fraction 0.100 < 0.5"]
    unmeasured = accuracy_gate(fp32, _TableRunner(_table(), "int8"), dataset, reference=reference)
    assert not unmeasured["passed"] and "not measured" in unmeasured["reasons"][0]
    with pytest.raises(ValueError, match="reference results"):
        accuracy_gate(fp32, moved, dataset, reference=reference, limit=2)


def test_gate_dataset_is_held_out_and_named_errors(tmp_path):
    from sdconet.config import load_config
    from sdconet.data import build_dataset
    from sdconet.deploy.accuracy import gate_dataset

    cfg = load_config("tiny", ["data.synthetic.num_images=4", "data.synthetic.image_size=64",
                               f"data.cache_dir={tmp_path / 'cache'}"])
    held_out = gate_dataset(cfg.data, 2, images=5)
    assert len(held_out) == 5
    train = build_dataset(cfg.data, "train", 2, train=False)
    # another seed: no held-out image equals a training image
    first = held_out[0]["image_lr"]
    assert all(not np.array_equal(first.numpy(), train[i]["image_lr"].numpy()) for i in range(len(train)))
    with pytest.raises(ValueError, match="--gate-images and --gate-ann"):
        gate_dataset(cfg.data, 2, gate_images=tmp_path)
    with pytest.raises(ValueError, match="--gate-ann .*missing.json"):
        gate_dataset(cfg.data, 2, gate_images=tmp_path, gate_ann=tmp_path / "missing.json")
