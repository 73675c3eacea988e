"""`PromptEmbedding`: the trained virtual-token embeddings of prompt tuning (peft's module and state layout)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import PromptTuningInit


class BasePromptModule(nn.Module):
    """What the prompt-learning encoders share: an ``embedding`` (``nn.Embedding``, peft's name) and ``prompt()``,
    the encoder's output for all virtual tokens at once, ``[num_tokens, dim]`` (no batch dimension: callers
    broadcast it over the batch)."""

    embedding: nn.Embedding

    def prompt(self) -> torch.Tensor:
        return self.embedding.weight

    def _load_adapter_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint's ``prompt_embeddings`` (peft's key) into ``embedding``."""
        weight = state_dict["prompt_embeddings"]
        expected = tuple(self.embedding.weight.shape)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: checkpoint tensor 'prompt_embeddings' has shape {tuple(weight.shape)}, the "
                f"model expects {expected} (check num_virtual_tokens / token_dim / num_layers of the config and the "
                "base model)"
            )
        with torch.no_grad():
            self.embedding.weight.copy_(weight.to(self.embedding.weight.device, self.embedding.weight.dtype))


def _init_token_ids_from_text(config, total: int) -> list[int]:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a checkpoint's config must not run code
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(
            f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} gives no tokens with the tokenizer at "
            f"{config.tokenizer_name_or_path!r}; use a non-empty text"
        )
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptEmbedding(BasePromptModule):
    """Prompt tuning's virtual-token embeddings, ``embedding.weight`` of shape
    ``[num_virtual_tokens * num_transformer_submodules, token_dim]``.

    Args:
        config: a ``PromptTuningConfig`` whose ``token_dim`` / ``num_transformer_submodules`` are filled in.
        word_embeddings: the base model's input embeddings (for ``SAMPLE_VOCAB`` and ``TEXT`` init).
    """

    def __init__(self, config, word_embeddings: nn.Module):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode:
            return  # the weights come from a checkpoint
        init = PromptTuningInit(config.prompt_tuning_init)
        if init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        elif init == PromptTuningInit.TEXT:
            ids = torch.tensor(_init_token_ids_from_text(config, total), dtype=torch.long)
        else:
            return
        if int(ids.max()) >= word_embeddings.num_embeddings:
            raise ValueError(
                f"the tokenizer at {config.tokenizer_name_or_path!r} produced token id {int(ids.max())}, outside the "
                f"model's vocabulary of {word_embeddings.num_embeddings}"
            )
        with torch.no_grad():
            weight = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
        self.embedding.weight = nn.Parameter(weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)
