#!/usr/bin/env python
"""The routing sweep: rho (SR decoder lr ratio) and stage 1 (0 = joint) x seeds, resumable, with paired intervals.
Same tool as `python -m sdconet.benchmark.routing_sweep` (see --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sdconet.benchmark.routing_sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
