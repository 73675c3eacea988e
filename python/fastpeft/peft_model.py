"""PeftModel and its task subclasses: peft's wrapper API on fastpeft's tuners.

``get_peft_model(model, config)`` wraps a model: the tuner (e.g. ``LoraModel``) injects adapter layers
in place and becomes ``peft_model.base_model``; the original model is ``peft_model.get_base_model()``.
``save_pretrained`` / ``PeftModel.from_pretrained`` read and write peft's adapter directories
(``adapter_config.json`` + ``adapter_model.safetensors``), see :mod:`fastpeft.checkpoint`.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import os
import warnings
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from .checkpoint import (
    SAFETENSORS_WEIGHTS_NAME,
    get_peft_model_state_dict,
    load_adapter_config,
    load_peft_weights,
    save_safetensors_atomic,
    set_peft_model_state_dict,
)
from .config import PeftConfig, TaskType
from .training import _enable_input_require_grads

__all__ = [
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSequenceClassification",
    "PeftModelForSeq2SeqLM",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "get_peft_model",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
]

# peft_type -> (module, class) of the tuner; used when the tuners package has no registry of its own
_KNOWN_TUNERS = {
    "LORA": ("fastpeft.tuners.lora", "LoraModel"),
    "LOHA": ("fastpeft.tuners.loha", "LoHaModel"),
    "LOKR": ("fastpeft.tuners.lokr", "LoKrModel"),
    "OFT": ("fastpeft.tuners.oft", "OFTModel"),
    "BOFT": ("fastpeft.tuners.boft", "BOFTModel"),
    "IA3": ("fastpeft.tuners.ia3", "IA3Model"),
    "ADALORA": ("fastpeft.tuners.adalora", "AdaLoraModel"),
    "XLORA": ("fastpeft.tuners.xlora", "XLoraModel"),
    "ADAPTION_PROMPT": ("fastpeft.tuners.adaption_prompt", "AdaptionPromptModel"),
    "BITFIT": ("fastpeft.tuners.bitfit", "BitFitModel"),
    "BOTTLENECK": ("fastpeft.tuners.adapter", "BottleneckModel"),
}


def _peft_type_str(peft_type) -> str:
    return getattr(peft_type, "value", peft_type)


_TUNER_IMPORT_ERRORS: dict[str, str] = {}
_TUNER_CACHE: Optional[dict[str, type]] = None


def _tuner_mapping(refresh: bool = False) -> dict[str, type]:
    """peft_type string -> tuner class, from the tuners' registry when they have one, else by import (cached)."""
    global _TUNER_CACHE
    if _TUNER_CACHE is not None and not refresh:
        return _TUNER_CACHE
    _TUNER_IMPORT_ERRORS.clear()
    mapping: dict[str, type] = {}
    try:
        tuners = importlib.import_module("fastpeft.tuners")
    except ImportError as exc:
        _TUNER_IMPORT_ERRORS["fastpeft.tuners"] = repr(exc)
        tuners = None
    for name in ("PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_TUNER", "PEFT_TYPE_TO_MODEL_MAPPING"):
        registry = getattr(tuners, name, None) if tuners is not None else None
        if isinstance(registry, dict):
            mapping.update({_peft_type_str(k): v for k, v in registry.items()})
    for peft_type, (module, cls_name) in _KNOWN_TUNERS.items():
        if peft_type in mapping:
            continue
        try:
            cls = getattr(importlib.import_module(module), cls_name, None)
            if cls is None:  # a package whose __init__ did not run (e.g. a stale editable install): try .model
                cls = getattr(importlib.import_module(module + ".model"), cls_name, None)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the tuner exists but one of its imports is missing
                _TUNER_IMPORT_ERRORS[module] = repr(exc)
            cls = None
        except ImportError as exc:
            _TUNER_IMPORT_ERRORS[module] = repr(exc)
            cls = None
        if cls is not None:
            mapping[peft_type] = cls
    _TUNER_CACHE = mapping
    return mapping


def _tuner_cls(peft_type) -> type:
    key = _peft_type_str(peft_type)
    mapping = _tuner_mapping()
    if key not in mapping:
        mapping = _tuner_mapping(refresh=True)
    if key not in mapping:
        module = _KNOWN_TUNERS.get(key, ("",))[0]
        why = _TUNER_IMPORT_ERRORS.get(module) or _TUNER_IMPORT_ERRORS.get("fastpeft.tuners")
        raise ValueError(
            f"peft_type {key!r} has no tuner in this version of fastpeft (available: {sorted(mapping)})"
            + (f"; importing {module or 'fastpeft.tuners'} failed: {why}" if why else "")
        )
    return mapping[key]


def _call(fn, *args, **kwargs):
    """Call ``fn`` passing only the keyword arguments its signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _check_config(peft_config, what: str = "peft_config") -> None:
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"{what} must be a fastpeft PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
    if peft_config.peft_type is None:
        raise ValueError(f"{what} has no peft_type; use a method's config class such as LoraConfig")
    if peft_config.task_type is not None:
        try:
            TaskType(peft_config.task_type)
        except ValueError:
            raise ValueError(
                f"invalid task_type {peft_config.task_type!r}; must be one of {[t.value for t in TaskType]} or None"
            ) from None


def _check_adapter_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if "." in adapter_name:
        raise ValueError(f"adapter_name must not contain '.', got {adapter_name!r}")


def _get_return_dict(config) -> bool:
    return getattr(config, "return_dict", True) and not getattr(config, "torchscript", False)


def _get_batch_size(input_ids, inputs_embeds) -> int:
    if input_ids is None and inputs_embeds is None:
        raise ValueError("You have to provide either input_ids or inputs_embeds")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


def _device_of(module: nn.Module) -> str:
    for p in module.parameters():
        if p.device.type != "meta":
            return str(p.device)
    return "cpu"


def _set_trainable(model: nn.Module, adapter_name: str, peft_config: PeftConfig) -> None:
    """Wrap the modules named in ``peft_config.modules_to_save`` in ModulesToSaveWrapper (or add this adapter to
    their wrappers) and make the copies trainable unless the config is in inference mode."""
    if not getattr(peft_config, "modules_to_save", None):
        return
    from .tuners.base import set_modules_to_save

    set_modules_to_save(model, peft_config, adapter_name, activate=True)


class PeftModel(nn.Module):
    """A model with adapters; peft's ``PeftModel``.

    Args:
        model: the model to adapt (modified in place).
        peft_config: the adapter's config (e.g. ``LoraConfig``).
        adapter_name: name of the first adapter, ``"default"`` unless given.
        autocast_adapter_dtype: cast fp16/bf16 adapter weights to fp32 (as peft).
        low_cpu_mem_usage: create the adapter weights on the meta device (for loading, not training).

    Attributes:
        base_model: the tuner (e.g. ``LoraModel``) wrapping the adapted model.
        peft_config: dict adapter name -> config.
        active_adapter: name of the active adapter.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_config(peft_config)
        _check_adapter_name(adapter_name)
        if peft_config.is_prompt_learning:
            raise NotImplementedError(
                f"{_peft_type_str(peft_config.peft_type)}: prompt-learning methods are not supported by "
                "fastpeft.PeftModel yet"
            )
        self.active_adapter = adapter_name
        self.peft_type = peft_config.peft_type
        # special PEFT arguments removed before calling the base model's forward
        self.special_peft_forward_args = {"adapter_names", "alora_offsets"}
        self._is_prompt_learning = False
        self._peft_config = None

        cls = _tuner_cls(peft_config.peft_type)
        # low_cpu_mem_usage is the tuner's business (it may create the adapter weights on the meta device);
        # loading then assigns the checkpoint tensors instead of copying into them.
        self.base_model = _call(
            cls, model, {adapter_name: peft_config}, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
        )

        if hasattr(self.base_model, "_cast_adapter_dtype"):
            _call(
                self.base_model._cast_adapter_dtype,
                adapter_name=adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )

        gc_enabled = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if gc_enabled is None:
            gc_enabled = getattr(model, "is_gradient_checkpointing", True)
        if gc_enabled:
            self._prepare_model_for_gradient_checkpointing(model)

        # pretraining_tp simulates tensor parallelism with numerical differences; peft disables it
        base_cfg = getattr(self.base_model, "config", None)
        if base_cfg is not None and hasattr(base_cfg, "pretraining_tp"):
            base_cfg.pretraining_tp = 1

        self._adapters_disabled = False

    # ---- configuration and adapter bookkeeping -------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        self.base_model.peft_config = value

    @property
    def active_adapters(self) -> list[str]:
        try:
            adapters = self.base_model.active_adapters
            if not isinstance(adapters, list):
                adapters = self.active_adapter
                if isinstance(adapters, str):
                    adapters = [adapters]
        except AttributeError:
            adapters = self.active_adapter
            if isinstance(adapters, str):
                adapters = [adapters]
        return adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def has_active_enabled_adapter(self) -> bool:
        return not self._adapters_disabled or not self.active_adapters

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        modules: set[str] = set()
        for config in self.peft_config.values():
            if getattr(config, "modules_to_save", None) is not None:
                modules.update(config.modules_to_save)
        return modules or None

    @property
    def base_model_torch_dtype(self):
        return getattr(self.base_model, "dtype", None)

    def _require_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"unknown adapter name {adapter_name!r}; this model has adapter(s) {sorted(self.peft_config)}"
            )

    def get_base_model(self) -> nn.Module:
        """The adapted model itself (``base_model.model``)."""
        return self.base_model.model

    def _get_base_model_class(self, is_prompt_tuning: bool = False):
        return self.base_model.model.__class__

    def __getattr__(self, name: str) -> Any:
        """Forward missing attributes to the tuner (which forwards them to the wrapped model)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not initialised yet: no recursion
                raise
            return getattr(self.base_model, name)

    def _prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        if not (
            getattr(model, "is_loaded_in_8bit", False)
            or getattr(model, "is_loaded_in_4bit", False)
            or getattr(model, "is_quantized", False)
        ):
            _enable_input_require_grads(model)
        return model

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        return self._prepare_model_for_gradient_checkpointing(model)

    def _check_new_adapter_config(self, peft_config: PeftConfig, is_trainable: bool) -> None:
        all_configs = [peft_config] + list(self.peft_config.values())
        if len(all_configs) > 1:
            for init in ("pissa", "corda", "olora"):
                if any(getattr(c, "init_lora_weights", None) == init for c in all_configs):
                    warnings.warn(
                        f"{init.upper() if init != 'corda' else 'CorDA'} changes the base weights of the model and "
                        "should thus not be used with other adapters. Consider converting it into a normal LoRA "
                        "adapter (save_pretrained with path_initial_model_for_weight_conversion)."
                    )
                    break

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new (untrained) adapter; it is not made active (use :meth:`set_adapter`)."""
        _check_adapter_name(adapter_name)
        _check_config(peft_config)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        if _peft_type_str(peft_config.peft_type) != _peft_type_str(self.peft_type):
            raise ValueError(
                "Cannot combine adapters with different peft types. "
                f"Found {_peft_type_str(self.peft_type)} and {_peft_type_str(peft_config.peft_type)}."
            )
        try:
            self.peft_config[adapter_name] = peft_config
            _call(
                self.base_model.inject_adapter,
                self.base_model.model,
                adapter_name,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        except Exception:
            if adapter_name in self.peft_config:
                del self.peft_config[adapter_name]
            raise
        if hasattr(self.base_model, "_cast_adapter_dtype"):
            _call(
                self.base_model._cast_adapter_dtype,
                adapter_name=adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter (its layers and its modules_to_save copies)."""
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"Adapter {adapter_name} does not exist (adapters: {sorted(self.peft_config)})"
            )
        self.base_model.delete_adapter(adapter_name)
        new_active = self.active_adapters
        if len(new_active) == 1:
            self.active_adapter = new_active[0]

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (trainable unless ``inference_mode``)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found (adapters: {sorted(self.peft_config)}).")
        self.active_adapter = adapter_name
        _call(self.base_model.set_adapter, adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Enable or disable gradients on the given adapter(s)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._require_adapter(name)
        if hasattr(self.base_model, "set_requires_grad"):
            self.base_model.set_requires_grad(adapter_names=adapter_names, requires_grad=requires_grad)
            return
        for pname, param in self.base_model.model.named_parameters():
            parts = pname.split(".")
            if any(n in parts for n in names) and ("base_layer" not in parts and "original_module" not in parts):
                param.requires_grad_(requires_grad)

    def _layer_enabled_status(self):
        states = []
        for module in self.base_model.model.modules():
            if hasattr(module, "disable_adapters") and hasattr(module, "base_layer"):
                states.append(not bool(module.disable_adapters))
        if not states or all(states):
            return True
        if not any(states):
            return False
        return "irregular"

    @contextmanager
    def disable_adapter(self):
        """Context manager: run the base model without adapters.

        ```py
        >>> with model.disable_adapter():
        ...     model(inputs)
        ```
        """
        was_disabled = self._adapters_disabled
        enabled = self._layer_enabled_status()
        if enabled == "irregular":
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is most "
                "likely unintentional. After exiting the disable_adapter context, all adapters will be enabled"
            )
        try:
            self.base_model.disable_adapter_layers()
            self._adapters_disabled = True
            yield
        finally:
            if enabled is not False:
                self.base_model.enable_adapter_layers()
            self._adapters_disabled = was_disabled

    # ---- merging (forwarded to the tuner) ----------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge the active (or the given) adapters into the base weights; undo with :meth:`unmerge_adapter`."""
        for name in adapter_names or []:
            self._require_adapter(name)
        _call(self.base_model.merge_adapter, adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None, **kwargs):
        """Merge the adapters into the base weights and return the base model without adapter layers.

        Extra keyword arguments go to the tuner's ``merge_and_unload`` (LoRA: ``requantize``, ``dtype`` for
        layers on NF4 weights, see :meth:`fastpeft.LoraModel.merge_and_unload`).
        """
        for name in adapter_names or []:
            self._require_adapter(name)
        return self.base_model.merge_and_unload(
            progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names, **kwargs
        )

    def unload(self):
        """Remove the adapter layers without merging; return the base model."""
        return self.base_model.unload()

    # ---- parameters ----------------------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(number of trainable parameters, number of all parameters), counted as peft does."""
        trainable, total = 0, 0
        # fastpeft's NF4 layers hold two 4-bit values per uint8 byte of `weight` (as bitsandbytes' Params4bit)
        packed = {id(m.weight) for m in self.modules() if type(m).__name__ == "LinearNF4" and hasattr(m, "quant_state")}
        for _, param in self.named_parameters():
            n = param.numel()
            if n == 0 and hasattr(param, "ds_numel"):
                n = param.ds_numel
            if id(param) in packed:
                n = n * 2
            elif param.__class__.__name__ == "Params4bit":
                if hasattr(param, "element_size"):
                    nbytes = param.element_size()
                elif not hasattr(param, "quant_storage"):
                    nbytes = 1
                else:
                    nbytes = param.quant_storage.itemsize
                n = n * 2 * nbytes
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---- forward / generate --------------------------------------------------------------------------------------

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None and not hasattr(self.base_model, "_enable_peft_forward_hooks"):
            raise NotImplementedError(
                f"{type(self.base_model).__name__} does not support per-sample `adapter_names` (mixed adapter "
                "batches); call set_adapter() instead"
            )
        if hasattr(self.base_model, "_enable_peft_forward_hooks") and self.has_active_enabled_adapter:
            with self.base_model._enable_peft_forward_hooks(*args, **kwargs):
                yield
            return
        yield

    def _strip_special(self, kwargs: dict) -> dict:
        return {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}

    def _forward_base_model(self, kwargs: dict, **inputs: Any):
        """``base_model(**inputs, **kwargs)`` under the tuner's forward hooks (which see only ``kwargs``), the special
        PEFT arguments removed from ``kwargs``: the forward of the task subclasses."""
        with self._enable_peft_forward_hooks(**kwargs):
            kwargs = self._strip_special(kwargs)
            return self.base_model(**inputs, **kwargs)

    def forward(self, *args: Any, **kwargs: Any):
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = self._strip_special(kwargs)
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = self._strip_special(kwargs)
            return self.get_base_model().generate(*args, **kwargs)

    # ---- saving and loading ----------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        save_embedding_layers: Union[str, bool] = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as peft does: the ``"default"`` adapter in ``save_directory``, others in
        ``save_directory/<adapter_name>``, each with ``adapter_config.json`` and ``adapter_model.safetensors``.

        ``state_dict`` (keyword) may pass the full model state dict to export from (as ``Trainer`` does).
        Files are written atomically. Only safetensors is written (``safe_serialization=False`` is refused).
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        if not safe_serialization:
            raise ValueError(
                "fastpeft writes safetensors only (safe_serialization=False would write a pickle, which fastpeft "
                "refuses to read or write); peft reads adapter_model.safetensors just as well"
            )
        if selected_adapters is None:
            selected_adapters = list(self.peft_config.keys())
        else:
            if isinstance(selected_adapters, str):
                selected_adapters = [selected_adapters]
            bad = [n for n in selected_adapters if n not in self.peft_config]
            if bad:
                raise ValueError(
                    "You passed an invalid `selected_adapters` arguments, current supported adapter names are"
                    f" {list(self.peft_config.keys())} - got {selected_adapters}."
                )
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)

        for adapter_name in selected_adapters:
            peft_config = self.peft_config[adapter_name]
            output_state_dict = get_peft_model_state_dict(
                self,
                state_dict=kwargs.get("state_dict", None),
                adapter_name=adapter_name,
                save_embedding_layers=save_embedding_layers,
            )
            output_dir = os.path.join(save_directory, adapter_name) if adapter_name != "default" else save_directory

            if path_initial_model_for_weight_conversion is not None:
                tuner_cls = type(self.base_model)
                convert = getattr(tuner_cls, "_convert_state_dict_for_initial_model", None)
                if convert is None:
                    raise ValueError(
                        "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                        f"for {tuner_cls.__name__}."
                    )
                init_config = copy.deepcopy(peft_config)
                if _peft_type_str(init_config.peft_type) == "LORA":
                    init_config.init_lora_weights = True
                else:
                    init_config.init_weights = True
                if is_main_process:
                    init_config.save_pretrained(path_initial_model_for_weight_conversion)
                output_state_dict = convert(
                    self, init_config, path_initial_model_for_weight_conversion, output_state_dict, kwargs
                )

            if is_main_process:
                os.makedirs(output_dir, exist_ok=True)
                save_safetensors_atomic(
                    output_state_dict, os.path.join(output_dir, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"}
                )

            # the config is saved with inference_mode=True and the base model's name
            if peft_config.base_model_name_or_path is None:
                peft_config.base_model_name_or_path = self.base_model.model.__dict__.get("name_or_path", None) or None
            inference_mode = peft_config.inference_mode
            peft_config.inference_mode = True
            if peft_config.task_type is None:
                base_model_class = self._get_base_model_class()
                auto_mapping_dict = {
                    "base_model_class": base_model_class.__name__,
                    "parent_library": base_model_class.__module__,
                }
            else:
                auto_mapping_dict = None
            try:
                if is_main_process:
                    config_to_save = peft_config
                    if path_initial_model_for_weight_conversion is not None:
                        config_to_save = copy.deepcopy(peft_config)
                        config_to_save.init_lora_weights = True
                        config_to_save.r *= 2
                        if not config_to_save.use_rslora:
                            config_to_save.lora_alpha *= 2
                        else:
                            config_to_save.lora_alpha *= 2**0.5
                        if config_to_save.rank_pattern:
                            config_to_save.rank_pattern = {k: 2 * v for k, v in config_to_save.rank_pattern.items()}
                        if config_to_save.alpha_pattern:
                            config_to_save.alpha_pattern = {k: 2 * v for k, v in config_to_save.alpha_pattern.items()}
                    config_to_save.save_pretrained(output_dir, auto_mapping_dict=auto_mapping_dict)
            finally:
                peft_config.inference_mode = inference_mode

    def push_to_hub(self, *args, **kwargs):
        raise NotImplementedError(
            "fastpeft does not upload to the Hugging Face Hub; save_pretrained to a directory and upload it with "
            "huggingface_hub"
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: Optional[dict[str, str]] = None,
        **kwargs: Any,
    ) -> "PeftModel":
        """Wrap ``model`` and load the adapter stored in the local directory ``model_id``.

        The adapter is frozen (inference mode) unless ``is_trainable``. ``subfolder`` (keyword) selects a
        sub-directory, e.g. a non-default adapter written by ``save_pretrained``.
        """
        _check_adapter_name(adapter_name)
        subfolder = kwargs.get("subfolder", None)
        if config is None:
            config = load_adapter_config(model_id, subfolder=subfolder)
        elif isinstance(config, PeftConfig):
            config.inference_mode = not is_trainable
        else:
            raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
        _check_config(config, "config")

        if key_mapping is None:
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", {}) or {}

        if hasattr(config, "runtime_config"):
            config.runtime_config.ephemeral_gpu_offload = ephemeral_gpu_offload
        elif ephemeral_gpu_offload:
            warnings.warn("Ephemeral GPU offloading is not supported for this model. Ignoring.")

        config.inference_mode = not is_trainable
        task_type = _peft_type_str(config.task_type) if config.task_type is not None else None
        model_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type, cls) if task_type is not None else cls
        peft_model = model_cls(
            model,
            config,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        peft_model.load_adapter(
            model_id,
            adapter_name,
            is_trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            key_mapping=key_mapping,
            **kwargs,
        )
        return peft_model

    def load_adapter(
        self,
        model_id: Union[str, os.PathLike],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: Optional[str] = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: Optional[dict[str, str]] = None,
        **kwargs: Any,
    ):
        """Load a trained adapter from a local directory under ``adapter_name`` (not made active).

        Raises a ``ValueError`` naming the offending keys when the checkpoint does not fit the model
        (``ignore_mismatched_sizes=True`` skips tensors of the wrong shape).
        """
        _check_adapter_name(adapter_name)
        subfolder = kwargs.get("subfolder", None)
        ignore_mismatched_sizes = kwargs.get("ignore_mismatched_sizes", False)
        added = False
        if adapter_name not in self.peft_config:
            peft_config = load_adapter_config(model_id, subfolder=subfolder)
            self._check_new_adapter_config(peft_config, is_trainable=is_trainable)
            if hasattr(peft_config, "runtime_config"):
                peft_config.runtime_config.ephemeral_gpu_offload = ephemeral_gpu_offload
            peft_config.inference_mode = not is_trainable
            self.add_adapter(
                adapter_name,
                peft_config,
                low_cpu_mem_usage=low_cpu_mem_usage,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )
            added = True
            if is_trainable:
                self.set_requires_grad(adapter_name)
        if torch_device is None:
            torch_device = _device_of(self)
        try:
            weights = load_peft_weights(model_id, device=torch_device, subfolder=subfolder, key_mapping=key_mapping)
            load_result = set_peft_model_state_dict(
                self,
                weights,
                adapter_name=adapter_name,
                ignore_mismatched_sizes=ignore_mismatched_sizes,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        except Exception:
            if added and len(self.peft_config) > 1:
                with contextlib.suppress(Exception):
                    self.delete_adapter(adapter_name)
            raise
        if hasattr(self.base_model, "_cast_adapter_dtype"):
            _call(
                self.base_model._cast_adapter_dtype,
                adapter_name=adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )
        if not is_trainable:
            self.eval()
        return load_result


class _PeftModelWithHead(PeftModel):
    """A task model whose head (the children named in ``_head_names``) is trained and saved with every adapter:
    the head is added to each adapter config's ``modules_to_save``."""

    _head_names: tuple[str, ...] = ()

    def _wrap_head(self, peft_config: PeftConfig, adapter_name: str) -> None:
        """After ``PeftModel.__init__``: note the head's name (``cls_layer_name``) and wrap it, trainable."""
        for name, _ in self.base_model.named_children():
            if any(m in name for m in self.modules_to_save or ()):
                self.cls_layer_name = name
                break
        _set_trainable(self, adapter_name, peft_config)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        _add_heads_to_modules_to_save(peft_config, self._head_names)
        return super().add_adapter(
            adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )


class _PeftModelWithClassifier(_PeftModelWithHead):
    """Sequence and token classification: a ``classifier``/``score`` head and the same forward."""

    _head_names = ("classifier", "score")

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return_dict = return_dict if return_dict is not None else _get_return_dict(self.config)
        return self._forward_base_model(
            kwargs,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


class PeftModelForSequenceClassification(_PeftModelWithClassifier):
    """PeftModel for sequence classification; the ``classifier``/``score`` head is trained and saved."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> None:
        _add_heads_to_modules_to_save(peft_config, self._head_names)
        # before the tuner is built: it must not target the heads, and it wraps them in ModulesToSaveWrapper
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self._wrap_head(peft_config, adapter_name)


def _add_heads_to_modules_to_save(peft_config: PeftConfig, head_names) -> None:
    if hasattr(peft_config, "modules_to_save"):
        if peft_config.modules_to_save is None:
            peft_config.modules_to_save = list(head_names)
        else:
            peft_config.modules_to_save = list(peft_config.modules_to_save)
            peft_config.modules_to_save.extend(head_names)


class PeftModelForCausalLM(PeftModel):
    """PeftModel for causal language modelling, with ``generate``."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.base_model_prepare_inputs_for_generation = self.base_model.prepare_inputs_for_generation

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if getattr(self.base_model.config, "model_type", None) == "mpt":
            if inputs_embeds is not None:
                raise AssertionError("forward in MPTForCausalLM does not support inputs_embeds")
            return self.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                **kwargs,
            )
        return self._forward_base_model(
            kwargs,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )

    def generate(self, *args, **kwargs):
        self.base_model.prepare_inputs_for_generation = self.prepare_inputs_for_generation
        if hasattr(self.base_model, "model"):
            self.base_model.model.generation_config = self.generation_config
        else:
            self.base_model.generation_config = self.generation_config
        try:
            with self._enable_peft_forward_hooks(*args, **kwargs):
                kwargs = self._strip_special(kwargs)
                return self.base_model.generate(*args, **kwargs)
        finally:
            self.base_model.prepare_inputs_for_generation = self.base_model_prepare_inputs_for_generation

    def prepare_inputs_for_generation(self, *args, task_ids: Optional[torch.Tensor] = None, **kwargs):
        model_kwargs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
        # cache_position is recreated by the model from the inputs (peft drops it for non-prefix methods)
        model_kwargs.pop("cache_position", None)
        return model_kwargs


class PeftModelForSeq2SeqLM(PeftModel):
    """PeftModel for sequence-to-sequence language modelling, with ``generate``."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.base_model_prepare_inputs_for_generation = self.base_model.prepare_inputs_for_generation
        self.base_model_prepare_encoder_decoder_kwargs_for_generation = getattr(
            self.base_model, "_prepare_encoder_decoder_kwargs_for_generation", None
        )

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return self._forward_base_model(
            kwargs,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )

    def generate(self, **kwargs):
        self.base_model.prepare_inputs_for_generation = self.prepare_inputs_for_generation
        try:
            with self._enable_peft_forward_hooks(**kwargs):
                kwargs = self._strip_special(kwargs)
                return self.base_model.generate(**kwargs)
        finally:
            self.base_model.prepare_inputs_for_generation = self.base_model_prepare_inputs_for_generation

    def prepare_inputs_for_generation(self, *args, task_ids: Optional[torch.Tensor] = None, **kwargs):
        return self.base_model_prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForTokenClassification(_PeftModelWithClassifier):
    """PeftModel for token classification; the ``classifier``/``score`` head is trained and saved."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig = None, adapter_name: str = "default",
                 **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        # peft adds the heads after building the tuner for this task
        _add_heads_to_modules_to_save(peft_config, self._head_names)
        self._wrap_head(peft_config, adapter_name)


class PeftModelForQuestionAnswering(_PeftModelWithHead):
    """PeftModel for extractive question answering; the ``qa_outputs`` head is trained and saved."""

    _head_names = ("qa_outputs",)

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        _add_heads_to_modules_to_save(peft_config, self._head_names)
        self._wrap_head(peft_config, adapter_name)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return_dict = return_dict if return_dict is not None else _get_return_dict(self.config)
        return self._forward_base_model(
            kwargs,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            start_positions=start_positions,
            end_positions=end_positions,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
        )


class PeftModelForFeatureExtraction(PeftModel):
    """PeftModel for feature extraction (embeddings)."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs):
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return self._forward_base_model(
            kwargs,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "CAUSAL_LM": PeftModelForCausalLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` (modified in place) with a new adapter described by ``peft_config``.

    The ``PeftModel`` subclass is chosen from ``peft_config.task_type`` (plain ``PeftModel`` when None).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_config(peft_config)
    _check_adapter_name(adapter_name)
    if mixed:
        raise NotImplementedError("mixed adapter types (PeftMixedModel) are not supported by fastpeft yet")

    old_name = peft_config.base_model_name_or_path
    new_name = model.__dict__.get("name_or_path", None) or None
    peft_config.base_model_name_or_path = new_name
    if any(hasattr(m, "base_layer") and hasattr(m, "active_adapters") for m in model.modules()):
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time. If you want to reload the model with a "
            "different config, make sure to call `.unload()` before."
        )
    if old_name is not None and old_name != new_name:
        warnings.warn(
            f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
            "Please ensure that the correct base model is loaded when loading this checkpoint."
        )
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(
                f"peft config has already set base model revision to {peft_config.revision}, overwriting with "
                f"revision {revision}"
            )
        peft_config.revision = revision

    task_type = _peft_type_str(peft_config.task_type) if peft_config.task_type is not None else None
    model_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type, PeftModel) if task_type else PeftModel
    return model_cls(
        model,
        peft_config,
        adapter_name=adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
