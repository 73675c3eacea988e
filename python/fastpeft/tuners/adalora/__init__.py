"""AdaLoRA: LoRA in SVD form with adaptive rank allocation (peft's `peft.tuners.adalora` names and checkpoint format)."""
from .config import AdaLoraConfig
from .layer import AdaLoraLayer, SVDConv2d, SVDLinear
from .model import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING, AdaLoraModel, RankAllocator

__all__ = [
    "AdaLoraConfig", "AdaLoraModel", "AdaLoraLayer", "SVDLinear", "SVDConv2d", "RankAllocator",
    "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING",
]
