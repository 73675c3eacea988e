"""IA³ per-layer benchmark: fastpeft vs peft vs the frozen base layer.

One adapted nn.Linear (d x d, `tokens` rows), forward + backward with the base frozen: the frozen base
alone (F.linear, gradient to the input only), peft's IA³ layer and fastpeft's, built through the
library's public `get_peft_model` on the same weights (peft's random IA³ vectors, `init_ia3_weights=False`,
copied into fastpeft's; outputs and gradients are compared once before timing). Two rows per dtype:
the output scaled (attention-style target) and the input scaled (`feedforward_modules`). bf16 rows keep
the IA³ vectors in float32 (get_peft_model's default in both libraries).

Target (the issue's): fastpeft's forward + backward within 5% (fp32) / 10% (bf16) of the base layer's.
"""
from __future__ import annotations

import torch

from .bench_lora import CUDA_EXTRA_COLUMNS, LAYER_COLUMNS
from .bench_lycoris import build_pair, compare_pair, linear_case
from .common import BenchContext, SuiteResult, Table, Target, dtype_name, register

METHODS = {
    "ia3 output": ("IA3Config", dict(feedforward_modules=[], init_ia3_weights=False)),
    "ia3 input (feedforward)": ("IA3Config", dict(feedforward_modules=["proj"], init_ia3_weights=False)),
}


def bench_linear(ctx: BenchContext, res: SuiteResult, table: Table, dtype, d: int, tokens: int):
    model, x, g, base_fwd, base_params = linear_case(ctx, dtype, d, tokens)
    dev = ctx.device
    half = dtype in (torch.bfloat16, torch.float16)
    overhead = Target(10.0 if half else 5.0, "<=", "IA3 over base")
    for label in METHODS:
        compare_pair(ctx, res, table, dtype=dtype, case=label, label=label,
                     base_fwd=base_fwd, base_params=base_params,
                     make_layers=lambda label=label: build_pair(model, label, ["proj"], dtype, dev, methods=METHODS,
                                                                adapters_fp32=True),
                     x=x, g=g, targets=(None, None), overhead_target=overhead)


@register("ia3")
def run(ctx: BenchContext) -> SuiteResult:
    res = SuiteResult("ia3", ctx.device)
    o = ctx.options
    d = o.get("d", 256 if ctx.quick else 1024)
    tokens = o.get("tokens", 256 if ctx.quick else 2048)
    res.meta.update(d=d, tokens=tokens, bias=True, configs={k: v[1] for k, v in METHODS.items()},
                    dtypes=[dtype_name(t) for t in ctx.dtypes], warmup=ctx.warmup, repeats=ctx.repeats,
                    min_sample_ms=ctx.min_sample_ms)
    cols = LAYER_COLUMNS + (CUDA_EXTRA_COLUMNS if ctx.is_cuda else [])
    table = Table(f"IA3 layer fwd+bwd (frozen base), d={d}, tokens={tokens}, {ctx.device}", cols, notes=[
        "ms: median per fwd+bwd; over base %: median per-round overhead vs the frozen base (target: <= 5% fp32, "
        "<= 10% bf16); speedup: median per-round peft_ms / fastpeft_ms",
        "saved MB: unique storages saved for backward (params excluded, input included); saved x: fastpeft / peft",
        "targets are informational (never asserted)",
    ])
    for dtype in ctx.dtypes:
        bench_linear(ctx, res, table, dtype, d, tokens)
    res.tables.append(table)
    return res
