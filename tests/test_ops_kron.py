"""Tests of the kron kernel family (LoKr): fastpeft.ops.kron_linear (kron_forward / kron_backward)
against fastpeft.reference.kron_linear (torch.kron materialised), on CPU and (marked) CUDA."""
from __future__ import annotations

import pytest
import torch

from fastpeft import ops
from fastpeft import reference as ref

from _op_testing import DTYPES, NS, check_vs_reference, close, rand_x

fp = torch.ops.fastpeft

# (a, b, c, d): W1 [a, c], W2 [b, d]; odd, non-square, unit factors.
FACTORS = [(2, 3, 5, 7), (7, 1, 1, 6), (1, 1, 1, 1), (4, 5, 3, 2), (3, 7, 6, 7)]
MODES = ["full/full", "low/full", "full/low", "low/low"]

pytestmark = pytest.mark.usefixtures("one_thread")


def make(a, b, c, d, mode, dtype=torch.float32, device="cpu", r1=2, r2=2, seed=0):
    """Factor kwargs for kron_linear (W1 / W2 full or low-rank per `mode`)."""
    g = torch.Generator().manual_seed(seed + 97 * a + 31 * b + 7 * c + d)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    m1, m2 = mode.split("/")
    kw = {}
    if m1 == "full":
        kw["w1"] = rnd(a, c)
    else:
        kw["w1_a"], kw["w1_b"] = rnd(a, r1), rnd(r1, c)
    if m2 == "full":
        kw["w2"] = rnd(b, d)
    else:
        kw["w2_a"], kw["w2_b"] = rnd(b, r2), rnd(r2, d)
    return kw


def _check_fwd_bwd(x, kw, scale, dtype):
    """Forward and all gradients of ops.kron_linear vs the float64 reference on the same values."""
    check_vs_reference(lambda x, **w: ops.kron_linear(x, scale=scale, **w),
                       lambda x, **w: ref.kron_linear(x, scale=scale, **w), {"x": x, **kw}, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_kron_linear_vs_reference(dtype, mode):
    for a, b, c, d in FACTORS:
        for n in NS:
            kw = make(a, b, c, d, mode, dtype)
            _check_fwd_bwd(rand_x(n, c * d, dtype), kw, 0.75, dtype)


@pytest.mark.parametrize("r2", [1, 2, 6])
def test_kron_low_rank_w2_both_paths(r2):
    # b = d = 7: rank 1, 2 go through P = X w2_b^T (r (b + d) < b d), rank 6 forms W2 first.
    for mode in ("full/low", "low/low"):
        kw = make(3, 7, 4, 7, mode, torch.float64, r2=r2, r1=3)
        _check_fwd_bwd(rand_x(9, 28, torch.float64), kw, 1.5, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kron_leading_dims_and_noncontiguous(dtype):
    a, b, c, d = 3, 5, 4, 6
    kw = make(a, b, c, d, "low/full", dtype)
    base = rand_x(2 * 3 * 4, 2 * c * d, dtype).reshape(2, 3, 4, 2 * c * d)
    x = base[..., ::2]  # strided last dim
    assert not x.is_contiguous()
    y = ops.kron_linear(x, scale=0.5, **kw)
    assert y.shape == (2, 3, 4, a * b)
    close(y, ref.kron_linear(x.double(), scale=0.5, **{k: v.double() for k, v in kw.items()}), dtype, "y")
    _check_fwd_bwd(x.reshape(-1, c * d), kw, 0.5, dtype)
    # a transposed (column-major) 2-D x
    xt = rand_x(c * d, 7, dtype).t()
    _check_fwd_bwd(xt, kw, 0.5, dtype)
    # zero rows with leading dims
    y0 = ops.kron_linear(torch.zeros(0, 3, c * d, dtype=dtype), scale=0.5, **kw)
    assert y0.shape == (0, 3, a * b)


def test_kron_partial_requires_grad():
    kw = make(2, 3, 5, 7, "low/low", torch.float64)
    kw["w1_a"].requires_grad_(True)
    x = rand_x(4, 35, torch.float64)  # no grad for x
    y = ops.kron_linear(x, scale=2.0, **kw)
    y.sum().backward()
    kw64 = {k: v.detach().clone().requires_grad_(k == "w1_a") for k, v in kw.items()}
    ref.kron_linear(x, scale=2.0, **kw64).sum().backward()
    close(kw["w1_a"].grad, kw64["w1_a"].grad, torch.float64)
    assert kw["w1_b"].grad is None and kw["w2_a"].grad is None


@pytest.mark.parametrize("mode", MODES)
def test_kron_gradcheck(mode):
    kw = make(2, 3, 3, 2, mode, torch.float64, r2=1)
    names = list(kw)
    x = rand_x(4, 6, torch.float64).requires_grad_(True)
    args = [x] + [kw[k].requires_grad_(True) for k in names]

    def f(x, *ws):
        return ops.kron_linear(x, scale=0.7, **dict(zip(names, ws)))

    assert torch.autograd.gradcheck(f, args)


def _op_args(mode, dtype=torch.float32, device="cpu", n=5):
    kw = make(3, 2, 4, 5, mode, dtype, device, r2=1)
    x = rand_x(n, 20, dtype, device)
    full = [kw.get(k) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")]
    return x, full


@pytest.mark.parametrize("mode", MODES)
def test_kron_opcheck(mode):
    x, ws = _op_args(mode)
    ws = [None if w is None else w.requires_grad_(True) for w in ws]
    torch.library.opcheck(fp.kron_forward.default, (x.requires_grad_(True), *ws, 0.5))
    g = rand_x(5, 6, torch.float32, seed=3)
    torch.library.opcheck(fp.kron_backward.default, (g, x.detach(), *[None if w is None else w.detach() for w in ws], 0.5))


class _TinyLoKr(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(2, 4))
        self.w2_a = torch.nn.Parameter(torch.randn(3, 1))
        self.w2_b = torch.nn.Parameter(torch.randn(1, 5))

    def forward(self, x):
        return torch.relu(ops.kron_linear(x, self.w1, w2_a=self.w2_a, w2_b=self.w2_b, scale=0.5)) * 2


def test_kron_torch_compile_fullgraph():
    mod = _TinyLoKr()
    x = torch.randn(3, 7, 20, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    y_c = compiled(x)
    y_e = mod(x)
    torch.testing.assert_close(y_c, y_e)
    g_c = torch.autograd.grad(y_c.sum(), [x, mod.w1, mod.w2_a])
    g_e = torch.autograd.grad(y_e.sum(), [x, mod.w1, mod.w2_a])
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_kron_bad_inputs():
    x = torch.randn(4, 6)
    w1, w2 = torch.randn(2, 2), torch.randn(3, 3)
    with pytest.raises(ValueError, match="exactly one of 'w1'"):
        ops.kron_linear(x, w1, w2, w1_a=torch.randn(2, 1), w1_b=torch.randn(1, 2))
    with pytest.raises(ValueError, match="exactly one of 'w2'"):
        ops.kron_linear(x, w1)
    with pytest.raises(ValueError, match="give both 'w1_a' and 'w1_b'"):
        ops.kron_linear(x, w2=w2, w1_a=torch.randn(2, 1))
    with pytest.raises(ValueError, match="in_features must be"):
        ops.kron_linear(torch.randn(4, 7), w1, w2)
    with pytest.raises(ValueError, match="'w2_a' has rank 2"):
        ops.kron_linear(x, w1, w2_a=torch.randn(3, 2), w2_b=torch.randn(1, 3))
    with pytest.raises(TypeError, match="'w2' has dtype"):
        ops.kron_linear(x, w1, w2.double())
    with pytest.raises(ValueError, match="'w1' must be 2-D"):
        ops.kron_linear(x, torch.randn(2, 2, 1), w2)
    with pytest.raises(TypeError, match="floating-point"):
        ops.kron_linear(x.long(), w1.long(), w2.long())
    # the compiled op checks too (names every argument)
    with pytest.raises(RuntimeError, match="exactly one of 'w1'"):
        fp.kron_forward(x, None, None, None, w2, None, None, 1.0)
    with pytest.raises(RuntimeError, match="'w2' has dtype"):
        fp.kron_forward(x, w1, None, None, w2.double(), None, None, 1.0)
    with pytest.raises(RuntimeError, match="'grad_y' has size"):
        fp.kron_backward(torch.randn(4, 5), x, w1, None, None, w2, None, None, 1.0)


# ---- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_kron_vs_reference(dtype, mode):
    for a, b, c, d in FACTORS:
        for n in NS:
            kw = make(a, b, c, d, mode, dtype, "cuda")
            _check_fwd_bwd(rand_x(n, c * d, dtype, "cuda"), kw, 0.75, dtype)
    x = rand_x(40, 2 * 35, dtype, "cuda")[:, ::2]
    _check_fwd_bwd(x, make(2, 3, 5, 7, mode, dtype, "cuda"), 0.75, dtype)


@pytest.mark.cuda
def test_cuda_kron_gradcheck_opcheck():
    for mode in MODES:
        x, ws = _op_args(mode, torch.float64, "cuda")
        names = [k for k, w in zip(("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"), ws) if w is not None]
        args = [x.requires_grad_(True)] + [w.requires_grad_(True) for w in ws if w is not None]
        assert torch.autograd.gradcheck(lambda x, *t: ops.kron_linear(x, scale=0.7, **dict(zip(names, t))), args)
        xf, wf = _op_args(mode, torch.float32, "cuda")
        torch.library.opcheck(fp.kron_forward.default,
                              (xf.requires_grad_(True), *[None if w is None else w.requires_grad_(True) for w in wf], 0.5))


@pytest.mark.parametrize("mode", MODES)
def test_kron_row_blocks_on_threads(mode):
    # in = 1024: the CPU runs 16-row blocks split over threads, each accumulating its own factor
    # gradients; the sum must match the reference (N = 100 leaves a partial last block).
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float64, torch.float32):
            kw = make(6, 5, 32, 32, mode, dtype, r1=3, r2=4)
            _check_fwd_bwd(rand_x(100, 1024, dtype), kw, 0.5, dtype)
    finally:
        torch.set_num_threads(before)
