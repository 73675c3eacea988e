"""OFT layers on nn.Linear (and transformers' Conv1D), nn.Conv2d and nn.Embedding; parameter names, shapes,
initialisation and parameter adjustment are peft's, so checkpoints load both ways.

Every adapter holds `oft_R[name].weight` [n, b (b - 1) / 2] (Embedding: `oft_embedding_R`): the strict upper
triangles (row-major, peft's order) of n skew-symmetric blocks S [b, b] (n = r, or 1 with block_share). The
rotation blocks are R = cayley(S) (`fastpeft.ops.cayley`: exact, or peft's Neumann series), and every
product with blockdiag(R) is one `fastpeft.ops.block_diag_rotate` call (never a dense d x d matrix):

- Linear / Conv1D: y = base(x @ blockdiag(R)); several active adapters rotate x one after the other
  (x R_1 R_2 ..., peft's order).
- Conv2d: the rotation acts on the flattened filter (in / groups * kh * kw), so the layer runs the base
  convolution (stride, padding, dilation, groups, padding_mode) with the rotated weight
  W_flat' = W_flat @ blockdiag(R)^T. This is peft's merged convolution; peft 0.21.2's unmerged forward
  (unfold, rotate patches, fold) sums overlapping patches and so differs for kernels > 1.
- Embedding: y = base(ids) @ blockdiag(R).

module_dropout (training only): int(p * r) blocks, chosen by one torch.randperm as peft's
MultiplicativeDropoutLayer would, are replaced by the identity (nothing with block_share). peft 0.21.2 builds
that layer but never calls it, so there the setting has no effect.

Merging folds the rotations into the weight so that the merged layer computes what the unmerged one did
(float32 math, float64 for float64 weights, rounded once); unmerging applies the inverse: the transpose for
the exact (orthogonal) Cayley form, a per-block inverse for the Neumann form.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ...ops import block_diag_rotate, block_diag_rotate_grads, cayley
from ..base import BaseTunerLayer, _conv1d_class, check_wrapped_type, transpose

_HALF = (torch.float16, torch.bfloat16)

__all__ = ["OFTRotation", "OFTLayer", "Linear", "Conv2d", "Embedding", "adjust_oft_parameters"]


def adjust_oft_parameters(in_features: int, params: int) -> int:
    """The value nearest to `params` that divides `in_features` (ties: the lower one), peft's rule; a value
    at least `in_features` becomes `in_features`."""
    if params >= in_features:
        return in_features
    higher = params
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = params
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (params - lower) <= (higher - params) else higher


class OFTRotation(nn.Module):
    """One adapter's rotation blocks: `weight` [n, b (b - 1) / 2] (n = 1 with block_share) and how to turn it
    into R [n, b, b] (peft's OFTRotationModule holds the same parameter under the same name)."""

    def __init__(self, r: int, block_size: int, in_features: int, *, coft: bool, eps: float, block_share: bool,
                 neumann_terms: int, module_dropout: float) -> None:
        super().__init__()
        self.r = r
        self.block_size = block_size
        self.in_features = in_features
        self.coft = coft
        self.eps = eps
        self.block_share = block_share
        self.neumann_terms = neumann_terms  # 0: exact Cayley
        self.module_dropout = module_dropout
        self.n_elements = block_size * (block_size - 1) // 2
        self.weight = nn.Parameter(torch.empty(1 if block_share else r, self.n_elements))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @property
    def is_orthogonal(self) -> bool:
        """Whether R is exactly orthogonal (exact Cayley), so that R^-1 = R^T."""
        return self.neumann_terms == 0

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        """[n, b(b-1)/2] -> the skew-symmetric S [n, b, b] with S[i, j] = vec[k] for the k-th (i < j) pair."""
        b = self.block_size
        upper = vec.new_zeros(vec.shape[0], b, b)
        upper[:, self.rows, self.cols] = vec
        return upper - upper.transpose(-1, -2)

    @torch.no_grad()
    def project_(self) -> None:
        """COFT, in place: each block whose skew matrix S has Frobenius norm above eps / sqrt(n) is scaled to that
        norm. Computed as peft does (on S, in the weight's dtype), so that both hold the same values after it."""
        w = self.weight
        skew = self.skew(w)
        radius = self.eps * 1 / torch.sqrt(torch.tensor(skew.shape[0]))
        norm = torch.norm(skew, dim=(1, 2), keepdim=True)
        inside = norm <= radius
        safe_norm = torch.where(inside, torch.ones_like(norm), norm)  # (no 0 / 0 in the branch not taken)
        projected = torch.where(inside, skew, radius.to(skew.device) * (skew / safe_norm))
        w.copy_(projected[:, self.rows, self.cols])

    def rotation(self, dtype: Optional[torch.dtype] = None, dropout: bool = True) -> torch.Tensor:
        """R [n, b, b] (in `dtype`, default the weight's), with module dropout in training when `dropout`."""
        if self.coft:
            self.project_()
        w = self.weight if dtype is None else self.weight.to(dtype)
        rot = cayley(self.skew(w), self.neumann_terms)
        n = rot.shape[0]
        if dropout and self.training and self.module_dropout > 0 and n > 1:
            # peft's MultiplicativeDropoutLayer: int(p * n) blocks, chosen by one randperm, become the identity
            dropped = torch.randperm(n) < int(self.module_dropout * n)
            eye = torch.eye(self.block_size, dtype=rot.dtype, device=rot.device)
            rot = torch.where(dropped.to(rot.device).view(n, 1, 1), eye, rot)
        return rot

    def extra_repr(self) -> str:
        kind = "exact" if self.is_orthogonal else f"neumann={self.neumann_terms}"
        return (f"r={self.r}, block_size={self.block_size}, block_share={self.block_share}, cayley={kind}, "
                f"coft={self.coft}, module_dropout={self.module_dropout}")


class OFTLayer(nn.Module, BaseTunerLayer):
    """An OFT adapter layer (peft's attribute names: `oft_R` / `oft_embedding_R`, `r`, `oft_block_size`).

    Subclasses per base kind say which features the rotation acts on (`_rotation_features`), how the base
    weight is seen as rows of those features (`_weight_rows` / `_rows_to_weight`) and whether the rotation
    multiplies the layer's output (Embedding) instead of its input.
    """

    adapter_layer_names = ("oft_R", "oft_embedding_R")
    other_param_names = ("r", "oft_block_size")
    _rotation_attr = "oft_R"
    _rotates_output = False

    @staticmethod
    def _base_types() -> tuple[type, ...]:
        """The base layer types this layer class wraps."""
        raise NotImplementedError

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0,
                 fan_in_fan_out: bool = False, **kwargs) -> None:
        super().__init__()
        check_wrapped_type(self, base_layer, self._base_types())
        self.base_layer = base_layer
        self.oft_R = nn.ModuleDict({})
        self.oft_embedding_R = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.cast_input_dtype_enabled = True
        self.fan_in_fan_out = fan_in_fan_out
        self.kwargs = kwargs
        self.in_features, self.out_features = self._in_out_features()
        self.update_layer(adapter_name, r, config=config)

    # ---- per-kind hooks ----

    def _in_out_features(self) -> tuple[int, int]:
        raise NotImplementedError

    def _rotation_features(self) -> int:
        """The number of features blockdiag(R) acts on."""
        return self.in_features

    def _weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as [rows, rotation features] (merging multiplies it by blockdiag(.) from the right)."""
        return weight

    def _rows_to_weight(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.reshape(like.shape)

    # ---- adapters ----

    def _rotations(self) -> nn.ModuleDict:
        return getattr(self, self._rotation_attr)

    def update_layer(self, adapter_name: str, r: int, config, inference_mode: bool = False, **kwargs) -> None:
        """Add (or replace) adapter `adapter_name`: r blocks (or `config.oft_block_size`-sized blocks), adjusted
        to divide the layer's rotation features as peft does, initialised per `config.init_weights`."""
        features = self._rotation_features()
        block_size = config.oft_block_size
        if r == 0 and block_size != 0:
            if features % block_size != 0 or block_size > features:
                adjusted = adjust_oft_parameters(features, block_size)
                warnings.warn(
                    f"Invalid `oft_block_size` ({block_size})! Adjusted `oft_block_size` to ({adjusted}): it must "
                    f"divide the {features} input features of this {type(self.get_base_layer()).__name__}."
                )
                block_size = adjusted
            r = features // block_size
        elif r != 0 and block_size == 0:
            if features % r != 0 or r > features:
                adjusted = adjust_oft_parameters(features, r)
                warnings.warn(
                    f"Invalid `r` ({r})! Adjusted `r` to ({adjusted}): it must divide the {features} input "
                    f"features of this {type(self.get_base_layer()).__name__}."
                )
                r = adjusted
            block_size = features // r
        else:
            raise ValueError(
                f"OFT: exactly one of r ({r}) and oft_block_size ({block_size}) must be non-zero; set the other to 0"
            )
        terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else 0
        if config.use_cayley_neumann:
            terms = max(terms, 1)  # peft's series with 0 or 1 terms is the identity
        rotation = OFTRotation(
            r, block_size, features, coft=config.coft, eps=config.eps, block_share=config.block_share,
            neumann_terms=terms, module_dropout=config.module_dropout,
        )
        self._rotations()[adapter_name] = rotation
        if config.init_weights is True:
            nn.init.zeros_(rotation.weight)
        elif config.init_weights is False:
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        else:
            raise ValueError(f"OFTConfig.init_weights must be True or False, got {config.init_weights!r}")
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = block_size
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode or config.inference_mode)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense blockdiag(R) [d, d] of `adapter_name` (peft's API, for inspection; forward and merging never
        build it). Computed in float32, returned in the adapter's dtype."""
        rotation = self._rotations()[adapter_name]
        with torch.no_grad():
            rot = rotation.rotation(dtype=torch.float32, dropout=False)
            blocks = rot.expand(rotation.in_features // rotation.block_size, -1, -1)
            return torch.block_diag(*blocks.unbind(0)).to(rotation.weight.dtype)

    # ---- forward ----

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not getattr(self, "cast_input_dtype_enabled", True) or x.dtype == dtype:
            return x
        return x.to(dtype)

    def _active_rotations(self) -> list[OFTRotation]:
        rotations = self._rotations()
        return [rotations[name] for name in self.active_adapters if name in rotations]

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x @ blockdiag(R_1) @ blockdiag(R_2) ... over the active adapters.

        Each product runs in the lower precision of x and the adapter: a bf16/fp16 x meets its float32
        adapter's R cast down (small, [n, b, b]; accumulation stays float32 in the kernel), as autocast
        would do, instead of casting x up as peft does — so backward keeps x in 2 bytes per element, not
        a float32 copy. A float32 x meets a bf16/fp16 adapter cast down to it (peft's rule)."""
        for rotation in self._active_rotations():
            rot = rotation.rotation()
            if x.dtype in _HALF and rot.dtype not in _HALF and getattr(self, "cast_input_dtype_enabled", True):
                rot = rot.to(x.dtype)
            else:
                x = self._cast_input_dtype(x, rotation.weight.dtype)
            x = block_diag_rotate(x, rot)
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self._runs_base_only():
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        return self._adapted_forward(x, *args, **kwargs).to(previous_dtype)

    def _adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(self._rotate(x).to(x.dtype), *args, **kwargs)

    # ---- merging ----

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters (default: the active ones) into the base weight so that the merged layer computes what
        the unmerged one does with these adapters active in this order. An input rotation applied first must be
        folded last (W R_2^T R_1^T); an output rotation (Embedding) in order (W R_1 R_2).

        With `safe_merge`, each merged weight is computed in a copy and checked for NaN/inf first; a broken
        adapter raises ValueError naming it and leaves the weight unchanged.
        """
        names = self._adapters_to_merge(adapter_names)
        for name in (names if self._rotates_output else list(reversed(names))):
            self._merge_adapter(name, safe_merge)
            self.merged_adapters.append(name)

    def _folded_weight(self, adapter_name: str, inverse: bool) -> torch.Tensor:
        """The base weight with `adapter_name`'s rotation folded in (or, `inverse`, taken out again)."""
        weight = self.get_base_layer().weight
        rotation = self._rotations()[adapter_name]
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        rot = rotation.rotation(dtype=acc, dropout=False)
        # rows @ blockdiag(m): an input rotation R folds as W R^T, an output rotation as W R
        m = rot if self._rotates_output else rot.transpose(-1, -2)
        if inverse:
            m = m.transpose(-1, -2) if rotation.is_orthogonal else torch.linalg.inv(m)
        rows = block_diag_rotate(self._weight_rows(weight.detach().to(acc)), m.contiguous())
        return self._rows_to_weight(rows, weight).to(weight.dtype)

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        weight = self.get_base_layer().weight
        with torch.no_grad():
            merged = self._folded_weight(adapter_name, inverse=False)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            weight.data.copy_(merged)

    def _unmerge_adapter(self, adapter_name: str) -> None:
        weight = self.get_base_layer().weight
        with torch.no_grad():
            weight.data.copy_(self._folded_weight(adapter_name, inverse=True))

    # ---- scaling (peft's API: OFT has no scale) ----

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self._rotations():
            warnings.warn("Scaling operation for OFT not supported! Automatically set scale to 1.")

    def scale_layer(self, scale: float) -> None:
        if scale != 1 and any(a in self._rotations() for a in self.active_adapters):
            warnings.warn("Scaling operation for OFT not supported! Automatically set scale to 1.")

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        if any(a in self._rotations() for a in self.active_adapters):
            warnings.warn("Unscaling operation for OFT not supported! Keeping scale to 1.")

    def __repr__(self) -> str:
        return "oft." + super().__repr__()


class Linear(OFTLayer):
    """OFT on nn.Linear, or on transformers' Conv1D (weight stored [in, out], `fan_in_fan_out=True`):
    y = base(x @ blockdiag(R))."""

    @staticmethod
    def _base_types():
        conv1d = _conv1d_class()  # transformers is imported only when a Linear is built
        return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, fan_in_fan_out: bool = False,
                 is_target_conv_1d_layer: bool = False, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config, r=r, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer

    def _is_conv1d(self) -> bool:
        return not isinstance(self.get_base_layer(), nn.Linear)  # the other accepted type: Conv1D

    def _in_out_features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        if self._is_conv1d():
            return tuple(base.weight.shape)  # [in, out]
        return base.in_features, base.out_features

    def _weight_rows(self, weight):
        return weight.T if self._is_conv1d() else weight  # W' = W R^T ([out, in]); Conv1D: W'^T = W^T R^T

    def _rows_to_weight(self, rows, like):
        return rows.T if self._is_conv1d() else rows

    def _adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rotations = self._active_rotations()
        base = self.get_base_layer()
        weight = transpose(base.weight, self._is_conv1d())  # [out, in]
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        # One adapter on a plain frozen base, more rows than output features: rotating W once (out x d x b)
        # is cheaper than rotating x (rows x d x b), and backward needs grad_y W either way.
        if (len(rotations) == 1 and not args and not kwargs and self.base_layer is base
                and not weight.requires_grad and rows > weight.shape[0] and x.dtype == weight.dtype
                and (x.dtype in _HALF or rotations[0].weight.dtype == x.dtype)
                and getattr(self, "cast_input_dtype_enabled", True)):
            rot = rotations[0].rotation().to(x.dtype)
            return _RotatedWeightLinear.apply(x, weight, base.bias, rot)
        return super()._adapted_forward(x, *args, **kwargs)


class _RotatedWeightLinear(torch.autograd.Function):
    """``F.linear(x @ blockdiag(R), W, b)`` computed as ``F.linear(x, W blockdiag(R)^T, b)``: the rotation
    is applied to W's rows (a small one-off product) instead of to every token. Backward is the rotation's
    own backward on ``g = grad_y W`` (one kernel call for grad_x and grad_R); saves x, W and R only, and
    gives W no gradient (the caller only takes this path for a frozen W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, rot):
        ctx.save_for_backward(x, weight, rot)
        return F.linear(x, block_diag_rotate(weight, rot.transpose(-1, -2)), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, rot = ctx.saved_tensors
        need_x, _, need_bias, need_rot = ctx.needs_input_grad
        grad_y = grad_y.reshape(-1, weight.shape[0])
        grad_bias = grad_y.sum(0) if need_bias else None
        grad_x = grad_rot = None
        if need_x or need_rot:
            d = x.shape[-1]
            grad_x, grad_rot = block_diag_rotate_grads(grad_y @ weight, x.reshape(-1, d), rot, need_x, need_rot)
            if grad_x is not None:
                grad_x = grad_x.reshape(x.shape)
        return grad_x, None, grad_bias, grad_rot


class Conv2d(OFTLayer):
    """OFT on nn.Conv2d: the rotation acts on the flattened filter (in / groups * kh * kw features); the base
    convolution runs with W_flat @ blockdiag(R)^T (all of the base's parameters)."""

    @staticmethod
    def _base_types():
        return (nn.Conv2d,)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, **kwargs) -> None:
        if isinstance(base_layer, BaseTunerLayer):
            # the rotated filter replaces the conv's weight: an adapter of another method in between would be lost
            raise TypeError(
                f"OFT cannot wrap a Conv2d already adapted by another method ({type(base_layer).__name__}); "
                "exclude it from OFT's target_modules"
            )
        super().__init__(base_layer, adapter_name, config, r=r, **kwargs)

    def _in_out_features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        return base.in_channels, base.out_channels

    def _rotation_features(self) -> int:
        weight = self.get_base_layer().weight
        return math.prod(weight.shape[1:])  # in / groups * kh * kw, peft's (in * k * k) for ungrouped convs

    def _weight_rows(self, weight):
        return weight.reshape(weight.shape[0], -1)

    def _adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        rotations = self._active_rotations()
        if not rotations:
            return self.base_layer(x, *args, **kwargs)
        weight = base.weight
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        rows = self._weight_rows(weight.to(acc))
        # patches @ R_1 @ R_2 @ W_flat^T = patches @ (W_flat R_2^T R_1^T)^T: the last adapter folds first
        for rotation in reversed(rotations):
            rows = block_diag_rotate(rows, rotation.rotation(dtype=acc).transpose(-1, -2).contiguous())
        rotated = self._rows_to_weight(rows, weight).to(weight.dtype)
        return base._conv_forward(self._cast_input_dtype(x, weight.dtype), rotated, base.bias)


class Embedding(OFTLayer):
    """OFT on nn.Embedding: y = base(ids) @ blockdiag(R) (`oft_embedding_R`, peft's name)."""

    @staticmethod
    def _base_types():
        return (nn.Embedding,)
    _rotation_attr = "oft_embedding_R"
    _rotates_output = True

    def _in_out_features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        return base.embedding_dim, base.num_embeddings  # peft: in_features is the rotated (embedding) dim

    def _adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        return self._rotate(result).to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # x holds token ids: the output dtype is the embedding's
        if self._runs_base_only():
            return self.base_layer(x, *args, **kwargs)
        return self._adapted_forward(x, *args, **kwargs)
