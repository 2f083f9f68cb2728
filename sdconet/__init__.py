"""SDCoNet Edge: saliency-driven multi-task SR + small-object detection, and its edge deployment pipeline."""
from sdconet.config import Config, load_config

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "__version__"]
