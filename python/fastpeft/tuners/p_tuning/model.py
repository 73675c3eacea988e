"""`PromptEncoder`: P-tuning's virtual-token embeddings and their MLP / LSTM reparameterisation (peft's layout)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..prompt_tuning.model import BasePromptModule
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType


class PromptEncoder(BasePromptModule):
    """``embedding`` (``[num_virtual_tokens * num_transformer_submodules, token_dim]``) followed by ``mlp_head``
    (MLP) or ``lstm_head`` + ``mlp_head`` (LSTM). In inference mode there are no heads: ``embedding`` holds the
    encoder's output, as peft saves it."""

    def __init__(self, config):
        super().__init__()
        self.token_dim = config.token_dim
        self.input_size = self.token_dim
        self.output_size = self.token_dim
        self.hidden_size = config.encoder_hidden_size
        self.total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        self.has_head = not config.inference_mode
        if not self.has_head:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=self.input_size, hidden_size=self.hidden_size, num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout, bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.hidden_size * 2, self.hidden_size * 2), nn.ReLU(),
                nn.Linear(self.hidden_size * 2, self.output_size),
            )
        else:
            default_layers = PromptEncoderConfig.encoder_num_layers
            if config.encoder_num_layers != default_layers:
                warnings.warn(
                    f"for {self.encoder_type.value}, the argument `encoder_num_layers` is ignored. "
                    f"Exactly {default_layers} MLP layers are used."
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.input_size, self.hidden_size), nn.ReLU(),
                nn.Linear(self.hidden_size, self.hidden_size), nn.ReLU(),
                nn.Linear(self.hidden_size, self.output_size),
            )

    def _encode(self, embeds: torch.Tensor) -> torch.Tensor:
        if not self.has_head:
            return embeds
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            return self.mlp_head(self.lstm_head(embeds)[0])
        return self.mlp_head(embeds)

    def prompt(self) -> torch.Tensor:
        # the LSTM runs over the token sequence: give it a batch of one
        return self._encode(self.embedding.weight.unsqueeze(0))[0]

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self._encode(self.embedding(indices))
