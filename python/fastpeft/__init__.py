"""fastpeft: parameter-efficient fine-tuning on hand-written C++/CUDA kernels.

The public names and checkpoint format are Hugging Face PEFT's: `from fastpeft import
get_peft_model, LoraConfig` is a drop-in for `from peft import ...`.
"""
from __future__ import annotations

import importlib

from ._loader import build_info  # loads the compiled ops; fails early and clearly on a bad build

__version__ = "0.1.0"

# Public name -> module that defines it. Loaded on first use so `import fastpeft` stays light
# (transformers is only imported by the parts that need it).
_LAZY = {
    "PeftConfig": "fastpeft.config",
    "PeftType": "fastpeft.config",
    "TaskType": "fastpeft.config",
    "LoraConfig": "fastpeft.tuners.lora.config",
    "LoftQConfig": "fastpeft.tuners.lora.config",
    "EvaConfig": "fastpeft.tuners.lora.config",
    "LoraGAConfig": "fastpeft.tuners.lora.config",
    "get_eva_state_dict": "fastpeft.tuners.lora.eva",
    "initialize_lora_eva_weights": "fastpeft.tuners.lora.eva",
    "preprocess_loraga": "fastpeft.tuners.lora.loraga",
    "LoraModel": "fastpeft.tuners.lora.model",
    "LoHaConfig": "fastpeft.tuners.loha.config",
    "LoHaModel": "fastpeft.tuners.loha.model",
    "LoKrConfig": "fastpeft.tuners.lokr.config",
    "LoKrModel": "fastpeft.tuners.lokr.model",
    "OFTConfig": "fastpeft.tuners.oft.config",
    "OFTModel": "fastpeft.tuners.oft.model",
    "BOFTConfig": "fastpeft.tuners.boft.config",
    "BOFTModel": "fastpeft.tuners.boft.model",
    "IA3Config": "fastpeft.tuners.ia3.config",
    "IA3Model": "fastpeft.tuners.ia3.model",
    "BitFitConfig": "fastpeft.tuners.bitfit.config",
    "BitFitModel": "fastpeft.tuners.bitfit.model",
    "BottleneckConfig": "fastpeft.tuners.bottleneck.config",
    "BottleneckModel": "fastpeft.tuners.bottleneck.model",
    "TrainableTokensConfig": "fastpeft.tuners.trainable_tokens.config",
    "TrainableTokensModel": "fastpeft.tuners.trainable_tokens.model",
    "AdaptionPromptConfig": "fastpeft.tuners.adaption_prompt.config",
    "AdaptionPromptModel": "fastpeft.tuners.adaption_prompt.model",
    "PromptLearningConfig": "fastpeft.config",
    "PromptTuningConfig": "fastpeft.tuners.prompt_tuning.config",
    "PromptTuningInit": "fastpeft.tuners.prompt_tuning.config",
    "PromptEmbedding": "fastpeft.tuners.prompt_tuning.model",
    "PromptEncoderConfig": "fastpeft.tuners.p_tuning.config",
    "PromptEncoderReparameterizationType": "fastpeft.tuners.p_tuning.config",
    "PromptEncoder": "fastpeft.tuners.p_tuning.model",
    "PrefixTuningConfig": "fastpeft.tuners.prefix_tuning.config",
    "PrefixEncoder": "fastpeft.tuners.prefix_tuning.model",
    "AdaLoraConfig": "fastpeft.tuners.adalora.config",
    "AdaLoraModel": "fastpeft.tuners.adalora.model",
    "XLoraConfig": "fastpeft.tuners.xlora.config",
    "XLoraModel": "fastpeft.tuners.xlora.model",
    "PeftModel": "fastpeft.peft_model",
    "PeftModelForCausalLM": "fastpeft.peft_model",
    "PeftModelForSequenceClassification": "fastpeft.peft_model",
    "PeftModelForSeq2SeqLM": "fastpeft.peft_model",
    "PeftModelForTokenClassification": "fastpeft.peft_model",
    "PeftModelForQuestionAnswering": "fastpeft.peft_model",
    "PeftModelForFeatureExtraction": "fastpeft.peft_model",
    "get_peft_model": "fastpeft.peft_model",
    "PeftMixedModel": "fastpeft.mixed_model",
    "get_peft_model_state_dict": "fastpeft.checkpoint",
    "set_peft_model_state_dict": "fastpeft.checkpoint",
    "load_peft_weights": "fastpeft.checkpoint",
    "AdapterCheckpointError": "fastpeft.checkpoint",
    "CorruptCheckpointError": "fastpeft.checkpoint",
    "prepare_model_for_kbit_training": "fastpeft.training",
    "PeftTrainer": "fastpeft.training",
    "SaveAdapterCallback": "fastpeft.training",
    "LinearNF4": "fastpeft.quant.nf4",
    "quantize_model": "fastpeft.quant.nf4",
    "load_nf4_model": "fastpeft.quant.hf",
    "replace_lora_weights_loftq": "fastpeft.quant.loftq",
    "hotswap_adapter": "fastpeft.hotswap",
    "hotswap_adapter_from_state_dict": "fastpeft.hotswap",
    "prepare_model_for_compiled_hotswap": "fastpeft.hotswap",
    # peft's other public names: auto classes, registries, module-level helpers, errors
    "AutoPeftModel": "fastpeft.auto",
    "AutoPeftModelForCausalLM": "fastpeft.auto",
    "AutoPeftModelForSeq2SeqLM": "fastpeft.auto",
    "AutoPeftModelForSequenceClassification": "fastpeft.auto",
    "AutoPeftModelForTokenClassification": "fastpeft.auto",
    "AutoPeftModelForQuestionAnswering": "fastpeft.auto",
    "AutoPeftModelForFeatureExtraction": "fastpeft.auto",
    "PEFT_TYPE_TO_CONFIG_MAPPING": "fastpeft.mapping",
    "PEFT_TYPE_TO_TUNER_MAPPING": "fastpeft.mapping",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING": "fastpeft.mapping",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING": "fastpeft.mapping",
    "get_peft_config": "fastpeft.mapping",
    "inject_adapter_in_model": "fastpeft.mapping",
    "cast_mixed_precision_params": "fastpeft.mapping",
    "get_base_model_state_dict": "fastpeft.mapping",
    "set_base_model_state_dict": "fastpeft.mapping",
    "get_layer_status": "fastpeft.status",
    "get_model_status": "fastpeft.status",
    "PeftError": "fastpeft.errors",
    "PeftWarning": "fastpeft.errors",
    "NoMatchingPeftModuleError": "fastpeft.errors",
}
_SUBMODULES = {"ops", "reference", "nn", "config", "checkpoint", "tuners", "peft_model", "training", "cli", "quant", "hotswap", "utils"}

__all__ = ["build_info", "__version__", *_LAZY, *sorted(_SUBMODULES)]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"fastpeft.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
