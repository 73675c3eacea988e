"""Adapter checkpoints: peft's state-dict key mapping, safetensors I/O, atomic writes.

The on-disk format is Hugging Face PEFT's, byte for byte where it matters:

* ``adapter_config.json``: the config's ``to_dict()`` (written by ``PeftConfig.save_pretrained``).
* ``adapter_model.safetensors``: the adapter's tensors with the adapter name removed from every key
  (``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``), DoRA magnitudes saved as
  ``...lora_magnitude_vector`` (no ``.weight``), ``modules_to_save`` copies saved under the wrapped
  module's original key, metadata ``{"format": "pt"}``.

Only safetensors is read or written. A directory holding only ``adapter_model.bin`` (a pickle) is
refused with a message that says how to convert it; nothing here calls ``torch.load``.

Which entries of a model's state dict belong to an adapter is decided structurally, as peft does:
everything on a tuner layer except its ``base_layer``, plus the adapter's copy inside each
``ModulesToSaveWrapper``, plus biases (``bias="all"`` / ``"<method>_only"``) and embedding layers
when requested. A tuner class may customise selection and key mapping by defining peft's hooks
``_get_adapter_state_dict``, ``_remove_adapter_name_from_key`` and
``_remap_adapter_state_dict_for_load`` as classmethods; otherwise the generic mapping below is used.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import namedtuple
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"  # peft's pickle format: recognised only to refuse it
EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
_PEFT_PREFIX = "base_model.model."

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "AdapterCheckpointError",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "load_peft_weights",
    "load_adapter_config_dict",
    "load_adapter_config",
    "save_safetensors_atomic",
]


class AdapterCheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model (missing, unexpected or mis-shaped keys)."""


# ---------------------------------------------------------------------------------------------------------------------
# structural helpers (duck-typed so they work with any tuner that follows peft's module layout)
# ---------------------------------------------------------------------------------------------------------------------


_CLS_CACHE: dict[str, type] = {}


def _tuners_base_class(key: str, names: tuple[str, ...]) -> Optional[type]:
    """The first of the classes `names` that the tuners' base module defines (cached under `key`), or None."""
    if key in _CLS_CACHE:
        return _CLS_CACHE[key]
    for modname in ("fastpeft.tuners.base", "fastpeft.tuners.tuners_utils"):
        try:
            mod = __import__(modname, fromlist=list(names))
        except ImportError:
            continue
        for name in names:
            cls = getattr(mod, name, None)
            if cls is not None:
                _CLS_CACHE[key] = cls
                return cls
    return None


def _base_tuner_layer_cls():
    return _tuners_base_class("layer", ("BaseTunerLayer",))


def _aux_wrapper_cls():
    return _tuners_base_class("aux", ("AuxiliaryTrainingWrapper", "ModulesToSaveWrapper"))


def is_aux_wrapper(module: nn.Module) -> bool:
    """A ModulesToSaveWrapper (or another auxiliary training wrapper such as trainable tokens)."""
    cls = _aux_wrapper_cls()
    if cls is not None and isinstance(module, cls):
        return True
    return isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and isinstance(
        getattr(module, "original_module", None), nn.Module
    )


def is_tuner_layer(module: nn.Module) -> bool:
    """A layer injected by a tuner: wraps the original module as ``base_layer``."""
    if is_aux_wrapper(module):
        return False
    cls = _base_tuner_layer_cls()
    if cls is not None and isinstance(module, cls):
        return True
    return isinstance(getattr(module, "_modules", {}).get("base_layer", None), nn.Module)


def _is_key_under_prefixes(key: str, prefixes: set[str]) -> bool:
    # O(depth of key): check every "."-boundary prefix of the key
    if key in prefixes:
        return True
    idx = key.find(".")
    while idx != -1:
        if key[:idx] in prefixes:
            return True
        idx = key.find(".", idx + 1)
    return False


def _strip_fsdp(name: str) -> str:
    return name.removeprefix("_fsdp_wrapped_module.")


def _tuner_key_prefixes(model: nn.Module, adapter_name: Optional[str] = None) -> set[str]:
    """State-dict key prefixes of everything that belongs to the PEFT method (not to the base model).

    Everything on a tuner layer except ``base_layer`` belongs to the method. Layers inside auxiliary
    wrappers are handled by the wrappers. If ``adapter_name`` is given, adapter-keyed containers
    (ModuleDict/ParameterDict/BufferDict) are restricted to that adapter's entry.
    """
    tuner_classes = tuple(_tuner_classes())
    prefixes: set[str] = set()
    aux_names: set[str] = set()
    for module_name, module in model.named_modules():
        module_name = _strip_fsdp(module_name)
        if is_aux_wrapper(module):
            aux_names.add(module_name)
            continue
        is_tuner_model = bool(tuner_classes) and isinstance(module, tuner_classes)
        if not is_tuner_model and not (is_tuner_layer(module) and not _is_key_under_prefixes(module_name, aux_names)):
            continue
        attr_names = (
            [n for n, _ in module.named_children()]
            + [n for n, _ in module.named_parameters(recurse=False)]
            + [n for n, _ in module.named_buffers(recurse=False)]
        )
        for attr in attr_names:
            if attr in ("base_layer", "model", "lora_model"):  # lora_model: the LoraModel inside X-LoRA's XLoraModel
                continue
            prefix = f"{module_name}.{attr}" if module_name else attr
            child = getattr(module, attr, None)
            is_container = isinstance(child, (nn.ModuleDict, nn.ParameterDict)) or type(child).__name__ == "BufferDict"
            if adapter_name is not None and is_container:
                if adapter_name in child:
                    prefixes.add(f"{prefix}.{adapter_name}")
            else:
                prefixes.add(prefix)
    return prefixes


def _tuner_classes():
    try:
        from .peft_model import _tuner_mapping
    except ImportError:
        return []
    try:
        return list(set(_tuner_mapping().values()))
    except Exception:  # a tuner module that fails to import must not break saving
        return []


def _tuner_cls_for(peft_type):
    try:
        from .peft_model import _tuner_mapping

        return _tuner_mapping().get(_peft_type_str(peft_type))
    except Exception:
        return None


def _peft_type_str(peft_type) -> str:
    return getattr(peft_type, "value", peft_type)


def remove_adapter_name_from_key(key: str, adapter_name: str) -> str:
    """``a.lora_A.default.weight`` -> ``a.lora_A.weight``; ``a.lora_embedding_A.default`` -> ``a.lora_embedding_A``.

    Only the adapter name in the last or second-to-last position is removed, so a module that happens to be
    called like the adapter is left alone.
    """
    if "." not in key:
        return key
    suffix_name = f".{adapter_name}"
    if key.endswith(suffix_name):  # an nn.Parameter in a ParameterDict
        return key[: -len(suffix_name)]
    head, _, last = key.rpartition(".")  # a tensor of a module in a ModuleDict
    if head.endswith(suffix_name):
        head = head[: -len(suffix_name)]
    return f"{head}.{last}"


def _filter_out_other_adapters(state_dict: dict, unwanted: list[str]) -> dict:
    return {
        k: v
        for k, v in state_dict.items()
        if not any(f".{name}." in k or k.endswith(f".{name}") for name in unwanted)
    }


def _learnable_bias_state_dict(model: nn.Module, state_dict: dict, config) -> dict:
    bias = getattr(config, "bias", "none") or "none"
    if bias == "none":
        return {}
    if bias == "all":
        return {k: v for k, v in state_dict.items() if k == "bias" or k.endswith(".bias")}
    out = {}
    if bias.endswith("_only"):
        for module_name, module in model.named_modules():
            module_name = _strip_fsdp(module_name)
            if not is_tuner_layer(module):
                continue
            bias_name = f"{module_name}.base_layer.bias" if module_name else "base_layer.bias"
            if bias_name in state_dict:
                out[bias_name] = state_dict[bias_name]
    return out


def _aux_adapter_state_dict(module: nn.Module, adapter_name: str, module_state_dict: dict) -> dict:
    """Checkpoint entries of one auxiliary wrapper, keyed relative to the wrapper (no adapter name)."""
    if hasattr(module, "adapter_state_dict") and callable(module.adapter_state_dict):
        return dict(module.adapter_state_dict(adapter_name, module_state_dict))
    mts = module.modules_to_save
    if adapter_name not in mts:
        return {}
    out = {}
    for k in mts[adapter_name].state_dict():
        full = f"modules_to_save.{adapter_name}.{k}"
        if full in module_state_dict:
            out[k] = module_state_dict[full]
    return out


def _aux_load_map(module: nn.Module, adapter_name: str) -> dict[str, str]:
    """checkpoint key (relative to the wrapper) -> model key (relative to the wrapper)."""
    if hasattr(module, "adapter_state_dict_load_map") and callable(module.adapter_state_dict_load_map):
        return dict(module.adapter_state_dict_load_map(adapter_name))
    mts = module.modules_to_save
    if adapter_name not in mts:
        return {}
    return {k: f"modules_to_save.{adapter_name}.{k}" for k in mts[adapter_name].state_dict()}


def _get_base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _embedding_is_targeted(model, config) -> bool:
    target_modules = getattr(config, "target_modules", None)
    if not target_modules:
        return False
    if isinstance(target_modules, str):
        if target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            return False
        base = _get_base_model(model)
        return any(
            re.fullmatch(target_modules, name)
            for name, _ in base.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES)
        )
    return any(name in target_modules for name in EMBEDDING_LAYER_NAMES)


def _vocab_was_resized(model, config) -> bool:
    """peft's ``save_embedding_layers="auto"`` check, offline: compare with a local base config only."""
    model_config = getattr(model, "config", None)
    vocab_size = getattr(model_config, "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None)
    if not vocab_size or not model_id:
        return False
    local_config = os.path.join(str(model_id), "config.json")
    if not os.path.isfile(local_config):
        # peft would ask the Hub here; fastpeft never goes online, so assume the vocabulary was not modified.
        return False
    try:
        with open(local_config, encoding="utf-8") as f:
            base_vocab = json.load(f).get("vocab_size")
    except (OSError, ValueError):
        return False
    return base_vocab is not None and base_vocab != vocab_size


def _embedding_layer_name(model, layer, embedding_is_targeted: bool) -> Optional[str]:
    for name, module in model.named_modules():
        if (not embedding_is_targeted and module is layer) or module is getattr(layer, "base_layer", None):
            return name
    return None


def _has_valid_embedding_base_layer(layer) -> bool:
    return hasattr(layer, "base_layer") and isinstance(layer.base_layer, (nn.Linear, nn.Embedding))


# ---------------------------------------------------------------------------------------------------------------------
# state dict <-> checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def _check_adapter_name(model, adapter_name: str):
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict):
        raise TypeError(
            f"expected a PEFT model (an object with a `peft_config` dict), got {type(model).__name__}"
        )
    if adapter_name not in peft_config:
        raise ValueError(
            f"unknown adapter name {adapter_name!r}; this model has adapter(s) {sorted(peft_config)}"
        )
    return peft_config[adapter_name]


def get_peft_model_state_dict(
    model,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: Union[bool, Literal["auto"]] = "auto",
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one adapter, keyed as in peft's ``adapter_model.safetensors``.

    Args:
        model: a PEFT model (``PeftModel``, or a model whose adapters were injected and that has ``peft_config``).
        state_dict: the model's state dict; ``model.state_dict()`` if omitted.
        adapter_name: the adapter to export; its name is removed from the keys.
        unwrap_compiled: use ``model._orig_mod`` if the model was ``torch.compile``d.
        save_embedding_layers: ``True`` also saves the input/output embedding layers; ``"auto"`` does so when an
            embedding layer is targeted or (for a local base model) the vocabulary was resized.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    config = _check_adapter_name(model, adapter_name)
    if state_dict is None:
        state_dict = model.state_dict()

    unwanted = [name for name in model.peft_config if name != adapter_name]
    is_prompt_learning = bool(getattr(config, "is_prompt_learning", False))
    if not is_prompt_learning:
        filtered = _filter_out_other_adapters(state_dict, unwanted)
        if filtered:
            state_dict = filtered

    tuner_cls = _tuner_cls_for(config.peft_type)
    hook = getattr(tuner_cls, "_get_adapter_state_dict", None) if tuner_cls is not None else None
    if hook is not None:
        to_return = dict(
            hook(
                model=model,
                config=config,
                adapter_name=adapter_name,
                state_dict=state_dict,
                unwanted_adapter_names=unwanted,
            )
        )
    elif is_prompt_learning:
        if getattr(config, "inference_mode", False):
            emb = model.prompt_encoder[adapter_name].embedding.weight
        else:
            emb = model.get_prompt_embedding_to_save(adapter_name)
        to_return = {"prompt_embeddings": emb}
    else:
        prefixes = _tuner_key_prefixes(model)
        to_return = {k: v for k, v in state_dict.items() if _is_key_under_prefixes(k, prefixes)}
        to_return.update(_learnable_bias_state_dict(model, state_dict, config))
        if getattr(config, "use_dora", False):
            # DoRA magnitudes live in a module (`.weight`), the checkpoint keeps peft's old parameter key
            suffix = f"lora_magnitude_vector.{adapter_name}.weight"
            to_return = {(k[: -len(".weight")] if k.endswith(suffix) else k): v for k, v in to_return.items()}

    # modules_to_save and other auxiliary wrappers
    for name, module in model.named_modules():
        if not is_aux_wrapper(module):
            continue
        name = _strip_fsdp(name)
        module_sd = {k[len(name) + 1 :]: v for k, v in state_dict.items() if k.startswith(f"{name}.")}
        for k, v in _aux_adapter_state_dict(module, adapter_name, module_sd).items():
            to_return[f"{name}.{k}"] = v

    # embedding layers
    embedding_is_targeted = _embedding_is_targeted(model, config)
    using_trainable_tokens = _peft_type_str(config.peft_type) == "TRAINABLE_TOKENS" or (
        getattr(config, "trainable_token_indices", None) is not None
    )
    if save_embedding_layers == "auto":
        if embedding_is_targeted and not using_trainable_tokens:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
            save_embedding_layers = True
        elif _vocab_was_resized(model, config):
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during finetuning."
            )
            save_embedding_layers = True
        else:
            save_embedding_layers = False
    if save_embedding_layers and hasattr(model, "get_input_embeddings"):
        layers = [model.get_input_embeddings()]
        if hasattr(model, "get_output_embeddings"):
            layers.append(model.get_output_embeddings())
        for layer in layers:
            if layer is None:
                continue
            if not embedding_is_targeted or _has_valid_embedding_base_layer(layer):
                emb_name = _embedding_layer_name(model, layer, embedding_is_targeted)
                if emb_name:
                    to_return.update({k: v for k, v in state_dict.items() if k.startswith(f"{emb_name}.")})
    elif save_embedding_layers:
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.")

    remove = getattr(tuner_cls, "_remove_adapter_name_from_key", None) if tuner_cls is not None else None
    if remove is None:
        remove = remove_adapter_name_from_key
    return {remove(k, adapter_name): v for k, v in to_return.items()}


def _remap_for_load(model, config, adapter_name: str, state_dict: dict, model_to_ckpt: Optional[dict] = None) -> dict:
    """Checkpoint keys (no adapter name) -> model keys (with the adapter name).

    ``model_to_ckpt``, if given, is filled with the inverse mapping (for error messages).
    """
    if getattr(config, "use_dora", False) or any(k.endswith("lora_magnitude_vector") for k in state_dict):
        state_dict = {(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v for k, v in state_dict.items()}
    tuner_cls = _tuner_cls_for(config.peft_type)
    remove = getattr(tuner_cls, "_remove_adapter_name_from_key", None) if tuner_cls is not None else None
    if remove is None:
        remove = remove_adapter_name_from_key
    prefixes = _tuner_key_prefixes(model, adapter_name=adapter_name)
    ckpt_to_model = {}
    for model_key in model.state_dict():
        if not _is_key_under_prefixes(model_key, prefixes):
            continue
        ckpt_key = remove(model_key, adapter_name)
        ckpt_to_model[ckpt_key] = model_key
        if model_to_ckpt is not None:
            shown = ckpt_key[: -len(".weight")] if ckpt_key.endswith("lora_magnitude_vector.weight") else ckpt_key
            model_to_ckpt[model_key] = shown
        if not model_key.startswith(_PEFT_PREFIX):
            ckpt_to_model[_PEFT_PREFIX + ckpt_key] = model_key
    return {ckpt_to_model.get(k, k): v for k, v in state_dict.items()}


def _adapter_model_keys(model, adapter_name: str, prefixes: set[str], aux_keys: set[str]) -> set[str]:
    """Model state-dict keys that a checkpoint of this adapter must provide."""
    keys = set(aux_keys)
    for k in model.state_dict():
        if _is_key_under_prefixes(k, prefixes):
            keys.add(k)
    return keys


def _fmt_keys(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def set_peft_model_state_dict(
    model,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
):
    """Load checkpoint tensors (keys as written by :func:`get_peft_model_state_dict`) into ``adapter_name``.

    The adapter must already exist in the model (``add_adapter``/``get_peft_model``). The adapter name is
    re-inserted into the keys, so a checkpoint can be loaded under any name.

    Raises :class:`AdapterCheckpointError` naming the offending keys when the checkpoint has keys the model
    does not have, lacks some of this adapter's weights, or has tensors of the wrong shape. With
    ``ignore_mismatched_sizes=True`` mis-shaped tensors are skipped with a warning instead.

    Returns a named tuple ``(missing_keys, unexpected_keys)`` (both empty unless shapes were ignored).
    """
    config = _check_adapter_name(model, adapter_name)
    if not isinstance(peft_model_state_dict, dict):
        raise TypeError(f"peft_model_state_dict must be a dict of tensors, got {type(peft_model_state_dict).__name__}")
    state_dict = dict(peft_model_state_dict)

    if getattr(config, "is_prompt_learning", False):
        if "prompt_embeddings" not in state_dict:
            raise AdapterCheckpointError(
                f"checkpoint for prompt-learning adapter {adapter_name!r} lacks the key 'prompt_embeddings' "
                f"(found: {_fmt_keys(state_dict)})"
            )
        encoder = model.prompt_encoder[adapter_name]
        # modules_to_save copies (e.g. a classifier head): checkpoint key -> model key, all of them required
        model_sd = model.state_dict()
        to_load, missing = {}, []
        for name, module in model.named_modules():
            if not is_aux_wrapper(module):
                continue
            name = _strip_fsdp(name)
            for ckpt_rel, model_rel in _aux_load_map(module, adapter_name).items():
                lookup, store = f"{name}.{ckpt_rel}", f"{name}.{model_rel}"
                if lookup in state_dict:
                    to_load[store] = state_dict.pop(lookup)
                else:
                    missing.append(lookup)
        state_dict.pop("prompt_embeddings")
        problems = []
        if state_dict:
            problems.append(f"{len(state_dict)} unexpected key(s): {_fmt_keys(state_dict)}")
        if missing:
            problems.append(f"{len(missing)} missing key(s) (modules_to_save weights): {_fmt_keys(missing)}")
        bad = [(k, tuple(v.shape), tuple(model_sd[k].shape)) for k, v in to_load.items()
               if tuple(v.shape) != tuple(model_sd[k].shape)]
        if bad:
            problems.append("shape mismatch: " + ", ".join(f"{k}: checkpoint {a}, model {b}" for k, a, b in bad))
        if problems:
            raise AdapterCheckpointError(
                f"checkpoint does not fit prompt-learning adapter {adapter_name!r}: " + "; ".join(problems)
            )
        if hasattr(encoder, "_load_adapter_state_dict"):
            encoder._load_adapter_state_dict(peft_model_state_dict)
        else:
            encoder.embedding.load_state_dict({"weight": peft_model_state_dict["prompt_embeddings"]}, strict=True)
        if to_load:
            model.load_state_dict(to_load, strict=False)
        return IncompatibleKeys([], [])

    # auxiliary wrappers: checkpoint key -> key with `modules_to_save.<adapter>.`
    aux_model_keys: set[str] = set()
    model_to_ckpt: dict[str, str] = {}  # for naming keys in errors as they appear in the checkpoint
    for name, module in model.named_modules():
        if not is_aux_wrapper(module):
            continue
        name = _strip_fsdp(name)
        for ckpt_rel, model_rel in _aux_load_map(module, adapter_name).items():
            lookup, store = f"{name}.{ckpt_rel}", f"{name}.{model_rel}"
            aux_model_keys.add(store)
            model_to_ckpt[store] = lookup
            if lookup not in state_dict and not name.startswith("base_model."):
                # adapters injected without a PeftModel: the checkpoint still carries peft's prefix
                lookup = _PEFT_PREFIX + lookup
            if lookup in state_dict:
                state_dict[store] = state_dict.pop(lookup)

    tuner_cls = _tuner_cls_for(config.peft_type)
    hook = getattr(tuner_cls, "_remap_adapter_state_dict_for_load", None) if tuner_cls is not None else None
    if hook is not None:
        state_dict = dict(hook(model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
                               model_to_ckpt=model_to_ckpt))
    else:
        state_dict = _remap_for_load(model, config, adapter_name, state_dict, model_to_ckpt)

    model_sd = model.state_dict()
    requires_prefix = any(k.startswith(_PEFT_PREFIX) for k in model_sd)
    if not requires_prefix:
        state_dict = {k.removeprefix(_PEFT_PREFIX): v for k, v in state_dict.items()}

    # strict checks: every key must land somewhere, every adapter weight must be provided, shapes must match
    unexpected = [k for k in state_dict if k not in model_sd]
    expected = _adapter_model_keys(model, adapter_name, _tuner_key_prefixes(model, adapter_name=adapter_name), aux_model_keys)
    missing = [k for k in expected if k not in state_dict]

    def shown(k: str) -> str:  # the key as the checkpoint (file) names it
        return model_to_ckpt.get(k, k)

    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s) (in the checkpoint but not in the model): {_fmt_keys(unexpected)}"
        )
    if missing:
        problems.append(
            f"{len(missing)} missing key(s) (adapter weights the checkpoint does not provide): "
            f"{_fmt_keys([shown(k) for k in missing])}"
        )
    mismatched = []
    for k, v in state_dict.items():
        if k not in model_sd or not isinstance(v, torch.Tensor):
            continue
        target = model_sd[k]
        if tuple(target.shape) != tuple(v.shape):
            mismatched.append((k, tuple(v.shape), tuple(target.shape)))
    if mismatched and not ignore_mismatched_sizes:
        lines = "; ".join(f"{shown(k)!r}: checkpoint {s1} vs model {s2}" for k, s1, s2 in mismatched[:20])
        more = f"; ... ({len(mismatched) - 20} more)" if len(mismatched) > 20 else ""
        problems.append(
            f"{len(mismatched)} shape mismatch(es): {lines}{more} "
            "(pass ignore_mismatched_sizes=True to skip these tensors)"
        )
    if problems:
        raise AdapterCheckpointError(
            f"cannot load the checkpoint into adapter {adapter_name!r} of {type(model).__name__} "
            f"({_peft_type_str(config.peft_type)}): " + " | ".join(problems)
        )
    for k, _, _ in mismatched:
        del state_dict[k]

    if low_cpu_mem_usage:
        model.load_state_dict(state_dict, strict=False, assign=True)
        for module in model.modules():
            if hasattr(module, "_move_adapter_to_device_of_base_layer"):
                module._move_adapter_to_device_of_base_layer(adapter_name)
    else:
        model.load_state_dict(state_dict, strict=False)

    if mismatched:
        msg = "\n".join(
            f"- {k}: found shape {s1} in the checkpoint and {s2} in the model instantiated" for k, s1, s2 in mismatched
        )
        warnings.warn(
            f"Some weights of {type(model).__name__} were not initialized from the model checkpoint and are being "
            f"ignored because you passed `ignore_mismatched_sizes=True`: {msg}."
        )
        return IncompatibleKeys([k for k, _, _ in mismatched], [])
    return IncompatibleKeys([], [])


# ---------------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------------


def _pickle_refusal(path: str) -> str:
    return (
        f"{path} holds only {WEIGHTS_NAME}, a pickle file; fastpeft never unpickles checkpoints (loading a pickle can "
        "run arbitrary code). If you trust the file, convert it once with:\n"
        "  python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load('{os.path.join(path, WEIGHTS_NAME)}', weights_only=True); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{os.path.join(path, SAFETENSORS_WEIGHTS_NAME)}', "
        "metadata={'format': 'pt'})\"\n"
        "(or load it with peft and call save_pretrained(..., safe_serialization=True))."
    )


def _not_local(model_id) -> str:
    return (
        f"{model_id!r} is not a local directory. fastpeft loads adapters from local directories only and cannot "
        "download from the Hugging Face Hub here; download it first (e.g. `huggingface-cli download "
        f"{model_id} --local-dir <dir>`) and pass that directory."
    )


def _adapter_dir(model_id, subfolder: Optional[str] = None) -> str:
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"model_id must be a path to a directory, got {type(model_id).__name__}")
    path = os.fspath(model_id)
    if subfolder:
        path = os.path.join(path, subfolder)
    if os.path.isfile(path):
        raise ValueError(
            f"{path!r} is a file; pass the directory that holds {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME}"
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(_not_local(path))
    return path


def load_adapter_config_dict(model_id, subfolder: Optional[str] = None) -> dict[str, Any]:
    """Read and validate ``adapter_config.json``; clear errors for a missing or malformed file."""
    path = _adapter_dir(model_id, subfolder)
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        present = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {path!r} (found: {present[:20]}); an adapter directory written by "
            "save_pretrained holds adapter_config.json and adapter_model.safetensors"
        )
    try:
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{config_file} is not UTF-8 text: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(data).__name__}")
    if "peft_type" not in data:
        raise ValueError(f"{config_file} has no 'peft_type' field; it is not a PEFT adapter config")
    if "runtime_config" in data:
        warnings.warn(
            "The configuration file contains a `runtime_config` key. This is ignored. Runtime configurations are "
            "only valid at runtime."
        )
        del data["runtime_config"]
    return data


def load_adapter_config(model_id, subfolder: Optional[str] = None, **kwargs):
    """``PeftConfig`` subclass instance for the adapter directory (validated)."""
    from . import config as config_mod

    data = load_adapter_config_dict(model_id, subfolder)
    path = _adapter_dir(model_id, subfolder)
    config_file = os.path.join(path, CONFIG_NAME)
    try:
        cls = config_mod._config_class(data["peft_type"])
    except (ValueError, NotImplementedError) as exc:
        raise ValueError(f"{config_file}: {exc}") from exc
    try:
        return cls.from_pretrained(path, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid {config_file}: {exc}") from exc


def load_peft_weights(model_id, device: Optional[Union[str, torch.device]] = None, subfolder: Optional[str] = None,
                      key_mapping: Optional[dict[str, str]] = None, **_ignored) -> dict[str, torch.Tensor]:
    """Tensors of ``adapter_model.safetensors`` in a local adapter directory (never a pickle)."""
    from safetensors.torch import load_file

    path = _adapter_dir(model_id, subfolder)
    st_file = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(st_file):
        if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            raise ValueError(_pickle_refusal(path))
        raise FileNotFoundError(f"no {SAFETENSORS_WEIGHTS_NAME} in {path!r} (found: {sorted(os.listdir(path))[:20]})")
    if device is None:
        device = "cpu"
    device = str(device)
    if device.startswith("mps"):
        weights = load_file(st_file, device="cpu")
    else:
        weights = load_file(st_file, device=device)
    if not key_mapping:
        return weights
    remapped = {}
    for key, val in weights.items():
        if key.startswith(_PEFT_PREFIX):
            prefix = _PEFT_PREFIX
        elif key.startswith("base_model."):
            prefix = "base_model."
        else:
            raise ValueError(f"key_mapping given but checkpoint key {key!r} has no 'base_model.' prefix")
        key = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            new_key, n = re.subn(pattern, replacement, key)
            if n:
                key = new_key
                break
        remapped[prefix + key] = val
    return remapped


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _storage_key(t: torch.Tensor):
    try:
        return (t.device, t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return (t.device, id(t), 0)


def _prepare_for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, un-alias (safetensors refuses shared storage) and make contiguous."""
    out: dict[str, torch.Tensor] = {}
    seen = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cannot save {name!r}: not a tensor ({type(t).__name__})")
        t = t.detach()
        key = _storage_key(t)
        if key in seen:
            t = t.clone()
        else:
            seen.add(key)
        if not t.is_contiguous():
            t = t.contiguous()
        out[name] = t
    return out


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: Optional[dict] = None) -> None:
    """Write a safetensors file atomically: temp file in the same directory, fsync, ``os.replace``."""
    from safetensors.torch import save_file

    tensors = _prepare_for_safetensors(tensors)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
