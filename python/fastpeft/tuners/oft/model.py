"""`OFTModel`: injects OFT layers (peft's OFTModel interface and state-dict keys)."""
from __future__ import annotations

from torch import nn

from ..base import BaseTuner, BaseTunerLayer, linear_kind
from ..lora.model import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from .config import OFTConfig
from .layer import Conv2d, Embedding, Linear, OFTLayer


class OFTModel(BaseTuner):
    """Creates OFT (orthogonal finetuning, https://huggingface.co/papers/2306.07280) adapters on a model.

    Args:
        model: the base model; modified in place (available as `.model`).
        peft_config: an `OFTConfig`, or a dict adapter name -> `OFTConfig`.
        adapter_name: the name of the adapter to create (default "default").

    Layers supported: nn.Linear, nn.Conv2d, nn.Embedding (as peft), and transformers' Conv1D (which peft
    0.21.2's OFT refuses; its default GPT-2 target `c_attn` is one).
    """

    prefix: str = "oft_"
    tuner_layer_cls = OFTLayer
    # peft's OFT defaults are its LoRA defaults
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.copy()

    def _create_and_replace(self, config: OFTConfig, adapter_name, target, target_name, parent, current_key) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, OFTLayer):
            target.update_layer(adapter_name, config.r, config=config)
            return
        new_module = self._create_new_module(config, adapter_name, target)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: OFTConfig, adapter_name: str, target: nn.Module, **kwargs) -> OFTLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        kind = linear_kind(base, config)
        if kind is not None:
            return Linear(target, adapter_name, config=config, r=config.r, fan_in_fan_out=config.fan_in_fan_out,
                          is_target_conv_1d_layer=kind == "conv1d")
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, config=config, r=config.r)
        if isinstance(base, nn.Embedding):
            return Embedding(target, adapter_name, config=config, r=config.r)
        raise TypeError(
            f"Target module of type {type(base).__name__} is not supported by OFTModel; currently only "
            "`torch.nn.Linear`, transformers' `Conv1D`, `torch.nn.Conv2d` and `torch.nn.Embedding` are supported"
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict, model_to_ckpt=None):
        """peft's check for pre-0.16 OFT checkpoints (`oft_r` weights of another parametrisation), then the
        generic key mapping."""
        from ...checkpoint import _remap_for_load

        if any(".oft_r." in key for key in state_dict):
            raise ValueError(
                "Trying to load old OFT checkpoint, which is no longer supported. Please install PEFT <= v0.15.2 "
                "to load it or train a new OFT adapter."
            )
        return _remap_for_load(model, config, adapter_name, state_dict, model_to_ckpt)
