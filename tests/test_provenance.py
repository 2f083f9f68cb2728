"""sdconet.utils.provenance: the object every results JSON carries."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest

from sdconet.utils import provenance as prov


def test_provenance_fields_are_real():
    record = prov.provenance(["python", "bench.py", "--x"], note="n")
    assert record["command"] == ["python", "bench.py", "--x"]
    assert record["note"] == "n"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=prov._REPO_ROOT).stdout.strip()
    assert record["commit"] == head and isinstance(record["dirty"], bool)
    created = dt.datetime.fromisoformat(record["created"])
    assert created.tzinfo is not None and abs((dt.datetime.now(dt.timezone.utc) - created).days) < 1
    assert record["versions"]["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]
    assert record["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(record["cpu"]["isa"]) <= set(prov.ISA_FLAGS)
    assert record["cpu"]["model"]


def test_kernel_path_is_the_one_loaded(monkeypatch):
    monkeypatch.setattr(prov, "_loaded_kernels", [])
    assert prov.provenance()["cpu"]["kernel_path"] is None
    prov.record_kernel("/tmp/libsdconet_msda.so")
    prov.record_kernel("/tmp/libsdconet_msda.so")
    assert prov._loaded_kernels == ["/tmp/libsdconet_msda.so"]
    assert prov.provenance()["cpu"]["kernel_path"] == "/tmp/libsdconet_msda.so"


def test_code_hash_follows_the_training_files_and_nothing_else(tmp_path):
    from sdconet.utils.provenance import TRAINING_CODE, code_hash
    assert "sdconet/models" in TRAINING_CODE and "sdconet/configs" in TRAINING_CODE
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code\n")
    (tmp_path / "other.py").write_text("y = 1\n")
    first = code_hash(["pkg"], root=tmp_path)
    (tmp_path / "other.py").write_text("y = 2\n")  # outside the listed paths
    (tmp_path / "pkg" / "notes.txt").write_text("edited\n")  # neither .py nor .yaml
    assert code_hash(["pkg"], root=tmp_path) == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert code_hash(["pkg"], root=tmp_path) != first
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "b.py")  # same content, another file: another hash
    assert code_hash(["pkg"], root=tmp_path) != first
    with pytest.raises(FileNotFoundError, match="missing"):
        code_hash(["missing"], root=tmp_path)


def test_config_hash_is_order_independent_and_value_sensitive():
    from sdconet.config import config_to_dict, load_config
    from sdconet.utils.provenance import config_hash
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    tiny = config_to_dict(load_config("tiny"))
    assert config_hash(tiny) == config_hash(config_to_dict(load_config("tiny")))
    assert config_hash(tiny) != config_hash(config_to_dict(load_config("tiny", ["train.lr=1e-3"])))
