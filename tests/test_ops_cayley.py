"""Tests of the cayley kernel family (OFT, BOFT): fastpeft.ops.cayley, exact form and peft OFT's Neumann
polynomial, against fastpeft.reference and against peft's own formulas, on CPU and (marked) CUDA."""
from __future__ import annotations

import pytest
import torch

from fastpeft import ops
from fastpeft import reference as ref

from _op_testing import DTYPES, close

fp = torch.ops.fastpeft

# CPU paths: b <= 256 fused per-block kernels throughout; above, the exact form's inverse by Gauss-Jordan
# per block up to 512 and LAPACK one block per call beyond, the Neumann polynomial and backward by ATen bmm.
BLOCKS = [1, 2, 3, 8, 32, 33, 64, 130]
NS = [0, 1, 5]
TERMS = list(range(8))

pytestmark = pytest.mark.usefixtures("one_thread")


def make_skew(n, b, dtype=torch.float32, device="cpu", seed=0, scale=0.5):
    """A reproducible skew-symmetric [n, b, b] batch with spectral norm about `scale` (drawn in float64)."""
    g = torch.Generator().manual_seed(seed + 100 * n + b)
    a = torch.randn(n, b, b, generator=g, dtype=torch.float64) * (scale / (2 * max(b, 1) ** 0.5))
    return (a - a.transpose(1, 2)).to(dtype).to(device)


def make_square(n, b, dtype=torch.float64, device="cpu", seed=0, scale=0.5):
    """A general (not skew) [n, b, b] batch with I + S well conditioned."""
    g = torch.Generator().manual_seed(seed + 7 * n + b)
    return (torch.randn(n, b, b, generator=g, dtype=torch.float64) * (scale / max(b, 1) ** 0.5)).to(dtype).to(device)


def ref_grad(s64: torch.Tensor, k: int, gy: torch.Tensor) -> torch.Tensor:
    """d<R(S), gy>/dS of the float64 reference (k = 1 is R = I: zero gradient)."""
    s64 = s64.detach().double().requires_grad_(True)
    r = ref.cayley(s64, k)
    if not r.requires_grad:
        return torch.zeros_like(s64)
    (grad,) = torch.autograd.grad(r, s64, gy.double())
    return grad


def check_cayley(s: torch.Tensor, k: int, what: str = "") -> None:
    """ops.cayley(s, k) and its gradient vs the float64 reference on the same values."""
    dtype = s.dtype
    x = s.detach().clone().requires_grad_(True)
    r = ops.cayley(x, k)
    r64 = ref.cayley(s.detach().double(), k)
    assert r.dtype == dtype and r.shape == s.shape and r.device == s.device, (what, r.dtype, r.shape)
    close(r, r64, dtype, f"{what} R")
    gy = torch.randn(s.shape, dtype=torch.float64).to(dtype).to(s.device)
    r.backward(gy)
    close(x.grad, ref_grad(s, k, gy), dtype, f"{what} grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cayley_vs_reference(dtype):
    for b in BLOCKS:
        for n in NS:
            for k in TERMS:
                check_cayley(make_skew(n, b, dtype, seed=k), k, f"b={b} n={n} k={k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cayley_large_blocks(dtype):
    for k in (0, 2, 5):
        check_cayley(make_skew(2, 300, dtype, seed=k), k, f"b=300 k={k}")
    check_cayley(make_skew(2, 520, dtype), 0, "b=520")


def test_cayley_large_blocks_two_threads():
    # torch's batched CPU LU is unreliable with several threads for b >= 192 (see csrc/cpu/cayley.cpp);
    # the op never calls it: R stays orthogonal, and its gradient matches the float64 reference.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for b in (200, 520):
            s = make_skew(3, b, torch.float32, scale=2.0)
            r = ops.cayley(s).double()
            torch.testing.assert_close(r.transpose(1, 2) @ r, torch.eye(b, dtype=torch.float64).expand(3, b, b),
                                       atol=1e-4, rtol=0)
            x = s.clone().requires_grad_(True)
            gy = torch.randn(3, b, b)
            ops.cayley(x).backward(gy)
            w = torch.stack([torch.linalg.inv(torch.eye(b, dtype=torch.float64) + m) for m in s.double()])
            expected = -2 * w.transpose(1, 2) @ gy.double() @ w.transpose(1, 2)  # dS of R = 2 (I + S)^-1 - I
            close(x.grad, expected, torch.float32, f"grad b={b}")
    finally:
        torch.set_num_threads(before)


def test_cayley_general_square_inputs():
    # Any square S with I + S nonsingular: the plain matrix function and derivative (partial pivoting
    # handles a zero leading pivot too).
    for b in (1, 4, 33, 130):
        for k in (0, 3, 6):
            check_cayley(make_square(3, b, torch.float64, seed=k), k, f"square b={b} k={k}")
            check_cayley(make_square(3, b, torch.float32, seed=k), k, f"square fp32 b={b} k={k}")
    s = torch.tensor([[[-1.0, 2.0], [3.0, 0.5]]], dtype=torch.float64)  # (I + S)[0, 0] == 0: needs a row swap
    check_cayley(s, 0, "zero pivot")
    assert torch.isfinite(ops.cayley(s.float())).all()


def test_cayley_identity_init_and_neumann_polynomials():
    # OFT's zero init gives R = I exactly, every form and dtype.
    for dtype in DTYPES:
        for k in TERMS:
            r = ops.cayley(torch.zeros(3, 5, 5, dtype=dtype), k)
            assert torch.equal(r, torch.eye(5, dtype=dtype).expand(3, 5, 5)), (dtype, k)
    # The polynomials themselves, k = 3 and k = 4 alike (peft's loop).
    s = make_skew(2, 6, torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    s2, s3, s4 = s @ s, s @ s @ s, s @ s @ s @ s
    expected = {1: eye.expand(2, 6, 6), 2: eye + 2 * s, 3: eye + 2 * s + 2 * s2 + s3, 4: eye + 2 * s + 2 * s2 + s3,
                5: eye + 2 * s + 2 * s2 + 2 * s3 + s4}
    for k, e in expected.items():
        torch.testing.assert_close(ops.cayley(s, k), e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.cayley(s, 0), (eye - s) @ torch.linalg.inv(eye + s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cayley_exact_is_orthogonal(dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for b in (2, 32, 33, 130, 300):
        s = make_skew(3, b, dtype, scale=3.0)  # far from the identity
        r = ops.cayley(s).double()
        eye = torch.eye(b, dtype=torch.float64).expand_as(r)
        torch.testing.assert_close(r.transpose(1, 2) @ r, eye, atol=tol, rtol=0)
        # R(-S) = R(S)^-1 = R(S)^T
        torch.testing.assert_close(ops.cayley(-s).double(), r.transpose(1, 2), atol=tol, rtol=0)


def test_cayley_gradient_through_skew_constructions():
    # S = A - A^T, and peft OFT's upper-triangle vector construction; gradients w.r.t. A / the vector.
    b, n = 9, 4
    rows, cols = torch.triu_indices(b, b, 1)

    def from_vec(vec):
        m = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
        m[:, rows, cols] = vec
        return m - m.transpose(1, 2)

    g = torch.Generator().manual_seed(3)
    a = (torch.randn(n, b, b, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    vec = (torch.randn(n, b * (b - 1) // 2, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    for k in (0, 2, 3, 5):
        for build, leaf in ((lambda t: t - t.transpose(1, 2), a), (from_vec, vec)):
            gy = torch.randn(n, b, b, generator=g, dtype=torch.float64)
            (ours,) = torch.autograd.grad(ops.cayley(build(leaf), k), leaf, gy)
            (theirs,) = torch.autograd.grad(ref.cayley(build(leaf), k), leaf, gy)
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
            for dtype in (torch.float32, torch.bfloat16):
                x = leaf.detach().to(dtype).requires_grad_(True)
                (low,) = torch.autograd.grad(ops.cayley(build(x), k), x, gy.to(dtype))
                close(low, theirs, dtype, f"k={k} {dtype}")


def test_cayley_gradcheck():
    for b in (1, 3, 5):
        for k in (0, 2, 3, 5, 7):
            s = make_square(2, b, torch.float64, seed=b + k).requires_grad_(True)
            assert torch.autograd.gradcheck(lambda t: ops.cayley(t, k), (s,))
    a = make_square(2, 4, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops.cayley(t - t.transpose(1, 2), 0), (a,))


def test_cayley_noncontiguous_and_empty():
    for dtype in (torch.float32, torch.bfloat16):
        base = make_skew(6, 33, dtype)
        for s in (base.transpose(1, 2), base[::2], base[:, 1:, 1:]):
            assert not s.is_contiguous()
            for k in (0, 4):
                check_cayley(s, k, f"strided {tuple(s.stride())} k={k}")
    for k in (0, 3):
        x = torch.zeros(0, 7, 7, requires_grad=True)
        r = ops.cayley(x, k)
        assert r.shape == (0, 7, 7)
        r.sum().backward()
        assert x.grad.shape == (0, 7, 7)
        assert ops.cayley(torch.zeros(2, 0, 0), k).shape == (2, 0, 0)


def test_cayley_threads_agree():
    # Blocks are split over threads (the module runs single-threaded): the same bits with two.
    s = make_skew(7, 40, torch.float32)
    gy = torch.randn(7, 40, 40)
    one = {k: (ops.cayley(s, k), fp.cayley_backward(gy, s, ops.cayley(s, k), k)) for k in (0, 5)}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for k, (r, g) in one.items():
            assert torch.equal(ops.cayley(s, k), r)
            assert torch.equal(fp.cayley_backward(gy, s, r, k), g)
    finally:
        torch.set_num_threads(before)


def test_cayley_matches_peft():
    pytest.importorskip("peft")
    from peft.tuners.boft.layer import BOFTLayer
    from peft.tuners.oft.layer import OFTRotationModule

    g = torch.Generator().manual_seed(11)
    for b, n in ((2, 3), (8, 4), (32, 2), (33, 1)):
        n_el = b * (b - 1) // 2
        for neumann in (False, True):
            for k in (1, 2, 3, 4, 5, 7) if neumann else (5,):
                mod = OFTRotationModule(n, n_el, b, n * b, use_cayley_neumann=neumann, num_cayley_neumann_terms=k)
                with torch.no_grad():
                    mod.weight.copy_(torch.randn(n, n_el, generator=g) * 0.05)
                gy = torch.randn(n, b, b, generator=g)
                r_peft = mod._cayley_batch(mod.weight, b, neumann, k)
                (g_peft,) = torch.autograd.grad(r_peft, mod.weight, gy) if r_peft.requires_grad else (
                    torch.zeros_like(mod.weight),)
                vec = mod.weight.detach().clone().requires_grad_(True)
                r_ours = ops.cayley(mod._pytorch_skew_symmetric(vec, b), k if neumann else 0)
                torch.testing.assert_close(r_ours, r_peft, rtol=1e-5, atol=1e-5)
                (g_ours,) = torch.autograd.grad(r_ours, vec, gy, allow_unused=True)
                g_ours = torch.zeros_like(vec) if g_ours is None else g_ours
                torch.testing.assert_close(g_ours, g_peft, rtol=1e-4, atol=1e-4)
        # BOFT symmetrises its input itself: skew = (data - data^T) / 2.
        data = (torch.randn(n, b, b, generator=g) * 0.1).requires_grad_(True)
        r_peft = BOFTLayer.cayley_batch(None, data)
        gy = torch.randn(n, b, b, generator=g)
        (g_peft,) = torch.autograd.grad(r_peft, data, gy)
        x = data.detach().clone().requires_grad_(True)
        r_ours = ops.cayley(0.5 * (x - x.transpose(1, 2)))
        torch.testing.assert_close(r_ours, r_peft, rtol=1e-5, atol=1e-5)
        (g_ours,) = torch.autograd.grad(r_ours, x, gy)
        torch.testing.assert_close(g_ours, g_peft, rtol=1e-4, atol=1e-4)


def test_cayley_opcheck():
    for b in (3, 33):
        for k in (0, 1, 3, 6):
            s = make_skew(4, b, seed=k).requires_grad_(True)
            torch.library.opcheck(fp.cayley.default, (s, k))
            r = fp.cayley(s.detach(), k)
            torch.library.opcheck(fp.cayley_backward.default, (torch.randn(4, b, b), s.detach(), r, k))
    torch.library.opcheck(fp.cayley.default, (make_skew(3, 8, torch.bfloat16).requires_grad_(True), 0))


class _TinyOFT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(make_skew(3, 4) * 0.5)

    def forward(self, x):
        r = ops.cayley(self.a - self.a.transpose(1, 2), 0)
        return torch.einsum("...kj,kjc->...kc", x.reshape(*x.shape[:-1], 3, 4), r).reshape(x.shape)


def test_cayley_torch_compile_fullgraph():
    mod = _TinyOFT()
    x = torch.randn(2, 12, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    y_c, y_e = compiled(x), mod(x)
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(torch.autograd.grad(y_c.sum(), [x, mod.a]), torch.autograd.grad(y_e.sum(), [x, mod.a])):
        torch.testing.assert_close(a, b)


def test_cayley_bad_inputs():
    s = make_skew(2, 4)
    with pytest.raises(ValueError, match="'skew' must be 3-D"):
        ops.cayley(s[0])
    with pytest.raises(ValueError, match=r"square blocks \[n, b, b\]"):
        ops.cayley(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="'skew' must be a floating-point tensor"):
        ops.cayley(torch.ones(2, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="'skew' must be a torch.Tensor"):
        ops.cayley([[[0.0]]])
    with pytest.raises(ValueError, match="'num_neumann_terms' must be >= 0"):
        ops.cayley(s, -1)
    for bad in (2.0, True, None):
        with pytest.raises(TypeError, match="'num_neumann_terms' must be an int"):
            ops.cayley(s, bad)
    # the compiled ops check too
    with pytest.raises(RuntimeError, match="'skew' must be 3-D"):
        fp.cayley(s[0], 0)
    with pytest.raises(RuntimeError, match="square blocks"):
        fp.cayley(torch.randn(2, 4, 5), 0)
    with pytest.raises(RuntimeError, match="'num_neumann_terms' must be >= 0"):
        fp.cayley(s, -2)
    with pytest.raises(RuntimeError, match="'skew' must be float32"):
        fp.cayley(torch.ones(2, 4, 4, dtype=torch.int32), 0)
    r = fp.cayley(s, 0)
    with pytest.raises(RuntimeError, match="'grad_r' has size 3"):
        fp.cayley_backward(torch.randn(2, 3, 3), s, r, 0)
    with pytest.raises(RuntimeError, match="'r' has dtype"):
        fp.cayley_backward(torch.randn(2, 4, 4), s, r.double(), 0)


# ---- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_cayley_vs_reference(dtype):
    # 64: the fused shared-memory kernels (float64 Neumann at b = 64 exceeds their 48 KiB: ATen); 130, 300: ATen.
    for b in BLOCKS + [300]:
        for n in NS:
            for k in TERMS:
                check_cayley(make_skew(n, b, dtype, "cuda", seed=k), k, f"cuda b={b} n={n} k={k}")
    s = make_skew(6, 33, dtype, "cuda")
    check_cayley(s.transpose(1, 2), 0, "cuda strided")
    check_cayley(make_square(3, 20, dtype, "cuda"), 0, "cuda square")
    s = torch.tensor([[[-1.0, 2.0], [3.0, 0.5]]], dtype=dtype, device="cuda")
    check_cayley(s, 0, "cuda zero pivot")


@pytest.mark.cuda
def test_cuda_cayley_gradcheck_opcheck():
    for k in (0, 3, 5):
        s = make_square(2, 5, torch.float64, "cuda").requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: ops.cayley(t, k), (s,))
        sf = make_skew(3, 16, torch.float32, "cuda").requires_grad_(True)
        torch.library.opcheck(fp.cayley.default, (sf, k))
    cpu = make_skew(40, 48, torch.float32)
    for k in (0, 5):  # the same blocks on both devices
        torch.testing.assert_close(ops.cayley(cpu.cuda(), k).cpu(), ops.cayley(cpu, k), rtol=1e-5, atol=1e-5)
