"""`LoKrModel`: injects LoKr layers (peft's LoKrModel interface and state-dict keys)."""
from __future__ import annotations

from torch import nn

from ..lora.model import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..lycoris import LycorisTuner
from .layer import Conv1d, Conv2d, Linear, LoKrLayer


class LoKrModel(LycorisTuner):
    """Creates LoKr (low-rank Kronecker product) adapters on a model.

    Args:
        model: the base model; modified in place (available as `.model`).
        peft_config: a `LoKrConfig`, or a dict adapter name -> `LoKrConfig`.
        adapter_name: the name of the adapter to create (default "default").

    Layers supported: nn.Linear, nn.Conv1d, nn.Conv2d (as in peft).
    """

    prefix: str = "lokr_"
    tuner_layer_cls = LoKrLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.copy()
    layers_mapping = {nn.Conv2d: Conv2d, nn.Conv1d: Conv1d, nn.Linear: Linear}
