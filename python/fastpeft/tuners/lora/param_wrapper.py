"""LoRA on a bare `nn.Parameter` (peft's `lora.ParamWrapper`, `LoraConfig(target_parameters=[...])`).

Used for parameters that no Linear layer owns, above all the 3-D expert stacks of transformers' MoE models
(`MixtralExperts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`; gpt-oss stores them `[E, in, out]` and says so
with `is_transposed=True`). One `ParamWrapper` adapts one parameter of the module it wraps; several targeted
parameters of one module give nested wrappers (the first parameter in the module's registration order innermost),
so the state-dict keys are peft's: `experts.lora_A.<adapter>.weight` for the outer parameter,
`experts.base_layer.lora_A.<adapter>.weight` for the inner one.

Layout (peft's): with E experts (E = 1 for a 2-D parameter `[out, in]`) and rank r,
`lora_A` is `nn.Linear(in, r * E)` (weight `[r*E, in]`, rows expert-major: row `e*r + k` is expert e's k-th row) and
`lora_B` is `nn.Linear(r * E, out)` (weight `[out, r*E]`, columns rank-major: column `k*E + e`), so that
`dW[e] = scaling * B_e @ A_e` with `A_e = A.view(E, r, in)[e]` and `B_e = B.view(out, r, E)[..., e]`.

Forward: while the wrapped module's forward runs, reading the parameter (`module.<name>`) gives `W + dW` (every
active adapter), a tensor in the autograd graph of A, B and W; afterwards the attribute is the plain parameter again.
The mechanism is an entry in the module's instance `__dict__` that shadows the registered parameter for attribute
reads (`nn.Module.__getattr__` is consulted only when normal lookup fails); `parameters()`, `state_dict()`, the
optimizer and the module's class are untouched (peft instead registers and removes a `torch.nn.utils.parametrize`
parametrization around every forward, which swaps the module's class each time). A module whose parameter carries a
user parametrization gets a temporary extra parametrization instead (as in peft).

Cost: `W + dW` is built once per forward of the wrapped module (not per expert call) by one `baddbmm` (`addmm` for
2-D) from the low-rank factors, for any number of active adapters (their factors are concatenated along the rank
with the scalings folded in), so no separate `dW` the size of the parameter is materialised. peft does the same for
one adapter on a 3-D parameter; for 2-D parameters and for several adapters it materialises `dW` per adapter and
their sum.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import LoraConfig
from .layer import LoraLayer, _delta_in_fp32_on_cpu

_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# inits that need nothing but the adapter's own shapes (peft's ParamWrapper runs the others against a `.weight`
# attribute the wrapped module usually lacks)
_PARAM_INITS = (True, False, "gaussian", "eva")


class _ParamProxy(nn.Module):
    """A temporary parametrization returning `W + dW` (only for parameters that are already parametrized)."""

    def __init__(self, wrapper: "ParamWrapper", adapters: list[str]):
        super().__init__()
        self._fn = lambda W: wrapper._adapted(W, adapters)

    def forward(self, W):
        return self._fn(W)


class ParamWrapper(nn.Module, LoraLayer):
    """LoRA on the parameter `parameter_name` of `base_layer` (2-D `[out, in]` or 3-D experts); peft's
    `lora.ParamWrapper` (same attributes, shapes, state-dict keys and restrictions: no lora_dropout, DoRA,
    lora_bias or fan_in_fan_out)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        parameter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: float = 1,
        is_target_conv_1d_layer: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        self.parameter_name = parameter_name
        name = type(self).__name__
        if config.lora_dropout:
            # dropout acts on the input of the product, which a weight update cannot express
            raise ValueError(f"lora.{name} does not work with lora_dropout != 0.")
        if config.fan_in_fan_out:
            raise ValueError(f"lora.{name} does not work with fan_in_fan_out.")
        if config.lora_bias:
            raise ValueError(f"lora.{name} does not work with lora_bias=True.")
        if config.use_dora:
            raise ValueError(f"lora.{name} does not work with use_dora=True.")
        if is_target_conv_1d_layer:
            raise ValueError(f"lora.{name} does not work with is_target_conv_1d_layer=True.")
        self._init_lora_layer(base_layer, adapter_name)
        self.fan_in_fan_out = False
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    # ---- the parameter ----

    def get_param(self) -> torch.Tensor:
        """The wrapped parameter as the module stores it (without any adapter); for a parameter under a user
        parametrization, its parametrized value."""
        base = self.get_base_layer()
        if parametrize.is_parametrized(base, self.parameter_name):
            return getattr(base, self.parameter_name)
        return base._parameters[self.parameter_name]

    def _check_mergeable(self) -> None:
        if parametrize.is_parametrized(self.get_base_layer(), self.parameter_name):
            raise NotImplementedError(
                f"Cannot merge into '{self.parameter_name}': it is parametrized (torch.nn.utils.parametrize), so there "
                "is no stored weight to merge into; keep the adapter unmerged or remove the parametrization first"
            )

    @property
    def weight(self) -> torch.Tensor:
        return self.get_param()

    def _in_out_features(self, base_layer: nn.Module) -> tuple[int, int]:
        param = getattr(base_layer, self.parameter_name)
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if not (param.dtype.is_floating_point or param.dtype.is_complex):
            raise ValueError(
                f"lora.{type(self).__name__}: parameter '{self.parameter_name}' of {type(base_layer).__name__} has "
                f"dtype {param.dtype}; LoRA needs a floating-point parameter. Remove it from `target_parameters`."
            )
        if len(shape) == 3:
            # (experts, in, out) when the module says `is_transposed`, else (experts, out, in) (Mixtral, Qwen3-MoE)
            self.num_experts, self._param_ndim = shape[0], 3
            self._experts_in_out = bool(getattr(base_layer, "is_transposed", False))
            return (shape[1], shape[2]) if self._experts_in_out else (shape[2], shape[1])
        if len(shape) == 2:
            self.num_experts, self._param_ndim = 1, 2
            self._experts_in_out = False
            return shape[1], shape[0]
        raise ValueError(
            f"lora.{type(self).__name__} was initialized with {len(shape)} dimensional Parameter, but only 2d and 3d "
            "are supported."
        )

    def _base_device_dtype(self):
        param = self.get_param()
        dtype = param.dtype if (param.dtype.is_floating_point or param.dtype.is_complex) else None
        return param.device, dtype

    # ---- adapters ----

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        name = type(self).__name__
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if config.use_dora:
            raise ValueError(f"lora.{name} does not work with LoRA variants like DoRA.")
        if getattr(config, "alora_invocation_tokens", None):
            raise ValueError(
                f"aLoRA (alora_invocation_tokens) supports Linear / Conv1D layers only, not lora.{name} (parameter "
                f"'{self.parameter_name}', as in peft); drop target_parameters or alora_invocation_tokens"
            )
        if config.lora_dropout:
            raise ValueError(f"lora.{name} does not work with lora_dropout != 0.")
        if config.lora_bias:
            raise ValueError(f"lora.{name} does not work with lora_bias=True.")
        init = config.init_lora_weights
        if not any(init is v or (isinstance(v, str) and init == v) for v in _PARAM_INITS):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported for parameters targeted with `target_parameters` "
                f"('{self.parameter_name}'); use True, False, 'gaussian' or 'eva'"
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Identity()
        experts = self.num_experts
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * experts, self.out_features, bias=False)
        self.lora_bias[adapter_name] = False
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        if init == "eva":
            nn.init.zeros_(self.lora_B[adapter_name].weight)  # peft: EVA sets A from data later
        elif init:
            self.reset_lora_parameters(adapter_name, init)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) with dW = scaling * lhs @ rhs in the parameter's layout: [E, P, r] and [E, r, Q] for a
        3-D parameter [E, P, Q], [out, r] and [r, in] for a 2-D one."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if self._param_ndim == 2:
            return b, a
        experts = self.num_experts
        a = a.reshape(experts, -1, a.shape[-1])  # [E, r, in]
        b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # [E, out, r]
        return (a.transpose(-2, -1), b.transpose(-2, -1)) if self._experts_in_out else (b, a)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B A of `adapter` in the parameter's layout and dtype (peft's ParamWrapper.get_delta_weight)."""
        lhs, rhs = self._factors(adapter)
        lhs, rhs, cast_back = _delta_in_fp32_on_cpu(lhs, rhs)
        delta = torch.matmul(lhs, rhs) * self.scaling[adapter]
        if cast_back is not None:
            delta = delta.to(cast_back)
        param = self.get_param()
        return delta.to(param.device, param.dtype) if param.dtype in _COMPUTE_DTYPES else delta.to(param.device)

    # ---- forward ----

    def _adapted(self, W: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """W + sum of the adapters' dW, from the factors in one (b)addmm: the scalings are folded into lhs and the
        adapters' factors concatenated along the rank."""
        low_precision = W.dtype not in _COMPUTE_DTYPES  # e.g. float8: add in the adapter's dtype, then clamp
        factors = [self._factors(a) for a in adapters]
        dtype = factors[0][0].dtype if low_precision else W.dtype
        if len(adapters) == 1:
            lhs, rhs = factors[0]
            alpha = self.scaling[adapters[0]]
        else:
            lhs = torch.cat([f[0] * self.scaling[a] for f, a in zip(factors, adapters)], dim=-1)
            rhs = torch.cat([f[1] for f in factors], dim=-2)
            alpha = 1.0
        lhs, rhs = lhs.to(dtype), rhs.to(dtype)
        if isinstance(alpha, torch.Tensor):  # a tensor scaling (hot-swapped adapters)
            lhs, alpha = lhs * alpha.to(dtype), 1.0
        base = W.to(dtype) if low_precision else W
        # a parametrized value must keep W's dtype: no autocast in here (peft does the same)
        with torch.autocast(device_type=W.device.type, enabled=False):
            out = torch.addmm(base, lhs, rhs, alpha=alpha) if lhs.dim() == 2 else torch.baddbmm(base, lhs, rhs, alpha=alpha)
        if low_precision:
            info = torch.finfo(W.dtype)
            out = out.clamp(min=info.min, max=info.max).to(W.dtype)
        return out

    @contextlib.contextmanager
    def _adapter_applied(self, adapters: list[str]):
        """While open, `base.<parameter_name>` reads W + dW (see the module docstring)."""
        base, name = self.get_base_layer(), self.parameter_name
        if parametrize.is_parametrized(base, name):
            plist = base.parametrizations[name]
            plist.append(_ParamProxy(self, adapters))
            try:
                with parametrize.cached():
                    yield
            finally:
                for i in reversed(range(len(plist))):
                    if isinstance(plist[i], _ParamProxy):
                        del plist[i]
                        break
            return
        missing = object()
        previous = base.__dict__.get(name, missing)  # only if the module itself is running nested in a forward
        W = previous if previous is not missing else base._parameters[name]
        base.__dict__[name] = self._adapted(W, adapters)
        try:
            yield
        finally:
            if previous is missing:
                base.__dict__.pop(name, None)
            else:
                base.__dict__[name] = previous

    def _check_forward_args(self, *args, **kwargs) -> None:
        if kwargs.get("adapter_names", None):
            raise ValueError(f"lora.{type(self).__name__} does not support mixed adapter batches yet.")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_forward_args(*args, **kwargs)
        kwargs.pop("adapter_names", None)
        active = [] if self._runs_base_only() else self._active_lora_adapters()
        if not active:
            return self.base_layer(*args, **kwargs)
        with self._adapter_applied(active):
            return self.base_layer(*args, **kwargs)

    # ---- merging ----

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        self._check_mergeable()
        param = self.get_param()
        with torch.no_grad():
            delta = self.get_delta_weight(adapter_name)
            if param.dtype in _COMPUTE_DTYPES:
                new = param.detach() + delta.to(param.dtype)
            else:  # low precision: add in the delta's dtype
                info = torch.finfo(param.dtype)
                new = (param.detach().to(delta.dtype) + delta).clamp(info.min, info.max).to(param.dtype)
            if safe_merge and not torch.isfinite(new.float()).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            param.data = new

    def _unmerge_adapter(self, adapter_name: str) -> None:
        param = self.get_param()
        with torch.no_grad():
            delta = self.get_delta_weight(adapter_name)
            if param.dtype in _COMPUTE_DTYPES:
                param.data = param.detach() - delta.to(param.dtype)
            else:
                param.data = (param.detach().to(delta.dtype) - delta).to(param.dtype)

    def _merge_and_unload_layer(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None, **_):
        """merge_and_unload of a nest of wrappers (one per parameter of the module): merge each, return the module."""
        layer = self
        while isinstance(layer, ParamWrapper):
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            layer = layer.base_layer
        return self.get_base_layer(), None

    def __repr__(self) -> str:
        rep = super().__repr__()
        idx = rep.find("(") + 1
        return "lora." + f"{rep[:idx]}\n  parameter_name='{self.parameter_name}',{rep[idx:]}"
