"""(IA)^3: learned per-feature scaling vectors (peft's `peft.tuners.ia3` names and checkpoint format)."""
from .config import IA3Config
from .layer import Conv2d, Conv3d, IA3Layer, Linear
from .model import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, IA3Model,
)

__all__ = [
    "IA3Config", "IA3Model", "IA3Layer", "Linear", "Conv2d", "Conv3d",
    "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING", "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
]
