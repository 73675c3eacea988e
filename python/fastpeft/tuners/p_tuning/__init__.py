"""P-tuning: virtual-token embeddings reparameterised by an MLP or LSTM (peft's P_TUNING)."""
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .model import PromptEncoder

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptEncoder"]
