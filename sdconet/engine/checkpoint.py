"""Checkpoint files: the one place that knows their layout.

A run directory ``runs/<run>/`` holds ``checkpoints/{last,best}.safetensors`` (model weights; the metadata carries the
full config as JSON, so a weights file alone rebuilds the model) and ``checkpoints/last.train.pt`` (optimizer,
scheduler, RNG, epoch, step, routing stage; tensors and plain containers only, loaded with ``weights_only=True``).
Nothing is ever unpickled from an arbitrary object.

Integrity: every weights file carries a SHA-256 of its tensors (``sdconet.tensor_sha256``) and one of its header, the
config and meta JSON (``sdconet.header_sha256``), both checked at load, so flipped bytes anywhere are a
:class:`CheckpointError` naming the file. Files written before the checksums load unchecked (the header checksum came
later: such files load with their config unverified, and a warning says how to add it).

Resume pairs: ``last.safetensors`` + ``last.train.pt`` belong together and share a ``pair_id``. A save writes the new
pair to staged files, then makes sure the newest complete pair present sits at the ``last.prev.*`` names (moving only
the members of that pair, deleting orphans at the ``last`` names that belong to no complete pair), and only then
renames the new files to the ``last`` names. Each step is an atomic rename followed by an fsync of the folder, so a
crash, a full disk or a power loss at any point leaves at least one complete pair, and :func:`find_resume_pair` picks
the newest complete one. Temporaries left by killed saves are removed by the next save.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from sdconet.config import Config, config_from_dict, config_to_dict
from sdconet.engine.distributed import unwrap_model
from sdconet.utils.io import fsync_directory, write_atomically
from sdconet.utils.logging import get_logger

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"
TRAIN_STATE_NAME = "last.train.pt"
PREVIOUS_LAST_NAME = "last.prev.safetensors"
PREVIOUS_TRAIN_STATE_NAME = "last.prev.train.pt"
CHECKSUM_KEY = "sdconet.tensor_sha256"
HEADER_CHECKSUM_KEY = "sdconet.header_sha256"
STAGED_SUFFIX = ".new"

_LOG = get_logger(__name__)


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


def header_checksum(config_json: str, meta_json: str) -> str:
    """SHA-256 over the config and meta JSON strings exactly as stored (each length-prefixed)."""
    digest = hashlib.sha256()
    for name, text in (("config", config_json), ("meta", meta_json)):
        data = text.encode()
        digest.update(f"{name}|{len(data)}|".encode())
        digest.update(data)
    return digest.hexdigest()


def save_model_weights(model: torch.nn.Module, cfg: Config, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict + config (+ JSON-serialisable ``meta``) atomically and durably to ``path``."""
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap_model(model).state_dict().items()}
    config_json, meta_json = json.dumps(config_to_dict(cfg)), json.dumps(meta or {})
    metadata = {"config": config_json, "meta": meta_json, CHECKSUM_KEY: tensor_checksum(state),
                HEADER_CHECKSUM_KEY: header_checksum(config_json, meta_json)}
    path = write_atomically(Path(path), lambda tmp: save_file(state, str(tmp), metadata=metadata))
    fsync_directory(path.parent)
    return path


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as err:  # safetensors raises several error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from err


def _check_header(path: Path, metadata: dict[str, str]) -> None:
    expected = metadata.get(HEADER_CHECKSUM_KEY)
    if expected is None:
        if CHECKSUM_KEY in metadata:  # written between the tensor and the header checksums
            _LOG.warning("%s: written before header checksums, its config and meta are not verified; re-save it to "
                         "add one (python -m sdconet.engine.checkpoint --resave %s)", path, path)
        return
    if header_checksum(metadata["config"], metadata.get("meta", "{}")) != expected:
        raise CheckpointError(f"{path}: its config/meta header does not match its checksum (the file is corrupt: "
                              f"flipped or edited bytes in the header); use another checkpoint (e.g. "
                              f"{PREVIOUS_LAST_NAME} or {BEST_NAME}) or retrain")


def read_checkpoint_metadata(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, meta) stored in a weights file, without loading tensors; the header checksum is verified."""
    path = Path(path)
    metadata = _read_metadata(path)
    if "config" not in metadata:
        raise CheckpointError(f"{path}: has no 'config' metadata (not written by sdconet)")
    _check_header(path, metadata)
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
def _weights_pair_key(path: Path) -> tuple[Any, Any] | None:
    """(epoch, pair_id) of a weights file from its header alone; None when missing or unreadable."""
    try:
        meta = json.loads(_read_metadata(path).get("meta", "{}"))
    except (CheckpointError, json.JSONDecodeError):
        return None
    return meta.get("epoch"), meta.get("pair_id")


def _state_pair_key(path: Path) -> tuple[tuple[Any, Any], tuple[int, int]] | None:
    """((epoch, pair_id), (epoch, global_step)) of a trainer state; None when missing or unreadable. Memory-mapped:
    the optimizer tensors are not read."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated or foreign file: not part of a pair
        return None
    return (state.get("epoch"), state.get("pair_id")), (state.get("epoch", -1), state.get("global_step", -1))


def _newest_complete_pair(folder: Path) -> tuple[Path, Path] | None:
    """(weights, state) paths of the newest pair whose ids match and whose weights pass their checksums."""
    weights = {folder / n: _weights_pair_key(folder / n) for n in (LAST_NAME, PREVIOUS_LAST_NAME)}
    states = {folder / n: _state_pair_key(folder / n) for n in (TRAIN_STATE_NAME, PREVIOUS_TRAIN_STATE_NAME)}
    candidates = sorted(((s_info[1], w, s) for w, w_key in weights.items() for s, s_info in states.items()
                         if w_key is not None and s_info is not None and w_key == s_info[0]),
                        key=lambda c: c[0], reverse=True)
    for _, w, s in candidates:
        try:
            load_model_weights(w)  # a pair with corrupt weights is no pair to keep
        except CheckpointError:
            continue
        return w, s
    return None


def _remove_stale_temporaries(folder: Path) -> None:
    """Staged files and write_atomically temporaries of earlier saves that were killed before they finished."""
    for name in (LAST_NAME, TRAIN_STATE_NAME):
        (folder / (name + STAGED_SUFFIX)).unlink(missing_ok=True)
    for path in folder.glob(".*.tmp*"):
        if not path.name.startswith((".last.", ".best.")):
            continue
        try:  # the writer's pid is in the name (.<stem>.<pid>-<hex>.tmp<suffix>): keep a live writer's file
            pid = int(path.name.rsplit(".tmp", 1)[0].rsplit(".", 1)[1].split("-")[0])
            if pid != os.getpid():
                os.kill(pid, 0)
                continue
        except ProcessLookupError:
            pass
        except (ValueError, IndexError, PermissionError):
            continue
        path.unlink(missing_ok=True)
        _LOG.info("removed %s, left by a checkpoint save that did not finish", path)


def save_resume_pair(model: torch.nn.Module, cfg: Config, state: dict[str, Any], folder: str | Path,
                     meta: dict[str, Any]) -> Path:
    """Write ``last.safetensors`` + ``last.train.pt`` so that a complete pair exists at every instant.

    Order: leftovers of killed saves removed; new weights and state to staged files (a failure here, e.g. ENOSPC,
    leaves the folder as it was and re-raises); the newest complete pair present moved (member by member) to
    ``last.prev.*`` and any orphan at the ``last`` names deleted; new files renamed to ``last.*``. Every rename is
    followed by an fsync of the folder. Returns the weights path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    pair_id = f"{state.get('epoch')}-{state.get('global_step')}-{uuid.uuid4().hex[:12]}"
    weights, train_state = folder / LAST_NAME, folder / TRAIN_STATE_NAME
    staged_weights = folder / (LAST_NAME + STAGED_SUFFIX)
    staged_state = folder / (TRAIN_STATE_NAME + STAGED_SUFFIX)
    try:
        save_model_weights(model, cfg, staged_weights, {**meta, "pair_id": pair_id})
        save_train_state({**state, "pair_id": pair_id}, staged_state)
    except BaseException:
        staged_weights.unlink(missing_ok=True)
        staged_state.unlink(missing_ok=True)
        raise
    keep = _newest_complete_pair(folder)
    rotations = ((weights, folder / PREVIOUS_LAST_NAME), (train_state, folder / PREVIOUS_TRAIN_STATE_NAME))
    for current, previous in rotations:
        # with no complete pair anywhere there is nothing to protect: the last files become the prev ones as before
        if current.exists() and (keep is None or current in keep):
            os.replace(current, previous)
            fsync_directory(folder)
    for current, _ in rotations:
        if current.exists():  # an orphan: half of a pair that never completed (its match is gone or corrupt)
            current.unlink()
            _LOG.warning("removed %s: it belongs to no complete checkpoint pair (a save was interrupted)", current)
    os.replace(staged_state, train_state)
    fsync_directory(folder)
    os.replace(staged_weights, weights)
    fsync_directory(folder)
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


def resave_weights(path: str | Path) -> Path:
    """Rewrite a weights file in the current layout (both checksums), e.g. one written before header checksums.
    Its tensors are verified first when it has a tensor checksum; the header is taken as it is."""
    path = Path(path)
    cfg, state, meta = load_model_weights(path)
    config_json, meta_json = json.dumps(config_to_dict(cfg)), json.dumps(meta)
    metadata = {"config": config_json, "meta": meta_json, CHECKSUM_KEY: tensor_checksum(state),
                HEADER_CHECKSUM_KEY: header_checksum(config_json, meta_json)}
    write_atomically(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    fsync_directory(path.parent)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sdconet.engine.checkpoint",
                                     description="Checkpoint maintenance: add the current checksums to old files.")
    parser.add_argument("--resave", type=Path, nargs="+", required=True, metavar="WEIGHTS",
                        help="weights files (.safetensors) to rewrite in the current layout")
    args = parser.parse_args(argv)
    for path in args.resave:
        try:
            print(resave_weights(path))
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
