"""`PrefixEncoder`: prefix tuning's key/value prefixes, trained directly or through a projection MLP (peft's
layout: one row per virtual token, ``num_layers * 2 * token_dim`` values, layer-major, key before value)."""
from __future__ import annotations

import torch
from torch import nn

from ..prompt_tuning.model import BasePromptModule


class PrefixEncoder(BasePromptModule):
    """``prompt()`` is ``[num_virtual_tokens, num_layers * 2 * token_dim]``: ``embedding.weight`` itself, or
    ``transform(embedding.weight)`` with ``prefix_projection`` (in inference mode the projection's output is the
    stored ``embedding``, as peft saves it)."""

    def __init__(self, config):
        super().__init__()
        self.prefix_projection = bool(config.prefix_projection) and not config.inference_mode
        token_dim, num_layers = config.token_dim, config.num_layers
        out_dim = num_layers * 2 * token_dim
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, config.encoder_hidden_size), nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, out_dim),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, out_dim)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def prompt(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding(prefix))
        return self.embedding(prefix)
