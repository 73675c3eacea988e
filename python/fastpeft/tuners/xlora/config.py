"""`XLoraConfig`: peft's X-LoRA config, field for field, with its defaults and warnings."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Optional

from ...config import PeftConfig, PeftType, register_config


@register_config(PeftType.XLORA)
@dataclass
class XLoraConfig(PeftConfig):
    """Configuration of an X-LoRA model (`XLoraModel`): a mixture of LoRA experts whose per-token, per-layer
    weights come from a small classifier over the base model's hidden states.

    Args:
        hidden_size: hidden size of the base model (the classifier's input); None warns and uses 4096.
        adapters: adapter name -> directory of a saved LoRA adapter; they are all loaded as the experts. When a
            saved X-LoRA model is reloaded, the directories stored here are used (or pass ``adapters=`` to
            ``from_pretrained``).
        enable_softmax: softmax (at `softmax_temperature`) over the classifier's logits per token and layer.
        enable_softmax_topk: softmax over the top-k experts only (with `top_k_lora`); peft warns when combined
            with `enable_softmax`.
        softmax_temperature: the softmax temperature; lower gives sharper weights.
        layerwise_scalings: one set of expert weights per LoRA layer; False: one set broadcast to every layer.
        top_k_lora: keep only the k experts with the largest weights per token (the others get 0); None: dense.
        xlora_depth: the classifier's number of linear layers.
        xlora_size: the classifier's hidden size (when `xlora_depth` > 1).
        xlora_dropout_p: dropout between the classifier's layers (when `xlora_depth` > 1).
        use_trainable_adapters: train the LoRA experts too (default: only the classifier is trained).
        scaling_pass_value: the expert weight used in the first (scaling) pass that produces the hidden states
            the classifier reads; 0 runs it as the bare base model.
        global_scaling_weight: a factor on every expert's output.
    """

    hidden_size: Optional[int] = field(default=None)
    adapters: Optional[dict[str, str]] = field(default=None)
    enable_softmax: bool = field(default=True)
    enable_softmax_topk: bool = field(default=False)
    layerwise_scalings: bool = field(default=False)
    xlora_depth: int = field(default=1)
    xlora_size: int = field(default=2048)
    xlora_dropout_p: float = field(default=0.2)
    use_trainable_adapters: bool = field(default=False)
    softmax_temperature: float = field(default=1.0)
    top_k_lora: Optional[int] = field(default=None)
    scaling_pass_value: float = field(default=0.0)
    global_scaling_weight: float = field(default=1.0)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.XLORA
        if self.hidden_size is None:
            warnings.warn(
                "No value was provided for `hidden_size`. This will be set to 4096 by default, please ensure that "
                "this is correct."
            )
            self.hidden_size = 4096
        if self.adapters is None:
            warnings.warn(
                "No value was provided for `adapters`. This will be set to empty, please ensure that this is correct."
            )
            self.adapters = {}
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn("`enable_softmax_topk` enabled `top_k_lora` is not set")
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn(
                "`enable_softmax_topk` and `enable_softmax` are both enabled. This will result in worse performance."
            )
        if self.top_k_lora is not None and self.top_k_lora < 1:
            warnings.warn("`top_k_lora` value must be at least 1.")

    def _config_json(self, output: dict) -> str:
        # The order of `adapters` is the order of the classifier's outputs: keep it (the other keys sorted).
        return json.dumps(dict(sorted(output.items())), indent=2)
