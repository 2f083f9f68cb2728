"""``python -m sdconet.loadgen``: the serving load generator CLI (implemented in :mod:`sdconet.serve.loadgen`)."""
import sys

from sdconet.serve.loadgen import main

if __name__ == "__main__":
    sys.exit(main())
