"""Adapter methods. `base` holds what every method shares; one subpackage per method."""
from .base import BaseTuner, BaseTunerLayer, ModulesToSaveWrapper, check_target_module_exists
from .adalora import AdaLoraConfig, AdaLoraModel
from .adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
from .bitfit import BitFitConfig, BitFitModel
from .boft import BOFTConfig, BOFTModel
from .bottleneck import BottleneckConfig, BottleneckModel
from .ia3 import IA3Config, IA3Model
from .loha import LoHaConfig, LoHaModel
from .lokr import LoKrConfig, LoKrModel
from .lora import LoraConfig, LoraModel
from .oft import OFTConfig, OFTModel
from .trainable_tokens import TrainableTokensConfig, TrainableTokensModel
from .xlora import XLoraConfig, XLoraModel

# peft_type -> tuner class (each method adds its entry here)
PEFT_TYPE_TO_TUNER_MAPPING = {
    "LORA": LoraModel, "LOHA": LoHaModel, "LOKR": LoKrModel, "OFT": OFTModel, "BOFT": BOFTModel,
    "IA3": IA3Model, "BITFIT": BitFitModel, "BOTTLENECK": BottleneckModel,
    "ADAPTION_PROMPT": AdaptionPromptModel, "ADALORA": AdaLoraModel, "XLORA": XLoraModel,
    "TRAINABLE_TOKENS": TrainableTokensModel,
}

__all__ = [
    "BaseTuner", "BaseTunerLayer", "ModulesToSaveWrapper", "check_target_module_exists", "LoraConfig", "LoraModel",
    "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel", "OFTConfig", "OFTModel", "BOFTConfig", "BOFTModel",
    "IA3Config", "IA3Model", "BitFitConfig", "BitFitModel", "BottleneckConfig", "BottleneckModel",
    "AdaptionPromptConfig", "AdaptionPromptModel", "AdaLoraConfig", "AdaLoraModel", "XLoraConfig", "XLoraModel",
    "TrainableTokensConfig", "TrainableTokensModel", "PEFT_TYPE_TO_TUNER_MAPPING",
]
