"""Tests of the fused NF4 matmul (nf4_linear, nf4_linear_grad_input, qlora_forward/backward) on the
CPU: against the reference (x W^T summed in fp32 from the fp32-dequantised weight), against the
LoRA ops on the dequantised weight, and LinearNF4 against bitsandbytes' Linear4bit."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from fastpeft import ops
from fastpeft import reference as ref
from fastpeft.nn import LinearNF4
from fastpeft.quant.nf4 import dequantize_nf4, quantize_nf4

fp = torch.ops.fastpeft
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The one-pass (few rows) kernels serve N <= 32 (forward) / 16 (grad_input), bands + GEMM above.
ROWS = [0, 1, 2, 3, 7, 16, 33, 200]
# in % 128 == 0 takes the AVX-512 kernels; the others the portable ones (rows starting mid-byte,
# blocks straddling rows).
SHAPES = [(40, 256), (33, 65), (7, 4097), (130, 128)]


pytestmark = pytest.mark.usefixtures("one_thread")  # test_multithreaded_matches_single uses two


def tol(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


def nf4(out_f, in_f, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    packed, state = quantize_nf4(w, blocksize, double_quant)
    return packed, state, dequantize_nf4(packed, state, torch.float32)


def qargs(state):
    return (state.absmax, state.nested_absmax, state.nested_code, state.offset)


def close(got, expect, dtype, what=""):
    assert got.shape == expect.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(expect.shape)}"
    if expect.numel() == 0:
        return
    scale = max(expect.abs().max().item(), 1e-3)
    err = (got.float() - expect.float()).abs().max().item() if got.numel() else 0.0
    assert err <= tol(dtype) * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


# ---- the ops against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_linear_and_grad_input_match_reference(dtype, double_quant):
    for (out_f, in_f), bs in zip(SHAPES, [64, 32, 4096, 128]):
        packed, state, w = nf4(out_f, in_f, bs, double_quant)
        bias = torch.randn(out_f).to(dtype)
        for n in ROWS:
            x = torch.randn(n, in_f).to(dtype)
            for b in (None, bias):
                y = fp.nf4_linear(x, packed, *qargs(state), bs, out_f, b)
                assert y.dtype == dtype and y.shape == (n, out_f)
                expect = F.linear(x.float(), w, None if b is None else b.float())
                close(y, expect, dtype, f"nf4_linear {out_f}x{in_f} bs={bs} N={n}")
            g = torch.randn(n, out_f).to(dtype)
            gx = fp.nf4_linear_grad_input(g, packed, *qargs(state), bs, in_f)
            assert gx.dtype == dtype and gx.shape == (n, in_f)
            close(gx, g.float() @ w, dtype, f"grad_input {out_f}x{in_f} bs={bs} N={n}")
            # the reference spec agrees
            close(ref.nf4_linear(x, packed, *qargs(state), bs, out_f, bias),
                  F.linear(x.float(), w, bias.float()), dtype, "reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_larger_than_one_band(dtype):
    # above 1 MiB of dequantised weight the many-row path's bands are sized by the cache, not the thread count
    for out_f, in_f in ((1100, 256), (520, 1031)):  # streams-ordered bands, and the portable decode
        if out_f * in_f * torch.finfo(dtype).bits // 8 <= 1 << 20:
            out_f *= 2
        packed, state, w = nf4(out_f, in_f, 64, True)
        bias = torch.randn(out_f).to(dtype)
        x = torch.randn(40, in_f).to(dtype)
        y = fp.nf4_linear(x, packed, *qargs(state), 64, out_f, bias)
        close(y, F.linear(x.float(), w, bias.float()), dtype, f"band nf4_linear {out_f}x{in_f}")
        g = torch.randn(40, out_f).to(dtype)
        gx = fp.nf4_linear_grad_input(g, packed, *qargs(state), 64, in_f)
        close(gx, g.float() @ w, dtype, f"band grad_input {out_f}x{in_f}")


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_blocksizes(blocksize):
    for out_f, in_f in [(12, 256), (5, 99)]:
        packed, state, w = nf4(out_f, in_f, blocksize, True)
        for n in (1, 20):
            x = torch.randn(n, in_f).to(torch.bfloat16)
            close(fp.nf4_linear(x, packed, *qargs(state), blocksize, out_f, None), x.float() @ w.t(),
                  torch.bfloat16, f"bs={blocksize}")
            g = torch.randn(n, out_f)
            close(fp.nf4_linear_grad_input(g, packed, *qargs(state), blocksize, in_f), g @ w, torch.float32)


def test_edge_shapes():
    for out_f, in_f in [(0, 128), (9, 0), (1, 1), (3, 3)]:
        packed, state, w = nf4(out_f, in_f, 64, False) if out_f * in_f else (None, None, None)
        if packed is None:
            packed = torch.empty(0, 1, dtype=torch.uint8)
            absmax = torch.empty(0)
            state = type("S", (), {"absmax": absmax, "nested_absmax": None, "nested_code": None, "offset": None})
            w = torch.zeros(out_f, in_f)
        x = torch.randn(4, in_f)
        b = torch.randn(out_f)
        close(fp.nf4_linear(x, packed, *qargs(state), 64, out_f, b), F.linear(x, w, b), torch.float32, "edge")
        g = torch.randn(4, out_f)
        close(fp.nf4_linear_grad_input(g, packed, *qargs(state), 64, in_f), g @ w, torch.float32, "edge grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_and_leading_dims(dtype):
    packed, state, w = nf4(48, 256)
    base = torch.randn(2, 6, 512).to(dtype)
    x = base[..., ::2]  # non-contiguous, 3-D
    for n_rows in (1, 3, 6):  # few rows and (with 12 rows total) the band path through reshape
        xs = x[:, :n_rows]
        y = ops.nf4_linear(xs, packed, state.absmax, 64, 48, **{k: v for k, v in state.kernel_args().items()
                                                                    if k != "absmax"})
        assert y.shape == (2, n_rows, 48)
        close(y, xs.float() @ w.t(), dtype, "non-contiguous")
    xt = torch.randn(256, 40).to(dtype).t()  # transposed: stride (1, 40)
    close(fp.nf4_linear(xt, packed, *qargs(state), 64, 48, None), xt.float() @ w.t(), dtype, "transposed x")
    gt = torch.randn(48, 40).to(dtype).t()
    close(fp.nf4_linear_grad_input(gt, packed, *qargs(state), 64, 256), gt.float() @ w, dtype, "transposed g")


def test_multithreaded_matches_single():
    torch.set_num_threads(2)
    try:
        for out_f, in_f in [(300, 512), (77, 4097)]:
            packed, state, w = nf4(out_f, in_f)
            for n in (1, 5, 40):
                x = torch.randn(n, in_f).to(torch.bfloat16)
                close(fp.nf4_linear(x, packed, *qargs(state), 64, out_f, None), x.float() @ w.t(), torch.bfloat16,
                      f"threads N={n}")
                g = torch.randn(n, out_f)
                close(fp.nf4_linear_grad_input(g, packed, *qargs(state), 64, in_f), g @ w, torch.float32,
                      f"threads grad N={n}")
                # autograd through the wrapper: the worker threads run ATen ops below autograd too
                xg = x.float().requires_grad_()
                b = torch.randn(out_f, requires_grad=True)
                y = ops.nf4_linear(xg, packed, state.absmax, 64, out_f, b, nested_absmax=state.nested_absmax,
                                   nested_code=state.nested_code, offset=state.offset)
                y.backward(g)
                close(y, F.linear(x.float(), w, b), torch.float32, f"threads autograd N={n}")
                close(xg.grad, g @ w, torch.float32, f"threads autograd grad N={n}")
    finally:
        torch.set_num_threads(1)


# ---- autograd, opcheck, compile ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Input #")  # gradcheck in fp32 (the NF4 ops have no float64)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_autograd_matches_reference(dtype):
    packed, state, w = nf4(24, 128)
    for n in (2, 40):
        x = torch.randn(3, n, 128).to(dtype).requires_grad_()
        b = torch.randn(24).to(dtype).requires_grad_()
        y = ops.nf4_linear(x, packed, state.absmax, 64, 24, b, nested_absmax=state.nested_absmax,
                           nested_code=state.nested_code, offset=state.offset)
        gy = torch.randn_like(y)
        gx, gb = torch.autograd.grad(y, (x, b), gy)
        close(gx, gy.float() @ w, dtype, "grad x")
        close(gb, gy.float().sum((0, 1)), dtype, "grad bias")
    # fp32 gradcheck of the op (loose: the NF4 ops have no float64)
    x = torch.randn(3, 128, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    f = lambda x, b: fp.nf4_linear(x, packed, *qargs(state), 64, 24, b)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, b), eps=1e-2, atol=1e-2, rtol=1e-2)
    g = torch.randn(3, 24, requires_grad=True)
    fg = lambda g: fp.nf4_linear_grad_input(g, packed, *qargs(state), 64, 128)  # noqa: E731
    assert torch.autograd.gradcheck(fg, (g,), eps=1e-2, atol=1e-2, rtol=1e-2)


def _opcheck_cases():
    packed, state, _ = nf4(24, 128)
    p2, s2, _ = nf4(5, 33, 32, False)
    x = torch.randn(3, 128)
    A, B = torch.randn(4, 128) * 0.1, torch.randn(24, 4) * 0.1
    seed = ops.new_dropout_seed()
    y, u = fp.qlora_forward(x, packed, *qargs(state), 64, torch.randn(24), A, B, 2.0, 0.1, seed)
    return {
        "nf4_linear": (fp.nf4_linear.default, (x.requires_grad_(), packed, *qargs(state), 64, 24, torch.randn(24))),
        "nf4_linear_odd": (fp.nf4_linear.default, (torch.randn(2, 33).bfloat16(), p2, *qargs(s2), 32, 5, None)),
        "nf4_linear_grad_input": (fp.nf4_linear_grad_input.default, (torch.randn(3, 24), packed, *qargs(state), 64, 128)),
        "qlora_forward": (fp.qlora_forward.default,
                          (torch.randn(3, 128), packed, *qargs(state), 64, torch.randn(24), A.clone().requires_grad_(),
                           B.clone().requires_grad_(), 2.0, 0.1, seed)),
        "qlora_backward": (fp.qlora_backward.default,
                           (torch.randn(3, 24), x.detach(), packed, *qargs(state), 64, A, B, u, 2.0, 0.1, seed, True)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_compile_linear_nf4_fullgraph():
    torch._dynamo.reset()
    layer = LinearNF4.from_linear(torch.nn.Linear(128, 24), blocksize=64, compute_dtype=torch.bfloat16)
    x = torch.randn(5, 128)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


# ---- qlora ops vs the lora ops on the dequantised weight -----------------------------------------


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_matches_lora_on_dequantised_weight(dtype, dropout_p):
    for out_f, in_f, n in [(48, 256, 3), (48, 256, 40), (33, 65, 7)]:
        packed, state, w = nf4(out_f, in_f)
        W = w.to(dtype)
        x = torch.randn(n, in_f).to(dtype)
        b = torch.randn(out_f).to(dtype)
        A, B = (torch.randn(4, in_f) * 0.1).to(dtype), (torch.randn(out_f, 4) * 0.1).to(dtype)
        seed = ops.new_dropout_seed()
        y, u = fp.qlora_forward(x, packed, *qargs(state), 64, b, A, B, 1.5, dropout_p, seed)
        # lora on the fp32 weight (fp32 math) is the spec; u is exactly lora's (same dropout mask)
        yl, ul = fp.lora_forward(x.float(), w, b.float(), A.float(), B.float(), 1.5, dropout_p, seed)
        close(y, yl, dtype, "qlora y")
        close(u, ul, dtype, "qlora u")
        yk, uk = fp.lora_forward(x, W, b, A, B, 1.5, dropout_p, seed)
        assert torch.equal(u, uk)
        g = torch.randn(n, out_f).to(dtype)
        for need in (True, False):
            gx, gA, gB = fp.qlora_backward(g, x, packed, *qargs(state), 64, A, B, u, 1.5, dropout_p, seed, need)
            lx, lA, lB = fp.lora_backward(g.float(), x.float(), w, A.float(), B.float(), ul, 1.5, dropout_p, seed,
                                          need)
            if need:
                close(gx, lx, dtype, "qlora grad_x")
                lx_full = lx
            else:
                assert gx.numel() == 0
            close(gA, lA, dtype, "qlora grad_A")
            close(gB, lB, dtype, "qlora grad_B")
        # and the reference spec
        ry, ru = ref.qlora_forward(x, packed, *qargs(state), 64, b, A, B, 1.5, dropout_p, seed)
        close(ry, yl, dtype, "reference qlora y")
        rx, rA, rB = ref.qlora_backward(g, x, packed, *qargs(state), 64, A, B, u, 1.5, dropout_p, seed)
        close(rx, lx_full, dtype, "reference qlora grad_x")


def test_qlora_linear_autograd():
    packed, state, w = nf4(48, 256)
    x = torch.randn(2, 5, 256, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    A = (torch.randn(4, 256) * 0.1).requires_grad_()
    B = (torch.randn(48, 4) * 0.1).requires_grad_()
    seed = ops.new_dropout_seed()
    y = ops.qlora_linear(x, packed, state.absmax, 64, 48, b, A, B, 2.0, 0.1, seed, nested_absmax=state.nested_absmax,
                         nested_code=state.nested_code, offset=state.offset)
    y2 = ref.lora_linear(x, w, b, A, B, 2.0, 0.1, seed)
    close(y, y2, torch.float32, "qlora_linear")
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, b, A, B), gy)
    want = torch.autograd.grad(y2, (x, b, A, B), gy)
    for a, e, name in zip(got, want, ("x", "bias", "lora_A", "lora_B")):
        close(a, e, torch.float32, f"grad {name}")


# ---- LinearNF4 vs bitsandbytes -------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_nf4_forward_backward_matches_bnb(dtype, compute_dtype):
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 40).to(dtype)
    ours = LinearNF4.from_linear(lin, blocksize=64, compute_dtype=compute_dtype)
    theirs = bnb.nn.Linear4bit(256, 40, compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                               device="cpu")
    theirs.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                      quant_type="nf4", blocksize=64)
    theirs.bias = torch.nn.Parameter(lin.bias.data.clone())
    theirs = theirs.to("cpu").train()
    assert torch.equal(ours.weight.data, theirs.weight.data)  # the same bytes
    cdt = compute_dtype or dtype
    for n in (1, 7, 40):
        x = torch.randn(n, 256).to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert ya.dtype == yb.dtype == dtype
        close(ya, yb, cdt, f"LinearNF4 forward N={n}")
        gy = torch.randn_like(ya)
        ya.backward(gy)
        yb.backward(gy)
        close(xa.grad, xb.grad, cdt, f"LinearNF4 grad_x N={n}")
        close(ours.bias.grad, theirs.bias.grad, cdt, "LinearNF4 grad bias")
        ours.bias.grad = theirs.bias.grad = None
    assert ours.weight.grad is None


def test_linear_nf4_no_full_dequantisation(monkeypatch):
    layer = LinearNF4.from_linear(torch.nn.Linear(128, 24), blocksize=64)

    def boom(*a, **k):
        raise AssertionError("LinearNF4 dequantised its whole weight")

    monkeypatch.setattr(ops, "nf4_dequantize", boom)
    monkeypatch.setattr(fp, "nf4_dequantize", boom, raising=False)
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape


def test_kernel_args():
    _, state, _ = nf4(8, 64, 64, True)
    kw = state.kernel_args()
    assert set(kw) == {"absmax", "nested_absmax", "nested_code", "offset"} and kw["absmax"].dtype == torch.uint8
    _, state, _ = nf4(8, 64, 64, False)
    kw = state.kernel_args()
    assert kw["nested_absmax"] is None and kw["offset"] is None and kw["absmax"].dtype == torch.float32


# ---- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    packed, state, _ = nf4(24, 128)
    x = torch.randn(3, 128)
    kw = dict(nested_absmax=state.nested_absmax, nested_code=state.nested_code, offset=state.offset)
    with pytest.raises(TypeError, match="'x' must be float32, bfloat16 or float16"):
        ops.nf4_linear(x.double(), packed, state.absmax, 64, 24, **kw)
    with pytest.raises(ValueError, match="'packed' has 1536 bytes"):
        ops.nf4_linear(torch.randn(3, 100), packed, state.absmax, 64, 24, **kw)
    with pytest.raises(ValueError, match="'packed' has 1536 bytes"):
        ops.nf4_linear(x, packed, state.absmax, 64, 25, **kw)
    with pytest.raises(ValueError, match="give all three or none"):
        ops.nf4_linear(x, packed, state.absmax, 64, 24, nested_absmax=state.nested_absmax)
    with pytest.raises(TypeError, match="'bias' has dtype"):
        ops.nf4_linear(x, packed, state.absmax, 64, 24, torch.randn(24).bfloat16(), **kw)
    with pytest.raises(ValueError, match="'bias' has 23 elements"):
        ops.nf4_linear(x, packed, state.absmax, 64, 24, torch.randn(23), **kw)
    with pytest.raises(TypeError, match="'packed' must be uint8"):
        ops.nf4_linear(x, packed.float(), state.absmax, 64, 24, **kw)
    with pytest.raises(ValueError, match="'blocksize'"):
        ops.nf4_linear(x, packed, state.absmax, 48, 24, **kw)
    with pytest.raises(ValueError, match="'lora_B' has out_features"):
        ops.qlora_linear(x, packed, state.absmax, 64, 24, None, torch.randn(4, 128), torch.randn(23, 4), 1.0, **kw)
    with pytest.raises(ValueError, match="is on meta but 'x' is on cpu"):
        ops.nf4_linear(x, packed.to("meta"), state.absmax, 64, 24, **kw)
    # the C++ checks name the argument too
    with pytest.raises(RuntimeError, match="'x' must be float32, bfloat16 or float16"):
        fp.nf4_linear(x.double(), packed, *qargs(state), 64, 24, None)
    with pytest.raises(RuntimeError, match="'packed' has 1536 bytes"):
        fp.nf4_linear(x, packed, *qargs(state), 64, 23, None)
    with pytest.raises(RuntimeError, match="give all three or none"):
        fp.nf4_linear(x, packed, state.absmax, state.nested_absmax, None, None, 64, 24, None)
    with pytest.raises(RuntimeError, match="'absmax' must be uint8"):
        fp.nf4_linear(x, packed, state.absmax.float(), state.nested_absmax, state.nested_code, state.offset, 64, 24,
                      None)
    with pytest.raises(RuntimeError, match="'bias' has size 3"):
        fp.nf4_linear(x, packed, *qargs(state), 64, 24, torch.randn(3))
    with pytest.raises((RuntimeError, ValueError), match="'packed' is on meta"):  # dispatched to the fake
        fp.nf4_linear(x, packed.to("meta"), *qargs(state), 64, 24, None)
    with pytest.raises(RuntimeError, match="'grad_y' must be 2-D"):
        fp.nf4_linear_grad_input(torch.randn(24), packed, *qargs(state), 64, 128)
    with pytest.raises(RuntimeError, match="'lora_A' has size"):
        fp.qlora_forward(x, packed, *qargs(state), 64, None, torch.randn(4, 100), torch.randn(24, 4), 1.0, 0.0,
                         torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize("double_quant", [False, True])
def test_identity_input_gives_the_dequantised_weight_exactly(double_quant):
    # one nonzero product per output: every path must decode code * absmax exactly (fp32)
    for bs in (32, 64, 256):
        packed, state, w = nf4(96, 256, bs, double_quant)
        for n in (1, 4, 256):  # one-pass kernels and the band path
            x = torch.eye(256)[:n]
            y = fp.nf4_linear(x, packed, *qargs(state), bs, 96, None)
            assert torch.equal(y, w.t()[:n]), (bs, n)


def test_cpu_kernels_registered():
    # (tests/test_build.py's OPS list can take these once the CUDA nf4_linear kernels are merged)
    for op in ("nf4_linear", "nf4_linear_grad_input", "qlora_forward", "qlora_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastpeft::{op}", "CPU"), op
