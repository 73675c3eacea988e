"""`PeftMixedModel`: adapters of different methods (LoRA, LoHa, LoKr, AdaLoRA, OFT) active together, for
inference (peft's `PeftMixedModel`, same API, errors and checkpoint keys).

```py
>>> model = PeftMixedModel.from_pretrained(base_model, "path/to/lora", "lora")
>>> model.load_adapter("path/to/loha", "loha")
>>> model.set_adapter(["lora", "loha"])  # both active
```

Adapters apply in the order their layers were injected (see `fastpeft.tuners.mixed`), not in the order
given to `set_adapter`. As in peft, saving is not supported: save each adapter from a `PeftModel`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Optional, Union

from torch import nn

from .checkpoint import load_adapter_config
from .config import PeftConfig
from .peft_model import PeftModel, _check_adapter_name, _check_config, _peft_type_str
from .training import _enable_input_require_grads
from .tuners.lora.inits import adapter_weights_assigned_later
from .tuners.mixed import COMPATIBLE_TUNER_TYPES, MixedModel

__all__ = ["PeftMixedModel", "COMPATIBLE_TUNER_TYPES"]

# the types peft's PeftMixedModel.from_pretrained accepts before the compatibility check (its
# PEFT_TYPE_TO_MIXED_MODEL_MAPPING, restricted to the methods fastpeft has): IA3 passes this one and is
# then refused as incompatible, OFT is refused here (though get_peft_model(mixed=True) takes it)
_LOADABLE_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "IA3")


def _check_config_compatible(peft_config: PeftConfig) -> None:
    if _peft_type_str(peft_config.peft_type) not in COMPATIBLE_TUNER_TYPES:
        raise ValueError(
            f"The provided `peft_type` '{_peft_type_str(peft_config.peft_type)}' is not compatible with the "
            f"`PeftMixedModel`. Compatible types are: {COMPATIBLE_TUNER_TYPES}"
        )


class PeftMixedModel(nn.Module):
    """A model with adapters of several methods, several of them active at once (inference; peft's
    `PeftMixedModel`). Build it with `get_peft_model(model, config, mixed=True)` or `from_pretrained`.

    Args:
        model: the model to adapt (modified in place).
        peft_config: the first adapter's config (LoRA, LoHa, LoKr, AdaLoRA or OFT).
        adapter_name: its name (default "default").
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _check_config(peft_config)
        _check_adapter_name(adapter_name)
        _check_config_compatible(peft_config)
        gc_enabled = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if gc_enabled is None:
            gc_enabled = getattr(model, "is_gradient_checkpointing", True)
        if gc_enabled and not (
            getattr(model, "is_loaded_in_8bit", False)
            or getattr(model, "is_loaded_in_4bit", False)
            or getattr(model, "is_quantized", False)
        ):
            _enable_input_require_grads(model)
        self.modules_to_save: Optional[set[str]] = None
        self.base_model = MixedModel(model, {adapter_name: peft_config}, adapter_name)
        self._track_modules_to_save(peft_config)
        self.config = getattr(model, "config", {"model_type": "custom"})
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1

    # ---- adapters ----

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def _track_modules_to_save(self, peft_config: PeftConfig) -> None:
        # the wrappers themselves are created by the tuner's inject_adapter
        names = getattr(peft_config, "modules_to_save", None)
        if names is not None:
            self.modules_to_save = set(names) | (self.modules_to_save or set())

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new (untrained) adapter of any compatible method; it is not made active."""
        _check_adapter_name(adapter_name)
        _check_config(peft_config)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        _check_config_compatible(peft_config)
        try:
            self.peft_config[adapter_name] = peft_config
            self.base_model.inject_adapter(self.base_model.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception:  # roll back
            self.peft_config.pop(adapter_name, None)
            raise
        self.base_model._cast_adapter_dtype(adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        self._track_modules_to_save(peft_config)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make `adapter_name` (a name or a list) the active adapter(s), trainable unless `inference_mode`.

        They apply in the order their layers were injected (the order they were loaded), not in this order.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        mismatched = set(names) - set(self.peft_config)
        if mismatched:
            raise ValueError(
                f"Adapter(s) {sorted(mismatched)} not found, available adapters: {sorted(self.peft_config)}"
            )
        self.base_model.set_adapter(names, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        mismatched = set(names) - set(self.peft_config)
        if mismatched:
            raise ValueError(
                f"Adapter(s) {sorted(mismatched)} not found, available adapters: {sorted(self.peft_config)}"
            )
        self.base_model.delete_adapter(names)

    @contextmanager
    def disable_adapter(self):
        """Context manager: run the base model without any adapter."""
        try:
            self.base_model.disable_adapter_layers()
            yield
        finally:
            self.base_model.enable_adapter_layers()

    # ---- merging ----

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Merge the active adapters (or `adapter_names`) of every method into the base weights and return the
        base model without adapter layers."""
        return self.base_model.merge_and_unload(*args, **kwargs)

    def unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Remove all adapter layers without merging; return the original base model."""
        return self.base_model.unload(*args, **kwargs)

    # ---- parameters ----

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return PeftModel.get_nb_trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        PeftModel.print_trainable_parameters(self)

    # ---- forward ----

    def __getattr__(self, name: str) -> Any:
        """Forward missing attributes to the tuner (which forwards them to the wrapped model)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not initialised yet: no recursion
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any):
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        return self.base_model.generate(*args, **kwargs)

    # ---- what peft's PeftMixedModel refuses ----

    def get_layer_status(self):
        raise TypeError(f"get_layer_status is not supported for {type(self).__name__}.")

    def get_model_status(self):
        raise TypeError(f"get_model_status is not supported for {type(self).__name__}.")

    def create_or_update_model_card(self, output_dir: str):
        raise NotImplementedError(f"Model card creation is not supported for {type(self).__name__} (yet).")

    def save_pretrained(self, save_directory: str, safe_serialization: bool = False,
                        selected_adapters: Optional[list[str]] = None, **kwargs: Any):
        raise NotImplementedError(f"Saving is not supported for {type(self).__name__} (yet).")

    # ---- loading ----

    def _check_new_adapter_config(self, peft_config: PeftConfig, is_trainable: bool) -> None:
        return PeftModel._check_new_adapter_config(self, peft_config, is_trainable=is_trainable)

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, *args: Any, **kwargs: Any):
        """Load an adapter saved by fastpeft or peft (a local directory) under `adapter_name`; not made active.

        Takes `PeftModel.load_adapter`'s arguments (is_trainable, torch_device, autocast_adapter_dtype, ...).
        """
        output = PeftModel.load_adapter(self, model_id, adapter_name, *args, **kwargs)
        self.set_adapter(self.active_adapters)  # the new adapter's layers learn which adapters are active
        return output

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        **kwargs: Any) -> "PeftMixedModel":
        """Wrap `model` (modified in place) and load the adapter in the local directory `model_id` as
        `adapter_name` (frozen unless `is_trainable`)."""
        if config is None:
            config = load_adapter_config(model_id, subfolder=kwargs.get("subfolder"))
        elif not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
        if _peft_type_str(config.peft_type) not in _LOADABLE_TYPES:
            raise ValueError(f"Adapter of type {_peft_type_str(config.peft_type)} is not supported for mixed models.")
        if config.is_prompt_learning and is_trainable:
            raise ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
        config.inference_mode = not is_trainable
        with adapter_weights_assigned_later():  # the checkpoint's weights replace the init's
            mixed = cls(model, config, adapter_name)
        mixed.load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)
        return mixed
