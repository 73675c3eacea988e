"""Mixed-adapter batches: cost vs the number of distinct adapters in one batch, fastpeft vs peft.

One LoRA-adapted nn.Linear (d x d, bias), `rows` batch rows (of `tokens / rows` tokens each), n_max
adapters of rank r loaded in both libraries (the same random weights; outputs compared once before
timing). Inference forward (no_grad) with `adapter_names` spreading the rows round-robin over n = 1, 4,
16, 64 adapters; plus the single-adapter forward without adapter_names. Each library's time per n is
divided by its own n = 1 time: fastpeft's segmented op (rows grouped by adapter, shrink then expand)
should stay flat, peft's per-adapter sub-batch loop grows with n.

Target (the issue's): fastpeft's time at every n within 1.5x of its n = 1 time.
"""
from __future__ import annotations

import copy

import torch

from .bench_lora import OneLinear
from .common import BenchContext, Ratio, SuiteResult, Table, Target, dtype_name, register, time_interleaved

NS = (1, 4, 16, 64)


def _name(i: int) -> str:
    return f"ad{i}"


def build_pair(d: int, r: int, n_max: int, dtype, device):
    import fastpeft
    import peft

    torch.manual_seed(0)
    base = OneLinear(d, d).to(dtype).to(device).eval()
    kw = dict(r=r, lora_alpha=2 * r, target_modules=["proj"], init_lora_weights=False)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw), adapter_name=_name(0))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name=_name(0))
    for i in range(1, n_max):
        fm.add_adapter(_name(i), fastpeft.LoraConfig(**kw))
        pm.add_adapter(_name(i), peft.LoraConfig(**kw))
    fm, pm = fm.to(dtype).to(device).eval(), pm.to(dtype).to(device).eval()
    for i in range(n_max):
        peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm, adapter_name=_name(i)), _name(i))
    fm.set_adapter(_name(0))
    pm.set_adapter(_name(0))
    return fm, pm


def bench_dtype(ctx: BenchContext, res: SuiteResult, table: Table, dtype, d: int, r: int, rows: int, tokens: int):
    dev = ctx.device
    n_max = max(NS)
    fm, pm = build_pair(d, r, n_max, dtype, dev)
    seq = max(1, tokens // rows)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, seq, d, generator=g).to(dtype).to(dev)
    names = {n: [_name(i % n) for i in range(rows)] for n in NS}
    with torch.no_grad():
        got, want = fm(x, adapter_names=names[n_max]), pm(x, adapter_names=names[n_max])
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    err = (got.float() - want.float()).abs().max().item() / max(1.0, want.float().abs().max().item())
    if err > tol:
        res.errors.append(f"{dtype_name(dtype)}: fastpeft and peft outputs differ (max rel err {err:.3g})")

    def fwd(model, n):
        def f():
            with torch.no_grad():
                return model(x, adapter_names=names[n]) if n else model(x)
        return f

    fns = {}
    for n in (0,) + NS:
        fns[f"fastpeft n={n}"] = fwd(fm, n)
        fns[f"peft n={n}"] = fwd(pm, n)
    ctx.log(f"mixed {dtype_name(dtype)} d={d} r={r} rows={rows} tokens={rows * seq}: timing {len(fns)} calls")
    t = time_interleaved(fns, dev, warmup=ctx.warmup, repeats=ctx.repeats, min_sample_ms=ctx.min_sample_ms)
    res.meta.setdefault("timings", {})[dtype_name(dtype)] = t.summary()
    target = Target(1.5, "<=", "time / own n=1 time")
    for impl in ("fastpeft", "peft"):
        row = {"dtype": dtype_name(dtype), "impl": impl, "single ms": t.median(f"{impl} n=0")}
        for n in NS:
            row[f"n={n} ms"] = t.median(f"{impl} n={n}")
        for n in NS[1:]:
            ratio = t.ratio(f"{impl} n={n}", f"{impl} n=1")
            row[f"n={n}/n=1"] = ratio
            res.ratios.append(Ratio(f"{dtype_name(dtype)} {impl} n={n} / n=1", ratio,
                                    target if impl == "fastpeft" else None, kind="scaling"))
        table.add(**row)
        curves = res.meta.setdefault("curves", {
            "x": list(NS), "xlabel": f"distinct adapters among the {rows} rows",
            "ylabel": "forward time / same library's 1-adapter time", "target": 1.5, "series": {}})
        curves["series"][f"{impl} {dtype_name(dtype)}"] = [1.0] + [row[f"n={n}/n=1"] for n in NS[1:]]
    for n in NS:
        res.ratios.append(Ratio(f"{dtype_name(dtype)} n={n}: peft / fastpeft", t.ratio(f"peft n={n}", f"fastpeft n={n}"),
                                None, kind="speedup"))


@register("mixed")
def run(ctx: BenchContext) -> SuiteResult:
    res = SuiteResult("mixed", ctx.device)
    o = ctx.options
    d = o.get("d", 256 if ctx.quick else 1024)
    r = o.get("r", 16)
    rows = o.get("rows", 64)
    tokens = o.get("tokens", 4096 if ctx.is_cuda else rows)
    res.meta.update(d=d, r=r, rows=rows, tokens=tokens, ns=list(NS), dtypes=[dtype_name(t) for t in ctx.dtypes],
                    warmup=ctx.warmup, repeats=ctx.repeats, min_sample_ms=ctx.min_sample_ms, threads=ctx.threads)
    cols = ["dtype", "impl", "single ms"] + [f"n={n} ms" for n in NS] + [f"n={n}/n=1" for n in NS[1:]]
    table = Table(f"Mixed-adapter batch forward (inference), d={d}, r={r}, rows={rows}, tokens={tokens}, {ctx.device}",
                  cols, notes=[
                      "n: distinct adapters among the rows (round-robin); single: one active adapter, no adapter_names",
                      "ms: median per forward; n=k/n=1: median per-round ratio to the same library's n=1 time "
                      "(target for fastpeft: <= 1.5x at every n)",
                      "targets are informational (never asserted)",
                  ])
    for dtype in ctx.dtypes:
        bench_dtype(ctx, res, table, dtype, d, r, rows, tokens)
    res.tables.append(table)
    return res
