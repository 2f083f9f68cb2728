import pytest
import torch

from sdconet.config import load_config
from sdconet.engine.checkpoint import (CheckpointError, load_model_weights, resolve_checkpoint,
                                       save_model_weights)


def test_weights_roundtrip_carries_config(tmp_path):
    cfg = load_config("tiny", ["train.epochs=2"])
    model = torch.nn.Linear(3, 2)
    path = save_model_weights(model, cfg, tmp_path / "run" / "checkpoints" / "best.safetensors", {"AP": 0.5})
    loaded_cfg, state, meta = load_model_weights(path)
    assert loaded_cfg == cfg and meta == {"AP": 0.5}
    assert torch.equal(state["weight"], model.weight.detach())
    assert resolve_checkpoint(tmp_path / "run") == path
    assert resolve_checkpoint(None, runs_dir=tmp_path) == path


def test_missing_and_corrupt_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint given"):
        resolve_checkpoint(None, runs_dir=tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_model_weights(bad)
