"""BitFit: train only the biases of a model (fastpeft's own method, peft_type "BITFIT"; peft's file layout)."""
from .config import BitFitConfig
from .model import BitFitModel

__all__ = ["BitFitConfig", "BitFitModel"]
