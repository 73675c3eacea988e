"""`AdaptionPromptModel`: LLaMA-Adapter (https://huggingface.co/papers/2303.16199) with peft's interface and
checkpoint format.

The top `adapter_layers` attention modules (those named `target_modules` in their parent, in model order) are
wrapped in `AdaptedAttention`. Unlike peft, which swaps whole wrapper modules in and out of the model to switch
adapters, every adapter lives in the same wrapper (keyed by adapter name, as the other tuners do), so switching,
disabling and saving an inactive adapter need no module surgery. Only one adapter is active at a time (as in peft).

Checkpoint keys are peft's, without adapter name: `base_model.model.model.layers.<i>.self_attn.adaption_prompt` and
`....adaption_gate`; tensors are in the attention's dtype (peft does not upcast these adapters).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from ..base import BaseTuner
from .config import TRANSFORMERS_MODEL_CONFIG, AdaptionPromptConfig, prepare_config
from .layer import AdaptedAttention

_ADAPTER_PARAMS = ("adaption_prompt", "adaption_gate")
_PEFT_PREFIX = "base_model.model."


def _not_mergeable() -> ValueError:
    return ValueError(
        "Adaption prompts (LLaMA-Adapter) cannot be merged into the base weights: they add attention to learned "
        "prompt tokens, not a weight delta. Keep the adapter for inference, or call unload() to get the original "
        "model back."
    )


class AdaptionPromptModel(BaseTuner):
    """Adds adaption prompts to the top attention layers of a Llama / Mistral / GPT-2 model (peft's
    `AdaptionPromptModel`).

    Args:
        model: the transformers model; modified in place (available as `.model`).
        configs: adapter name -> `AdaptionPromptConfig` (or one config).
        adapter_name: the adapter to create first; it becomes the active adapter.
    """

    prefix = "adaption_"
    tuner_layer_cls = AdaptedAttention
    target_module_mapping = {k: v.target_modules for k, v in TRANSFORMERS_MODEL_CONFIG.items()}

    # ---- injection -------------------------------------------------------------------------------------------------

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, AdaptedAttention):
            target.update_layer(adapter_name, peft_config.adapter_len)
            return
        new = AdaptedAttention(target, self.model.config.model_type)
        new.update_layer(adapter_name, peft_config.adapter_len)
        setattr(parent, target_name, new)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """Wrap the top `adapter_layers` attention modules (or add this adapter to their wrappers).

        Adding an adapter does not change which adapter is active. (`low_cpu_mem_usage`, `state_dict`: accepted for
        the tuners' signature; the adapted layers are always the config's.)
        """
        config = self.peft_config[adapter_name]
        if not isinstance(config, AdaptionPromptConfig):
            raise TypeError(f"AdaptionPromptModel needs an AdaptionPromptConfig, got {type(config).__name__}")
        config = prepare_config(config, model)
        first = not any(isinstance(m, AdaptedAttention) for m in model.modules())

        suffix = f".{config.target_modules}"
        keys = [name for name, _ in model.named_modules() if name.endswith(suffix)]
        # do not look inside an existing wrapper (its base_layer is the same attention module)
        keys = [k for k in keys if not k.endswith(f".base_layer{suffix}")]
        if not keys:
            raise ValueError(
                f"target_modules {config.target_modules!r}: no module of the {model.config.model_type!r} model is "
                "named like that; it must be the attribute name of the attention modules in their parent"
            )
        if len(keys) < config.adapter_layers:
            raise ValueError(
                f"Config specifies more adapter layers '{config.adapter_layers}' than the model has '{len(keys)}'."
            )
        keys = keys[-config.adapter_layers:]
        disabled = any(layer.disable_adapters for layer in self._tuner_layers())
        for key in keys:
            parent_name, _, target_name = key.rpartition(".")
            parent = model.get_submodule(parent_name)
            self._create_and_replace(config, adapter_name, getattr(parent, target_name), target_name, parent, key)
            if key not in self.targeted_module_names:
                self.targeted_module_names.append(key)

        if first:
            # as peft: everything but the adaption prompts and gates is frozen
            for name, p in model.named_parameters():
                parts = name.split(".")
                if len(parts) < 2 or parts[-2] not in _ADAPTER_PARAMS:
                    p.requires_grad = False
        active = self.active_adapter if isinstance(self.active_adapter, str) else (self.active_adapter or [None])[0]
        if active is None or active not in self.peft_config:  # no adapter left (all deleted): the new one is active
            active = self.active_adapter = adapter_name
        for layer in self._tuner_layers():
            layer.set_adapter(active)
        if active is not None and self.peft_config[active].inference_mode:
            self.set_requires_grad(active, False)
        if adapter_name != active:
            self.set_requires_grad(adapter_name, False)  # inactive adapters are frozen until set_adapter
        if disabled:  # added inside disable_adapter(): stays disabled like the others until re-enabled
            for layer in self._tuner_layers():
                layer.enable_adapters(False)

    # ---- adapter management -----------------------------------------------------------------------------------------

    def _check_new_adapter_config(self, config) -> None:
        pass

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter (only one can be active); it is trainable unless
        `inference_mode`."""
        if isinstance(adapter_name, (list, tuple)):
            if len(adapter_name) != 1:
                raise ValueError(
                    f"AdaptionPromptModel supports exactly one active adapter, got {list(adapter_name)}"
                )
            adapter_name = adapter_name[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' does not exist.")
        for layer in self._tuner_layers():
            layer.set_adapter(adapter_name, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; if it was active, the first remaining one (in order of creation) becomes active. Layers
        left without adapters get their original attention module back."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        was_active = adapter_name in self.active_adapters
        del self.peft_config[adapter_name]
        for name, layer in list(self.model.named_modules()):
            if not isinstance(layer, AdaptedAttention):
                continue
            for attr in AdaptedAttention.adapter_layer_names + AdaptedAttention.other_param_names:
                container = getattr(layer, attr)
                if adapter_name in container:
                    del container[adapter_name]
            layer.__dict__.get("_prompt_kv_cache", {}).pop(adapter_name, None)
            if not layer.adaption_prompt:
                parent_name, _, target_name = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), target_name, layer.get_base_layer())
                if name in self.targeted_module_names:
                    self.targeted_module_names.remove(name)
        if was_active:
            remaining = list(self.peft_config)
            if remaining:
                self.set_adapter(remaining[0])
            else:
                self.active_adapter = []
                for layer in self._tuner_layers():
                    layer.set_adapter([])

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """No-op: as in peft, the prompts and gates keep the attention's dtype (bf16 in a bf16 model)."""

    # ---- merging: not possible -------------------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        raise _not_mergeable()

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise _not_mergeable()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None, **kwargs: Any) -> nn.Module:
        raise _not_mergeable()

    def unmerge_adapter(self) -> None:
        warnings.warn("Adaption prompts are never merged. Nothing to do.")

    # ---- checkpoint hooks (see fastpeft.checkpoint) -------------------------------------------------------------

    @staticmethod
    def _adapter_param(key: str, adapter_name: str) -> bool:
        return any(key.endswith(f".{p}.{adapter_name}") for p in _ADAPTER_PARAMS)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = {k: v for k, v in state_dict.items() if cls._adapter_param(k, adapter_name)}
        if not out:  # a state dict in peft's layout (no adapter name in the keys)
            out = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] in _ADAPTER_PARAMS}
        return out

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        if cls._adapter_param(key, adapter_name):
            return key[: -len(adapter_name) - 1]
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict, model_to_ckpt=None):
        model_keys = set(model.state_dict())
        if model_to_ckpt is not None:
            for k in model_keys:
                if cls._adapter_param(k, adapter_name):
                    model_to_ckpt[k] = k[: -len(adapter_name) - 1]
        out = {}
        for key, value in state_dict.items():
            if key.rsplit(".", 1)[-1] not in _ADAPTER_PARAMS:
                out[key] = value
                continue
            model_key = f"{key}.{adapter_name}"
            if model_key not in model_keys and key.startswith(_PEFT_PREFIX):
                # tuner used without a PeftModel: the checkpoint still carries peft's prefix
                model_key = model_key[len(_PEFT_PREFIX):] if model_key[len(_PEFT_PREFIX):] in model_keys else model_key
            out[model_key] = value
        return out
