"""Drop-in adapter layers for users who want no wrapper model.

    from fastpeft.nn import LoraLinear
    layer = LoraLinear.from_linear(model.proj, r=16, lora_alpha=32)   # base weights frozen
    model.proj = layer
    ... train ...
    layer.merge()          # or layer.unmerge(); layer.get_base_layer() is the plain nn.Linear

Each layer is the same class the tuners inject (same forward, merge/unmerge, state-dict keys).

    from fastpeft.nn import LinearNF4
    model.proj = LinearNF4.from_linear(model.proj, blocksize=64, double_quant=True)  # NF4, frozen

LinearNF4's state dict is bitsandbytes Linear4bit's (keys, dtypes, bytes). LoRA on it (QLoRA):

    from fastpeft.nn import LoraLinearNF4
    model.proj = LoraLinearNF4.from_linear(model.proj, r=16, lora_alpha=32)  # model.proj: a LinearNF4
"""
from __future__ import annotations

from .quant.nf4 import LinearNF4
from .tuners.lora.layer import Linear as LoraLinear
from .tuners.lora.nf4 import Linear4bit as LoraLinearNF4

__all__ = ["LinearNF4", "LoraLinear", "LoraLinearNF4"]
