"""Helpers shared by the op-family tests (test_ops_kron.py, test_ops_hadamard.py)."""
from __future__ import annotations

import torch

# Absolute (scaled by the reference's largest magnitude) and relative tolerance per dtype.
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
NS = [0, 1, 5, 33]


def close(actual, expected, dtype, what=""):
    """assert_close against a float64 reference, with tolerances for `dtype`."""
    tol = TOL[dtype]
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def rand_x(n, features, dtype, device="cpu", seed=1):
    """A reproducible [n, features] input (drawn in float64, then cast)."""
    g = torch.Generator().manual_seed(seed + n)
    return torch.randn(n, features, generator=g, dtype=torch.float64).to(dtype).to(device)


def check_vs_reference(fn, ref_fn, tensors: dict, dtype, what=""):
    """fn(**tensors) and its gradients w.r.t. every tensor vs ref_fn on the same values in float64."""
    ts = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    t64 = {k: v.detach().double().requires_grad_(True) for k, v in tensors.items()}
    y, y64 = fn(**ts), ref_fn(**t64)
    assert y.dtype == dtype and y.shape == y64.shape, (what, y.dtype, y.shape, y64.shape)
    close(y, y64, dtype, f"{what} y")
    gy = torch.randn(y64.shape, dtype=torch.float64).to(dtype).to(y.device)
    y.backward(gy)
    y64.backward(gy.double())
    for k in tensors:
        close(ts[k].grad, t64[k].grad, dtype, f"{what} grad {k}")
