"""Checkpoint files: the one place that knows their layout.

A run directory ``runs/<run>/`` holds ``checkpoints/{last,best}.safetensors`` (model weights; the metadata carries the
full config as JSON, so a weights file alone rebuilds the model) and ``checkpoints/last.train.pt`` (optimizer,
scheduler, RNG, epoch, step, routing stage; tensors and plain containers only, loaded with ``weights_only=True``).
Nothing is ever unpickled from an arbitrary object.

Integrity: every weights file carries a SHA-256 of its tensors (``sdconet.tensor_sha256`` metadata), checked at load,
so flipped bytes are a :class:`CheckpointError` naming the file (files written before the checksum load unchecked).

Resume pairs: ``last.safetensors`` + ``last.train.pt`` belong together and share a ``pair_id``. A new pair is written
to temporary files first, the previous pair is then moved to ``last.prev.*``, and only then do the new files take the
``last`` names (each step an atomic rename). A crash or a full disk at any point therefore leaves at least one complete
pair, and :func:`find_resume_pair` picks the newest complete one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from sdconet.config import Config, config_from_dict, config_to_dict
from sdconet.engine.distributed import unwrap_model
from sdconet.utils.io import write_atomically

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"
TRAIN_STATE_NAME = "last.train.pt"
PREVIOUS_LAST_NAME = "last.prev.safetensors"
PREVIOUS_TRAIN_STATE_NAME = "last.prev.train.pt"
CHECKSUM_KEY = "sdconet.tensor_sha256"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the path."""


def tensor_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``state``'s tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_model_weights(model: torch.nn.Module, cfg: Config, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict + config (+ JSON-serialisable ``meta``) atomically to ``path``."""
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap_model(model).state_dict().items()}
    metadata = {"config": json.dumps(config_to_dict(cfg)), "meta": json.dumps(meta or {}),
                CHECKSUM_KEY: tensor_checksum(state)}
    return write_atomically(Path(path), lambda tmp: save_file(state, str(tmp), metadata=metadata))


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as err:  # safetensors raises several error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from err


def read_checkpoint_metadata(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, meta) stored in a weights file, without loading tensors."""
    path = Path(path)
    metadata = _read_metadata(path)
    if "config" not in metadata:
        raise CheckpointError(f"{path}: has no 'config' metadata (not written by sdconet)")
    try:
        config, meta = json.loads(metadata["config"]), json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: unreadable 'config'/'meta' metadata ({err})") from err
    return config_from_dict(config, source=str(path)), meta


def load_model_weights(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state dict, meta) from a weights file; the tensors' checksum is verified when the file has one."""
    path = Path(path)
    cfg, meta = read_checkpoint_metadata(path)
    try:
        state = load_file(str(path))
    except Exception as err:  # truncated data, inconsistent offsets
        raise CheckpointError(f"{path}: tensor data unreadable ({err})") from err
    expected = _read_metadata(path).get(CHECKSUM_KEY)
    if expected is not None and tensor_checksum(state) != expected:
        raise CheckpointError(f"{path}: tensor data does not match its checksum (the file is corrupt: flipped or "
                              f"overwritten bytes); use another checkpoint (e.g. {PREVIOUS_LAST_NAME} or "
                              f"{BEST_NAME}) or retrain")
    return cfg, state, meta


def resolve_checkpoint(path: str | Path | None, runs_dir: str | Path = "runs", prefer: str = BEST_NAME) -> Path:
    """A weights file from a file path, a run directory, or (``None``) the latest run under ``runs_dir``.

    In a run directory ``prefer`` (best) is used when present, else ``last``, else ``last.prev`` (a run stopped while
    saving).
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
        for name in (prefer, LAST_NAME, PREVIOUS_LAST_NAME):
            if (folder / name).is_file():
                return folder / name
        raise CheckpointError(f"{path}: no {prefer} or {LAST_NAME} in {folder}")
    raise CheckpointError(f"checkpoint not found: {path}")


def save_train_state(state: dict[str, Any], path: str | Path) -> Path:
    """Write the trainer state (tensors, numbers, strings and containers only) atomically to ``path``."""
    return write_atomically(Path(path), lambda tmp: torch.save(state, tmp))


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


# ------------------------------------------------------------------------------------------------------------------
# resume pairs (weights + trainer state)
# ------------------------------------------------------------------------------------------------------------------
def save_resume_pair(model: torch.nn.Module, cfg: Config, state: dict[str, Any], folder: str | Path,
                     meta: dict[str, Any]) -> Path:
    """Write ``last.safetensors`` + ``last.train.pt`` so that a complete pair exists at every instant.

    Order: new weights and state to temporary files (a failure here, e.g. ENOSPC, leaves the previous pair untouched
    and re-raises); previous pair renamed to ``last.prev.*``; new files renamed to ``last.*``. Returns the weights path.
    """
    folder = Path(folder)
    pair_id = f"{state.get('epoch')}-{state.get('global_step')}-{uuid.uuid4().hex[:12]}"
    weights, train_state = folder / LAST_NAME, folder / TRAIN_STATE_NAME
    staged_weights = folder / (LAST_NAME + ".new")
    staged_state = folder / (TRAIN_STATE_NAME + ".new")
    try:
        save_model_weights(model, cfg, staged_weights, {**meta, "pair_id": pair_id})
        save_train_state({**state, "pair_id": pair_id}, staged_state)
    except BaseException:
        staged_weights.unlink(missing_ok=True)
        staged_state.unlink(missing_ok=True)
        raise
    for current, previous in ((weights, folder / PREVIOUS_LAST_NAME),
                              (train_state, folder / PREVIOUS_TRAIN_STATE_NAME)):
        if current.exists():
            os.replace(current, previous)
    os.replace(staged_state, train_state)
    os.replace(staged_weights, weights)
    return weights


def find_resume_pair(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The newest complete (weights, trainer state) pair under a run directory, checkpoint folder or weights file.

    Candidates are ``last.*`` and ``last.prev.*`` in any combination (a crash between renames splits a pair across
    the names); a pair is complete when both files load, the weights pass their checksum and both carry the same
    epoch and pair id. Returns ``(weights_path, state_dict, meta, train_state)``.
    """
    path = Path(path)
    if path.is_file():
        folder = path.parent
    elif (path / CHECKPOINT_DIR).is_dir():
        folder = path / CHECKPOINT_DIR
    elif path.is_dir():
        folder = path
    else:
        raise CheckpointError(f"checkpoint not found: {path}")
    problems: list[str] = []
    weights_found = []
    for name in (LAST_NAME, PREVIOUS_LAST_NAME):
        candidate = folder / name
        if not candidate.is_file():
            continue
        try:
            _, state_dict, meta = load_model_weights(candidate)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        weights_found.append((candidate, state_dict, meta))
    states_found = []
    for name in (TRAIN_STATE_NAME, PREVIOUS_TRAIN_STATE_NAME):
        candidate = folder / name
        if not candidate.is_file():
            continue
        try:
            states_found.append((candidate, load_train_state(candidate)))
        except CheckpointError as err:
            problems.append(str(err))
    # files written before pair ids existed have none on either side and match by epoch alone
    pairs = [(w, sd, meta, st) for w, sd, meta in weights_found for _, st in states_found
             if (meta.get("epoch"), meta.get("pair_id")) == (st.get("epoch"), st.get("pair_id"))]
    if not pairs:
        found = [p.name for p, *_ in weights_found] + [p.name for p, _ in states_found]
        detail = "; ".join(problems) if problems else f"files present: {found or 'none'}"
        raise CheckpointError(f"{folder}: no complete pair of {LAST_NAME} + {TRAIN_STATE_NAME} (or their "
                              f".prev copies) with matching epochs to resume from ({detail})")
    weights, state_dict, meta, state = max(pairs, key=lambda p: (p[3].get("epoch", -1), p[3].get("global_step", -1)))
    return weights, state_dict, meta, state
