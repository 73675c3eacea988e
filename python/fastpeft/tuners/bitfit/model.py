"""`BitFitModel`: trains only biases, in place (no adapter layers); checkpoints hold just those biases.

The adapter state dict is the selected biases under their model keys (`base_model.model.<module>.bias`);
loading puts them back (a BitFit config with `add_missing_biases` first adds the zero biases, so the added
ones load too). Merging is a no-op: `merge_and_unload()` / `unload()` return the plain model with the trained
biases. BitFit keeps one set of biases per model, so a second adapter is refused.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

from ...checkpoint import AdapterCheckpointError, _fmt_keys, is_aux_wrapper
from ..base import (
    BaseTuner, _ExcludedModule, _is_under, check_target_module_exists, include_all_linear_layers, set_modules_to_save,
)
from .config import BitFitConfig

_PEFT_PREFIX = "base_model.model."
# layer types whose stock forward uses `self.bias`, so a bias can be added to them
_BIAS_ADDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("bias", None), torch.Tensor)


def _can_add_bias(module: nn.Module) -> bool:
    """A stock nn.Linear / nn.ConvNd without a bias (a subclass with its own forward may ignore `bias`)."""
    if _has_bias(module):
        return False
    for cls in _BIAS_ADDABLE:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return True
    return False


def _add_zero_bias(module: nn.Module) -> None:
    weight = module.weight
    out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    module.bias = nn.Parameter(torch.zeros(out, device=weight.device, dtype=weight.dtype))


def select_bias_modules(model: nn.Module, config: BitFitConfig) -> tuple[list[str], list[str], list[str]]:
    """(selected, to_add, without_bias): names of the modules of `model` whose biases `config` selects (those
    in `to_add` have no bias yet and get a zero one), and the targeted modules that have no bias and get none."""
    target = config.target_modules
    if target is None or (isinstance(target, str) and target.lower() == "all"):
        target = ".*"
    matcher = types.SimpleNamespace(
        target_modules=target, exclude_modules=config.exclude_modules, modules_to_save=config.modules_to_save,
    )
    aux = {n for n, m in model.named_modules() if is_aux_wrapper(m)}
    selected, to_add, without = [], [], []
    for name, module in model.named_modules():
        if not name or is_aux_wrapper(module) or _is_under(name, aux):
            continue
        result = check_target_module_exists(matcher, name)
        if isinstance(result, _ExcludedModule) or not result:
            continue
        if _has_bias(module):
            selected.append(name)
        elif config.add_missing_biases and _can_add_bias(module):
            selected.append(name)
            to_add.append(name)
        elif target != ".*":
            without.append(name)
    return selected, to_add, without


class BitFitModel(BaseTuner):
    """BitFit (https://arxiv.org/abs/2106.10199) on a model: everything frozen but the selected biases.

    Args:
        model: the base model; modified in place (available as `.model`): nothing is wrapped, only zero biases
            are added where `add_missing_biases` asks for them.
        peft_config: a `BitFitConfig`, or a dict adapter name -> `BitFitConfig` (one adapter only).
        adapter_name: the adapter's name (default "default").

    `targeted_module_names` lists the modules whose biases are trained, `added_bias_module_names` those given a
    zero bias.
    """

    prefix: str = "bias"

    def __init__(self, model, peft_config, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
                 state_dict=None) -> None:
        self.added_bias_module_names: list[str] = []
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ---- injection ----

    def _check_new_adapter_config(self, config) -> None:
        if not isinstance(config, BitFitConfig):
            raise TypeError(f"BitFitModel needs a BitFitConfig, got {type(config).__name__}")
        if len(self.peft_config) > 1:
            raise ValueError(
                "BitFit trains the model's own biases in place, so a model has one set of BitFit biases: a second "
                f"BitFit adapter cannot be added (adapters: {sorted(self.peft_config)}). Save this one and load the "
                "other into a fresh copy of the base model instead."
            )

    def _create_and_replace(self, *args, **kwargs) -> None:  # nothing is wrapped
        raise RuntimeError("BitFit wraps no layers")

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        """Select the biases of `self.peft_config[adapter_name]` (adding zero biases where asked), freeze the rest.

        With `state_dict`, the biases selected are those its keys name (`<module>.bias`)."""
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        config = include_all_linear_layers(config, model)
        if state_dict is not None:
            wanted = {k.removeprefix(_PEFT_PREFIX).removesuffix(".bias") for k in state_dict if k.endswith(".bias")}
            config = _FixedSelection(config, wanted)
        selected, to_add, without = select_bias_modules(model, config)
        if not selected:
            hint = (
                " Those targeted have no bias; set add_missing_biases=True to give nn.Linear / nn.ConvNd layers a "
                "zero bias." if without else ""
            )
            raise ValueError(
                f"BitFit selected no biases: target_modules={config.target_modules!r}, "
                f"exclude_modules={config.exclude_modules!r} match no module with a bias.{hint}"
            )
        if without:
            import warnings

            warnings.warn(
                f"BitFit: targeted modules without a bias are skipped: {_fmt_keys(without)}"
                + ("" if config.add_missing_biases
                   else " (add_missing_biases=True gives nn.Linear / nn.ConvNd a zero bias)")
            )
        for name in to_add:
            _add_zero_bias(model.get_submodule(name))
        self.targeted_module_names = list(selected)
        self.added_bias_module_names = list(to_add)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        set_modules_to_save(model, config if not isinstance(config, _FixedSelection) else config.config, adapter_name,
                            activate=adapter_name in self.active_adapters)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze everything but the modules_to_save copies, then the selected biases train (unless inference mode)."""
        aux = {n for n, m in model.named_modules() if is_aux_wrapper(m)}
        for name, p in model.named_parameters():
            if not _is_under(name, aux):
                p.requires_grad = False
        trainable = not any(self.peft_config[a].inference_mode for a in self.active_adapters if a in self.peft_config)
        for param in self._selected_biases(model).values():
            param.requires_grad = trainable

    def _selected_biases(self, model: Optional[nn.Module] = None) -> dict[str, nn.Parameter]:
        """Module name + ".bias" -> the trained bias parameter."""
        model = self.model if model is None else model
        return {f"{n}.bias": model.get_submodule(n).bias for n in self.targeted_module_names}

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Activate the (only) adapter; its biases train unless `inference_mode`."""
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for param in self._selected_biases().values():
            param.requires_grad = not inference_mode

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        if names & set(self.peft_config):
            for param in self._selected_biases().values():
                param.requires_grad = requires_grad

    # ---- what does not apply ----

    def _set_adapter_layers(self, enabled: bool) -> None:
        if not enabled:
            raise RuntimeError(
                "BitFit trains the model's biases in place: there is no separate adapter to disable (the original "
                "biases are not kept). Use a fresh copy of the base model to get its outputs."
            )

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)

    def delete_adapter(self, adapter_name: str) -> None:
        raise RuntimeError(
            "BitFit trains the model's biases in place, so its adapter cannot be deleted (the original biases are "
            "not kept); use unload() to get the plain model, or a fresh copy of the base model."
        )

    # merge_adapter / unmerge_adapter / merge_and_unload / unload: BaseTuner's, with no adapter layers they only
    # unwrap modules_to_save and return the plain model (the biases are already in it: merging is a no-op).

    # ---- checkpoint hooks (see fastpeft.checkpoint) ----

    @classmethod
    def _bias_keys(cls, model: nn.Module, config: BitFitConfig) -> dict[str, str]:
        """Model state-dict key -> checkpoint key of every selected bias of `model` (a PeftModel, a BitFitModel
        or a model with injected BitFit)."""
        for path, module in model.named_modules():
            if isinstance(module, cls):
                prefix = f"{path}.model." if path else "model."
                names = module.targeted_module_names
                break
        else:  # the tuner is not reachable from `model`: select again (added biases exist by now)
            prefix = ""
            names = select_bias_modules(model, config)[0]
        out = {}
        for name in names:
            model_key = f"{prefix}{name}.bias"
            out[model_key] = _PEFT_PREFIX + f"{name}.bias"
        return out

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names=None):
        keys = cls._bias_keys(model, config)
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise KeyError(f"BitFit: the state dict lacks the selected bias(es) {_fmt_keys(missing)}")
        return {k: state_dict[k] for k in keys}

    @staticmethod
    def _remove_adapter_name_from_key(key: str, adapter_name: str) -> str:
        return key  # BitFit keys hold no adapter name (modules_to_save keys arrive without it)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict, model_to_ckpt=None):
        """Checkpoint keys -> model keys; every key must be a selected bias (or a modules_to_save tensor) and
        every selected bias must be present, else AdapterCheckpointError naming the keys."""
        keys = cls._bias_keys(model, config)
        aux = {_strip(n) for n, m in model.named_modules() if is_aux_wrapper(m)}
        ckpt_to_model = {}
        for model_key in keys:
            ckpt_to_model[model_key] = model_key
            ckpt_to_model[keys[model_key]] = model_key
            tail = keys[model_key][len(_PEFT_PREFIX):]
            ckpt_to_model[tail] = model_key
            if model_to_ckpt is not None:
                model_to_ckpt[model_key] = keys[model_key]
        out, unexpected = {}, []
        for k, v in state_dict.items():
            if k in ckpt_to_model:
                out[ckpt_to_model[k]] = v
            elif _is_under(k, aux):
                out[k] = v
            else:
                unexpected.append(k)
        missing = [keys[k] for k in keys if k not in out]
        problems = []
        if unexpected:
            problems.append(
                f"{len(unexpected)} unexpected key(s) (not a bias this BitFit config selects): {_fmt_keys(unexpected)}"
            )
        if missing:
            problems.append(
                f"{len(missing)} missing bias(es) (selected but not in the checkpoint): {_fmt_keys(missing)}"
            )
        if problems:
            raise AdapterCheckpointError(
                f"cannot load the checkpoint into BitFit adapter {adapter_name!r}: " + " | ".join(problems)
            )
        return out


def _strip(name: str) -> str:
    return name.removeprefix("_fsdp_wrapped_module.")


class _FixedSelection:
    """A config view whose target_modules are exactly `names` (inject_adapter with a state dict)."""

    def __init__(self, config: BitFitConfig, names: set[str]):
        self.config = config
        self.target_modules = names
        self.exclude_modules = None
        self.modules_to_save = config.modules_to_save
        self.add_missing_biases = config.add_missing_biases
        self.inference_mode = config.inference_mode
