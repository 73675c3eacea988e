"""LoRA and DoRA (peft's `peft.tuners.lora` names)."""
from .config import CordaConfig, EvaConfig, LoftQConfig, LoraConfig, LoraGAConfig
from .corda import preprocess_corda
from .eva import get_eva_state_dict, initialize_lora_eva_weights
from .layer import Conv1d, Conv2d, DoraMagnitude, Embedding, Linear, LoraLayer
from .loraga import preprocess_loraga
from .model import LoraModel
from .param_wrapper import ParamWrapper

__all__ = [
    "LoraConfig", "LoftQConfig", "EvaConfig", "CordaConfig", "LoraGAConfig", "LoraModel", "LoraLayer", "Linear",
    "Embedding", "Conv1d", "Conv2d", "DoraMagnitude", "preprocess_corda", "preprocess_loraga",
    "get_eva_state_dict", "initialize_lora_eva_weights", "ParamWrapper",
]
