"""NF4 suite: fastpeft's NF4 kernels vs bitsandbytes (when installed) on one weight matrix.

Rows: quantise (with double quantisation), dequantise, and LinearNF4 (the fused NF4 matmul)
against bitsandbytes' Linear4bit: forward at 1, 16 and `tokens` rows (no grad; bitsandbytes in eval
mode, its inference kernels) and forward + backward to the input at 16 and `tokens` rows
(bitsandbytes in training mode). A second table gives the batch-1 forward's read rate of the packed
weights against a same-run memcpy. Bytes are checked equal before timing (a mismatch is reported as
a problem). Without bitsandbytes (e.g. the GPU machine) only fastpeft's times are listed.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch

from .common import BenchContext, Ratio, SuiteResult, Table, Target, dtype_name, register, time_interleaved

# The targets (bf16 compute, d=4096): never slower than bitsandbytes; batch-1 forward 3x
# it, reading the packed weights at >= 40% of memcpy bandwidth. Other dtypes: informational.
LINEAR_TARGETS = {"fwd 1 row": 3.0}
BANDWIDTH_TARGET = 0.4

COLUMNS = ["op", "dtype", "fastpeft ms", "bnb ms", "speedup", "target", "status"]


def _bnb():
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional as bf

        return bitsandbytes, bf
    except Exception:  # noqa: BLE001 - optional peer
        return None, None


def _bnb_linear(bnb, lin: torch.nn.Linear, blocksize: int, device: str):
    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compress_statistics=True,
                          quant_type="nf4", device="cpu")
    m.weight = bnb.nn.Params4bit(lin.weight.data.clone().cpu(), requires_grad=False, compress_statistics=True,
                                 quant_type="nf4", blocksize=blocksize)
    m.bias = torch.nn.Parameter(lin.bias.data.clone().cpu())
    return m.to(device).train()


def _row(ctx: BenchContext, res: SuiteResult, table: Table, op: str, dtype, fns: Dict[str, Any],
         target: Optional[Target]):
    t = time_interleaved(fns, ctx.device, ctx.warmup, ctx.repeats, ctx.min_sample_ms)
    speed = t.ratio("bnb", "fastpeft") if "bnb" in fns else None
    label = f"{op} {dtype_name(dtype)}"
    ratio = Ratio(f"nf4 {label} vs bnb", speed, target)
    if speed is not None:
        res.ratios.append(ratio)
    table.add(op=op, dtype=dtype_name(dtype), **{"fastpeft ms": t.median("fastpeft"),
              "bnb ms": t.median("bnb") if "bnb" in fns else None, "speedup": speed,
              "target": target.describe("x") if target else None, "status": ratio.status if speed is not None else None})
    return t


@register("nf4")
def run(ctx: BenchContext) -> SuiteResult:
    from fastpeft.nn import LinearNF4
    from fastpeft.quant.nf4 import dequantize_nf4, quantize_nf4

    res = SuiteResult("nf4", ctx.device)
    o = ctx.options
    out_f = o.get("out", 1024 if ctx.quick else 4096)
    in_f = o.get("in", 1024 if ctx.quick else 4096)
    tokens = o.get("tokens", 64 if ctx.quick else 512)
    bs = o.get("blocksize", 64)
    res.meta.update(out_features=out_f, in_features=in_f, tokens=tokens, blocksize=bs, double_quant=True,
                    dtypes=[dtype_name(t) for t in ctx.dtypes])
    bnb, bf = _bnb()
    if bnb is None:
        res.errors.append("bitsandbytes is not installed: fastpeft times only")
    dev = ctx.device
    table = Table(f"NF4 (blocksize {bs}, double quant) on a [{out_f}, {in_f}] weight, {tokens} tokens, {dev}", COLUMNS,
                  notes=["speedup: median per-round bnb_ms / fastpeft_ms; targets are informational"])
    bw_table = Table(f"NF4 batch-1 forward: packed-weight read rate vs memcpy ({16 if ctx.quick else 64} MiB), {dev}",
                     ["dtype", "packed MiB", "fwd 1 row ms", "packed GB/s", "memcpy GB/s", "% of memcpy", "target",
                      "status"])
    for dtype in ctx.dtypes:
        torch.manual_seed(0)
        w = (torch.randn(out_f, in_f) * in_f**-0.5).to(dtype).to(dev)
        packed, state = quantize_nf4(w, bs, True)
        fns = {"fastpeft": lambda: quantize_nf4(w, bs, True)}
        if bf is not None:
            bq, bstate = bf.quantize_4bit(w, blocksize=bs, compress_statistics=True, quant_type="nf4")
            if not (torch.equal(bq, packed) and torch.equal(bstate.absmax, state.absmax)):
                res.errors.append(f"quantise {dtype_name(dtype)}: bytes differ from bitsandbytes")
            fns["bnb"] = lambda: bf.quantize_4bit(w, blocksize=bs, compress_statistics=True, quant_type="nf4")
        _row(ctx, res, table, "quantize", dtype, fns, Target(1.0))
        fns = {"fastpeft": lambda: dequantize_nf4(packed, state)}
        if bf is not None:
            fns["bnb"] = lambda: bf.dequantize_4bit(bq, bstate, quant_type="nf4")
        _row(ctx, res, table, "dequantize", dtype, fns, Target(1.0))
        lin = torch.nn.Linear(in_f, out_f).to(dtype).to(dev)
        ours = LinearNF4.from_linear(lin, blocksize=bs)
        # Two bitsandbytes layers: in eval mode on the CPU it repacks its weight for its inference
        # kernel on the first forward, after which that layer no longer supports backward.
        theirs = _bnb_linear(bnb, lin, bs, dev).eval() if bnb is not None else None
        theirs_train = _bnb_linear(bnb, lin, bs, dev) if bnb is not None else None
        main = dtype == torch.bfloat16
        for rows in (1, 16, tokens):
            x = torch.randn(rows, in_f, dtype=dtype, device=dev)
            fns = {"fastpeft": lambda x=x: ours(x)}
            if theirs is not None:
                fns["bnb"] = lambda x=x: theirs(x)
            name = f"fwd {rows} row{'s' if rows > 1 else ''}"
            target = Target(LINEAR_TARGETS.get(name, 1.0)) if main else None
            with torch.no_grad():
                t = _row(ctx, res, table, f"linear {name}", dtype, fns, target)
            if rows == 1:
                _bandwidth(ctx, res, bw_table, dtype, packed.numel(), t.median("fastpeft"), main)
        for rows in (16, tokens):
            x = torch.randn(rows, in_f, dtype=dtype, device=dev, requires_grad=True)
            gy = torch.randn(rows, out_f, dtype=dtype, device=dev)
            fns = {"fastpeft": lambda x=x, gy=gy: ours(x).backward(gy)}
            if theirs_train is not None:
                fns["bnb"] = lambda x=x, gy=gy: theirs_train(x).backward(gy)
            _row(ctx, res, table, f"linear fwd+bwd(x) {rows} rows", dtype, fns, Target(1.0) if main else None)
    res.tables.append(table)
    res.tables.append(bw_table)
    return res


def _memcpy_gbps(ctx: BenchContext) -> float:
    src = torch.empty((16 if ctx.quick else 64) << 20, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    t = time_interleaved({"memcpy": lambda: dst.copy_(src)}, ctx.device, ctx.warmup, ctx.repeats, ctx.min_sample_ms)
    return src.numel() / (t.median("memcpy") * 1e-3) / 1e9


def _bandwidth(ctx: BenchContext, res: SuiteResult, table: Table, dtype, packed_bytes: int, ms: float,
               main: bool) -> None:
    """The batch-1 forward as a read rate of the packed weights, against memcpy (64 MiB; 16 with
    --quick) in this run."""
    copy = _memcpy_gbps(ctx)
    rate = packed_bytes / (ms * 1e-3) / 1e9
    target = Target(BANDWIDTH_TARGET) if main else None
    ratio = Ratio(f"nf4 linear fwd 1 row {dtype_name(dtype)}: packed-weight GB/s / memcpy GB/s", rate / copy, target)
    res.ratios.append(ratio)
    table.add(dtype=dtype_name(dtype), **{"packed MiB": packed_bytes / 2**20, "fwd 1 row ms": ms,
              "packed GB/s": rate, "memcpy GB/s": copy, "% of memcpy": 100.0 * rate / copy,
              "target": f">={100 * BANDWIDTH_TARGET:.0f}%" if main else None, "status": ratio.status or None})
