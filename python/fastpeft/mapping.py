"""peft's public registries and module-level helpers, over fastpeft's own registries.

- ``PEFT_TYPE_TO_CONFIG_MAPPING``: ``fastpeft.config.PEFT_TYPE_TO_CONFIG`` (every method's config registered).
- ``PEFT_TYPE_TO_TUNER_MAPPING``: ``fastpeft.tuners.PEFT_TYPE_TO_TUNER_MAPPING``.
- ``MODEL_TYPE_TO_PEFT_MODEL_MAPPING``: ``fastpeft.peft_model.MODEL_TYPE_TO_PEFT_MODEL_MAPPING``.
- ``PEFT_TYPE_TO_MIXED_MODEL_MAPPING``: the tuners ``PeftMixedModel.from_pretrained`` loads.
- ``get_peft_config``, ``inject_adapter_in_model`` (peft's ``mapping``), ``cast_mixed_precision_params``,
  ``get_base_model_state_dict`` / ``set_base_model_state_dict`` (peft's ``utils``).

The mappings are the registries themselves (same objects), not copies.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Any, Optional

import torch
from torch import nn

from . import config as _config
from .config import PeftConfig, PeftType
from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, _call
from .tuners import PEFT_TYPE_TO_TUNER_MAPPING

__all__ = [
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "get_peft_config",
    "inject_adapter_in_model",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
]

# the config registry is filled as config modules are imported: import them all so that it is complete
for _peft_type in list(_config._CONFIG_MODULES):
    try:
        _config._config_class(_peft_type)
    except Exception:  # a method whose module fails to import: left out here, its own error shows when it is used
        pass

PEFT_TYPE_TO_CONFIG_MAPPING: dict[PeftType, type[PeftConfig]] = _config.PEFT_TYPE_TO_CONFIG


def _mixed_model_mapping() -> dict:
    from .mixed_model import _LOADABLE_TYPES

    return {PeftType(t): PEFT_TYPE_TO_TUNER_MAPPING[t] for t in _LOADABLE_TYPES if t in PEFT_TYPE_TO_TUNER_MAPPING}


# the methods PeftMixedModel.from_pretrained loads (peft's, restricted to fastpeft's methods): a view of the tuners
PEFT_TYPE_TO_MIXED_MODEL_MAPPING = _mixed_model_mapping()


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config object described by ``config_dict`` (its ``peft_type`` selects the class), as peft's.

    An unknown ``peft_type`` raises ``KeyError`` (peft's behaviour).
    """
    return PEFT_TYPE_TO_CONFIG_MAPPING[config_dict["peft_type"]](**config_dict)


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> nn.Module:
    """Create the adapter layers of ``peft_config`` and put them into ``model`` in place; return ``model``.

    No ``PeftModel`` is made (the integration point of transformers and diffusers). Prompt learning and adaption
    prompts are refused, as in peft. With ``state_dict``, the layers adapted are those its keys name (the values are
    not used).
    """
    if peft_config.is_prompt_learning or peft_config.is_adaption_prompt:
        raise ValueError("`create_and_replace` does not support prompt learning, adaption prompt and shadow yet.")
    peft_type = peft_config.peft_type
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(
            f"`inject_adapter_in_model` does not support {peft_type} yet. Please use `get_peft_model`."
        )
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
    if getattr(tuner_cls, "uses_shared_state", False):
        raise ValueError(
            f"`inject_adapter_in_model` does not support {peft_type} because it uses shared state "
            "stored on the tuner. Please use `get_peft_model` instead."
        )
    existing = getattr(model, "peft_config", None)  # configs of adapters injected before (kept, as in peft)
    tuner = _call(
        tuner_cls, model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
        state_dict=state_dict,
    )
    if isinstance(existing, dict) and existing is not tuner.model.peft_config:
        existing.update(tuner.model.peft_config)
        tuner.model.peft_config = existing
    return tuner.model


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen parameters of ``model`` to ``dtype`` (float16 / bfloat16) and the trainable ones to float32.

    For automatic mixed-precision training: the frozen base in half precision saves memory, the trainable adapter
    weights stay in full precision.
    """
    for p in model.parameters():
        p.data = p.to(dtype) if not p.requires_grad else p.to(torch.float32)


# ---- the base model's state dict under its original keys ---------------------------------------------------------


def _adapter_key_prefixes(model) -> set[str]:
    """State-dict key prefixes (under the adapted model) that belong to adapters, not to the base model."""
    from .tuners.base import AuxiliaryTrainingWrapper, BaseTunerLayer

    prefixes: set[str] = set()

    def add(module_name: str, attr: str) -> None:
        prefixes.add(f"{module_name}.{attr}" if module_name else attr)

    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            load_map = getattr(module, "adapter_state_dict_load_map", None)
            for adapter_name in sorted(getattr(module, "_adapters", ())):
                if callable(load_map):
                    for key in load_map(adapter_name).values():
                        add(module_name, key)
                elif adapter_name in getattr(module, "modules_to_save", {}):
                    add(module_name, f"modules_to_save.{adapter_name}")
            for attr in getattr(module, "other_param_names", ()):
                add(module_name, attr)
        elif isinstance(module, BaseTunerLayer):
            # everything on an adapter layer is the adapter's except the wrapped base layer (children, and direct
            # parameters / buffers, e.g. DoRA's magnitude)
            names = [n for n, _ in module.named_children()]
            names += [n for n, _ in module.named_parameters(recurse=False)]
            names += [n for n, _ in module.named_buffers(recurse=False)]
            for attr in names:
                if attr != "base_layer":
                    add(module_name, attr)
    return prefixes


def _is_adapter_key(key: str, prefixes: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _original_key(model, peft_key: str) -> str:
    """``peft_key`` without the infixes fastpeft inserted (``base_layer`` in adapter layers, ``original_module`` in
    modules_to_save wrappers), resolved against the live module tree so that a module genuinely named so is kept."""
    from .tuners.base import AuxiliaryTrainingWrapper, BaseTunerLayer

    parts: list[str] = []
    current: Optional[nn.Module] = model.base_model.model
    for part in peft_key.split("."):
        if current is None:
            parts.append(part)
            continue
        child = getattr(current, part, None)
        if not isinstance(child, nn.Module):
            parts.append(part)  # a parameter or buffer name
            current = None
        elif part == "base_layer" and isinstance(current, BaseTunerLayer):
            current = child
        elif part == "original_module" and isinstance(current, AuxiliaryTrainingWrapper):
            current = child
        elif isinstance(child, BaseTunerLayer) and isinstance(current, AuxiliaryTrainingWrapper):
            current = child  # a tuner layer inside a wrapper
        else:
            parts.append(part)
            current = child
    return ".".join(parts)


def get_base_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original (pre-PEFT) keys, adapter tensors left out (peft's).

    Args:
        model: a ``PeftModel``.
    """
    if model._is_prompt_learning:  # the base model is not modified
        return dict(model.base_model.state_dict())
    prefixes = _adapter_key_prefixes(model)
    return {
        _original_key(model, key): value
        for key, value in model.base_model.model.state_dict().items()
        if not _is_adapter_key(key, prefixes)
    }


_IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def set_base_model_state_dict(model, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a state dict keyed by the original (pre-PEFT) names into the base model of ``model`` (peft's).

    The counterpart of :func:`get_base_model_state_dict`. With ``strict``, missing or unexpected keys raise
    ``RuntimeError``. Returns ``(missing_keys, unexpected_keys)`` as a named tuple.
    """
    if model._is_prompt_learning:
        return model.base_model.load_state_dict(state_dict, strict=strict)
    prefixes = _adapter_key_prefixes(model)
    to_peft_key = {
        _original_key(model, key): key
        for key in model.base_model.model.state_dict()
        if not _is_adapter_key(key, prefixes)
    }
    peft_state_dict: dict[str, torch.Tensor] = {}
    unexpected_keys: list[str] = []
    for key, value in state_dict.items():
        if key in to_peft_key:
            peft_state_dict[to_peft_key[key]] = value
        else:
            unexpected_keys.append(key)
    missing_keys = [k for k in to_peft_key if k not in state_dict]
    if strict and (missing_keys or unexpected_keys):
        msgs = []
        if missing_keys:
            msgs.append(f"Missing key(s) in state_dict: {missing_keys}")
        if unexpected_keys:
            msgs.append(f"Unexpected key(s) in state_dict: {unexpected_keys}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(msgs))
    model.base_model.model.load_state_dict(peft_state_dict, strict=False)
    return _IncompatibleKeys(missing_keys=missing_keys, unexpected_keys=unexpected_keys)
