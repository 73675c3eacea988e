"""LoKr / LoHa per-layer benchmark (and a UNet-style conv block): fastpeft vs peft vs the frozen base.

  * linear rows: one adapted nn.Linear (d x d, `tokens` rows), forward + backward with the base frozen:
    the frozen base layer alone (F.linear, gradient to the input only), peft's LoKr (r=8, alpha=8, default
    factorisation) and LoHa (r=8, alpha=8) layers, and fastpeft's with the same configs, each built through
    the library's public `get_peft_model` on the same weights (peft's random adapter weights,
    `init_weights=False`, are copied into fastpeft's by state-dict name; outputs and gradients are compared
    once before timing, a mismatch marks the speed-up INVALID);
  * conv rows: a UNet-style resnet block (GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3, residual;
    64 channels, 32x32, batch 8) with LoRA / LoHa / LoKr (r=8) on both convs vs the frozen block.
fastpeft's rows need fastpeft.LoKrConfig / LoHaConfig; without them the rows are left out and the suite
says so in its problems list.
"""
from __future__ import annotations

import copy
import traceback
from typing import Any, Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bench_lora import LAYER_COLUMNS, CUDA_EXTRA_COLUMNS, OneLinear, compare_layers, copy_matching_state
from .common import BenchContext, SuiteResult, Table, Target, dtype_name, register

R = 8
ALPHA = 8

# method -> (config class name in peft and fastpeft, kwargs with random adapter weights)
METHODS = {
    "lokr": ("LoKrConfig", dict(r=R, alpha=ALPHA, init_weights=False)),
    "loha": ("LoHaConfig", dict(r=R, alpha=ALPHA, init_weights=False)),
    "lora": ("LoraConfig", dict(r=R, lora_alpha=ALPHA, init_lora_weights=False)),
}


def _targets(case: str, dtype: torch.dtype):
    """(speed target, saved-bytes target) for a row group."""
    bf16 = dtype in (torch.bfloat16, torch.float16)
    mem = Target(0.7, "<=", "saved bytes vs peft")
    if case == "lokr":
        return Target(1.8 if bf16 else 2.0, ">=", "LoKr"), mem
    if case == "loha":
        return Target(1.5 if bf16 else 1.8, ">=", "LoHa"), mem
    if case.startswith("conv "):
        return Target(1.3, ">=", "conv block"), None
    return None, None


class ConvBlock(nn.Module):
    """A UNet resnet block (diffusers' ResnetBlock2D without the time embedding):
    x + conv2(act(norm2(conv1(act(norm1(x))))))."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


def lycoris_ops_source() -> str:
    """Where fastpeft's LyCORIS layers take their ops from (the C++ ops in fastpeft.ops, or a stand-in)."""
    try:
        import importlib

        mod = importlib.import_module("fastpeft.tuners.lycoris")
        return getattr(getattr(mod, "kron_linear"), "__module__", "?")
    except Exception as exc:  # noqa: BLE001
        return f"unavailable ({type(exc).__name__}: {exc})"


def build_pair(model: nn.Module, method: str, targets: List[str], dtype, device, methods=None,
               adapters_fp32: bool = False):
    """(peft model, fastpeft model or None, notes): both libraries' get_peft_model on copies of `model`,
    peft's random adapter weights copied into fastpeft's. `methods` maps method -> (config class name,
    kwargs); default: this suite's METHODS. The models end up in `dtype`, adapters included; with
    `adapters_fp32` the base model is cast first and get_peft_model keeps the adapters in float32
    (both libraries' default, autocast_adapter_dtype=True)."""
    import peft

    name, kwargs = (methods or METHODS)[method]
    notes: List[str] = []
    if adapters_fp32:
        model = copy.deepcopy(model).to(dtype)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), getattr(peft, name)(target_modules=list(targets), **kwargs))
    fm = None
    try:
        import fastpeft

        cls = getattr(fastpeft, name)
        fm = fastpeft.get_peft_model(copy.deepcopy(model), cls(target_modules=list(targets), **kwargs))
        missing = copy_matching_state(pm, fm)
        if missing:
            raise RuntimeError(f"fastpeft parameters with no peft counterpart: {missing}")
    except Exception as exc:  # noqa: BLE001 - a missing tuner is a reported problem, not a crash
        notes.append(f"fastpeft {method} unavailable: {type(exc).__name__}: {exc}")
        fm = None
    cast = dict(device=device) if adapters_fp32 else dict(device=device, dtype=dtype)
    pm.to(**cast).train()
    if fm is not None:
        fm.to(**cast).train()
    return pm, fm, notes


def compare_pair(ctx: BenchContext, res: SuiteResult, table: Table, *, dtype, case: str, label: str,
                 base_fwd: Callable[[], torch.Tensor], base_params: List[torch.Tensor],
                 make_layers: Callable[[], Any], x: torch.Tensor, g: torch.Tensor, targets=None,
                 overhead_target: Optional[Target] = None):
    """One row group from a (peft, fastpeft) pair built by `make_layers` (see build_pair); `targets` is
    (speed target, saved-bytes target), default this suite's; `overhead_target` (%) applies to fastpeft's
    time over the frozen base."""
    try:
        pm, fm, notes = make_layers()
    except Exception as exc:  # noqa: BLE001
        res.errors.append(f"{dtype_name(dtype)} {label}: build failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return
    for n in notes:
        res.errors.append(f"{dtype_name(dtype)} {label}: {n}")
    layer_f = fm.get_base_model() if fm is not None else None
    compare_layers(ctx, res, table, dtype=dtype, case=case, label=label, base_fwd=base_fwd, base_params=base_params,
                   layer_p=pm.get_base_model(), layer_f=layer_f, x=x, g=g,
                   targets=targets if targets is not None else _targets(case, dtype), overhead_target=overhead_target)


def linear_case(ctx: BenchContext, dtype, d: int, tokens: int):
    """The shared one-Linear set-up of the layer suites: (model to adapt (OneLinear d x d, target "proj"),
    input x [tokens, d] requiring grad, upstream gradient g, frozen base forward, its parameters)."""
    dev = ctx.device
    torch.manual_seed(1)
    x = torch.randn(tokens, d, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, device=dev, dtype=dtype)
    torch.manual_seed(0)
    model = OneLinear(d, d)
    base = copy.deepcopy(model.proj).to(device=dev, dtype=dtype).requires_grad_(False)
    W, b = base.weight, base.bias
    return model, x, g, (lambda: F.linear(x, W, b)), [W, b]


def bench_linear(ctx: BenchContext, res: SuiteResult, table: Table, dtype, d: int, tokens: int):
    model, x, g, base_fwd, base_params = linear_case(ctx, dtype, d, tokens)
    for method in ("lokr", "loha"):
        compare_pair(ctx, res, table, dtype=dtype, case=method, label=method,
                     base_fwd=base_fwd, base_params=base_params,
                     make_layers=lambda method=method: build_pair(model, method, ["proj"], dtype, ctx.device),
                     x=x, g=g)


def bench_conv(ctx: BenchContext, res: SuiteResult, table: Table, dtype, channels: int, hw: int, batch: int):
    dev = ctx.device
    torch.manual_seed(2)
    x = torch.randn(batch, channels, hw, hw, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(batch, channels, hw, hw, device=dev, dtype=dtype)
    torch.manual_seed(0)
    block = ConvBlock(channels)
    base = copy.deepcopy(block).to(device=dev, dtype=dtype).requires_grad_(False)
    for method in ("lora", "loha", "lokr"):
        compare_pair(ctx, res, table, dtype=dtype, case=f"conv {method}", label=f"conv block {method}",
               base_fwd=lambda: base(x), base_params=list(base.parameters()),
               make_layers=lambda method=method: build_pair(block, method, ["conv1", "conv2"], dtype, dev), x=x, g=g)


@register("lycoris")
def run(ctx: BenchContext) -> SuiteResult:
    res = SuiteResult("lycoris", ctx.device)
    o = ctx.options
    d = o.get("d", 256 if ctx.quick else 1024)
    tokens = o.get("tokens", 256 if ctx.quick else 2048)
    ch = o.get("conv_channels", 32 if ctx.quick else 64)
    hw = o.get("conv_hw", 16 if ctx.quick else 32)
    batch = o.get("conv_batch", 2 if ctx.quick else 8)
    src = lycoris_ops_source()
    res.meta.update(d=d, tokens=tokens, r=R, alpha=ALPHA, bias=True, conv_channels=ch, conv_hw=hw, conv_batch=batch,
                    dtypes=[dtype_name(t) for t in ctx.dtypes], warmup=ctx.warmup, repeats=ctx.repeats,
                    min_sample_ms=ctx.min_sample_ms, fastpeft_lycoris_ops=src)
    cols = LAYER_COLUMNS + (CUDA_EXTRA_COLUMNS if ctx.is_cuda else [])
    common_notes = [
        "ms: median per fwd+bwd; over base %: median per-round overhead vs the frozen base; "
        "speedup: median per-round peft_ms / fastpeft_ms; ceiling x: peft_ms / base_ms",
        "saved MB: unique storages saved for backward (params excluded, input included); saved x: fastpeft / peft",
        f"fastpeft's LoKr/LoHa ops come from {src}",
        "targets are informational (never asserted)",
    ]
    lin = Table(f"LoKr/LoHa layer fwd+bwd (frozen base), d={d}, tokens={tokens}, r={R}, alpha={ALPHA}, {ctx.device}",
                cols, notes=["LoKr: default factorisation (decompose_factor=-1, decompose_both=False)"] + common_notes)
    conv = Table(f"UNet-style conv block fwd+bwd (frozen base), {ch} ch, {hw}x{hw}, batch {batch}, adapters r={R} on "
                 f"conv1+conv2, {ctx.device}", cols,
                 notes=["block: x + conv3x3(silu(gn(conv3x3(silu(gn(x)))))); LoHa/LoKr use_effective_conv2d=False"]
                 + common_notes)
    for dtype in ctx.dtypes:
        bench_linear(ctx, res, lin, dtype, d, tokens)
        bench_conv(ctx, res, conv, dtype, ch, hw, batch)
    res.tables += [lin, conv]
    return res
