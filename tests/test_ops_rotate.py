"""Tests of the orthogonal-family rotations: fastpeft.ops.block_diag_rotate and butterfly_rotate
(block_diag_rotate[_backward], butterfly_rotate[_backward]) against fastpeft.reference in float64, the
dense reference.butterfly_matrix, and peft's butterfly permutations; on CPU and (marked) CUDA."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastpeft import ops
from fastpeft import reference as ref

from _op_testing import DTYPES, close

fp = torch.ops.fastpeft

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = [1, 2, 3, 8, 32, 33, 64]
TOKENS = [0, 1, 5, 33, 300]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).to(device)


def rand_rot(*shape, dtype=torch.float32, device="cpu", seed=1):
    """Blocks with entries ~ 1/sqrt(b), so products stay O(1) through several factors."""
    return rand(*shape, dtype=dtype, device=device, seed=seed, scale=shape[-1] ** -0.5)


def rand_perm(m, d, device="cpu", seed=2):
    g = _gen(seed)
    return torch.stack([torch.randperm(d, generator=g) for _ in range(m)]).to(device)


def peft_perms(d, block_num, block_size, m):
    """peft BOFT's butterfly permutations (boft/layer.py block_butterfly_perm), rebuilt here: factor i
    sorts, inside each chunk of d / (block_num / 2^i) features, its runs of block_size / 2 so that the
    even runs come first."""
    perms = []
    for i in range(m):
        b_i, r = block_num // (2**i), block_size // 2
        if m == 1:
            perms.append(torch.arange(d))
            continue
        chunk = d // b_i
        step = chunk // r
        order = torch.cat([torch.arange(0, step, 2), torch.arange(1, step, 2)])
        sorted_order = torch.cat([torch.arange(int(p) * r, int(p) * r + r) for p in order])
        idx = torch.arange(d)
        for s in range(0, d, chunk):
            idx[s:s + chunk] = idx[s:s + chunk][sorted_order]
        perms.append(idx)
    return torch.stack(perms)


def test_peft_perms_match_peft():
    layer = pytest.importorskip("peft.tuners.boft.layer")
    for d, block_size, m in ((64, 8, 2), (64, 8, 3), (128, 4, 4), (96, 6, 2), (256, 32, 2)):
        block_num = d // block_size
        theirs = torch.stack([
            layer.BOFTLayer.block_butterfly_perm(None, d, block_num // 2**i, block_size // 2, m - 1) for i in range(m)
        ])
        assert torch.equal(theirs, peft_perms(d, block_num, block_size, m))


def check_grads(fn, ref_fn, x, rot, dtype, what, extra=()):
    """fn(x, rot, *extra) and its gradients vs ref_fn on the same values in float64."""
    xa = x.detach().clone().requires_grad_(True)
    ra = rot.detach().clone().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    r64 = rot.detach().double().requires_grad_(True)
    y = fn(xa, ra, *extra)
    y64 = ref_fn(x64, r64, *extra)
    assert y.dtype == dtype and y.shape == x.shape, (what, y.dtype, y.shape)
    close(y, y64, dtype, f"{what} y")
    gy = rand(*y64.shape, dtype=dtype, device=x.device, seed=7)
    y.backward(gy)
    y64.backward(gy.double())
    close(xa.grad, x64.grad, dtype, f"{what} grad x")
    close(ra.grad, r64.grad, dtype, f"{what} grad rot")


# ---- block_diag_rotate ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_block_diag_rotate_vs_reference(dtype, shared):
    for b in BLOCKS:
        n = 3 if b <= 8 else 2
        d = n * b
        rot = rand_rot(1 if shared else n, b, b, dtype=dtype, seed=b)
        for tokens in TOKENS:
            x = rand(tokens, d, dtype=dtype, seed=tokens + b)
            check_grads(ops.block_diag_rotate, ref.block_diag_rotate, x, rot, dtype, f"b={b} N={tokens} shared={shared}")


def test_block_diag_rotate_dense_and_shared_sum():
    # x @ blockdiag(rot) as a dense matrix; a shared block's gradient is the sum over its slices.
    b, n = 5, 4
    rot = rand_rot(n, b, b, dtype=torch.float64)
    x = rand(7, n * b, dtype=torch.float64)
    dense = torch.block_diag(*rot.unbind(0))
    torch.testing.assert_close(ops.block_diag_rotate(x, rot), x @ dense)
    shared = rand_rot(1, b, b, dtype=torch.float64).requires_grad_(True)
    g = rand(7, n * b, dtype=torch.float64, seed=3)
    (ops.block_diag_rotate(x, shared) * g).sum().backward()
    expected = sum(x[:, k * b:(k + 1) * b].T @ g[:, k * b:(k + 1) * b] for k in range(n))
    torch.testing.assert_close(shared.grad[0], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_diag_rotate_leading_dims_noncontiguous(dtype):
    b, n = 8, 4
    rot = rand_rot(n, b, b, dtype=dtype)
    base = rand(2, 3, 5, 2 * n * b, dtype=dtype)
    x = base[..., ::2]  # strided last dim
    assert not x.is_contiguous()
    check_grads(ops.block_diag_rotate, ref.block_diag_rotate, x, rot, dtype, "strided")
    xt = rand(n * b, 9, dtype=dtype).t()  # column-major 2-D
    check_grads(ops.block_diag_rotate, ref.block_diag_rotate, xt, rot, dtype, "transposed")
    x0 = torch.zeros(0, 3, n * b, dtype=dtype)
    assert ops.block_diag_rotate(x0, rot).shape == (0, 3, n * b)
    x1 = rand(n * b, dtype=dtype)  # 1-D: one token
    close(ops.block_diag_rotate(x1, rot), ref.block_diag_rotate(x1.double(), rot.double()), dtype, "1-D")


def test_block_diag_rotate_only_needed_grads():
    b, n = 4, 3
    x = rand(6, n * b)
    rot = rand_rot(n, b, b)
    g = rand(6, n * b, seed=5)
    gx, gr = fp.block_diag_rotate_backward(g, x, rot, True, False)
    assert gx.shape == x.shape and gr.numel() == 0
    gx, gr = fp.block_diag_rotate_backward(g, x, rot, False, True)
    assert gx.numel() == 0 and gr.shape == rot.shape
    # frozen rot: only grad_x flows; frozen x: only grad_rot
    xr = x.clone().requires_grad_(True)
    ops.block_diag_rotate(xr, rot).sum().backward()
    assert xr.grad is not None
    rr = rot.clone().requires_grad_(True)
    ops.block_diag_rotate(x, rr).sum().backward()
    assert rr.grad is not None


# ---- butterfly_rotate -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3])
def test_butterfly_rotate_vs_reference(dtype, m):
    for b in BLOCKS:
        for shared in (False, True):
            n = 4 if b <= 8 else 2
            d = n * b
            rot = rand_rot(m, 1 if shared else n, b, b, dtype=dtype, seed=b + m)
            perm = rand_perm(m, d, seed=b)
            for tokens in (0, 1, 33) if b != 33 else (5,):
                x = rand(tokens, d, dtype=dtype, seed=tokens + b)
                check_grads(ops.butterfly_rotate, ref.butterfly_rotate, x, rot, dtype,
                            f"b={b} m={m} N={tokens} shared={shared}", (perm,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_butterfly_rotate_peft_permutations(dtype):
    # peft's BOFT layout: rot [m, block_num, block_size, block_size] with peft's butterfly perms.
    for d, block_size, m in ((64, 8, 1), (64, 8, 2), (64, 8, 3), (128, 4, 4), (96, 6, 2), (256, 32, 2)):
        block_num = d // block_size
        perm = peft_perms(d, block_num, block_size, m)
        rot = rand_rot(m, block_num, block_size, block_size, dtype=dtype, seed=d + m)
        x = rand(300, d, dtype=dtype, seed=m)
        check_grads(ops.butterfly_rotate, ref.butterfly_rotate, x, rot, dtype, f"peft d={d} b={block_size} m={m}",
                    (perm,))


def test_butterfly_rotate_vs_dense_matrix():
    for m, b, n in ((1, 4, 6), (2, 3, 4), (3, 8, 2), (2, 5, 1)):
        d = b * (n if n > 1 else 4)
        rot = rand_rot(m, n, b, b, seed=m * b)
        perm = rand_perm(m, d, seed=m + b)
        x = rand(17, d, seed=b)
        dense = ref.butterfly_matrix(rot, perm)
        close(ops.butterfly_rotate(x, rot, perm), x.double() @ dense.double(), torch.float32, f"dense m={m} b={b}")


def test_butterfly_rotate_identity_perm_is_block_diag():
    b, n = 8, 4
    rot = rand_rot(1, n, b, b)
    x = rand(10, n * b)
    perm = torch.arange(n * b).unsqueeze(0)
    torch.testing.assert_close(ops.butterfly_rotate(x, rot, perm), ops.block_diag_rotate(x, rot[0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_butterfly_rotate_identity_perms_several_factors(dtype):
    # Every index map the identity but m > 1: the factors still pass through the tile buffers.
    for m in (2, 3):
        b, n = 8, 4
        perm = torch.arange(n * b).expand(m, n * b).contiguous()
        rot = rand_rot(m, n, b, b, dtype=dtype, seed=m)
        x = rand(100, n * b, dtype=dtype)
        check_grads(ops.butterfly_rotate, ref.butterfly_rotate, x, rot, dtype, f"identity m={m}", (perm,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_butterfly_rotate_leading_dims_noncontiguous(dtype):
    m, b, n = 2, 4, 4
    d = n * b
    rot = rand_rot(m, n, b, b, dtype=dtype)
    perm = rand_perm(m, d)
    x = rand(2, 7, 2 * d, dtype=dtype)[..., 1::2]
    assert not x.is_contiguous()
    check_grads(ops.butterfly_rotate, ref.butterfly_rotate, x, rot, dtype, "strided", (perm,))
    assert ops.butterfly_rotate(torch.zeros(3, 0, d, dtype=dtype), rot, perm).shape == (3, 0, d)


def test_rotate_saves_only_inputs():
    # Activation memory: backward keeps x, rot (and perm), never the factor outputs (recomputed).
    saved = []

    def pack(t):
        saved.append(t)
        return t

    m, b, n = 3, 4, 4
    x = rand(50, n * b).requires_grad_(True)
    rot = rand_rot(m, n, b, b).requires_grad_(True)
    perm = rand_perm(m, n * b)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.butterfly_rotate(x, rot, perm)
    assert sum(t.numel() * t.element_size() for t in saved) == sum(
        t.numel() * t.element_size() for t in (x, rot, perm))
    y.sum().backward()
    assert x.grad is not None and rot.grad is not None


def test_rotate_threads_and_tiles():
    # Many tokens over 2 threads: each thread sums its own grad_rot partials; 1000 rows leave a
    # partial last tile.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            rot = rand_rot(2, 8, 16, 16, dtype=dtype)
            perm = rand_perm(2, 128)
            x = rand(1000, 128, dtype=dtype)
            check_grads(ops.butterfly_rotate, ref.butterfly_rotate, x, rot, dtype, "threads", (perm,))
            check_grads(ops.block_diag_rotate, ref.block_diag_rotate, x, rot[0], dtype, "threads")
    finally:
        torch.set_num_threads(before)


def test_rotate_portable_path_subprocess():
    # FASTPEFT_ROTATE_GENERIC=1 forces the portable loops (what a CPU without AVX-512 runs).
    code = (
        "import torch, sys; sys.path.insert(0, 'tests');"
        "from test_ops_rotate import *;"
        "torch.set_num_threads(1);"
        "[test_block_diag_rotate_vs_reference(dt, sh) for dt in (torch.float32, torch.bfloat16, torch.float16) "
        "for sh in (False, True)];"
        "test_butterfly_rotate_vs_reference(torch.bfloat16, 2);"
        "test_butterfly_rotate_peft_permutations(torch.float32);"
        "print('ok')"
    )
    env = dict(os.environ, FASTPEFT_ROTATE_GENERIC="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_rotate_gradcheck():
    x = rand(3, 12, dtype=torch.float64).requires_grad_(True)
    rot = rand_rot(4, 3, 3, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.block_diag_rotate, (x, rot))
    rot2 = rand_rot(2, 1, 4, 4, dtype=torch.float64).requires_grad_(True)
    perm = rand_perm(2, 12)
    assert torch.autograd.gradcheck(lambda x, r: ops.butterfly_rotate(x, r, perm), (x, rot2))


def test_rotate_opcheck():
    x = rand(5, 12).requires_grad_(True)
    rot = rand_rot(3, 4, 4).requires_grad_(True)
    torch.library.opcheck(fp.block_diag_rotate.default, (x, rot))
    torch.library.opcheck(fp.block_diag_rotate.default, (rand(2, 3, 12), rand_rot(1, 4, 4).requires_grad_(True)))
    g = rand(5, 12, seed=9)
    torch.library.opcheck(fp.block_diag_rotate_backward.default, (g, x.detach(), rot.detach(), True, True))
    torch.library.opcheck(fp.block_diag_rotate_backward.default, (g, x.detach(), rot.detach(), False, True))
    rot4 = rand_rot(2, 3, 4, 4).requires_grad_(True)
    perm = rand_perm(2, 12)
    torch.library.opcheck(fp.butterfly_rotate.default, (x, rot4, perm))
    torch.library.opcheck(fp.butterfly_rotate_backward.default, (g, x.detach(), rot4.detach(), perm, True, True))
    torch.library.opcheck(fp.butterfly_rotate_backward.default, (g, x.detach(), rot4.detach(), perm, True, False))


def test_rotate_compile():
    rot = rand_rot(2, 2, 4, 4).requires_grad_(True)
    perm = rand_perm(2, 8)

    def f(x, r):
        return ops.butterfly_rotate(torch.relu(x), r, perm).sum() + ops.block_diag_rotate(x, r[0]).square().sum()

    x = rand(6, 8)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, rot)
    torch.testing.assert_close(out, f(x, rot))


def test_rotate_bad_input_errors():
    x = rand(4, 12)
    rot = rand_rot(3, 4, 4)
    with pytest.raises(ValueError, match="n \\* b must equal d"):
        ops.block_diag_rotate(x, rand_rot(2, 4, 4))
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        ops.block_diag_rotate(x, rand_rot(1, 5, 5))
    with pytest.raises(ValueError, match="square"):
        ops.block_diag_rotate(x, rand(3, 4, 5))
    with pytest.raises(ValueError, match="3-D"):
        ops.block_diag_rotate(x, rand(12, 12))
    with pytest.raises(TypeError, match="dtype"):
        ops.block_diag_rotate(x, rot.double())
    with pytest.raises(TypeError, match="floating-point"):
        ops.block_diag_rotate(x.long(), rot)
    rot4 = rot.unsqueeze(0)
    perm = rand_perm(1, 12)
    with pytest.raises(TypeError, match="int64"):
        ops.butterfly_rotate(x, rot4, perm.int())
    with pytest.raises(ValueError, match="\\[m, d\\]"):
        ops.butterfly_rotate(x, rot4, rand_perm(2, 12))
    bad = perm.clone()
    bad[0, 0] = bad[0, 1]
    with pytest.raises(ValueError, match="row 0 is not a permutation"):
        ops.butterfly_rotate(x, rot4, bad)
    bad[0, 0] = 12
    with pytest.raises(ValueError, match="not a permutation"):
        ops.butterfly_rotate(x, rot4, bad)
    with pytest.raises(ValueError, match="at least one butterfly factor"):
        ops.butterfly_rotate(x, rot4[:0], perm[:0])
    # the compiled ops check too (called directly, past the wrapper)
    with pytest.raises(RuntimeError, match="n \\* b must equal d"):
        fp.block_diag_rotate(x, rand_rot(2, 4, 4))
    bad = perm.clone()
    bad[0, 3] = bad[0, 5]
    with pytest.raises(RuntimeError, match="must be a permutation"):
        fp.butterfly_rotate(x, rot4, bad)
    with pytest.raises(RuntimeError, match="grad_y"):
        fp.block_diag_rotate_backward(rand(3, 12), x, rot, True, True)


def test_perm_checked_once_then_after_change():
    x = rand(4, 8)
    rot = rand_rot(1, 2, 4, 4)
    perm = rand_perm(1, 8)
    ops.butterfly_rotate(x, rot, perm)
    assert ops._perm_checked(perm)
    perm[0, 0] = perm[0, 1]  # in-place change: checked again
    with pytest.raises(ValueError, match="not a permutation"):
        ops.butterfly_rotate(x, rot, perm)


# ---- CUDA -------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_rotate_vs_reference(dtype):
    for b in BLOCKS:
        for shared in (False, True):
            n = 4 if b <= 8 else 2
            d = n * b
            for tokens in TOKENS:
                x = rand(tokens, d, dtype=dtype, device="cuda", seed=tokens)
                rot = rand_rot(1 if shared else n, b, b, dtype=dtype, device="cuda", seed=b)
                check_grads(ops.block_diag_rotate, ref.block_diag_rotate, x, rot, dtype, f"cuda b={b} N={tokens}")
                for m in (1, 3):
                    rot4 = rand_rot(m, 1 if shared else n, b, b, dtype=dtype, device="cuda", seed=b + m)
                    perm = rand_perm(m, d, device="cuda", seed=b)
                    check_grads(ops.butterfly_rotate, ref.butterfly_rotate, x, rot4, dtype,
                                f"cuda butterfly b={b} m={m} N={tokens}", (perm,))
    xs = rand(40, 64, dtype=dtype, device="cuda")[:, ::2]
    check_grads(ops.butterfly_rotate, ref.butterfly_rotate, xs, rand_rot(2, 4, 8, 8, dtype=dtype, device="cuda"),
                dtype, "cuda strided", (peft_perms(32, 4, 8, 2).cuda(),))


@pytest.mark.cuda
def test_cuda_rotate_opcheck_gradcheck():
    x = rand(5, 12, dtype=torch.float64, device="cuda").requires_grad_(True)
    rot = rand_rot(2, 3, 4, 4, dtype=torch.float64, device="cuda").requires_grad_(True)
    perm = rand_perm(2, 12, device="cuda")
    assert torch.autograd.gradcheck(lambda x, r: ops.butterfly_rotate(x, r, perm), (x, rot))
    assert torch.autograd.gradcheck(ops.block_diag_rotate, (x, rot[0]))
    torch.library.opcheck(fp.butterfly_rotate.default, (x.float(), rot.float(), perm))
    torch.library.opcheck(fp.block_diag_rotate.default, (x.float(), rot[0].float()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True), (False, False)])
def test_grads_wrappers_equal_autograd_of_the_reference(dtype, need):
    """ops.block_diag_rotate_grads / butterfly_rotate_grads (the backward kernels, for layers that rotate
    some other way in forward) vs torch.autograd through the reference, only the gradients asked for."""
    gen = torch.Generator().manual_seed(7)
    d, b, m = 24, 4, 2
    x = torch.randn(3, 5, d, generator=gen, dtype=torch.float64)
    gy = torch.randn(3, 5, d, generator=gen, dtype=torch.float64)
    rot = torch.randn(d // b, b, b, generator=gen, dtype=torch.float64)
    rot4 = torch.randn(m, d // b, b, b, generator=gen, dtype=torch.float64)
    perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(m)])
    cases = [(ops.block_diag_rotate_grads, ref.block_diag_rotate, rot, ()),
             (ops.butterfly_rotate_grads, ref.butterfly_rotate, rot4, (perm,))]
    for grads_fn, ref_fn, r, extra in cases:
        got = grads_fn(gy.to(dtype), x.to(dtype), r.to(dtype), *extra, *need)
        xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        want = torch.autograd.grad(ref_fn(xr, rr, *extra), [xr, rr], gy)
        for g, w, asked in zip(got, want, need):
            if not asked:
                assert g is None
            else:
                assert g.dtype == dtype and g.shape == w.shape
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                torch.testing.assert_close(g.double(), w, atol=tol * max(1.0, w.abs().max().item()), rtol=tol)
