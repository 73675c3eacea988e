"""What every injectable tuner shares (peft's BaseTuner / BaseTunerLayer, one way to do each thing).

- `check_target_module_exists`: which module names a config targets (target_modules as a list of exact
  names or `.`-suffixes, or a full-match regex; "all-linear"; exclude_modules; layers_to_transform +
  layers_pattern; modules_to_save are never targeted).
- `get_pattern_key`: rank_pattern / alpha_pattern key matching.
- `BaseTunerLayer`: the mixin of every adapter layer: base_layer, active adapters, enable/disable,
  adapter bookkeeping, and the merge / unmerge loops (a method implements `_merge_adapter` and
  `_unmerge_adapter` for one adapter).
- `ModulesToSaveWrapper`: a fully trained copy of a module per adapter (`original_module`,
  `modules_to_save`).
- `BaseTuner`: the nn.Module wrapping the base model (`.model`): inject_adapter, set_adapter,
  delete_adapter, enable/disable, merge_adapter / unmerge_adapter / merge_and_unload / unload,
  `_mark_only_adapters_as_trainable` (with the `bias` modes). A method implements
  `_create_and_replace`.

Attribute and state-dict names are peft's, so checkpoints are interchangeable.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import re
import sys
import warnings
from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..config import PeftConfig

INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
DUMMY_MODEL_CONFIG = {"model_type": "custom"}


@functools.lru_cache(maxsize=None)
def _conv1d_class():
    """transformers' Conv1D (GPT-2 style linear with a [in, out] weight), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def linear_kind(base: nn.Module, config) -> Optional[str]:
    """"linear" for an nn.Linear, "conv1d" for transformers' Conv1D, else None; sets
    `config.fan_in_fan_out` to what the layer's weight layout needs (with peft's warning when it changes):
    False for nn.Linear ([out, in]), True for Conv1D ([in, out])."""
    conv1d = _conv1d_class()
    if isinstance(base, nn.Linear):
        kind, want = "linear", False
    elif conv1d is not None and isinstance(base, conv1d):
        kind, want = "conv1d", True
    else:
        return None
    if bool(config.fan_in_fan_out) != want:
        layer = "`torch.nn.Linear`" if kind == "linear" else "`Conv1D`"
        warnings.warn(f"fan_in_fan_out is set to {not want} but the target module is {layer}. "
                      f"Setting fan_in_fan_out to {want}.")
        config.fan_in_fan_out = want
    return kind


def check_wrapped_type(layer: nn.Module, base_layer: nn.Module, base_types: tuple) -> None:
    """TypeError unless `base_layer` (or, when it is another adapter layer, the layer under it) is one of
    `base_types`, the layer types the adapter layer class of `layer` wraps."""
    inner = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
    if not isinstance(inner, base_types):
        names = " or ".join(t.__name__ for t in base_types)
        raise TypeError(f"{type(layer).__name__} wraps a {names}, got {type(inner).__name__}")


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _set_requires_grad(layer: Union[nn.Module, torch.Tensor], requires_grad: bool) -> None:
    params = [layer] if isinstance(layer, torch.Tensor) else layer.parameters()
    for p in params:
        if p.is_leaf:
            p.requires_grad_(requires_grad)


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    parent_name, _, target_name = key.rpartition(".")
    return model.get_submodule(parent_name), model.get_submodule(key), target_name


def _is_under(key: str, prefixes: set[str]) -> bool:
    """Whether `key` equals one of `prefixes` or lies below one ("a.b" covers "a.b.c", not "a.bc")."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts) + 1))


# ---- target matching ----------------------------------------------------------------------------


class _ExcludedModule:
    """Falsy result of `check_target_module_exists` for a module excluded on purpose."""

    def __bool__(self):
        return False


def _is_tied_target(config: PeftConfig, key: str) -> bool:
    """Whether `key` is a layer tied to the input embedding that gets its adapter from the embedding's
    (`ensure_weight_tying`; peft's `_check_tied_module_exists`)."""
    to_tie = getattr(config, "target_modules_to_tie", None) or ()
    return key in to_tie or any(key.endswith(f".{name}") for name in to_tie)


_WARN_TIED_NOT_TIED = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but {why}. This can lead to "
    "complications, for example when merging the adapter or converting your model to formats other than "
    "safetensors. Check the discussion here: https://github.com/huggingface/peft/issues/2777"
)


def check_target_module_exists(config: PeftConfig, key: str) -> Union[bool, re.Match, _ExcludedModule, None]:
    """Whether the module named `key` is targeted by `config` (peft's rules)."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return _ExcludedModule()
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return _ExcludedModule()

    # never adapt a module that is fully trained and saved: the two would conflict
    modules_to_save = getattr(config, "modules_to_save", None)
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
        return _ExcludedModule()

    target_modules = config.target_modules
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key)
    if key in target_modules:
        return True
    if not any(key.endswith(f".{t}") for t in target_modules):
        return False

    layer_indexes = getattr(config, "layers_to_transform", None)
    if layer_indexes is None or (isinstance(layer_indexes, list) and not layer_indexes):
        return True
    layers_pattern = getattr(config, "layers_pattern", None)
    match = None
    if not layers_pattern:
        # the first numbered segment is the layer index (lazy: not an expert index further down)
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes


def get_pattern_key(pattern_keys: Sequence[str], key: str) -> str:
    """The first rank_pattern / alpha_pattern key matching the module name `key` (else `key` itself)."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def include_all_linear_layers(config: PeftConfig, model: nn.Module) -> PeftConfig:
    """Resolve target_modules="all-linear" to the names of all Linear / Conv1D modules but the output layer."""
    target = getattr(config, "target_modules", None)
    if not (isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return config
    conv1d = _conv1d_class()
    linear_classes = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    nf4 = sys.modules.get("fastpeft.quant.nf4")  # fastpeft's NF4 layers count as linear (peft: bnb's Linear4bit)
    if nf4 is not None:
        linear_classes = linear_classes + (nf4.LinearNF4,)
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, linear_classes):
            names.add(name)
        elif isinstance(module, BaseTunerLayer) and "Linear" in type(module).__name__:
            names.add(name)  # already adapted by another adapter: target the adapter layer itself

    exclude = set()
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output_emb = get_output_embeddings() if callable(get_output_embeddings) else None
    if output_emb is not None:
        exclude.update(name for name, module in model.named_modules() if module is output_emb)
    elif str(getattr(config, "task_type", None)) == "SEQ_CLS":
        for head_name in SEQ_CLS_HEAD_NAMES:
            head = getattr(model, head_name, None)
            if head is not None:
                exclude.update(name for name, module in model.named_modules() if module is head)
                break
    # never nest: the lora_A / lora_B of an existing adapter layer are not targets
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            exclude.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    config.target_modules = names - exclude
    return config


# ---- adapter layers -----------------------------------------------------------------------------


class _AdapterActivity:
    """peft's read-only view of which adapters are active / disabled, over `_active_adapter` and
    `_disable_adapters`: shared by the adapter layers and the modules_to_save wrappers."""

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else self._active_adapter


class BaseTunerLayer(_AdapterActivity, ABC):
    """Mixin of every adapter layer (used with nn.Module).

    A layer holds its adapters in ModuleDicts / ParameterDicts named in `adapter_layer_names` (trainable)
    and plain dicts named in `other_param_names`, all keyed by adapter name. A method implements
    `_merge_adapter(name, safe_merge)` and `_unmerge_adapter(name)`; the loops over adapters are here.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    _disable_adapters: bool = False
    _active_adapter: Union[str, list[str]] = "default"
    merged_adapters: list[str] = []

    def get_base_layer(self) -> nn.Module:
        base_layer = self
        while hasattr(base_layer, "base_layer"):
            base_layer = base_layer.base_layer
        return base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.get_base_layer().bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _runs_base_only(self) -> bool:
        """True when forward is the base layer alone: adapters disabled (a merged layer is unmerged first, as
        peft does) or merged into the weight."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        return self.disable_adapters or self.merged

    def _adapter_containers(self):
        for name in self.adapter_layer_names:
            container = getattr(self, name, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                yield container

    def enable_adapters(self, enabled: bool) -> None:
        """Enable (the active adapters become trainable again) or disable all adapters of this layer."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for container in self._adapter_containers():
                for layer in container.values():
                    _set_requires_grad(layer, False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make `adapter_names` the active adapters; they (only) are trainable unless `inference_mode`."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for container in self._adapter_containers():
            for key, layer in container.items():
                _set_requires_grad(layer, key in adapter_names and not inference_mode)
        self._active_adapter = list(adapter_names)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Enable or disable gradients on the weights of the given adapter(s) of this layer."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for container in self._adapter_containers():
            for key, layer in container.items():
                if key in names:
                    _set_requires_grad(layer, requires_grad)

    def _all_available_adapter_names(self) -> list[str]:
        names = set()
        for attr in self.adapter_layer_names + self.other_param_names:
            value = getattr(self, attr, None)
            if hasattr(value, "keys"):
                names.update(value.keys())
        return sorted(names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from this layer; if it was active, activate the remaining ones (or the first left)."""
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        if adapter_name not in self.active_adapters:
            return
        remaining_active = [a for a in self.active_adapters if a != adapter_name]
        if remaining_active:
            self.set_adapter(remaining_active)
            return
        remaining = self._all_available_adapter_names()
        if remaining:
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}.")
            self.set_adapter(remaining[0])
        else:
            self.set_adapter([])

    # ---- merging ----

    def _adapters_to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        if adapter_names is None:
            adapter_names = self.active_adapters
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}")
        if self.merged:
            new = [n for n in adapter_names if n not in self.merged_adapters]
            if new:
                warnings.warn(
                    f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                    f"You are now additionally merging {','.join(new)}."
                )
            else:
                warnings.warn("All adapters are already merged, nothing to do.")
            adapter_names = new
        return [n for n in adapter_names if self._has_adapter(n)]

    def _has_adapter(self, adapter_name: str) -> bool:
        return any(adapter_name in c for c in self._adapter_containers())

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge adapters (default: the active ones) into the base weights.

        With `safe_merge`, the merged weights are computed in a copy and checked for NaN/inf first; a broken
        adapter raises ValueError naming it and leaves the layer unchanged.
        """
        for name in self._adapters_to_merge(adapter_names):
            self._merge_adapter(name, safe_merge)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take all merged adapters out of the base weights again (last merged first)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            self._unmerge_adapter(self.merged_adapters.pop())

    @abstractmethod
    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None: ...

    @abstractmethod
    def _unmerge_adapter(self, adapter_name: str) -> None: ...

    # ---- placement ----

    def _base_device_dtype(self) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
        weight = getattr(self.get_base_layer(), "weight", None)
        if weight is None:
            return None, None
        dtype = weight.dtype if (weight.dtype.is_floating_point or weight.dtype.is_complex) else None
        return weight.device, dtype

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str) -> None:
        """Put this adapter's weights on the base layer's device, in its (floating) dtype."""
        device, dtype = self._base_device_dtype()
        if device is None:
            return
        for attr in self.adapter_layer_names:
            container = getattr(self, attr, None)
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                continue
            item = container[adapter_name]
            if any(p.device.type == "meta" for p in ([item] if isinstance(item, torch.Tensor) else item.parameters())):
                continue
            moved = item.to(device=device, dtype=dtype) if dtype is not None else item.to(device)
            if isinstance(container, nn.ParameterDict) and not isinstance(moved, nn.Parameter):
                moved = nn.Parameter(moved, requires_grad=item.requires_grad)
            container[adapter_name] = moved


# ---- modules_to_save ----------------------------------------------------------------------------


class AuxiliaryTrainingWrapper(nn.Module):
    """Base of wrappers that train a module alongside an adapter (modules_to_save, trainable tokens)."""


class ModulesToSaveWrapper(_AdapterActivity, AuxiliaryTrainingWrapper):
    """A module trained fully: one copy per adapter in `modules_to_save`, the original in `original_module`.

    Only one adapter is active at a time; with none active (or adapters disabled) the original is used.
    """

    adapter_layer_names = ("modules_to_save",)

    def __init__(self, module_to_save: nn.Module, adapter_name: str, tied_module: Optional[nn.Module] = None):
        super().__init__()
        forbidden = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
        if isinstance(module_to_save, forbidden) or isinstance(module_to_save, BaseTunerLayer):
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module_to_save)}")
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: Union[str, list[str]] = [adapter_name]
        self._disable_adapters = False
        self._adapters: set[str] = set()
        self.update(adapter_name, tied_module=tied_module)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if "_modules" not in self.__dict__:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        modules = self.__dict__["_modules"]
        if self._disable_adapters or not self.active_adapters:
            return getattr(modules["original_module"], name)
        active = self.active_adapters[0]
        if active in modules["modules_to_save"]:
            return getattr(modules["modules_to_save"][active], name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def update(self, adapter_name: str, tied_module: Optional[nn.Module] = None) -> None:
        """Add a trainable copy of the original module for `adapter_name`. With `tied_module` (the embedding's copy,
        `ensure_weight_tying`), the copy is a bias-free Linear whose weight *is* that module's weight (peft)."""
        self._adapters.add(adapter_name)
        if adapter_name not in self.modules_to_save:
            if tied_module is not None:
                weight = tied_module.weight
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                linear.weight = weight
                self.modules_to_save[adapter_name] = linear
            else:
                self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        if adapter_name in self.active_adapters:
            _set_requires_grad(self.modules_to_save[adapter_name], True)

    def forward(self, *args, **kwargs):
        mixed = kwargs.pop("adapter_names", None)
        if (
            self._disable_adapters
            or not self.active_adapters
            or any(a not in self._adapters for a in self.active_adapters)
        ):
            return self.original_module(*args, **kwargs)
        if mixed is not None and args:  # mixed-adapter batch (LoRA's adapter_names): each row's adapter's copy
            from .lora.mixed import mixed_aux_forward

            return mixed_aux_forward(self, args[0], mixed, *args[1:], **kwargs)
        return self.modules_to_save[self.active_adapters[0]](*args, **kwargs)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        if enabled:
            for name in self.active_adapters:
                _set_requires_grad(self.modules_to_save[name], True)
        else:
            for module in self.modules_to_save.values():
                _set_requires_grad(module, False)

    def check_set_adapter(self, adapter_names: Union[str, list[str]]) -> Optional[str]:
        """The one adapter of `adapter_names` this wrapper has (None if it has none of them)."""
        if isinstance(adapter_names, str):
            return adapter_names
        if not adapter_names:
            raise ValueError("Please specify at least one adapter to set")
        present = [n for n in adapter_names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(f"Only one adapter can be set at a time for modules_to_save, got {present}")
        return present[0] if present else None

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        if len(adapter_names) > 1:
            raise ValueError(f"Attempted to set multiple ({adapter_names}) adapters at once for modules_to_save.")
        for name in self.active_adapters:
            if name in self.modules_to_save:
                _set_requires_grad(self.modules_to_save[name], False)
        if not adapter_names:
            self._active_adapter = []
            return
        name = adapter_names[0]
        if name not in self._adapters:
            raise ValueError(f"Adapter {name} not found in {self._adapters}")
        _set_requires_grad(self.modules_to_save[name], not inference_mode)
        self._active_adapter = name

    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]]) -> None:
        if adapter_name not in self.modules_to_save:
            return
        if isinstance(new_active_adapters, (list, tuple)) and len(new_active_adapters) > 1:
            raise ValueError(f"Attempted to set multiple ({new_active_adapters}) adapters at once for modules_to_save.")
        self._adapters.discard(adapter_name)
        new = new_active_adapters[0] if new_active_adapters else None
        if new is None or new not in self.modules_to_save:
            self._active_adapter = []
        elif new != self.active_adapters[0]:
            self.set_adapter(new)
        del self.modules_to_save[adapter_name]

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """The module that replaces this wrapper on unload: the active adapter's copy, else the original."""
        if not self.active_adapters:
            return self.original_module
        module = self.modules_to_save[self.active_adapters[0]]
        if isinstance(module, BaseTunerLayer):
            if merge:
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            module = module.get_base_layer()
        return module


def iter_named_targets(model: nn.Module, names: Sequence[str], adapter_name: str, field: str):
    """(key, parent, target_name, target, grandparent) for every module of `model` whose name ends with one of
    `names` (the suffix match of `modules_to_save` / `trainable_token_indices`, named by `field` in errors), in
    module order; safe while the caller replaces the modules found (a module under one replaced earlier is
    skipped). A match inside an adapter layer means an adapter name clashes with `names`: a ValueError."""
    for key in [k for k, _ in model.named_modules(remove_duplicate=False)]:
        if not key or not any(key.endswith(n) for n in names):
            continue
        parent_key, _, target_name = key.rpartition(".")
        try:
            parent = model.get_submodule(parent_key)
            target = model.get_submodule(key)
        except AttributeError:
            continue  # under a module replaced earlier in this loop
        grandparent = model.get_submodule(parent_key.rpartition(".")[0]) if parent_key else None
        if isinstance(grandparent, BaseTunerLayer):
            raise ValueError(
                f"{field} matched {key!r}, inside an adapter layer; make sure the adapter name "
                f"{adapter_name!r} does not clash with the module names in {field}"
            )
        yield key, parent, target_name, target, grandparent


def set_modules_to_save(model: nn.Module, config: PeftConfig, adapter_name: str, activate: bool,
                        names: Optional[Sequence[str]] = None, tied_module: Optional[nn.Module] = None) -> None:
    """Wrap (or extend the wrappers of) the modules named in `config.modules_to_save` (suffix match); `names`
    overrides those, `tied_module` makes the new copies share its weight (`ensure_weight_tying`)."""
    names = getattr(config, "modules_to_save", None) if names is None else names
    if not names:
        return
    inference_mode = config.inference_mode
    for key, parent, target_name, target, grandparent in iter_named_targets(model, names, adapter_name,
                                                                             "modules_to_save"):
        if isinstance(grandparent, ModulesToSaveWrapper) or isinstance(parent, nn.ModuleDict):
            continue  # a copy held by an existing wrapper
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name, tied_module=tied_module)
            target.set_adapter(target.active_adapters, inference_mode=inference_mode)
        elif tied_module is not None:
            wrapper = ModulesToSaveWrapper(target, adapter_name, tied_module=tied_module)
            wrapper.set_adapter(adapter_name if activate else [], inference_mode=inference_mode)
            setattr(parent, target_name, wrapper)
        else:
            wrapper = ModulesToSaveWrapper(target, adapter_name)
            wrapper.set_adapter(adapter_name if activate else [], inference_mode=inference_mode)
            setattr(parent, target_name, wrapper)


# ---- the tuner (wrapper model) ------------------------------------------------------------------


class BaseTuner(nn.Module, ABC):
    """Wraps a base model (`.model`, modified in place) and injects one method's adapter layers into it.

    Subclasses set `prefix` (e.g. "lora_"), `tuner_layer_cls`, `target_module_mapping` (model_type ->
    default target_modules) and implement `_create_and_replace`.
    """

    prefix: str
    tuner_layer_cls: type = BaseTunerLayer
    target_module_mapping: dict[str, Any] = {}

    def __init__(
        self,
        model: nn.Module,
        peft_config: Union[PeftConfig, dict[str, PeftConfig]],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.targeted_module_names: list[str] = []
        if isinstance(peft_config, PeftConfig):
            self.peft_config: dict[str, PeftConfig] = {adapter_name: peft_config}
        else:
            self.peft_config = dict(peft_config)
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} has no config in peft_config ({list(self.peft_config)})")
        self.active_adapter: Union[str, list[str]] = adapter_name
        self.inject_adapter(self.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self.model.peft_config = self.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else self.active_adapter

    def forward(self, *args: Any, **kwargs: Any):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        """Forward missing attributes to the wrapped model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not initialised yet: avoid infinite recursion
                raise
            return getattr(self.model, name)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """peft's hook context around forward; only mixed-adapter batches need it. LoraModel overrides this with
        the real thing (tuners/lora/mixed.py); the other tuners refuse per-row adapters."""
        if kwargs.get("adapter_names") is not None:
            raise NotImplementedError(
                f"mixed-adapter batches (adapter_names=...) are supported for LoRA only, not {type(self).__name__}")
        yield

    # ---- hooks for subclasses ----

    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        model_config = getattr(model, "config", DUMMY_MODEL_CONFIG)
        if hasattr(model_config, "to_dict"):
            model_config = model_config.to_dict()
        elif not isinstance(model_config, dict):
            import dataclasses

            model_config = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else {}
        return model_config

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        """Fill `target_modules` from `target_module_mapping` for known model types when it is None."""
        if peft_config.target_modules is None:
            target_modules = self.target_module_mapping.get(model_config.get("model_type"))
            if target_modules is None:
                raise ValueError(
                    f"Please specify `target_modules` in the config: no default is known for model_type "
                    f"{model_config.get('model_type')!r}"
                )
            peft_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)
        return peft_config

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        """Raise if `config` cannot be added next to the existing adapters."""
        if sum(getattr(c, "bias", "none") != "none" for c in self.peft_config.values()) > 1:
            raise ValueError(
                f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, "
                "set bias to 'none' for all adapters."
            )

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str):
        return check_target_module_exists(peft_config, key)

    def _prepare_model(self, peft_config: PeftConfig, model: nn.Module) -> None:
        """Change the model's structure before the adapter is injected (LoRA: `layer_replication`)."""

    # ---- tied embeddings (peft's _check_tied_modules; LoRA implements the tying) ----

    def _check_tied_modules(self, model: nn.Module, peft_config: PeftConfig) -> None:
        """Whether the embedding (or a layer tied to it) is in `modules_to_save` / `target_modules` of a model with
        tied embeddings: with `ensure_weight_tying`, rewrite the config so that the embedding gets the adapter and
        the tied layers share it; without, warn (as peft)."""
        from .trainable_tokens.model import tied_embedding_module_names
        from ..checkpoint import EMBEDDING_LAYER_NAMES

        to_save = getattr(peft_config, "modules_to_save", None) or []
        embedding_to_save = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in to_save)
        raw = getattr(peft_config, "target_modules", None)
        if isinstance(raw, str):
            embedding_in_target = any(re.fullmatch(raw, name) for name in EMBEDDING_LAYER_NAMES)
        else:
            embedding_in_target = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in (raw or []))
        tied = tied_embedding_module_names(model)
        if getattr(peft_config, "ensure_weight_tying", False):
            if not tied:
                warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model")
            elif embedding_to_save:
                self._add_modules_to_save_to_tie(peft_config, tied)
            elif embedding_in_target:
                self._add_targets_to_tie(peft_config, tied)
            else:
                warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                              "`modules_to_save` or `target_modules`")
        elif (embedding_to_save or embedding_in_target) and tied:
            why = ("`ensure_weight_tying` is not set to True" if hasattr(peft_config, "ensure_weight_tying")
                   else "no implementation exists to tie the adapters")
            warnings.warn(_WARN_TIED_NOT_TIED.format(why=why))

    def _add_modules_to_save_to_tie(self, peft_config: PeftConfig, tied_names: list[str]) -> None:
        warnings.warn(_WARN_TIED_NOT_TIED.format(why="no implementation exists to tie the adapters"))

    def _add_targets_to_tie(self, peft_config: PeftConfig, tied_names: list[str]) -> None:
        warnings.warn(_WARN_TIED_NOT_TIED.format(why="no implementation exists to tie the adapters"))

    @abstractmethod
    def _create_and_replace(
        self, peft_config: PeftConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: str,
    ) -> None:
        """Replace `parent.<target_name>` (= `target`) by an adapter layer, or add the adapter to it."""

    # ---- injection ----

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """Create the adapter layers of `self.peft_config[adapter_name]` and put them into `model`.

        With `state_dict`, the modules to adapt are those its keys name (values unused), not the config's.
        (`autocast_adapter_dtype`: see `_cast_adapter_dtype`; `low_cpu_mem_usage` is accepted for peft's
        signature, adapters are always created for real.)
        """
        peft_config = self.peft_config[adapter_name]
        self._check_new_adapter_config(peft_config)
        self._check_tied_modules(model, peft_config)
        peft_config = self._prepare_adapter_config(peft_config, self.get_model_config(model))
        self._prepare_model(peft_config, model)

        named_modules = list(model.named_modules())
        existing_layer_prefixes = {k for k, m in named_modules if isinstance(m, BaseTunerLayer)}
        # adding an adapter must not change the trainability of what was there before
        previous_requires_grad = (
            [(p, p.requires_grad) for p in model.parameters()] if existing_layer_prefixes else []
        )
        peft_config = include_all_linear_layers(peft_config, model)

        target_parameters = getattr(peft_config, "target_parameters", None)
        if target_parameters and state_dict:
            raise ValueError(
                "Trying to inject a PEFT adapter from a state_dict but the PEFT config uses `target_parameters`. This "
                "is not supported -- when using `target_parameters`, please inject the adapter without the state_dict."
            )
        module_names = None
        if state_dict is not None:
            module_names = {k.rsplit("." + self.prefix, 1)[0].removeprefix("_orig_mod.") for k in state_dict}

        targeted, excluded, unmatched = [], [], []
        targets_to_tie = []  # ensure_weight_tying: layers tied to the embedding get their adapter after it
        for key, _ in named_modules:
            if not key or (existing_layer_prefixes and _is_under(key.rpartition(".")[0], existing_layer_prefixes)):
                continue
            if (module_names is None or key.removeprefix("_orig_mod.") in module_names) \
                    and _is_tied_target(peft_config, key):
                targets_to_tie.append(key)
                continue
            if module_names is not None:
                result = key.removeprefix("_orig_mod.") in module_names
            else:
                result = self._check_target_module_exists(peft_config, key)
            if isinstance(result, _ExcludedModule):
                excluded.append(key)
            elif not result:
                unmatched.append(key)
            else:
                targeted.append(key)
        targeted += targets_to_tie
        for key in targeted:
            parent, target, target_name = _get_submodules(model, key)
            self._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key=key)
        # LoRA's target_parameters: nn.Parameters wrapped directly (e.g. MoE experts), after the modules (as peft)
        targeted_params = self._inject_parameters(peft_config, model, adapter_name) if target_parameters else []

        if target_parameters and targeted and not targeted_params:
            warnings.warn(f"target_parameters={target_parameters} were set but no parameter was matched.", RuntimeWarning)
        elif target_parameters and targeted_params and getattr(peft_config, "target_modules", None) and not targeted:
            warnings.warn(
                f"target_modules={peft_config.target_modules} were set but no module was matched.", RuntimeWarning
            )
        if not targeted and not targeted_params:
            from ..errors import NoMatchingPeftModuleError

            if target_parameters and not excluded and not getattr(peft_config, "target_modules", None):
                raise NoMatchingPeftModuleError(
                    "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                    f"these arguments: target_parameters={sorted(target_parameters)} matched no parameter. A name "
                    "matches a parameter whose full name (e.g. 'model.layers.0.mlp.experts.gate_up_proj') equals it "
                    "or ends with '.' + the name (e.g. 'mlp.experts.gate_up_proj')."
                )
            if excluded and not unmatched:
                raise NoMatchingPeftModuleError(
                    "All modules were excluded. Check your `target_modules`, `exclude_modules` and "
                    "`modules_to_save` configuration."
                )
            if excluded:
                msg = (
                    "No modules were targeted for adaptation: target_modules matched only modules excluded by "
                    "`exclude_modules` or `modules_to_save`. Check your `target_modules` and `exclude_modules`."
                )
            else:
                msg = (
                    f"Target modules {peft_config.target_modules} not found in the base model. "
                    "Please check the target modules and try again."
                )
            if getattr(peft_config, "layers_to_transform", None) is not None:
                msg += f" Note: you specified layers_to_transform={peft_config.layers_to_transform}."
            if getattr(peft_config, "layers_pattern", None) is not None:
                msg += f" You also specified layers_pattern={peft_config.layers_pattern}."
            raise NoMatchingPeftModuleError(msg)
        if getattr(peft_config, "exclude_modules", None) and not excluded:
            warnings.warn(
                f"You have passed exclude_modules={peft_config.exclude_modules} but no modules were excluded. "
                "Please check that exclude_modules was set correctly."
            )
        for attr in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(peft_config, attr, None) or {}
            unused = sorted(
                p for p in patterns
                if not any(re.match(rf"(.*\.)?({p})$", name) for name in targeted + targeted_params)
            )
            if unused:
                warnings.warn(f"The following {attr} keys did not match any targeted module and were ignored: {unused}.")
        for key in targeted:
            if key not in self.targeted_module_names:
                self.targeted_module_names.append(key)
        targeted_parameter_names = self.__dict__.setdefault("targeted_parameter_names", [])  # peft's attribute
        targeted_parameter_names += [k for k in targeted_params if k not in targeted_parameter_names]

        self.set_adapter(self.active_adapters, inference_mode=peft_config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        set_modules_to_save(model, peft_config, adapter_name, activate=adapter_name in self.active_adapters)
        if getattr(peft_config, "modules_to_tie", None) is not None:  # ensure_weight_tying with modules_to_save
            embedding = model.get_input_embeddings()
            set_modules_to_save(model, peft_config, adapter_name, activate=adapter_name in self.active_adapters,
                                names=sorted(peft_config.modules_to_tie),
                                tied_module=embedding.modules_to_save[adapter_name])
        if getattr(peft_config, "trainable_token_indices", None) is not None:  # e.g. LoRA + trainable tokens
            from .trainable_tokens.wrapper import set_trainable_tokens

            set_trainable_tokens(model, peft_config, adapter_name, activate=adapter_name in self.active_adapters,
                                 model_config=self.get_model_config(model))
        for p, requires_grad in previous_requires_grad:
            p.requires_grad = requires_grad

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put `new_module` in place of `child`; its adapter weights go to the base weight's device."""
        setattr(parent, child_name, new_module)
        base = child.get_base_layer() if isinstance(child, BaseTunerLayer) else child
        weight = getattr(base, "weight", None)
        if weight is None:
            params = list(base.parameters())
            weight = params[0] if params else None
        if weight is None or weight.device.type == "meta":
            return
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(weight.device)

    # ---- trainability ----

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze everything but adapter weights (and modules_to_save), then unfreeze biases per `bias`."""
        aux_names = {n for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)}
        adapter_param_ids = set()
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and not _is_under(name, aux_names):
                for child_name, child in module.named_children():
                    if child_name != "base_layer":
                        adapter_param_ids.update(id(p) for p in child.parameters())
                adapter_param_ids.update(id(p) for p in module.parameters(recurse=False))
        for name, p in model.named_parameters():
            if id(p) in adapter_param_ids or _is_under(name, aux_names):
                continue
            p.requires_grad = False

        for adapter in self.active_adapters:
            bias = getattr(self.peft_config[adapter], "bias", "none")
            if bias == "none":
                continue
            if bias == "all":
                for name, p in model.named_parameters():
                    if name == "bias" or name.endswith(".bias"):
                        p.requires_grad = True
            elif bias.endswith("_only"):  # "lora_only": the biases of adapted layers
                for m in model.modules():
                    if isinstance(m, self.tuner_layer_cls) and getattr(m, "bias", None) is not None:
                        m.bias.requires_grad = True
            else:
                raise NotImplementedError(f"Requested bias: {bias}, is not implemented.")

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Upcast the float16 / bfloat16 weights of `adapter_name` to float32 (peft's autocast_adapter_dtype)."""
        if not autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            for container in module._adapter_containers():
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                params = [item] if isinstance(item, torch.Tensor) else item.parameters()
                for p in params:
                    if p.dtype in (torch.float16, torch.bfloat16):
                        p.data = p.data.float()

    # ---- adapter management ----

    def _tuner_layers(self):
        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    def _aux_wrappers(self):
        return [m for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate `adapter_name` (str or list); active adapters are trainable unless `inference_mode`."""
        for wrapper in self._aux_wrappers():
            chosen = wrapper.check_set_adapter(adapter_name)
            wrapper.set_adapter(chosen if chosen in wrapper._adapters else [], inference_mode=inference_mode)
        for layer in self._tuner_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
            layer.set_adapter(adapter_name, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter (it must not be merged); the remaining adapters decide the new active one."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if any(adapter_name in layer.merged_adapters for layer in self._tuner_layers()):
            raise ValueError(f"Cannot delete adapter(s) ['{adapter_name}'] while they are merged. Please unmerge them first.")
        del self.peft_config[adapter_name]
        new_active = None
        for key, layer in self.model.named_modules():
            if self.prefix in key or not isinstance(layer, self.tuner_layer_cls):
                continue
            layer.delete_adapter(adapter_name)
            if new_active is None:
                new_active = layer.active_adapters[:]
        for wrapper in self._aux_wrappers():
            wrapper.delete_adapter(adapter_name, new_active_adapters=new_active)
        self.active_adapter = new_active or []

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Enable or disable gradients on the given adapter(s), in adapter layers and modules_to_save copies."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for layer in self._tuner_layers():
            layer.set_requires_grad(names, requires_grad)
        for wrapper in self._aux_wrappers():
            for key, module in getattr(wrapper, "modules_to_save", {}).items():  # (trainable tokens: a layer above)
                if key in names:
                    _set_requires_grad(module, requires_grad)

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        """Enable the adapters again after `disable_adapter_layers`."""
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        """Disable all adapters: the model computes the base model's outputs (merged adapters are unmerged)."""
        for adapter in self.active_adapters:
            bias = getattr(self.peft_config.get(adapter), "bias", "none")
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                    "same output as the base model would without adaption."
                )
        self._set_adapter_layers(False)

    # ---- merging ----

    def _check_merge_allowed(self) -> None:
        """Raise if the adapters cannot be merged into this model."""

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: the active ones) into the base weights, keeping them for `unmerge_adapter`."""
        self._check_merge_allowed()
        for layer in self._tuner_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Take all merged adapters out of the base weights."""
        for layer in self._tuner_layers():
            layer.unmerge()

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None, merge_kwargs: Optional[dict] = None,
    ) -> nn.Module:
        """Replace every adapter layer by its base layer (merging the adapters first when `merge`).

        A layer with a `_merge_and_unload_layer(safe_merge=, adapter_names=, **merge_kwargs)` method (e.g.
        LoRA on an NF4 layer) builds its own replacement: it returns `(module, info)`, and the non-None
        infos are collected in `self._merge_infos` (qualified module name -> info).
        """
        self._merge_infos = {}
        if merge:
            self._check_merge_allowed()
        layer_names = {k for k, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)}
        keys = [k for k, _ in self.model.named_modules() if k and not _is_under(k.rpartition(".")[0], layer_names)]
        if progressbar:
            from tqdm import tqdm

            keys = tqdm(keys, desc="Unloading " + ("and merging " if merge else "") + "model")
        for key in keys:
            try:
                parent, target, target_name = _get_submodules(self.model, key)
            except AttributeError:
                continue  # under a module replaced earlier in this loop
            if isinstance(target, AuxiliaryTrainingWrapper):  # modules_to_save, trainable tokens
                new = target.unload_and_optionally_merge_module(merge, safe_merge, adapter_names)
                setattr(parent, target_name, new)
            elif isinstance(target, BaseTunerLayer):
                own = getattr(target, "_merge_and_unload_layer", None) if merge else None
                if own is not None:
                    new, info = own(safe_merge=safe_merge, adapter_names=adapter_names, **(merge_kwargs or {}))
                    if info is not None:
                        self._merge_infos[key] = info
                    setattr(parent, target_name, new)
                    continue
                if merge:
                    self._merge_layer(target, safe_merge=safe_merge, adapter_names=adapter_names)
                setattr(parent, target_name, target.get_base_layer())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def _merge_layer(self, layer: BaseTunerLayer, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
        """Merge `layer`'s adapters into its base weights (the mixed tuner merges a whole nest of layers)."""
        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model (no adapter layers)."""
        return self._unload_and_optionally_merge(
            merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def unload(self) -> nn.Module:
        """Remove all adapter layers without merging and return the original base model."""
        return self._unload_and_optionally_merge(merge=False)
