"""TEMPORARY plain-torch stand-ins for the LoKr / LoHa ops of `fastpeft.ops` (kron and hadamard families).

Same names, signatures and semantics as the `fastpeft.ops` wrappers being written with the C++/CUDA
kernels; `tuners/lycoris.py` imports them from here in ONE line. When the ops land, delete this file and
point that import at `fastpeft.ops`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["kron_linear", "hadamard_linear", "hadamard_delta"]


def _factor(w: Optional[Tensor], w_a: Optional[Tensor], w_b: Optional[Tensor], name: str) -> Tensor:
    if w is not None:
        if w_a is not None or w_b is not None:
            raise ValueError(f"kron_linear: pass either {name} or {name}_a and {name}_b, not both")
        return w
    if w_a is None or w_b is None:
        raise ValueError(f"kron_linear: {name} or both {name}_a and {name}_b are required")
    return w_a @ w_b


def kron_linear(x: Tensor, w1: Optional[Tensor] = None, w2: Optional[Tensor] = None, *,
                w1_a: Optional[Tensor] = None, w1_b: Optional[Tensor] = None,
                w2_a: Optional[Tensor] = None, w2_b: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
    """scale * x (W1 ⊗ W2)^T without forming the Kronecker product: W1 [a, c], W2 [b, d], x [..., c*d] -> [..., a*b]."""
    W1 = _factor(w1, w1_a, w1_b, "w1")
    W2 = _factor(w2, w2_a, w2_b, "w2")
    a, c = W1.shape
    b, d = W2.shape
    if x.shape[-1] != c * d:
        raise ValueError(f"kron_linear: x has {x.shape[-1]} features, W1 ⊗ W2 expects {c} * {d} = {c * d}")
    X = x.reshape(*x.shape[:-1], c, d)
    y = torch.einsum("ik,...kl,jl->...ij", W1, X, W2)  # (W1 X W2^T)[i, j] = out feature i*b + j
    return y.reshape(*x.shape[:-1], a * b) * scale


def hadamard_delta(w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float = 1.0) -> Tensor:
    """ΔW = scale * (w1_a @ w1_b) ⊙ (w2_a @ w2_b), [out, in]."""
    return (w1_a @ w1_b) * (w2_a @ w2_b) * scale


def hadamard_linear(x: Tensor, w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float = 1.0) -> Tensor:
    """x ΔW^T with ΔW = scale * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)."""
    return torch.nn.functional.linear(x, hadamard_delta(w1_a, w1_b, w2_a, w2_b, scale))
