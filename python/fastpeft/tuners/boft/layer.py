"""BOFT layers on nn.Linear, transformers' Conv1D and nn.Conv2d; parameter names, shapes and math are peft's.

Per adapter: `boft_R` [m, N, b, b] (m butterfly factors of N blocks of size b; N * b = D, the input dimension
of a Linear or the flattened filter size in/groups * kh * kw of a Conv2d) and `boft_s` ([out, 1] for Linear,
[1, out] for Conv2d, as peft). Factor i is ``Q_i = P_i blockdiag(cayley(R_i)) P_i^T`` with the butterfly
permutation P_i, and the adapter's rotation is ``B = Q_(m-1) ... Q_0`` (peft's product order). peft builds B
densely ([D, D], from dense permutation matrices); here the permutations are index maps and B is applied
factor by factor through `fastpeft.ops.butterfly_rotate` (``x @ M_0 ... M_(k-1)``):

- Linear: ``y = (x B) W^T * s + bias``; with several active adapters peft left-multiplies later adapters'
  rotations (``x B_last ... B_first``) and multiplies their scales.
- Conv2d and merging rotate the weight instead: ``W' = W_flat B^T * s`` (``B^T = Q_0^T ... Q_(m-1)^T``: the
  transposed blocks in factor order), then the base layer's own convolution runs with W'.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ... import ops
from ..base import BaseTunerLayer, _conv1d_class, transpose
from .config import BOFTConfig

__all__ = ["BOFTLayer", "Linear", "Conv2d", "MultiplicativeDropoutLayer", "butterfly_permutation"]


def butterfly_permutation(dim: int, block_size: int, factor: int) -> torch.Tensor:
    """Index map (int64 [dim]) of butterfly factor `factor` over `dim` features with blocks of `block_size`
    (peft's block_butterfly_perm): factor i cuts the features into groups of block_size * 2^i and each group
    into 2^(i+1) halves-of-a-block; the halves at even positions come first, then the odd ones. Factor 0 is the
    identity. As a matrix: ``P[j, perm[j]] = 1``."""
    if factor == 0:
        return torch.arange(dim)
    half = block_size // 2
    group = block_size * 2**factor
    pieces = group // half
    order = torch.cat([torch.arange(0, pieces, 2), torch.arange(1, pieces, 2)])
    within = (order[:, None] * half + torch.arange(half)).reshape(-1)
    return (torch.arange(dim // group)[:, None] * group + within).reshape(-1)


class MultiplicativeDropoutLayer(nn.Module):
    """peft's BOFT dropout on the Cayley blocks [m, N, b, b]: in training, one random factor gets int(p * N)
    random blocks replaced by the identity. Draws torch's default generator exactly as peft does
    (`torch.randint(0, m, (1,))`, then `torch.randperm(N)`), so a seed gives peft's masks."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return blocks
        m, n, b, _ = blocks.shape
        factor = torch.randint(0, m, (1,))
        replaced = torch.randperm(n) < int(self.p * n)  # peft: a shuffled [1]*k + [0]*(n-k) mask
        # row `factor` of the [m, n] mask is `replaced`, the others False; built with tensor ops (no .item(),
        # which would be a graph break under torch.compile): the same draws and mask as indexing with it
        mask = (torch.arange(m) == factor)[:, None] & replaced[None, :]
        eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
        return torch.where(mask.to(blocks.device)[:, :, None, None], eye, blocks)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _rotate(x: torch.Tensor, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    for rot, perm in factors:
        x = ops.butterfly_rotate(x, rot, perm)
    return x


class _RotatedLinear(torch.autograd.Function):
    """``y = (x @ M) W^T * scale + bias`` with M the butterfly factors (`_rotate`).

    Saves x and ``lin = (x M) W^T`` only (peft keeps x, its pre-scale output and its dense [d, d] rotation
    products). With more rows than output features (and a frozen W) the forward rotates W's rows once
    instead of every token. Backward runs the butterfly's own backward on ``grad_lin W``; only a trainable W
    (which needs ``x M``) or several adapters recompute ``x M`` through autograd."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, perms, *rots):
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if len(rots) == 1 and rows > weight.shape[0] and not weight.requires_grad:
            # more rows than outputs: rotate W's rows once, W M^T = W M_(m-1)^T ... M_0^T, not every token
            lin = F.linear(x, ops.butterfly_rotate(weight, rots[0].transpose(-1, -2).flip(0), perms[0].flip(0)))
        else:
            lin = F.linear(_rotate(x, list(zip(rots, perms))), weight)
        # one pass, in the promoted dtype (float32 for a bf16 base with float32 adapters, as peft)
        y = lin * scale if bias is None else torch.addcmul(bias, lin, scale)
        ctx.perms = perms
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, scale, lin, *rots)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, scale, lin, *rots = ctx.saved_tensors
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        need_rots = ctx.needs_input_grad[5:]
        out_f = lin.shape[-1]
        grad_x = grad_w = grad_b = grad_s = None
        grad_rots = [None] * len(rots)
        if need_b:
            grad_b = grad_y.reshape(-1, out_f).sum(0).to(ctx.bias_dtype)
        if need_s:
            grad_s = (grad_y * lin).reshape(-1, out_f).sum(0).to(scale.dtype)
        if len(rots) == 1 and not need_w and (need_x or need_rots[0]):
            # one butterfly: its backward kernel recomputes the factors' inputs itself
            grad_lin = (grad_y * scale).to(weight.dtype)
            d = x.shape[-1]
            grad_x, grad_rot = ops.butterfly_rotate_grads(
                grad_lin.reshape(-1, out_f) @ weight, x.reshape(-1, d), rots[0], ctx.perms[0], need_x, need_rots[0])
            grad_x = None if grad_x is None else grad_x.reshape(x.shape)
            grad_rots = [grad_rot]
        elif need_x or need_w or any(need_rots):
            grad_lin = (grad_y * scale).to(weight.dtype)
            with torch.enable_grad():
                xd = x.detach().requires_grad_(need_x)
                rd = [r.detach().requires_grad_(n) for r, n in zip(rots, need_rots)]
                z = _rotate(xd, list(zip(rd, ctx.perms)))
            if need_w:
                grad_w = grad_lin.reshape(-1, out_f).t() @ z.detach().reshape(-1, z.shape[-1])
            wrt = [t for t in [xd, *rd] if t.requires_grad]
            if wrt:
                grads = iter(torch.autograd.grad(z, wrt, grad_lin @ weight))
                grad_x = next(grads) if need_x else None
                grad_rots = [next(grads) if n else None for n in need_rots]
        return (grad_x, grad_w, grad_b, grad_s, None, *grad_rots)


class BOFTLayer(nn.Module, BaseTunerLayer):
    """A BOFT adapter layer (peft's attribute names: `boft_R`, `boft_s`, `boft_block_size`, `boft_block_num`,
    `boft_dropout`); `boft_perm` holds each adapter's butterfly index maps [m, D] in factor order (peft keeps
    dense [m, D, D] permutation matrices in a non-persistent buffer instead)."""

    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout", "boft_perm")
    _base_kind = "Linear"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BOFTConfig, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout = nn.ModuleDict({})
        self.boft_R = nn.ParameterDict({})
        self.boft_s = nn.ParameterDict({})
        self.boft_perm: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.cast_input_dtype_enabled = True
        self._init_base(config)
        self.update_layer(adapter_name, config=config)

    # ---- per base kind ----

    def _init_base(self, config: BOFTConfig) -> None:
        """Check the base layer's type; set in_features / out_features (and the weight layout)."""
        raise NotImplementedError

    def _rotated_dim(self) -> int:
        """D: the dimension the rotation acts on."""
        raise NotImplementedError

    def _dim_name(self) -> str:
        raise NotImplementedError

    def _scale_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as [out, D] rows (each row is rotated)."""
        raise NotImplementedError

    def _rows_to_weight(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- adapters ----

    def _block_layout(self, config: BOFTConfig) -> tuple[int, int, int]:
        """(m, N, b) for this layer, checked as peft checks them (errors say what to change)."""
        dim, what = self._rotated_dim(), self._dim_name()
        size, num, m = config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor
        if m < 1:
            raise ValueError(f"boft_n_butterfly_factor must be a positive integer, got {m}")
        spread = 2 ** (m - 1)  # the last factor mixes groups of b * 2^(m-1) features
        if num != 0 and size == 0:
            if dim % num != 0:
                raise ValueError(f"{what} ({dim}) must be divisible by boft_block_num ({num})!")
            if m > 1 and (m - 1 > int(math.log2(num)) or num % spread != 0):
                raise ValueError(
                    f"boft_block_num ({num}) must be a multiple of 2 raised to the power of boft_n_butterfly_factor "
                    f"- 1 (here {spread}): invalid combination of boft_n_butterfly_factor ({m}) and boft_block_num "
                    f"({num}); lower boft_n_butterfly_factor or choose another boft_block_num"
                )
            size = dim // num
        elif size != 0 and num == 0:
            if dim % size != 0:
                raise ValueError(f"{what} ({dim}) must be divisible by boft_block_size ({size})!")
            if m > 1 and dim % (size * spread) != 0:
                raise ValueError(
                    f"Invalid combination of {what} ({dim}), boft_n_butterfly_factor ({m}) and boft_block_size "
                    f"({size})! {what} must be divisible by boft_block_size * 2^(boft_n_butterfly_factor - 1) = "
                    f"{size * spread}; lower boft_n_butterfly_factor or boft_block_size"
                )
            num = dim // size
        else:
            raise ValueError(
                f"set exactly one of boft_block_size ({size}) and boft_block_num ({num}) to a positive value"
            )
        if m > 1 and (num % 2 != 0 or size % 2 != 0):
            raise ValueError(
                f"With boft_n_butterfly_factor > 1 the block number and block size must be even, got "
                f"boft_block_num ({num}) and boft_block_size ({size}) for {what} ({dim})"
            )
        return m, num, size

    def update_layer(self, adapter_name: str, config: BOFTConfig, **kwargs) -> None:
        """Add (or replace) adapter `adapter_name` with the block layout of `config`, initialised per `config`."""
        m, num, size = self._block_layout(config)
        self.boft_dropout[adapter_name] = (
            MultiplicativeDropoutLayer(p=config.boft_dropout) if config.boft_dropout > 0.0 else nn.Identity()
        )
        dim = self._rotated_dim()
        self.boft_perm[adapter_name] = torch.stack([butterfly_permutation(dim, size, i) for i in range(m)])
        self.boft_R[adapter_name] = nn.Parameter(torch.zeros(m, num, size, size))
        self.boft_s[adapter_name] = nn.Parameter(torch.ones(*self._scale_shape()))
        self.reset_boft_parameters(adapter_name, config.init_weights)
        self.boft_block_size[adapter_name] = size
        self.boft_block_num[adapter_name] = num
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_boft_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """True: R = 0 (identity rotation), s = 1; False: R ~ N(0, 0.1), s ~ N(1, 0.1) (peft's draws, in order)."""
        if init_weights is False:
            nn.init.normal_(self.boft_R[adapter_name], mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s[adapter_name], mean=1.0, std=0.1)
        elif init_weights is True:
            nn.init.zeros_(self.boft_R[adapter_name])
            nn.init.ones_(self.boft_s[adapter_name])
        else:
            raise ValueError(f"Unknown initialization init_weights={init_weights!r}; use True or False")

    def _perm(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        perm = self.boft_perm[adapter_name]
        if perm.device != device:
            perm = self.boft_perm[adapter_name] = perm.to(device)
        return perm

    def _blocks(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """cayley(R) of every block, peft's layout [m, N, b, b] (R taken in `dtype` when given)."""
        r = self.boft_R[adapter_name]
        if dtype is not None:
            r = r.to(dtype)
        m, n, b, _ = r.shape
        r = r.reshape(m * n, b, b)
        return ops.cayley(0.5 * (r - r.transpose(1, 2))).reshape(m, n, b, b)

    def _input_factors(self, blocks_per_adapter, perms) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`butterfly_rotate` arguments for ``x B_k ... B_1`` (adapters given first to last): the last adapter's
        rotation first, each one's factors from m-1 down to 0. Adapters with equal block shapes share one call."""
        factors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for blocks, perm in reversed(list(zip(blocks_per_adapter, perms))):
            rot, p = blocks.flip(0), perm.flip(0)
            if factors and factors[-1][0].shape[1:] == rot.shape[1:]:
                rot, p = torch.cat([factors[-1][0], rot]), torch.cat([factors[-1][1], p])
                factors.pop()
            factors.append((rot, p))
        return factors

    def _weight_factors(self, blocks_per_adapter, perms) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`butterfly_rotate` arguments for ``W_flat B_1^T ... B_k^T`` = W_flat (B_k ... B_1)^T: adapters first to
        last, each one's transposed blocks in factor order."""
        factors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for blocks, p in zip(blocks_per_adapter, perms):
            rot = blocks.transpose(-1, -2)
            if factors and factors[-1][0].shape[1:] == rot.shape[1:]:
                rot, p = torch.cat([factors[-1][0], rot]), torch.cat([factors[-1][1], p])
                factors.pop()
            factors.append((rot, p))
        return factors

    # ---- merging ----

    def _merge_dtype(self, adapter_name: str, weight: torch.Tensor) -> torch.dtype:
        dtype = torch.promote_types(torch.float32, weight.dtype)
        return torch.promote_types(dtype, self.boft_R[adapter_name].dtype)

    def _merged_rows(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W_flat B^T * s`` in float32 (or wider), one rounding at the end by the caller."""
        acc = self._merge_dtype(adapter_name, weight)
        perm = self._perm(adapter_name, weight.device)
        factors = self._weight_factors([self._blocks(adapter_name, acc)], [perm])
        rows = _rotate(self._weight_rows(weight).to(acc), factors)
        return rows * self.boft_s[adapter_name].to(acc).reshape(-1, 1)

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        weight = self.get_base_layer().weight
        with torch.no_grad():
            merged = self._rows_to_weight(self._merged_rows(adapter_name, weight)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            weight.data = merged.contiguous()

    def _unmerge_adapter(self, adapter_name: str) -> None:
        """``W = (W' / s) B``: B is orthogonal, so its transpose undoes ``B^T``."""
        weight = self.get_base_layer().weight
        with torch.no_grad():
            acc = self._merge_dtype(adapter_name, weight)
            perm = self._perm(adapter_name, weight.device)
            rows = self._weight_rows(weight).to(acc) / self.boft_s[adapter_name].to(acc).reshape(-1, 1)
            rows = _rotate(rows, self._input_factors([self._blocks(adapter_name, acc)], [perm]))
            weight.data = self._rows_to_weight(rows).to(weight.dtype).contiguous()

    def get_delta_weight(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """peft's (rotation B [D, D], boft_s as peft returns it) of `adapter_name`. Dense: for inspection and
        tests only; forward and merging never build it."""
        blocks = self._blocks(adapter_name)
        perm = self._perm(adapter_name, blocks.device)
        eye = torch.eye(self._rotated_dim(), dtype=blocks.dtype, device=blocks.device)
        rotation = _rotate(eye, self._input_factors([blocks], [perm]))  # rows of I B
        s = self.boft_s[adapter_name]
        return rotation, (s.transpose(0, 1) if self._base_kind == "Conv2d" else s)

    # ---- forward ----

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ValueError("BOFT does not support mixed-adapter batches (adapter_names=...)")
        previous_dtype = x.dtype
        names = self._active_with_weights()
        if self._runs_base_only() or not names:
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        return self._adapted_forward(x, names)  # each layer kind's: the active adapters applied, in x's dtype

    def _active_with_weights(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.boft_R]

    def _dropped_blocks(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """cayley(R) with the adapter's multiplicative dropout applied (in training), then cast to `dtype`."""
        return self.boft_dropout[adapter_name](self._blocks(adapter_name)).to(dtype)

    def _combined_scale(self, names: list[str]) -> torch.Tensor:
        """The product of the adapters' boft_s, flat [out] (peft multiplies them)."""
        scale = self.boft_s[names[0]].reshape(-1)
        for name in names[1:]:
            scale = self.boft_s[name].reshape(-1) * scale
        return scale

    # ---- peft's scaling API (BOFT has no scale) ----

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.boft_R:
            warnings.warn("Scaling operation for BOFT not supported! Automatically set scale to 1.")

    def scale_layer(self, scale: float) -> None:
        if scale != 1 and any(a in self.boft_R for a in self.active_adapters):
            warnings.warn("Scaling operation for BOFT not supported! Automatically set scale to 1.")

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        if any(a in self.boft_R for a in self.active_adapters):
            warnings.warn("Unscaling operation for BOFT not supported! Keeping scale to 1.")

    def __repr__(self) -> str:
        return "boft." + super().__repr__()


class Linear(BOFTLayer):
    """BOFT on nn.Linear or transformers' Conv1D (fan_in_fan_out): ``y = (x B) W^T * s + bias``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BOFTConfig,
                 is_target_conv_1d_layer: bool = False, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config, **kwargs)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer

    def _init_base(self, config: BOFTConfig) -> None:
        self.fan_in_fan_out = config.fan_in_fan_out
        base = self.get_base_layer()
        conv1d = _conv1d_class()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif conv1d is not None and isinstance(base, conv1d):
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(f"BOFT Linear wraps an nn.Linear or a transformers Conv1D, got {type(base).__name__}")

    def _rotated_dim(self) -> int:
        return self.in_features

    def _dim_name(self) -> str:
        return "in_features"

    def _scale_shape(self) -> tuple[int, int]:
        return (self.out_features, 1)

    def _weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return transpose(weight, self.fan_in_fan_out)

    def _rows_to_weight(self, rows: torch.Tensor) -> torch.Tensor:
        return transpose(rows, self.fan_in_fan_out)

    def _adapted_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        previous_dtype = x.dtype
        base = self.get_base_layer()
        weight = transpose(base.weight, self.fan_in_fan_out)
        if self.cast_input_dtype_enabled:
            x = x.to(weight.dtype)
        # peft runs each adapter's Cayley transform and then its dropout draws, adapter by adapter
        blocks = [self._dropped_blocks(name, x.dtype) for name in names]
        perms = [self._perm(name, x.device) for name in names]
        factors = self._input_factors(blocks, perms)
        scale = self._combined_scale(names)
        scale = scale.to(torch.promote_types(scale.dtype, previous_dtype))
        rots, fperms = zip(*factors)
        y = _RotatedLinear.apply(x, weight, base.bias, scale, tuple(fperms), *rots)
        return y.to(previous_dtype)


class Conv2d(BOFTLayer):
    """BOFT on nn.Conv2d: the flattened filters (in/groups * kh * kw) are rotated, ``W' = W_flat B^T * s``,
    and the base layer's convolution (stride, padding, dilation, groups, padding_mode) runs with W'."""

    _base_kind = "Conv2d"

    def _init_base(self, config: BOFTConfig) -> None:
        base = self.get_base_layer()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"BOFT Conv2d wraps an nn.Conv2d, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_channels, base.out_channels

    def _rotated_dim(self) -> int:
        return self.get_base_layer().weight[0].numel()

    def _dim_name(self) -> str:
        base = self.get_base_layer()
        groups = f"/{base.groups}" if base.groups > 1 else ""
        kh, kw = base.kernel_size
        return f"Convolutional kernel dimension (in_channels{groups} * {kh} * {kw})"

    def _scale_shape(self) -> tuple[int, int]:
        return (1, self.out_features)

    def _weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _rows_to_weight(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(self.get_base_layer().weight.shape)

    def _adapted_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        previous_dtype = x.dtype
        base = self.get_base_layer()
        # The rotated, scaled filter W' = W_flat B^T s is built in the promoted dtype (float32 for a bf16 base
        # with float32 adapters) and rounded once to the base's dtype; the convolution runs in the base's
        # dtype (peft runs it in float32 there, at twice the cost on a CPU with bf16 units).
        scale = self._combined_scale(names)
        dtype = torch.promote_types(base.weight.dtype, scale.dtype)
        blocks = [self._dropped_blocks(name, dtype) for name in names]
        perms = [self._perm(name, x.device) for name in names]
        rows = _rotate(self._weight_rows(base.weight).to(dtype), self._weight_factors(blocks, perms))
        weight = self._rows_to_weight(rows * scale.to(dtype)[:, None]).to(base.weight.dtype)
        return base._conv_forward(x.to(base.weight.dtype), weight, base.bias).to(previous_dtype)
