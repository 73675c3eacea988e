"""Prompt tuning: trained virtual-token embeddings prepended to the input (peft's PROMPT_TUNING)."""
from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding

__all__ = ["PromptTuningConfig", "PromptTuningInit", "PromptEmbedding"]
