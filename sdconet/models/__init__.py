"""SDCoNet models: shared Swin encoder, neck, saliency-driven DINO detector, SR decoder, assembly, serial baseline."""
from sdconet.models.sdconet import SDCoNet, SerialBaseline, build_model

__all__ = ["SDCoNet", "SerialBaseline", "build_model"]
