"""The trainer with the real tiny SDCoNet on small synthetic images: exact resume, overfitting, the CLI, predict."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdconet.config import load_config
from sdconet.data import build_dataset
from sdconet.engine.checkpoint import load_model_weights
from sdconet.engine.metrics import COCO_METRICS
from sdconet.scene.folder import PredictOptions, Predictor, predict_folder
from sdconet.scene.tiling import tile_starts
from sdconet.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CLI_ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the CLI runs the tiny model too: one thread (see one_torch_thread)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many tiny ops (conftest.py)


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory):
    """Five 128 px synthetic images (4 train, 1 val), generated once into a private cache."""
    cache = tmp_path_factory.mktemp("synthetic")
    return [f"data.cache_dir={cache}", "data.synthetic.num_images=5", "data.synthetic.image_size=128",
            "data.synthetic.objects_per_image=[2,4]", "train.batch_size=2"]


def test_resume_reproduces_an_uninterrupted_run(tmp_path, data_overrides):
    # 2 epochs of 2 steps; epoch 1 in routing stage 1, epoch 2 in stage 2, so the resume crosses the switch
    schedule = ["train.stage1_epochs=1", "train.lr_drop_epochs=[1]", "train.deterministic=true"]
    straight = Trainer(load_config("tiny", [*data_overrides, *schedule, "train.epochs=2"]), tmp_path / "straight")
    straight.fit()

    first = Trainer(load_config("tiny", [*data_overrides, *schedule, "train.epochs=1"]), tmp_path / "split")
    first.fit()
    second = Trainer(load_config("tiny", [*data_overrides, *schedule, "train.epochs=2"]), tmp_path / "split")
    second.resume(tmp_path / "split")
    assert second.router.stage == 2 and second.start_epoch == 1
    second.fit()

    assert second.counters.global_step == straight.counters.global_step == 4
    expected = straight.model.state_dict()
    for name, value in second.model.state_dict().items():
        assert torch.equal(value, expected[name]), f"{name} differs after resume"
    sr_state = straight.optimizer.state[next(straight.model.sr_decoder.parameters())]
    assert sr_state and int(sr_state["step"]) == 2  # the SR decoder trained in epoch 2 only
    history = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert [e["epoch"] for e in history] == [1, 2] and [e["stage"] for e in history] == [1, 2]
    assert {"PSNR", "SSIM"} <= set(history[1]) and "PSNR" not in history[0]


def test_tiny_model_overfits_two_images(tmp_path, data_overrides):
    overrides = [*data_overrides, "data.hflip=false", "data.vflip=false", "data.rot90=false", "train.lr=1.0e-3",
                 "train.epochs=1"]
    cfg = load_config("tiny", overrides)
    dataset = build_dataset(cfg.data, "train", cfg.model.upscale, train=True)
    two_images = torch.utils.data.Subset(dataset, [0, 1])
    two_images.num_classes = dataset.num_classes
    trainer = Trainer(cfg, tmp_path / "run", train_set=two_images, val_set=dataset)
    trainer._apply_stage(0)
    start = trainer.train_one_epoch(0)["loss"]  # one step per call; the loss is measured before the update
    losses = []
    while len(losses) < MAX_OVERFIT_STEPS and (not losses or losses[-1] >= start / 3):
        losses.append(trainer.train_one_epoch(0)["loss"])
    assert losses[-1] < start / 3, f"loss {start:.2f} -> {[round(v, 2) for v in losses]}"


MAX_OVERFIT_STEPS = 30  # measured: below a third after ~7 steps at lr 1e-3


def run_cli(*args, cwd=REPO):
    result = subprocess.run([sys.executable, "train/run.py", *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=900, env=CLI_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_one_epoch_resume_then_eval_only_reproduces_ap(tmp_path, data_overrides):
    out = tmp_path / "run"
    result = run_cli("--config", "tiny", "--epochs", "1", "--out", out, *data_overrides)
    entries = json.loads((out / "metrics.json").read_text())
    assert len(entries) == 1 and set(COCO_METRICS) <= set(entries[-1])
    for name in ("config.yaml", "train.log", "checkpoints/last.safetensors", "checkpoints/best.safetensors",
                 "checkpoints/last.train.pt", "pictures/epoch_001.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert str(out / "metrics.json") in result.stdout and "AP50" in result.stdout

    run_cli("--resume", out, "--epochs", "2")  # the run directory and config come from the checkpoint
    entries = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in entries] == [1, 2]
    assert load_model_weights(out / "checkpoints" / "last.safetensors")[2]["epoch"] == 2

    run_cli("--eval-only", "--checkpoint", out)
    report = json.loads((out / "eval_best.json").read_text())
    for name in COCO_METRICS:
        assert report[name] == pytest.approx(entries[report["epoch"] - 1][name], abs=1e-9), name


def test_cli_rejects_bad_input_with_a_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "train/run.py", "train.epochs=abc", "--out", tmp_path],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=CLI_ENV)
    assert result.returncode == 2 and "train.epochs" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "train/run.py", "--eval-only", "--checkpoint", tmp_path / "none"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=CLI_ENV)
    assert result.returncode == 2 and "checkpoint not found" in result.stderr
    result = subprocess.run([sys.executable, "train/run.py", "--eval-only", "--schedule", "det_only"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=CLI_ENV)
    assert result.returncode == 2 and "--schedule would have no effect" in result.stderr


def test_tile_starts_cover_the_image_with_overlap():
    assert tile_starts(100, 128, 32) == [0]
    starts = tile_starts(300, 128, 32)
    assert starts[0] == 0 and starts[-1] == 300 - 128
    assert all(b - a <= 128 - 32 for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="larger than the overlap"):
        tile_starts(300, 32, 32)


def test_predict_tiles_large_images_and_writes_json_and_pictures(tmp_path, data_overrides):
    cfg = load_config("tiny", [*data_overrides, "train.epochs=1"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.save_checkpoint(0, 1)
    images = tmp_path / "images"
    images.mkdir()
    big = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(big).save(images / "big.png")
    Image.fromarray(big[:64, :96]).save(images / "small.png")
    (images / "broken.png").write_bytes(b"not an image")

    options = PredictOptions(tile=128, overlap=32, score_threshold=0.0)
    predictor = Predictor(trainer.paths.last, torch.device("cpu"), options)
    assert predictor.category_names == trainer.train_set.category_names
    report = predict_folder(predictor, images, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == report
    by_file = {r["file"]: r for r in report["images"]}
    assert set(by_file) == {"big.png", "small.png"} and report["errors"][0]["file"] == "broken.png"
    boxes = np.array([d["bbox"] for d in by_file["big.png"]["detections"]])
    assert len(boxes) > 0  # no per-image cap by default (the scene core's contract)
    assert (boxes[:, [0, 2]] <= 300 + 1e-3).all() and (boxes[:, [1, 3]] <= 200 + 1e-3).all()
    assert boxes[:, 2].max() > 128  # detections from tiles to the right of the first one, in image pixels
    for name in ("big.png", "small.png"):
        with Image.open(tmp_path / "out" / "annotated" / name) as annotated, Image.open(images / name) as source:
            assert annotated.size == source.size


def test_predict_default_tiling_fits_the_training_size(tmp_path, data_overrides):
    cfg = load_config("tiny", [*data_overrides, "train.epochs=1"])
    trainer = Trainer(cfg, tmp_path / "run")
    checkpoint = trainer.save_checkpoint(0, 1)
    cpu = torch.device("cpu")
    # 128 px training images: 64 network px tiles with the scene core's default overlap in network pixels, the same
    # in both modes (HR input: 128 file px tiles and 2x the overlap in file pixels)
    from sdconet.scene.core import DEFAULT_OVERLAP

    for mode in ("hr", "lr"):
        predictor = Predictor(checkpoint, cpu, PredictOptions(input=mode))
        assert (predictor.tile_lr, predictor.overlap_lr) == (64, min(DEFAULT_OVERLAP, 32)), mode
    # a tile smaller than twice the default caps the overlap at half the tile
    small = Predictor(checkpoint, cpu, PredictOptions(input="lr", tile=32))
    assert (small.tile_lr, small.overlap_lr) == (32, min(DEFAULT_OVERLAP, 16))
    with pytest.raises(ValueError, match="--tile 128 / --overlap 128"):
        Predictor(checkpoint, cpu, PredictOptions(tile=128, overlap=128))


def test_bf16_cpu_training_step_keeps_float32_master_weights(tmp_path, data_overrides, monkeypatch):
    # train.amp=auto resolves to bf16 on a CPU with AMX-BF16 (faked here: the test machine may lack it)
    monkeypatch.setattr("sdconet.engine.distributed.has_amx_bf16", lambda *args: True)
    cfg = load_config("tiny", [*data_overrides, "train.amp=auto", "train.schedule=joint", "train.epochs=1"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.amp == "bf16" and trainer.amp_dtype is torch.bfloat16 and not trainer.scaler.is_enabled()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer._apply_stage(0)
    assert trainer.router.run_sr  # the SR decoder runs under bf16 autocast too
    losses = trainer.train_one_epoch(0)
    assert trainer.counters.skipped_steps == 0 and losses["loss_sr"] > 0
    assert all(np.isfinite(v) for v in losses.values()), losses
    for name, param in trainer.model.named_parameters():
        assert param.dtype == torch.float32, name  # master weights stay float32; autocast casts per op
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
