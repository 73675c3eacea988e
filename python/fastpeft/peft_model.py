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
    AdapterCheckpointError,
    SAFETENSORS_WEIGHTS_NAME,
    get_peft_model_state_dict,
    load_adapter_config,
    load_peft_weights,
    save_adapter_files,
    set_peft_model_state_dict,
)
from .config import PeftConfig, TaskType
from .training import _enable_input_require_grads
from .tuners.lora.inits import adapter_weights_assigned_later

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
    "BOTTLENECK": ("fastpeft.tuners.bottleneck", "BottleneckModel"),
    "TRAINABLE_TOKENS": ("fastpeft.tuners.trainable_tokens", "TrainableTokensModel"),
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


def _first_attr(cfg, names):
    for name in names:
        value = getattr(cfg, name, None)
        if value is None and isinstance(cfg, dict):
            value = cfg.get(name)
        if value is not None:
            return value
    return None


def _prepare_prompt_learning_config(peft_config: PeftConfig, model_config) -> PeftConfig:
    """Fill in what the prompt-learning config leaves open from the model's config (as peft): ``num_layers``,
    ``token_dim``, ``num_attention_heads``, ``num_transformer_submodules``, ``encoder_hidden_size``; for prefix tuning
    on a model with grouped-query attention, the key/value heads and their size."""
    name = type(peft_config).__name__
    cfg = model_config
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    elif isinstance(cfg, dict) and "text_config" in cfg:
        cfg = cfg["text_config"]
    is_prefix = _peft_type_str(peft_config.peft_type) == "PREFIX_TUNING"
    if peft_config.num_transformer_submodules is None:
        peft_config.num_transformer_submodules = (
            2 if _peft_type_str(peft_config.task_type) == "SEQ_2_SEQ_LM" else 1
        )
    fields = (
        ("num_layers", ("num_hidden_layers", "num_layers", "n_layer")),
        ("token_dim", ("hidden_size", "n_embd", "d_model")),
        ("num_attention_heads", ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")),
    )
    for field_name, model_names in fields:
        if getattr(peft_config, field_name) is None:
            value = _first_attr(cfg, model_names) if cfg is not None else None
            # prompt tuning / P-tuning only need token_dim; prefix tuning needs all three
            if value is None and (is_prefix or field_name == "token_dim"):
                raise ValueError(
                    f"{name}: the model's config has none of {list(model_names)}; set `{field_name}` in the "
                    f"{name} (the model's {'hidden size' if field_name == 'token_dim' else field_name.replace('_', ' ')})"
                )
            setattr(peft_config, field_name, value)
    if is_prefix:
        kv_heads = _first_attr(cfg, ("num_key_value_heads",)) if cfg is not None else None
        if kv_heads is not None:  # grouped-query attention: the cache holds the key/value heads
            head_dim = _first_attr(cfg, ("head_dim",)) or peft_config.token_dim // peft_config.num_attention_heads
            peft_config.token_dim = head_dim * kv_heads
            peft_config.num_attention_heads = kv_heads
        if peft_config.token_dim % peft_config.num_attention_heads:
            raise ValueError(
                f"{name}: token_dim ({peft_config.token_dim}) must be divisible by num_attention_heads "
                f"({peft_config.num_attention_heads}) to split the prefix into heads"
            )
    if hasattr(peft_config, "encoder_hidden_size") and peft_config.encoder_hidden_size is None:
        peft_config.encoder_hidden_size = peft_config.token_dim
    return peft_config


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
        self.active_adapter = adapter_name
        self.peft_type = peft_config.peft_type
        # special PEFT arguments removed before calling the base model's forward
        self.special_peft_forward_args = {"adapter_names", "alora_offsets"}
        self._is_prompt_learning = bool(peft_config.is_prompt_learning)
        self._peft_config = None
        self._adapters_disabled = False

        if self._is_prompt_learning:
            # as peft: the model itself is `base_model` (no tuner, no injected layers); the prompt encoders live in
            # `self.prompt_encoder`, one per adapter
            if not isinstance(self, _PROMPT_LEARNING_CLASSES):
                raise NotImplementedError(
                    f"{_peft_type_str(peft_config.peft_type)}: prompt learning in fastpeft supports task_type "
                    f"CAUSAL_LM, SEQ_CLS and SEQ_2_SEQ_LM (got task_type={_peft_type_str(peft_config.task_type)!r})"
                )
            self._peft_config = {}
            self.base_model = model
            self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        else:
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
        if self.__dict__.get("_is_prompt_learning"):
            return self._peft_config
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        if self.__dict__.get("_is_prompt_learning"):
            self._peft_config = value
        else:
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
        if self._is_prompt_learning:
            return not self._adapters_disabled
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
        """The adapted model itself (``base_model.model``; ``base_model`` for prompt learning, as peft)."""
        return self.base_model if self._is_prompt_learning else self.base_model.model

    def _get_base_model_class(self, is_prompt_tuning: bool = False):
        return self.get_base_model().__class__

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
        if peft_config.is_prompt_learning and is_trainable:
            raise ValueError(
                "Cannot set a prompt learning adapter to trainable when loading pretrained adapter (the checkpoint "
                "holds the encoder's output, not the encoder; as peft)."
            )
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
        if self._is_prompt_learning:
            self._add_prompt_learning_adapter(adapter_name, peft_config)
            return
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
        if self._is_prompt_learning:
            self._delete_prompt_learning_adapter(adapter_name)
            return
        self.base_model.delete_adapter(adapter_name)
        new_active = self.active_adapters
        if len(new_active) == 1:
            self.active_adapter = new_active[0]

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (trainable unless ``inference_mode``)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found (adapters: {sorted(self.peft_config)}).")
        self.active_adapter = adapter_name
        if self._is_prompt_learning:
            # the prompt encoder is chosen at forward time; only the modules_to_save copies switch
            if inference_mode:
                self.prompt_encoder[adapter_name].requires_grad_(False)
            for module in self._aux_wrappers():
                name = module.check_set_adapter(adapter_name)
                if name is not None and name in module.modules_to_save:
                    module.set_adapter(name, inference_mode=inference_mode)
            return
        _call(self.base_model.set_adapter, adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Enable or disable gradients on the given adapter(s)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._require_adapter(name)
        if self._is_prompt_learning:
            for name in names:
                self.prompt_encoder[name].requires_grad_(requires_grad)
            return
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
        if self._is_prompt_learning:
            # no prompt is added and the modules_to_save wrappers (e.g. a classifier head) use the original modules
            wrappers = self._aux_wrappers()
            grads = [(p, p.requires_grad) for w in wrappers for p in w.parameters()]
            states = [(w, w.disable_adapters) for w in wrappers]
            try:
                for w in wrappers:
                    w.enable_adapters(False)
                self._adapters_disabled = True
                yield
            finally:
                for w, disabled in states:
                    w.enable_adapters(not disabled)
                for p, flag in grads:
                    p.requires_grad_(flag)
                self._adapters_disabled = was_disabled
            return
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

    # ---- prompt learning (prompt tuning, P-tuning, prefix tuning) ------------------------------------------------

    def _aux_wrappers(self) -> list[nn.Module]:
        from .checkpoint import is_aux_wrapper

        return [m for m in self.get_base_model().modules() if is_aux_wrapper(m)]

    def _add_prompt_learning_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        if not peft_config.is_prompt_learning:
            raise ValueError(f"Cannot add a {_peft_type_str(peft_config.peft_type)} adapter to a prompt-learning model")
        self.peft_config[adapter_name] = peft_config
        try:
            _prepare_prompt_learning_config(peft_config, getattr(self.base_model, "config", None))
            self._setup_prompt_encoder(adapter_name)
            _set_trainable(self.base_model, adapter_name, peft_config)
        except Exception:
            self.peft_config.pop(adapter_name, None)
            if "prompt_encoder" in self._modules and adapter_name in self.prompt_encoder:
                del self.prompt_encoder[adapter_name]
                self.prompt_tokens.pop(adapter_name, None)
            raise

    def _find_word_embeddings(self) -> nn.Module:
        base = self.base_model
        try:
            emb = base.get_submodule("embeddings.word_embeddings")  # BERT-like models
        except AttributeError:
            emb = None
        if emb is None and hasattr(base, "get_input_embeddings"):
            try:
                emb = base.get_input_embeddings()
            except (AttributeError, NotImplementedError):
                emb = None
        if emb is None:
            cfg = getattr(base, "config", None)
            if cfg is not None and hasattr(cfg, "get_text_config"):
                cfg = cfg.get_text_config()
            vocab = getattr(cfg, "vocab_size", None)
            for name, param in base.named_parameters():
                if vocab is not None and param.dim() == 2 and param.shape[0] == vocab:
                    emb = base.get_submodule(name.rpartition(".")[0])
                    break
        if not isinstance(emb, nn.Module) or not hasattr(emb, "weight"):
            raise ValueError(
                f"could not find the input word embeddings of {type(base).__name__} (tried "
                "`embeddings.word_embeddings`, get_input_embeddings() and a parameter with vocab_size rows)"
            )
        return emb

    def _setup_prompt_encoder(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        if "prompt_encoder" not in self._modules:
            self.prompt_encoder = nn.ModuleDict({})
            self.prompt_tokens: dict[str, torch.Tensor] = {}
        self.base_model.requires_grad_(False)  # only the prompt encoder (and modules_to_save) train
        self.transformer_backbone_name = next(
            (n for n, m in self.base_model.named_children() if hasattr(m, "config") and hasattr(m, "forward")), None
        )
        self.word_embeddings = self._find_word_embeddings()
        peft_type = _peft_type_str(config.peft_type)
        if peft_type == "PROMPT_TUNING":
            from .tuners.prompt_tuning.model import PromptEmbedding

            encoder = PromptEmbedding(config, self.word_embeddings)
        elif peft_type == "P_TUNING":
            from .tuners.p_tuning.model import PromptEncoder

            encoder = PromptEncoder(config)
        elif peft_type == "PREFIX_TUNING":
            # peft refuses gradient checkpointing here; fastpeft supports it for decoder-only models (see
            # `_prefix_for_forward`)
            if config.num_transformer_submodules != 1 and any(
                getattr(m, "gradient_checkpointing", False) is True for m in self.base_model.modules()
            ):
                raise ValueError(
                    "PREFIX_TUNING with gradient checkpointing is supported for decoder-only models only (peft "
                    "supports it for none)"
                )
            from .tuners.prefix_tuning.model import PrefixEncoder

            encoder = PrefixEncoder(config)
        else:
            raise ValueError(f"prompt-learning method {peft_type} is not supported by fastpeft")
        encoder = encoder.to(self.word_embeddings.weight.device)
        if config.inference_mode:  # a loaded adapter is frozen (peft leaves it trainable)
            encoder.requires_grad_(False)
        self.prompt_encoder[adapter_name] = encoder
        self.prompt_tokens[adapter_name] = torch.arange(config.num_virtual_tokens * config.num_transformer_submodules)

    def _delete_prompt_learning_adapter(self, adapter_name: str) -> None:
        del self.peft_config[adapter_name]
        del self.prompt_encoder[adapter_name]
        self.prompt_tokens.pop(adapter_name, None)
        remaining = list(self.peft_config)
        for module in self._aux_wrappers():
            module.delete_adapter(adapter_name, new_active_adapters=remaining[:1] or None)
        if adapter_name == self.active_adapter:
            if remaining:
                warnings.warn(
                    f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}."
                )
                self.active_adapter = remaining[0]
            else:
                self.active_adapter = []

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """What peft stores as ``prompt_embeddings``: the encoder's output for all virtual tokens (CPU, detached)."""
        self._require_adapter(adapter_name)
        with torch.no_grad():
            return self.prompt_encoder[adapter_name].prompt().detach().cpu()

    def _active_prompt_config(self) -> Optional[PeftConfig]:
        """The active prompt-learning config, or None when prompts are not to be added (other methods, disabled)."""
        if not self._is_prompt_learning or self._adapters_disabled:
            return None
        return self.active_peft_config

    def get_prompt(self, batch_size: int, task_ids: Optional[torch.Tensor] = None,
                   max_cache_len: Optional[int] = None):
        """The active adapter's prompt for a batch: ``[batch, tokens, dim]`` (a broadcast view, no copy) for prompt
        tuning / P-tuning; a ``transformers`` cache holding the key/value prefixes for prefix tuning."""
        config = self.active_peft_config
        prompt = self.prompt_encoder[self.active_adapter].prompt()
        if _peft_type_str(config.peft_type) == "PREFIX_TUNING":
            return self._prefix_cache(self._prefix_layers(prompt, batch_size), config)
        return prompt.unsqueeze(0).expand(batch_size, -1, -1)

    def _prefix_for_forward(self, batch_size: int):
        """(the prefix cache for one training / inference forward, a context manager to call the base model in).
        With gradient checkpointing active (training, grad enabled) the cache is read-only and the checkpointed
        layers keep it (`tuners.prefix_tuning.model`), so that their recomputation in backward sees the same
        prefix; otherwise it is `get_prompt`'s."""
        if self.training and torch.is_grad_enabled():
            from .tuners.prefix_tuning.model import (
                checkpointing_layers, keep_prefix_under_checkpointing, read_only_prefix_cache,
            )

            if checkpointing_layers(self.base_model):
                if self.active_peft_config.num_transformer_submodules != 1:
                    raise ValueError(
                        "PREFIX_TUNING with gradient checkpointing is supported for decoder-only models only"
                    )
                context = keep_prefix_under_checkpointing(self.base_model)
                source = self.prompt_encoder[self.active_adapter].prompt()
                return read_only_prefix_cache(source, lambda flat: self._prefix_layers(flat, batch_size)), context
        return self.get_prompt(batch_size), contextlib.nullcontext()

    def _prefix_layers(self, flat: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[tokens, num_layers * 2 * token_dim]`` -> per decoder layer (key, value), each
        ``[batch, heads, tokens, head_dim]`` (broadcast over the batch, no copy)."""
        config = self.active_peft_config
        dtype = self.base_model_torch_dtype
        if dtype is not None and flat.dtype != dtype:
            flat = flat.to(dtype)
        n_layers, heads, tokens = config.num_layers, config.num_attention_heads, config.num_virtual_tokens
        kv = flat.view(tokens, 2 * n_layers, heads, config.token_dim // heads).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # [2 * layers, batch, heads, tokens, head_dim]
        if config.num_transformer_submodules == 2:
            # peft's layout for encoder-decoder models: the rows are duplicated ([k0 v0 k1 v1 ...] twice) and cut in
            # groups of four (self key, self value, cross key, cross value); the cross-attention part is then
            # dropped, so decoder layer i gets rows 4i and 4i + 1 (modulo 2 * layers)
            rows = 2 * n_layers
            return [(kv[(4 * i) % rows], kv[(4 * i + 1) % rows]) for i in range(n_layers)]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(n_layers)]

    def _prefix_cache(self, layers, config):
        from transformers import DynamicCache, EncoderDecoderCache

        cache = DynamicCache(layers)
        if config.num_transformer_submodules == 2:
            # the cross-attention cache starts empty: the encoder's keys/values are computed by the model
            return EncoderDecoderCache(cache, DynamicCache())
        return cache

    def _fill_prefix_cache(self, cache, batch_size: int) -> None:
        """Write the active prefix into an empty cache made by ``generate`` (in place, so that generate keeps using
        its own cache object)."""
        target = getattr(cache, "self_attention_cache", cache)
        for layer_idx, (key, value) in enumerate(
            self._prefix_layers(self.prompt_encoder[self.active_adapter].prompt(), batch_size)
        ):
            target.update(key, value, layer_idx)

    def _generation_cache(self, model_kwargs: dict):
        """(the key under which the model takes its cache, the cache of this decoding step or None). With
        ``use_cache=False`` the cache the model returned last step is dropped: every step runs the whole sequence."""
        keys = [k for k in ("cache", "past_key_values") if k in model_kwargs]
        if model_kwargs.get("use_cache", True) is False:
            for k in keys:
                model_kwargs.pop(k)
            keys = []
        if keys:
            return keys[0], model_kwargs[keys[0]]
        return self._cache_kwarg(self.base_model) or "past_key_values", None

    def _cache_kwarg(self, module: nn.Module) -> Optional[str]:
        """The name under which ``module.forward`` takes a key/value cache (``cache`` in transformers >= 5.x)."""
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            return "cache"
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return "cache"
        return None

    def _check_prompt_inputs(self, input_ids, inputs_embeds, attention_mask, what: str = "attention_mask") -> int:
        batch_size = _get_batch_size(input_ids, inputs_embeds)
        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
                raise ValueError(
                    f"{_peft_type_str(self.peft_type)}: {what} must be a 2-D [batch, sequence] tensor of the real "
                    f"tokens (the virtual tokens are added internally), got {shape}"
                )
            if tuple(attention_mask.shape) != (batch_size, seq_len):
                raise ValueError(
                    f"{_peft_type_str(self.peft_type)}: {what} has shape {tuple(attention_mask.shape)}, expected "
                    f"{(batch_size, seq_len)} (batch, sequence length of the inputs; the virtual tokens are added "
                    "internally)"
                )
        return batch_size

    @staticmethod
    def _with_prefix_mask(mask: Optional[torch.Tensor], num_virtual_tokens: int) -> Optional[torch.Tensor]:
        if mask is None:
            return None
        return torch.cat((mask.new_ones(mask.shape[0], num_virtual_tokens), mask), dim=1)

    def _adjust_prompt_learning_kwargs(self, peft_config: PeftConfig, kwargs: dict,
                                       remove_token_type_ids: bool = True) -> None:
        """peft's treatment of position / token type ids: offset by the prefix length for prefix tuning, dropped
        (with a warning) for the methods that insert virtual tokens."""
        if kwargs.get("position_ids", None) is not None:
            if _peft_type_str(peft_config.peft_type) == "PREFIX_TUNING":
                kwargs["position_ids"] = kwargs["position_ids"] + peft_config.num_virtual_tokens
            else:
                warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
                kwargs["position_ids"] = None
        if remove_token_type_ids and kwargs.get("token_type_ids", None) is not None:
            warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
            kwargs["token_type_ids"] = None

    def _embed_with_prompt(self, input_ids, inputs_embeds, batch_size: int, num_tokens: Optional[int] = None):
        """``[prompt; embeddings]`` along the sequence; only the first ``num_tokens`` virtual tokens if given."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        prompts = self.get_prompt(batch_size)
        if num_tokens is not None:
            prompts = prompts[:, :num_tokens]
        return torch.cat((prompts.to(inputs_embeds.dtype), inputs_embeds), dim=1)

    # ---- merging (forwarded to the tuner) ----------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge the active (or the given) adapters into the base weights; undo with :meth:`unmerge_adapter`."""
        self._refuse_for_prompt_learning("merge_adapter")
        for name in adapter_names or []:
            self._require_adapter(name)
        _call(self.base_model.merge_adapter, adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._refuse_for_prompt_learning("unmerge_adapter")
        self.base_model.unmerge_adapter()

    def _refuse_for_prompt_learning(self, what: str) -> None:
        if self._is_prompt_learning:
            raise ValueError(
                f"{what}: {_peft_type_str(self.peft_type)} adds virtual tokens / key-value prefixes, not weights "
                "that can be merged into the model; use get_base_model() for the unchanged model"
            )

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None, **kwargs):
        """Merge the adapters into the base weights and return the base model without adapter layers.

        Extra keyword arguments go to the tuner's ``merge_and_unload`` (LoRA: ``requantize``, ``dtype`` for
        layers on NF4 weights, see :meth:`fastpeft.LoraModel.merge_and_unload`).
        """
        self._refuse_for_prompt_learning("merge_and_unload")
        for name in adapter_names or []:
            self._require_adapter(name)
        return self.base_model.merge_and_unload(
            progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names, **kwargs
        )

    def unload(self):
        """Remove the adapter layers without merging; return the base model."""
        self._refuse_for_prompt_learning("unload")
        return self.base_model.unload()

    # ---- parameters ----------------------------------------------------------------------------------------------

    def get_layer_status(self):
        """The status of each adapter layer (``fastpeft.status.get_layer_status``, peft's fields)."""
        from .status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self):
        """The adapter status of the whole model (``fastpeft.status.get_model_status``, peft's fields)."""
        from .status import get_model_status

        return get_model_status(self)

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

            # the config is saved with inference_mode=True and the base model's name, committed together with the
            # weights (save_adapter_files): a process killed mid-save leaves the previous adapter or the new one,
            # never new weights with the previous config
            if peft_config.base_model_name_or_path is None:
                peft_config.base_model_name_or_path = self.get_base_model().__dict__.get("name_or_path", None) or None
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
                    save_adapter_files(
                        output_dir, output_state_dict, config_to_save.to_json_text(auto_mapping_dict),
                        metadata={"format": "pt"},
                    )
            finally:
                peft_config.inference_mode = inference_mode

        if hasattr(self.base_model, "_save_experts"):  # X-LoRA: its LoRA experts, one directory each (as peft)
            self.base_model._save_experts(save_directory, is_main_process=is_main_process)

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
        if _peft_type_str(config.peft_type) == "XLORA":
            # X-LoRA: where its LoRA experts are loaded from (`adapters=` name -> directory, else as stored)
            from .tuners.xlora.model import resolve_expert_paths

            resolve_expert_paths(config, os.path.join(os.fspath(model_id), subfolder or ""), kwargs.pop("adapters", None))

        if config.is_prompt_learning and is_trainable:
            raise ValueError(
                "Cannot set a prompt learning adapter to trainable when loading pretrained adapter (the checkpoint "
                "holds the encoder's output, not the encoder; as peft)."
            )
        if key_mapping is None:
            key_mapping = {} if config.is_prompt_learning else (getattr(model, "_checkpoint_conversion_mapping", {}) or {})

        if hasattr(config, "runtime_config"):
            config.runtime_config.ephemeral_gpu_offload = ephemeral_gpu_offload
        elif ephemeral_gpu_offload:
            warnings.warn("Ephemeral GPU offloading is not supported for this model. Ignoring.")

        config.inference_mode = not is_trainable
        task_type = _peft_type_str(config.task_type) if config.task_type is not None else None
        model_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type, cls) if task_type is not None else cls
        with adapter_weights_assigned_later():  # the checkpoint's weights replace the init's
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
            with adapter_weights_assigned_later():  # the checkpoint's weights replace the init's
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
        except Exception as exc:
            if added and len(self.peft_config) > 1:
                with contextlib.suppress(Exception):
                    self.delete_adapter(adapter_name)
            if isinstance(exc, AdapterCheckpointError) and SAFETENSORS_WEIGHTS_NAME not in str(exc):
                where = os.path.join(os.fspath(model_id), subfolder or "", SAFETENSORS_WEIGHTS_NAME)
                raise type(exc)(f"{where}: {exc}") from exc
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
        if self._active_prompt_config() is not None:
            return self._prompt_classifier_forward(
                input_ids, attention_mask, inputs_embeds, labels, output_attentions, output_hidden_states,
                return_dict, self._strip_special(kwargs),
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

    def _prompt_classifier_forward(self, input_ids, attention_mask, inputs_embeds, labels, output_attentions,
                                   output_hidden_states, return_dict, kwargs):
        config = self.active_peft_config
        batch_size = self._check_prompt_inputs(input_ids, inputs_embeds, attention_mask)
        n = config.num_virtual_tokens
        self._adjust_prompt_learning_kwargs(config, kwargs, remove_token_type_ids=False)
        kwargs.update(
            attention_mask=self._with_prefix_mask(attention_mask, n), labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        )
        if _peft_type_str(config.peft_type) == "PREFIX_TUNING":
            cache_kwarg = self._cache_kwarg(self.base_model)
            if cache_kwarg is None:
                raise ValueError(
                    f"{type(self.base_model).__name__}.forward takes no cache (`cache` / `past_key_values`), which "
                    "prefix tuning needs"
                )
            kwargs.pop("past_key_values", None)
            kwargs[cache_kwarg], context = self._prefix_for_forward(batch_size)
            with context:
                return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat((tt.new_zeros(batch_size, n), tt), dim=1).long()
        inputs_embeds = self._embed_with_prompt(input_ids, inputs_embeds, batch_size)
        return self.base_model(inputs_embeds=inputs_embeds, **kwargs)


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
        self.base_model_prepare_inputs_for_generation = getattr(self.base_model, "prepare_inputs_for_generation", None)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self._is_prompt_learning:
            if self._adapters_disabled:
                return self.base_model(
                    input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                    output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                    return_dict=return_dict, **self._strip_special(kwargs),
                )
            return self._prompt_causal_lm_forward(
                input_ids, attention_mask, inputs_embeds, labels, output_attentions, output_hidden_states,
                return_dict, self._strip_special(kwargs),
            )
        from .tuners.lora.alora import offsets_for_forward

        kwargs = offsets_for_forward(self, input_ids, inputs_embeds, kwargs)  # aLoRA adapters only (peft's rule)
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

    def _prompt_causal_lm_forward(self, input_ids, attention_mask, inputs_embeds, labels, output_attentions,
                                  output_hidden_states, return_dict, kwargs):
        config = self.active_peft_config
        batch_size = self._check_prompt_inputs(input_ids, inputs_embeds, attention_mask)
        n = config.num_virtual_tokens
        self._adjust_prompt_learning_kwargs(config, kwargs)
        kwargs.update(
            attention_mask=self._with_prefix_mask(attention_mask, n), output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict,
        )
        if _peft_type_str(config.peft_type) == "PREFIX_TUNING":
            cache_kwarg = self._cache_kwarg(self.base_model) or "past_key_values"
            kwargs.pop("past_key_values", None)
            kwargs[cache_kwarg], context = self._prefix_for_forward(batch_size)
            with context:
                return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        if labels is not None:
            labels = torch.cat((labels.new_full((batch_size, n), -100), labels), dim=1)
        inputs_embeds = self._embed_with_prompt(input_ids, inputs_embeds, batch_size)
        return self.base_model(inputs_embeds=inputs_embeds, labels=labels, **kwargs)

    def generate(self, *args, **kwargs):
        self.base_model.prepare_inputs_for_generation = self.prepare_inputs_for_generation
        if hasattr(self.base_model, "model"):
            self.base_model.model.generation_config = self.generation_config
        else:
            self.base_model.generation_config = self.generation_config
        try:
            if not self._is_prompt_learning:
                from .tuners.lora.alora import offsets_for_generate

                kwargs = offsets_for_generate(self, args, kwargs)  # aLoRA: offsets from the prompt (peft's rule)
            with self._enable_peft_forward_hooks(*args, **kwargs):
                kwargs = self._strip_special(kwargs)
                return self.base_model.generate(*args, **kwargs)
        finally:
            self.base_model.prepare_inputs_for_generation = self.base_model_prepare_inputs_for_generation

    def prepare_inputs_for_generation(self, *args, task_ids: Optional[torch.Tensor] = None, inputs_embeds=None,
                                      **kwargs):
        # `inputs_embeds` is named so that generate() accepts it (it checks this signature)
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        model_kwargs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
        config = self._active_prompt_config()
        if config is None:
            # cache_position is recreated by the model from the inputs (peft drops it for non-prefix methods)
            model_kwargs.pop("cache_position", None)
            return model_kwargs
        return self._prompt_inputs_for_generation(config, model_kwargs, kwargs)

    def _prompt_inputs_for_generation(self, config, model_kwargs: dict, kwargs: dict) -> dict:
        """One decoding step's inputs with the prompt: the virtual tokens (or the key/value prefix) are added on the
        first step only, when the cache is empty; the attention mask always gets the prefix's columns."""
        from transformers import Cache

        n = config.num_virtual_tokens
        is_prefix = _peft_type_str(config.peft_type) == "PREFIX_TUNING"
        cache_key, cache = self._generation_cache(model_kwargs)
        # the cache tells whether the prompt is in already (without a cache every step runs the whole sequence)
        first = cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0)
        input_ids = model_kwargs.get("input_ids")
        batch_size = (input_ids if input_ids is not None else model_kwargs["inputs_embeds"]).shape[0]

        mask = model_kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 2:
                raise ValueError(
                    f"{_peft_type_str(config.peft_type)}: generate() needs a 2-D attention mask (got {mask.dim()}-D, "
                    "e.g. from a static cache); use the default dynamic cache"
                )
            model_kwargs["attention_mask"] = self._with_prefix_mask(mask, n)

        if is_prefix:
            if model_kwargs.get("position_ids") is not None:
                model_kwargs["position_ids"] = model_kwargs["position_ids"] + n
            if first:
                if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                    self._fill_prefix_cache(cache, batch_size)
                else:
                    model_kwargs[cache_key] = self.get_prompt(batch_size)
                if model_kwargs.get("cache_position") is not None:
                    model_kwargs["cache_position"] = model_kwargs["cache_position"] + n
            return model_kwargs

        # prompt tuning / P-tuning: positions follow the (longer) sequence, as in forward
        model_kwargs.pop("position_ids", None)
        model_kwargs.pop("cache_position", None)
        if model_kwargs.get("token_type_ids") is not None:
            model_kwargs["token_type_ids"] = None
        if first:
            model_kwargs["inputs_embeds"] = self._embed_with_prompt(
                input_ids, model_kwargs.get("inputs_embeds") if input_ids is None else None, batch_size
            )
            model_kwargs["input_ids"] = None
        return model_kwargs


class PeftModelForSeq2SeqLM(PeftModel):
    """PeftModel for sequence-to-sequence language modelling, with ``generate``."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.base_model_prepare_inputs_for_generation = getattr(self.base_model, "prepare_inputs_for_generation", None)
        self.base_model_prepare_encoder_decoder_kwargs_for_generation = getattr(
            self.base_model, "_prepare_encoder_decoder_kwargs_for_generation", None
        )

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self._is_prompt_learning and not self._adapters_disabled:
            return self._prompt_seq2seq_forward(
                input_ids, attention_mask, inputs_embeds, decoder_input_ids, decoder_attention_mask,
                decoder_inputs_embeds, labels, output_attentions, output_hidden_states, return_dict,
                self._strip_special(kwargs),
            )
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

    def _prompt_seq2seq_forward(self, input_ids, attention_mask, inputs_embeds, decoder_input_ids,
                                decoder_attention_mask, decoder_inputs_embeds, labels, output_attentions,
                                output_hidden_states, return_dict, kwargs):
        config = self.active_peft_config
        batch_size = self._check_prompt_inputs(input_ids, inputs_embeds, attention_mask)
        n = config.num_virtual_tokens
        is_prefix = _peft_type_str(config.peft_type) == "PREFIX_TUNING"
        if decoder_attention_mask is not None and decoder_attention_mask.dim() != 2:
            raise ValueError(
                f"{_peft_type_str(config.peft_type)}: decoder_attention_mask must be 2-D [batch, target length], "
                f"got shape {tuple(decoder_attention_mask.shape)}"
            )
        if is_prefix:  # the decoder's self-attention sees the prefix
            decoder_attention_mask = self._with_prefix_mask(decoder_attention_mask, n)
        self._adjust_prompt_learning_kwargs(config, kwargs)
        kwargs.update(
            attention_mask=attention_mask, decoder_attention_mask=decoder_attention_mask, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        )
        if is_prefix:
            cache_kwarg = self._cache_kwarg(self.base_model) or "past_key_values"
            kwargs.pop("past_key_values", None)
            kwargs[cache_kwarg], context = self._prefix_for_forward(batch_size)
            with context:
                return self.base_model(
                    input_ids=input_ids, inputs_embeds=inputs_embeds, decoder_input_ids=decoder_input_ids,
                    decoder_inputs_embeds=decoder_inputs_embeds, **kwargs,
                )
        # prompt tuning / P-tuning: the encoder input gets the (first num_virtual_tokens) virtual tokens
        kwargs["attention_mask"] = self._with_prefix_mask(attention_mask, n)
        inputs_embeds = self._embed_with_prompt(input_ids, inputs_embeds, batch_size, num_tokens=n)
        return self.base_model(
            inputs_embeds=inputs_embeds, decoder_input_ids=decoder_input_ids,
            decoder_inputs_embeds=decoder_inputs_embeds, **kwargs,
        )

    def generate(self, **kwargs):
        config = self._active_prompt_config()
        self.base_model.prepare_inputs_for_generation = self.prepare_inputs_for_generation
        try:
            if config is not None:
                return self._prompt_seq2seq_generate(config, dict(kwargs))
            with self._enable_peft_forward_hooks(**kwargs):
                kwargs = self._strip_special(kwargs)
                return self.base_model.generate(**kwargs)
        finally:
            self.base_model.prepare_inputs_for_generation = self.base_model_prepare_inputs_for_generation

    def _prompt_seq2seq_generate(self, config, kwargs: dict):
        kwargs = self._strip_special(kwargs)
        kwargs.pop("task_ids", None)
        if kwargs.get("input_ids") is None:
            raise ValueError("input_ids must be provided for Peft model generation")
        self._adjust_prompt_learning_kwargs(config, kwargs)
        self._check_prompt_inputs(kwargs["input_ids"], None, kwargs.get("attention_mask"))
        if _peft_type_str(config.peft_type) == "PREFIX_TUNING":
            return self.base_model.generate(**kwargs)  # the prefix goes into the cache on the first step
        if "encoder_outputs" in kwargs:
            del kwargs["encoder_outputs"]
            warnings.warn("`encoder_outputs` should not be passed to `generate` when using prompt tuning. Ignoring it.")
        input_ids = kwargs.pop("input_ids")
        n = config.num_virtual_tokens
        kwargs["inputs_embeds"] = self._embed_with_prompt(input_ids, None, input_ids.shape[0], num_tokens=n)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = self._with_prefix_mask(kwargs["attention_mask"], n)
        return self.base_model.generate(**kwargs)

    def prepare_inputs_for_generation(self, *args, task_ids: Optional[torch.Tensor] = None, **kwargs):
        model_kwargs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
        config = self._active_prompt_config()
        if config is not None and _peft_type_str(config.peft_type) == "PREFIX_TUNING":
            from transformers import Cache

            cache_key, cache = self._generation_cache(model_kwargs)
            first = cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0)
            if first:
                batch_size = model_kwargs["decoder_input_ids"].shape[0]
                if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                    self._fill_prefix_cache(cache, batch_size)
                else:
                    model_kwargs[cache_key] = self.get_prompt(batch_size)
            mask = model_kwargs.get("decoder_attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                model_kwargs["decoder_attention_mask"] = self._with_prefix_mask(mask, config.num_virtual_tokens)
        return model_kwargs


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
    With ``mixed=True`` the result is a :class:`~fastpeft.mixed_model.PeftMixedModel` (adapters of several
    methods, see there).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_config(peft_config)
    _check_adapter_name(adapter_name)
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

    if mixed:  # adapters of several methods: PeftMixedModel (as peft, autocast_adapter_dtype is not passed)
        from .mixed_model import PeftMixedModel

        return PeftMixedModel(model, peft_config, adapter_name=adapter_name)

    task_type = _peft_type_str(peft_config.task_type) if peft_config.task_type is not None else None
    model_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type, PeftModel) if task_type else PeftModel
    return model_cls(
        model,
        peft_config,
        adapter_name=adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


# the task classes that implement prompt learning (prompt tuning, P-tuning, prefix tuning)
_PROMPT_LEARNING_CLASSES = (PeftModelForCausalLM, PeftModelForSequenceClassification, PeftModelForSeq2SeqLM)
