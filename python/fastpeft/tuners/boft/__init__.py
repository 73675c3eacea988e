"""BOFT: orthogonal butterfly fine-tuning (peft's `peft.tuners.boft` names), on fastpeft's orthogonal ops."""
from .config import BOFTConfig
from .layer import BOFTLayer, Conv2d, Linear
from .model import BOFTModel

__all__ = ["BOFTConfig", "BOFTModel", "BOFTLayer", "Linear", "Conv2d"]
