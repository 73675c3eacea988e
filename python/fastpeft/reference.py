"""Pure-PyTorch reference of every fastpeft kernel: the spec the C++/CUDA kernels are tested against.

It is also the fallback on devices that have no compiled kernel (e.g. MPS); `fastpeft.ops` never
uses it on CPU or CUDA. Everything here is written for clarity, not speed: the dropout mask is
materialised, DoRA's weight norm materialises ``B @ A``.

Dropout mask (mirrors ``csrc/common/dropout_hash.h`` bit for bit). For a 2-D input with ``cols``
columns, element ``(row, col)`` has the 64-bit index ``idx = row * cols + col``; with
``lo = idx & 0xFFFFFFFF``, ``hi = idx >> 32`` and the seed's two 32-bit words ``s_lo``, ``s_hi``::

    k1 = mix32(s_lo ^ 0x85ebca6b)
    k2 = mix32(s_hi + hi * 0x9e3779b9 + 0x27d4eb2f)          (mod 2**32)
    keep = mix32(mix32(lo + k1) ^ k2) >= floor(p * 2**32)     (threshold clamped to 2**32 - 1)

and ``drop(x) = x * (keep ? 1/(1-p) : 0)`` with the multiply in float32 (float64 for float64
inputs), rounded once to x's dtype. The 32-bit multiplies are done on int64 tensors with the
constant split into 16-bit halves so no intermediate reaches 2**63.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "dropout_threshold",
    "dropout_keep_mask",
    "seeded_dropout",
    "lora_forward",
    "lora_backward",
    "lora_linear",
    "multi_lora_mix_forward",
    "multi_lora_mix_backward",
    "multi_lora_mix",
    "dora_weight_norm",
    "dora_forward",
    "dora_backward",
    "dora_linear",
    "nf4_weight",
    "nf4_linear",
    "nf4_linear_grad_input",
    "cayley",
    "block_diag_rotate",
    "butterfly_rotate",
    "segmented_lora",
    "butterfly_matrix",
    "qlora_forward",
    "qlora_backward",
    "qlora_linear",
    "kron_weight",
    "kron_linear",
    "hadamard_delta",
    "hadamard_linear",
]

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32) (int or int64 tensor) and a 32-bit constant c."""
    c_lo, c_hi = c & 0xFFFF, c >> 16
    return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """The 32-bit finaliser of dropout_hash.h on ints or int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def dropout_threshold(p: float) -> int:
    """Kept iff hash >= threshold; threshold = floor(p * 2**32) clamped to 2**32 - 1."""
    t = float(p) * 4294967296.0
    return _M32 if t >= 4294967295.0 else int(t)


def _seed_value(seed) -> int:
    if isinstance(seed, Tensor):
        return int(seed.reshape(-1)[0].item())
    return int(seed)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep_mask(rows: int, cols: int, p: float, seed, device=None) -> Tensor:
    """Boolean keep mask [rows, cols] for the logical 2-D element indices ``row * cols + col``."""
    s = _seed_value(seed)
    s_lo, s_hi = s & _M32, (s >> 32) & _M32
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device).reshape(rows, cols)
    lo = idx & _M32
    hi = idx >> 32
    k1 = _mix32(s_lo ^ 0x85EBCA6B)
    k2 = _mix32((s_hi + _mul32(hi, 0x9E3779B9) + 0x27D4EB2F) & _M32)
    h = _mix32(_mix32((lo + k1) & _M32) ^ k2)
    return h >= dropout_threshold(p)


def _as_2d(x: Tensor) -> Tensor:
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() != 2 else x


def seeded_dropout(x: Tensor, p: float, seed) -> Tensor:
    """drop(x): x * keep / (1-p) (multiply by the float32 reciprocal), mask from the hash above.

    x is viewed as 2-D ``[-1, x.shape[-1]]`` for the element indices; p == 0 returns a copy.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"'dropout_p' must be in [0, 1), got {p}")
    if p == 0.0:
        return x.clone()
    x2 = _as_2d(x)
    op = _opmath(x.dtype)
    keep = dropout_keep_mask(x2.shape[0], x2.shape[1], p, seed, x.device)
    mult = torch.where(keep, torch.tensor(1.0 / (1.0 - p), dtype=op, device=x.device),
                       torch.zeros((), dtype=op, device=x.device))
    return (x2.to(op) * mult).to(x.dtype).reshape(x.shape)


def _drop(x: Tensor, p: float, seed) -> Tensor:
    return seeded_dropout(x, p, seed) if p > 0.0 else x


def lora_forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed) -> Tuple[Tensor, Tensor]:
    """(y, u): u = drop(x) A^T, y = x W^T + b + s u B^T."""
    u = _drop(x, dropout_p, seed) @ lora_A.t()
    y = torch.nn.functional.linear(x, weight, bias) + scaling * (u @ lora_B.t())
    return y, u


def lora_backward(grad_y, x, weight, lora_A, lora_B, u, scaling: float, dropout_p: float, seed):
    """(grad_x, grad_A, grad_B) of lora_forward's y (u treated as an internal value)."""
    gu = scaling * (grad_y @ lora_B)
    grad_B = scaling * (grad_y.t() @ u)
    if dropout_p > 0.0:
        keep = dropout_keep_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device)
        mult = keep.to(x.dtype) / (1.0 - dropout_p)
        grad_x = grad_y @ weight + mult * (gu @ lora_A)
    else:
        grad_x = grad_y @ weight + gu @ lora_A
    grad_A = gu.t() @ _drop(x, dropout_p, seed)
    return grad_x, grad_A, grad_B


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed=None) -> Tensor:
    """Differentiable reference of ``fastpeft.ops.lora_linear`` (any leading dims on x)."""
    xd = _drop(x, dropout_p, seed)
    return torch.nn.functional.linear(x, weight, bias) + scaling * ((xd @ lora_A.t()) @ lora_B.t())


# ---- multi-adapter LoRA mix (X-LoRA) ----------------------------------------------------------------


def _mix_dropped(x, n: int, p: float, seed) -> Tensor:
    """[n, T, in]: adapter j's dropped input, rows j T .. j T + T - 1 of seeded_dropout(x repeated n times)."""
    return seeded_dropout(x.repeat(n, 1), p, seed).reshape(n, x.shape[0], x.shape[1])


def multi_lora_mix_forward(x, lora_A, lora_B, scalings, base=None, dropout_p: float = 0.0,
                           seed=None) -> Tuple[Tensor, Tensor]:
    """(y, u) of the multi-adapter mix: x [T, in], lora_A [n, r, in], lora_B [n, out, r], scalings [T, n],
    base [T, out] or None. ``u = x A_cat^T`` ([T, n r], A_cat = lora_A viewed [n r, in]; with dropout the
    j-th r-block is drop_j(x) A_j^T); ``y = base + sum_j scalings[:, j] * u_j B_j^T``, the block scaling done
    in op-math and rounded to x's dtype once."""
    n, r, d_in = lora_A.shape
    if dropout_p > 0.0:
        xd = _mix_dropped(x, n, dropout_p, seed)
        u = torch.cat([xd[j] @ lora_A[j].t() for j in range(n)], dim=1) if n else x.new_zeros(x.shape[0], 0)
    else:
        u = x @ lora_A.reshape(n * r, d_in).t()
    v = (u.to(_opmath(x.dtype)).reshape(u.shape[0], n, r) * scalings.to(_opmath(x.dtype)).unsqueeze(-1)).to(x.dtype)
    y = v.reshape(u.shape[0], n * r) @ lora_B.transpose(1, 2).reshape(n * r, lora_B.shape[1])
    return (y if base is None else base + y), u


def multi_lora_mix_backward(grad_y, x, lora_A, lora_B, scalings, u, dropout_p: float = 0.0, seed=None):
    """(grad_x, grad_A, grad_B, grad_scalings) of multi_lora_mix_forward's y."""
    n, r, d_in = lora_A.shape
    out = lora_B.shape[1]
    gv = (grad_y @ lora_B.permute(1, 0, 2).reshape(out, n * r)).reshape(u.shape[0], n, r)
    s = scalings.unsqueeze(-1).to(gv.dtype)
    gu = (gv * s).reshape(u.shape[0], n * r)
    v = (u.reshape(u.shape[0], n, r) * s).reshape(u.shape[0], n * r)
    grad_s = (gv * u.reshape(u.shape[0], n, r)).sum(-1).to(scalings.dtype)
    if dropout_p > 0.0:
        keep = dropout_keep_mask(n * x.shape[0], d_in, dropout_p, seed, x.device).reshape(n, x.shape[0], d_in)
        mult = keep.to(x.dtype) / (1.0 - dropout_p)
        xd = _mix_dropped(x, n, dropout_p, seed)
        gu3 = gu.reshape(u.shape[0], n, r)
        grad_x = sum((mult[j] * (gu3[:, j] @ lora_A[j]) for j in range(n)), torch.zeros_like(x))
        grad_A = torch.stack([gu3[:, j].t() @ xd[j] for j in range(n)]) if n else lora_A.new_zeros(lora_A.shape)
    else:
        grad_x = gu @ lora_A.reshape(n * r, d_in)
        grad_A = (gu.t() @ x).reshape(n, r, d_in)
    grad_B = (grad_y.t() @ v).reshape(out, n, r).permute(1, 0, 2).contiguous()
    return grad_x, grad_A, grad_B, grad_s


def multi_lora_mix(x, lora_A, lora_B, scalings, base=None, dropout_p: float = 0.0, seed=None) -> Tensor:
    """Differentiable reference of ``fastpeft.ops.multi_lora_mix`` (any leading dims on x and scalings): the
    per-adapter sum written out, ``base + sum_j s_j * (drop_j(x) A_j^T) B_j^T``."""
    y = None
    n = lora_A.shape[0]
    xd = _mix_dropped(_as_2d(x), n, dropout_p, seed).reshape(n, *x.shape) if dropout_p > 0 else None
    for j in range(n):
        xj = x if xd is None else xd[j]
        term = scalings[..., j : j + 1].to(x.dtype) * ((xj @ lora_A[j].t()) @ lora_B[j].t())
        y = term if y is None else y + term
    if y is None:
        y = x.new_zeros((*x.shape[:-1], lora_B.shape[1]))
    return y if base is None else base + y


def dora_weight_norm(weight, lora_A, lora_B, scaling: float) -> Tensor:
    """||W + s B A||_2 per output row, materialising B A, in float32 (float64 for float64)."""
    op = _opmath(weight.dtype)
    w = weight.to(op) + scaling * (lora_B.to(op) @ lora_A.to(op))
    return torch.linalg.vector_norm(w, dim=1)


def _mag_norm(magnitude: Tensor, weight_norm: Tensor) -> Tensor:
    op = _opmath(magnitude.dtype)
    return magnitude.to(op) / weight_norm.to(op)


def dora_forward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling: float, dropout_p: float, seed):
    """(y, u, z): peft's DoRA with xd = drop(x), u = xd A^T, z = xd W^T + s u B^T and
    y = x W^T + b + (m/n - 1) xd W^T + (m/n) s u B^T  (= (m/n) z + b without dropout)."""
    xd = _drop(x, dropout_p, seed)
    mn = _mag_norm(magnitude, weight_norm)
    u = xd @ lora_A.t()
    p = xd @ weight.t()
    q = u @ lora_B.t()
    z = p + scaling * q
    y = x @ weight.t() + (mn - 1).to(x.dtype) * p + (mn * scaling).to(x.dtype) * q
    if bias is not None:
        y = y + bias
    return y, u, z


def dora_backward(grad_y, x, weight, lora_A, lora_B, magnitude, weight_norm, u, z, scaling: float,
                  dropout_p: float, seed):
    """(grad_x, grad_A, grad_B, grad_magnitude) of dora_forward's y, weight_norm held constant."""
    op = _opmath(x.dtype)
    mn = _mag_norm(magnitude, weight_norm)
    grad_m = ((grad_y.to(op) * z.to(op)).sum(0) / weight_norm.to(op)).to(magnitude.dtype)
    gz = grad_y * mn.to(x.dtype)
    gu = scaling * (gz @ lora_B)
    grad_B = scaling * (gz.t() @ u)
    if dropout_p > 0.0:
        keep = dropout_keep_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device)
        mult = keep.to(x.dtype) / (1.0 - dropout_p)
        grad_x = grad_y @ weight + mult * ((gz - grad_y) @ weight + gu @ lora_A)
    else:
        grad_x = gz @ weight + gu @ lora_A
    grad_A = gu.t() @ _drop(x, dropout_p, seed)
    return grad_x, grad_A, grad_B, grad_m


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float = 0.0,
                seed=None) -> Tensor:
    """Differentiable reference of ``fastpeft.ops.dora_linear`` (peft's DoRA; the norm is detached)."""
    with torch.no_grad():
        n = dora_weight_norm(weight, lora_A, lora_B, scaling)
    xd = _drop(x, dropout_p, seed)
    mn = (magnitude.to(n.dtype) / n).to(x.dtype)
    p = xd @ weight.t()
    q = (xd @ lora_A.t()) @ lora_B.t()
    y = x @ weight.t() + (mn - 1) * p + mn * scaling * q
    return y + bias if bias is not None else y


# ---- nf4 family -----------------------------------------------------------------------------------
#
# bitsandbytes 0.50.2's formats, byte for byte (its `quantize_4bit(..., quant_type="nf4")` on the
# CPU and its CPU 8-bit `quantize_blockwise` for the double-quant statistics):
#
# NF4: x = w.flatten() in float32, blocks of `blocksize` values (a power of two in [32, 4096]).
#   full block:    absmax = max|x|;                 s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)
#   partial block: absmax = max(max|x|, 1e-38);     s = clamp(x / absmax, -1, 1)
#   code = number of bounds (NF4[i] + NF4[i+1]) / 2 (fp32) strictly below s (a tie goes to the
#   lower code); two codes per byte, even element in the HIGH nibble; an odd count is padded with
#   the code of 0.0 (7). packed is uint8 [(n + 1) // 2, 1].
# 8-bit blockwise (absmax of the absmax values, offset removed): absmax = max|x| per block; a block
#   with absmax 0 is all code 0; otherwise v = clamp(x * (1 / absmax), -1, 1) and
#   q = lut[int(((v + 1) * 0.5) * 65535 + 0.5)] with lut[i] = the number of leading midpoints
#   0.5 * (c[j] + c[j+1]) below -1 + 2i / 65535 (all float32, no fused multiply-add).
# Dequantisation: code[q] * absmax in float32, then one rounding to the output dtype.

NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_code(device=None) -> Tensor:
    """The 16 NF4 values (bitsandbytes' ``get_4bit_type("nf4")``), float32."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """bitsandbytes' ``create_dynamic_map``: the 256-entry 8-bit dynamic code (sorted, float32)."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def check_blocksize(blocksize) -> None:
    """Raise ValueError unless blocksize is a power of two in [32, 4096]."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 32 <= blocksize <= 4096 or (
        blocksize & (blocksize - 1)
    ):
        raise ValueError(f"'blocksize' must be a power of two in [32, 4096], got {blocksize!r}")


def _blocks(x: Tensor, blocksize: int):
    """Yield (start, stop) of each block of the flat tensor x."""
    n = x.numel()
    for start in range(0, n, blocksize):
        yield start, min(start + blocksize, n)


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise RuntimeError(f"fastpeft: '{name}' contains NaN or infinite values, which blockwise quantisation cannot represent")


def nf4_quantize(w: Tensor, blocksize: int) -> Tuple[Tensor, Tensor]:
    """(packed uint8 [(n+1)//2, 1], absmax float32 [blocks]) of w, bitsandbytes' NF4 bytes."""
    check_blocksize(blocksize)
    x = w.reshape(-1).float()
    _check_finite(x, "w")
    n = x.numel()
    full = n - n % blocksize
    bounds = (nf4_code(x.device)[:-1] + nf4_code(x.device)[1:]) / 2
    xc = x[:full].reshape(-1, blocksize)
    absmax = xc.abs().amax(dim=1) if full else x.new_empty(0)
    scaled = torch.clamp(xc * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        am = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / am, -1, 1)])
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = (bounds.unsqueeze(0) < scaled.unsqueeze(1)).sum(1).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    return packed, absmax


def nf4_dequantize(packed: Tensor, absmax: Tensor, blocksize: int, shape, dtype: torch.dtype) -> Tensor:
    """code[q] * absmax in float32, cast to dtype, reshaped to shape."""
    check_blocksize(blocksize)
    n = 1
    for d in shape:
        n *= int(d)
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (nf4_code(p.device)[q] * scale).to(dtype).reshape(tuple(shape))


def blockwise8_lut(code: Tensor) -> Tensor:
    """bitsandbytes' 65536-entry quantisation lookup table of a sorted 256-entry code (uint8)."""
    c = code.float().cpu()
    mid = 0.5 * (c[:-1] + c[1:])
    val = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    # leading run of midpoints below val (= all of them below it for a sorted code)
    below = (mid.unsqueeze(0) < val.unsqueeze(1)).to(torch.int32)
    run = torch.cumprod(below, dim=1).sum(1)
    return run.to(torch.uint8)


def blockwise8_quantize(x: Tensor, code: Tensor, blocksize: int) -> Tuple[Tensor, Tensor]:
    """(q uint8 shaped like x, absmax float32 [blocks]): bitsandbytes' CPU 8-bit blockwise quantiser."""
    check_blocksize(blocksize)
    xf = x.reshape(-1).float()
    _check_finite(xf, "x")
    lut = blockwise8_lut(code).to(xf.device)
    q = torch.zeros(xf.numel(), dtype=torch.uint8, device=xf.device)
    absmax = []
    for start, stop in _blocks(xf, blocksize):
        blk = xf[start:stop]
        am = blk.abs().max()
        absmax.append(am)
        if am.item() == 0.0:
            continue
        v = torch.clamp(blk * (1.0 / am), -1, 1)
        t = ((v + 1.0) * 0.5) * 65535.0 + 0.5
        q[start:stop] = lut[t.to(torch.int64)]
    absmax_t = torch.stack(absmax) if absmax else xf.new_empty(0)
    return q.reshape(x.shape), absmax_t


def blockwise8_dequantize(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    """code[q] * absmax in float32, cast to dtype, shaped like q."""
    check_blocksize(blocksize)
    flat = q.reshape(-1).long()
    scale = absmax.float().repeat_interleave(blocksize)[: flat.numel()]
    return (code.float()[flat] * scale).to(dtype).reshape(q.shape)


# ---- fused NF4 matmul -----------------------------------------------------------------------------
#
# W [out, in] is the NF4 weight above (row-major flattened; blocks need not align with rows). With
# double quantisation its absmax is decoded per block as nested_code[absmax[b]] *
# nested_absmax[b // 256] + offset (float32, no fused multiply-add). The compute dtype is x's
# (float32/bfloat16/float16): the products are summed in float32 and rounded once to x's dtype.

NESTED_BLOCKSIZE = 256


def nf4_weight(packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
               offset: Optional[Tensor], blocksize: int, out_features: int, in_features: int) -> Tensor:
    """The float32 [out_features, in_features] weight an NF4 quant state describes."""
    if nested_absmax is not None:
        absmax = blockwise8_dequantize(absmax, nested_absmax, nested_code, NESTED_BLOCKSIZE, torch.float32)
        absmax = absmax + offset.float().reshape(())
    return nf4_dequantize(packed, absmax, blocksize, (out_features, in_features), torch.float32)


def nf4_linear(x, packed, absmax, nested_absmax, nested_code, offset, blocksize: int, out_features: int,
               bias=None) -> Tensor:
    """x W^T + bias in float32, rounded to x's dtype (any leading dims on x; differentiable in x, bias)."""
    w = nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, x.shape[-1])
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)


def nf4_linear_grad_input(grad_y, packed, absmax, nested_absmax, nested_code, offset, blocksize: int,
                          in_features: int) -> Tensor:
    """grad_y W in float32, rounded to grad_y's dtype."""
    w = nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, grad_y.shape[-1], in_features)
    return (grad_y.float() @ w).to(grad_y.dtype)


def qlora_forward(x, packed, absmax, nested_absmax, nested_code, offset, blocksize: int, bias, lora_A, lora_B,
                  scaling: float, dropout_p: float, seed) -> Tuple[Tensor, Tensor]:
    """(y, u): lora_forward with the base product x W^T + b from nf4_linear."""
    u = _drop(x, dropout_p, seed) @ lora_A.t()
    y = nf4_linear(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, lora_B.shape[0], bias)
    return y + scaling * (u @ lora_B.t()), u


def qlora_backward(grad_y, x, packed, absmax, nested_absmax, nested_code, offset, blocksize: int, lora_A, lora_B,
                   u, scaling: float, dropout_p: float, seed):
    """(grad_x, grad_A, grad_B) of qlora_forward's y (u treated as an internal value)."""
    gu = scaling * (grad_y @ lora_B)
    grad_B = scaling * (grad_y.t() @ u)
    lora_x = gu @ lora_A
    if dropout_p > 0.0:
        keep = dropout_keep_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device)
        lora_x = (keep.to(x.dtype) / (1.0 - dropout_p)) * lora_x
    base_x = nf4_linear_grad_input(grad_y, packed, absmax, nested_absmax, nested_code, offset, blocksize, x.shape[1])
    grad_A = gu.t() @ _drop(x, dropout_p, seed)
    return base_x + lora_x, grad_A, grad_B


def qlora_linear(x, packed, absmax, nested_absmax, nested_code, offset, blocksize: int, out_features: int, bias,
                 lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed=None) -> Tensor:
    """Differentiable reference of ``fastpeft.ops.qlora_linear`` (any leading dims on x)."""
    xd = _drop(x, dropout_p, seed)
    y = nf4_linear(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias)
    return y + scaling * ((xd @ lora_A.t()) @ lora_B.t())


# ---- kron family (LoKr) -----------------------------------------------------------------------------


def _kron_factor(w: Optional[Tensor], w_a: Optional[Tensor], w_b: Optional[Tensor]) -> Tensor:
    return w if w is not None else w_a @ w_b


def kron_weight(w1=None, w2=None, *, w1_a=None, w1_b=None, w2_a=None, w2_b=None, scale: float = 1.0) -> Tensor:
    """LoKr's delta weight, peft's ``make_kron``: ``scale * kron(W1, W2)`` with ``W1 = w1`` or
    ``w1_a @ w1_b`` ([a, c]) and ``W2 = w2`` or ``w2_a @ w2_b`` ([b, d]); shape [a b, c d]."""
    return torch.kron(_kron_factor(w1, w1_a, w1_b).contiguous(), _kron_factor(w2, w2_a, w2_b).contiguous()) * scale


def kron_linear(x, w1=None, w2=None, *, w1_a=None, w1_b=None, w2_a=None, w2_b=None, scale: float = 1.0) -> Tensor:
    """``x @ kron_weight(...)^T``: x [..., c d] -> [..., a b] (the Kronecker product materialised)."""
    w = kron_weight(w1, w2, w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b, scale=scale)
    return torch.nn.functional.linear(x, w)


# ---- ia3 family (IA3) ---------------------------------------------------------------------------------


def ia3_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, scale_input: bool) -> Tensor:
    """peft's IA3 Linear: ``scale_input`` (peft's feedforward modules, scale [in]):
    ``y = (x * scale) W^T + b``; otherwise (scale [out]) ``y = (x W^T + b) * scale``. The scaling is
    done in op-math (float32; float64 for float64) and rounded once to x's dtype."""
    opm = _opmath(x.dtype)
    if scale_input:
        xs = (x.to(opm) * scale.to(opm)).to(x.dtype)
        return torch.nn.functional.linear(xs, weight, bias)
    y0 = torch.nn.functional.linear(x, weight, bias)
    return (y0.to(opm) * scale.to(opm)).to(x.dtype)


# ---- hadamard family (LoHa) -------------------------------------------------------------------------


def hadamard_delta(w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float = 1.0) -> Tensor:
    """LoHa's delta weight, peft's ``make_weight``: ``scale * (w1_a @ w1_b) * (w2_a @ w2_b)`` [out, in]."""
    return (w1_a @ w1_b) * (w2_a @ w2_b) * scale


def hadamard_linear(x: Tensor, w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float = 1.0) -> Tensor:
    """``x @ hadamard_delta(...)^T``: x [..., in] -> [..., out] (the delta weight materialised)."""
    return torch.nn.functional.linear(x, hadamard_delta(w1_a, w1_b, w2_a, w2_b, scale))


# ---- orthogonal family (OFT, BOFT) --------------------------------------------------------------------


def cayley(skew: Tensor, num_neumann_terms: int = 0) -> Tensor:
    """Batched Cayley transform of square blocks ``skew`` [n, b, b] -> R [n, b, b] (skew's dtype).

    ``num_neumann_terms == 0``: the exact form peft uses (OFT with ``use_cayley_neumann=False``, and
    BOFT): ``R = (I - S)(I + S)^-1``. ``num_neumann_terms = k >= 1``: peft OFT's truncated series, which
    approximates the *other* sign convention ``(I + S)(I - S)^-1``:
    ``k = 1: I``; ``k = 2: I + 2S``; ``k = 3: I + 2S + 2S^2 + S^3`` (peft's loop gives k = 3 and k = 4
    the same polynomial); ``k >= 4: I + 2(S + ... + S^(k-2)) + S^(k-1)``.
    Computed in float32 (float64 for float64 input) and rounded once. Defined for any square matrix;
    making S skew-symmetric is the caller's job (so gradients are the plain matrix derivative).
    """
    if num_neumann_terms < 0:
        raise ValueError(f"num_neumann_terms must be >= 0, got {num_neumann_terms}")
    acc = torch.float64 if skew.dtype == torch.float64 else torch.float32
    s = skew.to(acc)
    n, b, _ = s.shape
    eye = torch.eye(b, dtype=acc, device=s.device).expand(n, b, b)
    if num_neumann_terms == 0:
        r = torch.linalg.solve(eye + s, eye - s, left=False)
    else:
        r = eye.clone()
        k = num_neumann_terms
        if k >= 2:
            r = r + 2 * s
        if k >= 3:
            last = max(k - 1, 3)  # peft: k = 3 and k = 4 both end at S^3
            power = s
            for j in range(2, last + 1):
                power = power @ s
                r = r + (power if j == last else 2 * power)
    return r.to(skew.dtype)


def block_diag_rotate(x: Tensor, rot: Tensor) -> Tensor:
    """``x @ blockdiag(rot)``: x [..., d], rot [n, b, b] with ``n * b == d`` (one block per slice of b
    features) or ``n == 1`` (one block shared by all ``d / b`` slices). ``y[..., k b + c] =
    sum_j x[..., k b + j] rot[k, j, c]``. Accumulates in float32, rounds once to x's dtype."""
    d = x.shape[-1]
    b = rot.shape[-1]
    if b == 0:  # 0x0 blocks: d == 0, nothing to rotate
        return x.clone()
    blocks = d // b
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = rot.to(acc).expand(blocks, b, b) if rot.shape[0] == 1 else rot.to(acc)
    xb = x.to(acc).reshape(*x.shape[:-1], blocks, b)
    return torch.einsum("...kj,kjc->...kc", xb, r).reshape(x.shape).to(x.dtype)


def butterfly_matrix(rot: Tensor, perm: Tensor) -> Tensor:
    """The dense [d, d] matrix ``M_0 M_1 ... M_(m-1)`` of :func:`butterfly_rotate` (float32; for tests)."""
    m, n, b, _ = rot.shape
    d = perm.shape[1]
    total = torch.eye(d, dtype=torch.float64)
    for i in range(m):
        p = torch.zeros(d, d, dtype=torch.float64)
        p[torch.arange(d), perm[i].cpu()] = 1.0
        blocks = rot[i].detach().cpu().to(torch.float64).expand(d // b, b, b)
        total = total @ (p @ torch.block_diag(*blocks.unbind(0)) @ p.T)
    return total.to(torch.float32)


def butterfly_rotate(x: Tensor, rot: Tensor, perm: Tensor) -> Tensor:
    """``x @ M_0 @ M_1 @ ... @ M_(m-1)`` with ``M_i = P_i blockdiag(rot[i]) P_i^T``, ``P_i[j, perm[i, j]] = 1``.

    x [..., d]; rot [m, n, b, b] (``n * b == d`` or ``n == 1``); perm int64 [m, d], each row a permutation
    of ``0..d-1``. Factor i is applied as index maps, never as a dense matrix:
    ``u[..., perm[i, j]] = z[..., j]``; ``v = block_diag_rotate(u, rot[i])``; ``z'[..., j] = v[..., perm[i, j]]``.
    Each factor rounds to x's dtype (as applying the factors one by one does).
    """
    z = x
    for i in range(rot.shape[0]):
        p = perm[i].to(x.device)
        u = torch.empty_like(z)
        u[..., p] = z
        v = block_diag_rotate(u, rot[i])
        z = v[..., p]
    return z


def segmented_lora(x: Tensor, lora_A, lora_B, scalings, adapter_index: Tensor) -> Tensor:
    """Mixed-adapter batch LoRA delta: ``delta[t] = s_k (x[t] A_k^T) B_k^T`` with ``k = adapter_index[t]``.

    x [T, in]; lora_A[k] [r_k, in]; lora_B[k] [out, r_k]; scalings[k] a float; adapter_index int64 [T]
    with -1 for rows that take no adapter (their delta is zero). Op-math (float32; float64 for float64)
    sums, rounded once to x's dtype.
    """
    out_f = lora_B[0].shape[0]
    delta = x.new_zeros((x.shape[0], out_f))
    op = _opmath(x.dtype)
    for k in range(len(lora_A)):
        rows = (adapter_index == k).nonzero().flatten()
        if rows.numel() == 0:
            continue
        u = x[rows].to(op) @ lora_A[k].to(op).T
        delta[rows] = (float(scalings[k]) * (u @ lora_B[k].to(op).T)).to(x.dtype)
    return delta
