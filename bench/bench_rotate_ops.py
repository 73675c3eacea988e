"""OFT / BOFT rotation op benchmark: fastpeft.ops.block_diag_rotate / butterfly_rotate against the reference
formulation (fastpeft.reference: einsum per block, gathers for the permutations) and the base layer they sit
in front of, forward + backward (grads to x and the blocks) via torch.autograd.grad.

    python -m bench.run --only rotate_ops [--quick] [--threads 2]

Rows: OFT b=32 (d/32 blocks, and one shared block), BOFT b in {8, 32} x m in {1, 2, 4} (peft's butterfly
permutations, built by fastpeft.tuners.boft.layer.butterfly_permutation), in every dtype of the run
(default fp32 and bf16); a BOFT shape whose d/b blocks are not divisible by 2^(m-1) is skipped (noted under
the table). "base" is F.linear(x, W) forward + its input gradient (tokens x d @ d x d, frozen W) in the same
dtype; "% of base" is the median over rounds of the fastpeft rotation's fwd+bwd time as a percentage of the
base's, "speedup" the median over rounds of reference_ms / fastpeft_ms. Default d=1024, 2048 tokens;
`--quick`: d=256, 256 tokens. The fastpeft output is checked against the reference once before timing.
"""
from __future__ import annotations

import traceback
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from .common import BenchContext, Ratio, SuiteResult, Table, dtype_name, register, time_interleaved

COLUMNS = ["dtype", "case", "base ms", "reference ms", "fastpeft ms", "% of base", "speedup", "status"]

# (label, block size b, butterfly factors m (0: OFT's block_diag_rotate), one shared block)
CASES = [("OFT b=32", 32, 0, False), ("OFT b=32 shared", 32, 0, True)]
CASES += [(f"BOFT b={b} m={m}", b, m, False) for b in (8, 32) for m in (1, 2, 4)]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _perms(d: int, b: int, m: int) -> torch.Tensor:
    """peft's butterfly index maps [m, d] for blocks of size b, factor order (as fastpeft's BOFT layers build them)."""
    from fastpeft.tuners.boft.layer import butterfly_permutation

    return torch.stack([butterfly_permutation(d, b, i) for i in range(m)])


def _fwd_bwd(op, x: torch.Tensor, rot: torch.Tensor, g: torch.Tensor, *extra) -> Callable[[], None]:
    def step():
        torch.autograd.grad(op(x, rot, *extra), (x, rot), g)

    return step


@register("rotate_ops")
def run(ctx: BenchContext) -> SuiteResult:
    from fastpeft import ops
    from fastpeft import reference as ref

    res = SuiteResult("rotate_ops", ctx.device)
    o = ctx.options
    d = o.get("d", 256 if ctx.quick else 1024)
    tokens = o.get("tokens", 256 if ctx.quick else 2048)
    res.meta.update(d=d, tokens=tokens, dtypes=[dtype_name(t) for t in ctx.dtypes],
                    warmup=ctx.warmup, repeats=ctx.repeats, min_sample_ms=ctx.min_sample_ms)
    table = Table(
        f"OFT/BOFT rotation ops fwd+bwd: fastpeft.ops vs fastpeft.reference and the base F.linear, d={d}, "
        f"tokens={tokens}, {ctx.device}",
        COLUMNS,
        notes=["ms: median per fwd+bwd (grads to x and the blocks; base: F.linear(x, W) fwd + grad to x, W frozen)",
               "% of base: median per-round fastpeft_ms / base_ms; "
               "speedup: median per-round reference_ms / fastpeft_ms",
               "status: 'ok' when the fastpeft output matched the reference (rel err <= 1e-4 fp32, 2e-2 bf16/fp16)"],
    )
    skipped: List[str] = []
    for dtype in ctx.dtypes:
        dt = dtype_name(dtype)
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(tokens, d, generator=gen).to(dtype).to(ctx.device).requires_grad_(True)
        g = torch.randn(tokens, d, generator=gen).to(dtype).to(ctx.device)
        w = (torch.randn(d, d, generator=gen) * d**-0.5).to(dtype).to(ctx.device)

        def base():
            torch.autograd.grad(F.linear(x, w), x, g)

        for label, b, m, shared in CASES:
            if d % b or (m > 1 and (d // b) % (2 ** (m - 1))):
                if dtype == ctx.dtypes[0]:
                    skipped.append(label)
                continue
            try:
                n = 1 if shared else d // b
                if m == 0:
                    rot = torch.randn(n, b, b, generator=gen) * b**-0.5
                    fast_fn, ref_fn, extra = ops.block_diag_rotate, ref.block_diag_rotate, ()
                else:
                    rot = torch.randn(m, n, b, b, generator=gen) * b**-0.5
                    fast_fn, ref_fn = ops.butterfly_rotate, ref.butterfly_rotate
                    extra = (_perms(d, b, m).to(ctx.device),)
                rot = rot.to(dtype).to(ctx.device).requires_grad_(True)
                with torch.no_grad():
                    err = _rel_err(fast_fn(x, rot, *extra), ref_fn(x, rot, *extra))
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                status = "ok" if err <= tol else f"MISMATCH {err:.1e}"
                if status != "ok":
                    res.errors.append(f"{dt} {label}: fastpeft vs reference rel err {err:.2e}")
                steps: Dict[str, Callable[[], None]] = {
                    "base": base,
                    "reference": _fwd_bwd(ref_fn, x, rot, g, *extra),
                    "fastpeft": _fwd_bwd(fast_fn, x, rot, g, *extra),
                }
                ctx.log(f"{dt} {label}: timing base, reference, fastpeft")
                t = time_interleaved(steps, ctx.device, ctx.warmup, ctx.repeats, ctx.min_sample_ms)
                pct = 100.0 * t.ratio("fastpeft", "base")
                speed = t.ratio("reference", "fastpeft")
                row = table.add(dtype=dt, case=label, **{"base ms": t.median("base"),
                                "reference ms": t.median("reference"), "fastpeft ms": t.median("fastpeft"),
                                "% of base": pct}, speedup=speed, status=status)
                row["timing"] = t.summary()
                res.ratios.append(Ratio(f"{dt} {label}: fastpeft vs reference", speed))
                res.ratios.append(Ratio(f"{dt} {label}: % of base", pct, kind="overhead"))
            except Exception as exc:  # noqa: BLE001
                res.errors.append(f"{dt} {label}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
    if skipped:
        table.notes.append(f"skipped at d={d} (d/b blocks not divisible by 2^(m-1)): {', '.join(skipped)}")
    res.meta["skipped"] = skipped
    res.tables.append(table)
    res.tables.append(_bench_cayley(ctx, res, d))
    return res


# ---- the Cayley transform (fastpeft.ops.cayley) ----------------------------------------------------------

CAYLEY_COLUMNS = ["case", "blocks", "reference ms", "peft ms", "fastpeft ms", "vs reference", "vs peft", "status"]
# (label, block size b, blocks as a function of d, Neumann terms (0: exact), BOFT's parametrisation)
CAYLEY_CASES = [
    ("OFT b=32 exact", 32, lambda d: d // 32, 0, False),
    ("OFT b=32 Neumann 5", 32, lambda d: d // 32, 5, False),
    ("BOFT b=4", 4, lambda d: d // 4, 0, True),
    ("BOFT b=32", 32, lambda d: d // 32, 0, True),
    ("BOFT b=8 m=2", 8, lambda d: 2 * (d // 8), 0, True),
]


def _bench_cayley(ctx: BenchContext, res: SuiteResult, d: int) -> Table:
    """Rotation blocks from the trainable parameters, forward + backward (gradient to the parameters), as one
    adapted layer of width d does once per training step: OFT from the upper-triangle vectors (peft's
    OFTRotationModule._cayley_batch vs fastpeft's skew + ops.cayley), BOFT from the full blocks
    (BOFTLayer.cayley_batch vs fastpeft's (R - R^T)/2 + ops.cayley); float32 (both libraries keep these
    parameters in float32)."""
    from fastpeft import ops
    from fastpeft import reference as ref

    table = Table(
        f"Cayley transform of one layer's rotation blocks (d={d}), fwd+bwd to the parameters, fp32, {ctx.device}",
        CAYLEY_COLUMNS,
        notes=["OFT: upper-triangle vectors -> skew -> R; BOFT: blocks R -> (R - R^T)/2 -> cayley; reference: "
               "fastpeft.reference.cayley on the same skew; peft: its own layer's function",
               "vs reference / vs peft: median per-round reference_ms / fastpeft_ms and peft_ms / fastpeft_ms",
               "status: 'ok' when fastpeft's R matched peft's (max abs err <= 1e-4)"],
    )
    try:
        from peft.tuners.boft.layer import BOFTLayer
        from peft.tuners.oft.layer import OFTRotationModule
    except ImportError:
        OFTRotationModule = BOFTLayer = None
        table.notes.append("peft not installed: no peft column")
    gen = torch.Generator(device="cpu").manual_seed(3)
    for label, b, blocks, terms, boft in CAYLEY_CASES:
        n = blocks(d)
        try:
            if boft:
                param = (torch.randn(n, b, b, generator=gen) * 0.05).to(ctx.device).requires_grad_(True)

                def skew(p=param):
                    return 0.5 * (p - p.transpose(1, 2))

                peft_fn = (lambda p=param: BOFTLayer.cayley_batch(None, p)) if BOFTLayer else None
            else:
                n_el = b * (b - 1) // 2
                rows, cols = torch.triu_indices(b, b, 1, device=ctx.device)
                param = (torch.randn(n, n_el, generator=gen) * 0.05).to(ctx.device).requires_grad_(True)

                def skew(p=param, rows=rows, cols=cols, b=b):
                    upper = p.new_zeros(p.shape[0], b, b)
                    upper[:, rows, cols] = p
                    return upper - upper.transpose(1, 2)

                peft_fn = None
                if OFTRotationModule is not None:
                    mod = OFTRotationModule(n, n_el, b, n * b, use_cayley_neumann=terms > 0,
                                            num_cayley_neumann_terms=max(terms, 1)).to(ctx.device)

                    def peft_fn(p=param, mod=mod, b=b, terms=terms):
                        return mod._cayley_batch(p, b, terms > 0, terms)

            g = torch.randn(n, b, b, generator=gen).to(ctx.device)
            impls = {"reference": lambda: ref.cayley(skew(), terms), "fastpeft": lambda: ops.cayley(skew(), terms)}
            if peft_fn is not None:
                impls["peft"] = peft_fn
            status = "ok"
            if peft_fn is not None:
                with torch.no_grad():
                    err = (ops.cayley(skew(), terms) - peft_fn()).abs().max().item()
                if err > 1e-4:
                    status = f"MISMATCH {err:.1e}"
                    res.errors.append(f"cayley {label}: fastpeft vs peft max abs err {err:.2e}")
            steps = {k: (lambda f=f: torch.autograd.grad(f(), param, g)) for k, f in impls.items()}
            ctx.log(f"cayley {label}: timing {', '.join(steps)}")
            t = time_interleaved(steps, ctx.device, ctx.warmup, ctx.repeats, ctx.min_sample_ms)
            row = table.add(case=label, blocks=n, **{"reference ms": t.median("reference"),
                            "fastpeft ms": t.median("fastpeft"), "vs reference": t.ratio("reference", "fastpeft")},
                            status=status)
            if "peft" in steps:
                row.update(**{"peft ms": t.median("peft"), "vs peft": t.ratio("peft", "fastpeft")})
                res.ratios.append(Ratio(f"cayley {label}: fastpeft vs peft", t.ratio("peft", "fastpeft")))
            row["timing"] = t.summary()
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"cayley {label}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    return table
