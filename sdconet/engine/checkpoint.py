"""Checkpoint files: the one place that knows their layout.

A run directory ``runs/<run>/`` holds ``checkpoints/{last,best}.safetensors`` (model weights; the metadata carries the
full config as JSON, so a weights file alone rebuilds the model) and ``checkpoints/last.train.pt`` (optimizer,
scheduler, RNG, epoch, step, routing stage; tensors and plain containers only, loaded with ``weights_only=True``).
Nothing is ever unpickled from an arbitrary object.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from sdconet.config import Config, config_from_dict, config_to_dict
from sdconet.engine.distributed import unwrap_model

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"
TRAIN_STATE_NAME = "last.train.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the path."""


def save_model_weights(model: torch.nn.Module, cfg: Config, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict + config (+ JSON-serialisable ``meta``) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap_model(model).state_dict().items()}
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
    try:
        config, meta = json.loads(metadata["config"]), json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: unreadable 'config'/'meta' metadata ({err})") from err
    return config_from_dict(config, source=str(path)), meta


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


def save_train_state(state: dict[str, Any], path: str | Path) -> Path:
    """Write the trainer state (tensors, numbers, strings and containers only) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Read a trainer state with ``weights_only=True``: no arbitrary object is ever unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"trainer state not found: {path} (it is written next to {LAST_NAME} every epoch)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors, or an object outside the weights-only allow-list
        raise CheckpointError(f"{path}: not a readable trainer state ({err})") from err


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (CPU and CUDA) generator states in a weights-only-loadable form."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored only when CUDA is present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
