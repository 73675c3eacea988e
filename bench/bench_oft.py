"""OFT / BOFT per-layer benchmark: fastpeft vs peft vs the frozen base layer.

One adapted nn.Linear (d x d, `tokens` rows), forward + backward with the base frozen: the frozen base
alone (F.linear, gradient to the input only), peft's OFT / BOFT layer, and fastpeft's with the same
config, both built through the library's public `get_peft_model` on the same weights (peft's random
adapter weights, `init_weights=False`, copied into fastpeft's by state-dict name; outputs and gradients
are compared once before timing, a mismatch marks the speed-up INVALID).

Configs: peft's defaults — OFT oft_block_size=32 with the 5-term Cayley-Neumann series, and the exact
Cayley form; BOFT boft_block_size=4 and 32, boft_n_butterfly_factor=1 (peft runs only factor 1 on a
machine where its fbd_cuda extension does not build).
"""
from __future__ import annotations

import contextlib
import copy

import torch

from .bench_lora import CUDA_EXTRA_COLUMNS, LAYER_COLUMNS
from .bench_lycoris import ConvBlock, build_pair, compare_pair, linear_case
from .common import BenchContext, SuiteResult, Table, Target, dtype_name, register

# row label -> (config class name in peft and fastpeft, kwargs with random adapter weights)
METHODS = {
    "oft b=32 neumann": ("OFTConfig", dict(r=0, oft_block_size=32, init_weights=False)),
    "oft b=32 exact": ("OFTConfig", dict(r=0, oft_block_size=32, use_cayley_neumann=False, init_weights=False)),
    "boft b=4": ("BOFTConfig", dict(boft_block_size=4, boft_n_butterfly_factor=1, init_weights=False)),
    "boft b=32": ("BOFTConfig", dict(boft_block_size=32, boft_n_butterfly_factor=1, init_weights=False)),
}


# UNet-style conv block rows (filter dim 9 * channels)
CONV_METHODS = {
    "boft b=4": ("BOFTConfig", dict(boft_block_size=4, boft_n_butterfly_factor=1, init_weights=False)),
    "boft b=16": ("BOFTConfig", dict(boft_block_size=16, boft_n_butterfly_factor=1, init_weights=False)),
}


def _targets(label: str, dtype: torch.dtype):
    """(speed target, saved-bytes target) from the issue: OFT >= 1.1x peft (fp32) / 1.8x (bf16),
    BOFT >= 3x, saved activations <= 0.8x peft's."""
    half = dtype in (torch.bfloat16, torch.float16)
    mem = Target(0.8, "<=", "saved bytes vs peft")
    if label.startswith("oft"):
        return Target(1.8 if half else 1.1, ">=", "OFT"), mem
    return Target(3.0, ">=", "BOFT"), mem


@contextlib.contextmanager
def _peft_boft_without_cuda_extension(device: str):
    """On a CPU run, peft's BOFT would try (and here fail) to compile its fbd_cuda extension once per
    layer, seconds each; it then runs without it. Tell it up front that there is none (its behaviour
    either way) for the duration of the suite; on CUDA it keeps building and using the extension."""
    if str(device).startswith("cuda"):
        yield
        return
    import peft.tuners.boft.layer as boft_layer

    saved = boft_layer.get_fbd_cuda
    boft_layer.get_fbd_cuda = lambda: None
    try:
        yield
    finally:
        boft_layer.get_fbd_cuda = saved


def bench_linear(ctx: BenchContext, res: SuiteResult, table: Table, dtype, d: int, tokens: int):
    model, x, g, base_fwd, base_params = linear_case(ctx, dtype, d, tokens)
    dev = ctx.device
    half = dtype in (torch.bfloat16, torch.float16)
    # half precision: the default set-up (model in bf16, get_peft_model keeps adapters in float32), and for
    # OFT also everything in bf16
    rows = [(label, True) for label in METHODS]
    if half:
        rows += [(label, False) for label in METHODS if label.startswith("oft")]
    for label, adapters_fp32 in rows:
        shown = label if adapters_fp32 or not half else f"{label}, {dtype_name(dtype)} adapters"
        compare_pair(ctx, res, table, dtype=dtype, case=shown, label=shown,
                     base_fwd=base_fwd, base_params=base_params,
                     make_layers=lambda label=label, a=adapters_fp32: build_pair(
                         model, label, ["proj"], dtype, dev, methods=METHODS, adapters_fp32=a),
                     x=x, g=g, targets=_targets(label, dtype))


def bench_conv(ctx: BenchContext, res: SuiteResult, table: Table, dtype, channels: int, hw: int, batch: int):
    """BOFT on both 3x3 convs of a UNet-style block (peft's OFT conv forward is wrong for kernels > 1, so
    OFT has no peft row to compare with here)."""
    dev = ctx.device
    torch.manual_seed(2)
    x = torch.randn(batch, channels, hw, hw, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(batch, channels, hw, hw, device=dev, dtype=dtype)
    torch.manual_seed(0)
    block = ConvBlock(channels)
    base = copy.deepcopy(block).to(device=dev, dtype=dtype).requires_grad_(False)
    for label in CONV_METHODS:
        compare_pair(ctx, res, table, dtype=dtype, case=label, label=f"conv block {label}",
                     base_fwd=lambda: base(x), base_params=list(base.parameters()),
                     make_layers=lambda label=label: build_pair(block, label, ["conv1", "conv2"], dtype, dev,
                                                                methods=CONV_METHODS, adapters_fp32=True),
                     x=x, g=g, targets=(None, None))


@register("oft")
def run(ctx: BenchContext) -> SuiteResult:
    res = SuiteResult("oft", ctx.device)
    o = ctx.options
    d = o.get("d", 256 if ctx.quick else 1024)
    tokens = o.get("tokens", 256 if ctx.quick else 2048)
    ch = o.get("conv_channels", 32 if ctx.quick else 64)
    hw = o.get("conv_hw", 16 if ctx.quick else 32)
    batch = o.get("conv_batch", 2 if ctx.quick else 8)
    res.meta.update(d=d, tokens=tokens, bias=True, configs={k: v[1] for k, v in METHODS.items()},
                    conv_channels=ch, conv_hw=hw, conv_batch=batch,
                    conv_configs={k: v[1] for k, v in CONV_METHODS.items()},
                    dtypes=[dtype_name(t) for t in ctx.dtypes], warmup=ctx.warmup, repeats=ctx.repeats,
                    min_sample_ms=ctx.min_sample_ms)
    cols = LAYER_COLUMNS + (CUDA_EXTRA_COLUMNS if ctx.is_cuda else [])
    table = Table(f"OFT/BOFT layer fwd+bwd (frozen base), d={d}, tokens={tokens}, {ctx.device}", cols, notes=[
        "ms: median per fwd+bwd; over base %: median per-round overhead vs the frozen base; "
        "speedup: median per-round peft_ms / fastpeft_ms; ceiling x: peft_ms / base_ms",
        "saved MB: unique storages saved for backward (params excluded, input included); saved x: fastpeft / peft",
        "BOFT with boft_n_butterfly_factor=1: peft cannot run more factors without its CUDA extension",
        "bf16/fp16 rows: the model in that dtype and the adapters in float32 (get_peft_model's default in both "
        "libraries); '<dtype> adapters' rows: adapters cast to the model's dtype too",
        "targets are informational (never asserted)",
    ])
    conv = Table(f"UNet-style conv block fwd+bwd (frozen base), {ch} ch, {hw}x{hw}, batch {batch}, BOFT on "
                 f"conv1+conv2, {ctx.device}", cols, notes=[
                     "block: x + conv3x3(silu(gn(conv3x3(silu(gn(x)))))); BOFT rotates each 3x3 filter (9 * channels)",
                     "no OFT rows: peft 0.21.2's OFT conv forward is wrong for kernels > 1 (nothing to compare with)",
                     "adapters in float32 (get_peft_model's default) in every dtype",
                 ])
    with _peft_boft_without_cuda_extension(ctx.device):
        for dtype in ctx.dtypes:
            bench_linear(ctx, res, table, dtype, d, tokens)
            bench_conv(ctx, res, conv, dtype, ch, hw, batch)
    res.tables += [table, conv]
    return res
