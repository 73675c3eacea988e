"""CUDA kernels of the fused NF4 matmul (csrc/cuda/nf4_matmul.cu): torch.ops.fastpeft.nf4_linear and
nf4_linear_grad_input against an inline float64 reference (F.linear with the dequantised weight),
across dtypes, row counts (gemv and banded cuBLAS paths), odd sizes, every blocksize, double quant,
bias, non-contiguous inputs; the CPU kernel on the same inputs; bad arguments; streams and CUDA
graphs. Every test needs a GPU (conftest skips them elsewhere); the file imports without one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [0, 1, 2, 5, 16, 17, 64, 300]
# (in_features, out_features, blocksize, double_quant, bias)
CASES = [
    (33, 7, 32, True, True),
    (65, 129, 64, False, True),
    (4097, 1, 4096, True, False),
    (4097, 7, 128, False, True),
    (64, 129, 2048, True, False),
    (33, 1, 1024, False, False),
    (256, 33, 256, True, True),
    (1000, 65, 512, False, True),
]
# Tolerance per element, relative to sum_k |x_k| |W_k| + |bias| (the float64 magnitude of the dot):
# one rounding of the weight and of the output to the dtype, and fp32 accumulation.
EPS = {torch.float32: 3e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}

fp = torch.ops.fastpeft


def _quant(out_f, in_f, bs, dq, dtype, device="cuda", seed=0):
    from fastpeft.quant.nf4 import quantize_nf4

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * max(in_f, 1) ** -0.5).to(dtype).to(device)
    return quantize_nf4(w, bs, dq)


def _args(packed, st):
    return packed, st.absmax, st.nested_absmax, st.nested_code, st.offset, st.blocksize


def _dense(packed, st, dtype):
    from fastpeft.quant.nf4 import dequantize_nf4

    return dequantize_nf4(packed, st, dtype).double()


def _assert_close(got, ref, bound, dtype, what):
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    if got.numel() == 0:
        return
    err = (got.double() - ref).abs()
    tol = EPS[dtype] * bound + 1e-6
    worst = (err - tol).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3g} exceeds the tolerance by {worst:.3g}"


def _linear_ref(x, W, bias):
    ref = F.linear(x.double(), W, None if bias is None else bias.double())
    bound = F.linear(x.double().abs(), W.abs(), None if bias is None else bias.double().abs())
    return ref, bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", ROWS)
def test_nf4_linear_matches_reference(dtype, n):
    for in_f, out_f, bs, dq, has_bias in CASES:
        packed, st = _quant(out_f, in_f, bs, dq, dtype, seed=in_f + out_f)
        W = _dense(packed, st, dtype)
        x = torch.randn(n, in_f, device="cuda").to(dtype)
        bias = torch.randn(out_f, device="cuda").to(dtype) if has_bias else None
        y = fp.nf4_linear(x, *_args(packed, st), out_f, bias)
        ref, bound = _linear_ref(x, W, bias)
        _assert_close(y, ref, bound, dtype, f"nf4_linear n={n} in={in_f} out={out_f} bs={bs} dq={dq}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", ROWS)
def test_nf4_linear_grad_input_matches_reference(dtype, n):
    for in_f, out_f, bs, dq, _ in CASES:
        packed, st = _quant(out_f, in_f, bs, dq, dtype, seed=in_f * 3 + out_f)
        W = _dense(packed, st, dtype)
        gy = torch.randn(n, out_f, device="cuda").to(dtype)
        gx = fp.nf4_linear_grad_input(gy, *_args(packed, st), in_f)
        ref = gy.double() @ W
        bound = gy.double().abs() @ W.abs()
        _assert_close(gx, ref, bound, dtype, f"grad_input n={n} in={in_f} out={out_f} bs={bs} dq={dq}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [5, 8, 9, 16])
def test_cuda_core_and_tensor_core_gemv(monkeypatch, dtype, n):
    # 2-byte dtypes take the tensor-core gemv for 5..16 rows; FASTPEFT_NF4_MMA=0 forces the CUDA-core
    # one. Both must match the reference (and so each other).
    for in_f, out_f, bs, dq, has_bias in CASES + [(4096, 300, 64, True, True)]:
        packed, st = _quant(out_f, in_f, bs, dq, dtype, seed=11)
        W = _dense(packed, st, dtype)
        x = torch.randn(n, in_f, device="cuda").to(dtype)
        bias = torch.randn(out_f, device="cuda").to(dtype) if has_bias else None
        ref, bound = _linear_ref(x, W, bias)
        for flag in ("1", "0"):
            monkeypatch.setenv("FASTPEFT_NF4_MMA", flag)
            y = fp.nf4_linear(x, *_args(packed, st), out_f, bias)
            _assert_close(y, ref, bound, dtype, f"mma={flag} n={n} in={in_f} out={out_f} bs={bs}")


@pytest.mark.parametrize("n", [3, 17])
def test_several_bands_and_splits(n):
    # A weight bigger than one 32 MiB scratch band in both directions (forward: row bands of
    # 2048 rows; grad_input: column bands of 4096 columns, the last one 8 wide).
    dtype = torch.bfloat16
    out_f, in_f = 4100, 8200
    packed, st = _quant(out_f, in_f, 64, True, dtype, seed=5)
    W = _dense(packed, st, dtype)
    x = torch.randn(n, in_f, device="cuda").to(dtype)
    bias = torch.randn(out_f, device="cuda").to(dtype)
    y = fp.nf4_linear(x, *_args(packed, st), out_f, bias)
    ref, bound = _linear_ref(x, W, bias)
    _assert_close(y, ref, bound, dtype, "nf4_linear large")
    gy = torch.randn(n, out_f, device="cuda").to(dtype)
    gx = fp.nf4_linear_grad_input(gy, *_args(packed, st), in_f)
    _assert_close(gx, gy.double() @ W, gy.double().abs() @ W.abs(), dtype, "grad_input large")


def test_non_contiguous_inputs():
    dtype = torch.bfloat16
    in_f, out_f = 65, 33
    packed, st = _quant(out_f, in_f, 64, True, dtype)
    W = _dense(packed, st, dtype)
    for n in (1, 5, 40):
        x = torch.randn(in_f, n, device="cuda").to(dtype).t()  # [n, in], strides (1, n)
        bias = torch.randn(2 * out_f, device="cuda").to(dtype)[::2]
        y = fp.nf4_linear(x, *_args(packed, st), out_f, bias)
        ref, bound = _linear_ref(x, W, bias)
        _assert_close(y, ref, bound, dtype, f"non-contiguous x n={n}")
        gy = torch.randn(n, 2 * out_f, device="cuda").to(dtype)[:, 1::2]
        gx = fp.nf4_linear_grad_input(gy, *_args(packed, st), in_f)
        _assert_close(gx, gy.double() @ W, gy.double().abs() @ W.abs(), dtype, f"non-contiguous grad_y n={n}")


def test_misaligned_packed_view():
    # packed as a view starting one byte into its storage: the kernels copy it to an aligned buffer.
    dtype = torch.float16
    in_f, out_f = 33, 7
    packed, st = _quant(out_f, in_f, 32, False, dtype)
    W = _dense(packed, st, dtype)
    buf = torch.empty(packed.numel() + 1, 1, dtype=torch.uint8, device="cuda")
    view = buf[1:]
    view.copy_(packed)
    x = torch.randn(3, in_f, device="cuda").to(dtype)
    y = fp.nf4_linear(x, view, st.absmax, None, None, None, st.blocksize, out_f, None)
    ref, bound = _linear_ref(x, W, None)
    _assert_close(y, ref, bound, dtype, "misaligned packed")


def test_empty_shapes():
    dtype = torch.bfloat16
    for out_f, in_f in ((0, 16), (16, 0), (0, 0)):
        packed, st = _quant(out_f, in_f, 64, False, dtype)
        bias = torch.randn(out_f, device="cuda").to(dtype)
        for n in (0, 3, 20):
            x = torch.randn(n, in_f, device="cuda").to(dtype)
            y = fp.nf4_linear(x, *_args(packed, st), out_f, bias)
            assert y.shape == (n, out_f)
            torch.testing.assert_close(y, bias.expand(n, out_f))
            gx = fp.nf4_linear_grad_input(torch.randn(n, out_f, device="cuda").to(dtype), *_args(packed, st), in_f)
            assert gx.shape == (n, in_f) and bool((gx == 0).all())


def _has_cpu_kernel(name):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_cpu_kernel(dtype):
    if not (_has_cpu_kernel("fastpeft::nf4_linear") and _has_cpu_kernel("fastpeft::nf4_linear_grad_input")):
        pytest.skip("the CPU kernels of nf4_linear are not built in this tree")
    for in_f, out_f, bs, dq, has_bias in CASES[:5]:
        packed, st = _quant(out_f, in_f, bs, dq, dtype, device="cpu", seed=7)
        W = _dense(packed, st, dtype)
        cst = _quant(out_f, in_f, bs, dq, dtype, device="cpu", seed=7)[1].to("cuda")
        for n in (1, 5, 17, 64):
            x = torch.randn(n, in_f).to(dtype)
            bias = torch.randn(out_f).to(dtype) if has_bias else None
            y_cpu = fp.nf4_linear(x, *_args(packed, st), out_f, bias)
            y_gpu = fp.nf4_linear(x.cuda(), *_args(packed.cuda(), cst), out_f, None if bias is None else bias.cuda())
            _, bound = _linear_ref(x, W, bias)
            _assert_close(y_gpu.cpu(), y_cpu.double(), 2 * bound, dtype, f"cpu vs cuda n={n} in={in_f}")
            gy = torch.randn(n, out_f).to(dtype)
            g_cpu = fp.nf4_linear_grad_input(gy, *_args(packed, st), in_f)
            g_gpu = fp.nf4_linear_grad_input(gy.cuda(), *_args(packed.cuda(), cst), in_f)
            _assert_close(g_gpu.cpu(), g_cpu.double(), 2 * (gy.double().abs() @ W.abs()), dtype,
                          f"grad cpu vs cuda n={n} in={in_f}")


def test_bad_arguments_name_the_argument():
    dtype = torch.bfloat16
    packed, st = _quant(7, 33, 32, True, dtype)
    x = torch.randn(2, 33, device="cuda").to(dtype)
    with pytest.raises(RuntimeError, match="'packed'"):
        fp.nf4_linear(x.cpu(), *_args(packed, st), 7, None)
    with pytest.raises(RuntimeError, match="'absmax'"):
        fp.nf4_linear(x, packed, st.absmax.cpu(), st.nested_absmax, st.nested_code, st.offset, 32, 7, None)
    with pytest.raises(RuntimeError, match="'offset'"):
        fp.nf4_linear(x, packed, st.absmax, st.nested_absmax, st.nested_code, st.offset.cpu(), 32, 7, None)
    with pytest.raises(RuntimeError, match="'x'"):
        fp.nf4_linear(x.to(torch.int32), *_args(packed, st), 7, None)
    with pytest.raises(RuntimeError, match="'x'"):
        fp.nf4_linear(x[0], *_args(packed, st), 7, None)
    with pytest.raises(RuntimeError, match="'bias'"):
        fp.nf4_linear(x, *_args(packed, st), 7, torch.zeros(7, device="cuda"))
    with pytest.raises(RuntimeError, match="'bias'"):
        fp.nf4_linear(x, *_args(packed, st), 7, torch.zeros(7, dtype=dtype))
    with pytest.raises(RuntimeError, match="'bias'"):
        fp.nf4_linear(x, *_args(packed, st), 7, torch.zeros(8, device="cuda", dtype=dtype))
    with pytest.raises(RuntimeError, match="'packed'"):
        fp.nf4_linear(x, *_args(packed, st), 8, None)  # wrong out_features: byte count
    with pytest.raises(RuntimeError, match="'nested_absmax'"):
        fp.nf4_linear(x, packed, st.absmax, None, st.nested_code, st.offset, 32, 7, None)
    gy = torch.randn(2, 7, device="cuda").to(dtype)
    with pytest.raises(RuntimeError, match="'grad_y'"):
        fp.nf4_linear_grad_input(gy.to(torch.float64), *_args(packed, st), 33)
    with pytest.raises(RuntimeError, match="'packed'"):
        fp.nf4_linear_grad_input(gy.cpu(), *_args(packed, st), 33)
    with pytest.raises(RuntimeError, match="'blocksize'"):
        fp.nf4_linear_grad_input(gy, packed, st.absmax, st.nested_absmax, st.nested_code, st.offset, 48, 33)


def test_side_stream_and_cuda_graph():
    dtype = torch.bfloat16
    in_f, out_f = 4097, 129
    packed, st = _quant(out_f, in_f, 64, True, dtype)
    W = _dense(packed, st, dtype)
    bias = torch.randn(out_f, device="cuda").to(dtype)
    xs = {n: torch.randn(n, in_f, device="cuda").to(dtype) for n in (1, 3, 40)}
    gys = {n: torch.randn(n, out_f, device="cuda").to(dtype) for n in (1, 3, 40)}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for n in xs:  # warm-up (cuBLAS handles, allocator) on the capture stream
            fp.nf4_linear(xs[n], *_args(packed, st), out_f, bias)
            fp.nf4_linear_grad_input(gys[n], *_args(packed, st), in_f)
        eager = {n: fp.nf4_linear(xs[n], *_args(packed, st), out_f, bias) for n in xs}
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for n in xs:
        ref, bound = _linear_ref(xs[n], W, bias)
        _assert_close(eager[n], ref, bound, dtype, f"side stream n={n}")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = {n: fp.nf4_linear(xs[n], *_args(packed, st), out_f, bias) for n in xs}
        gxs = {n: fp.nf4_linear_grad_input(gys[n], *_args(packed, st), in_f) for n in gys}
    for n in xs:  # new inputs, same buffers: the replay must see them
        xs[n].copy_(torch.randn(n, in_f, device="cuda").to(dtype))
        gys[n].copy_(torch.randn(n, out_f, device="cuda").to(dtype))
    graph.replay()
    torch.cuda.synchronize()
    for n in xs:
        ref, bound = _linear_ref(xs[n], W, bias)
        _assert_close(ys[n], ref, bound, dtype, f"graph n={n}")
        _assert_close(gxs[n], gys[n].double() @ W, gys[n].double().abs() @ W.abs(), dtype, f"graph grad n={n}")
