"""Adapter configurations, stored as `adapter_config.json` in Hugging Face PEFT's schema.

Every method's config is a dataclass deriving from `PeftConfig`. The JSON written by
`save_pretrained` has peft's keys (all fields, sets as lists, enums as their string values), so a
directory written here loads in peft and one written by peft loads here. Keys a newer peft wrote
that this version does not know are dropped with a warning; known keys with a value of the wrong
type, or an invalid value, raise an error naming the field.

Methods register their config class in `PEFT_TYPE_TO_CONFIG` with `register_config`;
`PeftConfig.from_peft_type` / `from_pretrained` dispatch on the `peft_type` key.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

CONFIG_NAME = "adapter_config.json"

# The peft release whose adapter_config.json schema this module writes. Written as `peft_version`
# (peft itself parses that field as a version, e.g. for OFT compatibility checks).
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    """The adapter method; the values are peft's `peft_type` strings (plus fastpeft's own methods)."""

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    XLORA = "XLORA"
    # fastpeft's own methods (not in peft); same file layout, their own peft_type
    BITFIT = "BITFIT"
    BOTTLENECK = "BOTTLENECK"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"

    def __str__(self) -> str:  # "LORA", not "PeftType.LORA"
        return self.value


class TaskType(str, enum.Enum):
    """The task of the wrapped model; selects the PeftModel subclass."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


# peft_type -> config class. Filled by `register_config`; `_config_class` imports the module named in
# `_CONFIG_MODULES` on first use so that loading a LoRA config does not need a prior import.
PEFT_TYPE_TO_CONFIG: dict[PeftType, type["PeftConfig"]] = {}
_CONFIG_MODULES: dict[PeftType, str] = {
    PeftType.LORA: "fastpeft.tuners.lora.config",
    PeftType.LOHA: "fastpeft.tuners.loha.config",
    PeftType.LOKR: "fastpeft.tuners.lokr.config",
    PeftType.OFT: "fastpeft.tuners.oft.config",
    PeftType.BOFT: "fastpeft.tuners.boft.config",
    PeftType.IA3: "fastpeft.tuners.ia3.config",
    PeftType.BITFIT: "fastpeft.tuners.bitfit.config",
    PeftType.BOTTLENECK: "fastpeft.tuners.bottleneck.config",
    PeftType.ADAPTION_PROMPT: "fastpeft.tuners.adaption_prompt.config",
    PeftType.PROMPT_TUNING: "fastpeft.tuners.prompt_tuning.config",
    PeftType.P_TUNING: "fastpeft.tuners.p_tuning.config",
    PeftType.PREFIX_TUNING: "fastpeft.tuners.prefix_tuning.config",
    PeftType.ADALORA: "fastpeft.tuners.adalora.config",
    PeftType.XLORA: "fastpeft.tuners.xlora.config",
    PeftType.TRAINABLE_TOKENS: "fastpeft.tuners.trainable_tokens.config",
}


def register_config(peft_type: PeftType | str, module: Optional[str] = None):
    """Class decorator: make `cls` the config class of `peft_type` for `PeftConfig.from_peft_type`."""
    peft_type = PeftType(peft_type)

    def decorator(cls):
        PEFT_TYPE_TO_CONFIG[peft_type] = cls
        if module is not None:
            _CONFIG_MODULES[peft_type] = module
        return cls

    return decorator


def _config_class(peft_type) -> type["PeftConfig"]:
    try:
        peft_type = PeftType(peft_type)
    except (ValueError, TypeError):
        known = ", ".join(t.value for t in PeftType)
        raise ValueError(f"unknown peft_type {peft_type!r}; expected one of: {known}") from None
    if peft_type not in PEFT_TYPE_TO_CONFIG and peft_type in _CONFIG_MODULES:
        importlib.import_module(_CONFIG_MODULES[peft_type])
    if peft_type not in PEFT_TYPE_TO_CONFIG:
        raise NotImplementedError(f"peft_type {peft_type.value!r} is not supported by this version of fastpeft")
    return PEFT_TYPE_TO_CONFIG[peft_type]


# ---- type checking of field values ------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, set, tuple, dict):
        args = typing.get_args(tp)
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _matches(value, tp) -> bool:
    """Whether `value` (as held in a config or read from JSON) fits the annotation `tp`."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Union:
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {m.value for m in tp}
    if origin in (list, set, tuple):
        # JSON has no sets or tuples: a list stands for either, a set for a list (target_modules)
        if not isinstance(value, (list, set, tuple)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(typing.get_args(tp)) > 1 and Ellipsis not in typing.get_args(tp):
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(tp)
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


@dataclass
class PeftConfig:
    """Base of every adapter config: the fields peft's `PeftConfig` has, and the JSON round trip.

    Args:
        task_type: the task of the wrapped model (`TaskType`), or None.
        peft_type: the adapter method; subclasses set it.
        auto_mapping: for custom models, how to retrieve the base model class.
        peft_version: the peft schema version the config was written with (filled in when None).
        base_model_name_or_path: the base model the adapter was trained on.
        revision: the base model's revision.
        inference_mode: whether the adapter is frozen (not trainable).
    """

    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "The type of task."})
    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "The type of PEFT model."})
    auto_mapping: Optional[dict] = field(default=None, metadata={"help": "Mapping to retrieve the base model class."})
    peft_version: Optional[str] = field(default=None, metadata={"help": "PEFT schema version, filled in when empty."})
    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "The name of the base model."})
    revision: Optional[str] = field(default=None, metadata={"help": "The specific base model version to use."})
    inference_mode: bool = field(default=False, metadata={"help": "Whether to use inference mode."})

    def __post_init__(self):
        self._check_field_types()
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ValueError(
                    f"{type(self).__name__}.task_type: invalid task type {self.task_type!r}; must be one of "
                    f"{', '.join(t.value for t in TaskType)}"
                ) from None
        if self.peft_type is not None:
            try:
                self.peft_type = PeftType(self.peft_type)
            except ValueError:
                raise ValueError(
                    f"{type(self).__name__}.peft_type: unknown peft_type {self.peft_type!r}; must be one of "
                    f"{', '.join(t.value for t in PeftType)}"
                ) from None
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION

    def _post_init_tuner(self, peft_type: "PeftType") -> None:
        """The __post_init__ shared by the configs of the layer-injecting methods (LoRA, LoHa, LoKr, OFT,
        BOFT): None rank / alpha patterns (where the config has them) become {}, the field types are
        checked, `peft_type` is set, target / exclude lists become sets, then the config's own
        `_validate()` runs."""
        for name in ("rank_pattern", "alpha_pattern"):
            if hasattr(self, name) and getattr(self, name) is None:
                setattr(self, name, {})
        PeftConfig.__post_init__(self)
        self.peft_type = peft_type
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        self._validate()

    def _check_field_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints.get(f.name, Any)
            if not _matches(value, tp):
                raise TypeError(
                    f"{type(self).__name__}.{f.name} must be {_type_name(tp)}, "
                    f"got {type(value).__name__} {value!r}"
                )

    # ---- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict in peft's schema: sets become lists, enums their values."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write `adapter_config.json` into `save_directory` (created if needed), atomically.

        `auto_mapping_dict` (keyword) is stored as `auto_mapping`, as in peft.
        """
        from .checkpoint import write_config_atomic

        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained: {save_directory!r} is a file, expected a directory")
        write_config_atomic(save_directory, self.to_json_text(kwargs.pop("auto_mapping_dict", None)))

    def to_json_text(self, auto_mapping_dict: Optional[dict] = None) -> str:
        """The text `save_pretrained` writes as `adapter_config.json`."""
        output = self.to_dict()
        if auto_mapping_dict is not None:
            output["auto_mapping"] = auto_mapping_dict
        return self._config_json(output)

    def _config_json(self, output: dict) -> str:
        """The text of `adapter_config.json` (peft's layout: keys sorted at every level)."""
        return json.dumps(output, indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path_json_file: str) -> dict:
        """Read a config JSON file and return its dict (peft's behaviour: a `runtime_config` is dropped)."""
        try:
            with open(path_json_file, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path_json_file} is not UTF-8 text: {exc}") from exc
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{path_json_file} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path_json_file}: expected a JSON object, got {type(data).__name__}")
        if "runtime_config" in data:
            warnings.warn(f"{path_json_file}: ignoring `runtime_config` (runtime configs are only valid at runtime)")
            del data["runtime_config"]
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load a config from a directory holding `adapter_config.json`, or from the JSON file itself.

        Extra keyword arguments that are fields of the config class override the stored values.
        """
        path = pretrained_model_name_or_path
        if subfolder is not None:
            path = os.path.join(path, subfolder)
        if os.path.isdir(path):
            from .checkpoint import _committed_config_file  # the config of an interrupted save's weights, if any

            config_file = _committed_config_file(path)
        else:
            config_file = path
        if not os.path.isfile(config_file):
            raise ValueError(f"can't find {CONFIG_NAME!r} at {pretrained_model_name_or_path!r}")
        loaded = cls.from_json_file(config_file)
        field_names = {f.name for f in dataclasses.fields(cls)}
        overrides = {k: v for k, v in kwargs.items() if k in field_names}
        return cls.from_peft_type(**{**loaded, **overrides})

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Build the config class named by `kwargs["peft_type"]` (or `cls` when absent).

        Keys the class does not know (written by a newer peft) are dropped with a warning.
        """
        config_cls = _config_class(kwargs["peft_type"]) if kwargs.get("peft_type") is not None else cls
        known = {f.name for f in dataclasses.fields(config_cls) if f.init}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            warnings.warn(
                f"Unexpected keys {unknown} for {config_cls.__name__} are ignored; the config was probably saved "
                "by a newer version of peft. Check that the adapter does not rely on them."
            )
            kwargs = {k: v for k, v in kwargs.items() if k in known}
        return config_cls(**kwargs)

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False


def _to_json(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        items = [_to_json(v) for v in value]
        try:
            return sorted(items)  # deterministic files
        except TypeError:
            return items
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


@dataclass
class PromptLearningConfig(PeftConfig):
    """Base of the prompt-learning configs (prompt tuning, P-tuning, prefix tuning); peft's fields.

    Args:
        num_virtual_tokens: number of virtual tokens (>= 1).
        token_dim: hidden size of the base model (filled in from the model's config when None).
        num_transformer_submodules: 1 (decoder-only / encoder-only) or 2 (encoder-decoder); from the task type
            when None.
        num_attention_heads: attention heads of the base model (from the model's config when None).
        num_layers: transformer layers of the base model (from the model's config when None).
        modules_to_save: modules trained fully and saved with the adapter (e.g. a classifier head).
    """

    num_virtual_tokens: Optional[int] = field(default=None, metadata={"help": "Number of virtual tokens"})
    token_dim: Optional[int] = field(
        default=None, metadata={"help": "The hidden embedding dimension of the base transformer model"}
    )
    num_transformer_submodules: Optional[int] = field(
        default=None, metadata={"help": "Number of transformer submodules"}
    )
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Number of attention heads"})
    num_layers: Optional[int] = field(default=None, metadata={"help": "Number of transformer layers"})
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "List of extra modules to be set as trainable and saved in the final checkpoint."},
    )

    def _post_init_prompt_learning(self, peft_type: "PeftType") -> None:
        """The __post_init__ shared by the prompt-learning configs: field types, `peft_type`, value checks."""
        PeftConfig.__post_init__(self)
        self.peft_type = peft_type
        name = type(self).__name__
        if self.num_virtual_tokens is None:
            raise ValueError(f"{name}.num_virtual_tokens must be set (a positive number of virtual tokens)")
        for field_name in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, field_name)
            if value is not None and value < 1:
                raise ValueError(f"{name}.{field_name} must be >= 1, got {value}")
        if self.num_transformer_submodules is not None and self.num_transformer_submodules not in (1, 2):
            raise ValueError(
                f"{name}.num_transformer_submodules must be 1 or 2 (or None), got {self.num_transformer_submodules}"
            )

    @property
    def is_prompt_learning(self) -> bool:
        return True
