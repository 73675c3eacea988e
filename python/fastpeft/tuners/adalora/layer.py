"""AdaLoRA layers: the update of a weight in SVD form, `B diag(E) A`, on nn.Linear / transformers' Conv1D
(`SVDLinear`) and nn.Conv2d (`SVDConv2d`).

Attribute and state-dict names are peft's: `lora_A` [r, in] (right singular vectors), `lora_E` [r, 1]
(singular values), `lora_B` [out, r] (left singular vectors), all nn.ParameterDicts keyed by adapter name;
`ranknum` (the rank the output is divided by, not saved in checkpoints), `scaling` (= lora_alpha, or r when
lora_alpha <= 0), `r`, `lora_alpha`, `lora_dropout`.

    y = base(x) + drop(x) (A * E)^T B^T * scaling / (ranknum + 1e-5)

SVDLinear computes the first active adapter together with the base layer with the fused LoRA op
(`fastpeft.ops.lora_linear`), passing `A * E` (a small [r, in] product; autograd takes its gradient to A and
E) as the op's lora_A: peft's separate full-size passes are avoided. Further active adapters, extra forward
arguments and non-plain base layers take peft's unfused path. Dropout in the fused path is the op's seeded
dropout (as in fastpeft's LoRA), not nn.Dropout's draws.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BaseTunerLayer, _conv1d_class, linear_kind, transpose
from ..lora.layer import LoraLayer, _ops
from .config import AdaLoraConfig

_RANKNUM_EPS = 1e-5

# bumped whenever AdaLoRA layers gain, lose or resize an adapter (the tuner caches its layer list)
_LAYER_GENERATION = [0]


def layer_cache_changed() -> None:
    _LAYER_GENERATION[0] += 1


class AdaLoraLayer(LoraLayer):
    """State and behaviour shared by the AdaLoRA layers (a LoraLayer whose A, E, B are ParameterDicts)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def _init_adalora_layer(self, base_layer: nn.Module, adapter_name: str) -> None:
        self._init_lora_layer(base_layer, adapter_name)
        # the same attribute (hence state-dict key) order as peft's layer
        self.lora_A = nn.ParameterDict({})
        self.lora_B = nn.ParameterDict({})
        self.lora_E = nn.ParameterDict({})
        self.ranknum = nn.ParameterDict({})
        self._ranknum_cache: dict[str, tuple] = {}
        self.get_base_layer().weight.requires_grad = False

    def _a_columns(self) -> int:
        """Number of columns of lora_A (in_features; in_channels * kernel area for Conv2d)."""
        return self.in_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: AdaLoraConfig, **kwargs) -> None:
        """Add (or replace) adapter `adapter_name` with `r` triplets (0 is allowed, as in peft)."""
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"`r` should be a positive integer or 0, but the value passed is {r}")
        layer_cache_changed()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        # peft's draws, in peft's order (so that a seed gives the same adapter)
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self._a_columns()))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        ranknum = nn.Parameter(torch.randn(1), requires_grad=False)
        ranknum.data.fill_(float(r))
        self.ranknum[adapter_name] = ranknum
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        self.lora_bias[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.use_rslora[adapter_name] = False
        if config.init_lora_weights:
            self.reset_lora_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        device, _ = self._base_device_dtype()
        if device is not None and device.type != "meta" and self.ranknum[adapter_name].device != device:
            self.ranknum[adapter_name] = nn.Parameter(self.ranknum[adapter_name].data.to(device), requires_grad=False)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Any = True) -> None:
        """peft's init: E zeros (the adapter starts as the identity), A and B N(0, 0.02)."""
        if adapter_name in self.lora_A:
            nn.init.zeros_(self.lora_E[adapter_name])
            nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)

    def _ranknum_value(self, adapter_name: str) -> float:
        """ranknum as a Python float (read from the parameter only when it changed: no device sync per call)."""
        p = self.ranknum[adapter_name]
        key = (id(p), p.data_ptr(), p._version)
        cached = self._ranknum_cache.get(adapter_name)
        if cached is None or cached[0] != key:
            cached = (key, float(p.detach().reshape(-1)[0].item()))
            self._ranknum_cache[adapter_name] = cached
        return cached[1]

    def _effective_scale(self, adapter_name: str) -> float:
        return self.scaling[adapter_name] / (self._ranknum_value(adapter_name) + _RANKNUM_EPS)

    def _active_lora_adapters(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.lora_A]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._ranknum_cache.pop(adapter_name, None)
        layer_cache_changed()

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            alpha = self.lora_alpha[adapter]
            self.scaling[adapter] = scale * (alpha if alpha > 0 else float(self.r[adapter]))

    def _svd_delta(self, adapter: str) -> torch.Tensor:
        """B (A * E) * scaling / (ranknum + 1e-5), [out, a_columns] (peft's formula)."""
        return (
            self.lora_B[adapter] @ (self.lora_A[adapter] * self.lora_E[adapter])
            * self.scaling[adapter] / (self.ranknum[adapter] + _RANKNUM_EPS)
        )

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        base = self.get_base_layer()
        if getattr(base, "groups", 1) > 1:
            raise NotImplementedError("Merging is not supported for conv layers with groups > 1")
        with torch.no_grad():
            new_weight = (base.weight + self.get_delta_weight(adapter_name)).to(base.weight.dtype)
            if safe_merge and not torch.isfinite(new_weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            base.weight.data = new_weight

    def _unmerge_adapter(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            base.weight.data = (base.weight - self.get_delta_weight(adapter_name)).to(base.weight.dtype)

    def resize_adapter(self, adapter_name: str, keep: torch.Tensor, config: AdaLoraConfig) -> None:
        """Keep only the triplets where the boolean vector `keep` is True (peft's resize by rank_pattern: the
        layer is rebuilt with rank keep.sum() and the kept A rows, E entries, B columns; ranknum is kept)."""
        keep = keep.to(device=self.lora_A[adapter_name].device, dtype=torch.bool).view(-1)
        current = self.lora_A[adapter_name].shape[0]
        if keep.numel() != current:
            raise ValueError(
                f"rank_pattern has {keep.numel()} entries for a layer with {current} triplets (adapter "
                f"{adapter_name!r}); it was written for a different init_r"
            )
        rank = int(keep.sum().item())
        with torch.no_grad():
            lora_E = self.lora_E[adapter_name][keep].clone()
            lora_A = self.lora_A[adapter_name][keep].clone()
            lora_B = self.lora_B[adapter_name][:, keep].clone()
            ranknum = self.ranknum[adapter_name].detach().clone()
        self.update_layer(adapter_name, rank, self.lora_alpha[adapter_name], config=config)
        if rank > 0:
            with torch.no_grad():
                self.lora_E[adapter_name].copy_(lora_E)
                self.lora_A[adapter_name].copy_(lora_A)
                self.lora_B[adapter_name].copy_(lora_B)
                self.ranknum[adapter_name].copy_(ranknum)  # the scaling stays as it was


class SVDLinear(nn.Module, AdaLoraLayer):
    """AdaLoRA on nn.Linear, or on transformers' Conv1D (`fan_in_fan_out=True`: weight stored [in, out])."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdaLoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs) -> None:
        super().__init__()
        self._init_adalora_layer(base_layer, adapter_name)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._conv1d_cls = _conv1d_class()
        self.update_layer(adapter_name, r, lora_alpha, config=config)

    def _in_out_features(self, base_layer):
        if isinstance(base_layer, nn.Linear):
            return base_layer.in_features, base_layer.out_features
        return tuple(base_layer.weight.shape)  # Conv1D: [in, out]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return transpose(self._svd_delta(adapter), self.fan_in_fan_out)

    def _can_fuse(self, args, kwargs) -> bool:
        base = self.get_base_layer()
        conv1d = self._conv1d_cls
        plain = type(base) is nn.Linear or (conv1d is not None and type(base) is conv1d)
        # a base layer wrapped by another adapter layer runs through that layer (unfused)
        return plain and self.base_layer is base and not args and not kwargs

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._adapters_to_apply(x, args, kwargs)
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if not self._can_fuse(args, kwargs):
            return self._forward_unfused(x, active, *args, **kwargs)
        first, rest = active[0], active[1:]
        if self.lora_A[first].shape[0] == 0:  # every triplet pruned away: nothing to add
            return self._forward_unfused(x, active, *args, **kwargs)
        base = self.get_base_layer()
        weight = transpose(base.weight, self.fan_in_fan_out)  # [out, in]
        dtype = weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            weight = weight.to(dtype)
        bias = base.bias.to(dtype) if base.bias is not None else None
        lora_AE = (self.lora_A[first] * self.lora_E[first]).to(dtype)  # [r, in]: autograd reaches A and E
        lora_B = self.lora_B[first].to(dtype)
        result = _ops().lora_linear(x.to(dtype), weight, bias, lora_AE, lora_B, self._effective_scale(first),
                                    self._dropout_p(first))
        for name in rest:
            delta, _ = self._adapter_delta(name, x, None)
            result = result + delta
        return result.to(dtype)

    def _forward_unfused(self, x, active, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in active:
            if self.lora_A[name].shape[0] == 0:
                continue
            delta, _ = self._adapter_delta(name, x, None)
            result = result + delta
        return result.to(result_dtype)

    def _adapter_delta(self, name: str, x: torch.Tensor, base_out: Optional[torch.Tensor]):
        """One adapter's contribution, unfused (peft's math)."""
        lora_A, lora_B, lora_E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        x = x.to(lora_A.dtype)
        ranknum = self.ranknum[name] + _RANKNUM_EPS
        delta = (self.lora_dropout[name](x) @ (lora_A * lora_E).T @ lora_B.T) * self.scaling[name] / ranknum
        return delta, base_out

    def __repr__(self) -> str:
        return "adalora." + nn.Module.__repr__(self)


class SVDConv2d(nn.Module, AdaLoraLayer):
    """AdaLoRA on nn.Conv2d: lora_A is [r, in_channels * kH * kW]; the update is applied as a convolution."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdaLoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs) -> None:
        super().__init__()
        self._init_adalora_layer(base_layer, adapter_name)
        self.fan_in_fan_out = False
        self.update_layer(adapter_name, r, lora_alpha, config=config)

    def _in_out_features(self, base_layer):
        return base_layer.in_channels, base_layer.out_channels

    def _a_columns(self) -> int:
        kh, kw = self.get_base_layer().kernel_size
        return self.in_features * kh * kw

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return self._svd_delta(adapter).reshape(self.get_base_layer().weight.shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._adapters_to_apply(x, args, kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not active:
            return result
        base = self.get_base_layer()
        for name in active:
            xa = x.to(self.lora_A[name].dtype)
            delta_w = self.get_delta_weight(name)
            result = result + F.conv2d(self.lora_dropout[name](xa), delta_w, stride=base.stride, padding=base.padding,
                                       dilation=base.dilation, groups=base.groups).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "adalora." + nn.Module.__repr__(self)


def dispatch_adalora(target: nn.Module, adapter_name: str, config: AdaLoraConfig, **kwargs) -> Optional[nn.Module]:
    """The AdaLoRA layer for `target` (nn.Linear, transformers' Conv1D, nn.Conv2d), or None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    nf4 = sys.modules.get("fastpeft.quant.nf4")
    if nf4 is not None and isinstance(base, nf4.LinearNF4):
        raise NotImplementedError(
            "AdaLoRA on fastpeft's NF4 layers (QLoRA-style AdaLoRA) is not supported yet; use LoRA (LoraConfig) on "
            "NF4 weights, or AdaLoRA on an unquantized model"
        )
    if isinstance(base, nn.Conv2d):
        return SVDConv2d(target, adapter_name, config=config, **kwargs)
    if linear_kind(base, config) is not None:
        return SVDLinear(target, adapter_name, config=config, **kwargs)
    return None
