"""NF4 suite: fastpeft's NF4 kernels vs bitsandbytes (when installed) on one weight matrix.

Rows: quantise (with double quantisation), dequantise, and a LinearNF4 forward against
bitsandbytes' Linear4bit (its generic dequantise + matmul path, training mode). Bytes are checked
equal before timing (a mismatch is reported as a problem). Without bitsandbytes (e.g. the GPU
machine) only fastpeft's times are listed.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch

from .common import BenchContext, Ratio, SuiteResult, Table, Target, dtype_name, register, time_interleaved

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
         target: Optional[Target]) -> None:
    t = time_interleaved(fns, ctx.device, ctx.warmup, ctx.repeats, ctx.min_sample_ms)
    speed = t.ratio("bnb", "fastpeft") if "bnb" in fns else None
    label = f"{op} {dtype_name(dtype)}"
    ratio = Ratio(f"nf4 {label} vs bnb", speed, target)
    if speed is not None:
        res.ratios.append(ratio)
    table.add(op=op, dtype=dtype_name(dtype), **{"fastpeft ms": t.median("fastpeft"),
              "bnb ms": t.median("bnb") if "bnb" in fns else None, "speedup": speed,
              "target": target.describe("x") if target else None, "status": ratio.status if speed is not None else None})


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
        x = torch.randn(tokens, in_f, dtype=dtype, device=dev)
        fns = {"fastpeft": lambda: ours(x)}
        if bnb is not None:
            theirs = _bnb_linear(bnb, lin, bs, dev)
            fns["bnb"] = lambda: theirs(x)
        with torch.no_grad():
            _row(ctx, res, table, "linear fwd", dtype, fns, Target(1.0))
    res.tables.append(table)
    return res
