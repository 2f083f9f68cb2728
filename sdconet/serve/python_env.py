"""The Python environment Triton's python backend runs our models in (``EXECUTION_ENV_PATH``).

The python backend stub is a compiled program linked against ``libpython3.X``; with ``EXECUTION_ENV_PATH`` it activates
the given environment (a virtualenv or unpacked conda env with ``bin/activate``) before importing ``model.py``.
Verified with the ``tritonserver`` 2.51 bundled in ``nvidia-pytriton``: the environment's numpy must be < 2 (with
numpy 2 the stub returns empty outputs), and ``PYTHONPATH`` alone is not honoured. The builder checks the
environment when it writes a repository; the launcher reads the Python version and library directory from it to
pick the matching stub and ``LD_LIBRARY_PATH``.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# What the python models import: preprocess (numpy, Pillow), postprocess (numpy), detector_cpu (numpy, onnxruntime).
PREPROCESS_MODULES = ("numpy", "PIL")
DETECTOR_CPU_MODULES = ("numpy", "onnxruntime")

_PROBE = """
import importlib, json, sys, sysconfig
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as err:
        missing.append(f"{name} ({type(err).__name__}: {err})")
import numpy
version = f"{sys.version_info[0]}.{sys.version_info[1]}"
print(json.dumps({"version": version, "libdir": sysconfig.get_config_var("LIBDIR"), "numpy": numpy.__version__,
                  "missing": missing}))
"""


class PythonEnvError(RuntimeError):
    """The execution environment for the python backend is unusable; the message names the path and the fix."""


@dataclass(frozen=True)
class PythonEnvInfo:
    path: Path
    version: str  # "3.11": selects the python backend stub
    libdir: str  # directory holding libpython3.X.so (goes on LD_LIBRARY_PATH)
    numpy_version: str


def inspect_python_env(path: str | Path, modules: Sequence[str] = ()) -> PythonEnvInfo:
    """Run the environment's interpreter once; fail unless it has ``bin/activate``, numpy < 2 and ``modules``."""
    path = Path(path).absolute()
    python, activate = path / "bin" / "python", path / "bin" / "activate"
    if not activate.is_file() or not python.exists():
        raise PythonEnvError(f"{path} is not a Python environment usable as EXECUTION_ENV_PATH (needs bin/python and "
                             f"bin/activate, e.g. a virtualenv)")
    try:
        result = subprocess.run([str(python), "-c", _PROBE, *modules], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PythonEnvError(f"cannot run {python}: {err}") from err
    if result.returncode != 0:
        raise PythonEnvError(f"{python} failed to import numpy: {result.stderr.strip()[-500:]}")
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    if probe["missing"]:
        raise PythonEnvError(f"{path} lacks module(s) the python models import: {', '.join(probe['missing'])}")
    if int(probe["numpy"].split(".")[0]) >= 2:
        raise PythonEnvError(f"{path} has numpy {probe['numpy']}; the python backend stub returns empty outputs with "
                             f"numpy 2 — use an environment with numpy < 2")
    return PythonEnvInfo(path=path, version=probe["version"], libdir=probe["libdir"], numpy_version=probe["numpy"])
