import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Triton kernels run on CPU only under the interpreter, and the flag is read when `triton` is first imported: set it
# for the whole session, before any test module (or library) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# one served model and one real Triton server for the whole run, shared by the serving test modules
from serving_fixtures import cpu_repo, detector_onnx, server  # noqa: E402,F401


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread for a module of many tiny ops, which run several times faster on one thread than
    on two on a shared CPU. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# class names of the tiny config's 6 classes, for checkpoints made in tests
TINY_CLASS_NAMES = ["car", "ship", "plane", "tank", "house", "bridge"]


@pytest.fixture(scope="session")
def tiny_random_checkpoint(tmp_path_factory):
    """A seeded, untrained tiny SDCoNet saved as a run's best checkpoint with class names (shared by the runtime and
    scene tests: the weights do not matter to what they check, only that every backend runs the same ones)."""
    from sdconet.config import load_config
    from sdconet.engine.checkpoint import save_model_weights
    from sdconet.models import build_model

    root = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = load_config("tiny", ["data.synthetic.num_images=8", f"data.cache_dir={root / 'cache'}"])
    torch.manual_seed(0)
    return save_model_weights(build_model(cfg.model), cfg, root / "run" / "checkpoints" / "best.safetensors",
                              {"category_names": TINY_CLASS_NAMES})


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
