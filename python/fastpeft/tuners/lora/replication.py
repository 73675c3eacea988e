"""LoRA's `layer_replication` (LLaMA-Pro style expansion; peft's `replicate_layers`).

The decoder's layer stack is rebuilt from ranges of the original layers: `[[0, 4], [2, 5]]` over layers 0..4 gives
`[0, 1, 2, 3, 2, 3, 4]`. Each new layer is a copy of its source module whose parameters *are* the source's (no base
weight is duplicated), so every position gets its own LoRA adapters while the base stays shared. Module names (and so
checkpoint keys) are those of the new stack: `model.layers.<new index>....`, as in peft.
"""
from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

__all__ = ["replicate_layers"]


def _shared_clone(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters are `module`'s own (buffers are copied)."""
    clone = copy.deepcopy(module)
    for name, sub in module.named_modules():
        target = clone.get_submodule(name)
        for pname, param in sub.named_parameters(recurse=False):
            target.register_parameter(pname, param)
    return clone


def _layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, layers): the decoder/encoder layer list, found as peft finds it (`[.model]*.layers`,
    `.bert.encoder.layer` / `.encoder.layer`, `.h`)."""
    while hasattr(model, "model"):
        model = model.model
    if hasattr(model, "bert"):
        model = model.bert
    if hasattr(model, "layers"):
        owner, attr = model, "layers"
    elif hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
        owner, attr = model.encoder, "layer"
    elif hasattr(model, "h"):
        owner, attr = model, "h"
    else:
        owner, attr = None, None
    layers = getattr(owner, attr, None) if owner is not None else None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            "Could not locate the layers attribute in the model. Expected Llama, Bert or Falcon compatible architectures."
        )
    return owner, attr, layers


def replicate_layers(model: nn.Module, layer_map: Sequence[Sequence[int]]) -> None:
    """Replace the model's layer stack by the layers of `layer_map`'s ranges ([start, end) each), sharing weights."""
    owner, attr, layers = _layer_stack(model)
    new_layers = []
    for start, end in layer_map:
        if not (0 <= start <= end <= len(layers)):
            raise ValueError(f"layer_replication range [{start}, {end}) is outside the model's {len(layers)} layers")
        for i in range(start, end):
            clone = _shared_clone(layers[i])
            # transformers' attention layers index the KV cache by `layer_idx`: each position needs its own
            for sub in clone.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new_layers)
            new_layers.append(clone)
    setattr(owner, attr, nn.ModuleList(new_layers))
    config = getattr(owner, "config", None)
    if config is None:
        config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new_layers)
