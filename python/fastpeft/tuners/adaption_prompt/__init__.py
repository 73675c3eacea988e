"""LLaMA-Adapter: zero-init gated adaption prompts in the top attention layers (peft's `peft.tuners.adaption_prompt`
names and checkpoint format)."""
from .config import TRANSFORMERS_MODEL_CONFIG, AdaptionPromptConfig, ModelTypeConfig, prepare_config
from .layer import AdaptedAttention
from .model import AdaptionPromptModel

__all__ = [
    "AdaptionPromptConfig", "AdaptionPromptModel", "AdaptedAttention", "TRANSFORMERS_MODEL_CONFIG", "ModelTypeConfig",
    "prepare_config",
]
