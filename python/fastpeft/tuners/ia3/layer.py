"""(IA)^3 layers on nn.Linear (and transformers' Conv1D), nn.Conv2d and nn.Conv3d; parameter names, shapes,
initialisation and math are peft 0.21.2's, so checkpoints load both ways and outputs match.

Every adapter holds one vector `ia3_l[name]`:

- Linear / Conv1D: [1, in] for a feedforward layer (the input is scaled: y = base(x * l)), [out, 1] otherwise
  (the output is scaled: y = base(x) * l).
- ConvNd: [1, in, 1, ...] (feedforward) or [1, out, 1, ...], one 1 per kernel dimension.

Several active adapters multiply: l = l_1 * l_2 * ... A bf16/fp16 input meets float32 adapters as in peft:
the scaled input (feedforward) or the scaled output is computed in the adapter's dtype and rounded once.

Linear forward runs `fastpeft.ops.ia3_linear` (one fused op) when the build has it and the layer allows it
(`Linear._fused_op`, the only place that chooses); otherwise peft's math in plain torch.

Merging multiplies the weight's input columns (feedforward) or output rows by l; a non-feedforward layer's
bias is scaled too (exact: (x W^T + b) * l = x (l W)^T + l b). Unmerging divides by l + 1e-8 (peft's
tolerance; warns, as peft, that it can be inexact).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ... import ops
from ..base import BaseTunerLayer, _conv1d_class, check_wrapped_type, transpose

__all__ = ["IA3Layer", "Linear", "Conv2d", "Conv3d"]


class IA3Layer(nn.Module, BaseTunerLayer):
    """An (IA)^3 adapter layer (peft's attribute names: `ia3_l`, `is_feedforward`, `in_features`,
    `out_features`). Subclasses say which base types they wrap and the vector's shape."""

    adapter_layer_names = ("ia3_l",)
    other_param_names = ()

    @staticmethod
    def _base_types() -> tuple[type, ...]:
        raise NotImplementedError

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, is_feedforward: bool = False,
                 **kwargs) -> None:
        super().__init__()
        check_wrapped_type(self, base_layer, self._base_types())
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = config.fan_in_fan_out
        self.kwargs = kwargs
        self.in_features, self.out_features = self._in_out_features()

    # ---- per-kind hooks ----

    def _in_out_features(self) -> tuple[int, int]:
        raise NotImplementedError

    def _vector_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    # ---- adapters ----

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False, **kwargs) -> None:
        """Add (or replace) adapter `adapter_name`: ones (init_ia3_weights) or N(0, 1). A N(0, 1) draw is made
        either way, as peft does, so that both consume the same random numbers."""
        weight = torch.randn(self._vector_shape())
        self.ia3_l[adapter_name] = nn.Parameter(weight)
        if config.init_ia3_weights:
            self.reset_ia3_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode or config.inference_mode)

    def reset_ia3_parameters(self, adapter_name: str) -> None:
        if adapter_name in self.ia3_l:
            nn.init.constant_(self.ia3_l[adapter_name], 1.0)

    def _active_scaling(self) -> tuple[Optional[torch.Tensor], Optional[torch.dtype]]:
        """The product of the active adapters' vectors (peft's order and dtype promotion) and the dtype of the
        last of them; (None, None) when no active adapter is on this layer."""
        scaling, dtype = None, None
        for name in self.active_adapters:
            if name not in self.ia3_l:
                continue
            vector = self.ia3_l[name]
            dtype = vector.dtype
            scaling = vector if scaling is None else scaling * vector
        return scaling, dtype

    # ---- merging ----

    def _weight_scaling(self, vector: torch.Tensor) -> torch.Tensor:
        """`vector` shaped to multiply the base weight."""
        raise NotImplementedError

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        base = self.get_base_layer()
        vector = self.ia3_l[adapter_name].data
        with torch.no_grad():
            weight = torch.mul(base.weight.data, self._weight_scaling(vector)).to(base.weight.dtype)
            bias = None
            if not self.is_feedforward and base.bias is not None:
                bias = torch.mul(base.bias.data, vector.reshape(base.bias.shape)).to(base.bias.dtype)
            if safe_merge:
                if not torch.isfinite(weight).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken"
                    )
                if bias is not None and not torch.isfinite(bias).all():
                    raise ValueError(f"NaNs detected in the merged bias. The adapter {adapter_name} seems to be broken")
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias

    def _unmerge_adapter(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        vector = self.ia3_l[adapter_name].data
        with torch.no_grad():
            # peft's tolerance against division by zero
            base.weight.data = torch.div(base.weight.data, self._weight_scaling(vector) + 1e-8).to(base.weight.dtype)
            if not self.is_feedforward and base.bias is not None:
                scaling = vector.reshape(base.bias.shape)
                base.bias.data = torch.div(base.bias.data, scaling + 1e-8).to(base.bias.dtype)

    def unmerge(self) -> None:
        # (a compiled forward unmerges when the adapters are disabled: dynamo cannot trace warnings.warn)
        if self.merged and not torch.compiler.is_compiling():
            warnings.warn("Unmerge result can be inaccurate for (IA)^3.")
        super().unmerge()

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()

    @property
    def peft_module_type(self) -> str:
        """The `module_type` peft's get_layer_status reports: its (non-quantised) IA3 layers have no "ia3." repr
        prefix, so the bare class name ("Linear", "Conv2d")."""
        return self._get_name()


class Linear(IA3Layer):
    """(IA)^3 on nn.Linear, or on transformers' Conv1D (weight stored [in, out], `fan_in_fan_out=True`)."""

    @staticmethod
    def _base_types():
        conv1d = _conv1d_class()
        return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, is_feedforward: bool = False,
                 is_target_conv_1d_layer: bool = False, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config, is_feedforward=is_feedforward, **kwargs)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self.update_layer(adapter_name, config)

    def _is_conv1d(self) -> bool:
        return not isinstance(self.get_base_layer(), nn.Linear)  # the other accepted type: Conv1D

    def _in_out_features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        if self._is_conv1d():
            shape = getattr(base.weight, "ds_shape", base.weight.shape)  # [in, out]
            return tuple(shape)
        return base.in_features, base.out_features

    def _vector_shape(self):
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def _weight_scaling(self, vector):
        return transpose(vector, self.fan_in_fan_out)

    def _fused_op(self, x: torch.Tensor, scaling: torch.Tensor, args, kwargs):
        """`fastpeft.ops.ia3_linear` when this build has it and the call allows it, else None: a plain frozen
        Linear / Conv1D (no other adapter in between, weight and bias without gradient), no extra arguments, no
        autocast, x in the weight's dtype and the vector in it or in float32."""
        op = getattr(ops, "ia3_linear", None)
        if op is None or args or kwargs:
            return None
        base = self.get_base_layer()
        conv1d = _conv1d_class()
        plain = type(base) is nn.Linear or (conv1d is not None and type(base) is conv1d)
        if self.base_layer is not base or not plain:
            return None
        weight, bias = base.weight, base.bias
        if weight.requires_grad or (bias is not None and (bias.requires_grad or bias.dtype != weight.dtype)):
            return None
        if x.dtype != weight.dtype or not x.is_floating_point() or scaling.dtype not in (x.dtype, torch.float32):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        return op

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._runs_base_only():
            return self.base_layer(x, *args, **kwargs)
        scaling, dtype = self._active_scaling()
        if scaling is None:
            return self.base_layer(x, *args, **kwargs)
        scaling = scaling.flatten()
        op = self._fused_op(x, scaling, args, kwargs)
        if op is not None:
            base = self.get_base_layer()
            return op(x, transpose(base.weight, self.fan_in_fan_out), base.bias, scaling, self.is_feedforward)
        # peft's math: the scaled input (or output) in the adapter's dtype, rounded once to the input's
        if self.is_feedforward:
            return self.base_layer((x.to(dtype) * scaling).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scaling).to(result.dtype)


class _ConvNd(IA3Layer):
    """(IA)^3 on a convolution: the vector [1, channels, 1, ...] scales input (feedforward) or output channels."""

    _kernel_dim = 0

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, is_feedforward: bool = False,
                 **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config, is_feedforward=is_feedforward, **kwargs)
        self.update_layer(adapter_name, config)

    def _in_out_features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        return base.in_channels, base.out_channels

    def _vector_shape(self):
        features = self.in_features if self.is_feedforward else self.out_features
        return (1, features) + (1,) * (self._kernel_dim - 2)

    def _weight_scaling(self, vector):
        if not self.is_feedforward:
            return vector.transpose(0, 1)  # [out, 1, 1, ...]
        base = self.get_base_layer()
        if base.groups == 1:
            return vector  # [1, in, 1, ...]
        # grouped: output channel o of group g sees input channels g * in_per_group ... (g + 1) * in_per_group
        groups, in_per, out_per = base.groups, base.in_channels // base.groups, base.out_channels // base.groups
        tail = vector.shape[2:]
        grouped = vector.reshape(groups, 1, in_per, *tail).expand(groups, out_per, in_per, *tail)
        return grouped.reshape(base.out_channels, in_per, *tail)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self._runs_base_only():
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        scaling, dtype = self._active_scaling()
        if scaling is None:
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        if self.is_feedforward:
            interm = (x.to(dtype) * scaling).to(self.get_base_layer().weight.dtype)
            result = self.base_layer(interm, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs).to(dtype) * scaling
        return result.to(previous_dtype)


class Conv2d(_ConvNd):
    """(IA)^3 on nn.Conv2d (vector [1, channels, 1, 1])."""

    _kernel_dim = 4

    @staticmethod
    def _base_types():
        return (nn.Conv2d,)


class Conv3d(_ConvNd):
    """(IA)^3 on nn.Conv3d (vector [1, channels, 1, 1, 1])."""

    _kernel_dim = 5

    @staticmethod
    def _base_types():
        return (nn.Conv3d,)
