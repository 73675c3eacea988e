"""`MixedModel`: the tuner of `PeftMixedModel`, adapters of different methods in one model (peft's
`tuners/mixed`).

Each adapter is injected by its own method's `_create_and_replace`. A module already adapted by another
method is *nested*, as in peft: the new method's layer wraps the existing adapter layer as its `base_layer`
(`q_proj` = LoRA layer, `q_proj.base_layer` = LoHa layer, `q_proj.base_layer.base_layer` = the nn.Linear).
A module already adapted by the same method (the outermost layer) just gets one more adapter. So the
state-dict keys are peft's, and adapters apply in the order the layers were created (innermost first),
whatever order `set_adapter` lists them in.

Compatible methods are peft's `COMPATIBLE_TUNER_TYPES` that fastpeft has: LoRA, LoHa, LoKr, AdaLoRA,
OFT (peft's SHiRA does not exist here). IA³ is not one of them in peft 0.21.2, so it is refused here too.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from torch import nn

from ..config import PeftConfig
from .base import BaseTuner, BaseTunerLayer
from .lora.model import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

# peft's COMPATIBLE_TUNER_TYPES, in its order, without SHIRA (no such method in fastpeft)
COMPATIBLE_TUNER_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "OFT")


def _peft_type(config) -> str:
    return getattr(config.peft_type, "value", config.peft_type)


def _method_tuner(config: PeftConfig) -> type:
    """The single-method tuner class whose `_create_and_replace` injects `config`'s adapter."""
    from . import AdaLoraModel, LoHaModel, LoKrModel, LoraModel, OFTModel

    mapping = {"LORA": LoraModel, "LOHA": LoHaModel, "LOKR": LoKrModel, "ADALORA": AdaLoraModel, "OFT": OFTModel}
    tuner = mapping.get(_peft_type(config))
    if tuner is None:
        raise TypeError(
            f"Unsupported config type {type(config).__name__} ({_peft_type(config)}), should be one of "
            f"{COMPATIBLE_TUNER_TYPES}."
        )
    return tuner


class _AsMethod:
    """The mixed tuner seen as one method's tuner, for that method's `_create_and_replace`: the method's own
    layer class and module factory, the mixed tuner's state (active adapters, module replacement)."""

    def __init__(self, mixed: "MixedModel", method: type) -> None:
        self._mixed = mixed
        self._method = method
        self.prefix = method.prefix
        self.tuner_layer_cls = method.tuner_layer_cls

    @property
    def active_adapters(self) -> list[str]:
        return self._mixed.active_adapters

    def _create_new_module(self, config, adapter_name, target, **kwargs):
        return self._method._create_new_module(config, adapter_name, target, **kwargs)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        self._mixed._replace_module(parent, child_name, new_module, child)

    def __getattr__(self, name: str):
        return getattr(self._mixed, name)


class MixedModel(BaseTuner):
    """Injects adapters of several methods into one model (peft's `MixedModel`; use
    `get_peft_model(..., mixed=True)` or `PeftMixedModel`, not this class directly)."""

    prefix: str = ""  # no single prefix: every method keeps its own (lora_, hada_, lokr_, oft_)
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        if _peft_type(config) not in COMPATIBLE_TUNER_TYPES:
            raise TypeError(
                f"{type(self).__name__} only supports {COMPATIBLE_TUNER_TYPES} configs, but got {type(config)}."
            )
        super()._check_new_adapter_config(config)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        method = _method_tuner(config)
        method._create_and_replace(_AsMethod(self, method), config, adapter_name, target, target_name, parent,
                                   current_key)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put `new_module` in place of `child`; its own adapter weights (not its base layer, which may be
        another method's layer) go to the base weight's device."""
        setattr(parent, child_name, new_module)
        base = child.get_base_layer() if isinstance(child, BaseTunerLayer) else child
        weight = getattr(base, "weight", None)
        if weight is None or weight.device.type == "meta":
            return
        for name, module in new_module.named_children():
            if name != "base_layer" and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(weight.device)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"Weighted adapters are not supported for {type(self).__name__} (yet).")

    def delete_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Delete adapter(s); the active adapters left are those still active in some layer (adapters of
        different methods usually live in different layers)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        mismatched = set(names) - set(self.peft_config)
        if mismatched:
            raise ValueError(
                f"Adapter(s) {sorted(mismatched)} not found, available adapters: {sorted(self.peft_config)}"
            )
        merged = sorted({n for layer in self._tuner_layers() for n in layer.merged_adapters if n in names})
        if merged:
            raise ValueError(f"Cannot delete adapter(s) {merged} while they are merged. Please unmerge them first.")
        previous = list(self.active_adapters)
        for name in names:
            del self.peft_config[name]
            still_active: set[str] = set()
            for layer in self._tuner_layers():
                layer.delete_adapter(name)
                still_active.update(layer.active_adapters)
            new_active = [a for a in previous if a in still_active] + sorted(still_active - set(previous))
            for wrapper in self._aux_wrappers():
                wrapper.delete_adapter(name, new_active_adapters=new_active)
            self.active_adapter = new_active
            previous = new_active

    def _merge_layer(self, layer, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
        """Merge every layer of the nest under `layer`, in peft's order: the inner layers from the outside in,
        then the outermost."""
        nest = [layer]
        while isinstance(nest[-1].base_layer, BaseTunerLayer):
            nest.append(nest[-1].base_layer)
        for inner in nest[1:] + nest[:1]:
            inner.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def generate(self, *args: Any, **kwargs: Any):
        return self.model.generate(*args, **kwargs)

