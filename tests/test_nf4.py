"""Tests of the nf4 kernel family (nf4_quantize/dequantize, blockwise8_quantize/dequantize), their
wrappers in fastpeft.ops, fastpeft.reference and fastpeft.nn.LinearNF4, against bitsandbytes
0.50.2 (the oracle: same bytes, same state-dict keys, same outputs)."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from fastpeft import ops
from fastpeft import reference as ref
from fastpeft.nn import LinearNF4
from fastpeft.quant.nf4 import NF4QuantState, dequantize_nf4, quantize_nf4

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its note about `kernels-community`
bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

fp = torch.ops.fastpeft

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# sizes below, at and above a block; odd element counts; several blocks with a partial last one
SHAPES = [(1,), (7,), (3, 5), (64, 64), (33, 65), (48, 100), (3, 1001), (5, 4096 + 96)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small shapes; one intra-op thread keeps this file quick on a shared 2-core machine
    # (test_parallel_matches_reference runs the multi-threaded kernels explicitly).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def weight(shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def assert_same_as_bnb(w, blocksize, double_quant):
    packed, state = quantize_nf4(w, blocksize, double_quant)
    bq, bs = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    assert packed.dtype == bq.dtype == torch.uint8 and packed.shape == bq.shape
    assert torch.equal(packed, bq), "packed NF4 bytes differ"
    assert state.absmax.dtype == bs.absmax.dtype and torch.equal(state.absmax, bs.absmax), "absmax differs"
    assert torch.equal(state.code, bs.code), "quant_map differs"
    assert state.shape == bs.shape and state.dtype == bs.dtype and state.blocksize == bs.blocksize
    assert state.nested == bs.nested
    if double_quant:
        assert torch.equal(state.offset, bs.offset), "nested offset differs"
        assert torch.equal(state.nested_absmax, bs.state2.absmax), "nested absmax differs"
        assert torch.equal(state.nested_code, bs.state2.code), "nested quant_map differs"
        assert state.nested_blocksize == bs.state2.blocksize
    return packed, state, bq, bs


# ---- quantisation: byte-for-byte with bitsandbytes ------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_matches_bnb_every_blocksize(blocksize, dtype, double_quant):
    for i, shape in enumerate([(7,), (33, 65), (3, 1001), (5, 4096 + 96)]):
        assert_same_as_bnb(weight(shape, dtype, seed=i), blocksize, double_quant)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_matches_bnb_shapes(shape, double_quant):
    for dtype in DTYPES:
        assert_same_as_bnb(weight(shape, dtype, scale=0.02), 64, double_quant)


def test_quantize_matches_bnb_many_blocks():
    # > 256 blocks, so the nested absmax has several 8-bit blocks (the last one partial)
    w = weight((300, 200), torch.bfloat16, seed=3, scale=0.05)
    for bs in (32, 64):
        assert_same_as_bnb(w, bs, True)


def test_exact_ties_go_to_the_lower_code():
    bounds = (ref.nf4_code()[:-1] + ref.nf4_code()[1:]) / 2
    # block of 64: [1.0 (absmax), bound_0 .. bound_14, and their neighbours one ulp either side]
    vals = [1.0] + bounds.tolist()
    vals += torch.nextafter(bounds, torch.tensor(2.0)).tolist() + torch.nextafter(bounds, torch.tensor(-2.0)).tolist()
    vals += [0.0] * (64 - len(vals))
    w = torch.tensor(vals, dtype=torch.float32)
    packed, _, _, _ = assert_same_as_bnb(w, 64, False)
    codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 0xF], 1).flatten()
    assert codes[0] == 15
    assert codes[1:16].tolist() == list(range(15))  # a value exactly on bound i gets code i (lower)
    assert codes[16:31].tolist() == list(range(1, 16))  # one ulp above: the upper code
    assert codes[31:46].tolist() == list(range(15))


def test_all_zero_blocks():
    for double_quant in (False, True):
        for n in (64, 256, 70, 1):  # full blocks, a partial zero block (its absmax is 1e-38), tiny
            assert_same_as_bnb(torch.zeros(n), 64, double_quant)
        w = weight((4, 64), torch.float32)
        w[1] = 0.0  # one zero block among others
        w2 = torch.cat([w.flatten(), torch.zeros(10)])  # and a zero partial block at the end
        assert_same_as_bnb(w2, 64, double_quant)
    assert_same_as_bnb(torch.ones(256), 64, True)  # every absmax equals the mean: nested codes of 0


def test_extreme_magnitudes():
    # denormal and tiny blocks (the 1e-38 clamp of the reciprocal), huge values, mixed scales
    for scale in (1e-45, 1e-40, 1e-38, 1e-30, 1e30, 1e37, 3e38):
        for n in (64, 100):
            for dq in (False, True) if scale < 1e38 else (False,):
                assert_same_as_bnb(weight((n,), torch.float32, seed=n, scale=1.0).clamp(-1, 1) * scale, 64, dq)
    with pytest.raises(ValueError, match="double_quant=False"):  # the absmax mean overflows float32
        quantize_nf4(torch.full((256,), 3e38), 64, True)
    w = weight((8, 64), torch.float32)
    w[0] *= 1e-39
    w[3] *= 1e20
    w[5, 7] = 3.0e38
    for dq in (False, True):
        assert_same_as_bnb(w.flatten(), 64, dq)
        assert_same_as_bnb(w.flatten()[:-3], 32, dq)


def test_fuzz_against_bnb():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(
        n=st.integers(1, 3000),
        bs=st.sampled_from(BLOCKSIZES),
        dtype=st.sampled_from(DTYPES),
        dq=st.booleans(),
        log_scale=st.floats(-8, 8),
        zero_frac=st.sampled_from([0.0, 0.3]),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(n, bs, dtype, dq, log_scale, zero_frac, seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, generator=g) * 10.0**log_scale
        if zero_frac:
            w[torch.rand(n, generator=g) < zero_frac] = 0.0
        w = w.to(dtype)
        hypothesis.assume(bool(torch.isfinite(w).all()))
        packed, state, bq, bs_state = assert_same_as_bnb(w, bs, dq)
        assert torch.equal(dequantize_nf4(packed, state), ref.nf4_dequantize(
            packed, state.float_absmax(), bs, (n,), dtype))

    check()


def test_non_contiguous_inputs():
    base = weight((96, 130), torch.float32, seed=5)
    for view in (base.t(), base[:, ::2], base[::3], base.t()[::2, 1:]):
        assert not view.is_contiguous()
        for dq in (False, True):
            p, s = quantize_nf4(view, 64, dq)
            bq, bs = BF.quantize_4bit(view.contiguous(), blocksize=64, compress_statistics=dq, quant_type="nf4")
            assert torch.equal(p, bq) and torch.equal(s.absmax, bs.absmax)


def test_reference_matches_kernels():
    for shape, bs in [((33, 65), 64), ((7,), 32), ((128, 100), 256), ((3, 1001), 4096)]:
        for dtype in DTYPES:
            w = weight(shape, dtype)
            p0, a0 = ref.nf4_quantize(w, bs)
            p1, a1 = ops.nf4_quantize(w, bs)
            assert torch.equal(p0, p1) and torch.equal(a0, a1)
            for out in DTYPES:
                assert torch.equal(ref.nf4_dequantize(p0, a0, bs, shape, out), ops.nf4_dequantize(p1, a1, bs, shape, out))
    code = ref.dynamic_map()
    for n in (1, 255, 256, 700):
        x = weight((n,), torch.float32, seed=n)
        q0, a0 = ref.blockwise8_quantize(x, code, 256)
        q1, a1 = ops.blockwise8_quantize(x, code, 256)
        assert torch.equal(q0, q1) and torch.equal(a0, a1)
        assert torch.equal(ref.blockwise8_dequantize(q0, a0, code, 256, torch.float32),
                           ops.blockwise8_dequantize(q1, a1, code, 256, torch.float32))


def test_dynamic_map_matches_bnb():
    assert torch.equal(ref.dynamic_map(), BF.create_dynamic_map())
    assert torch.equal(ref.nf4_code(), BF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_blockwise8_matches_bnb(dtype):
    code = BF.create_dynamic_map()
    for i, n in enumerate([1, 100, 256, 257, 1000, 5000]):
        x = weight((n,), dtype, seed=i, scale=10.0 ** (i - 3))
        if i % 2:
            x[: min(n, 256)] = 0  # a zero block
        q, a = ops.blockwise8_quantize(x, code, 256)
        bq, bs = BF.quantize_blockwise(x, code=code, blocksize=256)
        assert torch.equal(q, bq) and torch.equal(a, bs.absmax)
        for out in DTYPES:
            bd = torch.ops.bitsandbytes.dequantize_blockwise.default(bq, bs.absmax, code, 256, out)
            assert torch.equal(ops.blockwise8_dequantize(q, a, code, 256, out), bd)


def test_parallel_matches_reference():
    torch.set_num_threads(2)
    try:
        w = weight((512, 600), torch.bfloat16, seed=9)
        for bs in (32, 4096):
            p, a = ops.nf4_quantize(w, bs)
            p0, a0 = ref.nf4_quantize(w, bs)
            assert torch.equal(p, p0) and torch.equal(a, a0)
            assert torch.equal(ops.nf4_dequantize(p, a, bs, w.shape, torch.float32),
                               ref.nf4_dequantize(p0, a0, bs, w.shape, torch.float32))
    finally:
        torch.set_num_threads(1)


# ---- dequantisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 1024, 4096])
def test_dequantize_matches_bnb(blocksize, double_quant):
    # bitsandbytes' native CPU dequantiser indexes absmax per row, which is only right when the
    # last dim is a multiple of the block (or it takes its generic path: odd last dim, blocksize
    # >= 2048); compare there, and against its generic formula (== reference) everywhere else.
    for shape in [(16, blocksize), (8, 2 * blocksize), (3, 1001), (blocksize + 1,)]:
        if shape[-1] % blocksize and shape[-1] % 2 == 0 and blocksize < 2048:
            continue
        for dtype in DTYPES:
            w = weight(shape, dtype, seed=shape[0])
            packed, state = quantize_nf4(w, blocksize, double_quant)
            bq, bs = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
            expect = BF.dequantize_4bit(bq, bs, quant_type="nf4")
            got = dequantize_nf4(packed, state)
            assert got.dtype == expect.dtype == dtype and got.shape == expect.shape
            assert torch.equal(got, expect)


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_is_fp32_then_cast(shape):
    w = weight(shape, torch.float32, seed=1)
    packed, state = quantize_nf4(w, 64, True)
    absmax = state.float_absmax()
    f32 = ops.nf4_dequantize(packed, absmax, 64, shape, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(ops.nf4_dequantize(packed, absmax, 64, shape, dtype), f32.to(dtype))
    assert torch.equal(f32, ref.nf4_dequantize(packed, absmax, 64, shape, torch.float32))


def test_portable_dequantize_loops_match():
    # The AVX-512 dequantiser is chosen at run time; FASTPEFT_NF4_GENERIC=1 forces the portable
    # loops, which must give the same values.
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from fastpeft import ops, reference as ref\n"
        "for shape, bs in [((33, 65), 64), ((16, 128), 32), ((3, 1001), 4096), ((64, 64), 256)]:\n"
        "    w = torch.randn(shape)\n"
        "    p, a = ops.nf4_quantize(w, bs)\n"
        "    for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "        assert torch.equal(ops.nf4_dequantize(p, a, bs, shape, dt), ref.nf4_dequantize(p, a, bs, shape, dt))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FASTPEFT_NF4_GENERIC="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_raise(bad):
    w = weight((4, 64), torch.float32)
    w[2, 5] = bad
    for dtype in DTYPES:
        with pytest.raises(RuntimeError, match="'w' contains NaN or infinite"):
            ops.nf4_quantize(w.to(dtype), 64)
        with pytest.raises(RuntimeError, match="'w' contains NaN or infinite"):
            fp.nf4_quantize(w.to(dtype), 64)
    with pytest.raises(RuntimeError, match="'x' contains NaN or infinite"):
        ops.blockwise8_quantize(w.flatten(), ref.dynamic_map(), 256)
    with pytest.raises(RuntimeError, match="'w' contains NaN or infinite"):
        ref.nf4_quantize(w, 64)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64, 64.0, True])
def test_bad_blocksize_raises(blocksize):
    w = weight((4, 64), torch.float32)
    with pytest.raises(ValueError, match="'blocksize'"):
        ops.nf4_quantize(w, blocksize)
    with pytest.raises(ValueError, match="'blocksize'"):
        quantize_nf4(w, blocksize)
    with pytest.raises(ValueError, match="'blocksize'"):
        ops.blockwise8_quantize(w, ref.dynamic_map(), blocksize)
    if isinstance(blocksize, int) and not isinstance(blocksize, bool):
        with pytest.raises(RuntimeError, match="'blocksize'"):
            fp.nf4_quantize(w, blocksize)
        with pytest.raises(RuntimeError, match="'blocksize'"):
            fp.blockwise8_quantize(w, ref.dynamic_map(), blocksize)


def test_bad_arguments_name_the_argument():
    w = weight((4, 64), torch.float32)
    for bad in (w.double(), w.to(torch.int32), w.to(torch.uint8)):
        with pytest.raises(TypeError, match="'w'"):
            ops.nf4_quantize(bad, 64)
        with pytest.raises(RuntimeError, match="'w'"):
            fp.nf4_quantize(bad, 64)
    with pytest.raises(TypeError, match="'w'"):
        ops.nf4_quantize([1.0, 2.0], 64)
    packed, absmax = ops.nf4_quantize(w, 64)
    with pytest.raises(TypeError, match="'packed'"):
        ops.nf4_dequantize(packed.float(), absmax, 64, (4, 64))
    with pytest.raises(RuntimeError, match="'packed'"):
        fp.nf4_dequantize(packed.float(), absmax, 64, [4, 64], torch.float32)
    with pytest.raises(ValueError, match="'packed'"):
        ops.nf4_dequantize(packed, absmax, 64, (4, 66))
    with pytest.raises(RuntimeError, match="'packed'"):
        fp.nf4_dequantize(packed, absmax, 64, [4, 66], torch.float32)
    with pytest.raises(ValueError, match="'absmax'"):
        ops.nf4_dequantize(packed, absmax, 32, (4, 64))
    with pytest.raises(RuntimeError, match="'absmax'"):
        fp.nf4_dequantize(packed, absmax, 32, [4, 64], torch.float32)
    with pytest.raises(TypeError, match="'absmax'"):
        ops.nf4_dequantize(packed, absmax.half(), 64, (4, 64))
    with pytest.raises(TypeError, match="'dtype'"):
        ops.nf4_dequantize(packed, absmax, 64, (4, 64), torch.float64)
    with pytest.raises(RuntimeError, match="'dtype'"):
        fp.nf4_dequantize(packed, absmax, 64, [4, 64], torch.float64)
    with pytest.raises(ValueError, match="'code'"):
        ops.blockwise8_quantize(w, ref.nf4_code(), 256)
    with pytest.raises(RuntimeError, match="'code'"):
        fp.blockwise8_quantize(w, ref.nf4_code(), 256)
    q, a = ops.blockwise8_quantize(w, ref.dynamic_map(), 256)
    with pytest.raises(TypeError, match="'q'"):
        ops.blockwise8_dequantize(q.float(), a, ref.dynamic_map())
    with pytest.raises(ValueError, match="'absmax'"):
        ops.blockwise8_dequantize(q, a, ref.dynamic_map(), 64)


# ---- opcheck --------------------------------------------------------------------------------------


def test_opcheck():
    w = weight((33, 65), torch.float32)
    code = ref.dynamic_map()
    packed, absmax = fp.nf4_quantize(w, 64)
    q, a = fp.blockwise8_quantize(absmax, code, 256)
    cases = [
        (fp.nf4_quantize.default, (w, 64)),
        (fp.nf4_quantize.default, (w.bfloat16().t(), 32)),
        (fp.nf4_dequantize.default, (packed, absmax, 64, [33, 65], torch.bfloat16)),
        (fp.blockwise8_quantize.default, (absmax, code, 256)),
        (fp.blockwise8_dequantize.default, (q, a, code, 256, torch.float32)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- LinearNF4 vs bitsandbytes Linear4bit ---------------------------------------------------------


def bnb_linear4bit(linear, blocksize=64, double_quant=True, compute_dtype=None):
    m = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=double_quant, quant_type="nf4", device="cpu",
    )
    m.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4",
        blocksize=blocksize,
    )
    if linear.bias is not None:
        m.bias = torch.nn.Parameter(linear.bias.data.clone())
    return m.to("cpu").train()  # train(): bitsandbytes' generic path (dequantise + linear)


def bnb_from_state_dict(sd, in_f, out_f, bias, compute_dtype=None):
    m = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    m.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=m)
    if bias:
        m.bias = torch.nn.Parameter(sd["bias"].clone())
    return m.train()


def linear(in_f, out_f, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_state_dict_matches_bnb(dtype, double_quant):
    for (in_f, out_f, bias, bs) in [(128, 48, True, 64), (100, 33, False, 32), (4096, 3, True, 4096), (65, 7, True, 128)]:
        lin = linear(in_f, out_f, bias, dtype)
        ours = LinearNF4.from_linear(lin, blocksize=bs, double_quant=double_quant)
        theirs = bnb_linear4bit(lin, bs, double_quant)
        so, sb = ours.state_dict(), theirs.state_dict()
        assert list(so) == list(sb)
        for k in sb:
            assert so[k].dtype == sb[k].dtype and so[k].shape == sb[k].shape, k
            assert torch.equal(so[k], sb[k]), k
        meta = json.loads(bytes(so["weight.quant_state.bitsandbytes__nf4"].tolist()))
        assert meta["quant_type"] == "nf4" and meta["shape"] == [out_f, in_f] and meta["blocksize"] == bs


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear_loads_bnb_state_dict_and_back(double_quant):
    for (in_f, out_f, bias, bs) in [(128, 48, True, 64), (256, 20, False, 256)]:
        lin = linear(in_f, out_f, bias)
        theirs = bnb_linear4bit(lin, bs, double_quant)
        ours = LinearNF4(in_f, out_f, bias=bias)
        ours.load_state_dict(theirs.state_dict())
        assert ours.blocksize == bs and ours.double_quant == double_quant
        so = ours.state_dict()
        for k, v in theirs.state_dict().items():
            assert torch.equal(so[k], v), k
        x = torch.randn(5, in_f)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        # and bitsandbytes loads ours
        back = bnb_from_state_dict(so, in_f, out_f, bias)
        torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(back.weight.data, ours.weight.data)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_forward_matches_bnb(dtype, compute_dtype):
    lin = linear(128, 40, True, dtype)
    ours = LinearNF4.from_linear(lin, blocksize=64, compute_dtype=compute_dtype)
    theirs = bnb_linear4bit(lin, 64, True, compute_dtype)
    x = torch.randn(3, 7, 128).to(dtype)
    y, yb = ours(x), theirs(x)
    assert y.dtype == yb.dtype == dtype and y.shape == (3, 7, 40)
    tol = 1e-5 if dtype == torch.float32 and compute_dtype in (None, torch.float32) else 2e-2
    torch.testing.assert_close(y.float(), yb.float(), rtol=tol, atol=tol)
    # and it is the fused NF4 matmul: x W^T + b summed in fp32 from the fp32-dequantised weight
    cdt = compute_dtype or dtype
    w = ours.dequantize(torch.float32)
    expect = torch.nn.functional.linear(x.to(cdt).float(), w, lin.bias.detach().to(cdt).float())
    torch.testing.assert_close(y.float(), expect.to(cdt).to(dtype).float(), rtol=tol, atol=tol)


def test_linear_module_behaviour():
    lin = linear(64, 16)
    layer = LinearNF4.from_linear(lin, blocksize=32)
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert "blocksize=32" in repr(layer)
    layer.half()  # casts the bias only; the quant state keeps its dtypes
    assert layer.bias.dtype == torch.float16 and layer.weight.dtype == torch.uint8
    assert layer.quant_state.absmax.dtype == torch.uint8 and layer.quant_state.nested_absmax.dtype == torch.float32
    y = layer(torch.randn(2, 64, dtype=torch.float16))
    assert y.dtype == torch.float16
    # quantisation error of NF4 is small relative to the weight
    err = (layer.dequantize(torch.float32) - lin.weight.detach()).abs().max() / lin.weight.detach().abs().max()
    assert err < 0.2
    with pytest.raises(TypeError, match="'linear'"):
        LinearNF4.from_linear(torch.nn.Conv1d(3, 3, 1))
    other = LinearNF4(64, 8)
    with pytest.raises(RuntimeError, match="quantises a weight of shape"):
        other.load_state_dict(layer.state_dict())
    sd = layer.state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(RuntimeError, match="quant state"):
        LinearNF4(64, 16).load_state_dict(sd)
    assert isinstance(NF4QuantState.from_dict(layer.quant_state.as_dict(packed=True)), NF4QuantState)


def test_linear_on_meta_device_has_the_real_layout():
    meta = LinearNF4(100, 8, device="meta")
    real = LinearNF4(100, 8)
    sm, sr = meta.state_dict(), real.state_dict()
    assert list(sm) == list(sr)
    for k in sr:
        assert sm[k].is_meta or k.endswith("bitsandbytes__nf4"), k
        if not k.endswith("bitsandbytes__nf4"):
            assert sm[k].shape == sr[k].shape and sm[k].dtype == sr[k].dtype, k
    # materialise a meta layer from a real state dict (as transformers/accelerate do)
    src = LinearNF4.from_linear(linear(100, 8))
    meta.load_state_dict(src.state_dict(), assign=True)
    assert not meta.weight.is_meta and not meta.quant_state.absmax.is_meta
    x = torch.randn(3, 100)
    assert torch.equal(meta(x), src(x))


def test_linear_state_dict_safetensors_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    lin = linear(128, 24)
    layer = LinearNF4.from_linear(lin)
    save_file(layer.state_dict(), str(tmp_path / "w.safetensors"))
    back = LinearNF4(128, 24)
    back.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    x = torch.randn(4, 128)
    assert torch.equal(back(x), layer(x))


def _assert_state_is_buffers(layer):
    """``quant_state``'s tensors are the layer's buffers themselves (no copies), field by field."""
    state = layer.quant_state
    for field in ("absmax", "code", "offset", "nested_absmax", "nested_code"):
        assert getattr(state, field) is layer._buffers.get("nf4_" + field), field


def test_linear_quant_state_follows_its_buffers():
    """The buffers are the quant state's only storage: overwriting one in place, replacing it, loading a state
    dict or moving the layer shows in the next ``quant_state`` (and so in forward and in the state dict)."""
    layer = LinearNF4.from_linear(linear(128, 16, seed=0), blocksize=64)
    other = LinearNF4.from_linear(linear(128, 16, seed=1), blocksize=64)
    x = torch.randn(3, 128)
    _assert_state_is_buffers(layer)
    assert layer.quant_state is not layer.quant_state  # built at each read: no object to go stale

    # statistics overwritten in place (as DDP's broadcast does), then the packed weight
    before = layer.quant_state
    for name in ("nf4_absmax", "nf4_offset", "nf4_nested_absmax"):
        getattr(layer, name).copy_(getattr(other, name))
    layer.weight.data.copy_(other.weight)
    layer.bias.data.copy_(other.bias)
    assert torch.equal(layer.quant_state.absmax, other.quant_state.absmax)
    assert torch.equal(layer.quant_state.offset, other.quant_state.offset) and before.offset is layer.nf4_offset
    assert torch.equal(layer.dequantize(), other.dequantize())
    assert torch.equal(layer(x), other(x))
    for k, v in other.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k

    # a buffer replaced (as FSDP2 / accelerate do)
    new_absmax = layer.nf4_absmax.clone()
    layer.nf4_absmax = new_absmax
    assert layer.quant_state.absmax is new_absmax
    _assert_state_is_buffers(layer)

    # load_state_dict with another format (no double quantisation, another blocksize): tensors and fields
    single = LinearNF4.from_linear(linear(128, 16, seed=2), blocksize=128, double_quant=False)
    layer.load_state_dict(single.state_dict())
    state = layer.quant_state
    assert state.blocksize == layer.blocksize == 128 and not state.nested and not layer.double_quant
    assert state.offset is None and "nf4_offset" not in dict(layer.named_buffers())
    _assert_state_is_buffers(layer)
    assert torch.equal(layer(x), single(x))

    # a field set on a read state changes nothing; assigning quant_state replaces the buffers
    layer.quant_state.blocksize = 32
    assert layer.quant_state.blocksize == 128
    layer.weight.data.copy_(other.weight)
    layer.quant_state = other.quant_state
    assert layer.nf4_absmax is other.nf4_absmax and layer.quant_state.blocksize == 64
    assert torch.equal(layer.dequantize(), other.dequantize())

    # moved: still the buffers; a deep copy has its own
    half = layer.half()
    assert half.quant_state.nested_absmax.dtype == torch.float32
    _assert_state_is_buffers(half)
    twin = copy.deepcopy(layer)
    _assert_state_is_buffers(twin)
    assert twin.nf4_absmax is not layer.nf4_absmax and torch.equal(twin.dequantize(), layer.dequantize())
    if torch.cuda.is_available():
        on_gpu = copy.deepcopy(layer).cuda()
        _assert_state_is_buffers(on_gpu)
        assert on_gpu.quant_state.absmax.is_cuda and on_gpu.quant_state.code.is_cuda


# ---- CUDA (run where a GPU is present) --------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    code = ref.dynamic_map()
    for shape in SHAPES:
        w = weight(shape, dtype, seed=2)
        for bs in BLOCKSIZES:
            p, a = ops.nf4_quantize(w, bs)
            pc, ac = ops.nf4_quantize(w.cuda(), bs)
            assert torch.equal(pc.cpu(), p) and torch.equal(ac.cpu(), a)
            for out in DTYPES:
                d = ops.nf4_dequantize(p, a, bs, shape, out)
                assert torch.equal(ops.nf4_dequantize(pc, ac, bs, shape, out).cpu(), d)
        x = w.flatten()
        q, a = ops.blockwise8_quantize(x, code, 256)
        qc, ac = ops.blockwise8_quantize(x.cuda(), code.cuda(), 256)
        assert torch.equal(qc.cpu(), q) and torch.equal(ac.cpu(), a)
        assert torch.equal(ops.blockwise8_dequantize(qc, ac, code.cuda(), 256, dtype).cpu(),
                           ops.blockwise8_dequantize(q, a, code, 256, dtype))


@pytest.mark.cuda
def test_cuda_non_finite_and_linear():
    w = weight((4, 64), torch.float32).cuda()
    w[1, 1] = float("nan")
    with pytest.raises(RuntimeError, match="'w' contains NaN or infinite"):
        ops.nf4_quantize(w, 64)
    lin = linear(128, 48)
    for double_quant in (False, True):
        layer = LinearNF4.from_linear(lin, double_quant=double_quant)
        on_gpu = LinearNF4.from_linear(linear(128, 48).cuda(), double_quant=double_quant)
        assert torch.equal(on_gpu.weight.cpu(), layer.weight)
        if not double_quant:  # with double quant the offset is a CUDA mean (its last bit may differ)
            assert torch.equal(on_gpu.quant_state.absmax.cpu(), layer.quant_state.absmax)
        x = torch.randn(3, 128)
        torch.testing.assert_close(on_gpu(x.cuda()).cpu(), layer(x), rtol=1e-5, atol=1e-5)
        moved = layer.cuda()
        assert moved.quant_state.absmax.is_cuda and moved.weight.is_cuda
        torch.testing.assert_close(moved(x.cuda()).cpu(), layer.cpu()(x), rtol=1e-6, atol=1e-6)


# ---- quantize_model -------------------------------------------------------------------------------


def test_quantize_model_tiny_llama(capsys):
    import fastpeft
    from _peft_testing import tiny_llama

    model = tiny_llama()
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    q_proj = originals["model.layers.0.self_attn.q_proj"]
    expect_sd = bnb_linear4bit(q_proj, 64, True).state_dict()

    out = fastpeft.quantize_model(model)
    assert out is model
    err = capsys.readouterr().err
    assert "NF4 quantize" in err and f"{len(originals) - 1}/{len(originals) - 1}" in err
    for name in originals:
        module = model.get_submodule(name)
        if name == "lm_head":
            assert type(module) is torch.nn.Linear
        else:
            assert isinstance(module, LinearNF4) and module.compute_dtype == torch.bfloat16, name
    got_sd = model.get_submodule("model.layers.0.self_attn.q_proj").state_dict()
    assert list(got_sd) == list(expect_sd) and all(torch.equal(got_sd[k], expect_sd[k]) for k in expect_sd)
    with torch.no_grad():
        after = model(ids).logits
    assert after.dtype == before.dtype and after.shape == before.shape
    assert torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.98
    assert fastpeft.training.is_quantized_model(model)


def test_quantize_model_skip_modules_and_options():
    import fastpeft
    from _peft_testing import tiny_llama

    model = tiny_llama()
    fastpeft.quantize_model(
        model, blocksize=32, double_quant=False, compute_dtype=None, skip_modules=("lm_head", "o_proj", "mlp.down_proj"),
        progress=False,
    )
    for name, module in model.named_modules():
        if name.endswith(("o_proj", "down_proj", "lm_head")):
            assert type(module) is torch.nn.Linear, name
        elif name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert isinstance(module, LinearNF4) and module.blocksize == 32 and not module.double_quant, name
            assert module.compute_dtype is None
    with pytest.raises(ValueError, match="'blocksize'"):
        fastpeft.quantize_model(tiny_llama(), blocksize=63, progress=False)
