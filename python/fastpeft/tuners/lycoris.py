"""What LoHa and LoKr (the LyCORIS methods) share: config fields and checks, the adapter layer's
bookkeeping / forward / merging, and the tuner that injects the layers.

A method supplies, per layer, `_create_adapter` (parameter shapes and initialisation), `get_delta_weight`
(the full delta weight, base layout) and `_linear_delta` (x ΔW^T for nn.Linear bases through a fastpeft
op, without materialising ΔW where the op can avoid it). Conv bases materialise ΔW and run the base's
convolution with it. The forward consumes torch's default RNG exactly as peft does (module dropout:
one `torch.rand(1)` per active adapter in training; rank dropout: one `torch.rand(out_features)`), so
the same seed gives the same dropout masks as peft.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import PeftConfig
from .base import BaseTuner, BaseTunerLayer, get_pattern_key

# The one place the LyCORIS layers get their kernels from (fastpeft.ops: kron and hadamard families).
from ..ops import hadamard_delta, hadamard_linear, kron_linear  # noqa: F401

__all__ = ["LycorisConfig", "LycorisLayer", "LycorisTuner", "kron_linear", "hadamard_linear", "hadamard_delta"]


# ---- config ---------------------------------------------------------------------------------------


@dataclass
class LycorisConfig(PeftConfig):
    """Fields and checks shared by `LoHaConfig` and `LoKrConfig` (peft's `LycorisConfig`)."""

    rank_pattern: Optional[dict[str, int]] = field(default_factory=dict)
    alpha_pattern: Optional[dict[str, Union[int, float]]] = field(default_factory=dict)

    _PEFT_TYPE = None  # set by each method

    def __post_init__(self):
        self._post_init_tuner(self._PEFT_TYPE)

    def _validate(self) -> None:
        name = type(self).__name__
        if self.r <= 0:
            raise ValueError(f"{name}.r must be a positive integer, got r={self.r}")
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ValueError(f"{name}.rank_pattern[{key!r}] must be a positive integer, got {rank}")
        if not 0.0 <= self.rank_dropout < 1.0:
            raise ValueError(f"{name}.rank_dropout must be in [0, 1), got {self.rank_dropout}")
        if not 0.0 <= self.module_dropout <= 1.0:
            raise ValueError(f"{name}.module_dropout must be in [0, 1], got {self.module_dropout}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # peft accepts this config (and ignores layers_to_transform), so it must load here too
            warnings.warn(
                f"{name}.layers_to_transform is ignored when target_modules is a str (a regex); pass "
                "target_modules as a list or encode the layers in the regex"
            )


# ---- layers ---------------------------------------------------------------------------------------


class LycorisLayer(nn.Module, BaseTunerLayer):
    """An adapter layer of a LyCORIS method on an nn.Linear, nn.Conv1d or nn.Conv2d (peft's attribute names).

    Subclasses per base kind set `_conv_fn` (None for Linear, F.conv1d / F.conv2d for convolutions).
    """

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")
    _conv_fn = None
    _base_types: tuple[type, ...] = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LycorisConfig, r: int = 0,
                 alpha: float = 0.0, **kwargs) -> None:
        super().__init__()
        inner = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(inner, self._base_types):
            raise TypeError(f"{type(self).__name__} wraps a {self._base_types[0].__name__}, got {type(inner).__name__}")
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.cast_input_dtype_enabled = True
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            self.in_features, self.out_features = base.in_channels, base.out_channels
        self.update_layer(adapter_name, r, alpha, config=config, **kwargs)

    # ---- per-method hooks ----

    def _create_adapter(self, adapter_name: str, r: int, config: LycorisConfig) -> None:
        """Create this adapter's parameters (peft's shapes) and initialise them per `config.init_weights`."""
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * ΔW of `adapter_name`, shaped like the base weight (no dropout)."""
        raise NotImplementedError

    def _linear_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """x ΔW^T (scaled) for an nn.Linear base, through a fastpeft op."""
        raise NotImplementedError

    def _rank_dropout_rescales(self, adapter_name: str) -> bool:
        """Whether the rank-dropout mask is divided by its mean (LoHa: always; LoKr: rank_dropout_scale)."""
        raise NotImplementedError

    # ---- adapters ----

    @property
    def _available_adapters(self) -> set[str]:
        return {name for container in self._adapter_containers() for name in container}

    @property
    def _is_conv(self) -> bool:
        return self._conv_fn is not None

    def _kernel_size(self) -> tuple[int, ...]:
        return tuple(self.get_base_layer().weight.shape[2:])

    def _use_effective_conv(self, config: LycorisConfig) -> bool:
        """use_effective_conv2d applies to convolutions whose kernel is not all ones (peft's rule)."""
        return bool(config.use_effective_conv2d) and self._is_conv and any(k != 1 for k in self._kernel_size())

    def _new_param(self, container: str, adapter_name: str, *shape: int) -> None:
        getattr(self, container)[adapter_name] = nn.Parameter(torch.empty(*shape))

    def update_layer(self, adapter_name: str, r: int, alpha: float, config: LycorisConfig, **kwargs) -> None:
        """Add (or replace) adapter `adapter_name` with rank `r` and alpha `alpha`, initialised per `config`."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self._create_adapter(adapter_name, r, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @staticmethod
    def _kaiming(*params: nn.Parameter) -> None:
        for p in params:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    # ---- forward ----

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not getattr(self, "cast_input_dtype_enabled", True) or x.dtype == dtype:
            return x
        return x.to(dtype)

    def _adapter_dtype(self, adapter_name: str) -> torch.dtype:
        for container in self._adapter_containers():
            if adapter_name in container:
                return container[adapter_name].dtype
        raise KeyError(adapter_name)

    def _rank_dropout_mask(self, adapter_name: str) -> torch.Tensor:
        """peft's rank dropout: keep each output row of ΔW with probability 1 - p (one torch.rand draw on the
        CPU generator, as peft), rescaled by 1 / mean(mask) where the method does so."""
        keep = (torch.rand(self.out_features) > self.rank_dropout[adapter_name]).float()
        if self._rank_dropout_rescales(adapter_name):
            mean = keep.mean()
            # all rows dropped: peft divides 0 by 0 (NaN); here the delta is just zero (keep / 1). A tensor op,
            # not `if mean > 0`, so that torch.compile traces it without a graph break.
            keep = keep / torch.where(mean > 0, mean, torch.ones_like(mean))
        return keep

    def _module_kept(self, adapter_name: str) -> Union[bool, torch.Tensor]:
        """peft's module dropout: in training one torch.rand(1) per active adapter (even with p = 0, as peft), the
        adapter kept when the draw exceeds p. Eager: a bool (a dropped adapter is skipped, nothing computed).

        Under torch.compile a drawn value cannot steer Python control flow without a graph break, so the draw
        comes back as a 0-dim bool tensor that masks the adapter's (computed) contribution instead: the same
        outputs; a dropped adapter still draws its rank-dropout mask there, so from then on the compiled RNG
        stream differs from eager's."""
        if not self.training:
            return True
        kept = torch.rand(1) > self.module_dropout[adapter_name]
        return kept.reshape(()) if torch.compiler.is_compiling() else bool(kept)

    @staticmethod
    def _masked(delta: torch.Tensor, kept: Union[bool, torch.Tensor]) -> torch.Tensor:
        """`delta`, or zeros where `kept` (a 0-dim bool tensor from `_module_kept` under torch.compile) is False."""
        if isinstance(kept, bool):
            return delta
        return torch.where(kept.to(delta.device), delta, 0.0)

    def _delta_activations(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """What `adapter_name` adds to the base layer's output (rank dropout applied in training)."""
        if self._is_conv:
            weight = self._conv_delta_weight(adapter_name)
            x = self._cast_input_dtype(x, weight.dtype)
            base = self.get_base_layer()
            return self._conv_fn(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
        drop = self._rank_dropout_mask(adapter_name) if self.training and self.rank_dropout[adapter_name] else None
        x = self._cast_input_dtype(x, self._adapter_dtype(adapter_name))
        out = self._linear_delta(adapter_name, x)
        # rank dropout scales rows of ΔW, i.e. output features: apply it to the op's output
        return out if drop is None else out * drop.to(device=out.device, dtype=out.dtype)

    def _conv_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """A conv adapter's ΔW, its output rows scaled by the rank-dropout mask in training."""
        drop = self._rank_dropout_mask(adapter_name) if self.training and self.rank_dropout[adapter_name] else None
        weight = self.get_delta_weight(adapter_name)
        if drop is not None:
            weight = weight * drop.to(device=weight.device, dtype=weight.dtype).view(-1, *[1] * (weight.dim() - 1))
        return weight

    def _folds_conv(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether the conv adapters run folded into the base weight: one conv with W + ΣΔW instead of the base
        conv plus one per adapter, which in backward also means one input-gradient conv and one weight-gradient
        conv (giving every ΔW's gradient) instead of one input-gradient conv per term. Only in float32 /
        float64, where W + ΔW keeps ΔW: half precision would round a small ΔW away against W."""
        if not self._is_conv or args or kwargs:
            return False
        base = self.get_base_layer()
        # a base layer wrapped by another method's layer (mixed model) runs through that layer
        if type(base) not in (nn.Conv1d, nn.Conv2d) or base.padding_mode != "zeros" or self.base_layer is not base:
            return False
        return base.weight.dtype in (torch.float32, torch.float64) and x.dtype == base.weight.dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError("mixed-adapter batches (adapter_names=...) are not supported by LoHa / LoKr")
        previous_dtype = x.dtype
        if self._runs_base_only():
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        available = self._available_adapters
        # peft draws torch.rand(1) for every active adapter in training, even with module_dropout=0, and then
        # the adapter's rank-dropout mask: the same draws in the same order here
        if self._folds_conv(x, args, kwargs):
            base = self.get_base_layer()
            weight = base.weight
            for name in self.active_adapters:
                kept = name in available and self._module_kept(name)
                if kept is not False:
                    weight = weight + self._masked(self._conv_delta_weight(name).to(weight.dtype), kept)
            return self._conv_fn(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            kept = name in available and self._module_kept(name)
            if kept is not False:
                result = result + self._masked(self._delta_activations(name, x), kept)
        return result.to(previous_dtype)

    # ---- merging ----

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        weight = self.get_base_layer().weight
        with torch.no_grad():
            merged = (weight + self.get_delta_weight(adapter_name)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            weight.data = merged

    def _unmerge_adapter(self, adapter_name: str) -> None:
        weight = self.get_base_layer().weight
        with torch.no_grad():
            weight.data = (weight - self.get_delta_weight(adapter_name)).to(weight.dtype)

    # ---- scaling helpers (peft's API) ----

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self._available_adapters:
            self.scaling[adapter] = scale * self.alpha[adapter] / self.r[adapter]

    def scale_layer(self, scale: float) -> None:
        if scale == 1:
            return
        for adapter in self.active_adapters:
            if adapter in self._available_adapters:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for adapter in self.active_adapters:
            if adapter not in self._available_adapters:
                continue
            if scale is None:
                self.scaling[adapter] = self.alpha[adapter] / self.r[adapter]
            else:
                self.scaling[adapter] /= scale

    def __repr__(self) -> str:
        return f"{self._repr_prefix}.{super().__repr__()}"

    _repr_prefix = "lycoris"


# ---- tuner ----------------------------------------------------------------------------------------


class LycorisTuner(BaseTuner):
    """Injects a LyCORIS method's layers: `layers_mapping` maps nn.Conv2d / nn.Conv1d / nn.Linear to its layer
    classes (checked in that order, on the base layer of an existing adapter layer)."""

    layers_mapping: dict[type, type[LycorisLayer]] = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), current_key), config.alpha)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, r, alpha, config=config)
            return
        new_module = self._create_new_module(config, adapter_name, target, r=r, alpha=alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _create_new_module(cls, config, adapter_name: str, target: nn.Module, **kwargs) -> LycorisLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        for base_type, layer_cls in cls.layers_mapping.items():
            if isinstance(base, base_type):
                return layer_cls(target, adapter_name, config=config, **kwargs)
        supported = ", ".join(f"torch.nn.{t.__name__}" for t in cls.layers_mapping)
        raise TypeError(
            f"Target module of type {type(base).__name__} is not supported by {cls.__name__}; currently only "
            f"adapters for {supported} are supported"
        )
