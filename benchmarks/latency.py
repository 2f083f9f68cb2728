#!/usr/bin/env python
"""Latency and throughput of every backend (torch, ONNX Runtime, TensorRT, Triton). See --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sdconet.benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
