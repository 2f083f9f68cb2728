"""Checkpoint writes under faults: a crash or a full disk at any point of a save leaves a complete resume pair, and
flipped bytes in a weights file are a CheckpointError naming it (issue 16, item 5)."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdconet.config import config_to_dict, load_config
from sdconet.engine import checkpoint as ckpt

CFG = load_config("tiny")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 32)


def _save(folder: Path, epoch: int) -> torch.nn.Module:
    model = _model(epoch)
    state = {"epoch": epoch, "global_step": 10 * epoch, "note": torch.tensor([epoch])}
    ckpt.save_resume_pair(model, CFG, state, folder, {"epoch": epoch})
    return model


def _assert_pair(folder: Path, epoch: int) -> None:
    weights, state_dict, meta, state = ckpt.find_resume_pair(folder)
    assert meta["epoch"] == state["epoch"] == epoch
    assert torch.equal(state_dict["weight"], _model(epoch).weight.detach())
    assert weights.parent == folder


def test_flipped_tensor_bytes_are_a_checkpoint_error(tmp_path):
    path = ckpt.save_model_weights(_model(0), CFG, tmp_path / "w.safetensors")
    ckpt.load_model_weights(path)  # intact: loads
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data (the header comes first)
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"w\.safetensors.*checksum"):
        ckpt.load_model_weights(path)


def test_checkpoint_without_checksum_still_loads(tmp_path):
    # the layout written before checksums existed: config + meta only
    path = tmp_path / "old.safetensors"
    save_file({"weight": torch.ones(2, 2)}, str(path),
              metadata={"config": json.dumps(config_to_dict(CFG)), "meta": json.dumps({"epoch": 3})})
    cfg, state, meta = ckpt.load_model_weights(path)
    assert cfg == CFG and meta == {"epoch": 3} and torch.equal(state["weight"], torch.ones(2, 2))


def test_old_pair_without_pair_id_resumes(tmp_path):
    ckpt.save_model_weights(_model(2), CFG, tmp_path / ckpt.LAST_NAME, {"epoch": 2})
    ckpt.save_train_state({"epoch": 2, "global_step": 20}, tmp_path / ckpt.TRAIN_STATE_NAME)
    _assert_pair(tmp_path, 2)


@pytest.mark.parametrize("crash_at", [0, 1, 2, 3])
def test_crash_between_renames_leaves_a_complete_pair(tmp_path, monkeypatch, crash_at):
    _save(tmp_path, 1)
    _save(tmp_path, 2)  # now last = epoch 2, prev = epoch 1
    real_replace, calls = os.replace, []

    def crashing_replace(src, dst):
        # the staged files are written with their own atomic renames (hidden temporary names); count only the pair's
        if Path(src).name.startswith("."):
            return real_replace(src, dst)
        if len(calls) == crash_at:
            raise KeyboardInterrupt("simulated kill")
        calls.append((src, dst))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    # the new pair is complete only after its last rename, which never happened: epoch 2 is the newest complete pair
    _assert_pair(tmp_path, 2)
    assert ckpt.resolve_checkpoint(tmp_path, prefer=ckpt.LAST_NAME).name in (ckpt.LAST_NAME, ckpt.PREVIOUS_LAST_NAME)
    _save(tmp_path, 4)  # the next save recovers from the leftovers
    _assert_pair(tmp_path, 4)


@pytest.mark.parametrize("failing", ["weights", "state"])
def test_full_disk_keeps_the_previous_pair(tmp_path, monkeypatch, failing):
    _save(tmp_path, 1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = "save_file" if failing == "weights" else "save_train_state"
    if failing == "weights":
        monkeypatch.setattr(ckpt, "save_file", no_space)
    else:
        monkeypatch.setattr(ckpt.torch, "save", no_space)
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    _assert_pair(tmp_path, 1)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".new")]
    assert leftovers == [], f"{target} failure left {leftovers}"


def test_sigkill_during_saves_leaves_a_complete_pair(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from sdconet.config import load_config
        from sdconet.engine import checkpoint as ckpt
        cfg = load_config("tiny")
        for epoch in range(1, 100000):
            torch.manual_seed(epoch)
            model = torch.nn.Linear(1024, 1024)  # 4 MB: each save takes a while
            ckpt.save_resume_pair(model, cfg, {{"epoch": epoch, "global_step": epoch}}, {str(tmp_path)!r},
                                  {{"epoch": epoch}})
            print(epoch, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a few complete saves, then kill in the middle of later ones
        line = proc.stdout.readline()
        if line and int(line) >= 3:
            break
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    weights, state_dict, meta, state = ckpt.find_resume_pair(tmp_path)
    torch.manual_seed(state["epoch"])
    assert meta["epoch"] == state["epoch"] >= 3
    assert torch.equal(state_dict["weight"], torch.nn.Linear(1024, 1024).weight.detach())
