"""`PromptTuningConfig`: peft's prompt-tuning config, field for field (RANDOM, SAMPLE_VOCAB and TEXT init)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftType, PromptLearningConfig, register_config


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token embeddings start: from text, from sampled vocabulary rows, or at random."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


def _enum_value(enum_cls, value, owner: str, field_name: str):
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(
            f"{owner}.{field_name}: invalid value {value!r}; must be one of {[m.value for m in enum_cls]}"
        ) from None


@register_config(PeftType.PROMPT_TUNING)
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of prompt tuning (`PromptEmbedding`): `num_virtual_tokens` trained embeddings are prepended
    to the input embeddings.

    Args:
        prompt_tuning_init: `RANDOM` (N(0, 1), as nn.Embedding), `SAMPLE_VOCAB` (rows of the model's word
            embeddings at random token ids) or `TEXT` (the embeddings of `prompt_tuning_init_text`, tokenized with
            the tokenizer at `tokenizer_name_or_path`, repeated or cut to the number of virtual tokens).
        prompt_tuning_init_text: the text for `TEXT` init.
        tokenizer_name_or_path: the tokenizer for `TEXT` init (a local directory or a hub name).
        tokenizer_kwargs: keyword arguments for `AutoTokenizer.from_pretrained` (`TEXT` init only;
            `trust_remote_code` is dropped).
    """

    prompt_tuning_init: Union[PromptTuningInit, str] = field(default=PromptTuningInit.RANDOM)
    prompt_tuning_init_text: Optional[str] = field(default=None)
    tokenizer_name_or_path: Optional[str] = field(default=None)
    tokenizer_kwargs: Optional[dict] = field(default=None)

    def __post_init__(self):
        self._post_init_prompt_learning(PeftType.PROMPT_TUNING)
        name = type(self).__name__
        self.prompt_tuning_init = _enum_value(PromptTuningInit, self.prompt_tuning_init, name, "prompt_tuning_init")
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    f"{name}: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer that turns "
                    f"prompt_tuning_init_text into token ids), got {self.tokenizer_name_or_path!r}"
                )
            if self.prompt_tuning_init_text is None:
                raise ValueError(
                    f"{name}: prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text whose embeddings "
                    "initialise the virtual tokens), got None"
                )
        if self.tokenizer_kwargs and self.prompt_tuning_init != PromptTuningInit.TEXT:
            raise ValueError(f"{name}: tokenizer_kwargs is only valid with prompt_tuning_init='TEXT'")
