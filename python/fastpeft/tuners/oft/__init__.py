"""OFT: orthogonal finetuning with block-diagonal Cayley rotations (peft's `peft.tuners.oft` names)."""
from .config import OFTConfig
from .layer import Conv2d, Embedding, Linear, OFTLayer, OFTRotation
from .model import OFTModel

__all__ = ["OFTConfig", "OFTModel", "OFTLayer", "OFTRotation", "Linear", "Conv2d", "Embedding"]
