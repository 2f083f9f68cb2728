import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from sdconet.config import DataConfig, SyntheticDataConfig
from sdconet.data import build_dataset, collate_fn, degrade
from sdconet.data.dataset import CocoDetection
from sdconet.data.synthetic import ensure_synthetic_dataset, synthetic_cache_key
from sdconet.ops.box_ops import box_cxcywh_to_xyxy

CATEGORIES = [{"id": 3, "name": "ship"}, {"id": 7, "name": "plane"}]


def write_coco_dataset(root: Path, images: list[tuple[str, int, int]], annotations: list[dict]) -> tuple[Path, Path]:
    """Random-noise images of the given (name, width, height) + a COCO JSON; returns (images_dir, ann_file)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i, (name, width, height) in enumerate(images):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(images_dir / name)
        entries.append({"id": i + 1, "file_name": name, "width": width, "height": height})
    for k, annotation in enumerate(annotations):
        annotation.setdefault("id", k + 1)
        annotation.setdefault("iscrowd", 0)
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": CATEGORIES}))
    return images_dir, ann_file


def tiny_synthetic(tmp_path: Path, **overrides) -> DataConfig:
    synthetic = SyntheticDataConfig(num_images=4, val_fraction=0.25, image_size=64, objects_per_image=(2, 4),
                                    distractors_per_image=(1, 2), **overrides)
    return DataConfig(cache_dir=str(tmp_path / "cache"), synthetic=synthetic)


def test_synthetic_items_follow_the_contract(tmp_path):
    cfg = tiny_synthetic(tmp_path)
    train = build_dataset(cfg, "train", upscale=2, train=True)
    val = build_dataset(cfg, "val", upscale=2, train=False)
    assert (len(train), len(val)) == (3, 1)
    assert train.num_classes == 6 and len(train.category_names) == 6 and train.category_names[0] == "airplane"
    assert train.label_to_category_id == [1, 2, 3, 4, 5, 6]
    coco = COCO(str(val.ann_file))
    for dataset in (train, val):
        for i in range(len(dataset)):
            item = dataset[i]
            hr, lr, target = item["image_hr"], item["image_lr"], item["target"]
            assert hr.dtype == lr.dtype == torch.float32 and hr.shape[0] == 3
            assert hr.shape[-2:] == (2 * lr.shape[-2], 2 * lr.shape[-1])
            assert torch.equal(lr, degrade(hr, 2))  # the one degradation function made the input
            assert 0 <= hr.min() and hr.max() <= 1
            n = len(target["labels"])
            assert target["boxes"].shape == target["boxes_xyxy"].shape == (n, 4)
            assert target["labels"].dtype == torch.int64 and target["ignore"].dtype == torch.bool
            assert ((target["labels"] >= 0) & (target["labels"] < 6)).all()
            height, width = target["size"].tolist()
            assert (height, width) == tuple(hr.shape[-2:]) and target["orig_size"].tolist() == [64, 64]
            scale = torch.tensor([width, height, width, height])
            assert torch.allclose(box_cxcywh_to_xyxy(target["boxes"]) * scale, target["boxes_xyxy"], atol=1e-4)
            assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    # validation items are the file's boxes, mapped to contiguous labels, unchanged
    target = val[0]["target"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[target["image_id"]]))
    expected = sorted([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3],
                       val.label_to_category_id.index(a["category_id"])] for a in anns)
    got = sorted(row[:4] + [label] for row, label in zip(target["boxes_xyxy"].tolist(), target["labels"].tolist()))
    assert got == expected


def test_synthetic_cache_is_keyed_and_reused(tmp_path):
    cfg = tiny_synthetic(tmp_path)
    first = ensure_synthetic_dataset(cfg.synthetic, cfg.cache_dir)
    stamp = (first / "annotations" / "train.json").stat().st_mtime_ns
    assert ensure_synthetic_dataset(cfg.synthetic, cfg.cache_dir) == first
    assert (first / "annotations" / "train.json").stat().st_mtime_ns == stamp  # not regenerated
    other = tiny_synthetic(tmp_path, seed=1).synthetic
    assert synthetic_cache_key(other) != synthetic_cache_key(cfg.synthetic)
    assert ensure_synthetic_dataset(other, cfg.cache_dir) != first


def test_concurrent_generation_is_safe(tmp_path):
    code = ("import sys; from sdconet.config import SyntheticDataConfig; "
            "from sdconet.data.synthetic import ensure_synthetic_dataset; "
            "cfg = SyntheticDataConfig(num_images=6, image_size=96); "
            "print(ensure_synthetic_dataset(cfg, sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temporary folder left behind
    for split in ("train", "val"):
        data = json.loads((folder / "annotations" / f"{split}.json").read_text())
        assert all((folder / "images" / split / image["file_name"]).is_file() for image in data["images"])


def test_collate_pads_bottom_right_with_masks(tmp_path):
    images_dir, ann_file = write_coco_dataset(tmp_path, [("a.png", 64, 48), ("b.png", 40, 64)], [
        {"image_id": 1, "category_id": 3, "bbox": [4, 4, 10, 10]},
        {"image_id": 2, "category_id": 7, "bbox": [0, 0, 8, 6]}])
    dataset = CocoDetection(images_dir, ann_file, DataConfig(cache_dir=str(tmp_path / "c")), upscale=2)
    items = [dataset[0], dataset[1]]
    batch = collate_fn(items)
    assert batch["images_lr"].shape == (2, 3, 32, 32) and batch["images_hr"].shape == (2, 3, 64, 64)
    assert batch["masks_lr"].shape == (2, 32, 32) and batch["masks_hr"].shape == (2, 64, 64)
    assert batch["masks_lr"].dtype == torch.bool
    # item 0: LR 24 x 32 (h x w) valid; item 1: LR 32 x 20 valid
    assert not batch["masks_lr"][0, :24, :].any() and batch["masks_lr"][0, 24:, :].all()
    assert not batch["masks_lr"][1, :, :20].any() and batch["masks_lr"][1, :, 20:].all()
    assert not batch["masks_hr"][0, :48, :].any() and batch["masks_hr"][0, 48:, :].all()
    assert torch.equal(batch["images_hr"][1, :, :, :40], items[1]["image_hr"])
    assert (batch["images_lr"][0, :, 24:] == 0).all()
    assert batch["targets"][1]["labels"].tolist() == [1]  # category 7 is the second category
    padded = collate_fn(items, size_divisibility=24)
    assert padded["images_lr"].shape == (2, 3, 48, 48) and padded["images_hr"].shape == (2, 3, 96, 96)
    assert padded["masks_lr"][:, 32:, :].all() and padded["masks_hr"][:, :, 64:].all()


@pytest.mark.parametrize("upscale", [2, 4])
def test_sizes_not_divisible_by_the_scale_are_cropped(tmp_path, upscale):
    images_dir, ann_file = write_coco_dataset(tmp_path, [("odd.png", 65, 47)], [
        {"image_id": 1, "category_id": 3, "bbox": [50, 30, 15, 17]},  # touches the right and bottom edges
        {"image_id": 1, "category_id": 3, "bbox": [64, 10, 1, 5]}])  # lies in the cropped-away column
    item = CocoDetection(images_dir, ann_file, DataConfig(cache_dir=str(tmp_path / "c")), upscale=upscale)[0]
    height, width = 47 - 47 % upscale, 65 - 65 % upscale
    assert item["image_hr"].shape == (3, height, width)
    assert item["image_lr"].shape == (3, height // upscale, width // upscale)
    assert item["target"]["size"].tolist() == [height, width] and item["target"]["orig_size"].tolist() == [47, 65]
    assert item["target"]["boxes_xyxy"].tolist() == [[50.0, 30.0, float(width), float(height)]]


def test_augmentations_are_seeded_per_epoch_and_train_only(tmp_path):
    cfg = tiny_synthetic(tmp_path)
    train = build_dataset(cfg, "train", upscale=2, train=True)
    first = [train[i] for i in range(len(train))]
    again = [train[i] for i in range(len(train))]
    assert all(torch.equal(a["image_hr"], b["image_hr"]) for a, b in zip(first, again))
    train.set_epoch(1)
    later = [train[i] for i in range(len(train))]
    assert any(not torch.equal(a["image_hr"], b["image_hr"]) for a, b in zip(first, later))
    plain = build_dataset(cfg, "train", upscale=2, train=False)
    plain.set_epoch(5)
    assert all(t["target"]["orig_size"].tolist() == list(t["image_hr"].shape[-2:]) for t in map(plain.__getitem__,
                                                                                                 range(len(plain))))


def test_random_crop_and_realistic_degradation(tmp_path):
    cfg = tiny_synthetic(tmp_path)
    cfg.random_crop = 48
    cfg.degradation = "realistic"
    train = build_dataset(cfg, "train", upscale=2, train=True)
    item = train[0]
    assert item["image_hr"].shape == (3, 48, 48) and item["image_lr"].shape == (3, 24, 24)
    assert torch.equal(item["image_lr"], train[0]["image_lr"])  # seeded per item
    assert not torch.equal(item["image_lr"], degrade(item["image_hr"], 2))
    cfg.random_crop = 47
    with pytest.raises(ValueError, match="random_crop=47"):
        build_dataset(cfg, "train", upscale=2, train=True)


def test_difficult_boxes_are_ignored_in_targets_and_evaluation(tmp_path):
    images_dir, ann_file = write_coco_dataset(tmp_path, [("a.png", 64, 64)], [
        {"image_id": 1, "category_id": 3, "bbox": [4, 4, 10, 10], "difficult": 1},
        {"image_id": 1, "category_id": 7, "bbox": [30, 30, 10, 10], "difficult": 0}])
    dataset = CocoDetection(images_dir, ann_file, DataConfig(cache_dir=str(tmp_path / "c")), upscale=2)
    assert dataset[0]["target"]["ignore"].tolist() == [True, False]
    assert dataset.ann_file != ann_file and dataset.ann_file.is_file()
    gt = COCO(str(dataset.ann_file))
    assert [a["iscrowd"] for a in gt.loadAnns(gt.getAnnIds())] == [1, 0]  # pycocotools' ignore regions
    keep = CocoDetection(images_dir, ann_file, DataConfig(cache_dir=str(tmp_path / "c"), ignore_difficult=False))
    assert keep[0]["target"]["ignore"].tolist() == [False, False] and keep.ann_file == ann_file


def test_unknown_split_and_missing_root(tmp_path):
    cfg = tiny_synthetic(tmp_path)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        build_dataset(cfg, "test", upscale=2, train=False)
    cfg.root = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data.root folder not found"):
        build_dataset(cfg, "train", upscale=2, train=True)
