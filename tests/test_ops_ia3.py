"""Tests of the ia3 kernel family (IA3): fastpeft.ops.ia3_linear (ia3_forward / ia3_backward)
against fastpeft.reference.ia3_linear (peft's unfused expression), on CPU and (marked) CUDA."""
from __future__ import annotations

import pytest
import torch

from fastpeft import ops
from fastpeft import reference as ref

from _op_testing import DTYPES, NS, check_vs_reference, close, rand_x

fp = torch.ops.fastpeft

# (in, out): odd, non-square, unit sizes.
SIZES = [(7, 5), (1, 1), (33, 17), (16, 40)]
MODES = [True, False]  # scale_input

pytestmark = pytest.mark.usefixtures("one_thread")


def make(in_f, out_f, dtype, scale_input, device="cpu", bias=True, scale_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * in_f + out_f)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt).to(device)

    w = rnd(out_f, in_f)
    b = rnd(out_f) if bias else None
    s = rnd(in_f if scale_input else out_f, dt=scale_dtype or dtype)
    return w, b, s


def _check(x, w, b, s, scale_input, dtype, train_bias=True, what=""):
    """Forward and the gradients of x, scale (and bias) vs the float64 reference; weight frozen."""
    tensors = {"x": x, "s": s}
    if b is not None and train_bias:
        tensors["b"] = b

    def fn(x, s, b=b):
        return ops.ia3_linear(x, w, b, s, scale_input)

    def rf(x, s, b=None if b is None else b.double()):
        return ref.ia3_linear(x, w.double(), b, s, scale_input)

    check_vs_reference(fn, rf, tensors, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_input", MODES)
@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
def test_ia3_linear_vs_reference(dtype, scale_input, bias):
    for in_f, out_f in SIZES:
        for n in NS:
            w, b, s = make(in_f, out_f, dtype, scale_input, bias=bias != "none")
            _check(rand_x(n, in_f, dtype), w, b, s, scale_input, dtype, bias == "trainable", f"{in_f}x{out_f} n={n}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_input", MODES)
def test_ia3_float32_scale_with_half_x(dtype, scale_input):
    # peft keeps IA3 vectors in float32 for bf16 models: the scaling is float32, rounded once.
    w, b, s = make(33, 17, dtype, scale_input, scale_dtype=torch.float32)
    x = rand_x(9, 33, dtype)
    _check(x, w, b, s, scale_input, dtype)
    # bitwise the same as peft's expression (same rounding points) in the forward
    xr = x.detach()
    y = ops.ia3_linear(xr, w, b, s, scale_input)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref.ia3_linear(xr, w, b, s, scale_input), atol=0, rtol=0)
    ys = ops.ia3_linear(xr, w, b, s.requires_grad_(True), scale_input)
    ys.sum().backward()
    assert s.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_input", MODES)
def test_ia3_leading_dims_and_noncontiguous(dtype, scale_input):
    in_f, out_f = 12, 7
    w, b, s = make(in_f, out_f, dtype, scale_input)
    base = rand_x(2 * 3 * 4, 2 * in_f, dtype).reshape(2, 3, 4, 2 * in_f)
    x = base[..., ::2]
    assert not x.is_contiguous()
    y = ops.ia3_linear(x, w, b, s, scale_input)
    assert y.shape == (2, 3, 4, out_f)
    close(y, ref.ia3_linear(x.double(), w.double(), b.double(), s.double(), scale_input), dtype, "y")
    _check(x.reshape(-1, in_f), w, b, s, scale_input, dtype)
    xt = rand_x(in_f, 9, dtype).t()  # column-major 2-D x
    _check(xt, w, b, s, scale_input, dtype)
    # gradients through leading dims
    xl = x.detach().clone().requires_grad_(True)
    ops.ia3_linear(xl, w, b, s, scale_input).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    ref.ia3_linear(x64, w.double(), b.double(), s.double(), scale_input).sum().backward()
    close(xl.grad, x64.grad, dtype, "grad x (leading dims)")
    y0 = ops.ia3_linear(torch.zeros(0, 3, in_f, dtype=dtype), w, b, s, scale_input)
    assert y0.shape == (0, 3, out_f)


@pytest.mark.parametrize("scale_input", MODES)
def test_ia3_weight_gets_no_grad_and_partial_requires_grad(scale_input):
    w, b, s = make(6, 4, torch.float64, scale_input)
    w.requires_grad_(True)
    s.requires_grad_(True)
    x = rand_x(5, 6, torch.float64)  # no grad for x
    ops.ia3_linear(x, w, b, s, scale_input).sum().backward()
    assert w.grad is None
    s64 = s.detach().clone().requires_grad_(True)
    ref.ia3_linear(x, w.detach(), b, s64, scale_input).sum().backward()
    close(s.grad, s64.grad, torch.float64, "grad scale")


@pytest.mark.parametrize("scale_input", MODES)
def test_ia3_saved_for_backward(scale_input):
    # input scaling keeps x only (never x * scale); output scaling keeps y0 = x W^T + b only.
    w, b, s = make(8, 5, torch.float32, scale_input)
    x = rand_x(6, 8, torch.float32).requires_grad_(True)
    s.requires_grad_(True)
    big = []  # full-size [N, *] tensors saved by the graph

    def pack(t):
        if t.dim() == 2 and t.shape[0] == 6:
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.ia3_linear(x, w, b, s, scale_input)
    assert len(big) == 1, [tuple(t.shape) for t in big]
    if scale_input:
        assert big[0].data_ptr() == x.data_ptr()
    else:
        close(big[0], torch.nn.functional.linear(x.detach(), w, b), torch.float32, "saved y0")
    y.sum().backward()
    assert x.grad is not None and s.grad is not None


@pytest.mark.parametrize("scale_input", MODES)
@pytest.mark.parametrize("bias", [False, True])
def test_ia3_gradcheck(scale_input, bias):
    w, b, s = make(5, 3, torch.float64, scale_input, bias=bias)
    x = rand_x(4, 5, torch.float64).requires_grad_(True)
    args = [x, s.requires_grad_(True)] + ([b.requires_grad_(True)] if bias else [])

    def f(x, s, *bb):
        return ops.ia3_linear(x, w, bb[0] if bb else None, s, scale_input)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("scale_input", MODES)
@pytest.mark.parametrize("scale_dtype", [None, torch.float32])
def test_ia3_opcheck(scale_input, scale_dtype):
    dtype = torch.bfloat16 if scale_dtype else torch.float32
    w, b, s = make(6, 4, dtype, scale_input, scale_dtype=scale_dtype)
    x = rand_x(5, 6, dtype)
    torch.library.opcheck(fp.ia3_forward.default, (x.requires_grad_(True), w, b.requires_grad_(True),
                                                   s.requires_grad_(True), scale_input))
    torch.library.opcheck(fp.ia3_forward.default, (x.detach(), w, None, s.detach(), scale_input))
    g = rand_x(5, 4, dtype, seed=3)
    saved = x.detach() if scale_input else torch.nn.functional.linear(x.detach(), w, b.detach())
    for ngx, ngb in ((True, True), (False, False)):
        torch.library.opcheck(fp.ia3_backward.default, (g, saved, w, s.detach(), scale_input, ngx, ngb))


class _TinyIA3(torch.nn.Module):
    def __init__(self, scale_input):
        super().__init__()
        self.base = torch.nn.Linear(6, 4)
        self.base.requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.rand(6 if scale_input else 4))
        self.scale_input = scale_input

    def forward(self, x):
        return torch.relu(ops.ia3_linear(x, self.base.weight, self.base.bias, self.scale, self.scale_input)) * 2


@pytest.mark.parametrize("scale_input", MODES)
def test_ia3_torch_compile_fullgraph(scale_input):
    mod = _TinyIA3(scale_input)
    x = torch.randn(3, 5, 6, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    y_c, y_e = compiled(x), mod(x)
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(torch.autograd.grad(y_c.sum(), [x, mod.scale]), torch.autograd.grad(y_e.sum(), [x, mod.scale])):
        torch.testing.assert_close(a, b)


def test_ia3_bad_inputs():
    x, w, b = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3)
    s_in, s_out = torch.rand(6), torch.rand(3)
    with pytest.raises(ValueError, match="'scale' has 3 elements but must have in_features"):
        ops.ia3_linear(x, w, b, s_out, True)
    with pytest.raises(ValueError, match="'scale' has 6 elements but must have out_features"):
        ops.ia3_linear(x, w, b, s_in, False)
    with pytest.raises(ValueError, match="'x' has last dim 5"):
        ops.ia3_linear(torch.randn(4, 5), w, b, s_in, True)
    with pytest.raises(ValueError, match="'bias' has 4 elements"):
        ops.ia3_linear(x, w, torch.randn(4), s_in, True)
    with pytest.raises(TypeError, match="'weight' has dtype"):
        ops.ia3_linear(x, w.double(), None, s_in, True)
    with pytest.raises(TypeError, match="'scale' must have x's dtype"):
        ops.ia3_linear(x, w, b, s_in.double(), True)
    with pytest.raises(TypeError, match="'scale' must have x's dtype"):
        ops.ia3_linear(x.bfloat16(), w.bfloat16(), None, s_in.half(), True)
    with pytest.raises(ValueError, match="'scale' must be 1-D"):
        ops.ia3_linear(x, w, b, s_in[None], True)
    with pytest.raises(ValueError, match="'weight' must be 2-D"):
        ops.ia3_linear(x, w[None], b, s_in, True)
    with pytest.raises(TypeError, match="'scale_input' must be a bool"):
        ops.ia3_linear(x, w, b, s_in, 1)
    with pytest.raises(TypeError, match="floating-point"):
        ops.ia3_linear(x.long(), w.long(), None, s_in, True)
    # the compiled op checks too (names every argument)
    with pytest.raises(RuntimeError, match="'scale' has size 3"):
        fp.ia3_forward(x, w, b, s_out, True)
    with pytest.raises(RuntimeError, match="'bias' has dtype"):
        fp.ia3_forward(x, w, b.double(), s_in, True)
    with pytest.raises(RuntimeError, match="'scale' must have x's dtype"):
        fp.ia3_forward(x, w, b, s_in.double(), True)
    with pytest.raises(RuntimeError, match="'x' has size 6"):
        fp.ia3_forward(x, torch.randn(3, 5), None, torch.rand(5), True)
    with pytest.raises(RuntimeError, match="'grad_y' has size"):
        fp.ia3_backward(torch.randn(4, 5), x, w, s_in, True)
    with pytest.raises(RuntimeError, match="'saved' has size"):
        fp.ia3_backward(torch.randn(4, 3), torch.randn(4, 3), w, s_in, True)


def test_ia3_threads():
    # many rows split over threads, each accumulating its own grad_scale partials
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for scale_input in MODES:
                w, b, s = make(96, 80, dtype, scale_input)
                _check(rand_x(1000, 96, dtype), w, b, s, scale_input, dtype)
    finally:
        torch.set_num_threads(before)


# ---- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_input", MODES)
def test_cuda_ia3_vs_reference(dtype, scale_input):
    for in_f, out_f in SIZES:
        for n in NS + [3000]:
            w, b, s = make(in_f, out_f, dtype, scale_input, "cuda")
            _check(rand_x(n, in_f, dtype, "cuda"), w, b, s, scale_input, dtype)
    w, b, s = make(35, 9, dtype, scale_input, "cuda", scale_dtype=torch.float32)
    _check(rand_x(40, 70, dtype, "cuda")[:, ::2], w, b, s, scale_input, dtype)


@pytest.mark.cuda
def test_cuda_ia3_gradcheck_opcheck():
    for scale_input in MODES:
        w, b, s = make(5, 3, torch.float64, scale_input, "cuda")
        x = rand_x(4, 5, torch.float64, "cuda").requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, s, b: ops.ia3_linear(x, w, b, s, scale_input),
                                        [x, s.requires_grad_(True), b.requires_grad_(True)])
        w, b, s = make(6, 4, torch.float32, scale_input, "cuda")
        torch.library.opcheck(fp.ia3_forward.default, (rand_x(5, 6, torch.float32, "cuda").requires_grad_(True), w,
                                                       b.requires_grad_(True), s.requires_grad_(True), scale_input))
