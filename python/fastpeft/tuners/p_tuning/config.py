"""`PromptEncoderConfig`: peft's P-tuning config, field for field (MLP and LSTM reparameterisation)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftType, PromptLearningConfig, register_config
from ..prompt_tuning.config import _enum_value


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network that maps the virtual-token embeddings to the prompt: an MLP or a bidirectional LSTM + MLP."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@register_config(PeftType.P_TUNING)
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of P-tuning (`PromptEncoder`): virtual-token embeddings reparameterised by a small network.

    Args:
        encoder_reparameterization_type: `MLP` (three linear layers with ReLU) or `LSTM` (bidirectional LSTM, then
            a two-layer MLP).
        encoder_hidden_size: hidden size of the encoder (the model's hidden size when None).
        encoder_num_layers: LSTM layers (the MLP always has its fixed layers, as in peft).
        encoder_dropout: LSTM dropout.
    """

    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = field(
        default=PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: Optional[int] = field(default=None)
    encoder_num_layers: int = field(default=2)
    encoder_dropout: float = field(default=0.0)

    def __post_init__(self):
        self._post_init_prompt_learning(PeftType.P_TUNING)
        name = type(self).__name__
        self.encoder_reparameterization_type = _enum_value(
            PromptEncoderReparameterizationType, self.encoder_reparameterization_type, name,
            "encoder_reparameterization_type",
        )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"{name}.encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")
        if self.encoder_num_layers < 1:
            raise ValueError(f"{name}.encoder_num_layers must be >= 1, got {self.encoder_num_layers}")
        if not 0.0 <= self.encoder_dropout <= 1.0:
            raise ValueError(f"{name}.encoder_dropout must be in [0, 1], got {self.encoder_dropout}")
