"""LoKr: low-rank Kronecker product adapters (peft's `peft.tuners.lokr` names)."""
from .config import LoKrConfig
from .layer import Conv1d, Conv2d, Linear, LoKrLayer, factorization
from .model import LoKrModel

__all__ = ["LoKrConfig", "LoKrModel", "LoKrLayer", "Linear", "Conv1d", "Conv2d", "factorization"]
