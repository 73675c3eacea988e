"""Tests of the lora kernel family: seeded_dropout, lora_forward/backward, dora_weight_norm,
dora_forward/backward and their wrappers in fastpeft.ops, against fastpeft.reference (and peft)."""
from __future__ import annotations

import random

import pytest
import torch

from fastpeft import ops
from fastpeft import reference as ref

fp = torch.ops.fastpeft

TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, in, out, r)
SHAPES = [(0, 33, 65, 3), (1, 33, 65, 1), (7, 33, 65, 3), (129, 33, 65, 16), (37, 64, 48, 16)]


def close(actual, expected, dtype, what=""):
    tol = TOL[dtype]
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def make(n, i, o, r, dtype=torch.float32, device="cpu", bias=True, noncontig=False):
    """Inputs of one linear layer; noncontig gives a strided x and a transposed-view weight."""
    g = torch.Generator().manual_seed(n * 1000 + i * 10 + o + r)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    if noncontig:
        x = rnd(n, 2 * i)[:, ::2]  # strided columns
        w = rnd(i, o, scale=i**-0.5).t()  # a transposed (Conv1D-style) view
    else:
        x = rnd(n, i)
        w = rnd(o, i, scale=i**-0.5)
    b = rnd(o) if bias else None
    a = rnd(r, i, scale=i**-0.5)
    bb = rnd(o, r, scale=0.5)
    m = (torch.rand(o, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
    return x, w, b, a, bb, m


def d64(*ts):
    return [None if t is None else t.double() for t in ts]


SEED = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The shapes here are tiny; one intra-op thread keeps this file fast on a shared 2-core machine
    # (test_parallel_paths runs the multi-threaded kernels explicitly).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the dropout hash ---------------------------------------------------------------------------


def _mix32_py(x):
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def _keep_py(seed, idx, thr):
    s = seed & 0xFFFFFFFFFFFFFFFF
    k1 = _mix32_py((s & 0xFFFFFFFF) ^ 0x85EBCA6B)
    k2 = _mix32_py((s >> 32) + (idx >> 32) * 0x9E3779B9 + 0x27D4EB2F)
    return _mix32_py(_mix32_py((idx & 0xFFFFFFFF) + k1) ^ k2) >= thr


def test_reference_hash_matches_uint32_arithmetic():
    # The int64-tensor hash (16-bit split multiplies) equals exact uint32 arithmetic, also for
    # indices above 2**32 (high word != 0) and negative seeds.
    rng = random.Random(0)
    idx = [rng.randrange(0, 2**40) for _ in range(200)] + [2**32 - 1, 2**32, 2**33 + 5]
    t = torch.tensor(idx, dtype=torch.int64)
    for seed in (0, 1, -1, -(2**63), 2**63 - 1, 0x1234_5678_9ABC):
        s = seed & 0xFFFFFFFFFFFFFFFF
        k1 = ref._mix32((s & 0xFFFFFFFF) ^ 0x85EBCA6B)
        k2 = ref._mix32(((s >> 32) + ref._mul32(t >> 32, 0x9E3779B9) + 0x27D4EB2F) & 0xFFFFFFFF)
        h = ref._mix32(ref._mix32(((t & 0xFFFFFFFF) + k1) & 0xFFFFFFFF) ^ k2)
        thr = ref.dropout_threshold(0.5)
        assert [bool(v) for v in (h >= thr)] == [_keep_py(seed, i, thr) for i in idx]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, -7, 2**62 + 12345])
def test_mask_bitwise_equals_reference(p, seed):
    s = torch.tensor([seed], dtype=torch.int64)
    y = fp.seeded_dropout(torch.ones(67, 301), p, s)
    keep = ref.dropout_keep_mask(67, 301, p, s)
    assert torch.equal(y != 0, keep)
    assert torch.equal(y, ref.seeded_dropout(torch.ones(67, 301), p, s))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("noncontig", [False, True])
def test_seeded_dropout_values_exact(dtype, noncontig):
    x = make(129, 33, 65, 3, dtype, noncontig=noncontig)[0]
    y = ops.seeded_dropout(x, 0.3, SEED)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, ref.seeded_dropout(x, 0.3, SEED))  # same fp32 multiply, same rounding
    assert torch.equal(ops.seeded_dropout(x, 0.0, SEED), x)
    x3 = x.reshape(3, 43, 33)
    assert torch.equal(ops.seeded_dropout(x3, 0.3, SEED), y.reshape(3, 43, 33))


def test_keep_rate_and_seeds():
    x = torch.ones(256, 1024)
    for p in (0.1, 0.5):
        keep = (ops.seeded_dropout(x, p, SEED) != 0).double().mean().item()
        n = x.numel()
        assert abs(keep - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    a = ops.seeded_dropout(x, 0.5, torch.tensor([1]))
    b = ops.seeded_dropout(x, 0.5, torch.tensor([2]))
    c = ops.seeded_dropout(x, 0.5, torch.tensor([1]))
    assert not torch.equal(a, b) and torch.equal(a, c)
    # neighbouring rows and columns are not correlated in an obvious way
    m = (a != 0).double()
    assert abs((m[:, 1:] * m[:, :-1]).mean().item() - 0.25) < 0.01
    assert abs((m[1:] * m[:-1]).mean().item() - 0.25) < 0.01


def test_new_dropout_seed_reproducible():
    torch.manual_seed(3)
    a = ops.new_dropout_seed()
    torch.manual_seed(3)
    b = ops.new_dropout_seed()
    assert a.dtype == torch.int64 and a.shape == (1,) and a.device.type == "cpu"
    assert torch.equal(a, b) and not torch.equal(a, ops.new_dropout_seed())


# ---- raw ops vs reference -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("bias,noncontig", [(True, False), (False, True)])
def test_lora_ops_vs_reference(dtype, shape, p, bias, noncontig):
    x, w, b, a, bb, _ = make(*shape, dtype, bias=bias, noncontig=noncontig)
    s = 0.75
    y, u = fp.lora_forward(x, w, b, a, bb, s, p, SEED)
    yr, ur = ref.lora_forward(*d64(x, w, b, a, bb), s, p, SEED)
    close(u, ur, dtype, "u")
    close(y, yr, dtype, "y")
    g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    grads = fp.lora_backward(g, x, w, a, bb, u, s, p, SEED)
    grads_r = ref.lora_backward(*d64(g, x, w, a, bb, u), s, p, SEED)
    for name, got, want in zip(("grad_x", "grad_A", "grad_B"), grads, grads_r):
        assert got.dtype == dtype
        close(got, want, dtype, name)
    gx0, ga0, gb0 = fp.lora_backward(g, x, w, a, bb, u, s, p, SEED, False)
    assert gx0.numel() == 0 and torch.equal(ga0, grads[1]) and torch.equal(gb0, grads[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("bias,noncontig", [(True, False), (False, True)])
def test_dora_ops_vs_reference(dtype, shape, p, bias, noncontig):
    x, w, b, a, bb, m = make(*shape, dtype, bias=bias, noncontig=noncontig)
    s = 0.75
    n = fp.dora_weight_norm(w, a, bb, s)
    assert n.dtype == torch.float32
    close(n, ref.dora_weight_norm(*d64(w, a, bb), s), torch.float32 if dtype == torch.float32 else torch.float16, "norm")
    y, u, z = fp.dora_forward(x, w, b, a, bb, m, n, s, p, SEED)
    yr, ur, zr = ref.dora_forward(*d64(x, w, b, a, bb, m, n), s, p, SEED)
    close(u, ur, dtype, "u")
    close(z, zr, dtype, "z")
    close(y, yr, dtype, "y")
    g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    grads = fp.dora_backward(g, x, w, a, bb, m, n, u, z, s, p, SEED)
    grads_r = ref.dora_backward(*d64(g, x, w, a, bb, m, n, u, z), s, p, SEED)
    for name, got, want in zip(("grad_x", "grad_A", "grad_B", "grad_m"), grads, grads_r):
        assert got.dtype == dtype
        close(got, want, dtype, name)
    gx0, *rest = fp.dora_backward(g, x, w, a, bb, m, n, u, z, s, p, SEED, False)
    assert gx0.numel() == 0
    for got, want in zip(rest, grads[1:]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_paths(threads):
    # More rows than one CPU chunk, more columns than one multiplier block, odd sizes; the kernels
    # run with one and two intra-op threads, the reference with one.
    # (500, 1100, 70): several dropout chunks (CPU chunks: 238 rows for the rank-r GEMMs, 476 for
    # DoRA's base GEMM) and two row blocks of the dropout-free fused drivers (476 rows for fp32);
    # (500, 16, 9000): four fused row blocks (128 rows), also with a strided x / transposed weight.
    cases = [((500, 1100, 70, 5), p, nc) for p, nc in ((0.0, False), (0.2, False), (0.2, True))]
    cases.append(((500, 16, 9000, 3), 0.0, False))
    cases.append(((300, 16, 9000, 2), 0.0, True))
    for shape, p, noncontig in cases:
        x, w, b, a, bb, m = make(*shape, noncontig=noncontig)
        g = torch.randn(shape[0], shape[2])
        torch.set_num_threads(threads)
        try:
            y, u = fp.lora_forward(x, w, b, a, bb, 2.0, p, SEED)
            lgrads = fp.lora_backward(g, x, w, a, bb, u, 2.0, p, SEED)
            n = fp.dora_weight_norm(w, a, bb, 2.0)
            dout = fp.dora_forward(x, w, b, a, bb, m, n, 2.0, p, SEED)
            dgrads = fp.dora_backward(g, x, w, a, bb, m, n, dout[1], dout[2], 2.0, p, SEED)
        finally:
            torch.set_num_threads(1)
        yr, ur = ref.lora_forward(*d64(x, w, b, a, bb), 2.0, p, SEED)
        close(y, yr, torch.float32, "y")
        for got, want in zip(lgrads, ref.lora_backward(*d64(g, x, w, a, bb, u), 2.0, p, SEED)):
            close(got, want, torch.float32, "lora grad")
        for got, want in zip(dout, ref.dora_forward(*d64(x, w, b, a, bb, m, n), 2.0, p, SEED)):
            close(got, want, torch.float32, "dora fwd")
        want = ref.dora_backward(*d64(g, x, w, a, bb, m, n, dout[1], dout[2]), 2.0, p, SEED)
        for got, want in zip(dgrads, want):
            close(got, want, torch.float32, "dora grad")


# ---- wrappers: autograd vs reference autograd -----------------------------------------------------


def _grads(fn, tensors, g):
    tensors = [t.detach().requires_grad_(True) if t is not None else None for t in tensors]
    y = fn(*tensors)
    y.backward(g)
    return y.detach(), [t.grad if t is not None else None for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("unfrozen", [False, True])
def test_lora_linear_grads(dtype, p, unfrozen):
    x, w, b, a, bb, _ = make(30, 33, 65, 4, dtype, noncontig=True)
    x = x.reshape(5, 6, 33)
    s = 0.5
    g = torch.randn(5, 6, 65, dtype=torch.float64)
    if unfrozen:
        f = lambda x, w, b, a, bb: ops.lora_linear(x, w, b, a, bb, s, p, SEED)  # noqa: E731
        fr = lambda x, w, b, a, bb: ref.lora_linear(x, w, b, a, bb, s, p, SEED)  # noqa: E731
        args = [x, w, b, a, bb]
    else:
        f = lambda x, a, bb: ops.lora_linear(x, w, b, a, bb, s, p, SEED)  # noqa: E731
        fr = lambda x, a, bb: ref.lora_linear(x, w.double(), b.double(), a, bb, s, p, SEED)  # noqa: E731
        args = [x, a, bb]
    y, gr = _grads(f, args, g.to(dtype))
    yr, grr = _grads(fr, d64(*args), g)
    assert y.shape == (5, 6, 65)
    close(y, yr, dtype, "y")
    for got, want in zip(gr, grr):
        close(got, want, dtype, "grad")


def test_lora_linear_input_without_grad():
    # x that needs no grad (first layer): the kernel skips the input-gradient GEMM.
    x, w, b, a, bb, _ = make(20, 33, 65, 4)
    for p in (0.0, 0.3):
        a1, b1 = a.clone().requires_grad_(), bb.clone().requires_grad_()
        ops.lora_linear(x, w, b, a1, b1, 2.0, p, SEED).sum().backward()
        a2, b2 = a.double().requires_grad_(), bb.double().requires_grad_()
        ref.lora_linear(x.double(), w.double(), b.double(), a2, b2, 2.0, p, SEED).sum().backward()
        close(a1.grad, a2.grad, torch.float32)
        close(b1.grad, b2.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("unfrozen", [False, True])
def test_dora_linear_grads(dtype, p, unfrozen):
    x, w, b, a, bb, m = make(30, 33, 65, 4, dtype, noncontig=True)
    x = x.reshape(5, 6, 33)
    s = 0.5
    g = torch.randn(5, 6, 65, dtype=torch.float64)
    if unfrozen:
        f = lambda x, w, b, a, bb, m: ops.dora_linear(x, w, b, a, bb, m, s, p, SEED)  # noqa: E731
        fr = lambda x, w, b, a, bb, m: ref.dora_linear(x, w, b, a, bb, m, s, p, SEED)  # noqa: E731
        args = [x, w, b, a, bb, m]
    else:
        f = lambda x, a, bb, m: ops.dora_linear(x, w, b, a, bb, m, s, p, SEED)  # noqa: E731
        fr = lambda x, a, bb, m: ref.dora_linear(x, w.double(), b.double(), a, bb, m, s, p, SEED)  # noqa: E731
        args = [x, a, bb, m]
    y, gr = _grads(f, args, g.to(dtype))
    yr, grr = _grads(fr, d64(*args), g)
    close(y, yr, dtype, "y")
    for got, want in zip(gr, grr):
        close(got, want, dtype, "grad")


# ---- opcheck / gradcheck / compile --------------------------------------------------------------


def _opcheck_cases():
    x, w, b, a, bb, m = make(9, 12, 10, 3)
    n = fp.dora_weight_norm(w, a, bb, 0.5)
    y, u = fp.lora_forward(x, w, b, a, bb, 0.5, 0.2, SEED)
    _, du, dz = fp.dora_forward(x, w, b, a, bb, m, n, 0.5, 0.2, SEED)
    g = torch.randn(9, 10)
    rg = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        (fp.seeded_dropout.default, (rg(x), 0.2, SEED)),
        (fp.lora_forward.default, (rg(x), w, b, rg(a), rg(bb), 0.5, 0.2, SEED)),
        (fp.lora_forward.default, (x, w.t().contiguous().t(), None, rg(a), rg(bb), 0.5, 0.0, SEED)),
        (fp.lora_backward.default, (g, x, w, a, bb, u, 0.5, 0.2, SEED)),
        (fp.lora_backward.default, (g, x, w, a, bb, u, 0.5, 0.0, SEED, False)),
        (fp.dora_weight_norm.default, (w, a, bb, 0.5)),
        (fp.dora_forward.default, (rg(x), w, b, rg(a), rg(bb), rg(m), n, 0.5, 0.2, SEED)),
        (fp.dora_forward.default, (rg(x), w, None, rg(a), rg(bb), rg(m), n, 0.5, 0.0, SEED)),
        (fp.dora_backward.default, (g, x, w, a, bb, m, n, du, dz, 0.5, 0.2, SEED)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_lora_linear(p):
    x, w, b, a, bb, _ = make(5, 6, 7, 2, torch.float64, noncontig=True)
    args = [t.clone().requires_grad_(True) for t in (x, w, b, a, bb)]
    assert torch.autograd.gradcheck(lambda *t: ops.lora_linear(*t, 0.8, p, SEED), args)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_dora(p):
    x, w, b, a, bb, m = make(5, 6, 7, 2, torch.float64)
    # Through the wrapper (the norm is recomputed from W, A, B, which are constants here).
    xs, ms = x.clone().requires_grad_(True), m.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, m: ops.dora_linear(x, w, b, a, bb, m, 0.8, p, SEED), [xs, ms])
    # Through the op with the norm held constant (DoRA's detached norm): grads to x, W, b, A, B, m.
    n = fp.dora_weight_norm(w, a, bb, 0.8)
    args = [t.clone().requires_grad_(True) for t in (x, w, b, a, bb, m)]
    f = lambda x, w, b, a, bb, m: fp.dora_forward(x, w, b, a, bb, m, n, 0.8, p, SEED)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, args)


class _LoraModule(torch.nn.Module):
    def __init__(self, dropout_p):
        super().__init__()
        self.base = torch.nn.Linear(16, 12)
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(4, 16) * 0.2)
        self.lora_B = torch.nn.Parameter(torch.randn(12, 4) * 0.2)
        self.p = dropout_p

    def forward(self, x):
        p = self.p if self.training else 0.0
        h = ops.lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, 2.0, p)
        return torch.relu(h).sum(-1)


@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_fullgraph(training):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    mod = _LoraModule(0.3).train(training)
    x = torch.randn(3, 5, 16, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True)
    # fallback_random: inductor draws the seed with torch's generator, as eager does.
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(11)
        y_c = compiled(x)
        y_c.sum().backward()
        g_c = (x.grad.clone(), mod.lora_A.grad.clone())
    x.grad = None
    mod.lora_A.grad = None
    torch.manual_seed(11)
    y_e = mod(x)
    y_e.sum().backward()
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(g_c[0], x.grad)
    torch.testing.assert_close(g_c[1], mod.lora_A.grad)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_compile_dora_fullgraph(p):
    # aot_eager runs the fakes and the registered autograd under fullgraph tracing, without inductor.
    torch._dynamo.reset()
    x, w, b, a, bb, m = make(10, 16, 12, 4)
    a, m = a.requires_grad_(True), m.requires_grad_(True)
    f = lambda x: ops.dora_linear(x, w, b, a, bb, m, 2.0, p).square().sum()  # noqa: E731
    results = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        torch.manual_seed(1)
        xs = x.reshape(2, 5, 16).clone().requires_grad_(True)
        out = fn(xs)
        results.append((out.detach(), *torch.autograd.grad(out, (xs, a, m))))
    for c, e in zip(*results):
        torch.testing.assert_close(c, e)


def test_activation_checkpointing_recomputes_same_mask():
    # The seed is drawn from torch's CPU generator, whose state checkpoint() restores on recompute.
    from torch.utils.checkpoint import checkpoint

    x, w, b, a, bb, _ = make(16, 33, 65, 4)
    a = a.requires_grad_(True)
    fn = lambda x, a: ops.lora_linear(x, w, b, a, bb, 2.0, 0.5).square().sum()  # noqa: E731
    grads = []
    for use_ckpt in (False, True):
        torch.manual_seed(7)
        xs = x.clone().requires_grad_(True)
        out = checkpoint(fn, xs, a, use_reentrant=False) if use_ckpt else fn(xs, a)
        ga, gx = torch.autograd.grad(out, (a, xs))
        grads.append((out.detach(), ga, gx))
    for e, c in zip(*grads):
        torch.testing.assert_close(c, e)


def test_fallback_to_reference(monkeypatch):
    # A device without kernels (e.g. MPS) takes the reference path; emulate it on the CPU.
    x, w, b, a, bb, m = make(7, 33, 65, 3)
    expected = (ops.lora_linear(x, w, b, a, bb, 0.5, 0.2, SEED), ops.dora_linear(x, w, b, a, bb, m, 0.5, 0.2, SEED))
    monkeypatch.setattr(ops, "_KERNEL_DEVICES", ("meta",))
    got = (ops.lora_linear(x, w, b, a, bb, 0.5, 0.2, SEED), ops.dora_linear(x, w, b, a, bb, m, 0.5, 0.2, SEED))
    for e, gt in zip(expected, got):
        close(gt, e, torch.float32)


# ---- peft conformance -----------------------------------------------------------------------------


class _SeededDropout(torch.nn.Module):
    """Stands in for peft's nn.Dropout so peft sees the same mask as fastpeft."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return ref.seeded_dropout(x, self.p, self.seed) if self.training else x


def _peft_layer(use_dora, dropout_p, dtype=torch.float32):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    torch.manual_seed(5)
    base = torch.nn.Linear(33, 65).to(dtype)
    base.requires_grad_(False)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout_p, use_dora=use_dora)
    layer = PeftLoraLinear(base, "default", config=cfg, r=4, lora_alpha=8, lora_dropout=dropout_p, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
        if use_dora:  # re-derive the magnitude from the new B, then move it away from the norm
            layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(65, dtype=dtype) + 0.5)
    if dropout_p > 0:
        layer.lora_dropout["default"] = _SeededDropout(dropout_p, SEED)
    return layer


def test_dora_norm_matches_peft():
    from peft.tuners.lora.dora import DoraLinearLayer

    x, w, b, a, bb, m = make(1, 33, 65, 4)
    for s in (0.5, 3.0):
        got = ops.dora_weight_norm(w, a, bb, s)
        want = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(w, bb @ a, s)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # fan_in_fan_out: peft transposes the stored [in, out] weight; fastpeft takes the view.
        want_t = DoraLinearLayer(fan_in_fan_out=True).get_weight_norm(w.t().contiguous(), bb @ a, s)
        torch.testing.assert_close(ops.dora_weight_norm(w.t().contiguous().t(), a, bb, s), want_t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_backward_matches_peft(use_dora, p):
    layer = _peft_layer(use_dora, p).train()
    x = torch.randn(4, 9, 33)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base, s = layer.base_layer, layer.scaling["default"]
    y_peft = layer(x)
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    want = [A.grad.clone(), B.grad.clone()]
    A.grad = B.grad = None
    if use_dora:
        mag = layer.lora_magnitude_vector["default"].weight
        want.append(mag.grad.clone())
        mag.grad = None
        y = ops.dora_linear(x, base.weight, base.bias, A, B, mag, s, p, SEED)
        params = [A, B, mag]
    else:
        y = ops.lora_linear(x, base.weight, base.bias, A, B, s, p, SEED)
        params = [A, B]
    torch.testing.assert_close(y, y_peft, atol=1e-5, rtol=1e-5)
    y.backward(g)
    for got, w in zip((t.grad for t in params), want):
        torch.testing.assert_close(got, w, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # eval mode: no dropout anywhere
        layer.eval()
        ye = ops.dora_linear(x, base.weight, base.bias, A, B, mag, s) if use_dora else ops.lora_linear(
            x, base.weight, base.bias, A, B, s)
        torch.testing.assert_close(ye, layer(x), atol=1e-5, rtol=1e-5)


def test_saved_activation_bytes_less_than_peft():
    def saved_bytes(fn):
        seen, total = set(), 0

        def pack(t):
            nonlocal total
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen and not isinstance(t, torch.nn.Parameter):
                seen.add(key)
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total

    layer = _peft_layer(False, 0.1).train()
    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)  # peft's own dropout (stores its mask)
    x = torch.randn(64, 33, requires_grad=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.base_layer
    ours = saved_bytes(lambda: ops.lora_linear(x, base.weight, base.bias, A, B, 2.0, 0.1))
    theirs = saved_bytes(lambda: layer(x))
    x_bytes, u_bytes = x.numel() * 4, 64 * 4 * 4
    params = sum(t.numel() * 4 for t in (base.weight, A, B))
    assert ours <= x_bytes + u_bytes + params + 8
    assert ours < theirs, (ours, theirs)


# ---- bad input ----------------------------------------------------------------------------------


def _bad_calls():
    x, w, b, a, bb, m = make(4, 8, 6, 2)
    return [
        ("lora_B", lambda: ops.lora_linear(x, w, b, a, torch.randn(6, 3), 1.0)),  # rank mismatch
        ("lora_A", lambda: ops.lora_linear(x, w, b, a.double(), bb, 1.0)),  # dtype
        ("lora_A", lambda: ops.lora_linear(x, w, b, a.to("meta"), bb, 1.0)),  # device
        ("weight", lambda: ops.lora_linear(torch.randn(4, 9), w, b, a, bb, 1.0)),  # in_features
        ("bias", lambda: ops.lora_linear(x, w, torch.randn(5), a, bb, 1.0)),
        ("dropout_p", lambda: ops.lora_linear(x, w, b, a, bb, 1.0, 1.0)),
        ("magnitude", lambda: ops.dora_linear(x, w, b, a, bb, torch.randn(5), 1.0)),
        ("seed", lambda: ops.seeded_dropout(x, 0.5, torch.tensor([1.0]))),
        # the compiled ops check too (RuntimeError from C++, or the fake on mixed meta inputs)
        ("lora_B", lambda: fp.lora_forward(x, w, b, a, torch.randn(6, 3), 1.0, 0.0, SEED)),
        ("lora_A", lambda: fp.lora_forward(x, w, b, a.double(), bb, 1.0, 0.0, SEED)),
        ("lora_A", lambda: fp.lora_forward(x, w, b, a.to("meta"), bb, 1.0, 0.0, SEED)),
        ("weight", lambda: fp.lora_forward(torch.randn(4, 9), w, b, a, bb, 1.0, 0.0, SEED)),
        ("dropout_p", lambda: fp.lora_forward(x, w, b, a, bb, 1.0, 1.0, SEED)),
        ("dropout_p", lambda: fp.seeded_dropout(x, -0.1, SEED)),
        ("magnitude", lambda: fp.dora_forward(x, w, b, a, bb, m[:5], m, 1.0, 0.0, SEED)),
        ("weight_norm", lambda: fp.dora_forward(x, w, b, a, bb, m, m[:5], 1.0, 0.0, SEED)),
        ("grad_y", lambda: fp.lora_backward(torch.randn(4, 5), x, w, a, bb, torch.randn(4, 2), 1.0, 0.0, SEED)),
        ("lora_B", lambda: fp.dora_weight_norm(w, a, torch.randn(6, 3), 1.0)),
        ("seed", lambda: fp.lora_forward(x, w, b, a, bb, 1.0, 0.1, torch.tensor([1, 2]))),
    ]


@pytest.mark.parametrize("case", range(19))
def test_bad_input_names_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(Exception, match=f"'{name}'"):
        call()


# ---- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("bias,noncontig", [(True, False), (False, True)])
def test_cuda_ops_vs_reference(dtype, p, bias, noncontig):
    for shape in SHAPES + [(3000, 160, 96, 8)]:
        x, w, b, a, bb, m = make(*shape, dtype, device="cuda", bias=bias, noncontig=noncontig)
        s = 0.75
        y, u = fp.lora_forward(x, w, b, a, bb, s, p, SEED)
        yr, ur = ref.lora_forward(*d64(x, w, b, a, bb), s, p, SEED)
        close(y, yr, dtype, "y")
        close(u, ur, dtype, "u")
        g = torch.randn(y.shape, dtype=torch.float64, device="cuda").to(dtype)
        for got, want in zip(fp.lora_backward(g, x, w, a, bb, u, s, p, SEED),
                             ref.lora_backward(*d64(g, x, w, a, bb, u), s, p, SEED)):
            close(got, want, dtype, "lora grad")
        n = fp.dora_weight_norm(w, a, bb, s)
        close(n, ref.dora_weight_norm(*d64(w, a, bb), s), torch.float16, "norm")
        out = fp.dora_forward(x, w, b, a, bb, m, n, s, p, SEED)
        for got, want in zip(out, ref.dora_forward(*d64(x, w, b, a, bb, m, n), s, p, SEED)):
            close(got, want, dtype, "dora fwd")
        for got, want in zip(fp.dora_backward(g, x, w, a, bb, m, n, out[1], out[2], s, p, SEED),
                             ref.dora_backward(*d64(g, x, w, a, bb, m, n, out[1], out[2]), s, p, SEED)):
            close(got, want, dtype, "dora grad")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_mask_equals_cpu(dtype):
    x = torch.randn(513, 777).to(dtype)
    for p in (0.1, 0.5):
        for seed in (SEED, torch.tensor([-3])):
            cpu = ops.seeded_dropout(x, p, seed)
            gpu = ops.seeded_dropout(x.cuda(), p, seed).cpu()
            assert torch.equal(cpu != 0, gpu != 0)
            assert torch.equal(cpu, gpu)
    xt = x.t()  # non-contiguous
    assert torch.equal(ops.seeded_dropout(xt, 0.3, SEED), ops.seeded_dropout(xt.cuda(), 0.3, SEED).cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cuda_linear_grads_match_cpu(p):
    x, w, b, a, bb, m = make(64, 40, 24, 4)
    for fn, extra in ((ops.lora_linear, ()), (ops.dora_linear, (m,))):
        outs = []
        for dev in ("cpu", "cuda"):
            ts = [t.detach().clone().to(dev).requires_grad_(True) for t in (x, a, bb, *extra)]
            xs, as_, bs, *es = ts
            y = fn(xs, w.to(dev), b.to(dev), as_, bs, *es, 0.5, p, SEED)
            y.square().sum().backward()
            outs.append([y.detach().cpu()] + [t.grad.cpu() for t in ts])
        for c, g in zip(*outs):
            torch.testing.assert_close(g, c, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_gradcheck_and_opcheck():
    x, w, b, a, bb, m = make(5, 6, 7, 2, torch.float64, device="cuda")
    args = [t.clone().requires_grad_(True) for t in (x, a, bb)]
    assert torch.autograd.gradcheck(lambda x, a, bb: ops.lora_linear(x, w, b, a, bb, 0.8, 0.3, SEED), args)
    args = [t.clone().requires_grad_(True) for t in (x, m)]
    assert torch.autograd.gradcheck(lambda x, m: ops.dora_linear(x, w, b, a, bb, m, 0.8, 0.3, SEED), args)
    xf, wf, bf, af, bbf, mf = make(9, 12, 10, 3, device="cuda")
    torch.library.opcheck(fp.lora_forward.default, (xf.requires_grad_(), wf, bf, af.requires_grad_(), bbf, 0.5, 0.2, SEED))
    nf = fp.dora_weight_norm(wf, af, bbf, 0.5)
    torch.library.opcheck(fp.dora_forward.default, (xf, wf, bf, af, bbf, mf.requires_grad_(), nf, 0.5, 0.2, SEED))


@pytest.mark.parametrize("dtype, b_scale", [(torch.bfloat16, 3e-5), (torch.float16, 3e-6)])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_half_precision_keeps_a_young_adapter(dtype, b_scale, kind):
    """An adapter whose s*B*A is mostly below half an ulp of W must still move y (in expectation), as the unfused
    math does: folding W + s*B*A into a bf16/fp16 weight would round it away (y close to the base's)."""
    torch.manual_seed(0)
    n, d, r, s = 1024, 256, 8, 2.0  # n >= d: the shape where a CPU kernel might fold
    x = torch.randn(n, d).to(dtype)
    w = (torch.randn(d, d) * 0.05).to(dtype)
    a = (torch.randn(r, d) * 0.05).to(dtype)
    b = (torch.randn(d, r) * b_scale).to(dtype)
    zero = torch.zeros_like(b)
    folded = (w.float() + s * b.float() @ a.float()).to(dtype)
    if kind == "lora":
        y, y0 = (ops.lora_linear(x, w, None, a, bb, s).float() for bb in (b, zero))
        y_folded = torch.nn.functional.linear(x, folded).float()
    else:
        m = torch.linalg.vector_norm(w.float(), dim=1).to(dtype)  # magnitude of the base rows
        y, y0 = (ops.dora_linear(x, w, None, a, bb, m, s).float() for bb in (b, zero))
        norm = torch.linalg.vector_norm(w.float() + s * b.float() @ a.float(), dim=1)
        y_folded = torch.nn.functional.linear(x, (folded.float() * (m.float() / norm)[:, None]).to(dtype)).float()
    if kind == "lora":
        exact = s * (x.float() @ a.float().t()) @ b.float().t()
    else:  # the change of DoRA's output in float32
        f32 = [t.float() for t in (x, w)]
        exact = (ref.dora_linear(*f32, None, a.float(), b.float(), m.float(), s, 0.0, None)
                 - ref.dora_linear(*f32, None, a.float(), zero.float(), m.float(), s, 0.0, None))

    def corr(yy):
        return torch.corrcoef(torch.stack([(yy - y0).flatten(), exact.flatten()]))[0, 1].item()

    margin = 0.15 if kind == "lora" else 0.05  # DoRA's rescale adds its own rounding of the output
    assert corr(y) > corr(y_folded) + margin, (
        f"{kind} {dtype}: the adapter's contribution was rounded away (correlation {corr(y):.3f}, a folded weight "
        f"gives {corr(y_folded):.3f})")
