"""Adapter checkpoints: peft's state-dict key mapping, safetensors I/O, atomic writes.

The on-disk format is Hugging Face PEFT's, byte for byte where it matters:

* ``adapter_config.json``: the config's ``to_dict()`` (written by ``PeftConfig.save_pretrained``).
* ``adapter_model.safetensors``: the adapter's tensors with the adapter name removed from every key
  (``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``), DoRA magnitudes saved as
  ``...lora_magnitude_vector`` (no ``.weight``), ``modules_to_save`` copies saved under the wrapped
  module's original key, metadata ``{"format": "pt"}``.

Only safetensors is read or written. A directory holding only ``adapter_model.bin`` (a pickle) is
refused with a message that says how to convert it; nothing here calls ``torch.load`` or unpickles, and
nothing a checkpoint names (``auto_mapping``, ``base_model_name_or_path``, ``*.py`` files) is imported or run:
the config's ``peft_type`` selects one of fastpeft's own config classes, everything else is data.

Reading validates before trusting: ``adapter_model.safetensors``'s header is checked (length, UTF-8 JSON,
dtypes, byte ranges against shapes and the file size) and a truncated or corrupted file raises
:class:`CorruptCheckpointError` naming the file and, where one is at fault, the tensor; a bad
``adapter_config.json`` raises a ``ValueError`` naming the file and field (an unknown ``peft_type`` lists the
known ones); keys, shapes and dtypes that do not fit the model raise :class:`AdapterCheckpointError` naming the
file and keys with both shapes / dtypes (floating dtypes are cast, as peft does).

Saving is atomic for the adapter as a whole (weights and config are two files; see
:func:`save_adapter_files`): a process killed at any point leaves a directory that loads as the previous
adapter or the new one. (peft itself, reading a directory whose save was killed between the two renames, would
see the new weights with the previous config; fastpeft reads the new config from the marker-named temp file, and
the next fastpeft save completes the commit.)

Which entries of a model's state dict belong to an adapter is decided structurally, as peft does:
everything on a tuner layer except its ``base_layer``, plus the adapter's copy inside each
``ModulesToSaveWrapper``, plus biases (``bias="all"`` / ``"<method>_only"``) and embedding layers
when requested. A tuner class may customise selection and key mapping by defining peft's hooks
``_get_adapter_state_dict``, ``_remove_adapter_name_from_key`` and
``_remap_adapter_state_dict_for_load`` as classmethods; otherwise the generic mapping below is used.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections import namedtuple
from typing import Any, Callable, Literal, Optional, Union

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
    "CorruptCheckpointError",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "load_peft_weights",
    "load_adapter_config_dict",
    "load_adapter_config",
    "save_safetensors_atomic",
    "save_adapter_files",
]


class AdapterCheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model (missing, unexpected or mis-shaped keys)."""


class CorruptCheckpointError(AdapterCheckpointError):
    """A checkpoint file that is not a valid safetensors file (truncated, corrupted header, bad offsets)."""


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
            data = json.load(f)  # read as data only; nothing it names is imported
    except (OSError, ValueError, RecursionError):
        return False
    base_vocab = data.get("vocab_size") if isinstance(data, dict) else None
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
    return {remove(k, adapter_name): _full_tensor(v) for k, v in to_return.items()}


def _is_dtensor(t) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def _full_tensor(t):
    """A sharded tensor (FSDP2 ``fully_shard`` / tensor parallel: a ``DTensor``) as the whole tensor, a plain
    tensor as it is. Gathering is a collective: every rank must export the same adapter (``save_pretrained``
    calls this on every rank and writes on the main process only)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _shard_like(t, target):
    """A whole checkpoint tensor for a sharded parameter (a ``DTensor``: FSDP2, tensor parallel): this rank's
    shard of it, cut locally (no communication: every rank reads the whole checkpoint). Anything else as it is."""
    if not _is_dtensor(target) or not isinstance(t, torch.Tensor) or _is_dtensor(t):
        return t
    from torch.distributed.tensor import distribute_tensor

    whole = t.to(device=target.device, dtype=target.dtype)
    return distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None)


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


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "integer"


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
        prompt = state_dict.pop("prompt_embeddings")
        problems = []
        embedding = getattr(getattr(encoder, "embedding", None), "weight", None)
        if not isinstance(prompt, torch.Tensor):
            problems.append(f"'prompt_embeddings' is a {type(prompt).__name__}, not a tensor")
        elif isinstance(embedding, torch.Tensor):
            if tuple(prompt.shape) != tuple(embedding.shape):
                problems.append(
                    f"shape mismatch: 'prompt_embeddings': checkpoint {tuple(prompt.shape)} vs model "
                    f"{tuple(embedding.shape)} (check num_virtual_tokens / token_dim / num_layers of the config and "
                    "the base model)"
                )
            if _dtype_kind(prompt.dtype) != _dtype_kind(embedding.dtype):
                problems.append(f"dtype mismatch: 'prompt_embeddings': checkpoint {prompt.dtype} vs model {embedding.dtype}")
        if state_dict:
            problems.append(f"{len(state_dict)} unexpected key(s): {_fmt_keys(state_dict)}")
        if missing:
            problems.append(f"{len(missing)} missing key(s) (modules_to_save weights): {_fmt_keys(missing)}")
        bad = [(k, tuple(getattr(v, "shape", ())), tuple(model_sd[k].shape)) for k, v in to_load.items()
               if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(model_sd[k].shape)
               or _dtype_kind(v.dtype) != _dtype_kind(model_sd[k].dtype)]
        if bad:
            problems.append("shape/dtype mismatch: " + ", ".join(
                f"{k}: checkpoint {a} {getattr(to_load[k], 'dtype', type(to_load[k]).__name__)}, "
                f"model {b} {model_sd[k].dtype}" for k, a, b in bad))
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
    mismatched, wrong_kind = [], []
    for k, v in state_dict.items():
        if k not in model_sd:
            continue
        target = model_sd[k]
        if not isinstance(v, torch.Tensor):
            wrong_kind.append(f"{shown(k)!r}: checkpoint holds {type(v).__name__}, model {target.dtype}")
            continue
        if _dtype_kind(v.dtype) != _dtype_kind(target.dtype):
            # float <-> float (bf16 adapter into an fp32 model) is cast as peft does; int/bool/complex into a float
            # tensor (or the reverse) is not an adapter for this model
            wrong_kind.append(f"{shown(k)!r}: checkpoint {v.dtype} vs model {target.dtype}")
        if tuple(target.shape) != tuple(v.shape):
            mismatched.append((k, tuple(v.shape), tuple(target.shape)))
    if wrong_kind:
        more = f"; ... ({len(wrong_kind) - 20} more)" if len(wrong_kind) > 20 else ""
        problems.append(f"{len(wrong_kind)} dtype mismatch(es): " + "; ".join(wrong_kind[:20]) + more)
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
    state_dict = {k: _shard_like(v, model_sd.get(k)) for k, v in state_dict.items()}

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


# ---- interrupted saves ------------------------------------------------------------------------------------------------
#
# An adapter is two files, so one os.replace cannot commit it. save_adapter_files writes both to temp files (fsynced),
# then records their names in a pending marker (written atomically), renames weights then config, and removes the
# marker. A process killed at any point leaves one of:
#   no marker (killed before the marker or after the end)   -> the previous pair, or the new pair: consistent;
#   marker, both temps present (no rename yet)              -> the previous pair: consistent;
#   marker, weights renamed, config temp present            -> new weights + old config: loaders read the config
#                                                              from the complete, fsynced temp instead (roll forward);
#   marker, both renamed                                    -> the new pair: consistent.
# Temp files are never read except as named by the marker; the next save into the directory finishes the interrupted
# commit and removes temps left by processes that no longer run.

_PENDING_NAME = ".fastpeft_save_pending.json"
_MAX_CONFIG_BYTES = 64 << 20
_TEMP_RE = re.compile(
    r"^\.(?:adapter_model\.safetensors|adapter_config\.json|fastpeft_save_pending\.json)\.(\d+)\.[A-Za-z0-9_]+\.tmp$"
)


def _on_save_stage(stage: str, directory: str) -> None:
    """No-op; tests replace it to stop a saving child process at a given stage and kill it there."""


def _mkstemp_for(directory: str, final_name: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.{os.getpid()}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill would terminate the process: never probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _read_pending(directory: str) -> Optional[dict]:
    """The marker of an interrupted commit in ``directory``: {"pid", "weights", "config"} or None.

    Names in the marker are accepted only if they are our temp-file names (plain names in this directory)."""
    try:
        with open(os.path.join(directory, _PENDING_NAME), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    names = (info.get("weights"), info.get("config"))
    if not all(isinstance(n, str) and _TEMP_RE.match(n) for n in names):
        return None
    if not isinstance(info.get("pid"), int):
        return None
    return info


def _committed_config_file(directory: str) -> str:
    """The config file that belongs with ``adapter_model.safetensors`` in ``directory``.

    Normally ``adapter_config.json``; after a save killed between renaming the new weights into place and renaming
    the new config, the new config's (complete, fsynced) temp file."""
    info = _read_pending(directory)
    if info is not None:
        config_tmp = os.path.join(directory, info["config"])
        weights_tmp = os.path.join(directory, info["weights"])
        if os.path.isfile(config_tmp) and not os.path.exists(weights_tmp):
            if not _pid_alive(info["pid"]):
                warnings.warn(
                    f"{directory}: a save was interrupted after writing {SAFETENSORS_WEIGHTS_NAME} and before "
                    f"{CONFIG_NAME}; using the config that save was committing ({info['config']}). The next "
                    "save_pretrained into this directory completes it."
                )
            return config_tmp
    return os.path.join(directory, CONFIG_NAME)


def _finish_interrupted_save(directory: str) -> None:
    """Before writing into ``directory``: complete a commit that a killed process left half done, and remove
    temp files of processes that no longer run."""
    info = _read_pending(directory)
    marker = os.path.join(directory, _PENDING_NAME)
    if info is not None:
        config_tmp = os.path.join(directory, info["config"])
        half_done = os.path.isfile(config_tmp) and not os.path.exists(os.path.join(directory, info["weights"]))
        if half_done:  # new weights in place, their config not: roll forward (whoever wrote it, pid reuse included)
            with contextlib.suppress(FileNotFoundError):  # its owner, still running, may just have done it
                os.replace(config_tmp, os.path.join(directory, CONFIG_NAME))
        if half_done or not _pid_alive(info["pid"]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
    elif os.path.isfile(marker):  # unreadable marker: it commits nothing
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _TEMP_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _write_text_synced(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors_synced(tensors: dict, path: str, metadata: Optional[dict]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_config_atomic(directory: str, text: str) -> None:
    """Write ``adapter_config.json`` alone (temp file, fsync, ``os.replace``), finishing an interrupted save first."""
    os.makedirs(directory, exist_ok=True)
    _finish_interrupted_save(directory)
    _replace_atomically(os.path.join(directory, CONFIG_NAME), lambda tmp: _write_text_synced(tmp, text))


def _replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temp file beside ``path``, then ``os.replace`` it onto ``path`` and fsync the
    directory; the temp file is removed if anything fails (``path`` is then untouched)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = _mkstemp_for(directory, os.path.basename(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def save_adapter_files(directory: str, tensors: dict[str, torch.Tensor], config_text: str,
                       metadata: Optional[dict] = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory`` as one unit.

    Killing the process at any point leaves a directory that loads as the previous adapter or as the new one, never
    as new weights with the previous config (see the protocol above). ``metadata`` defaults to ``{"format": "pt"}``.
    """
    tensors = _prepare_for_safetensors(tensors)
    os.makedirs(directory, exist_ok=True)
    _finish_interrupted_save(directory)
    weights_tmp = _mkstemp_for(directory, SAFETENSORS_WEIGHTS_NAME)
    config_tmp = _mkstemp_for(directory, CONFIG_NAME)
    marker_tmp = None
    marked = committing = False
    try:
        _write_safetensors_synced(tensors, weights_tmp, {"format": "pt"} if metadata is None else metadata)
        _write_text_synced(config_tmp, config_text)
        _on_save_stage("written", directory)
        marker_tmp = _mkstemp_for(directory, _PENDING_NAME.lstrip("."))
        _write_text_synced(marker_tmp, json.dumps(
            {"pid": os.getpid(), "weights": os.path.basename(weights_tmp), "config": os.path.basename(config_tmp)}
        ))
        os.replace(marker_tmp, os.path.join(directory, _PENDING_NAME))
        marker_tmp, marked = None, True
        _fsync_dir(directory)
        _on_save_stage("marked", directory)
        committing = True
        os.replace(weights_tmp, os.path.join(directory, SAFETENSORS_WEIGHTS_NAME))
        _on_save_stage("weights_renamed", directory)
        os.replace(config_tmp, os.path.join(directory, CONFIG_NAME))
        _fsync_dir(directory)
        _on_save_stage("config_renamed", directory)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, _PENDING_NAME))
        _fsync_dir(directory)
    except BaseException:
        if committing:
            # an error (not a kill) mid-commit: make the directory consistent if possible (roll forward once the
            # weights are in place, else drop the temps); what cannot be done is left to the marker
            # (the marker goes before the temps it names, so that no kill in between can pair old and new files)
            with contextlib.suppress(OSError):
                if os.path.exists(weights_tmp):  # nothing renamed
                    os.unlink(os.path.join(directory, _PENDING_NAME))
                    for tmp in (weights_tmp, config_tmp):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(tmp)
                else:
                    if os.path.exists(config_tmp):
                        os.replace(config_tmp, os.path.join(directory, CONFIG_NAME))
                    os.unlink(os.path.join(directory, _PENDING_NAME))
            raise
        if marked:  # nothing renamed yet: the marker commits nothing (removed first: it names the temps)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, _PENDING_NAME))
        for tmp in (weights_tmp, config_tmp, marker_tmp):
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        raise


# ---- reading --------------------------------------------------------------------------------------------------------


def _read_config_file(model_id, subfolder: Optional[str] = None) -> tuple[str, str, dict[str, Any]]:
    """(adapter directory, config file read, its validated dict)."""
    path = _adapter_dir(model_id, subfolder)
    config_file = _committed_config_file(path)
    if not os.path.isfile(config_file):  # a pending config renamed into place meanwhile
        config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        present = sorted(os.listdir(path))
        hint = ""
        if any(_TEMP_RE.match(n) for n in present):
            hint = " (the temp files here are from a save that was interrupted before it completed)"
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {path!r} (found: {present[:20]}){hint}; an adapter directory written by "
            "save_pretrained holds adapter_config.json and adapter_model.safetensors"
        )
    size = os.path.getsize(config_file)
    if size > _MAX_CONFIG_BYTES:
        raise ValueError(f"{config_file} is {size} bytes, too large to be an adapter config")
    with open(config_file, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{config_file} is not UTF-8 text: {exc}") from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(data).__name__}")
    if "peft_type" not in data:
        raise ValueError(f"{config_file} has no 'peft_type' field; it is not a PEFT adapter config")
    if not isinstance(data["peft_type"], str):
        from .config import PeftType

        raise ValueError(
            f"{config_file}: peft_type must be a string, got {type(data['peft_type']).__name__} "
            f"{data['peft_type']!r}; known peft types: {', '.join(t.value for t in PeftType)}"
        )
    if "runtime_config" in data:
        warnings.warn(
            "The configuration file contains a `runtime_config` key. This is ignored. Runtime configurations are "
            "only valid at runtime."
        )
        del data["runtime_config"]
    return path, config_file, data


def load_adapter_config_dict(model_id, subfolder: Optional[str] = None) -> dict[str, Any]:
    """Read and validate ``adapter_config.json``; clear errors for a missing or malformed file."""
    return _read_config_file(model_id, subfolder)[2]


def load_adapter_config(model_id, subfolder: Optional[str] = None, **kwargs):
    """``PeftConfig`` subclass instance for the adapter directory (validated). Keyword arguments that are fields of
    the config class override the stored values. Nothing named by the config is imported or run."""
    import dataclasses

    from . import config as config_mod

    _, config_file, data = _read_config_file(model_id, subfolder)
    try:
        cls = config_mod._config_class(data["peft_type"])
    except (ValueError, NotImplementedError) as exc:
        raise ValueError(f"{config_file}: {exc}") from exc
    field_names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in kwargs.items() if k in field_names}
    try:
        return cls.from_peft_type(**{**data, **overrides})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid {config_file}: {exc}") from exc


# safetensors dtype name -> torch dtype name (those torch has; others are refused naming the tensor)
_ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
    "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def _corrupt(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path} is not a valid safetensors file: {what}. The file is truncated or corrupted (or was not written by "
        "safetensors); save the adapter again"
    )


def read_safetensors_header(path: str) -> dict[str, dict]:
    """Validate a safetensors file's structure (without reading the tensors) and return its tensor entries.

    Raises :class:`CorruptCheckpointError` naming the file (and the tensor, where one is at fault) for a file too
    short to hold a header, a header length past the end of the file, a header that is not UTF-8 JSON of the
    expected shape, an unknown dtype, a tensor whose byte range disagrees with its shape and dtype or lies past the
    end of the file, and gaps or overlaps between tensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:  # an OSError (permissions, ...) names the file itself
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"it is {size} bytes long, too short for the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _MAX_HEADER:
            what = f"its header claims {n} bytes but only {size - 8} follow the length field"
            if head[:1] == b"\x80" or head[:2] == b"PK":  # pickle protocol 2+ / torch.save's zip
                raise CorruptCheckpointError(
                    f"{path} is not a valid safetensors file ({what}); it looks like a pickle / torch.save file. "
                    "fastpeft never unpickles checkpoints (loading a pickle can run arbitrary code); if you trust "
                    "it, convert it with torch.load(..., weights_only=True) and safetensors' save_file"
                )
            raise _corrupt(path, what)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _corrupt(path, f"its header is not UTF-8 ({exc})") from exc
    except (ValueError, RecursionError) as exc:
        raise _corrupt(path, f"its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, f"its header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _corrupt(path, "its __metadata__ is not a map of strings")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise _corrupt(path, f"the entry of tensor {key!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_DTYPES or getattr(torch, _ST_DTYPES[dtype], None) is None:
            raise _corrupt(path, f"tensor {key!r} has dtype {dtype!r}, which fastpeft cannot load")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _corrupt(path, f"tensor {key!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _corrupt(path, f"tensor {key!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * getattr(torch, _ST_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise _corrupt(
                path, f"tensor {key!r} ({dtype}, shape {shape}) needs {nbytes} bytes but its data_offsets {offsets} "
                f"span {offsets[1] - offsets[0]}"
            )
        if offsets[1] > data_len:
            raise _corrupt(
                path, f"tensor {key!r} ends at byte {offsets[1]} of the data but the file holds only {data_len} "
                "bytes of data (cut short?)"
            )
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin != pos:
            raise _corrupt(path, f"tensor {key!r} starts at byte {begin} of the data, expected {pos} (gap or overlap)")
        pos = end
    if pos != data_len:
        raise _corrupt(path, f"{data_len - pos} bytes after the last tensor are not covered by the header")
    return header


def read_shard_index(index_file: str) -> dict[str, str]:
    """``weight_map`` of a sharded checkpoint's ``*.safetensors.index.json``: tensor name -> shard file name.

    Shard names must be plain ``*.safetensors`` file names in the index's directory (no paths, no pickles)."""
    try:
        with open(index_file, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError / UnicodeDecodeError
        raise ValueError(f"{index_file} is not valid UTF-8 JSON: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} has no 'weight_map' object (tensor name -> shard file)")
    for key, shard in weight_map.items():
        if (not isinstance(shard, str) or os.path.basename(shard) != shard or shard in (".", "..")
                or "/" in shard or "\\" in shard or not shard.endswith(".safetensors")):
            raise ValueError(
                f"{index_file}: tensor {key!r} maps to {shard!r}; shards must be *.safetensors files in the same "
                "directory"
            )
    return weight_map


def load_safetensors_file(path: str, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` after :func:`read_safetensors_header`; any error names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(path, device=str(device))
    except SafetensorError as exc:
        raise _corrupt(path, str(exc)) from exc


def load_peft_weights(model_id, device: Optional[Union[str, torch.device]] = None, subfolder: Optional[str] = None,
                      key_mapping: Optional[dict[str, str]] = None, **_ignored) -> dict[str, torch.Tensor]:
    """Tensors of ``adapter_model.safetensors`` in a local adapter directory (never a pickle).

    A truncated or corrupted file raises :class:`CorruptCheckpointError` naming it."""
    path = _adapter_dir(model_id, subfolder)
    st_file = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(st_file):
        if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            raise ValueError(_pickle_refusal(path))
        raise FileNotFoundError(f"no {SAFETENSORS_WEIGHTS_NAME} in {path!r} (found: {sorted(os.listdir(path))[:20]})")
    if device is None:
        device = "cpu"
    device = str(device)
    weights = load_safetensors_file(st_file, device="cpu" if device.startswith("mps") else device)
    if not key_mapping:
        return weights
    remapped = {}
    for key, val in weights.items():
        if key.startswith(_PEFT_PREFIX):
            prefix = _PEFT_PREFIX
        elif key.startswith("base_model."):
            prefix = "base_model."
        else:
            raise ValueError(f"{st_file}: key_mapping given but checkpoint key {key!r} has no 'base_model.' prefix")
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
    """Write a safetensors file atomically: temp file in the same directory, fsync, ``os.replace``.

    For an adapter (weights + config) use :func:`save_adapter_files`, which commits the two together."""
    tensors = _prepare_for_safetensors(tensors)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _replace_atomically(path, lambda tmp: _write_safetensors_synced(tensors, tmp, metadata))
