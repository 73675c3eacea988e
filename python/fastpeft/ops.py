"""Typed Python wrappers of fastpeft's compiled ops (the only entry points tuners use).

The op schemas live in ``csrc/registration.cpp``; CPU and CUDA kernels in ``csrc/cpu`` and
``csrc/cuda``. This module adds, per op, a fake (meta) implementation for ``torch.compile`` and an
autograd formula (``torch.library.register_autograd``). On devices with no compiled kernel (e.g.
MPS) the wrappers fall back to :mod:`fastpeft.reference`; on CPU and CUDA they never do.

Dropout is "seeded": the mask is a hash of (seed, element index), regenerated in backward, so
neither the mask nor ``drop(x)`` is ever saved for backward. A seed is a one-element int64 CPU
tensor drawn with :func:`new_dropout_seed` from torch's default generator, so ``torch.manual_seed``
makes runs reproducible and activation checkpointing recomputes the same mask.
"""
from __future__ import annotations

import functools
import math
import os
import weakref
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference as _ref
from ._loader import _C

__all__ = [
    "new_dropout_seed",
    "seeded_dropout",
    "lora_linear",
    "multi_lora_mix",
    "dora_linear",
    "dora_weight_norm",
    "nf4_quantize",
    "nf4_dequantize",
    "blockwise8_quantize",
    "blockwise8_dequantize",
    "nf4_linear",
    "qlora_linear",
    "kron_linear",
    "ia3_linear",
    "hadamard_delta",
    "hadamard_linear",
    "cayley",
    "block_diag_rotate",
    "block_diag_rotate_grads",
    "butterfly_rotate",
    "segmented_lora",
    "butterfly_rotate_grads",
]

_ops = torch.ops.fastpeft
_KERNEL_DEVICES = ("cpu", "cuda", "meta")
_NO_SEED = torch.zeros(1, dtype=torch.int64)  # passed when dropout is off; never read


def new_dropout_seed() -> Tensor:
    """Draw a dropout seed: a one-element int64 CPU tensor from torch's default CPU generator."""
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64)


# ---- argument checks ------------------------------------------------------------------------------


def _use_kernel(x: Tensor) -> bool:
    kind = x.device.type
    if kind == "cuda" and not _C.cuda_compiled:
        raise RuntimeError(
            "fastpeft was built without CUDA kernels but got CUDA tensors; rebuild it on a machine "
            "with nvcc and a CUDA build of torch (`pip install --no-build-isolation --no-deps .`)"
        )
    return kind in _KERNEL_DEVICES


def _rows(t: Tensor, cols: int) -> Tensor:
    """t [..., cols] viewed as 2-D [prod(leading dims), cols] (reshape(-1, cols) is ambiguous when cols == 0)."""
    return t.reshape(math.prod(t.shape[:-1]), cols)


def _check_tensor(t, name: str, dim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"'{name}' must be a floating-point tensor, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"'{name}' must be {dim}-D, got shape {tuple(t.shape)}")


def _check_same(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"'{name}' has dtype {t.dtype} but '{ref_name}' has dtype {ref.dtype}; cast them to one dtype")
    if t.device != ref.device:
        raise ValueError(f"'{name}' is on {t.device} but '{ref_name}' is on {ref.device}; move them to one device")


def _check_dropout(dropout_p: float, seed) -> None:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"'dropout_p' must be a float in [0, 1), got {dropout_p!r}")
    if seed is not None:
        if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError("'seed' must be a one-element int64 tensor (see fastpeft.ops.new_dropout_seed())")
        if seed.device.type not in ("cpu", "meta"):
            raise ValueError(f"'seed' must be a CPU tensor, got one on {seed.device}")


def _check_linear(x, weight, bias, lora_A, lora_B) -> None:
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("'x' must have at least one dimension (its last is in_features)")
    _check_tensor(weight, "weight", 2)
    _check_tensor(lora_A, "lora_A", 2)
    _check_tensor(lora_B, "lora_B", 2)
    for t, name in ((weight, "weight"), (lora_A, "lora_A"), (lora_B, "lora_B")):
        _check_same(t, x, name, "x")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"'x' has last dim {x.shape[-1]} but 'weight' has in_features {in_f} (weight is [out, in])")
    _check_lora_shapes(lora_A, lora_B, in_f, "'weight'", out_f, "'weight'")
    if bias is not None:
        _check_tensor(bias, "bias", 1)
        _check_same(bias, x, "bias", "x")
        if bias.shape[0] != out_f:
            raise ValueError(f"'bias' has {bias.shape[0]} elements but 'weight' has out_features {out_f}")


def _check_lora_shapes(lora_A: Tensor, lora_B: Tensor, in_f: int, in_owner: str, out_f: int, out_owner: str) -> None:
    if lora_A.shape[1] != in_f:
        raise ValueError(f"'lora_A' has in_features {lora_A.shape[1]} but {in_owner} has {in_f} (lora_A is [r, in])")
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"'lora_B' has rank {lora_B.shape[1]} but 'lora_A' has rank {lora_A.shape[0]} (lora_B is [out, r])"
        )
    if lora_B.shape[0] != out_f:
        raise ValueError(f"'lora_B' has out_features {lora_B.shape[0]} but {out_owner} has {out_f}")


def _seed_for(dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    if dropout_p > 0.0:
        return new_dropout_seed() if seed is None else seed
    return _NO_SEED


def _fake_check_linear(x, weight, bias, lora_A, lora_B) -> None:
    # The meta/fake path must raise the same kind of error a kernel would.
    if x.dim() != 2:
        raise ValueError(f"'x' must be 2-D, got shape {tuple(x.shape)}")
    _check_linear(x, weight, bias, lora_A, lora_B)


# ---- fake (meta) implementations ------------------------------------------------------------------


def _check_devices(names: Sequence[str], args: Sequence) -> None:
    """Every tensor argument (lists of tensors included) on one device, except the dropout seed (read on the
    host). A call mixing devices would otherwise be routed to the meta kernel and answer with a meta tensor."""
    first = first_name = None
    for name, a in zip(names, args):
        if name == "seed":
            continue
        ts = a if isinstance(a, (list, tuple)) else (a,)
        for k, t in enumerate(ts):
            if not isinstance(t, Tensor):
                continue
            label = name if ts is not a else f"{name}[{k}]"
            if first is None:
                first, first_name = t, label
            elif t.device != first.device:
                raise ValueError(f"'{label}' is on {t.device} but '{first_name}' is on {first.device}; move them to one "
                                 "device")


def _register_fake(qualname: str):
    """torch.library.register_fake, plus one check that the tensor arguments share a device."""
    names = [a.name for a in getattr(_ops, qualname.split("::")[1]).default._schema.arguments]

    def deco(fn):
        @functools.wraps(fn)
        def fake(*args, **kwargs):
            _check_devices(names, args)
            return fn(*args, **kwargs)

        torch.library.register_fake(qualname)(fake)
        return fn

    return deco



@_register_fake("fastpeft::seeded_dropout")
def _seeded_dropout_fake(x, p, seed):
    _check_dropout(p, seed)
    return x.new_empty(x.shape)


@_register_fake("fastpeft::lora_forward")
def _lora_forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    _fake_check_linear(x, weight, bias, lora_A, lora_B)
    _check_dropout(dropout_p, seed)
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


@_register_fake("fastpeft::lora_backward")
def _lora_backward_fake(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_grad_x=True):
    _fake_check_linear(x, weight, None, lora_A, lora_B)
    gx = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    return gx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _norm_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@_register_fake("fastpeft::dora_weight_norm")
def _dora_weight_norm_fake(weight, lora_A, lora_B, scaling):
    return weight.new_empty((weight.shape[0],), dtype=_norm_dtype(weight))


def _check_magnitude(magnitude, weight) -> None:
    _check_tensor(magnitude, "magnitude", 1)
    _check_same(magnitude, weight, "magnitude", "weight")
    if magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"'magnitude' has {magnitude.shape[0]} elements but 'weight' has out_features {weight.shape[0]}")


@_register_fake("fastpeft::dora_forward")
def _dora_forward_fake(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed):
    _fake_check_linear(x, weight, bias, lora_A, lora_B)
    _check_magnitude(magnitude, weight)
    _check_dropout(dropout_p, seed)
    n, out = x.shape[0], weight.shape[0]
    return x.new_empty((n, out)), x.new_empty((n, lora_A.shape[0])), x.new_empty((n, out))


@_register_fake("fastpeft::dora_backward")
def _dora_backward_fake(grad_y, x, weight, lora_A, lora_B, magnitude, weight_norm, u, z, scaling, dropout_p,
                        seed, need_grad_x=True):
    _fake_check_linear(x, weight, None, lora_A, lora_B)
    gx = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    return gx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), magnitude.new_empty(magnitude.shape)


# ---- autograd -------------------------------------------------------------------------------------


def _seeded_dropout_setup(ctx, inputs, output):
    _, p, seed = inputs
    ctx.p = p
    ctx.save_for_backward(seed)


def _seeded_dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return _ops.seeded_dropout(grad, ctx.p, seed), None, None


torch.library.register_autograd(
    "fastpeft::seeded_dropout", _seeded_dropout_backward, setup_context=_seeded_dropout_setup
)


def _lora_setup(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.set_materialize_grads(False)  # no zero-filled grad for u (it is an internal value)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.save_for_backward(x, weight, lora_A, lora_B, u, seed)


def _lora_backward(ctx, grad_y, _grad_u):
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_y is None:
        return (None,) * 8
    grad_x = grad_A = grad_B = grad_W = grad_b = None
    if need[0] or need[3] or need[4]:
        grad_x, grad_A, grad_B = _ops.lora_backward(
            grad_y, x, weight, lora_A, lora_B, u, ctx.scaling, ctx.dropout_p, seed, bool(need[0])
        )
        if not need[0]:
            grad_x = None
    if need[1]:  # unfrozen base weight: y = x W^T + ...
        grad_W = grad_y.t() @ x
    if need[2]:
        grad_b = grad_y.sum(0)
    return grad_x, grad_W, grad_b, grad_A, grad_B, None, None, None


torch.library.register_autograd("fastpeft::lora_forward", _lora_backward, setup_context=_lora_setup)


def _dora_setup(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed = inputs
    _, u, z = output
    ctx.mark_non_differentiable(u, z)
    ctx.set_materialize_grads(False)  # no zero-filled [N, out] grad for z
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, weight_norm, u, z, seed)


def _dora_backward(ctx, grad_y, _grad_u, _grad_z):
    x, weight, lora_A, lora_B, magnitude, weight_norm, u, z, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_y is None:
        return (None,) * 10
    s, p = ctx.scaling, ctx.dropout_p
    grad_x = grad_A = grad_B = grad_m = grad_W = grad_b = None
    if need[0] or need[3] or need[4] or need[5]:
        grad_x, grad_A, grad_B, grad_m = _ops.dora_backward(
            grad_y, x, weight, lora_A, lora_B, magnitude, weight_norm, u, z, s, p, seed, bool(need[0])
        )
        if not need[0]:
            grad_x = None
    if need[1]:  # unfrozen base weight (the norm is a constant, as in peft)
        mn = (magnitude.to(weight_norm.dtype) / weight_norm).to(grad_y.dtype)
        if p > 0.0:
            grad_W = grad_y.t() @ x + (grad_y * (mn - 1)).t() @ _ops.seeded_dropout(x, p, seed)
        else:
            grad_W = (grad_y * mn).t() @ x
    if need[2]:
        grad_b = grad_y.sum(0)
    return grad_x, grad_W, grad_b, grad_A, grad_B, grad_m, None, None, None, None


torch.library.register_autograd("fastpeft::dora_forward", _dora_backward, setup_context=_dora_setup)


# ---- public wrappers ------------------------------------------------------------------------------


def seeded_dropout(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """Dropout whose mask is a hash of (seed, element index): ``x * keep / (1 - p)``.

    ``x`` of any shape is indexed as the 2-D ``x.reshape(-1, x.shape[-1])``; the same seed gives the
    same mask on CPU and CUDA, and the backward regenerates it instead of storing it. ``p`` must be
    in [0, 1); ``seed`` is a one-element int64 CPU tensor (:func:`new_dropout_seed`).
    """
    _check_tensor(x, "x")
    _check_dropout(p, seed)
    if seed is None:
        raise TypeError("'seed' must be a one-element int64 tensor, got None")
    if not _use_kernel(x):
        return _ref.seeded_dropout(x, float(p), seed)
    if x.dim() == 2:
        return _ops.seeded_dropout(x, float(p), seed)
    x2 = _rows(x, x.shape[-1]) if x.dim() >= 1 else x.reshape(1, 1)
    return _ops.seeded_dropout(x2, float(p), seed).reshape(x.shape)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """LoRA linear layer: ``x W^T + b + scaling * B(A(dropout(x)))`` in one fused op.

    Args:
        x: ``[..., in]`` input (any leading dims).
        weight: base weight ``[out, in]`` (pass ``weight.T`` for a fan_in_fan_out/Conv1D layer);
            may be a non-contiguous view.
        bias: ``[out]`` or None.
        lora_A: ``[r, in]``; lora_B: ``[out, r]``.
        scaling: the adapter scale (lora_alpha / r).
        dropout_p: dropout probability on the adapter path's input, in [0, 1).
        seed: one-element int64 CPU tensor for the dropout mask; drawn with
            :func:`new_dropout_seed` when dropout_p > 0 and it is None.

    Returns ``[..., out]``. Backward saves only x, the weights, the rank-r ``u = drop(x) A^T`` and
    the seed (no mask, no ``drop(x)``); gradients flow to x, lora_A, lora_B, and to weight/bias if
    they require grad.
    """
    _check_linear(x, weight, bias, lora_A, lora_B)
    _check_dropout(dropout_p, seed)
    seed = _seed_for(dropout_p, seed)
    out_f = weight.shape[0]
    if not _use_kernel(x):
        return _ref.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else _rows(x, x.shape[-1])
    y, _ = _ops.lora_forward(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)
    return y if x.dim() == 2 else y.reshape(*lead, out_f)


# ---- multi-adapter LoRA mix (X-LoRA) ---------------------------------------------------------------
#
# y = base + sum_j s[:, j] * (x A_j^T) B_j^T over n adapters (csrc/common/multi_lora_impl.h): one shrink GEMM
# over all adapters, a per-adapter block scaling, one expand GEMM onto base.


def _multi_lora_check(x, lora_A, lora_B, scalings, base) -> Tuple[int, int, int, int]:
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("'x' must have at least one dimension (its last is in_features)")
    _check_tensor(lora_A, "lora_A", 3)
    _check_tensor(lora_B, "lora_B", 3)
    _check_same(lora_A, x, "lora_A", "x")
    _check_same(lora_B, x, "lora_B", "x")
    n, r, in_f = lora_A.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"'lora_A' has in_features {in_f} but 'x' has last dim {x.shape[-1]} (lora_A is [n, r, in])")
    if lora_B.shape[0] != n or lora_B.shape[2] != r:
        raise ValueError(
            f"'lora_B' has shape {tuple(lora_B.shape)} but must be [n={n}, out, r={r}] to match 'lora_A' "
            f"{tuple(lora_A.shape)}"
        )
    out_f = lora_B.shape[1]
    _check_tensor(scalings, "scalings")
    if scalings.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"'scalings' must have x's dtype ({x.dtype}) or float32, got {scalings.dtype}")
    if scalings.device != x.device:
        raise ValueError(f"'scalings' is on {scalings.device} but 'x' is on {x.device}; move them to one device")
    if tuple(scalings.shape) != (*x.shape[:-1], n):
        raise ValueError(
            f"'scalings' has shape {tuple(scalings.shape)} but must be {(*x.shape[:-1], n)} (x's leading dims, "
            "then one weight per adapter)"
        )
    if base is not None:
        _check_tensor(base, "base")
        _check_same(base, x, "base", "x")
        if tuple(base.shape) != (*x.shape[:-1], out_f):
            raise ValueError(f"'base' has shape {tuple(base.shape)} but must be {(*x.shape[:-1], out_f)}")
    return n, r, in_f, out_f


@_register_fake("fastpeft::multi_lora_mix")
def _multi_lora_mix_fake(x, lora_A, lora_B, scalings, base, dropout_p=0.0, seed=None):
    _fake_2d(x, "x")
    n, r, _, out_f = _multi_lora_check(x, lora_A, lora_B, scalings, base)
    _check_dropout(dropout_p, seed)
    return x.new_empty((x.shape[0], out_f)), x.new_empty((x.shape[0], n * r))


@_register_fake("fastpeft::multi_lora_mix_backward")
def _multi_lora_mix_backward_fake(grad_y, x, lora_A, lora_B, scalings, u, need_grad_x=True, need_grad_weights=True,
                                  dropout_p=0.0, seed=None):
    _fake_2d(x, "x")
    _multi_lora_check(x, lora_A, lora_B, scalings, None)
    gx = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    ga = lora_A.new_empty(lora_A.shape) if need_grad_weights else x.new_empty((0,))
    gb = lora_B.new_empty(lora_B.shape) if need_grad_weights else x.new_empty((0,))
    return gx, ga, gb, scalings.new_empty(scalings.shape)


def _multi_lora_setup(ctx, inputs, output):
    x, lora_A, lora_B, scalings, _base, dropout_p, seed = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.set_materialize_grads(False)
    ctx.dropout_p = dropout_p
    ctx.has_seed = seed is not None
    ctx.save_for_backward(x, lora_A, lora_B, scalings, u, *([seed] if seed is not None else []))


def _multi_lora_backward(ctx, grad_y, _grad_u):
    if grad_y is None:
        return (None,) * 7
    x, lora_A, lora_B, scalings, u, *rest = ctx.saved_tensors
    seed = rest[0] if ctx.has_seed else None
    need = ctx.needs_input_grad
    gx = ga = gb = gs = None
    if need[0] or need[1] or need[2] or need[3]:
        gx, ga, gb, gs = _ops.multi_lora_mix_backward(
            grad_y, x, lora_A, lora_B, scalings, u, bool(need[0]), bool(need[1] or need[2]), ctx.dropout_p, seed
        )
    return (
        gx if need[0] else None,
        ga if need[1] else None,
        gb if need[2] else None,
        gs if need[3] else None,
        grad_y if need[4] else None,
        None,
        None,
    )


torch.library.register_autograd("fastpeft::multi_lora_mix", _multi_lora_backward, setup_context=_multi_lora_setup)


def multi_lora_mix(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scalings: Tensor,
    base: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """Mix n LoRA adapters with per-token weights in one op: ``base + sum_j scalings[..., j] * B_j(A_j(x))``.

    Args:
        x: ``[..., in]`` input (any leading dims, any strides, zero rows allowed).
        lora_A: ``[n, r, in]``, the adapters' A matrices stacked; lora_B: ``[n, out, r]``. Adapters of a
            smaller rank are zero-padded to the largest r (zero rows of A / columns of B add nothing).
        scalings: ``[..., n]`` (x's leading dims): each token's weight for each adapter, with any per-adapter
            scale (lora_alpha / r, X-LoRA's global weight) already multiplied in; x's dtype or float32.
        base: ``[..., out]`` added to the result (e.g. the base layer's output; the expand GEMM accumulates
            onto it), or None.
        dropout_p: dropout on each adapter's input, in [0, 1): adapter j sees ``drop_j(x)``, its own seeded mask
            (the masks of :func:`seeded_dropout` on x repeated n times along the rows), regenerated in backward.
            The shrink is then one GEMM per adapter (inside the op).
        seed: one-element int64 CPU tensor for the masks; drawn with :func:`new_dropout_seed` when dropout_p > 0
            and it is None.

    x, lora_A, lora_B and base share one dtype (float32, bfloat16, float16 or float64) and device. Computed as
    one shrink GEMM over all adapters (``u = x A_cat^T``, [T, n r]), a per-adapter block scaling in op-math, and
    one expand GEMM: no per-adapter loop and no [T, n, out] temporary. Gradients flow to x, lora_A, lora_B,
    scalings (X-LoRA trains its classifier through them) and base; backward saves x, the weights, scalings and
    the rank-sized u.
    """
    n, r, in_f, out_f = _multi_lora_check(x, lora_A, lora_B, scalings, base)
    _check_dropout(dropout_p, seed)
    p = float(dropout_p)
    seed = (new_dropout_seed() if seed is None else seed) if p > 0.0 else None
    if not _use_kernel(x):
        return _ref.multi_lora_mix(x, lora_A, lora_B, scalings, base, p, seed)
    lead = x.shape[:-1]
    if x.dim() == 2:
        y, _ = _ops.multi_lora_mix(x, lora_A, lora_B, scalings, base, p, seed)
        return y
    x2 = _rows(x, in_f)
    s2 = _rows(scalings, n)
    b2 = None if base is None else _rows(base, out_f)
    y, _ = _ops.multi_lora_mix(x2, lora_A, lora_B, s2, b2, p, seed)
    return y.reshape(*lead, out_f)


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """DoRA's per-output-row norm ``||W + scaling * B A||_2`` without materialising ``B A``.

    Args: weight ``[out, in]``, lora_A ``[r, in]``, lora_B ``[out, r]`` (one dtype and device).
    Returns a float32 ``[out]`` tensor (float64 for float64 inputs). Not differentiable: DoRA
    treats the norm as a constant (peft's ``DoraLinearLayer.get_weight_norm(...).detach()``).
    """
    _check_tensor(weight, "weight", 2)
    _check_tensor(lora_A, "lora_A", 2)
    _check_tensor(lora_B, "lora_B", 2)
    _check_same(lora_A, weight, "lora_A", "weight")
    _check_same(lora_B, weight, "lora_B", "weight")
    if lora_A.shape[1] != weight.shape[1]:
        raise ValueError(f"'lora_A' has in_features {lora_A.shape[1]} but 'weight' has {weight.shape[1]}")
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"'lora_B' has rank {lora_B.shape[1]} but 'lora_A' has rank {lora_A.shape[0]}")
    if lora_B.shape[0] != weight.shape[0]:
        raise ValueError(f"'lora_B' has out_features {lora_B.shape[0]} but 'weight' has {weight.shape[0]}")
    with torch.no_grad():
        if not _use_kernel(weight):
            return _ref.dora_weight_norm(weight, lora_A, lora_B, float(scaling))
        return _ops.dora_weight_norm(weight, lora_A, lora_B, float(scaling))


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """DoRA linear layer with peft's formula, fused.

    With ``n = ||W + s B A||_2`` per output row (detached) and ``xd = dropout(x)``::

        y = x W^T + b + (m/n - 1) * (xd W^T) + (m/n) * s * B(A(xd))

    which is ``(m/n) * (x W^T + s B(A(x))) + b`` (one base GEMM) without dropout. Arguments as in
    :func:`lora_linear`, plus ``magnitude`` ``[out]`` (DoRA's m, same dtype as x). Gradients flow to
    x, lora_A, lora_B, magnitude, and to weight/bias if they require grad.
    """
    _check_linear(x, weight, bias, lora_A, lora_B)
    _check_magnitude(magnitude, weight)
    _check_dropout(dropout_p, seed)
    seed = _seed_for(dropout_p, seed)
    out_f = weight.shape[0]
    if not _use_kernel(x):
        return _ref.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, float(scaling), float(dropout_p), seed)
    with torch.no_grad():  # the arguments are checked above (dora_weight_norm would check them again)
        weight_norm = _ops.dora_weight_norm(weight, lora_A, lora_B, float(scaling))
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else _rows(x, x.shape[-1])
    y, _, _ = _ops.dora_forward(
        x2, weight, bias, lora_A, lora_B, magnitude, weight_norm, float(scaling), float(dropout_p), seed
    )
    return y if x.dim() == 2 else y.reshape(*lead, out_f)


# ---- nf4 family -----------------------------------------------------------------------------------
#
# bitsandbytes 0.50.2's NF4 bytes and its 8-bit blockwise quantiser (used for the double-quant
# statistics); the exact formulas are in fastpeft.reference. Quantisation is not differentiable:
# these ops have no autograd formula (LinearNF4 keeps its quantised weight frozen).

_QUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_quant_input(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _QUANT_DTYPES:
        raise TypeError(f"'{name}' must be float32, bfloat16 or float16, got {t.dtype}")


def _check_uint8(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"'{name}' must be uint8, got {t.dtype}")


def _check_out_dtype(dtype) -> None:
    if dtype not in _QUANT_DTYPES:
        raise TypeError(f"'dtype' must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")


def _check_absmax(absmax, n: int, blocksize: int) -> None:
    if not isinstance(absmax, Tensor) or absmax.dtype != torch.float32:
        got = absmax.dtype if isinstance(absmax, Tensor) else type(absmax).__name__
        raise TypeError(f"'absmax' must be a float32 tensor, got {got}")
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"'absmax' has {absmax.numel()} elements but {n} values in blocks of {blocksize} need {blocks}")


def _check_code8(code) -> None:
    if not isinstance(code, Tensor) or code.dtype != torch.float32 or code.shape != (256,):
        desc = f"{code.dtype} {tuple(code.shape)}" if isinstance(code, Tensor) else type(code).__name__
        raise ValueError(f"'code' must be a float32 tensor of shape (256,) (a sorted 8-bit codebook), got {desc}")


def _shape_numel(shape) -> int:
    n = 1
    for d in shape:
        if int(d) < 0:
            raise ValueError(f"'shape' must not have negative sizes, got {tuple(shape)}")
        n *= int(d)
    return n


@_register_fake("fastpeft::nf4_quantize")
def _nf4_quantize_fake(w, blocksize):
    _check_quant_input(w, "w")
    _ref.check_blocksize(blocksize)
    n = w.numel()
    return w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), w.new_empty((-(-n // blocksize),), dtype=torch.float32)


@_register_fake("fastpeft::nf4_dequantize")
def _nf4_dequantize_fake(packed, absmax, blocksize, shape, dtype):
    _ref.check_blocksize(blocksize)
    return packed.new_empty(tuple(shape), dtype=dtype)


@_register_fake("fastpeft::blockwise8_quantize")
def _blockwise8_quantize_fake(x, code, blocksize):
    _check_quant_input(x, "x")
    _ref.check_blocksize(blocksize)
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((-(-x.numel() // blocksize),), dtype=torch.float32)


@_register_fake("fastpeft::blockwise8_dequantize")
def _blockwise8_dequantize_fake(q, absmax, code, blocksize, dtype):
    _ref.check_blocksize(blocksize)
    return q.new_empty(q.shape, dtype=dtype)


def nf4_quantize(w: Tensor, blocksize: int = 64) -> Tuple[Tensor, Tensor]:
    """Quantise ``w`` to NF4 with bitsandbytes' bytes.

    Args:
        w: float32/bfloat16/float16 tensor of any shape (a Linear weight is ``[out, in]``); it is
            flattened in row-major order, so a non-contiguous view quantises its logical values.
        blocksize: values per absmax block, a power of two in [32, 4096] (bitsandbytes' default 64).

    Returns ``(packed, absmax)``: ``packed`` uint8 ``[(n + 1) // 2, 1]`` (two codes per byte, even
    element in the high nibble) and ``absmax`` float32 ``[ceil(n / blocksize)]``, equal byte for
    byte to ``bitsandbytes.functional.quantize_4bit(w, blocksize=..., quant_type="nf4")``. Raises
    RuntimeError if ``w`` holds NaN or inf.
    """
    _check_quant_input(w, "w")
    _ref.check_blocksize(blocksize)
    with torch.no_grad():
        if not _use_kernel(w):
            return _ref.nf4_quantize(w, blocksize)
        return _ops.nf4_quantize(w, blocksize)


def nf4_dequantize(
    packed: Tensor, absmax: Tensor, blocksize: int, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Dequantise NF4 codes: ``code[q] * absmax`` in float32, rounded once to ``dtype``.

    Args: ``packed`` uint8 (``(n + 1) // 2`` bytes, any shape), ``absmax`` float32
    ``[ceil(n / blocksize)]`` (already de-nested), ``blocksize`` as used to quantise, ``shape`` of
    the result (``n`` = its element count) and its ``dtype`` (float32, bfloat16 or float16).
    """
    _check_uint8(packed, "packed")
    _ref.check_blocksize(blocksize)
    _check_out_dtype(dtype)
    shape = [int(d) for d in shape]
    n = _shape_numel(shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"'packed' has {packed.numel()} bytes but 'shape' {tuple(shape)} needs {(n + 1) // 2}")
    _check_absmax(absmax, n, blocksize)
    if absmax.device != packed.device:
        raise ValueError(f"'absmax' is on {absmax.device} but 'packed' is on {packed.device}; move them to one device")
    if not _use_kernel(packed):
        return _ref.nf4_dequantize(packed, absmax, blocksize, shape, dtype)
    return _ops.nf4_dequantize(packed, absmax, blocksize, shape, dtype)


def blockwise8_quantize(x: Tensor, code: Tensor, blocksize: int = 256) -> Tuple[Tensor, Tensor]:
    """bitsandbytes' CPU 8-bit blockwise quantiser (its ``quantize_blockwise`` bytes).

    Args: ``x`` float32/bfloat16/float16 (any shape, flattened row-major), ``code`` a sorted
    float32 ``[256]`` codebook (:func:`fastpeft.reference.dynamic_map` for double quantisation),
    ``blocksize`` a power of two in [32, 4096]. Returns ``(q, absmax)``: uint8 codes shaped like
    ``x`` and float32 ``[ceil(n / blocksize)]``.
    """
    _check_quant_input(x, "x")
    _check_code8(code)
    _ref.check_blocksize(blocksize)
    if code.device != x.device:
        raise ValueError(f"'code' is on {code.device} but 'x' is on {x.device}; move them to one device")
    with torch.no_grad():
        if not _use_kernel(x):
            return _ref.blockwise8_quantize(x, code, blocksize)
        return _ops.blockwise8_quantize(x, code, blocksize)


def blockwise8_dequantize(
    q: Tensor, absmax: Tensor, code: Tensor, blocksize: int = 256, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``code[q] * absmax`` in float32, rounded once to ``dtype``, shaped like ``q``."""
    _check_uint8(q, "q")
    _check_code8(code)
    _ref.check_blocksize(blocksize)
    _check_out_dtype(dtype)
    _check_absmax(absmax, q.numel(), blocksize)
    for t, name in ((absmax, "absmax"), (code, "code")):
        if t.device != q.device:
            raise ValueError(f"'{name}' is on {t.device} but 'q' is on {q.device}; move them to one device")
    if not _use_kernel(q):
        return _ref.blockwise8_dequantize(q, absmax, code, blocksize, dtype)
    return _ops.blockwise8_dequantize(q, absmax, code, blocksize, dtype)


# ---- fused NF4 matmul -----------------------------------------------------------------------------
#
# W [out, in] stays in NF4 (bitsandbytes' bytes): y = x W^T + b and its input gradient are computed
# from the packed codes (csrc/cpu/nf4_matmul.cpp, csrc/cuda/nf4_matmul.cu). The compute dtype is x's;
# sums are float32. Gradients flow to x, bias and the LoRA factors, never to the quantised weight.


def _check_nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features: int,
                      in_features: int, ref: Tensor, ref_name: str) -> None:
    _check_uint8(packed, "packed")
    _ref.check_blocksize(blocksize)
    n = out_features * in_features
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"'packed' has {packed.numel()} bytes but an NF4 weight of shape [{out_features}, {in_features}] needs "
            f"{(n + 1) // 2} (two 4-bit codes per byte; its shape is [out_features, in_features], one of them "
            f"from '{ref_name}')"
        )
    given = [t is not None for t in (nested_absmax, nested_code, offset)]
    if any(given) and not all(given):
        names = ", ".join(f"{'' if g else 'no '}{k}" for g, k in zip(given, ("nested_absmax", "nested_code", "offset")))
        raise ValueError(
            f"'nested_absmax', 'nested_code' and 'offset' describe double quantisation: give all three or none "
            f"(got {names})"
        )
    blocks = -(-n // blocksize)
    if all(given):
        _check_uint8(absmax, "absmax")
        if absmax.numel() != blocks:
            raise ValueError(f"'absmax' has {absmax.numel()} codes but {n} values in blocks of {blocksize} need {blocks}")
        if not isinstance(nested_absmax, Tensor) or nested_absmax.dtype != torch.float32:
            raise TypeError("'nested_absmax' must be a float32 tensor")
        if nested_absmax.numel() != -(-blocks // 256):
            raise ValueError(
                f"'nested_absmax' has {nested_absmax.numel()} elements but {blocks} absmax codes in blocks of 256 "
                f"need {-(-blocks // 256)}"
            )
        if not isinstance(nested_code, Tensor) or nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise ValueError("'nested_code' must be a float32 tensor of 256 elements (the 8-bit codebook)")
        if not isinstance(offset, Tensor) or offset.dtype != torch.float32 or offset.numel() != 1:
            raise ValueError("'offset' must be a one-element float32 tensor")
    else:
        _check_absmax(absmax, n, blocksize)
    for t, name in ((packed, "packed"), (absmax, "absmax"), (nested_absmax, "nested_absmax"),
                    (nested_code, "nested_code"), (offset, "offset")):
        if t is not None and t.device != ref.device:
            raise ValueError(f"'{name}' is on {t.device} but '{ref_name}' is on {ref.device}; move them to one device")


def _check_nf4_input(x, name: str) -> None:
    _check_quant_input(x, name)
    if x.dim() < 1:
        raise ValueError(f"'{name}' must have at least one dimension (its last is in_features)")


def _check_nf4_bias(bias, x: Tensor, out_features: int) -> None:
    if bias is None:
        return
    _check_tensor(bias, "bias", 1)
    _check_same(bias, x, "bias", "x")
    if bias.shape[0] != out_features:
        raise ValueError(f"'bias' has {bias.shape[0]} elements but out_features is {out_features}")


def _check_out_features(out_features) -> int:
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 0:
        raise ValueError(f"'out_features' must be a non-negative int, got {out_features!r}")
    return out_features


def _fake_2d(t: Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"'{name}' must be 2-D, got shape {tuple(t.shape)}")


@_register_fake("fastpeft::nf4_linear")
def _nf4_linear_fake(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias):
    _fake_2d(x, "x")
    _check_nf4_input(x, "x")
    _check_nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, x.shape[1], x, "x")
    _check_nf4_bias(bias, x, out_features)
    return x.new_empty((x.shape[0], out_features))


@_register_fake("fastpeft::nf4_linear_grad_input")
def _nf4_linear_grad_input_fake(grad_y, packed, absmax, nested_absmax, nested_code, offset, blocksize, in_features):
    _fake_2d(grad_y, "grad_y")
    _check_nf4_input(grad_y, "grad_y")
    _check_nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, grad_y.shape[1], in_features,
                      grad_y, "grad_y")
    return grad_y.new_empty((grad_y.shape[0], in_features))


def _check_qlora(x, bias, lora_A, lora_B, out_features: int) -> None:
    _check_tensor(lora_A, "lora_A", 2)
    _check_tensor(lora_B, "lora_B", 2)
    _check_same(lora_A, x, "lora_A", "x")
    _check_same(lora_B, x, "lora_B", "x")
    _check_lora_shapes(lora_A, lora_B, x.shape[-1], "'x'", out_features, "'out_features'")
    _check_nf4_bias(bias, x, out_features)


@_register_fake("fastpeft::qlora_forward")
def _qlora_forward_fake(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, bias, lora_A, lora_B,
                        scaling, dropout_p, seed):
    _fake_2d(x, "x")
    _check_nf4_input(x, "x")
    out_f = lora_B.shape[0]
    _check_nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_f, x.shape[1], x, "x")
    _check_qlora(x, bias, lora_A, lora_B, out_f)
    _check_dropout(dropout_p, seed)
    return x.new_empty((x.shape[0], out_f)), x.new_empty((x.shape[0], lora_A.shape[0]))


@_register_fake("fastpeft::qlora_backward")
def _qlora_backward_fake(grad_y, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B,
                         u, scaling, dropout_p, seed, need_grad_x=True):
    _fake_2d(x, "x")
    _check_nf4_input(x, "x")
    _check_qlora(x, None, lora_A, lora_B, lora_B.shape[0])
    gx = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    return gx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _nf4_linear_setup(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, _out, _bias = inputs
    ctx.blocksize, ctx.in_features = blocksize, x.shape[1]
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)


def _nf4_linear_backward(ctx, grad_y):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad_b = None
    if need[0]:
        grad_x = _ops.nf4_linear_grad_input(grad_y, packed, absmax, nested_absmax, nested_code, offset,
                                            ctx.blocksize, ctx.in_features)
    if need[8]:
        grad_b = grad_y.sum(0)
    return grad_x, None, None, None, None, None, None, None, grad_b


torch.library.register_autograd("fastpeft::nf4_linear", _nf4_linear_backward, setup_context=_nf4_linear_setup)


def _nf4_grad_input_setup(ctx, inputs, output):
    grad_y, packed, absmax, nested_absmax, nested_code, offset, blocksize, _in = inputs
    ctx.blocksize, ctx.out_features = blocksize, grad_y.shape[1]
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)


def _nf4_grad_input_backward(ctx, gg):  # linear in grad_y: its gradient is the forward product
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[0]:
        g = _ops.nf4_linear(gg, packed, absmax, nested_absmax, nested_code, offset, ctx.blocksize, ctx.out_features,
                            None)
    return g, None, None, None, None, None, None, None


torch.library.register_autograd("fastpeft::nf4_linear_grad_input", _nf4_grad_input_backward,
                                setup_context=_nf4_grad_input_setup)


def _qlora_setup(ctx, inputs, output):
    (x, packed, absmax, nested_absmax, nested_code, offset, blocksize, _bias, lora_A, lora_B, scaling, dropout_p,
     seed) = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.set_materialize_grads(False)
    ctx.blocksize, ctx.scaling, ctx.dropout_p = blocksize, scaling, dropout_p
    ctx.save_for_backward(x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, u, seed)


def _qlora_backward(ctx, grad_y, _grad_u):
    if grad_y is None:
        return (None,) * 13
    x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, u, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad_A = grad_B = grad_b = None
    if need[0] or need[8] or need[9]:
        grad_x, grad_A, grad_B = _ops.qlora_backward(
            grad_y, x, packed, absmax, nested_absmax, nested_code, offset, ctx.blocksize, lora_A, lora_B, u,
            ctx.scaling, ctx.dropout_p, seed, bool(need[0])
        )
        if not need[0]:
            grad_x = None
    if need[7]:
        grad_b = grad_y.sum(0)
    return grad_x, None, None, None, None, None, None, grad_b, grad_A, grad_B, None, None, None


torch.library.register_autograd("fastpeft::qlora_forward", _qlora_backward, setup_context=_qlora_setup)


def nf4_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    blocksize: int,
    out_features: int,
    bias: Optional[Tensor] = None,
    *,
    nested_absmax: Optional[Tensor] = None,
    nested_code: Optional[Tensor] = None,
    offset: Optional[Tensor] = None,
) -> Tensor:
    """``x W^T + bias`` with W ``[out_features, in]`` in NF4, never dequantised whole.

    Args:
        x: ``[..., in]`` float32/bfloat16/float16: the compute dtype (sums are float32, the result
            is rounded once to x's dtype).
        packed, absmax, blocksize: the NF4 weight (bitsandbytes' bytes; see
            :func:`fastpeft.quant.nf4.quantize_nf4`); ``absmax`` float32 ``[blocks]``, or the uint8
            codes of a double-quantised state together with ``nested_absmax``, ``nested_code`` and
            ``offset`` (all three or none; ``NF4QuantState.kernel_args()`` gives them).
        out_features: W's first dimension.
        bias: ``[out_features]`` of x's dtype, or None.

    Returns ``[..., out_features]`` in x's dtype. Differentiable in x and bias (the backward is
    :func:`nf4_linear_grad_input`-style, again straight from the packed weight).
    """
    _check_nf4_input(x, "x")
    out_features = _check_out_features(out_features)
    _check_nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, x.shape[-1], x, "x")
    _check_nf4_bias(bias, x, out_features)
    if not _use_kernel(x):
        return _ref.nf4_linear(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias)
    x2 = x if x.dim() == 2 else _rows(x, x.shape[-1])
    y = _ops.nf4_linear(x2, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def qlora_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    blocksize: int,
    out_features: int,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    *,
    nested_absmax: Optional[Tensor] = None,
    nested_code: Optional[Tensor] = None,
    offset: Optional[Tensor] = None,
) -> Tensor:
    """QLoRA linear layer: ``x W^T + b + scaling * B(A(dropout(x)))`` with W in NF4.

    The NF4 arguments are :func:`nf4_linear`'s, the LoRA ones :func:`lora_linear`'s (lora_A
    ``[r, in]``, lora_B ``[out_features, r]``, of x's dtype; seeded dropout regenerated in
    backward). Returns ``[..., out_features]``; gradients flow to x, bias, lora_A and lora_B.
    """
    _check_nf4_input(x, "x")
    out_features = _check_out_features(out_features)
    _check_nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, x.shape[-1], x, "x")
    _check_qlora(x, bias, lora_A, lora_B, out_features)
    _check_dropout(dropout_p, seed)
    seed = _seed_for(dropout_p, seed)
    if not _use_kernel(x):
        return _ref.qlora_linear(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias,
                                 lora_A, lora_B, float(scaling), float(dropout_p), seed)
    x2 = x if x.dim() == 2 else _rows(x, x.shape[-1])
    y, _ = _ops.qlora_forward(x2, packed, absmax, nested_absmax, nested_code, offset, blocksize, bias, lora_A, lora_B,
                              float(scaling), float(dropout_p), seed)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


# ---- kron family (LoKr) ---------------------------------------------------------------------------
#
# y = scale * x (W1 kron W2)^T computed input-centrically (csrc/common/kron_impl.h): the Kronecker
# product is never built; backward recomputes the [N, c, b] intermediate instead of saving it.


def _kron_factor_check(x: Tensor, w, w_a, w_b, name: str) -> Tuple[int, int]:
    """Checks one Kronecker factor (w, or w_a @ w_b) against x; returns its (rows, cols)."""
    a_name, b_name = f"{name}_a", f"{name}_b"
    if (w_a is None) != (w_b is None):
        given = a_name if w_a is not None else b_name
        raise ValueError(f"give both '{a_name}' and '{b_name}' or neither (got only '{given}')")
    if (w is None) == (w_a is None):
        got = "both" if w is not None else "neither"
        raise ValueError(f"give exactly one of '{name}' or ('{a_name}', '{b_name}'), got {got}")
    if w is not None:
        _check_tensor(w, name, 2)
        _check_same(w, x, name, "x")
        return int(w.shape[0]), int(w.shape[1])
    _check_tensor(w_a, a_name, 2)
    _check_tensor(w_b, b_name, 2)
    _check_same(w_a, x, a_name, "x")
    _check_same(w_b, x, b_name, "x")
    if w_a.shape[1] != w_b.shape[0]:
        raise ValueError(
            f"'{a_name}' has rank {w_a.shape[1]} (shape {tuple(w_a.shape)}) but '{b_name}' has rank "
            f"{w_b.shape[0]} (shape {tuple(w_b.shape)}); {a_name} is [rows, r], {b_name} is [r, cols]"
        )
    return int(w_a.shape[0]), int(w_b.shape[1])


def _kron_check(x, w1, w1_a, w1_b, w2, w2_a, w2_b, scale) -> Tuple[int, int]:
    """Returns (in_features, out_features)."""
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("'x' must have at least one dimension (its last is in_features)")
    a, c = _kron_factor_check(x, w1, w1_a, w1_b, "w1")
    b, d = _kron_factor_check(x, w2, w2_a, w2_b, "w2")
    if x.shape[-1] != c * d:
        n1, n2 = ("w1" if w1 is not None else "w1_b"), ("w2" if w2 is not None else "w2_b")
        raise ValueError(
            f"'x' has last dim {x.shape[-1]} but '{n1}' has {c} columns and '{n2}' has {d}: in_features must be "
            f"W1.shape[1] * W2.shape[1] = {c * d}"
        )
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"'scale' must be a float, got {type(scale).__name__}")
    return c * d, a * b


def _kron_rows(w, w_a) -> int:
    return int(w.shape[0]) if w is not None else int(w_a.shape[0])


@_register_fake("fastpeft::kron_forward")
def _kron_forward_fake(x, w1, w1_a, w1_b, w2, w2_a, w2_b, scale):
    if x.dim() != 2:
        raise ValueError(f"'x' must be 2-D, got shape {tuple(x.shape)}")
    _, out_f = _kron_check(x, w1, w1_a, w1_b, w2, w2_a, w2_b, scale)
    return x.new_empty((x.shape[0], out_f))


def _kron_grad_pair(x, w, w_a, w_b):
    if w is not None:
        return w.new_empty(w.shape), x.new_empty((0,))
    return w_a.new_empty(w_a.shape), w_b.new_empty(w_b.shape)


@_register_fake("fastpeft::kron_backward")
def _kron_backward_fake(grad_y, x, w1, w1_a, w1_b, w2, w2_a, w2_b, scale):
    if x.dim() != 2:
        raise ValueError(f"'x' must be 2-D, got shape {tuple(x.shape)}")
    _kron_check(x, w1, w1_a, w1_b, w2, w2_a, w2_b, scale)
    g1, g1b = _kron_grad_pair(x, w1, w1_a, w1_b)
    g2, g2b = _kron_grad_pair(x, w2, w2_a, w2_b)
    return x.new_empty(x.shape), g1, g1b, g2, g2b


def _kron_setup(ctx, inputs, output):
    x, w1, w1_a, w1_b, w2, w2_a, w2_b, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, w1, w1_a, w1_b, w2, w2_a, w2_b)


def _kron_backward(ctx, grad_y):
    x, w1, w1_a, w1_b, w2, w2_a, w2_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_y is None or not any(need[:7]):
        return (None,) * 8
    gx, g1, g1b, g2, g2b = _ops.kron_backward(grad_y, x, w1, w1_a, w1_b, w2, w2_a, w2_b, ctx.scale)
    grads = [gx, None, None, None, None, None, None, None]
    if w1 is not None:
        grads[1] = g1
    else:
        grads[2], grads[3] = g1, g1b
    if w2 is not None:
        grads[4] = g2
    else:
        grads[5], grads[6] = g2, g2b
    return tuple(g if (i < 7 and need[i]) else None for i, g in enumerate(grads))


torch.library.register_autograd("fastpeft::kron_forward", _kron_backward, setup_context=_kron_setup)


def kron_linear(
    x: Tensor,
    w1: Optional[Tensor] = None,
    w2: Optional[Tensor] = None,
    *,
    w1_a: Optional[Tensor] = None,
    w1_b: Optional[Tensor] = None,
    w2_a: Optional[Tensor] = None,
    w2_b: Optional[Tensor] = None,
    scale: float = 1.0,
) -> Tensor:
    """LoKr: ``y = scale * x @ kron(W1, W2)^T`` without building the Kronecker product.

    Args:
        x: ``[..., in]`` input with ``in = c * d`` (any leading dims, any strides).
        w1: ``W1`` ``[a, c]``; or give ``w1_a`` ``[a, r1]`` and ``w1_b`` ``[r1, c]`` (``W1 = w1_a @ w1_b``).
        w2: ``W2`` ``[b, d]``; or give ``w2_a`` ``[b, r2]`` and ``w2_b`` ``[r2, d]`` (``W2 = w2_a @ w2_b``).
        scale: the adapter scale (peft's ``alpha / r``).

    Exactly one of ``w1`` / (``w1_a``, ``w1_b``) and one of ``w2`` / (``w2_a``, ``w2_b``). All
    tensors share x's dtype (float32, bfloat16, float16 or float64: the compute dtype) and device.
    ``kron(W1, W2)`` is ``[a b, c d]`` (peft's LoKr layout), so the result is ``[..., a b]``.

    Computed as ``T = X W2^T`` (``X`` = x viewed ``[N, c, d]``; a low-rank ``W2`` as
    ``(X w2_b^T) w2_a^T`` when cheaper) and ``Y = W1 T`` ``[N, a, b]``. Gradients flow to x and to
    every given factor; backward saves only x and the factors and recomputes ``T``.
    """
    in_f, out_f = _kron_check(x, w1, w1_a, w1_b, w2, w2_a, w2_b, scale)
    if not _use_kernel(x):
        return _ref.kron_linear(x, w1, w2, w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b, scale=float(scale))
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else _rows(x, in_f)
    y = _ops.kron_forward(x2, w1, w1_a, w1_b, w2, w2_a, w2_b, float(scale))
    return y if x.dim() == 2 else y.reshape(*lead, out_f)


# ---- ia3 family (IA3) -----------------------------------------------------------------------------
#
# peft's IA3 Linear (csrc/common/ia3_impl.h): the base GEMM through ATen, the scaling fused into one
# elementwise pass per direction. Saved for backward: x only (input scaling) or the pre-scale
# output y0 only (output scaling).


def _ia3_check(x, weight, bias, scale, scale_input) -> Tuple[int, int]:
    """Returns (in_features, out_features)."""
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("'x' must have at least one dimension (its last is in_features)")
    _check_tensor(weight, "weight", 2)
    _check_same(weight, x, "weight", "x")
    out_f, in_f = int(weight.shape[0]), int(weight.shape[1])
    if x.shape[-1] != in_f:
        raise ValueError(f"'x' has last dim {x.shape[-1]} but 'weight' {tuple(weight.shape)} has in_features {in_f}")
    if bias is not None:
        _check_tensor(bias, "bias", 1)
        _check_same(bias, x, "bias", "x")
        if bias.shape[0] != out_f:
            raise ValueError(f"'bias' has {bias.shape[0]} elements but 'weight' has out_features {out_f}")
    if not isinstance(scale_input, bool):
        raise TypeError(f"'scale_input' must be a bool, got {type(scale_input).__name__}")
    _check_tensor(scale, "scale", 1)
    if scale.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"'scale' must have x's dtype ({x.dtype}) or float32, got {scale.dtype}")
    if scale.device != x.device:
        raise ValueError(f"'scale' is on {scale.device} but 'x' is on {x.device}; move them to one device")
    want, what = (in_f, "in_features (scale_input=True scales the input)") if scale_input else (
        out_f, "out_features (scale_input=False scales the output)")
    if scale.shape[0] != want:
        raise ValueError(f"'scale' has {scale.shape[0]} elements but must have {what} = {want}")
    return in_f, out_f


@_register_fake("fastpeft::ia3_forward")
def _ia3_forward_fake(x, weight, bias, scale, scale_input):
    if x.dim() != 2:
        raise ValueError(f"'x' must be 2-D, got shape {tuple(x.shape)}")
    _, out_f = _ia3_check(x, weight, bias, scale, scale_input)
    y = x.new_empty((x.shape[0], out_f))
    return y, (x.new_empty((0,)) if scale_input else x.new_empty((x.shape[0], out_f)))


@_register_fake("fastpeft::ia3_backward")
def _ia3_backward_fake(grad_y, saved, weight, scale, scale_input, need_grad_x=True, need_grad_bias=False):
    _fake_2d(grad_y, "grad_y")
    _fake_2d(saved, "saved")
    n, in_f, out_f = grad_y.shape[0], weight.shape[1], weight.shape[0]
    gx = grad_y.new_empty((n, in_f)) if need_grad_x else grad_y.new_empty((0,))
    gb = grad_y.new_empty((out_f,)) if need_grad_bias else grad_y.new_empty((0,))
    return gx, scale.new_empty(scale.shape), gb


def _ia3_setup(ctx, inputs, output):
    x, weight, bias, scale, scale_input = inputs
    _, y0 = output
    ctx.scale_input = scale_input
    # Input scaling keeps x only; output scaling keeps the pre-scale output y0 only.
    ctx.save_for_backward(x if scale_input else y0, weight, scale)


def _ia3_backward(ctx, grad_y, _grad_y0):
    saved, weight, scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_y is None or not (need[0] or need[2] or need[3]):
        return None, None, None, None, None
    gx, gs, gb = _ops.ia3_backward(grad_y, saved, weight, scale, ctx.scale_input, bool(need[0]), bool(need[2]))
    return (gx if need[0] else None, None, gb if need[2] else None, gs if need[3] else None, None)


torch.library.register_autograd("fastpeft::ia3_forward", _ia3_backward, setup_context=_ia3_setup)


def ia3_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, scale_input: bool) -> Tensor:
    """IA3 (peft's ``IA3Layer`` Linear) over a frozen base layer, fused.

    Args:
        x: ``[..., in]`` input (any leading dims, any strides, zero rows allowed).
        weight: the base weight ``[out, in]``; frozen: it gets **no gradient** (use this op only for
            frozen base weights).
        bias: the base bias ``[out]`` or None; gets a gradient when it requires one.
        scale: the IA3 vector, 1-D: ``[in]`` when ``scale_input`` else ``[out]``; x's dtype or
            float32 (peft keeps IA3 vectors in float32 for bf16/fp16 models).
        scale_input: True for peft's feedforward modules: ``y = (x * scale) W^T + b``; False:
            ``y = (x W^T + b) * scale`` (peft scales the whole base output, bias included).

    x, weight and bias share one dtype (float32, bfloat16, float16 or float64) and device. The
    scaling is done in op-math (float32; float64 for float64) and rounded once to x's dtype.
    Gradients flow to x, scale and bias. Saved for backward: x only (input scaling; ``x * scale``
    is never kept) or the pre-scale output ``y0`` only (output scaling, as peft's autograd does).
    """
    in_f, out_f = _ia3_check(x, weight, bias, scale, scale_input)
    if not _use_kernel(x):
        return _ref.ia3_linear(x, weight, bias, scale, scale_input)
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else _rows(x, in_f)
    y, _ = _ops.ia3_forward(x2, weight, bias, scale, scale_input)
    return y if x.dim() == 2 else y.reshape(*lead, out_f)


# ---- hadamard family (LoHa) -----------------------------------------------------------------------
#
# dW = scale * (w1_a @ w1_b) * (w2_a @ w2_b) (csrc/common/hadamard_impl.h). hadamard_linear picks per
# shape between materialising dW (one fused pass, then a GEMM) and the face-splitting identity
# (A1 B1) * (A2 B2) = (A1 . A2)(B1^T . B2^T)^T ('.' = row-wise Kronecker product), O(N d r1 r2).

_HADAMARD_STRATEGIES = {"auto": 0, "materialize": 1, "materialise": 1, "facesplit": 2, "face_split": 2}


def _parse_hadamard_strategy(value: Optional[str]) -> int:
    key = (value or "auto").strip().lower()
    if key not in _HADAMARD_STRATEGIES:
        raise ValueError(
            f"FASTPEFT_HADAMARD_STRATEGY must be one of auto, materialize, facesplit; got {value!r}"
        )
    return _HADAMARD_STRATEGIES[key]


# 0 = auto (cheaper per shape), 1 = materialise dW, 2 = face-splitting. Set from the environment
# variable FASTPEFT_HADAMARD_STRATEGY at import; tests and benchmarks may assign it directly.
_HADAMARD_STRATEGY: int = _parse_hadamard_strategy(os.environ.get("FASTPEFT_HADAMARD_STRATEGY"))


def _hadamard_factors_check(w1_a, w1_b, w2_a, w2_b, ref: Optional[Tensor] = None, ref_name: str = "x") -> Tuple[int, int]:
    """Checks the four LoHa factors (against ``ref`` for dtype/device when given); returns (out, in)."""
    for t, name in ((w1_a, "w1_a"), (w1_b, "w1_b"), (w2_a, "w2_a"), (w2_b, "w2_b")):
        _check_tensor(t, name, 2)
    first, first_name = (ref, ref_name) if ref is not None else (w1_a, "w1_a")
    for t, name in ((w1_a, "w1_a"), (w1_b, "w1_b"), (w2_a, "w2_a"), (w2_b, "w2_b")):
        if t is not first:
            _check_same(t, first, name, first_name)
    out_f, r1 = w1_a.shape
    r2 = w2_a.shape[1]
    in_f = w1_b.shape[1]
    if w1_b.shape[0] != r1:
        raise ValueError(f"'w1_b' has rank {w1_b.shape[0]} but 'w1_a' has rank {r1} (w1_a is [out, r1], w1_b [r1, in])")
    if w2_a.shape[0] != out_f:
        raise ValueError(f"'w2_a' has out_features {w2_a.shape[0]} but 'w1_a' has {out_f} (w2_a is [out, r2])")
    if w2_b.shape[0] != r2:
        raise ValueError(f"'w2_b' has rank {w2_b.shape[0]} but 'w2_a' has rank {r2} (w2_b is [r2, in])")
    if w2_b.shape[1] != in_f:
        raise ValueError(f"'w2_b' has in_features {w2_b.shape[1]} but 'w1_b' has {in_f}")
    return int(out_f), int(in_f)


def _check_scale(scale) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"'scale' must be a float, got {type(scale).__name__}")


@_register_fake("fastpeft::hadamard_delta")
def _hadamard_delta_fake(w1_a, w1_b, w2_a, w2_b, scale):
    out_f, in_f = _hadamard_factors_check(w1_a, w1_b, w2_a, w2_b)
    return w1_a.new_empty((out_f, in_f))


@_register_fake("fastpeft::hadamard_delta_backward")
def _hadamard_delta_backward_fake(grad, w1_a, w1_b, w2_a, w2_b, scale):
    _hadamard_factors_check(w1_a, w1_b, w2_a, w2_b)
    return tuple(t.new_empty(t.shape) for t in (w1_a, w1_b, w2_a, w2_b))


def _hadamard_linear_fake_check(x, w1_a, w1_b, w2_a, w2_b) -> Tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"'x' must be 2-D, got shape {tuple(x.shape)}")
    out_f, in_f = _hadamard_factors_check(w1_a, w1_b, w2_a, w2_b, x)
    if x.shape[1] != in_f:
        raise ValueError(f"'x' has last dim {x.shape[1]} but the factors have in_features {in_f}")
    return out_f, in_f


@_register_fake("fastpeft::hadamard_linear_forward")
def _hadamard_linear_forward_fake(x, w1_a, w1_b, w2_a, w2_b, scale, strategy=0):
    out_f, _ = _hadamard_linear_fake_check(x, w1_a, w1_b, w2_a, w2_b)
    return x.new_empty((x.shape[0], out_f))


@_register_fake("fastpeft::hadamard_linear_backward")
def _hadamard_linear_backward_fake(grad_y, x, w1_a, w1_b, w2_a, w2_b, scale, strategy=0):
    _hadamard_linear_fake_check(x, w1_a, w1_b, w2_a, w2_b)
    return (x.new_empty(x.shape),) + tuple(t.new_empty(t.shape) for t in (w1_a, w1_b, w2_a, w2_b))


def _hadamard_delta_setup(ctx, inputs, output):
    w1_a, w1_b, w2_a, w2_b, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)  # the products are recomputed, never saved


def _hadamard_delta_bwd(ctx, grad):
    if grad is None:
        return (None,) * 5
    w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
    grads = _ops.hadamard_delta_backward(grad, w1_a, w1_b, w2_a, w2_b, ctx.scale)
    return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad)) + (None,)


torch.library.register_autograd("fastpeft::hadamard_delta", _hadamard_delta_bwd, setup_context=_hadamard_delta_setup)


def _hadamard_linear_setup(ctx, inputs, output):
    x, w1_a, w1_b, w2_a, w2_b, scale, strategy = inputs
    ctx.scale, ctx.strategy = scale, strategy
    ctx.save_for_backward(x, w1_a, w1_b, w2_a, w2_b)  # dW / x KB are recomputed, never saved


def _hadamard_linear_bwd(ctx, grad_y):
    need = ctx.needs_input_grad
    if grad_y is None or not any(need[:5]):
        return (None,) * 7
    x, w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
    grads = _ops.hadamard_linear_backward(grad_y, x, w1_a, w1_b, w2_a, w2_b, ctx.scale, ctx.strategy)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None, None)


torch.library.register_autograd(
    "fastpeft::hadamard_linear_forward", _hadamard_linear_bwd, setup_context=_hadamard_linear_setup
)


def hadamard_delta(w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float = 1.0) -> Tensor:
    """LoHa's delta weight ``scale * (w1_a @ w1_b) * (w2_a @ w2_b)`` ``[out, in]``, in one fused pass.

    Args: w1_a ``[out, r1]``, w1_b ``[r1, in]``, w2_a ``[out, r2]``, w2_b ``[r2, in]`` (peft's
    ``hada_w1_a`` ... layout), one dtype and device; ``scale`` peft's ``alpha / r``. Differentiable
    w.r.t. the four factors; backward saves only them and recomputes both products.
    """
    _hadamard_factors_check(w1_a, w1_b, w2_a, w2_b)
    _check_scale(scale)
    if not _use_kernel(w1_a):
        return _ref.hadamard_delta(w1_a, w1_b, w2_a, w2_b, float(scale))
    return _ops.hadamard_delta(w1_a, w1_b, w2_a, w2_b, float(scale))


def hadamard_linear(
    x: Tensor, w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float = 1.0
) -> Tensor:
    """LoHa applied to an input: ``y = x @ hadamard_delta(w1_a, w1_b, w2_a, w2_b, scale)^T``.

    Args:
        x: ``[..., in]`` (any leading dims, any strides); the factors as in :func:`hadamard_delta`,
            of x's dtype and device.

    Per shape the cheaper of (1) materialising ``dW`` in one fused pass and one GEMM, and (2) the
    face-splitting identity ``y = (x (w1_b^T . w2_b^T)) (scale w1_a . w2_a)^T`` (``.`` = row-wise
    Kronecker product, ``[in, r1 r2]`` and ``[out, r1 r2]``), which costs ``O(N (in + out) r1 r2)``
    and never forms an ``[out, in]`` matrix. Gradients flow to x and the four factors; backward
    saves only x and the factors. ``FASTPEFT_HADAMARD_STRATEGY=materialize|facesplit`` forces one.
    """
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("'x' must have at least one dimension (its last is in_features)")
    out_f, in_f = _hadamard_factors_check(w1_a, w1_b, w2_a, w2_b, x)
    if x.shape[-1] != in_f:
        raise ValueError(f"'x' has last dim {x.shape[-1]} but 'w1_b' has in_features {in_f} (w1_b is [r1, in])")
    _check_scale(scale)
    if not _use_kernel(x):
        return _ref.hadamard_linear(x, w1_a, w1_b, w2_a, w2_b, float(scale))
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else _rows(x, in_f)
    y = _ops.hadamard_linear_forward(x2, w1_a, w1_b, w2_a, w2_b, float(scale), _HADAMARD_STRATEGY)
    return y if x.dim() == 2 else y.reshape(*lead, out_f)


# ---- orthogonal family (OFT, BOFT) -----------------------------------------------------------------
# cayley: the batched Cayley transform of OFT/BOFT's skew-symmetric blocks (csrc/common/cayley_impl.h).
# Backward saves only skew and the output R; (I + S)^-1 is rebuilt from R (or from skew for bf16/fp16).


def _check_cayley(skew, num_neumann_terms) -> None:
    _check_tensor(skew, "skew", 3)
    if skew.shape[1] != skew.shape[2]:
        raise ValueError(f"'skew' must be a batch of square blocks [n, b, b], got shape {tuple(skew.shape)}")
    if not isinstance(num_neumann_terms, int) or isinstance(num_neumann_terms, bool):
        raise TypeError(f"'num_neumann_terms' must be an int, got {type(num_neumann_terms).__name__}")
    if num_neumann_terms < 0:
        raise ValueError(f"'num_neumann_terms' must be >= 0 (0 = the exact Cayley transform), got {num_neumann_terms}")


@_register_fake("fastpeft::cayley")
def _cayley_fake(skew, num_neumann_terms=0):
    _check_cayley(skew, num_neumann_terms)
    return skew.new_empty(skew.shape)


@_register_fake("fastpeft::cayley_backward")
def _cayley_backward_fake(grad_r, skew, r, num_neumann_terms=0):
    _check_cayley(skew, num_neumann_terms)
    for t, name in ((grad_r, "grad_r"), (r, "r")):
        _check_tensor(t, name, 3)
        _check_same(t, skew, name, "skew")
        if t.shape != skew.shape:
            raise ValueError(f"'{name}' has shape {tuple(t.shape)} but 'skew' has shape {tuple(skew.shape)}")
    return skew.new_empty(skew.shape)


def _cayley_setup(ctx, inputs, output):
    skew, num_neumann_terms = inputs
    ctx.num_neumann_terms = num_neumann_terms
    ctx.save_for_backward(skew, output)


def _cayley_bwd(ctx, grad_r):
    if grad_r is None or not ctx.needs_input_grad[0]:
        return None, None
    skew, r = ctx.saved_tensors
    return _ops.cayley_backward(grad_r, skew, r, ctx.num_neumann_terms), None


torch.library.register_autograd("fastpeft::cayley", _cayley_bwd, setup_context=_cayley_setup)


def cayley(skew: Tensor, num_neumann_terms: int = 0) -> Tensor:
    """Batched Cayley transform ``R`` ``[n, b, b]`` of square blocks ``skew`` ``[n, b, b]`` (peft OFT/BOFT).

    Args:
        skew: ``[n, b, b]`` blocks ``S`` (float32, bfloat16, float16 or float64; any strides; ``n`` may
            be 0). Making them skew-symmetric is the caller's job (e.g. ``A - A^T``); for any square
            ``S`` with ``I + S`` nonsingular the result and its gradient are the plain matrix functions.
        num_neumann_terms: ``0`` for the exact ``R = (I - S)(I + S)^-1`` (peft OFT with
            ``use_cayley_neumann=False``, and BOFT); ``k >= 1`` for peft OFT's truncated Neumann
            polynomial, which approximates the other sign convention ``(I + S)(I - S)^-1``:
            ``k = 1: I``; ``k = 2: I + 2S``; ``k = 3`` and ``k = 4: I + 2S + 2S^2 + S^3``;
            ``k >= 4: I + 2(S + ... + S^(k-2)) + S^(k-1)`` (see :func:`fastpeft.reference.cayley`).

    Computed in float32 (float64 for float64) and rounded once to skew's dtype. The exact form
    inverts ``I + S`` with partial pivoting (Gauss-Jordan per block; on CPU LAPACK per block above
    b = 512, on CUDA a batched LU above b = 64); a singular ``I + S`` (never the case for
    skew-symmetric S) yields inf/nan, it is not detected.
    Differentiable w.r.t. ``skew``; backward saves ``skew`` and ``R`` only.
    """
    _check_cayley(skew, num_neumann_terms)
    if not _use_kernel(skew):
        return _ref.cayley(skew, num_neumann_terms)
    return _ops.cayley(skew, num_neumann_terms)


# block_diag_rotate / butterfly_rotate (csrc/common/rotate_impl.h): x @ blockdiag(rot) and the butterfly
# x @ M_0 @ ... @ M_(m-1) with the permutations as index maps; backward saves only x and recomputes the
# factor inputs.


def _check_rotate(x, rot, rot_dim: int) -> None:
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("'x' must have at least one dimension (its last is the feature dim d)")
    _check_tensor(rot, "rot", rot_dim)
    _check_same(rot, x, "rot", "x")
    layout = "[n, b, b]" if rot_dim == 3 else "[m, n, b, b]"
    if rot_dim == 4 and rot.shape[0] < 1:
        raise ValueError(f"'rot' must hold at least one butterfly factor, got shape {tuple(rot.shape)}")
    n, b, b2 = rot.shape[-3:]
    if b != b2:
        raise ValueError(f"the blocks of 'rot' must be square, got shape {tuple(rot.shape)} ({layout})")
    if n < 1:
        raise ValueError(f"'rot' must hold at least one block, got shape {tuple(rot.shape)} ({layout})")
    d = x.shape[-1]
    if b == 0:
        if d != 0:
            raise ValueError(f"'rot' has 0x0 blocks but 'x' has {d} features")
    elif n == 1:
        if d % b != 0:
            raise ValueError(
                f"'x' has {d} features, not a multiple of the block size {b} of the shared block in 'rot' "
                f"(shape {tuple(rot.shape)})"
            )
    elif n * b != d:
        raise ValueError(
            f"'rot' has {n} blocks of size {b} (shape {tuple(rot.shape)}, {layout}) but 'x' has {d} features: "
            "n * b must equal d (or n == 1, one block shared by all d / b slices)"
        )


def _check_perm_shape(perm, x: Tensor, rot: Tensor) -> None:
    if not isinstance(perm, Tensor):
        raise TypeError(f"'perm' must be a torch.Tensor, got {type(perm).__name__}")
    if perm.dtype != torch.int64:
        raise TypeError(f"'perm' must be int64, got {perm.dtype}")
    if perm.device != x.device:
        raise ValueError(f"'perm' is on {perm.device} but 'x' is on {x.device}; move them to one device")
    m, d = rot.shape[0], x.shape[-1]
    if perm.dim() != 2 or tuple(perm.shape) != (m, d):
        raise ValueError(
            f"'perm' must be [m, d] = [{m}, {d}] (one permutation of the d features per factor of 'rot'), "
            f"got shape {tuple(perm.shape)}"
        )


# perm tensors already checked to hold permutations: id -> (weak reference, the version it had then). A
# BOFT layer's permutation buffer is checked once (one sort and one device sync), not on every forward.
# (Keyed by id: a WeakKeyDictionary would compare tensors with ==.)
_CHECKED_PERMS: "dict[int, tuple[weakref.ref, int]]" = {}


def _perm_checked(perm: Tensor) -> bool:
    entry = _CHECKED_PERMS.get(id(perm))
    return entry is not None and entry[0]() is perm and entry[1] == perm._version


def _check_perm_values(perm: Tensor) -> None:
    if perm.device.type == "meta" or isinstance(perm, torch._subclasses.FakeTensor) or perm.numel() == 0:
        return
    if torch.compiler.is_compiling():
        return  # traced: the CPU kernel checks the values itself; an eager call checks them on CUDA
    if _perm_checked(perm):
        return
    d = perm.shape[1]
    expected = torch.arange(d, device=perm.device, dtype=perm.dtype).expand_as(perm)
    bad = (torch.sort(perm, dim=1).values != expected).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"'perm' row {row} is not a permutation of 0..{d - 1}")
    key = id(perm)
    try:
        ref = weakref.ref(perm, lambda _r, key=key: _CHECKED_PERMS.pop(key, None))
    except TypeError:  # a tensor type that cannot be weakly referenced: checked on every call
        return
    _CHECKED_PERMS[key] = (ref, perm._version)


@_register_fake("fastpeft::block_diag_rotate")
def _block_diag_rotate_fake(x, rot):
    _check_rotate(x, rot, 3)
    return x.new_empty(x.shape)


@_register_fake("fastpeft::block_diag_rotate_backward")
def _block_diag_rotate_backward_fake(grad_y, x, rot, need_grad_x=True, need_grad_rot=True):
    _check_rotate(x, rot, 3)
    _check_same(grad_y, x, "grad_y", "x")
    gx = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    gr = rot.new_empty(rot.shape) if need_grad_rot else x.new_empty((0,))
    return gx, gr


@_register_fake("fastpeft::butterfly_rotate")
def _butterfly_rotate_fake(x, rot, perm):
    _check_rotate(x, rot, 4)
    _check_perm_shape(perm, x, rot)
    return x.new_empty(x.shape)


@_register_fake("fastpeft::butterfly_rotate_backward")
def _butterfly_rotate_backward_fake(grad_y, x, rot, perm, need_grad_x=True, need_grad_rot=True):
    _check_rotate(x, rot, 4)
    _check_perm_shape(perm, x, rot)
    _check_same(grad_y, x, "grad_y", "x")
    gx = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    gr = rot.new_empty(rot.shape) if need_grad_rot else x.new_empty((0,))
    return gx, gr


def _block_diag_rotate_setup(ctx, inputs, output):
    x, rot = inputs
    ctx.save_for_backward(x, rot)


def _block_diag_rotate_bwd(ctx, grad_y):
    need_x, need_rot = ctx.needs_input_grad[:2]
    if grad_y is None or not (need_x or need_rot):
        return None, None
    x, rot = ctx.saved_tensors
    gx, gr = _ops.block_diag_rotate_backward(grad_y, x, rot, need_x, need_rot)
    return (gx if need_x else None), (gr if need_rot else None)


torch.library.register_autograd(
    "fastpeft::block_diag_rotate", _block_diag_rotate_bwd, setup_context=_block_diag_rotate_setup
)


def _butterfly_rotate_setup(ctx, inputs, output):
    x, rot, perm = inputs
    ctx.save_for_backward(x, rot, perm)  # the factor inputs are recomputed, never saved


def _butterfly_rotate_bwd(ctx, grad_y):
    need_x, need_rot = ctx.needs_input_grad[:2]
    if grad_y is None or not (need_x or need_rot):
        return None, None, None
    x, rot, perm = ctx.saved_tensors
    gx, gr = _ops.butterfly_rotate_backward(grad_y, x, rot, perm, need_x, need_rot)
    return (gx if need_x else None), (gr if need_rot else None), None


torch.library.register_autograd(
    "fastpeft::butterfly_rotate", _butterfly_rotate_bwd, setup_context=_butterfly_rotate_setup
)


def block_diag_rotate(x: Tensor, rot: Tensor) -> Tensor:
    """OFT's rotation ``x @ blockdiag(rot)`` without building the dense ``[d, d]`` matrix.

    Args:
        x: ``[..., d]`` input (any leading dims, zero rows allowed, any strides).
        rot: ``[n, b, b]`` blocks with ``n * b == d`` (block k rotates features ``k b .. k b + b - 1``),
            or ``[1, b, b]``, one block shared by all ``d / b`` slices; x's dtype and device.

    ``y[..., k b + c] = sum_j x[..., k b + j] rot[k, j, c]``, summed in float32 (float64 for float64)
    and rounded once. Differentiable w.r.t. x and rot (a shared block's gradient sums over its
    slices); backward saves only x and rot, and computes only the gradients asked for.
    """
    _check_rotate(x, rot, 3)
    if not _use_kernel(x):
        return _ref.block_diag_rotate(x, rot)
    return _ops.block_diag_rotate(x, rot)


def butterfly_rotate(x: Tensor, rot: Tensor, perm: Tensor) -> Tensor:
    """BOFT's butterfly rotation ``x @ M_0 @ M_1 @ ... @ M_(m-1)``, ``M_i = P_i blockdiag(rot[i]) P_i^T``.

    Args:
        x: ``[..., d]`` input (any leading dims, zero rows allowed, any strides).
        rot: ``[m, n, b, b]``: factor i's blocks (``n * b == d``, or ``n == 1`` shared); x's dtype and device.
        perm: int64 ``[m, d]`` on x's device, each row a permutation of ``0 .. d-1``;
            ``P_i[j, perm[i, j]] = 1``.

    The permutations are applied as index maps (consecutive ones composed into one gather), never as
    matrices: ``u[..., perm[i, j]] = z[..., j]``, ``v = block_diag_rotate(u, rot[i])``,
    ``z'[..., j] = v[..., perm[i, j]]``; O(m d b) work per token. Sums are float32 (float64 for
    float64). Differentiable w.r.t. x and rot; backward saves only x, rot and perm and recomputes
    the intermediate factor outputs. Each perm tensor is checked (one sort) the first time it is
    seen and again only after it changes.
    """
    _check_rotate(x, rot, 4)
    _check_perm_shape(perm, x, rot)
    _check_perm_values(perm)
    if not _use_kernel(x):
        return _ref.butterfly_rotate(x, rot, perm)
    return _ops.butterfly_rotate(x, rot, perm)


def _check_rotate_grad_y(grad_y: Tensor, x: Tensor) -> None:
    _check_tensor(grad_y, "grad_y")
    _check_same(grad_y, x, "grad_y", "x")
    if grad_y.shape != x.shape:
        raise ValueError(f"'grad_y' has shape {tuple(grad_y.shape)} but 'x' has shape {tuple(x.shape)}")


def _reference_rotate_grads(fn, grad_y, x, rot, extra, need_grad_x, need_grad_rot):
    with torch.enable_grad():
        xd = x.detach().requires_grad_(need_grad_x)
        rd = rot.detach().requires_grad_(need_grad_rot)
        wrt = [t for t in (xd, rd) if t.requires_grad]
        grads = iter(torch.autograd.grad(fn(xd, rd, *extra), wrt, grad_y)) if wrt else iter(())
    return (next(grads) if need_grad_x else None), (next(grads) if need_grad_rot else None)


def block_diag_rotate_grads(
    grad_y: Tensor, x: Tensor, rot: Tensor, need_grad_x: bool = True, need_grad_rot: bool = True
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The gradients ``(grad_x, grad_rot)`` of :func:`block_diag_rotate` for an upstream ``grad_y`` (x's
    shape), each ``None`` when not asked for; one kernel call, nothing recomputed. For layers that
    apply the rotation some other way in forward (e.g. folded into a weight) and need its backward."""
    _check_rotate(x, rot, 3)
    _check_rotate_grad_y(grad_y, x)
    if not (need_grad_x or need_grad_rot):
        return None, None
    if not _use_kernel(x):
        return _reference_rotate_grads(_ref.block_diag_rotate, grad_y, x, rot, (), need_grad_x, need_grad_rot)
    gx, gr = _ops.block_diag_rotate_backward(grad_y, x, rot, need_grad_x, need_grad_rot)
    return (gx if need_grad_x else None), (gr if need_grad_rot else None)


def butterfly_rotate_grads(
    grad_y: Tensor, x: Tensor, rot: Tensor, perm: Tensor, need_grad_x: bool = True, need_grad_rot: bool = True
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The gradients ``(grad_x, grad_rot)`` of :func:`butterfly_rotate` for an upstream ``grad_y``, as
    :func:`block_diag_rotate_grads` (the factors' inputs are recomputed from x inside the kernel)."""
    _check_rotate(x, rot, 4)
    _check_perm_shape(perm, x, rot)
    _check_perm_values(perm)
    _check_rotate_grad_y(grad_y, x)
    if not (need_grad_x or need_grad_rot):
        return None, None
    if not _use_kernel(x):
        return _reference_rotate_grads(_ref.butterfly_rotate, grad_y, x, rot, (perm,), need_grad_x, need_grad_rot)
    gx, gr = _ops.butterfly_rotate_backward(grad_y, x, rot, perm, need_grad_x, need_grad_rot)
    return (gx if need_grad_x else None), (gr if need_grad_rot else None)


# ---- segmented lora (mixed-adapter batches) ------------------------------------------------------
#
# punica SGMV/BGMV-style multi-LoRA: each row of x goes through its own adapter (or none). The CPU
# kernel groups rows by adapter (counting sort) and runs shrink then expand per group; the CUDA kernel
# is one block per row reading the row's adapter on the device. Cost grows with rows x rank, not with
# the number of adapters. Inference is the main use (peft forbids adapter_names in training), but the
# op is differentiable: grad_x goes through the same op with the adapters transposed, grad_A/grad_B
# per adapter over its rows only.


def _segmented_check(x, lora_A, lora_B, scalings, adapter_index) -> Tuple[int, int]:
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("'x' must have at least one dimension (its last is in_features)")
    if not isinstance(lora_A, (list, tuple)) or not isinstance(lora_B, (list, tuple)):
        raise TypeError("'lora_A' and 'lora_B' must be lists of tensors (one per adapter)")
    n = len(lora_A)
    if n == 0:
        raise ValueError("segmented_lora needs at least one adapter")
    if len(lora_B) != n or len(scalings) != n:
        raise ValueError(
            f"'lora_A', 'lora_B' and 'scalings' need one entry per adapter, got {n}, {len(lora_B)} and {len(scalings)}")
    in_f = x.shape[-1]
    out_f = None
    for k in range(n):
        a, b = lora_A[k], lora_B[k]
        _check_tensor(a, f"lora_A[{k}]", 2)
        _check_tensor(b, f"lora_B[{k}]", 2)
        _check_same(a, x, f"lora_A[{k}]", "x")
        _check_same(b, x, f"lora_B[{k}]", "x")
        if a.shape[1] != in_f:
            raise ValueError(f"'lora_A[{k}]' has shape {tuple(a.shape)} but 'x' has in_features {in_f} (lora_A is [r, in])")
        out_f = b.shape[0] if out_f is None else out_f
        if b.shape[0] != out_f or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"'lora_B[{k}]' has shape {tuple(b.shape)} but must be [out={out_f}, r={a.shape[0]}] to match "
                f"'lora_A[{k}]' {tuple(a.shape)}" + (" and 'lora_B[0]'" if k else "") + " (lora_B is [out, r])")
    for k, s in enumerate(scalings):
        try:
            float(s)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"'scalings' must be a list of floats (one per adapter), got {s!r} at [{k}]") from None
    if not isinstance(adapter_index, Tensor) or adapter_index.dtype != torch.int64:
        raise TypeError("'adapter_index' must be an int64 tensor (one adapter index per row, -1 = none)")
    if adapter_index.device != x.device:
        raise ValueError(f"'adapter_index' is on {adapter_index.device} but 'x' is on {x.device}; move them to one device")
    if tuple(adapter_index.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"'adapter_index' has shape {tuple(adapter_index.shape)} but must match x's leading dims {tuple(x.shape[:-1])}")
    return in_f, out_f


@_register_fake("fastpeft::segmented_lora")
def _segmented_lora_fake(x, lora_A, lora_B, scalings, adapter_index):
    _fake_2d(x, "x")
    return x.new_empty((x.shape[0], lora_B[0].shape[0]))


def _segmented_setup(ctx, inputs, output):
    x, lora_A, lora_B, scalings, adapter_index = inputs
    ctx.n = len(lora_A)
    ctx.scalings = list(scalings)
    ctx.save_for_backward(x, adapter_index, *lora_A, *lora_B)


def _segmented_backward(ctx, grad):
    x, idx, *w = ctx.saved_tensors
    n = ctx.n
    A, B = w[:n], w[n:]
    need = ctx.needs_input_grad
    gx = None
    if need[0]:
        # d/dx of s (x A^T) B^T is s (g B) A: the same op with A' = B^T [r, out] and B' = A^T [in, r].
        gx = _ops.segmented_lora(grad, [b.t().contiguous() for b in B], [a.t().contiguous() for a in A],
                                 ctx.scalings, idx)
    gA = [None] * n
    gB = [None] * n
    if need[1] or need[2]:
        for k in range(n):
            rows = (idx == k).nonzero().flatten()
            xs, gs = x.index_select(0, rows), grad.index_select(0, rows)
            s = ctx.scalings[k]
            gA[k] = s * (gs @ B[k]).t() @ xs  # [r, in]
            gB[k] = s * gs.t() @ (xs @ A[k].t())  # [out, r]
    return gx, (gA if need[1] else None), (gB if need[2] else None), None, None


torch.library.register_autograd("fastpeft::segmented_lora", _segmented_backward, setup_context=_segmented_setup)


def segmented_lora(x: Tensor, lora_A: Sequence[Tensor], lora_B: Sequence[Tensor], scalings: Sequence[float],
                   adapter_index: Tensor) -> Tensor:
    """Mixed-adapter LoRA delta (punica SGMV/BGMV style): each row of x through its own adapter.

    Args:
        x: ``[..., in]`` input (any leading dims, any strides, zero rows allowed).
        lora_A: one ``[r_k, in]`` tensor per adapter (ranks may differ; ``r_k = 0`` gives a zero delta).
        lora_B: one ``[out, r_k]`` tensor per adapter.
        scalings: one float per adapter.
        adapter_index: int64, shaped like x's leading dims, on x's device: the adapter of each row,
            ``-1`` for rows that take no adapter.

    Returns:
        ``delta [..., out]`` in x's dtype: ``delta[t] = s_k (x[t] A_k^T) B_k^T`` for ``k = adapter_index[t]``
        and zero for ``k = -1``; op-math (float32; float64 for float64) sums, rounded once. Add it to the
        base layer's output. Cost is proportional to rows x rank: adapters no row uses are never read.
    Gradients flow to x, lora_A and lora_B.
    """
    in_f, out_f = _segmented_check(x, lora_A, lora_B, scalings, adapter_index)
    return _segmented_lora_checked(x, lora_A, lora_B, scalings, adapter_index, in_f, out_f)


def _segmented_lora_checked(x, lora_A, lora_B, scalings, adapter_index, in_f: int, out_f: int,
                            check_range: bool = True) -> Tensor:
    """segmented_lora without the per-adapter Python checks (the kernels check every argument again): for
    callers that built the arguments themselves (the LoRA layers), where O(n) Python checks per layer and
    forward would cost more than the op."""
    lead = x.shape[:-1]
    x2 = _rows(x, in_f)
    idx = adapter_index.reshape(-1)
    n = len(lora_A)
    # (data-dependent: skipped under torch.compile, where the CPU kernel's own check still raises)
    if (check_range and idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling()
            and (int(idx.min()) < -1 or int(idx.max()) >= n)):
        raise ValueError(f"'adapter_index' values must be -1 (no adapter) or in [0, {n}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    if check_range and idx.device.type != "cpu" and idx.numel() and not torch.compiler.is_compiling():
        # no host sync: a device-side assert (an error at the next synchronisation) instead of silently giving
        # an out-of-range row the base output
        torch._assert_async(((idx >= -1) & (idx < n)).all(),
                            f"'adapter_index' values must be -1 (no adapter) or in [0, {n})")
    scal = scalings if check_range is False else [float(s) for s in scalings]
    if not _use_kernel(x):
        y = _ref.segmented_lora(x2, list(lora_A), list(lora_B), scal, idx)
    else:
        y = _ops.segmented_lora(x2, list(lora_A), list(lora_B), scal, idx)
    return y.reshape(*lead, out_f)
