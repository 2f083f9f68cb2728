"""Checkpoint files: the one place that knows their layout.

A run directory ``runs/<run>/`` holds ``checkpoints/{last,best}.safetensors`` (model weights; the metadata carries the
full config as JSON, so a weights file alone rebuilds the model) and ``checkpoints/last.train.pt`` (optimizer,
scheduler, RNG, epoch, step, routing stage; tensors and plain containers only, loaded with ``weights_only=True``).
Nothing is ever unpickled from an arbitrary object.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from sdconet.config import Config, config_from_dict, config_to_dict

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the path."""


def save_model_weights(model: torch.nn.Module, cfg: Config, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict + config (+ JSON-serialisable ``meta``) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    metadata = {"config": json.dumps(config_to_dict(cfg)), "meta": json.dumps(meta or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def read_checkpoint_metadata(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, meta) stored in a weights file, without loading tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises several error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    if "config" not in metadata:
        raise CheckpointError(f"{path}: has no 'config' metadata (not written by sdconet)")
    cfg = config_from_dict(json.loads(metadata["config"]), source=str(path))
    return cfg, json.loads(metadata.get("meta", "{}"))


def load_model_weights(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state dict, meta) from a weights file."""
    cfg, meta = read_checkpoint_metadata(path)
    return cfg, load_file(str(path)), meta


def resolve_checkpoint(path: str | Path | None, runs_dir: str | Path = "runs", prefer: str = BEST_NAME) -> Path:
    """A weights file from a file path, a run directory, or (``None``) the latest run under ``runs_dir``.

    In a run directory ``prefer`` (best) is used when present, else ``last``.
    """
    if path is None:
        runs = sorted((p for p in Path(runs_dir).glob(f"*/{CHECKPOINT_DIR}") if p.is_dir()),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            raise CheckpointError(f"no checkpoint given and no run with a '{CHECKPOINT_DIR}/' folder under "
                                  f"'{runs_dir}/'; train one with `python train/run.py` or pass --checkpoint")
        path = runs[-1].parent
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        for name in (prefer, LAST_NAME):
            if (folder / name).is_file():
                return folder / name
        raise CheckpointError(f"{path}: no {prefer} or {LAST_NAME} in {folder}")
    raise CheckpointError(f"checkpoint not found: {path}")
