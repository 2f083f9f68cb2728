"""Detect objects in a folder of images with a trained checkpoint (see sdconet/scene/folder.py and docs/training.md).

  python train/predict.py --checkpoint runs/demo-... --images my_images/ --out predictions/
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from sdconet.scene.folder import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
