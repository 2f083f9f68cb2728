#!/usr/bin/env python
"""Parameters and multiply-accumulates per component for SDCoNet inference, the serial baseline and the ablations,
next to the paper's 16.94 / 88.22 GFLOPs. Same tool as `python -m sdconet.models.summary` (see --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sdconet.models.summary import main  # noqa: E402

if __name__ == "__main__":
    main()
