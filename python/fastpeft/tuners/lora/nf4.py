"""QLoRA: LoRA / DoRA adapters on a frozen NF4 base layer (:class:`fastpeft.quant.nf4.LinearNF4`).

fastpeft's counterpart of peft's ``lora.bnb.Linear4bit``: ``get_peft_model(quantize_model(model),
LoraConfig(...))`` wraps every targeted ``LinearNF4`` in a :class:`Linear4bit`. The attribute names and
state-dict keys are peft's, so an adapter trained here loads into peft on a bitsandbytes-quantised model
(same NF4 bytes) and vice versa.

Forward (peft's math)::

    result = base_layer(x)                     # LinearNF4: its own NF4 matmul, in its compute dtype,
                                               # returned in x's dtype
    for each active adapter:                   # adapters run in their own dtype (x is cast to it)
        result += (B(A(dropout(x))) * scaling).to(result.dtype)

DoRA as peft does it for 4-bit layers: the weight norm ``||W + s B A||`` (rows, detached) uses the
dequantised weight; without dropout (or in eval) the bare base output is ``result - bias``, with dropout in
training it is ``dropout(x) W^T`` with the dequantised ``W``.

Merging: ``merge_adapter()`` / ``unmerge_adapter()`` dequantise, add (subtract) the delta and re-quantise
in place, like peft, which is lossy (a warning says so). ``merge_and_unload()`` instead replaces each layer
by a plain ``nn.Linear`` holding ``dequant(W) + dW`` (no re-quantisation error), or with
``requantize=True`` by a new ``LinearNF4`` of the merged weight, reporting the error that adds (see
:class:`RequantizationReport`).
"""
from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BaseTunerLayer
from .config import LoraConfig
from .layer import DoraMagnitude, Linear

__all__ = ["Linear4bit", "dispatch_nf4", "RequantizationError", "RequantizationReport", "is_nf4_layer"]

logger = logging.getLogger("fastpeft.qlora")

_LOSSY_MERGE = (
    "Merging a LoRA adapter into an NF4 layer re-quantises the merged weight, which adds rounding error "
    "(outputs may differ slightly from the unmerged model). merge_and_unload() without requantize avoids it."
)
_LOSSY_UNMERGE = (
    "Unmerging a LoRA adapter from an NF4 layer re-quantises the weight, which adds rounding error: the base "
    "weight does not come back bit for bit."
)


def _nf4_module():
    """fastpeft.quant.nf4 if it is imported (no LinearNF4 can exist before it is), else None."""
    return sys.modules.get("fastpeft.quant.nf4")


def is_nf4_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a fastpeft ``LinearNF4`` (cheap: imports nothing)."""
    nf4 = _nf4_module()
    return nf4 is not None and isinstance(module, nf4.LinearNF4)


@dataclass
class RequantizationError:
    """The error re-quantising one merged weight to NF4 adds: ``W_q = dequant(quant(W_merged))``.

    ``max_abs = max |W_q - W_merged|``; ``rel_fro = ||W_q - W_merged||_F / ||W_merged||_F`` (float32).
    """

    max_abs: float
    rel_fro: float


@dataclass
class RequantizationReport:
    """What ``merge_and_unload(requantize=True)`` did to each layer (qualified module name -> error).

    Also left on the returned model as ``model.nf4_requantization_report`` and on each new ``LinearNF4`` as
    ``layer.requantization_error``. ``str(report)`` is a one-line summary.
    """

    layers: dict[str, RequantizationError] = field(default_factory=dict)

    @property
    def max_abs(self) -> float:
        """The largest absolute error over all layers (0.0 with no layers)."""
        return max((e.max_abs for e in self.layers.values()), default=0.0)

    @property
    def max_rel_fro(self) -> float:
        """The largest relative Frobenius error over all layers."""
        return max((e.rel_fro for e in self.layers.values()), default=0.0)

    @property
    def mean_rel_fro(self) -> float:
        """The mean relative Frobenius error over the layers."""
        return sum(e.rel_fro for e in self.layers.values()) / len(self.layers) if self.layers else 0.0

    def __str__(self) -> str:
        if not self.layers:
            return "re-quantised no NF4 layers"
        worst = max(self.layers, key=lambda k: self.layers[k].rel_fro)
        return (
            f"re-quantised {len(self.layers)} merged layers to NF4: relative Frobenius error mean "
            f"{self.mean_rel_fro:.3e}, max {self.max_rel_fro:.3e} ({worst}); max abs error {self.max_abs:.3e}"
        )


def _measure(requantized: torch.Tensor, merged: torch.Tensor) -> RequantizationError:
    diff = requantized.float() - merged.float()
    norm = torch.linalg.norm(merged.float())
    rel = (torch.linalg.norm(diff) / norm).item() if norm > 0 else float(torch.linalg.norm(diff) > 0)
    return RequantizationError(max_abs=diff.abs().max().item() if diff.numel() else 0.0, rel_fro=rel)


class Linear4bit(Linear):
    """LoRA / DoRA on a fastpeft :class:`~fastpeft.quant.nf4.LinearNF4` (peft's ``lora.bnb.Linear4bit``).

    Forward is ``base_layer(x)`` (the NF4 layer's own op, with its compute dtype) plus each active
    adapter's ``B(A(dropout(x))) * scaling`` computed in the adapter weights' dtype and added in the
    output's dtype (= the input's); DoRA takes the weight norm from the dequantised weight. Only the
    adapters get gradients (the packed uint8 weight never requires grad); gradients reach the input.
    Several adapters, ``disable_adapter()``, rsLoRA and ``lora_bias`` work as on ``nn.Linear``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs) -> None:
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is a LinearNF4 ([out, in] weight). "
                          "Setting fan_in_fan_out to False.")
            config.fan_in_fan_out = False
        kwargs.pop("is_target_conv_1d_layer", None)
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)

    @classmethod
    def _is_conv1d_base(cls, linear: nn.Module) -> bool:
        """``from_linear`` (inherited: wraps a ``LinearNF4`` without a wrapper model, its weights frozen) takes
        a fastpeft ``LinearNF4`` only."""
        if not is_nf4_layer(linear):
            raise TypeError(
                f"Linear4bit.from_linear expects a fastpeft LinearNF4, got {type(linear).__name__} "
                "(use fastpeft.nn.LoraLinear.from_linear for an nn.Linear)"
            )
        return False

    # ---- shapes and weights ----

    def _in_out_features(self, base_layer):
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        return base.in_features, base.out_features

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The base layer's dequantised ``[out, in]`` weight (default dtype: the original weight's)."""
        return self.get_base_layer().dequantize(dtype)

    def _merged_dtype(self) -> torch.dtype:
        """The dtype of the merged ``nn.Linear``: the NF4 layer's compute dtype, else its original weight's."""
        base = self.get_base_layer()
        return base.compute_dtype or base.quant_state.dtype

    def _dora_init(self, adapter_name: str) -> None:
        """DoRA magnitude = the row norms of dequant(W) + s B A (peft: ``dequantize_module_weight``)."""
        weight = self.dequantized_weight()
        delta = self.get_delta_weight(adapter_name).detach()
        norm = torch.linalg.norm(weight + delta, dim=1)
        norm = norm.to(torch.promote_types(weight.dtype, delta.dtype))
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm)

    # ---- forward ----

    def _can_fuse(self, x: torch.Tensor, active: list[str], args: tuple, kwargs: dict) -> bool:
        """Whether :meth:`_forward_fused` (one ``fastpeft.ops.qlora_linear`` call) computes this forward:
        one active plain-LoRA adapter (no DoRA, no lora_bias) on a bare LinearNF4, no extra arguments, no
        autocast, and a compute dtype the NF4 kernels take (fp32 / bf16 / fp16)."""
        if len(active) != 1 or args or kwargs:
            return False
        name = active[0]
        if name in self.lora_magnitude_vector or self.lora_bias.get(name, False):
            return False
        base = self.get_base_layer()
        nf4 = _nf4_module()
        if type(base) is not nf4.LinearNF4 or base.weight.device.type not in ("cpu", "cuda"):
            return False
        if (base.compute_dtype or x.dtype) not in nf4.KERNEL_DTYPES:
            return False
        return not torch.is_autocast_enabled(base.weight.device.type)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        alora_offsets = kwargs.pop("alora_offsets", None)  # set by LoraModel's hook for aLoRA layers only
        active = self._adapters_to_apply(x, args, kwargs)
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self.alora_invocation_tokens and any(a in self.alora_invocation_tokens for a in active):
            cast = not torch.is_autocast_enabled(x.device.type)

            def delta(name, x, base_out):
                d = self._adapter_delta_nf4(name, x, base_out, cast)
                return (d.to(base_out.dtype) if cast else d), base_out

            return self._forward_alora(x, active, alora_offsets, delta, *args, **kwargs)
        if self._can_fuse(x, active, args, kwargs):
            return self._forward_fused(x, active[0])
        return self._forward_unfused(x, active, *args, **kwargs)

    def _forward_fused(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """One adapter, no DoRA: ``fastpeft.ops.qlora_linear`` (NF4 matmul + LoRA in one op, seeded dropout).

        The adapter runs in the compute dtype (adapters kept in float32 are cast to it), as the fused
        ``nn.Linear`` path does.
        """
        from ... import ops

        base = self.get_base_layer()
        state = base.quant_state
        cdt = base.compute_dtype or x.dtype
        lora_A = self.lora_A[adapter].weight.to(cdt)
        lora_B = self.lora_B[adapter].weight.to(cdt)
        bias = None if base.bias is None else base.bias.to(cdt)
        y = ops.qlora_linear(
            x.to(cdt), base.weight, blocksize=state.blocksize, out_features=base.out_features, bias=bias,
            lora_A=lora_A, lora_B=lora_B, scaling=self.scaling[adapter], dropout_p=self._dropout_p(adapter),
            **state.kernel_args(),
        )
        return y.to(x.dtype)

    def _forward_unfused(self, x, active, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        base_out = result
        cast = not torch.is_autocast_enabled(x.device.type)
        for name in active:
            delta = self._adapter_delta_nf4(name, x, base_out, cast)
            result = result + (delta.to(result.dtype) if cast else delta)
        return result

    def _adapter_delta_nf4(self, name: str, x: torch.Tensor, base_out: torch.Tensor, cast: bool) -> torch.Tensor:
        """One adapter's contribution (peft's Linear4bit / DoRA math); ``base_out`` is base_layer(x)."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        if cast:
            x = x.to(lora_A.weight.dtype)
        if name not in self.lora_magnitude_vector:
            return lora_B(lora_A(dropout(x))) * scaling
        weight = self.dequantized_weight().to(x.dtype)
        lora_weight = (lora_B.weight @ lora_A.weight).detach().to(x.dtype)
        norm = torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype).detach()
        mag_norm_scale = (self.lora_magnitude_vector[name].weight / norm).view(1, -1)
        if self.training and isinstance(dropout, nn.Dropout):
            x = dropout(x)
            bare = F.linear(x, weight)
        else:
            bias = self.get_base_layer().bias
            bare = base_out if bias is None else base_out - bias
        return (mag_norm_scale - 1) * bare + mag_norm_scale * lora_B(lora_A(x)) * scaling

    # ---- merging ----

    def _unmerged_base_weight(self) -> torch.Tensor:
        """dequant(W) without the adapters merged into it so far (float32)."""
        weight = self.dequantized_weight(torch.float32)
        for name in reversed(self.merged_adapters):
            weight = self._unmerged_weight(name, weight)
        return weight

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor, safe_merge: bool):
        """``(new_weight, new_bias)`` with ``adapter_name`` merged into the float32 ``weight`` (and the bias,
        None when the bias does not change); raises ValueError for non-finite results with ``safe_merge``."""
        base = self.get_base_layer()
        delta = self.get_delta_weight(adapter_name).detach().float()
        if adapter_name in self.lora_magnitude_vector:
            norm = torch.linalg.norm(self._unmerged_base_weight() + delta, dim=1).detach()
            factor = self.lora_magnitude_vector[adapter_name].weight.detach().float() / norm
            new_weight = factor.view(-1, 1) * (weight + delta)
            self._caches[f"{adapter_name}-weight_norm"] = norm
        else:
            new_weight = weight + delta
        new_bias = None
        if self.lora_bias.get(adapter_name, False):
            if base.bias is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
            lora_bias = self.lora_B[adapter_name].bias.detach().float() * self.scaling[adapter_name]
            new_bias = base.bias.detach().float() + lora_bias
        finite = torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())
        if safe_merge and not finite:
            self._caches.pop(f"{adapter_name}-weight_norm", None)
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        return new_weight, new_bias

    def _requantize_in_place(self, weight: torch.Tensor) -> None:
        from ...quant.nf4 import quantize_nf4

        base = self.get_base_layer()
        packed, state = quantize_nf4(weight.to(base.quant_state.dtype), base.blocksize, base.double_quant)
        base.weight.data = packed
        base.quant_state = state

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        """peft's 4-bit merge: dequantise, add the (DoRA-rescaled) delta, re-quantise in place (lossy)."""
        warnings.warn(_LOSSY_MERGE)
        base = self.get_base_layer()
        with torch.no_grad():
            new_weight, new_bias = self._merged_weight(adapter_name, self.dequantized_weight(torch.float32), safe_merge)
            self._requantize_in_place(new_weight)
            if new_bias is not None:
                base.bias.data = new_bias.to(base.bias.dtype)

    def _unmerge_adapter(self, adapter_name: str) -> None:
        """Dequantise, subtract the delta (undo DoRA's rescale), re-quantise in place (lossy)."""
        if not torch.compiler.is_compiling():  # (a compiled forward unmerges when disabled: dynamo cannot trace warn)
            warnings.warn(_LOSSY_UNMERGE)
        base = self.get_base_layer()
        with torch.no_grad():
            weight = self._unmerged_weight(adapter_name, self.dequantized_weight(torch.float32))
            self._caches.pop(f"{adapter_name}-weight_norm", None)
            self._requantize_in_place(weight)
            if self.lora_bias.get(adapter_name, False):
                base.bias.data -= (self.lora_B[adapter_name].bias * self.scaling[adapter_name]).to(base.bias.dtype)

    def _merge_and_unload_layer(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
                                requantize: bool = False, dtype: Optional[torch.dtype] = None):
        """The module replacing this layer in ``merge_and_unload``: ``(module, RequantizationError or None)``.

        The merged weight is ``dequant(W)`` plus the adapters (``adapter_names``, default the active ones;
        adapters already merged in place stay merged), computed in float32. Without ``requantize`` the
        module is an ``nn.Linear`` in ``dtype`` (default: the NF4 layer's compute dtype, else its original
        weight dtype); with it, a new ``LinearNF4`` (same blocksize, double quantisation and compute dtype)
        of the merged weight, plus the error re-quantising added.
        """
        from ...quant.nf4 import LinearNF4

        base = self.get_base_layer()
        names = self._adapters_to_merge(adapter_names)
        weight = self.dequantized_weight(torch.float32)
        bias = None if base.bias is None else base.bias.detach().float()
        with torch.no_grad():
            for name in names:
                weight, new_bias = self._merged_weight(name, weight, safe_merge)
                if new_bias is not None:
                    bias = new_bias
        bias_dtype = None if base.bias is None else base.bias.dtype
        if not requantize:
            out_dtype = dtype or self._merged_dtype()
            linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                               device=weight.device, dtype=out_dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            linear.requires_grad_(False)
            linear.train(base.training)
            return linear, None
        state_dtype = base.quant_state.dtype
        source = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=state_dtype)
        with torch.no_grad():
            source.weight.copy_(weight)
            if bias is not None:
                source.bias.data = bias.to(bias_dtype)
        layer = LinearNF4.from_linear(source, blocksize=base.blocksize, double_quant=base.double_quant,
                                      compute_dtype=base.compute_dtype)
        layer.requires_grad_(False)
        layer.train(base.training)
        error = _measure(layer.dequantize(torch.float32), weight)
        layer.requantization_error = error
        return layer, error



def dispatch_nf4(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> Optional[nn.Module]:
    """The QLoRA layer for a fastpeft ``LinearNF4`` target (or an adapter layer over one), else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not is_nf4_layer(base):
        return None
    return Linear4bit(target, adapter_name, config=config, **kwargs)
