"""Hypothesis fuzzing of every public op in fastpeft.ops (issue 9, "Hardening").

Per op, two properties, each on CPU and (marked ``cuda``) on a GPU:

* valid calls: shapes with odd and zero sizes, every dtype the op takes, non-contiguous / strided /
  transposed / expanded / offset views, NaN and +-inf planted in the input. The result (and, for
  finite inputs, the gradients) must match :mod:`fastpeft.reference` evaluated in float64 on the
  same values (the quantisers: byte for byte), with NaN and inf in the same places.
* invalid calls: one argument of a valid call broken (an int tensor, a wrong rank, a mismatched size,
  another dtype, the meta device, a non-tensor, an out-of-range scalar or index). The op must raise a
  Python exception whose message names that argument: never crash, hang or answer.

A third property breaks the arguments of the raw ``torch.ops.fastpeft.*`` calls (forward and backward)
that the public ops make, the same ways: the kernels must raise too (the wrappers are not the only
callers: torch.compile, opcheck and the layers call them directly).

Every test prints how many cases it tried (``pytest -s`` or ``-rA``). Derandomized: CI reruns the same cases.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

pytest.importorskip("hypothesis")  # (a machine without it skips this module instead of failing collection)
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from _op_testing import TOL

import fastpeft.ops as ops
import fastpeft.reference as ref

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
FLOATS = (F32, BF16, F16, F64)
QUANT = (F32, BF16, F16)
LAYOUTS = ("contig", "contig", "strided", "transposed", "expanded", "offset")
ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Examples per (op, device) and property; FASTPEFT_FUZZ_SCALE multiplies them (a longer local hunt).
_SCALE = float(os.environ.get("FASTPEFT_FUZZ_SCALE", "1"))
VALID_EXAMPLES = max(1, int(150 * _SCALE))
INVALID_EXAMPLES = max(1, int(200 * _SCALE))
RAW_EXAMPLES = max(1, int(150 * _SCALE))


def _settings(n, device="cpu"):
    if device == "cuda":  # ~10 cases per test on a GPU: bench/gpu_check.sh runs every cuda test in 90 s
        n = max(1, n // 15)
    return settings(deadline=None, max_examples=n, database=None, derandomize=True, print_blob=True,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


# ---- drawing tensors ----------------------------------------------------------------------------


class Draw:
    """Hypothesis draws plus a torch generator seeded from them (tensor values are not shrunk)."""

    def __init__(self, data, device):
        self.data = data
        self.device = device
        self.g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    def __call__(self, strategy, label=None):
        return self.data.draw(strategy, label=label)

    def size(self, lo=0, hi=9):
        # small sizes, zero and one often, sometimes a size past a vector width
        return self(st.one_of(st.integers(lo, hi), st.sampled_from([max(lo, 17), max(lo, 33)])))

    def lead(self, max_dims=2):
        """x's leading dims: () (a 1-D x), (T,) or (a, b); zero rows allowed."""
        nd = self(st.integers(0, max_dims))
        return tuple(self(st.integers(0, 6)) for _ in range(nd))

    def dtype(self, choices=FLOATS):
        return self(st.sampled_from(choices))

    def layout(self):
        return self(st.sampled_from(LAYOUTS))

    def bad(self, inf=True):
        """None (finite input) or the non-finite value to plant in it. inf=False: NaN only (for ops computed
        through a factorisation, where +-inf may meet its opposite in one order and not in another)."""
        return self(st.sampled_from([None, None, None, float("nan")] + ([float("inf"), float("-inf")] if inf else [])))

    def randn(self, shape, scale=1.0):
        return torch.randn(tuple(shape), generator=self.g, dtype=F64) * scale

    def t(self, shape, dtype, layout=None, bad=None, scale=1.0, values=None):
        """A tensor of `shape` with the logical values `values` (default randn * scale) in `layout`."""
        shape = tuple(int(s) for s in shape)
        layout = layout or self.layout()
        if layout == "expanded" and (not shape or shape[0] == 0):
            layout = "contig"
        if layout == "transposed" and len(shape) < 2:
            layout = "strided"
        if layout == "strided" and not shape:
            layout = "offset"
        src = (1,) + shape[1:] if layout == "expanded" else shape
        if values is not None and layout == "expanded":
            values = values[:1]
        v = self.randn(src, scale) if values is None else values.reshape(src).to(F64)
        if bad is not None and v.numel():
            v.view(-1)[int(torch.randint(v.numel(), (1,), generator=self.g))] = bad
        v = v.to(dtype).to(self.device)
        if layout == "contig":
            return v.contiguous()
        if layout == "expanded":
            return v.expand(shape)
        if layout == "strided":
            big = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=self.device)
            big[..., ::2] = v
            return big[..., ::2]
        if layout == "transposed":
            return v.transpose(-1, -2).contiguous().transpose(-1, -2)
        flat = torch.zeros(v.numel() + 3, dtype=dtype, device=self.device)
        flat[3:] = v.reshape(-1)
        return flat[3:].view(shape)

    def seed(self):
        return torch.tensor([self(st.integers(0, 2**62))], dtype=torch.int64)

    def scale(self):
        """An adapter scale: 0, or a magnitude in [0.01, 2] (no float32 underflow)."""
        return self(st.one_of(st.just(0.0), st.floats(0.01, 2.0), st.floats(-2.0, -0.01)))

    def dropout(self):
        return self(st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9]))


# ---- a drawn call -------------------------------------------------------------------------------


@dataclass
class Case:
    fn: Callable  # the public op, called fn(**args)
    args: dict
    expect: Callable  # expect(args64) -> float64 expected output (exact=True: expect(args) -> bytes)
    dtype: torch.dtype  # the result's dtype
    grad: tuple = ()  # float args to differentiate (checked when the inputs are finite)
    exact: bool = False
    fixed_rank: tuple = ()  # args whose rank is fixed (unsqueeze(0) is an error)
    dims: tuple = ()  # (arg, dim): changing that size alone is an error
    dtypes: dict = field(default_factory=dict)  # arg -> the float dtypes it may have (others are errors)
    colocated: tuple = ()  # tensor args that must share one device
    bad_values: tuple = ()  # (arg, invalid value, name the message must hold)
    tol_dtype: Optional[torch.dtype] = None
    finite: bool = True  # no NaN/inf planted
    raises_on_nonfinite: Optional[str] = None  # the op rejects NaN/inf in this arg (with this name)
    # NaN compared per [b, b] block (cayley: where in a block a NaN spreads depends on the pivoting; that a
    # block holding a NaN gives a NaN, and the other blocks none, does not)
    nan_blocks: bool = False


def _is_float_tensor(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _to64(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().to(F64) if v.is_floating_point() else v.detach().cpu()
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
        return [_to64(t) for t in v]
    return v


def _scale(expected):
    fin = expected[torch.isfinite(expected)]
    return max(1.0, fin.abs().max().item()) if fin.numel() else 1.0


def assert_matches(actual, expected, dtype, what, tol_mult=1.0):
    """actual (any device, `dtype`) vs a float64 expected: same shape, NaN/inf at the same places,
    finite values within dtype-scaled tolerances."""
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}"
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().cpu().to(F64)
    e = expected.detach().cpu().to(F64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{what}: NaN at {nan_a.nonzero()[:5].tolist()} (op) vs {nan_e.nonzero()[:5].tolist()} (reference)")
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), (
        f"{what}: inf at {inf_a.nonzero()[:5].tolist()} (op) vs {inf_e.nonzero()[:5].tolist()} (reference)")
    fin = torch.isfinite(e)
    tol = TOL[dtype] * tol_mult
    torch.testing.assert_close(a[fin], e[fin], atol=tol * _scale(e), rtol=tol, msg=lambda m: f"{what}: {m}")


def _has_nonfinite(args):
    for v in args.values():
        ts = v if isinstance(v, (list, tuple)) else [v]
        for t in ts:
            if _is_float_tensor(t) and t.device.type != "meta" and not torch.isfinite(t).all():
                return True
    return False


def run_valid(case: Case, draw: Draw):
    tol_dtype = case.tol_dtype or case.dtype
    if case.exact:
        got = case.fn(**case.args)
        want = case.expect({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.args.items()})
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype and g.shape == w.shape, (i, g.dtype, w.dtype, g.shape, w.shape)
            assert torch.equal(g.cpu(), w) or (g.is_floating_point() and torch.allclose(
                g.cpu(), w, rtol=0, atol=0, equal_nan=True)), f"output {i} differs from the reference"
        return
    nonfinite = _has_nonfinite(case.args)
    want_grad = case.grad and not nonfinite and draw(st.booleans(), label="grad")
    args = dict(case.args)
    leaves = {}
    if want_grad:
        for k in case.grad:
            v = args.get(k)
            if isinstance(v, (list, tuple)):
                args[k] = [t.detach().requires_grad_(True) for t in v]
                leaves[k] = args[k]
            elif _is_float_tensor(v):
                args[k] = v.detach().requires_grad_(True)
                leaves[k] = args[k]
    out = case.fn(**args)
    args64 = {k: _to64(v) for k, v in case.args.items()}
    leaves64 = {}
    if want_grad:
        for k in leaves:
            if isinstance(args64[k], list):
                args64[k] = [t.requires_grad_(True) for t in args64[k]]
            else:
                args64[k].requires_grad_(True)
            leaves64[k] = args64[k]
    with torch.set_grad_enabled(bool(want_grad)):
        exp = case.expect(args64)
    if isinstance(out, tuple):
        for i, (o, e) in enumerate(zip(out, exp)):
            assert (o is None) == (e is None), f"output {i}: {o is None} vs {e is None}"
            if o is not None:
                assert o.dtype == case.dtype, (o.dtype, case.dtype)
                assert_matches(o, e, tol_dtype, f"output {i}")
        return
    assert out.dtype == case.dtype, f"result dtype {out.dtype}, want {case.dtype}"
    if case.nan_blocks and nonfinite:
        o, e = out.detach().cpu().to(F64), exp.detach()
        bo, be = torch.isnan(o).flatten(1).any(1), torch.isnan(e).flatten(1).any(1)
        assert torch.equal(bo, be), f"blocks with NaN: {bo.tolist()} (op) vs {be.tolist()} (reference)"
        o[bo], e = 0.0, e.clone()
        e[be] = 0.0
        assert_matches(o, e, tol_dtype, "result")
        return
    assert_matches(out, exp, tol_dtype, "result")
    if want_grad and leaves:
        gy = draw.randn(out.shape).to(out.dtype)
        if out.requires_grad:
            out.backward(gy.to(out.device))
        if exp.requires_grad:
            exp.backward(gy.to(F64))
        for k, v in leaves.items():
            vs, v64 = (v, leaves64[k]) if isinstance(v, list) else ([v], [leaves64[k]])
            for j, (t, t64) in enumerate(zip(vs, v64)):
                g64 = t64.grad if t64.grad is not None else torch.zeros_like(t64)
                g = t.grad if t.grad is not None else torch.zeros_like(t)
                gtol = max(tol_dtype, t.dtype, key=lambda dt: TOL[dt])  # a float32 scale of a float64 x
                assert_matches(g, g64, gtol, f"grad {k}[{j}]", tol_mult=2.0)


# ---- per-op builders: each draws one valid call ------------------------------------------------------


def _maybe(d, make, p=True):
    return make() if d(st.booleans()) else None


def b_seeded_dropout(d: Draw):
    dtype = d.dtype()
    shape = d.lead(3) + ((d.size(),) if d(st.booleans()) else ())
    x = d.t(shape, dtype, bad=d.bad())
    p = d(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    return Case(ops.seeded_dropout, dict(x=x, p=p, seed=d.seed()), lambda a: ref.seeded_dropout(**a), dtype,
                grad=("x",), bad_values=(("p", -0.1, "dropout_p"), ("p", 1.0, "dropout_p"),
                                         ("p", float("nan"), "dropout_p"), ("seed", None, "seed"),
                                         ("seed", torch.tensor([1, 2]), "seed"), ("seed", 7, "seed")))


def _lora_common(d: Draw, dtype, bias_ok=True, inf=True):
    lead = d.lead()
    in_f, out_f, r = d.size(), d.size(), d.size(0, 5)
    args = dict(
        x=d.t(lead + (in_f,), dtype, bad=d.bad(inf)),
        weight=d.t((out_f, in_f), dtype, scale=0.5),
        bias=d.t((out_f,), dtype) if bias_ok and d(st.booleans()) else None,
        lora_A=d.t((r, in_f), dtype, scale=0.5),
        lora_B=d.t((out_f, r), dtype, scale=0.5),
    )
    return args, in_f, out_f, r


_LORA_BAD = (("dropout_p", -0.5, "dropout_p"), ("dropout_p", 1.0, "dropout_p"), ("dropout_p", float("nan"), "dropout_p"),
             ("seed", torch.tensor([1.5]), "seed"), ("seed", torch.tensor([1, 2]), "seed"))
_LORA_DIMS = (("x", -1), ("weight", 0), ("weight", 1), ("lora_A", 0), ("lora_A", 1), ("lora_B", 0), ("lora_B", 1),
              ("bias", 0))


def b_lora_linear(d: Draw):
    dtype = d.dtype()
    scaling = d.scale()
    # scaling 0: the kernel's GEMM with alpha = 0 never reads u (BLAS convention), so an inf in x gives the base
    # output's inf where the reference (peft: y + 0 * inf) gives NaN; NaN alone agrees
    args, *_ = _lora_common(d, dtype, inf=scaling != 0)
    args.update(scaling=scaling, dropout_p=d.dropout(), seed=d.seed())
    names = ("x", "weight", "bias", "lora_A", "lora_B")
    return Case(ops.lora_linear, args, lambda a: ref.lora_linear(**a), dtype, grad=names,
                fixed_rank=names[1:], dims=_LORA_DIMS, dtypes={k: {dtype} for k in names}, colocated=names,
                bad_values=_LORA_BAD)


def b_dora_linear(d: Draw):
    dtype = d.dtype()
    # NaN only: the kernel computes (m/n) (x W^T + s B A x) + b without dropout, the reference peft's
    # x W^T + (m/n - 1) x W^T + (m/n) s B A x, and +-inf meets its opposite in one form and not the other
    args, in_f, out_f, r = _lora_common(d, dtype, inf=False)
    # in_features 0: ||W + s B A|| == 0 and m / 0 makes DoRA undefined (the op and the reference give NaN
    # forward; for zero rows the op's gradient of m is an empty sum, 0, the reference's 0 / 0)
    assume(in_f > 0 or not args["x"].shape[:-1].numel() == 0)
    args["magnitude"] = d.t((out_f,), dtype, values=d.randn((out_f,)).abs() + 0.5)
    args.update(scaling=d.scale(), dropout_p=d.dropout(), seed=d.seed())
    names = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")
    return Case(ops.dora_linear, args, lambda a: ref.dora_linear(**a), dtype, grad=names, fixed_rank=names[1:],
                dims=_LORA_DIMS + (("magnitude", 0),), dtypes={k: {dtype} for k in names}, colocated=names,
                bad_values=_LORA_BAD)


def b_dora_weight_norm(d: Draw):
    dtype = d.dtype()
    args, in_f, out_f, r = _lora_common(d, dtype, bias_ok=False)
    del args["x"], args["bias"]
    args["scaling"] = d.scale()
    names = ("weight", "lora_A", "lora_B")
    out_dtype = F64 if dtype == F64 else F32
    return Case(ops.dora_weight_norm, args, lambda a: ref.dora_weight_norm(**a), out_dtype, fixed_rank=names,
                dims=(("weight", 0), ("weight", 1), ("lora_A", 0), ("lora_A", 1), ("lora_B", 0), ("lora_B", 1)),
                dtypes={k: {dtype} for k in names}, colocated=names, tol_dtype=dtype)


def b_multi_lora_mix(d: Draw):
    dtype = d.dtype()
    lead = d.lead()
    n, r, in_f, out_f = d(st.integers(0, 4)), d.size(0, 4), d.size(), d.size()
    s_dtype = d(st.sampled_from([dtype, F32]))
    args = dict(
        x=d.t(lead + (in_f,), dtype, bad=d.bad()),
        lora_A=d.t((n, r, in_f), dtype, scale=0.5),
        lora_B=d.t((n, out_f, r), dtype, scale=0.5),
        scalings=d.t(lead + (n,), s_dtype),
        base=d.t(lead + (out_f,), dtype) if d(st.booleans()) else None,
        dropout_p=d.dropout(), seed=d.seed(),
    )
    names = ("x", "lora_A", "lora_B", "scalings", "base")
    dtypes = {k: {dtype} for k in names}
    dtypes["scalings"] = {dtype, F32}
    return Case(ops.multi_lora_mix, args, lambda a: ref.multi_lora_mix(**a), dtype, grad=names,
                fixed_rank=("lora_A", "lora_B", "scalings", "base"),
                dims=(("x", -1), ("lora_A", 0), ("lora_A", 1), ("lora_A", 2), ("lora_B", 0), ("lora_B", 2),
                      ("scalings", -1), ("base", -1)), dtypes=dtypes, colocated=names, bad_values=_LORA_BAD)


def b_nf4_quantize(d: Draw):
    dtype = d.dtype(QUANT)
    shape = d.lead(3) + (d.size(0, 80),)
    bs = d(st.sampled_from([32, 64, 128]))
    bad = d.bad()
    w = d.t(shape, dtype, bad=bad, scale=d(st.sampled_from([1.0, 1e-3, 100.0])))
    return Case(ops.nf4_quantize, dict(w=w, blocksize=bs), lambda a: ref.nf4_quantize(**a), torch.uint8,
                exact=True, dtypes={"w": set(QUANT)},
                bad_values=(("blocksize", 48, "blocksize"), ("blocksize", 16, "blocksize"),
                            ("blocksize", 8192, "blocksize"), ("blocksize", -64, "blocksize"),
                            ("blocksize", True, "blocksize"), ("blocksize", 64.0, "blocksize")),
                raises_on_nonfinite="w" if not torch.isfinite(w).all() else None)


def _packed(d: Draw, n, shape2d=None):
    nb = (n + 1) // 2
    v = torch.randint(0, 256, (nb,), generator=d.g, dtype=torch.uint8).to(d.device)
    return v.reshape(nb, 1) if d(st.booleans()) else v


def b_nf4_dequantize(d: Draw):
    shape = list(d.lead(3) + (d.size(0, 80),))
    n = math.prod(shape)
    bs = d(st.sampled_from([32, 64, 128]))
    absmax = (d.randn((-(-n // bs),)).abs() * 3).float().to(d.device)
    out = d.dtype(QUANT)
    args = dict(packed=_packed(d, n), absmax=absmax, blocksize=bs, shape=shape, dtype=out)
    return Case(ops.nf4_dequantize, args, lambda a: ref.nf4_dequantize(**a), out, exact=True,
                dims=(("packed", 0), ("absmax", 0)), colocated=("packed", "absmax"),
                bad_values=(("blocksize", 100, "blocksize"), ("dtype", F64, "dtype"), ("dtype", torch.int32, "dtype"),
                            ("shape", [-1] + shape, "shape"), ("shape", [2**31, 2**31], "packed"),
                            ("absmax", absmax.half(), "absmax")))


def _code8(d: Draw):
    if d(st.booleans()):
        return ref.dynamic_map(signed=d(st.booleans())).to(d.device)
    g = torch.Generator().manual_seed(d(st.integers(0, 3)))  # a few sorted random codes
    return torch.sort(torch.randn(256, generator=g)).values.clamp(-1, 1).to(d.device)


_LUTS = {}


def _blockwise8_quantize_ref(x, code, blocksize):
    """reference.blockwise8_quantize with its 65536-entry lookup table built once per code (it is the slow part)."""
    key = tuple(code.cpu().tolist())
    if key not in _LUTS:
        _LUTS[key] = ref.blockwise8_lut(code)
    real = ref.blockwise8_lut
    ref.blockwise8_lut = lambda c: _LUTS[key]
    try:
        return ref.blockwise8_quantize(x, code, blocksize)
    finally:
        ref.blockwise8_lut = real


def b_blockwise8_quantize(d: Draw):
    dtype = d.dtype(QUANT)
    shape = d.lead(2) + (d.size(0, 70),)
    bs = d(st.sampled_from([32, 64]))
    bad = d.bad()
    x = d.t(shape, dtype, bad=bad, scale=d(st.sampled_from([1.0, 1e-3, 100.0])))
    return Case(ops.blockwise8_quantize, dict(x=x, code=_code8(d), blocksize=bs),
                lambda a: _blockwise8_quantize_ref(**a), torch.uint8, exact=True, colocated=("x", "code"),
                dtypes={"x": set(QUANT)},
                bad_values=(("blocksize", 0, "blocksize"), ("blocksize", 96, "blocksize"),
                            ("code", torch.zeros(255), "code"), ("code", torch.zeros(256, dtype=F64), "code")),
                raises_on_nonfinite="x" if not torch.isfinite(x).all() else None)


def b_blockwise8_dequantize(d: Draw):
    shape = d.lead(2) + (d.size(0, 70),)
    n = math.prod(shape)
    bs = d(st.sampled_from([32, 64]))
    q = torch.randint(0, 256, shape, generator=d.g, dtype=torch.uint8).to(d.device)
    if d(st.booleans()) and len(shape) >= 2:
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    absmax = (d.randn((-(-n // bs),)).abs() * 2).float().to(d.device)
    out = d.dtype(QUANT)
    args = dict(q=q, absmax=absmax, code=_code8(d), blocksize=bs, dtype=out)
    return Case(ops.blockwise8_dequantize, args, lambda a: ref.blockwise8_dequantize(**a), out, exact=True,
                dims=(("absmax", 0), ("code", 0)), colocated=("q", "absmax", "code"),
                bad_values=(("blocksize", 31, "blocksize"), ("dtype", torch.int8, "dtype")))


def _nf4_state(d: Draw, out_f, in_f):
    n = out_f * in_f
    bs = d(st.sampled_from([32, 64, 128]))
    blocks = -(-n // bs)
    st_args = dict(packed=_packed(d, n), blocksize=bs)
    if d(st.booleans()):  # double quantisation: uint8 absmax codes + their 8-bit statistics
        st_args["absmax"] = torch.randint(0, 256, (blocks,), generator=d.g, dtype=torch.uint8).to(d.device)
        st_args["nested_absmax"] = (d.randn((-(-blocks // 256),)).abs() + 0.1).float().to(d.device)
        st_args["nested_code"] = ref.dynamic_map().to(d.device)
        st_args["offset"] = (d.randn((1,)).abs() * 0.1).float().to(d.device)
    else:
        st_args["absmax"] = (d.randn((blocks,)).abs() + 0.01).float().to(d.device)
    return st_args


def _nf4_w64(a, out_f, in_f):
    return ref.nf4_weight(a["packed"], a["absmax"], a.get("nested_absmax"), a.get("nested_code"), a.get("offset"),
                          a["blocksize"], out_f, in_f).to(F64)


def _nf4_bad(in_f):
    bad = (("blocksize", 63, "blocksize"), ("blocksize", 2**13, "blocksize"), ("out_features", -1, "out_features"),
           ("out_features", 3.0, "out_features"))
    # (with in_features 0 a [2**40, 0] weight is valid: an empty 'packed' holds it)
    return bad + ((("out_features", 2**40, "out_features"),) if in_f else ())


def b_nf4_linear(d: Draw):
    dtype = d.dtype(QUANT)
    lead = d.lead()
    in_f, out_f = d.size(), d.size()
    args = dict(x=d.t(lead + (in_f,), dtype, bad=d.bad()), out_features=out_f, **_nf4_state(d, out_f, in_f))
    args["bias"] = d.t((out_f,), dtype) if d(st.booleans()) else None

    def expect(a):
        y = a["x"] @ _nf4_w64(a, out_f, in_f).T
        return y if a["bias"] is None else y + a["bias"]

    nested = "nested_absmax" in args
    dims = [("bias", 0), ("absmax", 0)] + ([("nested_absmax", 0), ("nested_code", 0)] if nested else [])
    if out_f * in_f > 1 or out_f == 0:
        dims.append(("packed", 0))
    if out_f >= 2:  # (with out_f == 1 an in_features one more or less may need the same number of bytes)
        dims.append(("x", -1))
    return Case(ops.nf4_linear, args, expect, dtype, grad=("x", "bias"), fixed_rank=("bias",), dims=tuple(dims),
                dtypes={"x": set(QUANT) if args["bias"] is None else {dtype}, "bias": {dtype}},
                colocated=("x", "packed", "absmax", "bias", "nested_absmax", "nested_code", "offset"),
                bad_values=_nf4_bad(in_f))


def b_qlora_linear(d: Draw):
    dtype = d.dtype(QUANT)
    lead = d.lead()
    in_f, out_f, r = d.size(), d.size(), d.size(0, 5)
    scaling = d.scale()  # (scaling 0 with an inf in x: see b_lora_linear)
    args = dict(x=d.t(lead + (in_f,), dtype, bad=d.bad(scaling != 0)), out_features=out_f,
                **_nf4_state(d, out_f, in_f))
    args.update(bias=d.t((out_f,), dtype) if d(st.booleans()) else None, lora_A=d.t((r, in_f), dtype, scale=0.5),
                lora_B=d.t((out_f, r), dtype, scale=0.5), scaling=scaling, dropout_p=d.dropout(),
                seed=d.seed())

    def expect(a):
        y = a["x"] @ _nf4_w64(a, out_f, in_f).T
        if a["bias"] is not None:
            y = y + a["bias"]
        xd = ref.seeded_dropout(a["x"], a["dropout_p"], a["seed"]) if a["dropout_p"] > 0 else a["x"]
        return y + a["scaling"] * ((xd @ a["lora_A"].T) @ a["lora_B"].T)

    dims = [("bias", 0), ("absmax", 0), ("lora_A", 0), ("lora_A", 1), ("lora_B", 0), ("lora_B", 1)]
    if out_f * in_f > 1 or out_f == 0:
        dims.append(("packed", 0))
    names = ("x", "bias", "lora_A", "lora_B")
    return Case(ops.qlora_linear, args, expect, dtype, grad=names, fixed_rank=("bias", "lora_A", "lora_B"),
                dims=tuple(dims), dtypes={k: {dtype} for k in names},
                colocated=("x", "packed", "absmax", "bias", "lora_A", "lora_B"),
                bad_values=_nf4_bad(in_f) + _LORA_BAD)


def b_kron_linear(d: Draw):
    dtype = d.dtype()
    lead = d.lead()
    a, b, c, dd = d.size(0, 5), d.size(0, 5), d.size(0, 5), d.size(0, 5)
    args = dict(scale=d.scale())
    dims = []
    for name, rows, cols, other_cols in (("w1", a, c, dd), ("w2", b, dd, c)):
        if d(st.booleans()):
            args[name] = d.t((rows, cols), dtype)
            if other_cols:
                dims.append((name, 1))
        else:
            rk = d.size(0, 4)
            args[f"{name}_a"] = d.t((rows, rk), dtype)
            args[f"{name}_b"] = d.t((rk, cols), dtype)
            dims += [(f"{name}_a", 1), (f"{name}_b", 0)]
            if other_cols:
                dims.append((f"{name}_b", 1))
    # a rank-0 factor is an exact zero: the op never multiplies x by it, the reference (x @ 0) does (NaN * 0)
    rank0 = any(args[k].shape[1] == 0 for k in ("w1_a", "w2_a") if k in args)
    args["x"] = d.t(lead + (c * dd,), dtype, bad=None if rank0 else d.bad(inf=False))
    if c * dd or True:
        dims.append(("x", -1))
    names = tuple(k for k in args if k != "scale")
    bad = [("scale", True, "scale"), ("scale", "1", "scale")]
    if "w1" in args:
        bad.append(("w1_a", args["w1"], "w1_a"))  # w1 and w1_a without w1_b
    else:
        bad.append(("w1", args["w1_a"], "w1"))  # w1 and (w1_a, w1_b)
        bad.append(("w1_b", None, "w1_b"))
    return Case(ops.kron_linear, args, lambda a: ref.kron_linear(**a), dtype, grad=names,
                fixed_rank=tuple(k for k in names if k != "x"), dims=tuple(dims), dtypes={k: {dtype} for k in names},
                colocated=names, bad_values=tuple(bad))


def b_ia3_linear(d: Draw):
    dtype = d.dtype()
    lead = d.lead()
    in_f, out_f = d.size(), d.size()
    scale_input = d(st.booleans())
    s_dtype = d(st.sampled_from([dtype, F32]))
    args = dict(x=d.t(lead + (in_f,), dtype, bad=d.bad()), weight=d.t((out_f, in_f), dtype, scale=0.5),
                bias=d.t((out_f,), dtype) if d(st.booleans()) else None,
                scale=d.t((in_f if scale_input else out_f,), s_dtype), scale_input=scale_input)
    dims = [("x", -1), ("weight", 1), ("scale", 0), ("bias", 0)]
    if args["bias"] is not None or not scale_input:
        dims.append(("weight", 0))
    names = ("x", "weight", "bias", "scale")
    dtypes = {k: {dtype} for k in names}
    dtypes["scale"] = {dtype, F32}
    return Case(ops.ia3_linear, args, lambda a: ref.ia3_linear(**a), dtype, grad=("x", "bias", "scale"),
                fixed_rank=("weight", "bias", "scale"), dims=tuple(dims), dtypes=dtypes, colocated=names,
                bad_values=(("scale_input", 1, "scale_input"), ("scale_input", None, "scale_input")))


def _hada_factors(d: Draw, dtype, out_f, in_f):
    r1, r2 = d.size(0, 4), d.size(0, 4)
    return dict(w1_a=d.t((out_f, r1), dtype), w1_b=d.t((r1, in_f), dtype), w2_a=d.t((out_f, r2), dtype),
                w2_b=d.t((r2, in_f), dtype))


_HADA_DIMS = (("w1_a", 0), ("w1_a", 1), ("w1_b", 0), ("w1_b", 1), ("w2_a", 0), ("w2_a", 1), ("w2_b", 0), ("w2_b", 1))


def b_hadamard_delta(d: Draw):
    dtype = d.dtype()
    args = _hada_factors(d, dtype, d.size(), d.size())
    if d(st.booleans()):  # plant a non-finite value in a factor
        k = d(st.sampled_from(sorted(args)))
        args[k] = d.t(args[k].shape, dtype, bad=d.bad())
    args["scale"] = d.scale()
    names = ("w1_a", "w1_b", "w2_a", "w2_b")
    return Case(ops.hadamard_delta, args, lambda a: ref.hadamard_delta(**a), dtype, grad=names, fixed_rank=names,
                dims=_HADA_DIMS, dtypes={k: {dtype} for k in names}, colocated=names,
                bad_values=(("scale", "x", "scale"), ("scale", None, "scale")))


def b_hadamard_linear(d: Draw):
    dtype = d.dtype()
    in_f, out_f = d.size(), d.size()
    args = _hada_factors(d, dtype, out_f, in_f)
    rank0 = args["w1_a"].shape[1] == 0 or args["w2_a"].shape[1] == 0  # an exact zero delta (see kron_linear)
    args["x"] = d.t(d.lead() + (in_f,), dtype, bad=None if rank0 else d.bad(inf=False))
    args["scale"] = d.scale()
    strategy = d(st.sampled_from([0, 1, 2]))
    names = ("x", "w1_a", "w1_b", "w2_a", "w2_b")

    def fn(**a):
        before = ops._HADAMARD_STRATEGY
        ops._HADAMARD_STRATEGY = strategy
        try:
            return ops.hadamard_linear(**a)
        finally:
            ops._HADAMARD_STRATEGY = before

    return Case(fn, args, lambda a: ref.hadamard_linear(**a), dtype, grad=names, fixed_rank=names[1:],
                dims=_HADA_DIMS + (("x", -1),), dtypes={k: {dtype} for k in names}, colocated=names,
                bad_values=(("scale", [1.0], "scale"),))


def b_cayley(d: Draw):
    dtype = d.dtype()
    n, b = d(st.integers(0, 4)), d.size(0, 9)
    k = d(st.sampled_from([0, 0, 1, 2, 3, 4, 5, 7]))
    a = d.randn((n, b, b))
    skew_vals = (a - a.transpose(1, 2)) * (0.3 / max(1, b)) if d(st.booleans()) else a * (0.2 / max(1, b))
    skew = d.t((n, b, b), dtype, values=skew_vals, bad=d.bad(inf=False))
    return Case(ops.cayley, dict(skew=skew, num_neumann_terms=k), lambda a: ref.cayley(**a), dtype, grad=("skew",),
                nan_blocks=True,
                fixed_rank=("skew",), dims=(("skew", 1), ("skew", 2)),
                bad_values=(("num_neumann_terms", -1, "num_neumann_terms"), ("num_neumann_terms", 1.5, "num_neumann_terms"),
                            ("num_neumann_terms", True, "num_neumann_terms")))


def _rot(d: Draw, dtype, lead_shape):
    b = d.size(0, 6)
    if b == 0:
        n, dd = d(st.integers(1, 3)), 0
    elif d(st.booleans()):
        n = 1
        dd = b * d(st.integers(0, 4))
    else:
        n = d(st.integers(1, 4))
        dd = n * b
    rot = d.t(lead_shape + (n, b, b), dtype, scale=0.5)
    dims = [("rot", -1), ("rot", -2)]
    if b and (n >= 3 or (n == 1 and 2 * b != dd)):  # (n -> n +- 1 stays valid if it lands on a shared block)
        dims.append(("rot", -3))
        if not (n == 1 and b == 1):
            dims.append(("x", -1))
    return rot, dd, dims


def b_block_diag_rotate(d: Draw):
    dtype = d.dtype()
    rot, dd, dims = _rot(d, dtype, ())
    x = d.t(d.lead() + (dd,), dtype, bad=d.bad())
    return Case(ops.block_diag_rotate, dict(x=x, rot=rot), lambda a: ref.block_diag_rotate(**a), dtype,
                grad=("x", "rot"), fixed_rank=("rot",), dims=tuple(dims), dtypes={"x": {dtype}, "rot": {dtype}},
                colocated=("x", "rot"))


def _perm(d: Draw, m, dd):
    rows = [torch.randperm(dd, generator=d.g) for _ in range(m)]
    return (torch.stack(rows) if m else torch.zeros(0, dd, dtype=torch.int64)).to(d.device)


def b_butterfly_rotate(d: Draw):
    dtype = d.dtype()
    m = d(st.integers(1, 3))
    rot, dd, dims = _rot(d, dtype, (m,))
    x = d.t(d.lead() + (dd,), dtype, bad=d.bad())
    perm = _perm(d, m, dd)
    bad = [("rot", rot[:0], "rot")]
    if dd >= 2:
        dup = perm.clone()
        dup[0, 0] = dup[0, 1]
        oob = perm.clone()
        oob[-1, 0] = dd
        bad += [("perm", dup, "perm"), ("perm", oob, "perm")]
    return Case(ops.butterfly_rotate, dict(x=x, rot=rot, perm=perm), lambda a: ref.butterfly_rotate(**a), dtype,
                grad=("x", "rot"), fixed_rank=("rot", "perm"), dims=tuple(dims) + (("perm", 0), ("perm", 1)),
                dtypes={"x": {dtype}, "rot": {dtype}}, colocated=("x", "rot", "perm"), bad_values=tuple(bad))


def _grads_case(case: Case, d: Draw, fn, ref_fn):
    """A *_rotate_grads case from a rotate case: (grad_x, grad_rot) against autograd of the reference."""
    a = dict(case.args)
    x = a["x"]
    a["grad_y"] = d.t(x.shape, x.dtype)
    a["need_grad_x"], a["need_grad_rot"] = d(st.booleans()), d(st.booleans())

    def expect(a64):
        with torch.enable_grad():
            xd = a64["x"].detach().requires_grad_(True)
            rd = a64["rot"].detach().requires_grad_(True)
            extra = (a64["perm"],) if "perm" in a64 else ()
            gx, gr = torch.autograd.grad(ref_fn(xd, rd, *extra), (xd, rd), a64["grad_y"], allow_unused=True)
        gx = gx if gx is not None else torch.zeros_like(xd)
        gr = gr if gr is not None else torch.zeros_like(rd)
        return (gx if a64["need_grad_x"] else None), (gr if a64["need_grad_rot"] else None)

    return Case(fn, a, expect, case.dtype, fixed_rank=case.fixed_rank, dims=case.dims + (("grad_y", -1),),
                dtypes={**case.dtypes, "grad_y": case.dtypes["x"]}, colocated=case.colocated + ("grad_y",),
                bad_values=case.bad_values)


def b_block_diag_rotate_grads(d: Draw):
    return _grads_case(b_block_diag_rotate(d), d, ops.block_diag_rotate_grads, ref.block_diag_rotate)


def b_butterfly_rotate_grads(d: Draw):
    return _grads_case(b_butterfly_rotate(d), d, ops.butterfly_rotate_grads, ref.butterfly_rotate)


def b_segmented_lora(d: Draw):
    dtype = d.dtype()
    lead = d.lead()
    n = d(st.integers(1, 4))
    in_f, out_f = d.size(), d.size()
    ranks = [d.size(0, 5) for _ in range(n)]
    x = d.t(lead + (in_f,), dtype, bad=d.bad())
    A = [d.t((r, in_f), dtype, scale=0.5) for r in ranks]
    B = [d.t((out_f, r), dtype, scale=0.5) for r in ranks]
    idx = torch.randint(-1, n, lead, generator=d.g).to(d.device)
    scal = [d.scale() for _ in range(n)]
    args = dict(x=x, lora_A=A, lora_B=B, scalings=scal, adapter_index=idx)

    def expect(a):
        x2 = a["x"].reshape(math.prod(lead), in_f)
        y = ref.segmented_lora(x2, a["lora_A"], a["lora_B"], a["scalings"], a["adapter_index"].reshape(-1))
        return y.reshape(*lead, out_f)

    dims = [("x", -1), ("lora_A", 0), ("lora_A", 1), ("lora_B", 1)] + ([("lora_B", 0)] if n > 1 else [])
    bad = [("scalings", scal[:-1], "scalings"), ("scalings", ["a"] * n, "scalings"), ("lora_B", B[:-1], "lora_B")]
    if idx.numel():
        for v in (n, -2, 2**40):
            wrong = idx.clone()
            wrong.view(-1)[0] = v
            bad.append(("adapter_index", wrong, "adapter_index"))
    return Case(ops.segmented_lora, args, expect, dtype, grad=("x", "lora_A", "lora_B"),
                fixed_rank=("lora_A", "lora_B", "adapter_index"), dims=tuple(dims),
                dtypes={"x": {dtype}, "lora_A": {dtype}, "lora_B": {dtype}},
                colocated=("x", "lora_A", "lora_B", "adapter_index"), bad_values=tuple(bad))


BUILDERS = {
    "seeded_dropout": b_seeded_dropout,
    "lora_linear": b_lora_linear,
    "multi_lora_mix": b_multi_lora_mix,
    "dora_weight_norm": b_dora_weight_norm,
    "dora_linear": b_dora_linear,
    "nf4_quantize": b_nf4_quantize,
    "nf4_dequantize": b_nf4_dequantize,
    "blockwise8_quantize": b_blockwise8_quantize,
    "blockwise8_dequantize": b_blockwise8_dequantize,
    "nf4_linear": b_nf4_linear,
    "qlora_linear": b_qlora_linear,
    "kron_linear": b_kron_linear,
    "ia3_linear": b_ia3_linear,
    "hadamard_delta": b_hadamard_delta,
    "hadamard_linear": b_hadamard_linear,
    "cayley": b_cayley,
    "block_diag_rotate": b_block_diag_rotate,
    "block_diag_rotate_grads": b_block_diag_rotate_grads,
    "butterfly_rotate": b_butterfly_rotate,
    "butterfly_rotate_grads": b_butterfly_rotate_grads,
    "segmented_lora": b_segmented_lora,
}


def test_every_public_op_is_fuzzed():
    assert set(ops.__all__) - {"new_dropout_seed"} == set(BUILDERS)


# ---- valid calls --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", sorted(BUILDERS))
def test_fuzz_valid(op, device):
    count = [0]

    @_settings(VALID_EXAMPLES, device)
    @given(st.data())
    def run(data):
        d = Draw(data, device)
        case = BUILDERS[op](d)
        count[0] += 1
        if case.raises_on_nonfinite:
            with pytest.raises(ERRORS, match=re.escape(case.raises_on_nonfinite)):
                case.fn(**case.args)
            return
        run_valid(case, d)

    run()
    print(f"fuzzed {count[0]} valid cases of {op} on {device}")


# ---- invalid calls ------------------------------------------------------------------------------

MUTATIONS = ("int", "rank", "dim", "dtype", "meta", "nontensor", "value")


def _resize(t: torch.Tensor, dim: int, d: Draw):
    shape = list(t.shape)
    shape[dim] = shape[dim] + 1 if shape[dim] < 2 or d(st.booleans()) else shape[dim] - 1
    if t.is_floating_point():
        return torch.randn(shape, generator=d.g, dtype=F64).to(t.dtype).to(t.device)
    if t.dtype == torch.int64 and t.dim() == 2:  # perm: rows of permutations of the new width
        return torch.stack([torch.randperm(shape[1], generator=d.g) for _ in range(shape[0])]).reshape(shape).to(t.device) \
            if shape[0] else torch.zeros(shape, dtype=t.dtype, device=t.device)
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


def _other_device(d: Draw) -> str:
    """A device the call's other tensors are not on: meta, or on a GPU run also the CPU."""
    return "meta" if d.device == "cpu" else d(st.sampled_from(["meta", "cpu"]))


def _tensor_args(case: Case):
    out = []
    for k, v in case.args.items():
        if isinstance(v, torch.Tensor):
            out.append(k)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out.append(k)
    return out


def mutate(case: Case, d: Draw):
    """Break one argument of a valid call; returns (args, the name the error must hold)."""
    kind = d(st.sampled_from(MUTATIONS), label="mutation")
    args = dict(case.args)
    targs = _tensor_args(case)

    def pick(names):
        names = [n for n in names if n in args and args[n] is not None]
        assume(names)
        return d(st.sampled_from(sorted(names)), label="arg")

    def apply(name, f):
        v = args[name]
        if isinstance(v, list):
            j = d(st.integers(0, len(v) - 1))
            v = list(v)
            v[j] = f(v[j])
            args[name] = v
        else:
            args[name] = f(v)

    if kind == "value":
        assume(case.bad_values)
        name, value, must = d(st.sampled_from(case.bad_values), label="bad value")
        args[name] = value
        return args, must
    if kind == "int":
        name = pick(targs)
        if name == "seed":
            apply(name, lambda t: t.to(torch.int32))
        else:
            apply(name, lambda t: t.to(torch.float32) if not t.is_floating_point() else
                  (t * 4).to(d(st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.bool]))))
        return args, name
    if kind == "rank":
        name = pick(case.fixed_rank)
        apply(name, lambda t: t.unsqueeze(0))
        return args, name
    if kind == "dim":
        assume(case.dims)
        name, dim = d(st.sampled_from(case.dims), label="dim")
        assume(name in args and args[name] is not None)
        apply(name, lambda t: _resize(t, dim, d))
        return args, name
    if kind == "dtype":
        name = pick(case.dtypes)
        wrong = sorted(set(FLOATS) - case.dtypes[name], key=str)
        assume(wrong)
        nd = d(st.sampled_from(wrong))
        apply(name, lambda t: t.to(nd))
        return args, name
    if kind == "meta":
        names = [n for n in case.colocated if n in args and args[n] is not None]
        assume(len(names) >= 2)
        name = pick(names)
        other = _other_device(d)
        apply(name, lambda t: t.to(other))
        return args, name
    name = pick(targs)  # nontensor
    args[name] = d(st.sampled_from([1.5, "tensor", (1, 2)]))
    return args, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", sorted(BUILDERS))
def test_fuzz_invalid(op, device):
    count = [0]

    @_settings(INVALID_EXAMPLES, device)
    @given(st.data())
    def run(data):
        d = Draw(data, device)
        case = BUILDERS[op](d)
        if any(_is_float_tensor(v) and not torch.isfinite(v).all() for v in case.args.values()):
            assume(case.raises_on_nonfinite is None)
        args, name = mutate(case, d)
        count[0] += 1
        with pytest.raises(ERRORS) as info:
            out = case.fn(**args)
            if isinstance(out, torch.Tensor) and out.device.type == "cuda":
                torch.cuda.synchronize()
        msg = str(info.value)
        assert re.search(re.escape(name), msg), f"the error does not name {name!r}: {type(info.value).__name__}: {msg}"

    run()
    print(f"fuzzed {count[0]} invalid cases of {op} on {device}")


# ---- the raw kernels: torch.ops.fastpeft.* as the public ops call them ---------------------------------


class _Recorder:
    """Stands in for fastpeft.ops._ops: records every raw op call (name, args) the public ops make."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __getattr__(self, name):
        op = getattr(self.real, name)

        def call(*args):
            self.calls.append((name, args))
            return op(*args)

        return call


def record_raw_calls(case: Case):
    """The raw calls of one forward (and, where the op is differentiable, one backward) of `case`."""
    rec = _Recorder(ops._ops)
    real, ops._ops = ops._ops, rec
    try:
        args = dict(case.args)
        for k in case.grad:
            v = args.get(k)
            if isinstance(v, list):
                args[k] = [t.detach().requires_grad_(True) for t in v]
            elif _is_float_tensor(v):
                args[k] = v.detach().requires_grad_(True)
        out = case.fn(**args)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.backward(torch.ones_like(out))
    finally:
        ops._ops = real
    return rec.calls


def _arg_names(op_name):
    return [a.name for a in getattr(torch.ops.fastpeft, op_name).default._schema.arguments]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", sorted(BUILDERS))
def test_fuzz_raw_kernels(op, device):
    """Break one tensor argument of one raw kernel call (wrong dtype, the meta device: the kernel must raise
    naming it; wrong rank or size, another float dtype, a non-contiguous view: it must raise or return, never
    crash or hang)."""
    count = [0]
    seen = set()

    @_settings(RAW_EXAMPLES, device)
    @given(st.data())
    def run(data):
        d = Draw(data, device)
        case = BUILDERS[op](d)
        assume(not case.raises_on_nonfinite)
        calls = record_raw_calls(case)
        assume(calls)
        name, args = calls[d(st.integers(0, len(calls) - 1), label="call")]
        names = _arg_names(name)
        slots = [(i, j) for i, a in enumerate(args) for j in ([None] if isinstance(a, torch.Tensor) else
                 range(len(a)) if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor) else [])]
        assume(slots)
        i, j = d(st.sampled_from(slots), label="arg")
        t = args[i] if j is None else args[i][j]
        kind = d(st.sampled_from(["int", "meta", "rank", "size", "dtype", "strided"]), label="mutation")
        if kind == "int":
            t2 = t.float() if not t.is_floating_point() else t.detach().to(torch.int32)
        elif kind == "meta":  # (a seed is a CPU scalar read on the host: a meta call may take a CPU one)
            others = [a for k, a in zip(names, args) if isinstance(a, torch.Tensor) and k != "seed"]
            assume(names[i] != "seed" and len(others) >= 2)
            t2 = t.detach().to(_other_device(d))
        elif kind == "rank":
            t2 = t.detach().unsqueeze(0) if d(st.booleans()) or t.dim() == 0 or t.shape[0] == 0 else t.detach()[0]
        elif kind == "size":
            assume(t.dim() >= 1)
            t2 = _resize(t.detach(), d(st.integers(0, t.dim() - 1)), d)
        elif kind == "dtype":
            assume(t.is_floating_point())
            t2 = t.detach().to(d(st.sampled_from(sorted(set(FLOATS) - {t.dtype}, key=str))))
        else:
            assume(t.dim() >= 1 and t.numel() > 1)
            t2 = t.detach().transpose(0, -1) if t.dim() >= 2 else t.detach()[::2]
        new = list(args)
        if j is None:
            new[i] = t2
        else:
            new[i] = list(args[i])
            new[i][j] = t2
        seen.add(name)
        count[0] += 1
        try:
            with torch.no_grad():
                out = getattr(torch.ops.fastpeft, name)(*new)
                if device == "cuda":
                    torch.cuda.synchronize()
        except ERRORS as e:
            if kind in ("int", "meta"):
                assert re.search(re.escape(names[i]), str(e)), (
                    f"{name}: the error for a broken '{names[i]}' does not name it: {type(e).__name__}: {e}")
            return
        assert kind not in ("int", "meta") or (kind == "int" and t.dtype == torch.int64 and names[i] == "seed"), (
            f"{name} accepted '{names[i]}' as {kind} ({t2.dtype}, {t2.device}) and returned")
        del out

    run()
    print(f"fuzzed {count[0]} broken raw calls of {op} on {device} ({', '.join(sorted(seen))})")


@pytest.mark.parametrize("shape", [[2**62, 4], [2**32, 2**32], [2**63 - 1, 1], [3, 2**62, 0]])
def test_raw_nf4_dequantize_shape_overflow(shape):
    # found by hand after the fuzzing: a shape whose element count overflows int64 wrapped to a count a small
    # 'packed' matched (the kernel then asked for an impossible output, or, for [3, 2**62, 0], got a valid one)
    packed, absmax = torch.zeros(0, dtype=torch.uint8), torch.zeros(0)
    if 0 in shape:  # a zero size anywhere: no overflow, a valid empty result
        assert torch.ops.fastpeft.nf4_dequantize(packed, absmax, 64, shape, F32).shape == tuple(shape)
        return
    with pytest.raises(RuntimeError, match="'shape'"):
        torch.ops.fastpeft.nf4_dequantize(packed, absmax, 64, shape, F32)


@pytest.mark.parametrize("out_features", [2**62, 2**63 - 1])
def test_raw_nf4_linear_size_overflow(out_features):
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="out_features"):
        torch.ops.fastpeft.nf4_linear(x, torch.zeros(0, dtype=torch.uint8), torch.zeros(0), None, None, None, 64,
                                      out_features, None)
