"""What the LoRA inits need to know besides the layer: whether the adapter is being built to receive a checkpoint.

The data-driven inits ("corda", "eva", "lora_ga") need data that exists only when a *new* adapter is created
(CorDA's per-layer `eigens`, LoRA-GA's gradients, EVA's activations). An adapter being loaded from a checkpoint gets
its A and B from the file, so its init must not need that data and must not touch the base weights: the base model
the user passes is the one the adapter was trained on (for CorDA / LoRA-GA: the residual model written next to it).
peft raises for a CorDA adapter in that case (`eigens` not found); fastpeft loads it.
"""
from __future__ import annotations

import contextlib
import contextvars

# set while adapters are created whose weights are assigned right after (see adapter_weights_assigned_later)
_ASSIGNED_LATER = contextvars.ContextVar("fastpeft_lora_weights_assigned_later", default=False)


@contextlib.contextmanager
def adapter_weights_assigned_later():
    """Adapters created inside get their weights from elsewhere right after (a checkpoint, a weighted combination):
    data-driven inits then neither need their data nor change the base weights."""
    token = _ASSIGNED_LATER.set(True)
    try:
        yield
    finally:
        _ASSIGNED_LATER.reset(token)


def building_adapter_for_checkpoint() -> bool:
    """True inside `adapter_weights_assigned_later()` (the loaders `PeftModel.from_pretrained` / `load_adapter`,
    PeftMixedModel's, and `add_weighted_adapter` create adapters in it): the adapter being created will be
    overwritten."""
    return _ASSIGNED_LATER.get()
