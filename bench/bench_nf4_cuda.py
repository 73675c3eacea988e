"""NF4 CUDA suite: the fused NF4 dequant-matmul kernels (torch.ops.fastpeft.nf4_linear and
nf4_linear_grad_input) on one [out, in] bf16 weight (default 4096 x 4096, blocksize 64, double quant)
against cuBLAS with the dense bf16 weight (F.linear / grad_y @ W), and bitsandbytes' matmul_4bit
beside it when importable.

Rows: the device's copy bandwidth (a large tensor copy, read + write bytes / time); nf4_linear at 1,
16 and 512 rows; nf4_linear_grad_input at 16 and 512 rows. Batch-1 is also timed as a CUDA graph of
back-to-back calls (device time without the host's per-call launch cost), and its achieved
bandwidth (packed weight + absmax bytes / time) is set against the copy bandwidth.
Targets (informational): batch-1 at >= 60% of copy bandwidth; 16 rows >= 2.5x faster than cuBLAS.
On a machine without CUDA the suite returns an error note and no rows.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .common import BenchContext, Ratio, SuiteResult, Table, Target, register, time_interleaved

COLUMNS = ["op", "rows", "fastpeft ms", "cuBLAS bf16 ms", "bnb ms", "vs cuBLAS", "GB/s", "target", "status"]


def _bnb():
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes  # noqa: F401

        return bitsandbytes
    except Exception:  # noqa: BLE001 - optional peer
        return None


def _graph_ms(fn: Callable[[], Any], calls: int = 20, replays: int = 20) -> Optional[float]:
    """Device milliseconds per call of `fn`, captured `calls` times in one CUDA graph."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / (replays * calls)
    except Exception:  # noqa: BLE001 - a capture problem is reported as a missing number
        return None


def _copy_gbps(ctx: BenchContext) -> float:
    nbytes = 256 * 2**20  # well above any L2
    a = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    b = torch.empty_like(a)
    t = time_interleaved({"copy": lambda: b.copy_(a)}, ctx.device, ctx.warmup, ctx.repeats, ctx.min_sample_ms)
    return 2 * nbytes / (t.median("copy") * 1e-3) / 1e9


@register("nf4_cuda")
def run(ctx: BenchContext) -> SuiteResult:
    res = SuiteResult("nf4_cuda", ctx.device)
    if not ctx.is_cuda or not torch.cuda.is_available():
        res.errors.append("nf4_cuda measures the CUDA kernels: run it with --device cuda on a machine with a GPU")
        return res
    import fastpeft

    if not fastpeft.build_info().get("cuda_compiled", False):
        res.errors.append("fastpeft was built without CUDA kernels")
        return res
    from fastpeft.quant.nf4 import dequantize_nf4, quantize_nf4

    fp = torch.ops.fastpeft
    o = ctx.options
    out_f = o.get("out", 4096)
    in_f = o.get("in", 4096)
    bs = o.get("blocksize", 64)
    dtype = torch.bfloat16
    dev = ctx.device
    res.meta.update(out_features=out_f, in_features=in_f, blocksize=bs, double_quant=True, dtype="bf16",
                    gpu=torch.cuda.get_device_name(0))

    copy = _copy_gbps(ctx)
    torch.manual_seed(0)
    w = (torch.randn(out_f, in_f) * in_f**-0.5).to(dtype).to(dev)
    packed, st = quantize_nf4(w, bs, True)
    dense = dequantize_nf4(packed, st, dtype)
    args = (packed, st.absmax, st.nested_absmax, st.nested_code, st.offset, st.blocksize)
    weight_bytes = packed.numel() + st.absmax.numel() * st.absmax.element_size()
    bias = torch.randn(out_f, dtype=dtype, device=dev)
    bnb = _bnb()
    bnb_state = None
    if bnb is not None:
        try:
            import bitsandbytes.functional as bf

            bq, bnb_state = bf.quantize_4bit(w, blocksize=bs, compress_statistics=True, quant_type="nf4")
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"bitsandbytes quantize_4bit failed: {type(exc).__name__}: {exc}")
            bnb = None
    else:
        res.errors.append("bitsandbytes is not installed: no bnb column")

    table = Table(f"fused NF4 matmul, [{out_f}, {in_f}] bf16 weight (blocksize {bs}, double quant), {dev}", COLUMNS,
                  notes=[f"device copy bandwidth {copy:.0f} GB/s (read + write)",
                         "vs cuBLAS: median per-round cuBLAS_ms / fastpeft_ms; GB/s: packed weight + absmax bytes / time",
                         "'graph' rows: the calls captured in one CUDA graph (device time, no per-call launch cost)"])

    def check(got, ref, what):
        err = (got.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item() + 1e-6
        if not err <= 3e-2 * scale:
            res.errors.append(f"{what}: max error {err:.3g} vs max |ref| {scale:.3g}")

    for n in (1, 16, 512):
        x = torch.randn(n, in_f, dtype=dtype, device=dev)
        ours = lambda x=x: fp.nf4_linear(x, *args, out_f, bias)  # noqa: E731
        fns: Dict[str, Callable[[], Any]] = {"fastpeft": ours, "cublas": lambda x=x: F.linear(x, dense, bias)}
        if bnb is not None:
            fns["bnb"] = lambda x=x: bnb.matmul_4bit(x, bq.t(), quant_state=bnb_state, bias=bias)
        check(ours(), F.linear(x, dense, bias), f"nf4_linear rows={n}")
        t = time_interleaved(fns, dev, ctx.warmup, ctx.repeats, ctx.min_sample_ms)
        speed = t.ratio("cublas", "fastpeft")
        target = Target(2.5) if n == 16 else None
        ms = t.median("fastpeft")
        table.add(op="nf4_linear", rows=n, **{"fastpeft ms": ms, "cuBLAS bf16 ms": t.median("cublas"),
                  "bnb ms": t.median("bnb") if "bnb" in t.samples else None, "vs cuBLAS": speed,
                  "GB/s": weight_bytes / (ms * 1e-3) / 1e9,
                  "target": target.describe("x") if target else None,
                  "status": target.check(speed) if target else None})
        res.ratios.append(Ratio(f"nf4_linear {n} rows vs cuBLAS bf16", speed, target))
        if n == 1:
            g_ours = _graph_ms(ours)
            g_cub = _graph_ms(fns["cublas"])
            gbps = weight_bytes / (g_ours * 1e-3) / 1e9 if g_ours else None
            frac = gbps / copy if gbps else None
            tgt = Target(0.6, label="fraction of copy bandwidth")
            table.add(op="nf4_linear graph", rows=n, **{"fastpeft ms": g_ours, "cuBLAS bf16 ms": g_cub,
                      "vs cuBLAS": (g_cub / g_ours) if (g_ours and g_cub) else None, "GB/s": gbps,
                      "target": ">=60% copy BW", "status": tgt.check(frac)})
            res.ratios.append(Ratio("nf4_linear batch-1 (graph) fraction of copy bandwidth", frac, tgt))
            res.meta["batch1_fraction_of_copy_bw"] = frac

    for n in (16, 512):
        gy = torch.randn(n, out_f, dtype=dtype, device=dev)
        ours = lambda gy=gy: fp.nf4_linear_grad_input(gy, *args, in_f)  # noqa: E731
        fns = {"fastpeft": ours, "cublas": lambda gy=gy: gy @ dense}
        check(ours(), gy @ dense, f"nf4_linear_grad_input rows={n}")
        t = time_interleaved(fns, dev, ctx.warmup, ctx.repeats, ctx.min_sample_ms)
        speed = t.ratio("cublas", "fastpeft")
        ms = t.median("fastpeft")
        table.add(op="grad_input", rows=n, **{"fastpeft ms": ms, "cuBLAS bf16 ms": t.median("cublas"),
                  "vs cuBLAS": speed, "GB/s": weight_bytes / (ms * 1e-3) / 1e9})
        res.ratios.append(Ratio(f"nf4_linear_grad_input {n} rows vs cuBLAS bf16", speed, None))
    res.tables.append(table)
    res.meta["copy_gbps"] = copy
    return res
