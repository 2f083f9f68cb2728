"""sdconet.utils.provenance: the object every results JSON carries."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys

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
