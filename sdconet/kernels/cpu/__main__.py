"""``python -m sdconet.kernels.cpu [--force] [--verbose]``: build the fused MSDA CPU kernel (what `make setup` runs)."""
import sys

from sdconet.kernels.cpu.build import main

sys.exit(main())
