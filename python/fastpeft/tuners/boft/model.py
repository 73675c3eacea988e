"""`BOFTModel`: injects BOFT layers (peft's BOFTModel interface and state-dict keys)."""
from __future__ import annotations

from torch import nn

from ..base import BaseTuner, BaseTunerLayer, linear_kind
from ..lora.model import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from .layer import BOFTLayer, Conv2d, Linear


class BOFTModel(BaseTuner):
    """Creates BOFT (orthogonal butterfly) adapters on a model.

    Args:
        model: the base model; modified in place (available as `.model`).
        peft_config: a `BOFTConfig`, or a dict adapter name -> `BOFTConfig`.
        adapter_name: the name of the adapter to create (default "default").

    Layers supported: nn.Linear and nn.Conv2d (as peft), and transformers' Conv1D (GPT-2 style, weight
    [in, out]; peft's BOFTModel rejects it).
    """

    prefix: str = "boft_"
    tuner_layer_cls = BOFTLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.copy()

    def _create_and_replace(self, boft_config, adapter_name, target, target_name, parent, current_key) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, BOFTLayer):
            target.update_layer(adapter_name, config=boft_config)
            return
        new_module = self._create_new_module(boft_config, adapter_name, target)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(boft_config, adapter_name: str, target: nn.Module, **kwargs) -> BOFTLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        kind = linear_kind(base, boft_config)
        if kind is not None:
            return Linear(target, adapter_name, config=boft_config, is_target_conv_1d_layer=kind == "conv1d", **kwargs)
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, config=boft_config, **kwargs)
        raise TypeError(
            f"Target module {type(base).__name__} is not supported by BOFT. Currently, only `torch.nn.Linear`, "
            "`torch.nn.Conv2d` and `transformers.pytorch_utils.Conv1D` are supported."
        )
