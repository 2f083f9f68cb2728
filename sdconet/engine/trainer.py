"""The training loop: one run = model + AdamW groups + gradient routing + checkpoints + logs (DESIGN §3).

A run directory holds ``config.yaml``, ``metrics.json`` (one entry per evaluated epoch), ``checkpoints/``
(``last``/``best`` weights + ``last.train.pt``), ``tensorboard/``, ``pictures/`` and ``train.log`` (``train/run.py``
points the log there; the trainer itself only logs). Only rank 0 writes there. Epochs are 0-based in code and 1-based in logs, file names and ``metrics.json``.

Safety: a non-finite loss or gradient norm skips the step on every rank (counted and reported); ``max_bad_steps``
consecutive ones stop the run with :class:`TrainingDiverged` after writing a checkpoint of the (still finite)
weights. Randomness used by evaluation and pictures is forked off, so evaluating or not never changes the training
trajectory, and resuming from ``last`` reproduces an uninterrupted run exactly (single process, CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from sdconet.config import Config, ConfigError, save_config
from sdconet.engine import checkpoint as ckpt
from sdconet.engine.distributed import (DistributedInfo, ShardSampler, all_ranks_true, average_over_ranks, barrier,
                                        needs_unused_parameter_search, resolve_amp)
from sdconet.engine.evaluate import autocast_context, evaluate, move_batch, render_grid
from sdconet.engine.optim import build_lr_scheduler, build_optimizer, group_lrs
from sdconet.engine.routing import GradientRouter, apply_schedule, describe_stage
from sdconet.data.image_io import save_image
from sdconet.utils.io import write_text_atomically
from sdconet.utils.logging import get_logger

logger = get_logger(__name__)

METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"
PICTURES_DIR = "pictures"
TENSORBOARD_DIR = "tensorboard"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the message names the step and the checkpoint left behind."""


@dataclass
class RunPaths:
    """Where a run's outputs live."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / ckpt.CHECKPOINT_DIR

    @property
    def last(self) -> Path:
        return self.checkpoints / ckpt.LAST_NAME

    @property
    def best(self) -> Path:
        return self.checkpoints / ckpt.BEST_NAME

    @property
    def train_state(self) -> Path:
        return self.checkpoints / ckpt.TRAIN_STATE_NAME

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def pictures(self) -> Path:
        return self.root / PICTURES_DIR


@dataclass
class StepCounters:
    """Optimisation bookkeeping that travels with the checkpoint."""

    global_step: int = 0  # optimisation windows processed (skipped ones included)
    skipped_steps: int = 0  # windows skipped for a non-finite loss or gradient norm
    consecutive_bad: int = 0
    best_ap: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.json entries


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _non_finite_terms(losses: dict[str, torch.Tensor]) -> str:
    """``name=value`` of the loss terms that are NaN or infinite (empty when the total alone is)."""
    values = {k: float(v.detach()) for k, v in losses.items()}
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items() if not math.isfinite(v))


class Trainer:
    """One training run.

    Args:
        cfg: the full config; ``train.schedule`` is applied to the model flags (see :mod:`sdconet.engine.routing`).
        out_dir: the run directory (created by rank 0).
        model, criterion, train_set, val_set: built from ``cfg`` when omitted (tests inject small ones). A model
            needs children ``encoder`` / ``sr_decoder`` (may be None) and ``forward(images_lr, masks_lr, targets,
            run_sr)``; datasets follow docs/architecture.md ("Data -> trainer") and expose ``num_classes``,
            ``category_names``, ``label_to_category_id`` and ``ann_file``.
        collate_fn: batch collation (default ``sdconet.data.collate_fn``).
        checkpoint_meta: extra metadata written into every checkpoint (a QAT run's ``qat`` entry).
        distiller: a teacher for the training steps (a QAT run's :class:`sdconet.deploy.qat.FP32Distiller`):
            ``prepare(batch) -> batch`` runs before each forward (it may replace the targets) and ``losses() ->
            {name: weighted scalar}`` after the criterion; its terms are added to the step's loss and logged with it.
        dist_info, device: from :func:`sdconet.engine.distributed.init_distributed` (single CPU process default).
    """

    def __init__(self, cfg: Config, out_dir: str | Path, *, model: Optional[nn.Module] = None,
                 criterion: Optional[nn.Module] = None, train_set: Optional[Dataset] = None,
                 val_set: Optional[Dataset] = None, collate_fn=None, dist_info: Optional[DistributedInfo] = None,
                 device: Optional[torch.device] = None, checkpoint_meta: Optional[dict[str, Any]] = None,
                 distiller: Any = None):
        self.dist = dist_info or DistributedInfo()
        self.distiller = distiller
        self.device = device or torch.device("cpu")
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.paths = RunPaths(Path(out_dir))
        cfg = apply_schedule(cfg)
        if cfg.train.amp is not None and cfg.train.amp not in (*AMP_DTYPES, "auto"):
            raise ConfigError(f"train.amp must be null, 'bf16', 'fp16' or 'auto', got {cfg.train.amp!r}")
        # "auto" stays in the saved config (a resumed run re-resolves it on its machine); self.amp is what runs
        self.amp = resolve_amp(cfg.train.amp, self.device)
        if self.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp='fp16' needs a CUDA device; use train.amp=bf16 on CPU")
        if cfg.train.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps must be >= 1, got {cfg.train.grad_accum_steps}")
        seed_everything(cfg.train.seed + self.dist.rank, cfg.train.deterministic)

        if self.dist.is_main:
            self.paths.root.mkdir(parents=True, exist_ok=True)

        self.train_set, self.val_set = self._datasets(cfg, train_set, val_set)
        num_classes = getattr(self.train_set, "num_classes", cfg.model.detector.num_classes)
        if num_classes != cfg.model.detector.num_classes:
            logger.info("model.detector.num_classes: %d -> %d (from the dataset's categories)",
                        cfg.model.detector.num_classes, num_classes)
            detector = dataclasses.replace(cfg.model.detector, num_classes=num_classes)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, detector=detector))
        self.cfg = cfg
        if collate_fn is None:
            from sdconet.data import collate_fn
        self.collate_fn = collate_fn

        if model is None:
            from sdconet.models import build_model
            model = build_model(cfg.model)
        self.model = model.to(self.device)
        if criterion is None:
            from sdconet.losses import SetCriterion
            criterion = SetCriterion.from_config(cfg)
        self.criterion = criterion.to(self.device)

        train = cfg.train
        self.optimizer = build_optimizer(self.model, train)
        self.scheduler = build_lr_scheduler(self.optimizer, train)
        self.router = GradientRouter(self.model, self.optimizer, train)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.amp_dtype = AMP_DTYPES.get(self.amp) if self.amp else None
        self.train_model: nn.Module = self.model  # the DDP wrapper when distributed (rebuilt at a stage switch)
        self.start_epoch = 0
        self.counters = StepCounters()

        self.sampler = DistributedSampler(self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                          shuffle=True, seed=train.seed)
        self.train_loader = DataLoader(self.train_set, batch_size=train.batch_size, sampler=self.sampler,
                                       collate_fn=self.collate_fn, num_workers=cfg.data.num_workers,
                                       pin_memory=self.device.type == "cuda")
        # each rank evaluates its own shard (sdconet.engine.evaluate gathers the detections)
        val_sampler = (ShardSampler(len(self.val_set), self.dist.rank, self.dist.world_size)
                       if self.dist.enabled else None)
        self.val_loader = DataLoader(self.val_set, batch_size=train.batch_size, shuffle=False, sampler=val_sampler,
                                     collate_fn=self.collate_fn, num_workers=cfg.data.num_workers)
        self.writer = None  # TensorBoard, open only during fit() (rank 0), so a failed resume leaks nothing
        if self.dist.is_main:
            save_config(cfg, self.paths.config)

    # ----------------------------------------------------------------------------------------------------------------
    # setup
    # ----------------------------------------------------------------------------------------------------------------
    def _datasets(self, cfg: Config, train_set: Optional[Dataset], val_set: Optional[Dataset]):
        if train_set is not None and val_set is not None:
            return train_set, val_set
        from sdconet.data import build_dataset

        # rank 0 first: it may generate the synthetic dataset; the others then read it
        if not self.dist.is_main:
            barrier()
        train_set = train_set or build_dataset(cfg.data, "train", cfg.model.upscale, train=True)
        val_set = val_set or build_dataset(cfg.data, "val", cfg.model.upscale, train=False)
        if self.dist.is_main:
            barrier()
        return train_set, val_set

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # tensorboard is a declared dependency, but a broken install should not stop a run
            logger.warning("TensorBoard disabled (%s)", err)
            return None
        return SummaryWriter(log_dir=str(self.paths.tensorboard))

    def _apply_stage(self, epoch: int) -> int:
        """Routing stage for ``epoch``; under DDP the wrapper is rebuilt when the trainable set changes."""
        previous = self.router.stage
        stage = self.router.apply(epoch)
        if self.dist.enabled and (stage != previous or self.train_model is self.model):
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP registers only the parameters that require grad when it is built, hence the rebuild; the
            # unused-parameter search (an extra graph traversal per step) only where a parameter may go unused
            self.train_model = DistributedDataParallel(
                self.model, device_ids=device_ids,
                find_unused_parameters=needs_unused_parameter_search(self.model, self.router.run_sr))
        return stage

    # ----------------------------------------------------------------------------------------------------------------
    # checkpoint / resume
    # ----------------------------------------------------------------------------------------------------------------
    def save_checkpoint(self, epochs_done: int, stage: int, metrics: Optional[dict] = None,
                        note: Optional[str] = None) -> Path:
        """Write ``last`` weights + trainer state (and ``best`` when ``metrics`` has a new best AP). Rank 0 only."""
        meta = {"epoch": epochs_done, "step": self.counters.global_step, "stage": stage,
                "schedule": self.cfg.train.schedule, "metrics": metrics or {},
                "category_names": list(getattr(self.train_set, "category_names", [])),
                "label_to_category_id": [int(c) for c in getattr(self.train_set, "label_to_category_id", [])]}
        if note:
            meta["note"] = note
        meta |= self.checkpoint_meta
        if metrics is not None and metrics.get("AP", -math.inf) > self.counters.best_ap:
            self.counters.best_ap = metrics["AP"]
            ckpt.save_model_weights(self.model, self.cfg, self.paths.best, meta)
        state = {
            "epoch": epochs_done,
            "stage": stage,
            "global_step": self.counters.global_step,
            "skipped_steps": self.counters.skipped_steps,
            "best_ap": self.counters.best_ap,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng_state(),
        }
        # a complete (weights, state) pair exists at every instant, even if this write is killed or the disk fills
        return ckpt.save_resume_pair(self.model, self.cfg, state, self.paths.checkpoints, meta)

    def resume(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, scaler, RNG, counters and the routing stage from ``path``.

        ``path`` is a run directory or a ``last.safetensors`` file with ``last.train.pt`` beside it; the newest complete
        pair there (``last.*`` or ``last.prev.*``) is used.
        """
        weights, state_dict, meta, state = ckpt.find_resume_pair(path)
        try:
            self.model.load_state_dict(state_dict)
        except RuntimeError as err:
            raise ckpt.CheckpointError(f"{weights}: weights do not fit the configured model ({err})") from err
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
        if self.dist.rank > 0:  # only rank 0's generators are stored; keep the ranks' streams distinct
            torch.manual_seed(self.cfg.train.seed + self.dist.rank + 1000 * state["epoch"])
        self.start_epoch = state["epoch"]
        self.counters.global_step = state["global_step"]
        self.counters.skipped_steps = state["skipped_steps"]
        self.counters.best_ap = state["best_ap"]
        if self.paths.metrics.is_file():
            history = json.loads(self.paths.metrics.read_text())
            self.counters.history = [e for e in history if e["epoch"] <= self.start_epoch]
        # the stage is derived from the epoch; the stored one tells whether the schedule changed in between
        stored_stage = state["stage"]
        derived = self.router.stage_for_epoch(max(self.start_epoch - 1, 0))
        if stored_stage != derived:
            logger.warning("checkpoint was saved in routing stage %d but the current schedule puts epoch %d in stage "
                           "%d (schedule/stage1_epochs changed?)", stored_stage, self.start_epoch, derived)
        self.router.apply(self.start_epoch)
        logger.info("resumed from %s: %d epoch(s) done, step %d, next epoch in stage %d", weights, self.start_epoch,
                    self.counters.global_step, self.router.stage)

    # ----------------------------------------------------------------------------------------------------------------
    # training
    # ----------------------------------------------------------------------------------------------------------------
    def _optimizer_step(self) -> Optional[float]:
        """Clip and step; returns the gradient norm, or None when it was non-finite and the step was skipped."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.cfg.train.clip_max_norm if self.cfg.train.clip_max_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            return None
        self.scaler.step(self.optimizer)  # with fp16 the scaler itself skips overflowing steps
        self.scaler.update()
        return grad_norm

    def _record_bad_step(self, epoch: int, reason: str) -> None:
        self.counters.skipped_steps += 1
        self.counters.consecutive_bad += 1
        logger.warning("epoch %d step %d: %s; step skipped (%d in a row, %d in total)", epoch + 1,
                       self.counters.global_step, reason, self.counters.consecutive_bad, self.counters.skipped_steps)
        if self.counters.consecutive_bad >= self.cfg.train.max_bad_steps:
            message = (f"stopping: {self.counters.consecutive_bad} consecutive non-finite steps "
                       f"(train.max_bad_steps={self.cfg.train.max_bad_steps}) at epoch {epoch + 1}, step "
                       f"{self.counters.global_step}; last: {reason}. Lower train.lr, check the data, or keep "
                       f"train.clip_max_norm > 0.")
            if self.dist.is_main:
                path = self.save_checkpoint(epoch, self.router.stage, note=f"stopped mid-epoch {epoch + 1}: {reason}")
                message += (f" The weights are still finite (bad steps were skipped): {path} holds them; "
                            f"--resume restarts epoch {epoch + 1} from there.")
            raise TrainingDiverged(message)

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns the epoch's mean loss terms (averaged over ranks)."""
        self.train_model.train()
        self.criterion.train()
        self.sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        accum = self.cfg.train.grad_accum_steps
        sums: dict[str, float] = {}
        count = 0
        window_ok, window_reason = True, ""
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs} s{self.router.stage}",
                   disable=not self.dist.is_main, dynamic_ncols=True, leave=False)
        for index, batch in enumerate(bar):
            batch = move_batch(batch, self.device)
            if self.distiller is not None:
                batch = self.distiller.prepare(batch)
            boundary = (index + 1) % accum == 0 or index + 1 == len(self.train_loader)
            sync = (self.train_model.no_sync() if self.dist.enabled and not boundary
                    else contextlib.nullcontext())
            with sync:
                with autocast_context(self.device, self.amp_dtype):
                    outputs = self.train_model(batch["images_lr"], batch["masks_lr"], batch["targets"],
                                               run_sr=self.router.run_sr)
                # matching and losses in float32 (the matcher hands cost matrices to scipy)
                losses = self.criterion(_to_float32(outputs), batch["targets"], batch["images_hr"], batch["masks_hr"])
                if self.distiller is not None and (extra := self.distiller.losses()):
                    losses = dict(losses, **extra, loss=losses["loss"] + sum(extra.values()))
                loss = losses["loss"]
                finite = all_ranks_true(bool(torch.isfinite(loss.detach())), self.device)
                if finite:
                    self.scaler.scale(loss / accum).backward()
                else:
                    window_ok = False
                    window_reason = f"non-finite loss ({_non_finite_terms(losses) or 'on another rank'})"
            if finite:
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                count += 1
            if not boundary:
                continue
            grad_norm = self._optimizer_step() if window_ok else None
            if grad_norm is None and window_ok:
                window_reason = "non-finite gradient norm"
            self.optimizer.zero_grad(set_to_none=True)
            self.counters.global_step += 1
            if grad_norm is None:
                self._record_bad_step(epoch, window_reason)
            else:
                self.counters.consecutive_bad = 0
            window_ok, window_reason = True, ""
            if finite:
                bar.set_postfix(_postfix(losses), refresh=False)
            if self.writer is not None and self.counters.global_step % self.cfg.train.log_interval == 0 and finite:
                self._log_scalars("train", _headline(losses), self.counters.global_step)
                self._log_scalars("lr", group_lrs(self.optimizer), self.counters.global_step)
                if grad_norm is not None:
                    self.writer.add_scalar("train/grad_norm", grad_norm, self.counters.global_step)
        bar.close()
        return average_over_ranks({k: v / max(count, 1) for k, v in sums.items()})

    def _log_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", float(value), step)

    # ----------------------------------------------------------------------------------------------------------------
    # the run
    # ----------------------------------------------------------------------------------------------------------------
    def _forked_rng(self):
        """Generators restored on exit, so evaluation and pictures never shift the training trajectory."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def evaluate(self) -> dict[str, float]:
        """COCO metrics (+ PSNR/SSIM when the SR branch runs) on the validation set; under DDP every rank must call
        it (each evaluates its shard; all return the same metrics)."""
        with self._forked_rng():
            return evaluate(self.model, self.val_loader, self.val_set, self.device, run_sr=self.router.run_sr,
                            amp_dtype=self.amp_dtype, sharded=self.dist.enabled)

    def save_pictures(self, epoch: int, num_images: int = 2) -> Path:
        """The epoch's picture grid (``pictures/epoch_NNN.png``, also sent to TensorBoard), rank 0."""
        with self._forked_rng():
            grid = render_grid(self.model, self.val_set, self.collate_fn, self.device, run_sr=self.router.run_sr,
                               num_images=num_images)
        path = save_image(grid, self.paths.pictures / f"epoch_{epoch + 1:03d}.png")
        if self.writer is not None:
            self.writer.add_image("val/grid", grid, epoch + 1, dataformats="HWC")
        return path

    def _write_metrics(self) -> None:
        write_text_atomically(self.paths.metrics, json.dumps(self.counters.history, indent=2))

    def _finish_epoch(self, epoch: int, stage: int, losses: dict[str, float], train_time: float,
                      metrics: Optional[dict[str, float]]) -> None:
        """Rank 0's end of an epoch: checkpoint, picture, metrics.json entry, TensorBoard, one log line."""
        self.save_checkpoint(epoch + 1, stage, metrics)
        self.save_pictures(epoch)
        if metrics is not None:
            self.counters.history.append({
                "epoch": epoch + 1, "step": self.counters.global_step, "stage": stage, **metrics,
                "train_loss": losses.get("loss", math.nan), "skipped_steps": self.counters.skipped_steps,
                "train_time_s": round(train_time, 2)})
            self._write_metrics()
            self._log_scalars("val", metrics, epoch + 1)
        self._log_scalars("epoch", _headline(losses), epoch + 1)
        logger.info("epoch %d/%d (stage %d, %s): loss %.4f, %.0fs%s%s", epoch + 1, self.cfg.train.epochs, stage,
                    describe_stage(stage, self.router.has_sr), losses.get("loss", math.nan), train_time,
                    "".join(f", {k} {v:.4f}" for k, v in (metrics or {}).items()),
                    f", {self.counters.skipped_steps} skipped step(s)" if self.counters.skipped_steps else "")

    def fit(self) -> dict[str, Any]:
        """Train from ``start_epoch`` to ``train.epochs``; returns a summary (paths, last metrics, counters)."""
        train = self.cfg.train
        logger.info("training %s for %d epoch(s) (schedule %s, stage 1 = first %d) on %s, world size %d; "
                    "%d train / %d val images; output %s", self.cfg.name, train.epochs, train.schedule,
                    train.stage1_epochs, self.device, self.dist.world_size, len(self.train_set), len(self.val_set),
                    self.paths.root)
        last_metrics: dict[str, float] = {}
        if self.start_epoch >= train.epochs:
            logger.warning("nothing to train: %d of %d epoch(s) already done (pass --epochs to extend the run)",
                           self.start_epoch, train.epochs)
        if self.dist.is_main:
            self.writer = self._tensorboard()
        try:
            for epoch in range(self.start_epoch, train.epochs):
                stage = self._apply_stage(epoch)
                started = time.perf_counter()
                losses = self.train_one_epoch(epoch)
                self.scheduler.step()
                train_time = time.perf_counter() - started
                evaluate_now = (epoch + 1) % train.eval_interval == 0 or epoch + 1 == train.epochs
                metrics = self.evaluate() if evaluate_now else None  # every rank: sharded under DDP
                if self.dist.is_main:
                    last_metrics = metrics or last_metrics
                    self._finish_epoch(epoch, stage, losses, train_time, metrics)
                barrier()
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        return {
            "out_dir": self.paths.root, "last": self.paths.last, "best": self.paths.best,
            "metrics_file": self.paths.metrics, "pictures": self.paths.pictures,
            "tensorboard": self.paths.tensorboard, "log": self.paths.log, "metrics": last_metrics,
            "skipped_steps": self.counters.skipped_steps, "epochs": train.epochs,
        }


def _to_float32(tree: Any) -> Any:
    """Floating tensors of a (nested) model output in float32; everything else as is."""
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: _to_float32(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_float32(v) for v in tree)
    return tree


def _headline(losses: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """The total and the final-layer terms (aux/enc/dn terms stay out of the headline logs)."""
    return {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in losses.items()
            if k == "loss" or not any(tag in k for tag in ("_aux", "_enc", "_dn"))}


def _postfix(losses: dict[str, torch.Tensor]) -> dict[str, str]:
    short = {"loss": "loss", "loss_class": "cls", "loss_l1": "l1", "loss_giou": "giou", "loss_saliency": "sal",
             "loss_sr": "sr"}
    return {short[k]: f"{float(v.detach()):.3f}" for k, v in losses.items() if k in short}
