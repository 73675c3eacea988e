"""`AdaptionPromptConfig`: peft's LLaMA-Adapter config (same fields, defaults and JSON schema), and the table of
supported model types (peft 0.21.2's `TRANSFORMERS_MODEL_CONFIG`: llama, mistral, gpt2)."""
from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field
from typing import Optional

from ...config import PeftConfig, PeftType, register_config

# How to adapt the attention of a transformers model type: the attention modules' attribute name in their parent
# (`target_modules`) and the projections the adaption prompt goes through. `v_proj_layer` None: keys and values come
# from one fused projection (`k_proj_layer`, GPT-2's c_attn, split q|k|v); `o_proj_layer` None: the adapter output is
# added to the attention output without an output projection (peft's GPT-2 behaviour).
ModelTypeConfig = namedtuple("ModelTypeConfig", ["target_modules", "k_proj_layer", "v_proj_layer", "o_proj_layer"])

TRANSFORMERS_MODEL_CONFIG = {
    "llama": ModelTypeConfig("self_attn", "k_proj", "v_proj", "o_proj"),
    "mistral": ModelTypeConfig("self_attn", "k_proj", "v_proj", "o_proj"),
    "gpt2": ModelTypeConfig("attn", "c_attn", None, None),
}


@register_config(PeftType.ADAPTION_PROMPT)
@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Configuration of a LLaMA-Adapter (`AdaptionPromptModel`, https://huggingface.co/papers/2303.16199): the top
    `adapter_layers` attention modules get `adapter_len` learned prompt tokens that every query also attends to,
    through a separate softmax whose output is scaled by a learned gate initialised at zero (so the adapted model
    starts out equal to the base model).

    Args:
        target_modules: the attribute name of the attention modules in their parent (e.g. "self_attn"); None: the
            default of the model type (see `TRANSFORMERS_MODEL_CONFIG`).
        adapter_len: number of adaption prompt tokens per adapted layer (required, > 0).
        adapter_layers: number of adapted layers, counted from the top of the model (required, > 0).
    """

    target_modules: Optional[str] = field(
        default=None, metadata={"help": "Name of the attention submodules to insert adaption prompts into."}
    )
    adapter_len: Optional[int] = field(default=None, metadata={"help": "Number of adapter tokens to insert"})
    adapter_layers: Optional[int] = field(default=None, metadata={"help": "Number of adapter layers (from the top)"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.ADAPTION_PROMPT
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"AdaptionPromptConfig.{name} must be a positive integer, got {value}")
        if self.target_modules is not None and (not self.target_modules or "." in self.target_modules):
            raise ValueError(
                "AdaptionPromptConfig.target_modules must be the attribute name of the attention modules in their "
                f"parent (e.g. 'self_attn'), got {self.target_modules!r}"
            )

    @property
    def is_adaption_prompt(self) -> bool:
        return True


def prepare_config(peft_config: AdaptionPromptConfig, model) -> AdaptionPromptConfig:
    """Check that `model` is of a supported type and fill in the default `target_modules` (peft's prepare_config)."""
    model_config = getattr(model, "config", None)
    model_type = getattr(model_config, "model_type", None)
    if model_type not in TRANSFORMERS_MODEL_CONFIG:
        raise ValueError(
            f"Unsupported model type for adaption prompt: {model_type!r}. Adaption prompts (LLaMA-Adapter) need to "
            f"know how a model computes its attention queries; supported model types: "
            f"{', '.join(sorted(TRANSFORMERS_MODEL_CONFIG))}."
        )
    for name in ("adapter_len", "adapter_layers"):
        if getattr(peft_config, name) is None:
            raise ValueError(f"AdaptionPromptConfig.{name} must be set (a positive integer)")
    if peft_config.target_modules is None:
        peft_config.target_modules = TRANSFORMERS_MODEL_CONFIG[model_type].target_modules
    return peft_config
