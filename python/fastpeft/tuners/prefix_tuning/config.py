"""`PrefixTuningConfig`: peft's prefix-tuning config, field for field."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ...config import PeftType, PromptLearningConfig, register_config


@register_config(PeftType.PREFIX_TUNING)
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of prefix tuning (`PrefixEncoder`): trained key/value prefixes for every attention layer,
    passed to the model as its cache.

    Args:
        init_weights: None: random (N(0, 1)); "zero": the prefix starts at zero.
        encoder_hidden_size: hidden size of the projection MLP (the model's hidden size when None).
        prefix_projection: whether the prefix is produced by a two-layer MLP from virtual-token embeddings
            (otherwise the key/values are trained directly).
    """

    init_weights: Optional[Literal["zero"]] = field(default=None)
    encoder_hidden_size: Optional[int] = field(default=None)
    prefix_projection: bool = field(default=False)

    def __post_init__(self):
        self._post_init_prompt_learning(PeftType.PREFIX_TUNING)
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"{type(self).__name__}.encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")
