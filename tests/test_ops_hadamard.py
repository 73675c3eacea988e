"""Tests of the hadamard kernel family (LoHa): fastpeft.ops.hadamard_delta and hadamard_linear
(both strategies forced, and auto) against fastpeft.reference, on CPU and (marked) CUDA."""
from __future__ import annotations

import pytest
import torch

from fastpeft import ops
from fastpeft import reference as ref

from _op_testing import DTYPES, NS, check_vs_reference, close, rand_x

fp = torch.ops.fastpeft

# (out, in, r1, r2); the last has r1 + r2 > 64 (the GEMM fallback of the fused pass).
SHAPES = [(5, 7, 2, 3), (1, 1, 1, 1), (33, 17, 4, 4), (8, 65, 8, 1), (6, 300, 3, 5), (9, 11, 35, 35)]
STRATEGIES = {"auto": 0, "materialize": 1, "facesplit": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


def make(out_f, in_f, r1, r2, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * out_f + 10 * in_f + r1 + 7 * r2)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)

    return [rnd(out_f, r1, s=r1**-0.5), rnd(r1, in_f), rnd(out_f, r2, s=r2**-0.5), rnd(r2, in_f)]


@pytest.fixture(params=list(STRATEGIES))
def strategy(request, monkeypatch):
    monkeypatch.setattr(ops, "_HADAMARD_STRATEGY", STRATEGIES[request.param])
    return request.param


def _check_linear(x, ws, scale, dtype):
    """Forward and all gradients of ops.hadamard_linear vs the float64 reference on the same values."""
    names = ("w1_a", "w1_b", "w2_a", "w2_b")
    check_vs_reference(lambda x, **w: ops.hadamard_linear(x, *(w[k] for k in names), scale=scale),
                       lambda x, **w: ref.hadamard_linear(x, *(w[k] for k in names), scale=scale),
                       {"x": x, **dict(zip(names, ws))}, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hadamard_delta_vs_reference(dtype):
    for shape in SHAPES:
        ws = make(*shape, dtype)
        wss = [w.clone().requires_grad_(True) for w in ws]
        d = ops.hadamard_delta(*wss, scale=1.25)
        w64 = [w.double().requires_grad_(True) for w in ws]
        d64 = ref.hadamard_delta(*w64, scale=1.25)
        assert d.dtype == dtype and d.shape == (shape[0], shape[1])
        close(d, d64, dtype, f"delta {shape}")
        g = torch.randn(d.shape, dtype=torch.float64).to(dtype)
        d.backward(g)
        d64.backward(g.double())
        for name, a, b in zip(("w1_a", "w1_b", "w2_a", "w2_b"), wss, w64):
            close(a.grad, b.grad, dtype, f"grad {name} {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_hadamard_linear_vs_reference(dtype, strategy):
    for shape in SHAPES:
        for n in NS:
            _check_linear(rand_x(n, shape[1], dtype), make(*shape, dtype), 0.8, dtype)


def test_hadamard_strategies_agree():
    # The two strategies compute the same thing (float64, one larger shape).
    x = rand_x(50, 96, torch.float64)
    ws = make(80, 96, 4, 6, torch.float64)
    g = rand_x(50, 80, torch.float64, seed=5)
    outs = []
    for s in (1, 2):
        y = fp.hadamard_linear_forward(x, *ws, 0.6, s)
        grads = fp.hadamard_linear_backward(g, x, *ws, 0.6, s)
        outs.append((y, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_leading_dims_and_noncontiguous(dtype, strategy):
    ws = make(12, 20, 3, 2, dtype)
    x = rand_x(24, 40, dtype).reshape(2, 3, 4, 40)[..., ::2]
    assert not x.is_contiguous()
    y = ops.hadamard_linear(x, *ws, scale=0.5)
    assert y.shape == (2, 3, 4, 12)
    close(y, ref.hadamard_linear(x.double(), *[w.double() for w in ws], scale=0.5), dtype, "y")
    _check_linear(x.reshape(-1, 20), ws, 0.5, dtype)
    _check_linear(rand_x(20, 9, dtype).t(), ws, 0.5, dtype)  # column-major x
    assert ops.hadamard_linear(torch.zeros(0, 5, 20, dtype=dtype), *ws).shape == (0, 5, 12)


@pytest.mark.parametrize("strategy_id", [1, 2])
def test_hadamard_gradcheck(strategy_id, monkeypatch):
    monkeypatch.setattr(ops, "_HADAMARD_STRATEGY", strategy_id)
    ws = [w.requires_grad_(True) for w in make(4, 5, 2, 3, torch.float64)]
    x = rand_x(3, 5, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, *w: ops.hadamard_linear(x, *w, scale=0.9), [x] + ws)
    assert torch.autograd.gradcheck(lambda *w: ops.hadamard_delta(*w, scale=0.9), ws)


def test_hadamard_opcheck():
    ws = [w.requires_grad_(True) for w in make(6, 7, 2, 3)]
    x = rand_x(5, 7, torch.float32).requires_grad_(True)
    torch.library.opcheck(fp.hadamard_delta.default, (*ws, 0.5))
    for s in (0, 1, 2):
        torch.library.opcheck(fp.hadamard_linear_forward.default, (x, *ws, 0.5, s))
    wd = [w.detach() for w in ws]
    torch.library.opcheck(fp.hadamard_delta_backward.default, (torch.randn(6, 7), *wd, 0.5))
    for s in (1, 2):
        torch.library.opcheck(fp.hadamard_linear_backward.default, (torch.randn(5, 6), x.detach(), *wd, 0.5, s))


class _TinyLoHa(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ws = torch.nn.ParameterList([torch.nn.Parameter(w) for w in make(6, 8, 2, 2)])

    def forward(self, x):
        d = ops.hadamard_delta(*self.ws, scale=0.5)
        return ops.hadamard_linear(x, *self.ws, scale=0.5) + x[..., :6] @ d[:, :6].t()


def test_hadamard_torch_compile_fullgraph():
    mod = _TinyLoHa()
    x = torch.randn(2, 5, 8, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    y_c, y_e = compiled(x), mod(x)
    torch.testing.assert_close(y_c, y_e)
    params = [x] + list(mod.ws)
    for a, b in zip(torch.autograd.grad(y_c.sum(), params), torch.autograd.grad(y_e.sum(), params)):
        torch.testing.assert_close(a, b)


def test_hadamard_bad_inputs():
    w1a, w1b, w2a, w2b = make(6, 7, 2, 3)
    x = torch.randn(4, 7)
    with pytest.raises(ValueError, match="'w1_b' has rank 3"):
        ops.hadamard_delta(w1a, torch.randn(3, 7), w2a, w2b)
    with pytest.raises(ValueError, match="'w2_a' has out_features 5"):
        ops.hadamard_delta(w1a, w1b, torch.randn(5, 3), w2b)
    with pytest.raises(ValueError, match="'w2_b' has in_features 8"):
        ops.hadamard_delta(w1a, w1b, w2a, torch.randn(3, 8))
    with pytest.raises(TypeError, match="'w2_b' has dtype"):
        ops.hadamard_delta(w1a, w1b, w2a, w2b.double())
    with pytest.raises(ValueError, match="'x' has last dim 6"):
        ops.hadamard_linear(torch.randn(4, 6), w1a, w1b, w2a, w2b)
    with pytest.raises(TypeError, match="'w1_a' has dtype"):
        ops.hadamard_linear(x.double(), w1a, w1b, w2a, w2b)
    with pytest.raises(ValueError, match="'w1_a' must be 2-D"):
        ops.hadamard_delta(w1a[0], w1b, w2a, w2b)
    with pytest.raises(TypeError, match="'scale' must be a float"):
        ops.hadamard_delta(w1a, w1b, w2a, w2b, scale="1")
    with pytest.raises(ValueError, match="FASTPEFT_HADAMARD_STRATEGY"):
        ops._parse_hadamard_strategy("fast")
    # the compiled ops check too
    with pytest.raises(RuntimeError, match="'w2_b' has size 8"):
        fp.hadamard_delta(w1a, w1b, w2a, torch.randn(3, 8), 1.0)
    with pytest.raises(RuntimeError, match="'x' has size 6"):
        fp.hadamard_linear_forward(torch.randn(4, 6), w1a, w1b, w2a, w2b, 1.0, 0)
    with pytest.raises(RuntimeError, match="'strategy' must be"):
        fp.hadamard_linear_forward(x, w1a, w1b, w2a, w2b, 1.0, 3)
    with pytest.raises(RuntimeError, match="'grad' has size"):
        fp.hadamard_delta_backward(torch.randn(6, 8), w1a, w1b, w2a, w2b, 1.0)


# ---- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_hadamard_vs_reference(dtype, strategy):
    for shape in SHAPES:
        ws = make(*shape, dtype, "cuda")
        close(ops.hadamard_delta(*ws, scale=1.25), ref.hadamard_delta(*[w.double() for w in ws], scale=1.25),
              dtype, f"delta {shape}")
        for n in NS:
            _check_linear(rand_x(n, shape[1], dtype, "cuda"), ws, 0.8, dtype)
    ws = make(12, 20, 3, 2, dtype, "cuda")
    _check_linear(rand_x(30, 40, dtype, "cuda")[:, ::2], ws, 0.5, dtype)


@pytest.mark.cuda
def test_cuda_hadamard_gradcheck_opcheck(monkeypatch):
    for s in (1, 2):
        monkeypatch.setattr(ops, "_HADAMARD_STRATEGY", s)
        ws = [w.requires_grad_(True) for w in make(4, 5, 2, 3, torch.float64, "cuda")]
        x = rand_x(3, 5, torch.float64, "cuda").requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, *w: ops.hadamard_linear(x, *w, scale=0.9), [x] + ws)
        assert torch.autograd.gradcheck(lambda *w: ops.hadamard_delta(*w, scale=0.9), ws)
        wf = [w.requires_grad_(True) for w in make(6, 7, 2, 3, torch.float32, "cuda")]
        xf = rand_x(5, 7, torch.float32, "cuda").requires_grad_(True)
        torch.library.opcheck(fp.hadamard_linear_forward.default, (xf, *wf, 0.5, s))
        torch.library.opcheck(fp.hadamard_delta.default, (*wf, 0.5))
