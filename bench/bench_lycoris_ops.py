"""LoKr / LoHa op-level benchmark: fastpeft.ops.kron_linear / hadamard_linear vs the unfused
peft-style math (materialise the delta weight, then F.linear), forward + backward.

One adapter delta applied to `tokens` rows of width d (default d=1024, 2048 tokens), gradients to
the input and every factor:
  * LoKr, peft's default factorisation of d (32x32 kron 32x32 at d=1024, both factors full):
    torch = F.linear(x, s * torch.kron(w1, w2));
  * LoKr with a low-rank w2 = w2_a @ w2_b (rank 8): torch = F.linear(x, s * torch.kron(w1, w2_a @ w2_b));
  * LoHa r=8 and r=16: torch = F.linear(x, s * (w1_a @ w1_b) * (w2_a @ w2_b)) (peft's make_weight math).
`--quick`: d=256, 256 tokens. The fused op's output is checked against the torch expression once
before timing.
"""
from __future__ import annotations

import math
import traceback
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from .common import BenchContext, Ratio, SuiteResult, Table, dtype_name, register, time_interleaved

COLUMNS = ["dtype", "case", "torch ms", "fastpeft ms", "speedup", "status"]
SCALE = 2.0


def _factor(d: int):
    """peft's LoKr default factorisation (factor=-1): the divisor pair closest to sqrt(d), small first."""
    m = int(math.isqrt(d))
    while d % m:
        m -= 1
    return m, d // m


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _step(forward: Callable[[], torch.Tensor], inputs: List[torch.Tensor], g: torch.Tensor):
    def step():
        torch.autograd.grad(forward(), inputs, g)

    return step


def _cases(d: int, dtype, dev):
    m, n = _factor(d)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype).to(dev).requires_grad_(True)

    cases = []
    w1, w2 = rnd(m, m, s=m**-0.5), rnd(n, n, s=n**-0.5)
    cases.append((
        f"lokr {m}x{m} (x) {n}x{n} full",
        lambda x: F.linear(x, torch.kron(w1, w2) * SCALE),
        lambda x: _ops().kron_linear(x, w1, w2, scale=SCALE),
        [w1, w2],
    ))
    r = 8
    v1, w2a, w2b = rnd(m, m, s=m**-0.5), rnd(n, r, s=r**-0.5), rnd(r, n, s=n**-0.5)
    cases.append((
        f"lokr {m}x{m} (x) low-rank {n}x{n} r={r}",
        lambda x: F.linear(x, torch.kron(v1, w2a @ w2b) * SCALE),
        lambda x: _ops().kron_linear(x, v1, w2_a=w2a, w2_b=w2b, scale=SCALE),
        [v1, w2a, w2b],
    ))
    for r in (8, 16):
        ws = [rnd(d, r, s=r**-0.5), rnd(r, d, s=d**-0.25), rnd(d, r, s=r**-0.5), rnd(r, d, s=d**-0.25)]
        cases.append((
            f"loha r={r}",
            lambda x, ws=ws: F.linear(x, (ws[0] @ ws[1]) * (ws[2] @ ws[3]) * SCALE),
            lambda x, ws=ws: _ops().hadamard_linear(x, *ws, scale=SCALE),
            ws,
        ))
    return cases


def _ops():
    import fastpeft.ops as ops

    return ops


@register("lycoris_ops")
def run(ctx: BenchContext) -> SuiteResult:
    res = SuiteResult("lycoris_ops", ctx.device)
    o = ctx.options
    d = o.get("d", 256 if ctx.quick else 1024)
    tokens = o.get("tokens", 256 if ctx.quick else 2048)
    res.meta.update(d=d, tokens=tokens, scale=SCALE, dtypes=[dtype_name(t) for t in ctx.dtypes],
                    warmup=ctx.warmup, repeats=ctx.repeats, min_sample_ms=ctx.min_sample_ms)
    table = Table(
        f"LoKr/LoHa ops fwd+bwd: fastpeft.ops vs materialised delta + F.linear, d={d}, tokens={tokens}, {ctx.device}",
        COLUMNS,
        notes=["ms: median per fwd+bwd (grads to x and every factor); speedup: median per-round torch_ms / fastpeft_ms",
               "status: 'ok' when the fused output matched the torch expression (rel err <= 1e-4 fp32, 2e-2 bf16/fp16)"],
    )
    for dtype in ctx.dtypes:
        torch.manual_seed(1)
        x = torch.randn(tokens, d, device=ctx.device, dtype=dtype, requires_grad=True)
        g = torch.randn(tokens, d, device=ctx.device, dtype=dtype)
        for label, unfused, fused, params in _cases(d, dtype, ctx.device):
            try:
                with torch.no_grad():
                    err = _rel_err(fused(x), unfused(x))
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                status = "ok" if err <= tol else f"MISMATCH {err:.1e}"
                if status != "ok":
                    res.errors.append(f"{dtype_name(dtype)} {label}: fused vs torch rel err {err:.2e}")
                inputs = [x] + params
                steps: Dict[str, Callable[[], None]] = {
                    "torch": _step(lambda: unfused(x), inputs, g),
                    "fastpeft": _step(lambda: fused(x), inputs, g),
                }
                ctx.log(f"{dtype_name(dtype)} {label}: timing torch, fastpeft")
                t = time_interleaved(steps, ctx.device, ctx.warmup, ctx.repeats, ctx.min_sample_ms)
                speed = t.ratio("torch", "fastpeft")
                row = table.add(dtype=dtype_name(dtype), case=label, **{"torch ms": t.median("torch"),
                                "fastpeft ms": t.median("fastpeft")}, speedup=speed, status=status)
                row["timing"] = t.summary()
                res.ratios.append(Ratio(f"{dtype_name(dtype)} {label}", speed))
            except Exception as exc:  # noqa: BLE001
                res.errors.append(f"{dtype_name(dtype)} {label}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
    res.tables.append(table)
    return res
