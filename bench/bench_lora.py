"""LoRA / DoRA per-layer and per-op benchmark: fastpeft vs peft vs the frozen base layer.

One adapted nn.Linear (d x d, `tokens` rows, rank r), forward + backward with the base frozen:
  * layer rows: the frozen base layer alone (F.linear, gradient to the input only), peft's LoRA
    layer, fastpeft's LoRA layer, each built through the library's public API (get_peft_model on
    a one-Linear module) on the same weights (peft's randomised adapter weights are copied into
    fastpeft's and the outputs and gradients are compared once before timing);
  * the same with lora_dropout=0.1 (training mode) and with DoRA (use_dora=True);
  * raw-op rows: fastpeft.ops.lora_linear / dora_linear vs the unfused torch expression.
On CUDA, also: fused LoRA fwd+bwd vs the frozen base layer at d=4096, 8192 tokens, bf16.
"""
from __future__ import annotations

import copy
import math
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import (
    BenchContext,
    Ratio,
    SuiteResult,
    Table,
    Target,
    cuda_peak_bytes,
    dtype_name,
    mb,
    measure_saved_bytes,
    register,
    safe_div,
    time_interleaved,
)

LAYER_COLUMNS = [
    "dtype", "case", "impl", "ms", "iqr ms", "over base %", "speedup", "ceiling x", "target", "status",
    "saved MB", "saved x", "saved tgt", "saved status", "saved-new MB",
]
CUDA_EXTRA_COLUMNS = ["peak MB"]

ALPHA_OVER_R = 2.0  # lora_alpha = 2 r (scaling 2), a common choice


def _targets(case: str, dtype: torch.dtype):
    """(speed target, saved-bytes target) for a layer case."""
    bf16 = dtype in (torch.bfloat16, torch.float16)
    if case == "lora":
        return Target(1.15, ">=", "LoRA no dropout"), None
    if case == "lora+dropout":
        return Target(2.0 if bf16 else 1.4, ">=", "LoRA dropout 0.1"), Target(0.6, "<=", "saved bytes vs peft")
    if case == "dora":
        return Target(2.0 if bf16 else 1.3, ">=", "DoRA"), None
    return None, None


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _lora_kwargs(r: int, dropout: float, use_dora: bool) -> Dict[str, Any]:
    return dict(
        r=r,
        lora_alpha=int(ALPHA_OVER_R * r),
        target_modules=["proj"],
        lora_dropout=dropout,
        use_dora=use_dora,
        init_lora_weights=False,  # random A and B (peft's default zero B would make LoRA a no-op)
    )


def _adapted_layer(pm) -> nn.Module:
    try:
        return pm.get_base_model().proj
    except AttributeError:
        return pm.base_model.model.proj


def copy_matching_state(src: nn.Module, dst: nn.Module) -> List[str]:
    """Copies every tensor of src's state dict into the same-named tensor of dst's. Returns the
    names of dst's trainable parameters that found no counterpart (should be empty)."""
    src_sd = src.state_dict()
    missing = []
    trainable = {n for n, p in dst.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, t in dst.state_dict().items():
            if name in src_sd and src_sd[name].shape == t.shape:
                t.copy_(src_sd[name])
            elif name in trainable:
                missing.append(name)
    return missing


def build_layers(d: int, r: int, dropout: float, use_dora: bool, dtype, device, bias: bool = True):
    """Returns (base nn.Linear, peft layer, fastpeft layer or None, notes). The base linear is the
    same frozen layer both adapters wrap."""
    import peft

    notes: List[str] = []
    torch.manual_seed(0)
    model = OneLinear(d, d, bias=bias)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**_lora_kwargs(r, dropout, use_dora)))
    fm = None
    try:
        import fastpeft

        fm = fastpeft.get_peft_model(copy.deepcopy(model), fastpeft.LoraConfig(**_lora_kwargs(r, dropout, use_dora)))
        missing = copy_matching_state(pm, fm)
        if missing:
            raise RuntimeError(f"fastpeft parameters with no peft counterpart: {missing}")
    except Exception as exc:  # noqa: BLE001
        notes.append(f"fastpeft layer unavailable: {type(exc).__name__}: {exc}")
        fm = None
    base = copy.deepcopy(model.proj).to(device=device, dtype=dtype).requires_grad_(False)
    pm.to(device=device, dtype=dtype).train()
    layer_p = _adapted_layer(pm)
    layer_f = None
    if fm is not None:
        fm.to(device=device, dtype=dtype).train()
        layer_f = _adapted_layer(fm)
    return base, layer_p, layer_f, notes


def _trainable(m: nn.Module) -> List[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


def check_same(layer_p: nn.Module, layer_f: nn.Module, x: torch.Tensor, g: torch.Tensor, dtype) -> Optional[str]:
    """Compares outputs and gradients (input and adapter params) with dropout off (eval mode).
    Returns None when close, else a description."""
    tol = _tolerance(dtype)
    layer_p.eval(), layer_f.eval()
    try:
        errs = {}
        outs = []
        for layer in (layer_p, layer_f):
            xx = x.detach().clone().requires_grad_(True)
            for p in _trainable(layer):
                p.grad = None
            y = layer(xx)
            y.backward(g)
            grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.requires_grad and p.grad is not None}
            outs.append((y.detach(), xx.grad.detach(), grads))
        errs["out"] = rel_err(outs[1][0], outs[0][0])
        errs["grad_x"] = rel_err(outs[1][1], outs[0][1])
        for n, gp in outs[0][2].items():
            if n in outs[1][2]:
                errs[f"grad {n}"] = rel_err(outs[1][2][n], gp)
            else:
                errs[f"grad {n}"] = float("inf")
        bad = {k: v for k, v in errs.items() if not (v <= tol)}
        return None if not bad else "mismatch vs peft (rel err): " + ", ".join(f"{k}={v:.2e}" for k, v in bad.items())
    finally:
        layer_p.train(), layer_f.train()
        for layer in (layer_p, layer_f):
            for p in _trainable(layer):
                p.grad = None


def _step_fn(forward: Callable[[], torch.Tensor], x: torch.Tensor, g: torch.Tensor, params: List[torch.Tensor]):
    def step():
        x.grad = None
        for p in params:
            p.grad = None
        forward().backward(g)

    return step


def _saved(forward, params, x, g):
    sb, out = measure_saved_bytes(forward, params=params, inputs=[x])
    out.backward(g)
    x.grad = None
    for p in params:
        p.grad = None
    return sb


def run_group(
    ctx: BenchContext,
    res: SuiteResult,
    table: Table,
    *,
    dtype,
    case: str,
    label: str,
    impls: Dict[str, Dict[str, Any]],
    slow: str,
    fast: str,
    base: Optional[str],
    speed_target: Optional[Target],
    mem_target: Optional[Target],
    x: torch.Tensor,
    g: torch.Tensor,
    mismatch: Optional[str] = None,
    plot_overhead_target: Optional[Target] = None,
):
    """Times `impls` (name -> {"forward": fn, "params": [...]}) interleaved, measures saved bytes,
    and adds one table row per impl."""
    steps = {n: _step_fn(v["forward"], x, g, v["params"]) for n, v in impls.items()}
    saved = {n: _saved(v["forward"], v["params"] + v.get("exclude", []), x, g) for n, v in impls.items()}
    peaks = {}
    if ctx.is_cuda:
        for n, s in steps.items():
            peaks[n] = cuda_peak_bytes(s)
    ctx.log(f"{dtype_name(dtype)} {label}: timing {', '.join(impls)}")
    t = time_interleaved(steps, ctx.device, ctx.warmup, ctx.repeats, ctx.min_sample_ms)
    speed = t.ratio(slow, fast) if slow in steps and fast in steps else None
    saved_ratio = safe_div(saved[fast].total, saved[slow].total) if slow in saved and fast in saved else None
    for n in impls:
        over = (t.ratio(n, base) - 1.0) * 100.0 if base and n != base else None
        row = table.add(
            dtype=dtype_name(dtype), case=label, impl=n, ms=t.median(n), **{"iqr ms": t.iqr(n)},
            **{"over base %": over, "saved MB": mb(saved[n].total), "saved-new MB": mb(saved[n].excluding_inputs)},
        )
        if ctx.is_cuda:
            row["peak MB"] = mb(peaks.get(n))
        row["timing"] = t.summary()[n]
        if n == fast:
            row["speedup"] = speed
            if base and slow in steps:
                row["ceiling x"] = t.ratio(slow, base)
            row["saved x"] = saved_ratio
            if speed_target:
                row["target"] = speed_target.describe("x")
                row["status"] = "INVALID" if mismatch else speed_target.check(speed)
            if mem_target:
                row["saved tgt"] = mem_target.describe("x")
                row["saved status"] = mem_target.check(saved_ratio)
            if mismatch:
                row["error"] = mismatch
    dev = ctx.device
    if speed is not None:
        res.ratios.append(Ratio(f"{dtype_name(dtype)} {label}: {fast} vs {slow}", speed, speed_target, "speedup"))
    if mem_target is not None and saved_ratio is not None:
        res.ratios.append(Ratio(f"{dtype_name(dtype)} {label}: saved bytes {fast}/{slow}", saved_ratio, mem_target, "memory"))
    if plot_overhead_target is not None and base:
        for n in impls:
            if n != base:
                res.ratios.append(Ratio(f"{dtype_name(dtype)} {label}: {n} over base", (t.ratio(n, base) - 1) * 100,
                                        plot_overhead_target if n == fast else None, "overhead"))
    return t


def _layer_cases(ctx: BenchContext):
    return [
        ("lora", "lora", 0.0, False),
        ("lora+dropout", "lora drop0.1", 0.1, False),
        ("dora", "dora", 0.0, True),
    ]


def bench_layers(ctx: BenchContext, res: SuiteResult, table: Table, dtype, d: int, tokens: int, r: int):
    dev = ctx.device
    torch.manual_seed(1)
    x = torch.randn(tokens, d, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, device=dev, dtype=dtype)
    for case, label, dropout, use_dora in _layer_cases(ctx):
        try:
            base, layer_p, layer_f, notes = build_layers(d, r, dropout, use_dora, dtype, dev)
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"{dtype_name(dtype)} {label}: build failed: {exc!r}")
            traceback.print_exc()
            continue
        for n in notes:
            res.errors.append(f"{dtype_name(dtype)} {label}: {n}")
        W, b = base.weight, base.bias
        compare_layers(ctx, res, table, dtype=dtype, case=case, label=label,
                       base_fwd=(lambda W=W, b=b: F.linear(x, W, b)), base_params=[W] + ([b] if b is not None else []),
                       layer_p=layer_p, layer_f=layer_f, x=x, g=g, targets=_targets(case, dtype))


def compare_layers(ctx: BenchContext, res: SuiteResult, table: Table, *, dtype, case: str, label: str, base_fwd,
                   base_params, layer_p, layer_f, x, g, targets, overhead_target: Optional[Target] = None) -> None:
    """One row group: checks fastpeft's layer (if any) against peft's on (x, g), then times the frozen base
    (`base_fwd` over `base_params`), peft's and fastpeft's layers with run_group; failures become problems."""
    mismatch = None
    if layer_f is not None:
        try:
            mismatch = check_same(layer_p, layer_f, x, g, dtype)
        except Exception as exc:  # noqa: BLE001
            mismatch = f"check failed: {type(exc).__name__}: {exc}"
        if mismatch:
            res.errors.append(f"{dtype_name(dtype)} {label}: fastpeft {mismatch}")
            ctx.log(f"WARNING {label}: fastpeft {mismatch}")
    impls = {
        "base": {"forward": base_fwd, "params": base_params},
        "peft": {"forward": (lambda m=layer_p: m(x)), "params": list(layer_p.parameters())},
    }
    if layer_f is not None:
        impls["fastpeft"] = {"forward": (lambda m=layer_f: m(x)), "params": list(layer_f.parameters())}
    st, mt = targets
    try:
        run_group(ctx, res, table, dtype=dtype, case=case, label=label, impls=impls, slow="peft", fast="fastpeft",
                  base="base", speed_target=st, mem_target=mt, x=x, g=g, mismatch=mismatch,
                  plot_overhead_target=overhead_target)
    except Exception as exc:  # noqa: BLE001
        res.errors.append(f"{dtype_name(dtype)} {label}: timing failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()


# ---------------------------------------------------------------------------------------------
# raw ops: fastpeft.ops vs the unfused torch expression


def _torch_lora(x, W, b, A, B, s, p):
    xd = F.dropout(x, p, training=True) if p > 0 else x
    return F.linear(x, W, b) + s * F.linear(F.linear(xd, A), B)


def _torch_dora(x, W, b, A, B, m, s):
    # peft's DoRA without dropout: y = (m / ||W + s B A||_row) * (x W^T + s x A^T B^T) + b, norm detached
    with torch.no_grad():
        n = (W + s * (B @ A)).float().norm(dim=1).to(W.dtype)
    scale = m / n
    return scale * (F.linear(x, W) + s * F.linear(F.linear(x, A), B)) + (b if b is not None else 0)


def bench_raw_ops(ctx: BenchContext, res: SuiteResult, table: Table, dtype, d: int, tokens: int, r: int):
    dev = ctx.device
    try:
        import fastpeft.ops as ops
    except Exception as exc:  # noqa: BLE001
        res.errors.append(f"raw ops: fastpeft.ops unavailable: {type(exc).__name__}: {exc}")
        return
    torch.manual_seed(2)
    s = ALPHA_OVER_R
    x = torch.randn(tokens, d, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, device=dev, dtype=dtype)
    W = (torch.randn(d, d, device=dev, dtype=dtype) / math.sqrt(d))
    b = torch.randn(d, device=dev, dtype=dtype) * 0.1
    A = (torch.randn(r, d, device=dev, dtype=dtype) / math.sqrt(d)).requires_grad_(True)
    B = (torch.randn(d, r, device=dev, dtype=dtype) / math.sqrt(r)).requires_grad_(True)
    with torch.no_grad():
        mag = (W + s * (B @ A)).float().norm(dim=1).to(dtype) * (1 + 0.1 * torch.rand(d, device=dev, dtype=dtype))
    mag.requires_grad_(True)
    frozen = [W, b]
    for p in (0.0, 0.1):
        label = f"op lora_linear p={p}"
        impls = {
            "base": {"forward": lambda: F.linear(x, W, b), "params": frozen},
            "torch": {"forward": (lambda p=p: _torch_lora(x, W, b, A, B, s, p)), "params": frozen + [A, B]},
            "fastpeft": {"forward": (lambda p=p: ops.lora_linear(x, W, b, A, B, s, dropout_p=p)), "params": frozen + [A, B]},
        }
        _run_op_group(ctx, res, table, dtype, label, impls, x, g, "lora_linear",
                      fused=lambda: ops.lora_linear(x, W, b, A, B, s, dropout_p=0.0),
                      unfused=lambda: _torch_lora(x, W, b, A, B, s, 0.0))
    label = "op dora_linear p=0"
    impls = {
        "base": {"forward": lambda: F.linear(x, W, b), "params": frozen},
        "torch": {"forward": lambda: _torch_dora(x, W, b, A, B, mag, s), "params": frozen + [A, B, mag]},
        "fastpeft": {"forward": lambda: ops.dora_linear(x, W, b, A, B, mag, s, dropout_p=0.0), "params": frozen + [A, B, mag]},
    }
    _run_op_group(ctx, res, table, dtype, label, impls, x, g, "dora_linear",
                  fused=lambda: ops.dora_linear(x, W, b, A, B, mag, s, dropout_p=0.0),
                  unfused=lambda: _torch_dora(x, W, b, A, B, mag, s))


def _run_op_group(ctx: BenchContext, res: SuiteResult, table: Table, dtype, label: str, impls, x, g, op: str,
                  fused: Callable[[], torch.Tensor], unfused: Callable[[], torch.Tensor]):
    """One raw-op row group: the fused op checked once against the torch expression (dropout off), then timed."""
    mismatch = None
    try:
        with torch.no_grad():
            e = rel_err(fused(), unfused())
        if not e <= _tolerance(dtype):
            mismatch = f"{op} vs torch rel err {e:.2e}"
            res.errors.append(f"{dtype_name(dtype)} {label}: {mismatch}")
        run_group(ctx, res, table, dtype=dtype, case=label, label=label, impls=impls, slow="torch", fast="fastpeft",
                  base="base", speed_target=None, mem_target=None, x=x, g=g, mismatch=mismatch)
    except Exception as exc:  # noqa: BLE001
        res.errors.append(f"{dtype_name(dtype)} {label}: {type(exc).__name__}: {exc}")
        traceback.print_exc()


def bench_cuda_big(ctx: BenchContext, res: SuiteResult, table: Table, d: int, tokens: int, r: int):
    """Fused LoRA fwd+bwd vs the frozen base layer at a large shape (bf16): the fused layer should
    cost within 15% of the base layer; peft's overhead is shown beside it."""
    dtype = torch.bfloat16
    dev = ctx.device
    torch.manual_seed(3)
    x = torch.randn(tokens, d, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, device=dev, dtype=dtype)
    for dropout, label in ((0.0, f"big d{d} lora"), (0.1, f"big d{d} lora drop0.1")):
        try:
            base, layer_p, layer_f, notes = build_layers(d, r, dropout, False, dtype, dev)
            for n in notes:
                res.errors.append(f"{label}: {n}")
            W, b = base.weight, base.bias
            impls = {
                "base": {"forward": lambda W=W, b=b: F.linear(x, W, b), "params": [W, b]},
                "peft": {"forward": lambda m=layer_p: m(x), "params": list(layer_p.parameters())},
            }
            if layer_f is not None:
                impls["fastpeft"] = {"forward": lambda m=layer_f: m(x), "params": list(layer_f.parameters())}
            st, mt = _targets("lora" if dropout == 0 else "lora+dropout", dtype)
            run_group(ctx, res, table, dtype=dtype, case=label, label=label, impls=impls, slow="peft", fast="fastpeft",
                      base="base", speed_target=st, mem_target=mt, x=x, g=g,
                      plot_overhead_target=Target(15.0, "<=", "fused within 15% of base"))
            # mark the overhead target on the fastpeft row
            for row in table.rows:
                if row.get("case") == label and row.get("impl") == "fastpeft":
                    ov = row.get("over base %")
                    row["over tgt"] = "<=15%"
                    row["over status"] = Target(15.0, "<=").check(ov)
            del base, layer_p, layer_f
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"{label}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@register("lora")
def run(ctx: BenchContext) -> SuiteResult:
    res = SuiteResult("lora", ctx.device)
    o = ctx.options
    d = o.get("d", 256 if ctx.quick else 1024)
    tokens = o.get("tokens", 256 if ctx.quick else 2048)
    r = o.get("r", 16)
    res.meta.update(d=d, tokens=tokens, r=r, lora_alpha=int(ALPHA_OVER_R * r), bias=True,
                    dtypes=[dtype_name(t) for t in ctx.dtypes], warmup=ctx.warmup, repeats=ctx.repeats,
                    min_sample_ms=ctx.min_sample_ms)
    cols = LAYER_COLUMNS + (CUDA_EXTRA_COLUMNS if ctx.is_cuda else [])
    layer_table = Table(
        f"LoRA/DoRA layer fwd+bwd (frozen base), d={d}, tokens={tokens}, r={r}, {ctx.device}", cols,
        notes=[
            "ms: median per fwd+bwd; over base %: median per-round overhead vs the frozen F.linear; "
            "speedup: median per-round peft_ms / fastpeft_ms",
            "ceiling x: median per-round slow_ms / base_ms, the speed-up fastpeft would show if its adapter cost nothing",
            "saved MB: unique storages saved for backward (params excluded, layer input included); "
            "saved-new MB: same without the layer input; saved x: fastpeft / peft",
            "targets are informational (never asserted)",
        ],
    )
    op_table = Table(f"raw ops fwd+bwd: fastpeft.ops vs unfused torch, d={d}, tokens={tokens}, r={r}, {ctx.device}", cols,
                     notes=["speedup: median per-round torch_ms / fastpeft_ms; ceiling x: torch_ms / base_ms"])
    for dtype in ctx.dtypes:
        bench_layers(ctx, res, layer_table, dtype, d, tokens, r)
        bench_raw_ops(ctx, res, op_table, dtype, d, tokens, r)
    res.tables += [layer_table, op_table]
    if ctx.is_cuda and not o.get("skip_big", False):
        bd = o.get("big_d", 1024 if ctx.quick else 4096)
        bt = o.get("big_tokens", 2048 if ctx.quick else 8192)
        big = Table(f"CUDA fused LoRA vs frozen base layer, d={bd}, tokens={bt}, r={r}, bf16",
                    cols + ["over tgt", "over status"],
                    notes=["target: fastpeft's fused layer within 15% of the frozen base layer's fwd+bwd time"])
        bench_cuda_big(ctx, res, big, bd, bt, r)
        res.tables.append(big)
    return res
