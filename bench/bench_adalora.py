"""Small Llama AdaLoRA training step: fastpeft vs peft on the same weights.

A randomly initialised transformers LlamaForCausalLM (4 layers, hidden 512, intermediate 1376, 8 heads,
vocab 8000; seq 256, batch 4 by default; 2 layers / hidden 128 with --quick), AdaLoRA (init_r=12,
target_r=4, lora_alpha=32) on q/k/v/o/gate/up/down. One training step = forward with labels (loss +
orthogonality regulariser) + backward + AdamW step on the adapter parameters + `update_and_allocate(step)`
(deltaT=1 and a long budget phase: the importance update and a masking to the budget every step, the
allocator's heaviest setting). Both models are built through the libraries' public get_peft_model; peft's
randomised adapter weights are copied into fastpeft's and the eval losses compared before timing; the
steps are timed in alternation (`time_interleaved`).

One table row group per dtype of `--dtypes` (option "adalora_dtypes"); bf16 = bf16 base, fp32 adapters (both
libraries' default). A second table times two parts of the step alone, on the same models: `update_and_allocate`
(importance EMA + masking to the budget) and the orthogonality regulariser, forward + backward (each library's own
code: the wrapped model's forward is replaced by one that returns a zero loss, so the tuner's forward returns
orth_reg_weight * regulariser). peft's `ranknum`, which its bf16 autocast makes trainable (a peft bug), is frozen
so that both train the same parameters. Target: fastpeft >= 1.2x peft.
"""
from __future__ import annotations

import copy
import traceback
from typing import Any, Dict

import torch

from .bench_lora import copy_matching_state
from .bench_llama import random_llama
from .common import BenchContext, Ratio, SuiteResult, Table, Target, dtype_name, register, time_interleaved

SPEED_TARGET = Target(1.2, ">=", "AdaLoRA train step vs peft")

FULL = dict(layers=4, hidden=512, intermediate=1376, heads=8, vocab=8000, seq=256, batch=4, init_r=12, target_r=4)
QUICK = dict(layers=2, hidden=128, intermediate=344, heads=4, vocab=1000, seq=64, batch=2, init_r=8, target_r=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]



def freeze_peft_ranknum(model) -> None:
    """peft's autocast of a bf16/fp16 base re-wraps AdaLoRA's `ranknum` as a trainable Parameter (a peft bug: AdamW
    would then change the rank divisor); freeze it, so that both libraries train the same parameters."""
    for n, p in model.named_parameters():
        if ".ranknum." in n:
            p.requires_grad_(False)

def _adalora_kwargs(shape: Dict[str, int]) -> Dict[str, Any]:
    return dict(task_type="CAUSAL_LM", init_r=shape["init_r"], target_r=shape["target_r"], lora_alpha=32,
                target_modules=list(TARGETS), tinit=0, tfinal=0, deltaT=1, total_step=10**6, lora_dropout=0.0)


def build_models(shape: Dict[str, int], dtype, device):
    import peft

    import fastpeft

    base = random_llama(shape).to(dtype)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**_adalora_kwargs(shape)))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.AdaLoraConfig(**_adalora_kwargs(shape)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero E so that the adapters change the outputs
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    freeze_peft_ranknum(pm)
    missing = copy_matching_state(pm, fm)
    if missing:
        raise RuntimeError(f"fastpeft parameters with no peft counterpart: {missing[:5]}...")
    np_, nf = (sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (pm, fm))
    if np_ != nf:
        raise RuntimeError(f"trainable parameter count differs: peft {np_} vs fastpeft {nf}")
    # reference: the model with no adapters, frozen but for the input embeddings (backward runs through every
    # layer as under AdaLoRA); peft_ms / base_ms is the most any adapter implementation could gain
    frozen = base.requires_grad_(False)
    frozen.get_input_embeddings().weight.requires_grad_(True)
    for m in (pm, fm, frozen):
        m.to(device)
    return {"base": frozen, "peft": pm, "fastpeft": fm}


def _make_step(model, ids):
    if not hasattr(model, "base_model") or not hasattr(model.base_model, "update_and_allocate"):
        def base_step():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        return base_step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    counter = [0]

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(counter[0])
        counter[0] += 1
        opt.zero_grad(set_to_none=True)

    return step


def _part_fns(models, ids) -> Dict[str, Dict[str, Any]]:
    """{part: {impl: callable}} for the parts table (gradients are populated first; the regulariser's callables
    need `_zero_loss_forward` in place)."""
    out: Dict[str, Dict[str, Any]] = {"update_and_allocate": {}, "orth regulariser fwd+bwd": {}}
    for k in ("fastpeft", "peft"):
        model = models[k]
        tuner = model.base_model
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        counter = [1]

        def alloc(tuner=tuner, counter=counter):
            tuner.update_and_allocate(counter[0])
            counter[0] += 1

        def reg(tuner=tuner):
            tuner().loss.backward()

        out["update_and_allocate"][k] = alloc
        out["orth regulariser fwd+bwd"][k] = reg
    return out


class _zero_loss_forward:
    """Within the block, the wrapped models' forward returns only a zero loss (the tuner adds the regulariser)."""

    def __init__(self, models):
        self.inner = [m.base_model.model for m in models]

    def __enter__(self):
        import types

        for m in self.inner:
            m.forward = lambda *a, **k: types.SimpleNamespace(loss=torch.zeros(()))

    def __exit__(self, *exc):
        for m in self.inner:
            del m.forward


def _bench_parts(ctx: BenchContext, res: SuiteResult, table: Table, label: str, models, ids) -> None:
    try:
        parts = _part_fns(models, ids)
        for part, fns in parts.items():
            if part.startswith("orth"):
                with _zero_loss_forward([models["peft"], models["fastpeft"]]):
                    t = time_interleaved(fns, ctx.device, warmup=max(2, ctx.warmup), repeats=max(5, ctx.repeats),
                                         min_sample_ms=ctx.min_sample_ms)
            else:
                t = time_interleaved(fns, ctx.device, warmup=max(2, ctx.warmup), repeats=max(5, ctx.repeats),
                                     min_sample_ms=ctx.min_sample_ms)
            row = table.add(dtype=label, part=part, **{"fastpeft ms": t.median("fastpeft"),
                                                       "fastpeft iqr": t.iqr("fastpeft"),
                                                       "peft ms": t.median("peft"), "peft iqr": t.iqr("peft"),
                                                       "speedup": t.ratio("peft", "fastpeft")})
            row["timing"] = t.summary()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        res.errors.append(f"{label}: parts timing failed: {type(exc).__name__}: {exc}")


def _bench_dtype(ctx: BenchContext, res: SuiteResult, table: Table, shape: Dict[str, int], dtype, ids,
                 parts_table: Table) -> None:
    label = dtype_name(dtype)
    tokens = shape["batch"] * shape["seq"]
    try:
        models = build_models(shape, dtype, ctx.device)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        res.errors.append(f"{label}: build failed: {type(exc).__name__}: {exc}")
        return
    mismatch = None
    try:
        with torch.no_grad():
            lp, lf = (models[k].eval()(input_ids=ids, labels=ids).loss.float().item() for k in ("peft", "fastpeft"))
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        if abs(lp - lf) > tol * max(1.0, abs(lp)):
            mismatch = f"eval loss differs: peft {lp:.5f} vs fastpeft {lf:.5f}"
    except Exception as exc:  # noqa: BLE001
        mismatch = f"check failed: {type(exc).__name__}: {exc}"
    if mismatch:
        res.errors.append(f"{label}: {mismatch}")
    for m in models.values():
        m.train()
    steps = {k: _make_step(m, ids) for k, m in models.items()}
    ctx.log(f"adalora {label}: timing " + ", ".join(steps))
    try:
        t = time_interleaved(steps, ctx.device, warmup=max(1, ctx.warmup - 1), repeats=max(3, ctx.repeats),
                             min_sample_ms=0.0)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        res.errors.append(f"{label}: timing failed: {type(exc).__name__}: {exc}")
        return
    speed = t.ratio("peft", "fastpeft")
    ceiling = t.ratio("peft", "base")
    for k in steps:
        ms = t.median(k)
        row = table.add(dtype=label, impl=k, **{"ms/step": ms, "iqr ms": t.iqr(k), "tokens/s": tokens / (ms / 1e3)})
        row["timing"] = t.summary()[k]
        if k != "base":
            row["over base %"] = (t.ratio(k, "base") - 1.0) * 100.0
        if k == "fastpeft":
            row.update(speedup=speed, target=SPEED_TARGET.describe("x"), **{"ceiling x": ceiling},
                       status="INVALID" if mismatch else SPEED_TARGET.check(speed))
            if mismatch:
                row["error"] = mismatch
    res.ratios.append(Ratio(f"adalora {label}: train step fastpeft/peft", speed, SPEED_TARGET, "speedup"))
    _bench_parts(ctx, res, parts_table, label, models, ids)


@register("adalora")
def run(ctx: BenchContext) -> SuiteResult:
    res = SuiteResult("adalora", ctx.device)
    shape = dict(QUICK if ctx.quick else FULL)
    shape.update({k: v for k, v in ctx.options.items() if k in FULL})
    dtypes = ctx.options.get("adalora_dtypes", list(ctx.dtypes))
    tokens = shape["batch"] * shape["seq"]
    res.meta.update(shape=shape, dtypes=[dtype_name(d) for d in dtypes], tokens_per_step=tokens,
                    target_modules=TARGETS, threads=torch.get_num_threads(),
                    step="forward(labels) + backward + AdamW(lr=1e-5) + update_and_allocate (deltaT=1)")
    table = Table(
        f"Llama {shape['layers']}L h{shape['hidden']} i{shape['intermediate']} v{shape['vocab']}, batch "
        f"{shape['batch']} x seq {shape['seq']}, AdaLoRA init_r={shape['init_r']} target_r={shape['target_r']} on "
        f"q/k/v/o/gate/up/down, train step, {ctx.device}",
        ["dtype", "impl", "ms/step", "iqr ms", "tokens/s", "over base %", "speedup", "ceiling x", "target", "status"],
        notes=["speedup: median per-round peft_ms / fastpeft_ms (alternating steps)",
               "base: the model without adapters, frozen but for the input embeddings (fwd+bwd, no optimizer); "
               "ceiling x: peft_ms / base_ms, the speed-up if the adapters cost nothing",
               "step: forward with labels (+ orthogonality regulariser), backward, AdamW, update_and_allocate "
               "(importance EMA + masking to the cubic budget every step)",
               "bf16: the base in bf16, the adapters in fp32 (both libraries' autocast_adapter_dtype)"],
    )
    parts_table = Table(
        f"the same models: two parts of the AdaLoRA step alone, {ctx.device}",
        ["dtype", "part", "fastpeft ms", "fastpeft iqr", "peft ms", "peft iqr", "speedup"],
        notes=["update_and_allocate: importance EMA of every A, B, E + masking to the budget (deltaT=1: every "
               "call), after a backward",
               "orth regulariser fwd+bwd: the mean of ||A A^T - I||_F and ||B^T B - I||_F over every A and B, and "
               "its backward (each library's own code)",
               "speedup: median per-round peft_ms / fastpeft_ms (alternating calls)"],
    )
    torch.manual_seed(5)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), device=ctx.device)
    for dtype in dtypes:
        _bench_dtype(ctx, res, table, shape, dtype, ids, parts_table)
    res.tables.append(table)
    res.tables.append(parts_table)
    return res
