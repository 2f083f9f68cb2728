"""Checkpoint writes under faults: a crash or a full disk at any point of a save leaves a complete resume pair, and
flipped bytes in a weights file (tensors or header) are a CheckpointError naming it (issue 16 item 5, issue 23
item 4)."""
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


def test_edited_header_is_a_checkpoint_error_and_tensor_only_checksums_still_load(tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = ckpt.save_model_weights(_model(0), CFG, tmp_path / "w.safetensors", {"epoch": 1})
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    # a one-character change that keeps the JSON valid and the tensors intact
    save_file(tensors, str(path), metadata={**metadata, "meta": json.dumps({"epoch": 7})})
    with pytest.raises(ckpt.CheckpointError, match=r"w\.safetensors: its config/meta header does not match"):
        ckpt.load_model_weights(path)
    # the layout of issue 16 (tensor checksum only) loads, with a warning that says how to add the header checksum
    legacy = tmp_path / "legacy.safetensors"
    save_file(tensors, str(legacy), metadata={k: v for k, v in metadata.items() if k != ckpt.HEADER_CHECKSUM_KEY})
    cfg, state, meta = ckpt.load_model_weights(legacy)
    assert cfg == CFG and meta == {"epoch": 1} and "--resave" in caplog.text
    assert ckpt.main(["--resave", str(legacy)]) == 0
    with safe_open(str(legacy), framework="pt") as handle:
        assert ckpt.HEADER_CHECKSUM_KEY in handle.metadata()
    assert ckpt.load_model_weights(legacy)[2] == {"epoch": 1}


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


@pytest.mark.parametrize("crash_at", [0, 1, 2, 3])
def test_every_step_of_the_save_after_a_crash_leaves_a_loadable_pair(tmp_path, monkeypatch, crash_at):
    """Issue 23: a save killed between its two final renames left last.train.pt (new) and no last.safetensors; the
    next save moved that orphan onto last.prev.train.pt, over the only complete pair. Now every rename and delete of
    the next save is checked: before and after each, some complete pair loads."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    real_replace, real_unlink, calls = os.replace, os.unlink, []

    def crashing_replace(src, dst):
        if not Path(src).name.startswith("."):
            if len(calls) == crash_at:
                raise KeyboardInterrupt("simulated kill")
            calls.append(src)
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    steps = []

    def check(what):
        weights, _, meta, state = ckpt.find_resume_pair(tmp_path)  # raises when no complete pair is left
        assert meta["epoch"] == state["epoch"] in (2, 4), what
        steps.append((what, state["epoch"]))

    def checked_replace(src, dst):
        check(f"before replace {Path(src).name} -> {Path(dst).name}")
        real_replace(src, dst)
        check(f"after replace {Path(src).name} -> {Path(dst).name}")

    def checked_unlink(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            check(f"before unlink {Path(path).name}")
        real_unlink(path, *args, **kwargs)
        if Path(path).parent == tmp_path:
            check(f"after unlink {Path(path).name}")

    monkeypatch.setattr(ckpt.os, "replace", checked_replace)
    monkeypatch.setattr(ckpt.os, "unlink", checked_unlink)
    _save(tmp_path, 4)
    monkeypatch.undo()
    assert len(steps) >= 8 and steps[-1][1] == 4, steps  # the final renames really were checked
    _assert_pair(tmp_path, 4)
    # the pair kept at last.prev.* is the newest complete one before this save: epoch 2
    assert torch.equal(ckpt.load_model_weights(tmp_path / ckpt.PREVIOUS_LAST_NAME)[1]["weight"],
                       _model(2).weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ckpt.LAST_NAME, ckpt.TRAIN_STATE_NAME, ckpt.PREVIOUS_LAST_NAME, ckpt.PREVIOUS_TRAIN_STATE_NAME])


def test_leftovers_of_killed_saves_are_removed_and_renames_are_synced(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    dead_pid = 4_194_305  # above Linux's largest pid_max: no such process
    stale = [tmp_path / f".last.safetensors.{dead_pid}-0123abcd.tmp.new", tmp_path / (ckpt.LAST_NAME + ".new"),
             tmp_path / f".best.{dead_pid}-0123abcd.tmp.safetensors"]
    live = tmp_path / f".last.train.pt.{os.getppid()}-0123abcd.tmp.new"  # a writer that is still running
    for path in stale + [live]:
        path.write_bytes(b"partial")
    synced_dirs = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            synced_dirs.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", recording_fsync)
    _save(tmp_path, 2)
    monkeypatch.undo()
    assert not any(p.exists() for p in stale) and live.exists()
    # four renames (two rotations, two final) each followed by a sync of the folder, plus those of the staged files
    assert synced_dirs.count(str(tmp_path)) >= 4, synced_dirs
    _assert_pair(tmp_path, 2)


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
