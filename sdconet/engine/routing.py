"""Two-stage gradient routing (DESIGN §3) and the training schedules of the paper's ablations.

Stage 1 (the first ``train.stage1_epochs`` epochs): the SR decoder is frozen (``requires_grad=False``, its optimizer
group at lr 0) and not executed; encoder + detector learn from the detection (+ saliency) losses. Stage 2: the SR
decoder trains jointly at lr = rho * eta (``train.sr_lr_ratio``). The SR parameters sit in the optimizer from step 0,
so the switch never loses them, and the stage is a pure function of the epoch, so it survives checkpoint/resume.

Schedules (``train.schedule``):

============== ==== ======== =========================================
schedule       SR   saliency SR decoder
============== ==== ======== =========================================
full           yes  yes      stage 1 frozen, stage 2 trains (routing)
joint          yes  yes      trains from step 0
sr_only        yes  no       routing as in ``full``
saliency_only  no   yes      not built
det_only       no   no       not built
============== ==== ======== =========================================
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from sdconet.config import Config, ConfigError, TrainConfig
from sdconet.engine.optim import SR_GROUP, lr_factor
from sdconet.utils.logging import get_logger

logger = get_logger(__name__)

STAGE_DETECTION = 1  # SR decoder frozen and not executed (or absent)
STAGE_JOINT = 2  # SR decoder trains at rho * eta


@dataclass(frozen=True)
class ScheduleSpec:
    sr: bool  # build and (eventually) train the SR decoder
    saliency: bool  # saliency predictor + token filtering + saliency loss
    routing: bool  # hold the SR decoder frozen for the first stage1_epochs


SCHEDULES: dict[str, ScheduleSpec] = {
    "full": ScheduleSpec(sr=True, saliency=True, routing=True),
    "joint": ScheduleSpec(sr=True, saliency=True, routing=False),
    "sr_only": ScheduleSpec(sr=True, saliency=False, routing=True),
    "saliency_only": ScheduleSpec(sr=False, saliency=True, routing=False),
    "det_only": ScheduleSpec(sr=False, saliency=False, routing=False),
}


def schedule_spec(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ConfigError(f"train.schedule: unknown schedule '{name}' (choose from {', '.join(SCHEDULES)})")
    return SCHEDULES[name]


def apply_schedule(cfg: Config) -> Config:
    """A copy of ``cfg`` whose ``model.sr`` / ``model.saliency.enabled`` follow ``train.schedule``.

    The schedule is the ablation switch, so it wins over the model flags; a change is logged.
    """
    spec = schedule_spec(cfg.train.schedule)
    if cfg.model.sr != spec.sr or cfg.model.saliency.enabled != spec.saliency:
        logger.info("schedule '%s': model.sr=%s, model.saliency.enabled=%s", cfg.train.schedule, spec.sr,
                    spec.saliency)
    saliency = dataclasses.replace(cfg.model.saliency, enabled=spec.saliency)
    model = dataclasses.replace(cfg.model, sr=spec.sr, saliency=saliency)
    return dataclasses.replace(cfg, model=model)


def scale_epochs(train: TrainConfig, epochs: int) -> TrainConfig:
    """Set ``epochs`` and rescale stage 1 and the LR drops proportionally (16/52 and 27/52 keep their ratio).

    This is what ``--epochs`` does; a dotted ``train.epochs=`` override changes the epoch count alone.
    """
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    ratio = epochs / train.epochs
    stage1 = min(epochs, round(train.stage1_epochs * ratio))
    drops = tuple(sorted({max(1, round(m * ratio)) for m in train.lr_drop_epochs}))
    return dataclasses.replace(train, epochs=epochs, stage1_epochs=stage1, lr_drop_epochs=drops)


def routing_stage(train: TrainConfig, epoch: int) -> int:
    """Stage of the 0-based ``epoch``: 1 while the SR decoder is held frozen (or absent), else 2."""
    spec = schedule_spec(train.schedule)
    if not spec.sr:
        return STAGE_DETECTION
    if spec.routing and epoch < train.stage1_epochs:
        return STAGE_DETECTION
    return STAGE_JOINT


class GradientRouter:
    """Applies a routing stage to a model (``sr_decoder`` child, may be None) and its optimizer.

    Stage 1 sets ``requires_grad=False`` on the SR parameters and their group's lr to 0 (belt and braces: a frozen
    parameter gets no gradient, so AdamW skips it entirely and it stays bit-identical). Stage 2 re-enables gradients
    and sets the group's lr to rho * eta times the MultiStepLR factor of the current epoch.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig):
        self.train = train
        self.optimizer = optimizer
        sr_decoder = getattr(model, "sr_decoder", None)
        self.sr_params = list(sr_decoder.parameters()) if sr_decoder is not None else []
        if self.sr_params:
            self._sr_group()  # fail early when the optimizer was not built with the named groups
        self.stage: int | None = None

    def _sr_group(self) -> dict:
        """The SR decoder's parameter group, looked up each time: ``optimizer.load_state_dict`` replaces the
        group dicts, so a stored reference would go stale after a resume."""
        groups = [g for g in self.optimizer.param_groups if g.get("name") == SR_GROUP]
        if len(groups) != 1:
            raise RuntimeError(f"the optimizer needs exactly one '{SR_GROUP}' parameter group holding the SR "
                               f"decoder (build it with sdconet.engine.optim.build_optimizer)")
        return groups[0]

    @property
    def has_sr(self) -> bool:
        return bool(self.sr_params)

    @property
    def run_sr(self) -> bool:
        """Whether the forward pass executes the SR decoder in the current stage."""
        return self.has_sr and self.stage == STAGE_JOINT

    def stage_for_epoch(self, epoch: int) -> int:
        return routing_stage(self.train, epoch) if self.has_sr else STAGE_DETECTION

    def apply(self, epoch: int) -> int:
        """Put model and optimizer in the stage of ``epoch`` (0-based); returns the stage."""
        stage = self.stage_for_epoch(epoch)
        if self.has_sr:
            trainable = stage == STAGE_JOINT
            for param in self.sr_params:
                param.requires_grad_(trainable)
            self._sr_group()["lr"] = (self.train.lr * self.train.sr_lr_ratio * lr_factor(self.train, epoch)
                                      if trainable else 0.0)
        if stage != self.stage:
            logger.info("gradient routing: epoch %d in stage %d (%s)", epoch + 1, stage, describe_stage(
                stage, self.has_sr))
        self.stage = stage
        return stage


def describe_stage(stage: int, has_sr: bool) -> str:
    if not has_sr:
        return "no SR decoder"
    return "SR decoder frozen, not executed" if stage == STAGE_DETECTION else "SR decoder trains at rho*eta"
