"""`LoraConfig`: peft's LoRA config, field for field, with its defaults and checks."""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig, PeftType, register_config

# Values of `init_lora_weights` this version runs (besides True / False / "pissa_niter_<n>"): all of peft's.
SUPPORTED_INITS = ("gaussian", "pissa", "olora", "loftq", "orthogonal", "mica", "eva", "corda", "lora_ga")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")

# Sub-configs of peft's LoraConfig for features fastpeft does not implement (yet). They are kept as
# plain dicts so a peft config round-trips; a LoraModel refuses to build an adapter that sets them.
_UNSUPPORTED_SUBCONFIGS = (
    "velora_config",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)
# Sub-configs fastpeft implements; also stored as plain dicts (peft's JSON), read with `<Class>.from_dict`.
_INIT_SUBCONFIGS = ("eva_config", "corda_config", "lora_ga_config")


def _as_dict(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


@dataclass
class LoftQConfig:
    """LoftQ's settings (peft's `LoftQConfig`): pass as `LoraConfig(init_lora_weights="loftq", loftq_config=...)`.

    Args:
        loftq_bits: quantisation bits of the base weight: 4 (NF4, bitsandbytes' format) or 8 (bitsandbytes'
            int8 row-wise); peft supports these two.
        loftq_iter: alternations of quantisation and low-rank fitting (>= 1).

    `LoraConfig` stores it as the plain dict `{"loftq_bits": ..., "loftq_iter": ...}` (peft's JSON);
    `LoftQConfig.from_dict` reads it back. The algorithm is `fastpeft.quant.loftq`.
    """

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits for LoftQ"})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating iterations for LoftQ"})

    def __post_init__(self):
        if isinstance(self.loftq_bits, bool) or self.loftq_bits not in (4, 8):
            raise ValueError(
                f"LoftQConfig.loftq_bits={self.loftq_bits!r} is not supported: use 4 (NF4) or 8 (int8), the bit widths "
                "peft's LoftQ supports"
            )
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"LoftQConfig.loftq_iter must be an integer >= 1, got {self.loftq_iter!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "LoftQConfig":
        """A LoftQConfig from `LoraConfig.loftq_config` (a dict with peft's keys; both optional)."""
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise TypeError(f"loftq_config must be a LoftQConfig or a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"loftq_config has unknown keys {unknown}; LoftQConfig has 'loftq_bits' and 'loftq_iter'")
        return cls(**d)


def _subconfig_from_dict(cls, value, field_name: str):
    """`value` (an instance of `cls`, of peft's class of the same name, or a dict with its keys) as a `cls`."""
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)  # e.g. peft's own EvaConfig
    if not isinstance(value, dict):
        raise TypeError(f"{field_name} must be a {cls.__name__} or a dict, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:  # e.g. written by a newer peft: dropped (as peft does) so that the adapter still loads
        warnings.warn(f"{field_name}: ignoring unknown keys {unknown} ({cls.__name__} has {sorted(names)})")
    return cls(**{k: v for k, v in value.items() if k in names})


@dataclass
class EvaConfig:
    """EVA's settings (peft's `EvaConfig`): pass as `LoraConfig(init_lora_weights="eva", eva_config=...)`, then run
    `fastpeft.initialize_lora_eva_weights(model, dataloader)`.

    Args:
        rho: >= 1; a layer may get up to `r * rho` ranks when the budget is redistributed (1.0: no redistribution).
        tau: cosine-similarity threshold in [0, 1] at which a layer's incremental SVD counts as converged.
        use_label_mask: ignore the token positions whose `labels` equal `label_mask_value`.
        label_mask_value: see `use_label_mask`.
        whiten: divide the singular vectors by their singular values.
        adjust_scaling_factors: rescale lora_alpha per layer after redistribution (alpha * new_rank / r).
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self):
        if self.rho < 1.0:
            raise ValueError(f"EvaConfig.rho must be >= 1.0, got {self.rho}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"EvaConfig.tau must be between 0.0 and 1.0, got {self.tau}")

    @classmethod
    def from_dict(cls, d) -> "EvaConfig":
        return _subconfig_from_dict(cls, d, "eva_config")


@dataclass
class CordaConfig:
    """CorDA's settings (peft's `CordaConfig`): pass as `LoraConfig(init_lora_weights="corda", corda_config=...)` and
    run `fastpeft.tuners.lora.preprocess_corda(model, lora_config, run_model=...)` before `get_peft_model`.

    Args:
        cache_file: a file for the per-layer SVD results (reused when it exists).
        covariance_file: a file for the per-layer input covariance (reused when it exists).
        corda_method: "ipm" (instruction-previewed: the adapter takes the top components) or "kpm"
            (knowledge-preserved: the adapter takes the smallest components).
        verbose: print progress.
        use_float16_for_covariance: accumulate the covariance in float16 (half the memory, less accurate).
        prune_temporary_fields: drop the per-layer temporaries once the SVD is done.
    """

    cache_file: Optional[str] = None
    covariance_file: Optional[str] = None
    corda_method: Literal["ipm", "kpm"] = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self):
        if self.corda_method not in ("ipm", "kpm"):
            raise ValueError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}")

    @classmethod
    def from_dict(cls, d) -> "CordaConfig":
        return _subconfig_from_dict(cls, d, "corda_config")


@dataclass
class LoraGAConfig:
    """LoRA-GA's settings (peft's `LoraGAConfig`): pass as `LoraConfig(init_lora_weights="lora_ga",
    lora_ga_config=...)` after `fastpeft.preprocess_loraga(model, lora_config, train_step=...)`.

    Args:
        direction: how the gradient's singular vectors are split between A and B: "ArBr", "A2rBr", "ArB2r", "random".
        scale: "stable", "weight_svd", "gd_scale" or "unit".
        stable_gamma: gamma of the "stable" scale.
    """

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: int = 16

    def __post_init__(self):
        if self.direction not in ("ArBr", "A2rBr", "ArB2r", "random"):
            raise ValueError(
                f"LoraGAConfig.direction must be 'ArBr', 'A2rBr', 'ArB2r' or 'random', got {self.direction!r}"
            )
        if self.scale not in ("stable", "weight_svd", "gd_scale", "unit"):
            raise ValueError(
                f"LoraGAConfig.scale must be 'stable', 'weight_svd', 'gd_scale' or 'unit', got {self.scale!r}"
            )

    @classmethod
    def from_dict(cls, d) -> "LoraGAConfig":
        return _subconfig_from_dict(cls, d, "lora_ga_config")


_SUBCONFIG_CLASSES = {"eva_config": EvaConfig, "corda_config": CordaConfig, "lora_ga_config": LoraGAConfig}


@register_config(PeftType.LORA)
@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (`LoraModel`); the fields, defaults and JSON keys are peft's.

    The main fields: `r` (rank), `lora_alpha` (scaling = lora_alpha / r, or lora_alpha / sqrt(r) with
    `use_rslora`), `lora_dropout`, `target_modules` (list: exact names or `.`-suffixes; str: a regex
    matched against the full module name; "all-linear": every Linear/Conv1D but the output layer),
    `exclude_modules`, `fan_in_fan_out` (True for transformers' Conv1D weights), `bias` ("none", "all",
    "lora_only"), `modules_to_save`, `init_lora_weights` (True, False, "gaussian", "pissa",
    "pissa_niter_<n>", "olora", "loftq", "orthogonal", "mica", "eva", "corda", "lora_ga"; the data-driven
    ones with `initialize_lora_eva_weights`, `preprocess_corda`, `preprocess_loraga`), `layers_to_transform` / `layers_pattern`, `rank_pattern` /
    `alpha_pattern` (module-name regex -> rank / alpha), `use_dora`, `lora_bias`, `alora_invocation_tokens`
    (activated LoRA: the adapter acts only from the last occurrence of these token ids onward; see
    `fastpeft.tuners.lora.alora`).
    """

    r: int = field(default=8, metadata={"help": "Lora attention dimension"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    lora_alpha: Union[int, float] = field(default=8, metadata={"help": "Lora alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "Lora dropout"})
    fan_in_fan_out: bool = field(default=False)
    bias: Literal["none", "all", "lora_only"] = field(default="none")
    use_rslora: bool = field(default=False)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_lora_weights: Union[bool, str] = field(default=True)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    rank_pattern: Optional[dict[str, int]] = field(default_factory=dict)
    alpha_pattern: Optional[dict[str, Union[int, float]]] = field(default_factory=dict)
    megatron_config: Optional[dict] = field(default=None)
    megatron_core: Optional[str] = field(default="megatron.core")
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(default=None)
    loftq_config: dict = field(default_factory=dict)
    eva_config: Optional[dict] = field(default=None)
    corda_config: Optional[dict] = field(default=None)
    lora_ga_config: Optional[dict] = field(default=None)
    use_dora: bool = field(default=False)
    velora_config: Optional[dict] = field(default=None)
    alora_invocation_tokens: Optional[list[int]] = field(default=None)
    use_qalora: bool = field(default=False)
    qalora_group_size: int = field(default=16)
    monteclora_config: Optional[dict] = field(default=None)
    layer_replication: Optional[list[tuple[int, int]]] = field(default=None)
    lora_bias: bool = field(default=False)
    target_parameters: Optional[list[str]] = field(default=None)
    use_bdlora: Optional[dict] = field(default=None)
    arrow_config: Optional[dict] = field(default=None)
    kasa_config: Optional[dict] = field(default=None)
    ensure_weight_tying: bool = field(default=False)

    def __post_init__(self):
        # nested configs may come as dataclass instances (peft's LoftQConfig, EvaConfig, ...): keep dicts
        self.loftq_config = _as_dict(self.loftq_config)
        for name in _UNSUPPORTED_SUBCONFIGS + _INIT_SUBCONFIGS:
            setattr(self, name, _as_dict(getattr(self, name)))
        self._post_init_tuner(PeftType.LORA)

    def _validate(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got r={self.r}")
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.init_lora_weights, str):
            init = self.init_lora_weights
            if not (init in SUPPORTED_INITS or _PISSA_NITER.fullmatch(init)):
                raise ValueError(
                    f"LoraConfig.init_lora_weights={init!r} is not valid; use True, False, 'gaussian', 'pissa', "
                    "'pissa_niter_<n>' (n a non-negative integer), 'olora', 'loftq', 'orthogonal', 'mica', 'eva', "
                    "'corda' or 'lora_ga'"
                )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "LoraConfig.layers_to_transform cannot be used when target_modules is a str (a regex); "
                "pass target_modules as a list or encode the layers in the regex"
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError(
                "LoraConfig.layers_pattern cannot be used when target_modules is a str (a regex); "
                "pass target_modules as a list or encode the layers in the regex"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "LoraConfig.layers_pattern is set but layers_to_transform is not; set layers_to_transform to the "
                "layer indices to adapt, or drop layers_pattern"
            )
        if self.use_dora and self.megatron_config:
            raise ValueError("LoraConfig.use_dora does not support megatron_config; set use_dora=False")
        if isinstance(self.target_parameters, str):
            raise TypeError("LoraConfig.target_parameters must be a list of strings or None")

        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ValueError(
                    "LoraConfig.loftq_config must be given when init_lora_weights='loftq' "
                    "(e.g. loftq_config={'loftq_bits': 4, 'loftq_iter': 1})"
                )
            LoftQConfig.from_dict(self.loftq_config)  # its checks (bits, iterations, keys)
        elif self.loftq_config:
            warnings.warn("LoraConfig.loftq_config is ignored because init_lora_weights is not 'loftq'")
            self.loftq_config = {}

        self._check_init_subconfigs()

        if self.alora_invocation_tokens is not None:
            from .alora import validate_invocation_tokens

            validate_invocation_tokens(self.alora_invocation_tokens)
            if self.use_dora:
                raise ValueError(
                    "LoraConfig.alora_invocation_tokens (aLoRA) cannot be combined with use_dora=True (as in peft); "
                    "set use_dora=False"
                )
            task_type = getattr(self.task_type, "value", self.task_type)
            if task_type != "CAUSAL_LM":
                warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.")

        if self.lora_bias:
            if self.init_lora_weights not in (True, False):
                raise ValueError(
                    "LoraConfig.lora_bias=True is only supported with init_lora_weights=True or False, got "
                    f"init_lora_weights={self.init_lora_weights!r}"
                )
            if self.use_dora:
                raise ValueError("LoraConfig.lora_bias=True is not supported with DoRA; set use_dora=False")

        if (
            self.use_rslora
            and (self.rank_pattern or self.alpha_pattern)
            and isinstance(self.init_lora_weights, str)
            and (self.init_lora_weights.startswith("pissa") or self.init_lora_weights == "olora")
        ):
            warnings.warn(
                "rslora with rank_pattern/alpha_pattern and PiSSA/OLoRA init: the modified base weights cannot be "
                "converted back after training (path_initial_model_for_weight_conversion)"
            )

    def _check_init_subconfigs(self) -> None:
        """peft's handling of eva_config / corda_config / lora_ga_config: eva and corda get a default sub-config when
        it is missing, a sub-config for another init is kept but warned about; each is checked by its class."""
        for name, cls in _SUBCONFIG_CLASSES.items():
            init = name.removesuffix("_config")
            value = getattr(self, name)
            if value is None:
                if self.init_lora_weights == init and init in ("eva", "corda"):
                    warnings.warn(
                        f"`init_lora_weights` is {init!r} but `{name}` is not specified. Using default "
                        f"{cls.__name__} config."
                    )
                    setattr(self, name, dataclasses.asdict(cls()))
                continue
            cls.from_dict(value)  # its checks (keys, values)
            if self.init_lora_weights != init and init in ("eva", "corda"):
                warnings.warn(f"`{name}` specified but will be ignored when `init_lora_weights` is not {init!r}.")

    def init_subconfig(self, name: str):
        """`eva_config`, `corda_config` or `lora_ga_config` as its dataclass (None when not set)."""
        value = getattr(self, name)
        return None if value is None else _SUBCONFIG_CLASSES[name].from_dict(value)

    def unsupported_features(self) -> list[str]:
        """The fields that ask for a peft feature fastpeft's LoRA cannot run (empty when all is supported)."""
        found = [name for name in _UNSUPPORTED_SUBCONFIGS if getattr(self, name) is not None]
        for name in ("megatron_config",):
            if getattr(self, name):
                found.append(name)
        for name in ("use_qalora",):
            if getattr(self, name):
                found.append(name)
        return found
