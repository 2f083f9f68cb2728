"""``python -m sdconet.predict SCENE_OR_DIR...``: the scene CLI for every backend (implemented in
:mod:`sdconet.scene.cli`)."""
import sys

from sdconet.scene.cli import main

if __name__ == "__main__":
    sys.exit(main())
