"""Tests of the multi-adapter LoRA mix (X-LoRA): multi_lora_mix / multi_lora_mix_backward and the wrapper
fastpeft.ops.multi_lora_mix, against fastpeft.reference (float64) and the per-adapter loop peft runs."""
from __future__ import annotations

import pytest
import torch

from fastpeft import ops
from fastpeft import reference as ref

from _op_testing import close

fp = torch.ops.fastpeft

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (T, in, out, n, r)
SHAPES = [(0, 33, 65, 3, 4), (1, 33, 65, 1, 1), (7, 33, 65, 3, 4), (129, 40, 24, 8, 8), (37, 64, 48, 5, 16)]


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def make(T, i, o, n, r, dtype=torch.float32, device="cpu", noncontig=False, base=True, s_dtype=None):
    g = torch.Generator().manual_seed(T * 1000 + i * 10 + o + n + r)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    x = rnd(T, 2 * i)[:, ::2] if noncontig else rnd(T, i)
    A = rnd(n, r, i, scale=i**-0.5)
    B = rnd(n, o, r, scale=0.5)
    s = torch.softmax(torch.randn(T, n, generator=g, dtype=torch.float64), -1).to(s_dtype or dtype).to(device)
    if noncontig:
        s = torch.randn(n, T, generator=g, dtype=torch.float64).to(s_dtype or dtype).to(device).t()
    b = rnd(T, o) if base else None
    return x, A, B, s, b


def d64(*ts):
    return [None if t is None else t.double() for t in ts]


def peft_loop(x, A, B, s, base):
    """What peft's XLoraLinearLayer does: one adapter at a time, lora_B(lora_A(x * s_j))."""
    y = base.clone() if base is not None else x.new_zeros(x.shape[0], B.shape[1])
    for j in range(A.shape[0]):
        y += (x * s[:, j : j + 1]) @ A[j].t() @ B[j].t()
    return y


# ---- values and gradients vs the reference -------------------------------------------------------


SEED = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontig,base", [(False, True), (True, False)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_ops_vs_reference(dtype, shape, noncontig, base, p):
    x, A, B, s, b = make(*shape, dtype, noncontig=noncontig, base=base)
    y, u = fp.multi_lora_mix(x, A, B, s, b, p, SEED)
    yr, ur = ref.multi_lora_mix_forward(*d64(x, A, B, s, b), p, SEED)
    assert y.dtype == dtype and y.shape == yr.shape and u.shape == ur.shape
    close(y, yr, dtype, "y")
    close(u, ur, dtype, "u")
    if p == 0.0:
        close(y, peft_loop(*d64(x, A, B, s, b)), dtype, "y vs peft's loop")
    g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    got = fp.multi_lora_mix_backward(g, x, A, B, s, u, True, True, p, SEED)
    want = ref.multi_lora_mix_backward(*d64(g, x, A, B, s, u), p, SEED)
    for name, a, e in zip(("grad_x", "grad_A", "grad_B", "grad_scalings"), got, want):
        assert a.shape == e.shape, name
        close(a, e, dtype, name)
    assert got[3].dtype == s.dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_scalings_with_half_inputs(dtype):
    x, A, B, s, b = make(19, 24, 20, 4, 4, dtype, s_dtype=torch.float32)
    xs = x.clone().requires_grad_(True)
    ss = s.clone().requires_grad_(True)
    y = ops.multi_lora_mix(xs, A, B, ss, b)
    assert y.dtype == dtype
    close(y, ref.multi_lora_mix(*d64(x, A, B, s, b)), dtype, "y")
    y.float().sum().backward()
    assert ss.grad.dtype == torch.float32 and xs.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrapper_grads_match_reference(dtype):
    x, A, B, s, b = make(2 * 9, 24, 20, 4, 3, dtype)
    x3, s3, b3 = x.reshape(2, 9, 24), s.reshape(2, 9, 4), b.reshape(2, 9, 20)
    ts = [t.clone().requires_grad_(True) for t in (x3, A, B, s3, b3)]
    t64 = [t.detach().double().requires_grad_(True) for t in (x3, A, B, s3, b3)]
    y, y64 = ops.multi_lora_mix(*ts), ref.multi_lora_mix(*t64)
    assert y.shape == (2, 9, 20)
    close(y, y64, dtype, "y")
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g.to(dtype))
    y64.backward(g)
    for name, a, e in zip(("x", "A", "B", "scalings", "base"), ts, t64):
        close(a.grad, e.grad, dtype, f"grad {name}")


def test_dropout_masks_per_adapter():
    # adapter j's input is rows j T .. of seeded_dropout(x repeated n times): independent masks per adapter
    x, A, B, s, _ = make(40, 24, 20, 3, 2, torch.float64)
    xd = ops.seeded_dropout(x.repeat(3, 1), 0.5, SEED).reshape(3, 40, 24)
    assert not torch.equal(xd[0] != 0, xd[1] != 0)
    want = sum(s[:, j : j + 1] * (xd[j] @ A[j].t() @ B[j].t()) for j in range(3))
    torch.testing.assert_close(ops.multi_lora_mix(x, A, B, s, None, 0.5, SEED), want)
    torch.testing.assert_close(ops.multi_lora_mix(x, A, B, s, None, 0.0, SEED), ref.multi_lora_mix(x, A, B, s))
    # only-needed gradients with dropout
    gx, ga, gb, gs = fp.multi_lora_mix_backward(torch.ones(40, 20, dtype=torch.float64), x, A, B, s,
                                                 torch.zeros(40, 6, dtype=torch.float64), False, True, 0.5, SEED)
    assert gx.numel() == 0 and ga.shape == A.shape and gb.shape == B.shape


def test_grads_only_where_needed():
    # Frozen adapters (X-LoRA's default): only x and the scalings get gradients; no weight GEMMs.
    x, A, B, s, b = make(16, 24, 20, 4, 3)
    xs, ss = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ops.multi_lora_mix(xs, A, B, ss, b).square().sum().backward()
    x2, s2 = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ref.multi_lora_mix(x2, A, B, s2, b).square().sum().backward()
    close(xs.grad, x2.grad, torch.float32, "grad x")
    close(ss.grad, s2.grad, torch.float32, "grad scalings")
    gx, ga, gb, gs = fp.multi_lora_mix_backward(torch.ones(16, 20), x, A, B, s, torch.zeros(16, 12), False, False)
    assert gx.numel() == 0 and ga.numel() == 0 and gb.numel() == 0 and gs.shape == (16, 4)


def test_zero_scalings_mask_adapters():
    # top-k: a zero scaling removes the adapter exactly (its weights may hold anything finite).
    x, A, B, s, b = make(11, 16, 12, 4, 2)
    s[:, 1] = 0.0
    s[:, 3] = 0.0
    B2 = B.clone()
    B2[1].fill_(1e3)
    B2[3].normal_()
    torch.testing.assert_close(ops.multi_lora_mix(x, A, B2, s, b), ops.multi_lora_mix(x, A, B, s, b))
    keep = [0, 2]
    torch.testing.assert_close(
        ops.multi_lora_mix(x, A, B, s, b), ops.multi_lora_mix(x, A[keep], B[keep], s[:, keep].contiguous(), b)
    )


def test_padded_ranks_equal_separate_ranks():
    # Adapters of different ranks: zero-padding to the largest r gives the unpadded per-adapter sum.
    x, A, B, s, _ = make(9, 16, 12, 2, 4, torch.float64)
    A[0, 2:] = 0.0
    B[0, :, 2:] = 0.0
    want = s[:, :1] * (x @ A[0, :2].t() @ B[0, :, :2].t()) + s[:, 1:] * (x @ A[1].t() @ B[1].t())
    torch.testing.assert_close(ops.multi_lora_mix(x, A, B, s), want)


def test_zero_adapters_and_zero_rank():
    x = torch.randn(5, 8)
    b = torch.randn(5, 6)
    y = ops.multi_lora_mix(x, torch.zeros(0, 2, 8), torch.zeros(0, 6, 2), torch.zeros(5, 0), b)
    torch.testing.assert_close(y, b)
    y = ops.multi_lora_mix(x, torch.zeros(3, 0, 8), torch.zeros(3, 6, 0), torch.rand(5, 3))
    torch.testing.assert_close(y, torch.zeros(5, 6))


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_paths(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, A, B, s, b = make(700, 48, 40, 8, 8)
        y, u = fp.multi_lora_mix(x, A, B, s, b)
        close(y, ref.multi_lora_mix_forward(*d64(x, A, B, s, b))[0], torch.float32, "y")
        g = torch.randn(700, 40)
        for a, e in zip(fp.multi_lora_mix_backward(g, x, A, B, s, u),
                        ref.multi_lora_mix_backward(*d64(g, x, A, B, s, u))):
            close(a, e, torch.float32, "grad")
    finally:
        torch.set_num_threads(before)


# ---- opcheck / gradcheck / compile --------------------------------------------------------------


def _opcheck_cases():
    x, A, B, s, b = make(9, 12, 10, 3, 2)
    _, u = fp.multi_lora_mix(x, A, B, s, b)
    g = torch.randn(9, 10)
    rg = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        (fp.multi_lora_mix.default, (rg(x), rg(A), rg(B), rg(s), rg(b))),
        (fp.multi_lora_mix.default, (rg(x), A, B, rg(s), None)),
        (fp.multi_lora_mix.default, (x[:, :6], A[:, :, :6].contiguous(), B, s.float(), None)),
        (fp.multi_lora_mix_backward.default, (g, x, A, B, s, u)),
        (fp.multi_lora_mix_backward.default, (g, x, A, B, s, u, False, False)),
        (fp.multi_lora_mix.default, (rg(x), rg(A), rg(B), rg(s), rg(b), 0.25, SEED)),
        (fp.multi_lora_mix_backward.default, (g, x, A, B, s, u, True, True, 0.25, SEED)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_gradcheck():
    x, A, B, s, b = make(5, 6, 7, 3, 2, torch.float64, noncontig=True, base=False)
    b = torch.randn(5, 7, dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (x, A, B, s, b)]
    assert torch.autograd.gradcheck(ops.multi_lora_mix, args)
    assert torch.autograd.gradcheck(lambda *t: ops.multi_lora_mix(*t, 0.4, SEED), args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, A, B, s, b = make(10, 16, 12, 4, 2)
    s = s.requires_grad_(True)
    b = b.reshape(2, 5, 12)
    f = lambda x, s: ops.multi_lora_mix(x, A, B, torch.softmax(s, -1), b).square().sum()  # noqa: E731
    results = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        xs = x.reshape(2, 5, 16).clone().requires_grad_(True)
        out = fn(xs, s.reshape(2, 5, 4))
        results.append((out.detach(), *torch.autograd.grad(out, (xs, s))))
    for c, e in zip(*results):
        torch.testing.assert_close(c, e)


def test_fallback_to_reference(monkeypatch):
    x, A, B, s, b = make(7, 33, 65, 3, 4)
    expected = ops.multi_lora_mix(x, A, B, s, b)
    monkeypatch.setattr(ops, "_KERNEL_DEVICES", ("meta",))
    close(ops.multi_lora_mix(x, A, B, s, b), expected.double(), torch.float32, "fallback")


# ---- bad input ----------------------------------------------------------------------------------


def _bad_calls():
    x, A, B, s, b = make(4, 8, 6, 3, 2)
    u = torch.zeros(4, 6)
    return [
        ("lora_A", lambda: ops.multi_lora_mix(x, A[:, :, :7], B, s)),  # in_features
        ("lora_B", lambda: ops.multi_lora_mix(x, A, B[:2], s)),  # adapters
        ("lora_B", lambda: ops.multi_lora_mix(x, A, B[:, :, :1], s)),  # rank
        ("lora_A", lambda: ops.multi_lora_mix(x, A.double(), B, s)),  # dtype
        ("lora_B", lambda: ops.multi_lora_mix(x, A, B.to("meta"), s)),  # device
        ("scalings", lambda: ops.multi_lora_mix(x, A, B, s[:, :2])),
        ("scalings", lambda: ops.multi_lora_mix(x, A, B, s.double())),
        ("base", lambda: ops.multi_lora_mix(x, A, B, s, b[:, :5])),
        ("lora_A", lambda: ops.multi_lora_mix(x, A[0], B, s)),  # 2-D
        # the compiled ops check too
        ("lora_A", lambda: fp.multi_lora_mix(x, A[:, :, :7], B, s, None)),
        ("lora_B", lambda: fp.multi_lora_mix(x, A, B[:, :, :1], s, None)),
        ("lora_B", lambda: fp.multi_lora_mix(x, A, B[:2], s, None)),
        ("lora_A", lambda: fp.multi_lora_mix(x, A.double(), B, s, None)),
        ("scalings", lambda: fp.multi_lora_mix(x, A, B, s[:3], None)),
        ("scalings", lambda: fp.multi_lora_mix(x, A, B, s.double(), None)),
        ("base", lambda: fp.multi_lora_mix(x, A, B, s, b[:3])),
        ("base", lambda: fp.multi_lora_mix(x, A, B, s, b.double())),
        ("grad_y", lambda: fp.multi_lora_mix_backward(torch.zeros(4, 5), x, A, B, s, u)),
        ("u", lambda: fp.multi_lora_mix_backward(torch.zeros(4, 6), x, A, B, s, u[:, :5])),
        ("dropout_p", lambda: ops.multi_lora_mix(x, A, B, s, None, 1.0)),
        ("dropout_p", lambda: fp.multi_lora_mix(x, A, B, s, None, -0.1, SEED)),
        ("seed", lambda: fp.multi_lora_mix(x, A, B, s, None, 0.2, None)),
        ("seed", lambda: fp.multi_lora_mix(x, A, B, s, None, 0.2, torch.tensor([1.0]))),
    ]


@pytest.mark.parametrize("case", range(23))
def test_bad_input_names_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(Exception, match=f"'{name}'"):
        call()


# ---- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noncontig,base", [(False, True), (True, False)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_ops_vs_reference(dtype, noncontig, base, p):
    for shape in SHAPES + [(3000, 160, 96, 8, 8)]:
        x, A, B, s, b = make(*shape, dtype, device="cuda", noncontig=noncontig, base=base)
        y, u = fp.multi_lora_mix(x, A, B, s, b, p, SEED)
        yr, ur = ref.multi_lora_mix_forward(*d64(x, A, B, s, b), p, SEED)
        close(y, yr, dtype, "y")
        close(u, ur, dtype, "u")
        g = torch.randn(y.shape, dtype=torch.float64, device="cuda").to(dtype)
        for a, e in zip(fp.multi_lora_mix_backward(g, x, A, B, s, u, True, True, p, SEED),
                        ref.multi_lora_mix_backward(*d64(g, x, A, B, s, u), p, SEED)):
            close(a, e, dtype, "grad")


@pytest.mark.cuda
def test_cuda_matches_cpu_and_gradcheck():
    x, A, B, s, b = make(64, 40, 24, 6, 4)
    outs = []
    for dev in ("cpu", "cuda"):
        ts = [t.detach().clone().to(dev).requires_grad_(True) for t in (x, A, B, s, b)]
        y = ops.multi_lora_mix(*ts)
        y.square().sum().backward()
        outs.append([y.detach().cpu()] + [t.grad.cpu() for t in ts])
    for c, g in zip(*outs):
        torch.testing.assert_close(g, c, atol=1e-4, rtol=1e-4)
    x, A, B, s, b = make(5, 6, 7, 3, 2, torch.float64, device="cuda")
    args = [t.clone().requires_grad_(True) for t in (x, A, B, s, b)]
    assert torch.autograd.gradcheck(ops.multi_lora_mix, args)
    assert torch.autograd.gradcheck(lambda *t: ops.multi_lora_mix(*t, 0.4, SEED), args)
    xf, Af, Bf, sf, bf = make(9, 12, 10, 3, 2, device="cuda")
    torch.library.opcheck(fp.multi_lora_mix.default, (xf.requires_grad_(), Af, Bf, sf.requires_grad_(), bf))
