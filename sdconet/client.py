"""``python -m sdconet.client IMAGES...``: the serving client CLI (implemented in :mod:`sdconet.serve.client`)."""
import sys

from sdconet.serve.client import main

if __name__ == "__main__":
    sys.exit(main())
