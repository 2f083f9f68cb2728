#!/usr/bin/env python
"""The paper's Table VI ablations (train.schedule rows x seeds) with mean ± std, a markdown table and a bar chart;
resumable. Same tool as `python -m sdconet.benchmark.ablations` (see --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sdconet.benchmark.ablations import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
