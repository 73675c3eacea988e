"""`IA3Model`: injects (IA)^3 layers (peft's IA3Model interface, defaults and state-dict keys)."""
from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from ..base import BaseTuner, BaseTunerLayer, ModulesToSaveWrapper, linear_kind
from .config import IA3Config
from .layer import Conv2d, Conv3d, IA3Layer, Linear

# model_type -> default target_modules / feedforward_modules (peft 0.21.2's values)
TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


class IA3Model(BaseTuner):
    """Creates (IA)^3 adapters (https://huggingface.co/papers/2205.05638) on a model.

    Args:
        model: the base model; modified in place (available as `.model`).
        peft_config: an `IA3Config`, or a dict adapter name -> `IA3Config`.
        adapter_name: the name of the adapter to create (default "default").

    Layers supported: nn.Linear, transformers' Conv1D, nn.Conv2d and nn.Conv3d (as peft).
    """

    prefix: str = "ia3_"
    tuner_layer_cls = IA3Layer
    target_module_mapping = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: IA3Config, model_config: dict) -> IA3Config:
        """Fill target_modules and feedforward_modules from the model type's defaults where they are None."""
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None:
            if model_type not in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
                raise ValueError(
                    "Please specify `target_modules` in `peft_config`: no default is known for model_type "
                    f"{model_type!r}"
                )
            peft_config.target_modules = set(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type])
        if peft_config.feedforward_modules is None:
            if model_type not in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING:
                raise ValueError(
                    f"Please specify `feedforward_modules` in `peft_config`: no default is known for model_type "
                    f"{model_type!r} (pass [] when no targeted module is feedforward)"
                )
            peft_config.feedforward_modules = set(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])
        return peft_config

    @staticmethod
    def _check_target_module_feedforward(config: IA3Config, key: str) -> bool:
        """Whether module `key` is feedforward: full match of a regex, or (peft's rule) a name ending with one of
        the listed names (no `.` boundary)."""
        feedforward = config.feedforward_modules
        if isinstance(feedforward, str):
            return bool(re.fullmatch(feedforward, key))
        return any(key.endswith(name) for name in feedforward or ())

    def _create_and_replace(self, config: IA3Config, adapter_name, target, target_name, parent, current_key) -> None:
        is_feedforward = self._check_target_module_feedforward(config, current_key)
        if isinstance(target, IA3Layer):
            if target.is_feedforward != is_feedforward:
                warnings.warn(
                    f"{current_key}: adapter {adapter_name!r} says the layer is {'' if is_feedforward else 'not '}"
                    f"feedforward but its first adapter made it {'' if target.is_feedforward else 'not '}"
                    "feedforward; the layer keeps that (as peft)"
                )
            target.update_layer(adapter_name, config)
            return
        new_module = self._create_new_module(config, adapter_name, target, is_feedforward=is_feedforward)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: IA3Config, adapter_name: str, target: nn.Module, is_feedforward: bool = False,
                           **kwargs) -> IA3Layer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, config, is_feedforward=is_feedforward)
        if isinstance(base, nn.Conv3d):
            return Conv3d(target, adapter_name, config, is_feedforward=is_feedforward)
        kind = linear_kind(base, config)
        if kind is not None:
            return Linear(target, adapter_name, config, is_feedforward=is_feedforward,
                          is_target_conv_1d_layer=kind == "conv1d")
        raise ValueError(
            f"Target module {target} is not supported. Currently, only `torch.nn.Linear`, transformers' `Conv1D`, "
            "`torch.nn.Conv2d` and `torch.nn.Conv3d` are supported."
        )

    # ---- weighted combination (peft's add_weighted_adapter) ----

    def _check_add_weighted_adapter(self, adapters: list[str]):
        for adapter in adapters:
            if adapter not in self.peft_config:
                raise ValueError(f"Adapter {adapter} does not exist")
        wrappers = [m for m in self.modules() if isinstance(m, ModulesToSaveWrapper)]
        if any(sum(a in w.modules_to_save for a in adapters) > 1 for w in wrappers):
            raise ValueError("Cannot add weighted adapters targeting the same module with modules_to_save.")
        configs = [self.peft_config[a] for a in adapters]
        target_types = {type(c.target_modules) for c in configs}
        feedforward_types = {type(c.feedforward_modules) for c in configs}
        if len(target_types) > 1 or len(feedforward_types) > 1:
            raise ValueError("All adapter configs should have the same type for target and feedforward modules.")
        if str in target_types:
            targets = "|".join(f"({c.target_modules})" for c in configs)
        else:
            targets = set.union(*(set(c.target_modules) for c in configs))
        if str in feedforward_types:
            feedforward = "|".join(f"({c.feedforward_modules})" for c in configs)
        else:
            feedforward = set.union(*(set(c.feedforward_modules) for c in configs))
        return targets, feedforward

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add adapter `adapter_name` whose vectors are sum_i weights[i] * (vector of adapters[i]) (a layer that
        an adapter lacks gets nothing from it). Does nothing when `adapter_name` exists (as peft). The new
        adapter is not active and not trainable."""
        import dataclasses

        if adapter_name in self.peft_config:
            return
        targets, feedforward = self._check_add_weighted_adapter(adapters)
        self.peft_config[adapter_name] = dataclasses.replace(
            self.peft_config[adapters[0]], target_modules=targets, feedforward_modules=feedforward
        )
        self.inject_adapter(self.model, adapter_name)
        for layer in self._tuner_layers():
            if not isinstance(layer, IA3Layer) or adapter_name not in layer.ia3_l:
                continue
            new = layer.ia3_l[adapter_name]
            new.requires_grad_(False)
            with torch.no_grad():
                new.zero_()
                for adapter, weight in zip(adapters, weights):
                    if adapter in layer.ia3_l:
                        new += layer.ia3_l[adapter].data * weight
