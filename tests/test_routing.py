"""Gradient routing, schedules, optimizer groups and the NaN guard, on a small stand-in multi-task module.

The stand-in has the real model's top-level children (encoder / neck / detector / sr_decoder) and forward signature,
so the Trainer drives it exactly as it drives SDCoNet; the tests are about the mechanism, not the network.
"""
import json
import math

import pytest
import torch
from torch import nn

from sdconet.config import ConfigError, load_config
from sdconet.data import collate_fn
from sdconet.engine.checkpoint import load_model_weights, load_train_state
from sdconet.engine.optim import BACKBONE_GROUP, DETECTOR_GROUP, SR_GROUP, lr_factor
from sdconet.engine.routing import (STAGE_DETECTION, STAGE_JOINT, apply_schedule, routing_stage, scale_epochs)
from sdconet.engine.trainer import Trainer, TrainingDiverged

IMAGE = 32  # HR side; LR is 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many tiny ops (conftest.py)


class StandInModel(nn.Module):
    """encoder -> neck -> detector heads; sr_decoder reconstructs a 2x image from the encoder feature."""

    def __init__(self, num_classes: int = 2, sr: bool = True, num_queries: int = 4):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 3, padding=1)
        self.neck = nn.Conv2d(8, 8, 1)
        self.detector = nn.Linear(8, num_queries * (num_classes + 4))
        self.sr_decoder = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.PixelShuffle(2)) if sr else None
        self.num_queries, self.num_classes = num_queries, num_classes
        self.sr_calls = 0
        if self.sr_decoder is not None:
            self.sr_decoder.register_forward_hook(lambda *_: setattr(self, "sr_calls", self.sr_calls + 1))

    def forward(self, images_lr, masks_lr=None, targets=None, run_sr=True):
        features = torch.relu(self.encoder(images_lr))
        pooled = self.neck(features).mean(dim=(2, 3))
        raw = self.detector(pooled).view(-1, self.num_queries, self.num_classes + 4)
        out = {"pred_logits": raw[..., :self.num_classes], "pred_boxes": raw[..., self.num_classes:].sigmoid()}
        if self.sr_decoder is not None and run_sr:
            out["sr_image"] = self.sr_decoder(features)
        return out

    def infer(self, images_lr, masks_lr=None):
        out = self.forward(images_lr, masks_lr, run_sr=False)
        scores, labels = out["pred_logits"].sigmoid().max(-1)
        h, w = images_lr.shape[-2:]
        cx, cy, bw, bh = out["pred_boxes"].unbind(-1)
        boxes = torch.stack(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h), -1)
        return {"boxes": boxes, "scores": scores, "labels": labels,
                "saliency": torch.zeros(images_lr.shape[0], 1, h // 8, w // 8)}


class StandInCriterion(nn.Module):
    """L1 between each query box and the first target box + BCE on its label + SR L1 (when present)."""

    def __init__(self, poison_steps: tuple[int, ...] = ()):
        super().__init__()
        self.poison_steps, self.calls = set(poison_steps), 0

    def forward(self, outputs, targets, images_hr=None, masks_hr=None):
        boxes = torch.stack([t["boxes"][0] for t in targets])[:, None]
        onehot = torch.zeros_like(outputs["pred_logits"])
        for b, t in enumerate(targets):
            onehot[b, :, t["labels"][0]] = 1.0
        losses = {"loss_l1": (outputs["pred_boxes"] - boxes).abs().mean(),
                  "loss_class": nn.functional.binary_cross_entropy_with_logits(outputs["pred_logits"], onehot)}
        if "sr_image" in outputs:
            losses["loss_sr"] = (outputs["sr_image"] - images_hr).abs().mean()
        if self.calls in self.poison_steps:
            losses["loss_l1"] = losses["loss_l1"] * math.nan
        self.calls += 1
        losses["loss"] = sum(losses.values())
        return losses


class StandInDataset(torch.utils.data.Dataset):
    """Items per docs/architecture.md with one box each, plus a COCO ground-truth file for evaluation."""

    def __init__(self, root, count: int = 4):
        generator = torch.Generator().manual_seed(1)
        self.items, images, annotations = [], [], []
        for i in range(count):
            hr = torch.rand(3, IMAGE, IMAGE, generator=generator)
            x, y, size = 4 + 2 * i, 6, 10
            label = i % 2
            target = {"boxes": torch.tensor([[(x + size / 2) / IMAGE, (y + size / 2) / IMAGE, size / IMAGE,
                                              size / IMAGE]]),
                      "boxes_xyxy": torch.tensor([[x, y, x + size, y + size]], dtype=torch.float32),
                      "labels": torch.tensor([label]), "ignore": torch.tensor([False]), "image_id": i + 1,
                      "size": torch.tensor([IMAGE, IMAGE]), "orig_size": torch.tensor([IMAGE, IMAGE])}
            self.items.append({"image_lr": hr[:, ::2, ::2].contiguous(), "image_hr": hr, "target": target})
            images.append({"id": i + 1, "file_name": f"{i}.png", "width": IMAGE, "height": IMAGE})
            annotations.append({"id": i + 1, "image_id": i + 1, "category_id": label + 1, "bbox": [x, y, size, size],
                                "area": size * size, "iscrowd": 0})
        self.category_names = ["a", "b"]
        self.num_classes = 2
        self.label_to_category_id = [1, 2]
        self.ann_file = root / "gt.json"
        self.ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                             "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def make_trainer(tmp_path, overrides=(), sr=True, criterion=None, out="run"):
    cfg = load_config("tiny", ["train.batch_size=2", "train.epochs=4", "train.stage1_epochs=2",
                               "train.lr_drop_epochs=[3]", "train.clip_max_norm=0", *overrides])
    dataset = StandInDataset(tmp_path)
    return Trainer(cfg, tmp_path / out, model=StandInModel(sr=sr), criterion=criterion or StandInCriterion(),
                   train_set=dataset, val_set=dataset, collate_fn=collate_fn)


def sr_state(trainer):
    return {k: v.clone() for k, v in trainer.model.sr_decoder.state_dict().items()}


def group(trainer, name):
    return next(g for g in trainer.optimizer.param_groups if g["name"] == name)


# --------------------------------------------------------------------------------------------------------------------
def test_schedules_map_onto_model_flags():
    expected = {"full": (True, True), "joint": (True, True), "sr_only": (True, False),
                "saliency_only": (False, True), "det_only": (False, False)}
    for name, (sr, saliency) in expected.items():
        cfg = apply_schedule(load_config("tiny", [f"train.schedule={name}"]))
        assert (cfg.model.sr, cfg.model.saliency.enabled) == (sr, saliency), name
    with pytest.raises(ConfigError, match="train.schedule: unknown schedule 'nope'"):
        apply_schedule(load_config("tiny", ["train.schedule=nope"]))


def test_stage_follows_epoch_per_schedule():
    train = load_config("tiny", ["train.stage1_epochs=2"]).train
    assert [routing_stage(train, e) for e in range(4)] == [1, 1, 2, 2]
    for name, stages in {"joint": [2, 2, 2, 2], "sr_only": [1, 1, 2, 2], "det_only": [1, 1, 1, 1]}.items():
        train = load_config("tiny", ["train.stage1_epochs=2", f"train.schedule={name}"]).train
        assert [routing_stage(train, e) for e in range(4)] == stages, name


def test_epochs_flag_keeps_stage1_share():
    paper = load_config("paper").train
    assert (paper.epochs, paper.stage1_epochs, paper.lr_drop_epochs) == (52, 16, (27,))
    scaled = scale_epochs(paper, 13)
    assert (scaled.epochs, scaled.stage1_epochs, scaled.lr_drop_epochs) == (13, 4, (7,))
    assert scale_epochs(paper, 52) == paper


def test_optimizer_holds_sr_params_from_step_0(tmp_path):
    trainer = make_trainer(tmp_path)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in trainer.optimizer.param_groups}
    assert groups[SR_GROUP] == {id(p) for p in trainer.model.sr_decoder.parameters()}
    assert groups[BACKBONE_GROUP] == {id(p) for p in trainer.model.encoder.parameters()}
    every = {id(p) for p in trainer.model.parameters()}
    assert set().union(*groups.values()) == every and sum(map(len, groups.values())) == len(every)
    lr = trainer.cfg.train.lr
    assert group(trainer, BACKBONE_GROUP)["lr"] == pytest.approx(lr * trainer.cfg.train.backbone_lr_mult)
    assert group(trainer, DETECTOR_GROUP)["lr"] == pytest.approx(lr)


def test_stage1_step_freezes_and_skips_sr_then_stage2_trains_it(tmp_path):
    trainer = make_trainer(tmp_path)
    train = trainer.cfg.train
    before, encoder_before = sr_state(trainer), trainer.model.encoder.weight.clone()

    assert trainer._apply_stage(0) == STAGE_DETECTION
    assert group(trainer, SR_GROUP)["lr"] == 0.0
    assert not any(p.requires_grad for p in trainer.model.sr_decoder.parameters())
    trainer.train_one_epoch(0)  # two optimizer steps
    assert trainer.model.sr_calls == 0
    for name, value in sr_state(trainer).items():
        assert torch.equal(value, before[name]), f"stage 1 changed sr_decoder.{name}"
    assert not torch.equal(trainer.model.encoder.weight, encoder_before)
    assert all(trainer.optimizer.state.get(p) in (None, {}) for p in trainer.model.sr_decoder.parameters())

    assert trainer._apply_stage(train.stage1_epochs) == STAGE_JOINT
    assert group(trainer, SR_GROUP)["lr"] == pytest.approx(train.sr_lr_ratio * train.lr)
    trainer.train_one_epoch(train.stage1_epochs)
    assert trainer.model.sr_calls == 2
    changed = [not torch.equal(v, before[k]) for k, v in sr_state(trainer).items()]
    assert all(changed)


def test_sr_lr_follows_lr_drops_in_stage2(tmp_path):
    trainer = make_trainer(tmp_path, ["train.epochs=5", "train.stage1_epochs=1", "train.lr_drop_epochs=[2]"])
    train = trainer.cfg.train
    seen = []
    for epoch in range(4):
        trainer._apply_stage(epoch)
        seen.append(group(trainer, SR_GROUP)["lr"])
        trainer.optimizer.step()  # no gradients: a no-op that keeps the scheduler's call-order check quiet
        trainer.scheduler.step()
    rho_eta = train.sr_lr_ratio * train.lr
    assert seen == pytest.approx([0.0, rho_eta, rho_eta * train.lr_gamma, rho_eta * train.lr_gamma])
    assert lr_factor(train, 2) == pytest.approx(train.lr_gamma)
    assert group(trainer, DETECTOR_GROUP)["lr"] == pytest.approx(train.lr * train.lr_gamma)


@pytest.mark.parametrize("epochs_done, saved_stage, next_stage", [
    (1, STAGE_DETECTION, STAGE_DETECTION),  # inside stage 1
    (2, STAGE_DETECTION, STAGE_JOINT),  # saved in stage 1, resumes into stage 2
    (3, STAGE_JOINT, STAGE_JOINT),  # inside stage 2
])
def test_resume_restores_routing_stage(tmp_path, epochs_done, saved_stage, next_stage):
    trainer = make_trainer(tmp_path, [f"train.epochs={epochs_done}"])
    trainer.fit()
    state = load_train_state(trainer.paths.train_state)
    _, _, meta = load_model_weights(trainer.paths.last)
    assert state["epoch"] == meta["epoch"] == epochs_done and state["stage"] == meta["stage"] == saved_stage

    resumed = make_trainer(tmp_path, ["train.epochs=4"], out="run")
    resumed.resume(trainer.paths.root)
    assert resumed.start_epoch == epochs_done and resumed.router.stage == next_stage
    trainable = next_stage == STAGE_JOINT
    assert all(p.requires_grad == trainable for p in resumed.model.sr_decoder.parameters())
    train = resumed.cfg.train
    expected_lr = train.sr_lr_ratio * train.lr * lr_factor(train, epochs_done) if trainable else 0.0
    assert group(resumed, SR_GROUP)["lr"] == pytest.approx(expected_lr)
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name


def test_schedule_without_sr_has_no_sr_group(tmp_path):
    trainer = make_trainer(tmp_path, ["train.schedule=det_only"], sr=False)
    assert trainer.cfg.model.sr is False and trainer.cfg.model.saliency.enabled is False
    assert SR_GROUP not in {g["name"] for g in trainer.optimizer.param_groups}
    assert trainer._apply_stage(3) == STAGE_DETECTION and not trainer.router.run_sr


def test_non_finite_losses_are_skipped_and_counted(tmp_path):
    trainer = make_trainer(tmp_path, ["train.epochs=1"], criterion=StandInCriterion(poison_steps=(0, 1)))
    trainer._apply_stage(0)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_one_epoch(0)  # both steps poisoned: nothing may change
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert trainer.counters.skipped_steps == 2 and trainer.counters.consecutive_bad == 2
    trainer.train_one_epoch(0)  # the criterion is clean again
    assert trainer.counters.skipped_steps == 2 and trainer.counters.consecutive_bad == 0
    assert not torch.equal(trainer.model.encoder.weight, weights["encoder.weight"])


def test_repeated_non_finite_losses_stop_with_a_usable_checkpoint(tmp_path):
    # 2 steps per epoch; every loss from the third epoch on is NaN
    trainer = make_trainer(tmp_path, ["train.max_bad_steps=2", "train.epochs=3"],
                           criterion=StandInCriterion(poison_steps=tuple(range(4, 100))))
    with pytest.raises(TrainingDiverged, match=r"2 consecutive non-finite steps .* epoch 3.*last.safetensors"):
        trainer.fit()
    cfg, state_dict, meta = load_model_weights(trainer.paths.last)
    assert meta["epoch"] == 2 and "stopped" in meta["note"]
    assert all(torch.isfinite(v).all() for v in state_dict.values())
    resumed = make_trainer(tmp_path, ["train.epochs=3"])
    resumed.resume(trainer.paths.root)  # the checkpoint left behind is a valid resume point
    assert resumed.start_epoch == 2 and resumed.counters.skipped_steps == 2


def test_tensorboard_is_open_only_during_fit(tmp_path):
    from sdconet.engine.checkpoint import CheckpointError

    trainer = make_trainer(tmp_path, ["train.epochs=1"])
    with pytest.raises(CheckpointError, match="no_such_run"):
        trainer.resume(tmp_path / "no_such_run")
    assert trainer.writer is None and not trainer.paths.tensorboard.exists()  # a failed resume leaves nothing open
    trainer.fit()
    assert trainer.writer is None and list(trainer.paths.tensorboard.glob("events.out.tfevents.*"))
