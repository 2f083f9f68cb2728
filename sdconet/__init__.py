"""SDCoNet Edge: saliency-driven multi-task SR + small-object detection, and its edge deployment pipeline."""
from __future__ import annotations

from sdconet.utils import moved as _moved

__version__ = "0.1.0"
_moved.install()  # old import paths of modules moved between layers (sdconet.utils.moved.MOVED_MODULES)
__all__ = ["Config", "load_config", "__version__"]


def __getattr__(name: str):
    # lazy: importing a leaf module (e.g. sdconet.ops.msda on a bare GPU machine, benchmarks/gpu_check.py) must not
    # pull in the config system and its PyYAML dependency
    if name in ("Config", "load_config"):
        from sdconet import config

        return getattr(config, name)
    raise AttributeError(f"module 'sdconet' has no attribute {name!r}")
