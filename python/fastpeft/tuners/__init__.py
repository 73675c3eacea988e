"""Adapter methods. `base` holds what every method shares; one subpackage per method."""
from .base import BaseTuner, BaseTunerLayer, ModulesToSaveWrapper, check_target_module_exists
from .loha import LoHaConfig, LoHaModel
from .lokr import LoKrConfig, LoKrModel
from .lora import LoraConfig, LoraModel

# peft_type -> tuner class (each method adds its entry here)
PEFT_TYPE_TO_TUNER_MAPPING = {"LORA": LoraModel, "LOHA": LoHaModel, "LOKR": LoKrModel}

__all__ = [
    "BaseTuner", "BaseTunerLayer", "ModulesToSaveWrapper", "check_target_module_exists", "LoraConfig", "LoraModel",
    "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel",
    "PEFT_TYPE_TO_TUNER_MAPPING",
]
