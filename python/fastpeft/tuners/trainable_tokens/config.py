"""`TrainableTokensConfig`: train the embedding rows of a few tokens (peft's TRAINABLE_TOKENS schema)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig, PeftType, register_config


@register_config(PeftType.TRAINABLE_TOKENS)
@dataclass
class TrainableTokensConfig(PeftConfig):
    """Configuration of Trainable Tokens (`TrainableTokensModel`): only the embedding rows of `token_indices` are
    trained; the rest of the embedding matrix (and the model) stays frozen. The trained rows are held as a small
    [len(token_indices), dim] tensor per adapter, so memory grows with the number of tokens, not the vocabulary.

    Args:
        token_indices: the ids of the tokens to train (e.g. new special tokens after `resize_token_embeddings`).
        target_modules: the embedding layer(s) to adapt (list of names / `.`-suffixes, or a full-match regex).
            None: the model's input embedding (`get_input_embeddings()`), else a module called "embed_tokens".
            A layer tied to the input embedding (e.g. `lm_head` with `tie_word_embeddings=True`) follows it.
        init_weights: True (default) starts the trained rows at the current embedding rows, so the adapter is a
            no-op until trained; False draws them from N(0, 1).
    """

    token_indices: list[int] = field(default_factory=list)
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    init_weights: bool = field(default=True)

    def __post_init__(self):
        PeftConfig.__post_init__(self)
        self.peft_type = PeftType.TRAINABLE_TOKENS
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        self._validate()

    def _validate(self) -> None:
        bad = [i for i in self.token_indices if i < 0]
        if bad:
            raise ValueError(
                f"TrainableTokensConfig.token_indices must be token ids >= 0, got {bad}; pass the ids the tokenizer "
                "returns for the tokens to train"
            )
        value = self.target_modules
        if isinstance(value, set):
            if not value:
                raise ValueError("TrainableTokensConfig.target_modules is an empty list; use None for the input "
                                 "embedding")
            names = [v for v in value if not isinstance(v, str) or not v]
            if names:
                raise ValueError(f"TrainableTokensConfig.target_modules must hold module names, got {names!r}")
        elif isinstance(value, str):
            if not value:
                raise ValueError("TrainableTokensConfig.target_modules is an empty string; use None for the input "
                                 "embedding")
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(
                    f"TrainableTokensConfig.target_modules {value!r} is not a valid regular expression: {exc}"
                ) from None
