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


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
