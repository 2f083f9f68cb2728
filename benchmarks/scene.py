#!/usr/bin/env python
"""Scene throughput (Mpx/s, tiles/s) per backend and tile batch, Triton concurrent scenes, the CLI's peak RSS on a
large GeoTIFF, and the seam-merge study. See --help and docs/scenes.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sdconet.benchmark.scene import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
