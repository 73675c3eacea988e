"""The X-LoRA classifier: an MLP over the base model's last hidden state that predicts, per token, a weight for
every LoRA expert in every LoRA layer. Module names are peft's (`layers`, a Sequential), so its state-dict keys
are the checkpoint keys `base_model.internal_xlora_classifier.layers.N.{weight,bias}`."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .config import XLoraConfig

Number = Union[int, float, bool]


class TemperatureScaledSoftmax(nn.Module):
    """softmax(logits / temperature) over the last dim."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.softmax(logits / self.temperature)


def _batch_and_seq(input_ids, inputs_embeds) -> tuple[int, int]:
    t = input_ids if input_ids is not None else inputs_embeds
    if t is None:
        raise ValueError("X-LoRA needs `input_ids` or `inputs_embeds` to size its scalings")
    return t.shape[0], t.shape[1]


class XLoraClassifier(nn.Module):
    """Predicts the expert weights ("scalings") [batch, seq, n_layers, n_classes] from hidden states.

    `n_classes` is the number of experts, `n_layers` the number of LoRA layers (not model layers). Depth 1: one
    Linear(hidden_size -> n_classes, or n_classes * n_layers with `layerwise_scalings`); deeper: Linear + ReLU
    (+ Dropout) blocks of width `xlora_size` first. Created in the model's dtype on `device`.
    """

    def __init__(self, model: nn.Module, config: XLoraConfig, n_classes: int, n_layers: int, device):
        super().__init__()
        self.n_classes = n_classes
        self.n_layers = n_layers
        self.config = config
        self.log_scalings: list[torch.Tensor] = []
        self.softmax = TemperatureScaledSoftmax(temperature=config.softmax_temperature)
        self.override_scaling_pass_value: Number = config.scaling_pass_value
        self.scalings_logging = False
        self.dtype = next(model.parameters()).dtype

        if config.xlora_depth <= 0:
            raise ValueError("X-LoRA depth must be strictly positive.")
        n_out = n_classes * n_layers if config.layerwise_scalings else n_classes

        def linear(d_in: int, d_out: int) -> nn.Linear:
            return nn.Linear(d_in, d_out, bias=True).to(device).to(self.dtype)

        layers: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.xlora_depth - 1):
            layers.append(linear(width, config.xlora_size))
            layers.append(nn.ReLU())
            if config.xlora_dropout_p > 0.0:
                layers.append(nn.Dropout(p=config.xlora_dropout_p))
            width = config.xlora_size
        layers.append(linear(width, n_out))
        self.layers = nn.Sequential(*layers)

    def make_dummy_scalings(self, input_ids=None, inputs_embeds=None, *args, **kwargs) -> torch.Tensor:
        """The scaling pass's scalings: [batch, seq, n_layers, n_classes] filled with the scaling pass value."""
        batch, seq = _batch_and_seq(input_ids, inputs_embeds)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        return torch.full((batch, seq, self.n_layers, self.n_classes), self.override_scaling_pass_value).to(
            device=device, dtype=self.dtype
        )

    def forward(self, result, input_ids=None, inputs_embeds=None, *args, **kwargs) -> torch.Tensor:
        """Scalings [batch, seq, n_layers, n_classes] from `result.hidden_states[-1]` (softmaxed if enabled;
        appended to the log when logging is on)."""
        batch, seq = _batch_and_seq(input_ids, inputs_embeds)
        logits = self.layers(result.hidden_states[-1])
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, seq, self.n_layers, self.n_classes)
        if self.config.enable_softmax:
            scalings = self.softmax(scalings)
        if self.scalings_logging:
            self.log_scalings.append(scalings)
        return scalings

    def _get_bucketed_scalings(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log bucketed by seq_len: seq_len -> (positions in the log, tensors)."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, scaling in enumerate(self.log_scalings):
            positions, tensors = buckets.setdefault(scaling.shape[1], ([], []))
            positions.append(i)
            tensors.append(scaling)
        return buckets

    def _set_override_scaling_pass_value(self, value: Optional[Number]) -> None:
        self.override_scaling_pass_value = 1 / self.n_classes if value is None else value
        self.config.scaling_pass_value = self.override_scaling_pass_value
