"""LoRA and DoRA (peft's `peft.tuners.lora` names)."""
from .config import LoftQConfig, LoraConfig
from .layer import Conv1d, Conv2d, DoraMagnitude, Embedding, Linear, LoraLayer
from .model import LoraModel

__all__ = ["LoraConfig", "LoftQConfig", "LoraModel", "LoraLayer", "Linear", "Embedding", "Conv1d", "Conv2d", "DoraMagnitude"]
