"""Small Llama training step: fastpeft vs peft, LoRA on every linear layer; and QLoRA (the base in NF4):
fastpeft (quantize_model + get_peft_model) vs peft + bitsandbytes (Linear4bit holding the same NF4 bytes).

A randomly initialised transformers LlamaForCausalLM (4 layers, hidden 512, intermediate 1376,
8 heads, vocab 8000; seq 256, batch 4 by default), LoRA r=16 on target_modules="all-linear",
one training step = forward + backward + AdamW step on the adapter parameters, bf16 throughout.
Both models are built through the libraries' public get_peft_model on identical weights
(peft's randomised adapter weights are copied into fastpeft's; losses compared in eval mode) and
timed in alternation. Reports tokens/s, the ratio, and the bytes saved for backward.
"""
from __future__ import annotations

import copy
import traceback
from typing import Any, Dict, List, Optional

import torch

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
from .bench_lora import copy_matching_state

SPEED_TARGET = Target(1.15, ">=", "tokens/s vs peft")
MEM_TARGET = Target(0.8, "<=", "activation memory vs peft")

FULL = dict(layers=4, hidden=512, intermediate=1376, heads=8, vocab=8000, seq=256, batch=4, r=16)
QUICK = dict(layers=2, hidden=128, intermediate=344, heads=4, vocab=1000, seq=64, batch=2, r=8)


def random_llama(shape: Dict[str, int], max_positions: Optional[int] = None):
    """A randomly initialised (seed 0) transformers LlamaForCausalLM of `shape` (layers, hidden, intermediate, heads,
    vocab, seq): no KV cache, untied embeddings, at least 512 positions (or `max_positions`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
        max_position_embeddings=max(512, max_positions or shape["seq"]), use_cache=False, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _lora_kwargs(r: int, dropout: float) -> Dict[str, Any]:
    return dict(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)


def build_models(shape: Dict[str, int], dropout: float, dtype, device):
    import peft

    base = random_llama(shape)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_lora_kwargs(shape["r"], dropout)))
    notes = []
    fm = None
    try:
        import fastpeft

        fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**_lora_kwargs(shape["r"], dropout)))
        missing = copy_matching_state(pm, fm)
        if missing:
            raise RuntimeError(f"fastpeft parameters with no peft counterpart: {missing[:5]}...")
        np_, nf = (sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (pm, fm))
        if np_ != nf:
            raise RuntimeError(f"trainable parameter count differs: peft {np_} vs fastpeft {nf}")
    except Exception as exc:  # noqa: BLE001
        notes.append(f"fastpeft model unavailable: {type(exc).__name__}: {exc}")
        fm = None
    # reference: the same model with no adapters, all frozen but the input embeddings, so backward
    # runs through every layer (gradient to the activations) as it must under LoRA
    frozen = base.requires_grad_(False)
    frozen.get_input_embeddings().weight.requires_grad_(True)
    models = {"base": frozen, "peft": pm}
    if fm is not None:
        models["fastpeft"] = fm
    for m in models.values():
        m.to(device=device, dtype=dtype)
    return models, notes


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _eval_loss_mismatch(models, ids, reference: str, dtype, res: SuiteResult, label: str,
                        prepare=lambda m: m) -> Optional[str]:
    """Compares the eval losses of models[reference] and models["fastpeft"] (each first put in eval mode and
    through `prepare`); returns what differs (also added to res.errors), or None."""
    try:
        with torch.no_grad():
            for m in models.values():
                prepare(m.eval())
            lp, lf = (_loss(models[k], ids).float().item() for k in (reference, "fastpeft"))
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        if abs(lp - lf) <= tol * max(1.0, abs(lp)):
            return None
        mismatch = f"eval loss differs: {reference} {lp:.5f} vs fastpeft {lf:.5f}"
    except Exception as exc:  # noqa: BLE001
        mismatch = f"check failed: {type(exc).__name__}: {exc}"
    res.errors.append(f"{label}: {mismatch}")
    return mismatch


def _saved_bytes(models, ids) -> Dict[str, int]:
    """Bytes each model (in train mode) saves for backward in one forward."""
    saved = {}
    for k, m in models.items():
        m.train()
        sb, loss = measure_saved_bytes(lambda m=m: _loss(m, ids), params=list(m.parameters()))
        loss.backward()
        m.zero_grad(set_to_none=True)
        saved[k] = sb
    return saved


def _time_steps(ctx: BenchContext, res: SuiteResult, steps: Dict[str, Any], label: str):
    """Times the training steps interleaved; returns (timings, CUDA peak bytes per step) or None (the failure
    added to res.errors)."""
    peaks = {k: cuda_peak_bytes(s) for k, s in steps.items()} if ctx.is_cuda else {}
    ctx.log(f"llama {label}: timing {', '.join(steps)}")
    try:
        t = time_interleaved(steps, ctx.device, warmup=max(1, ctx.warmup - 1), repeats=max(3, ctx.repeats),
                             min_sample_ms=0.0)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        res.errors.append(f"{label}: timing failed: {type(exc).__name__}: {exc}")
        return None
    return t, peaks


def _make_step(model, ids, optimizer: bool = True):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if optimizer else None

    def step():
        model.zero_grad(set_to_none=True)
        _loss(model, ids).backward()
        if opt is not None:
            opt.step()

    return step, opt


@register("llama")
def run(ctx: BenchContext) -> SuiteResult:
    res = SuiteResult("llama", ctx.device)
    shape = dict(QUICK if ctx.quick else FULL)
    shape.update({k: v for k, v in ctx.options.items() if k in FULL})
    dtype = ctx.options.get("llama_dtype", torch.bfloat16)
    dropouts = ctx.options.get("llama_dropouts", [0.05] if ctx.quick else [0.0, 0.05])
    tokens = shape["batch"] * shape["seq"]
    res.meta.update(shape=shape, dtype=dtype_name(dtype), dropouts=dropouts, tokens_per_step=tokens,
                    optimizer="AdamW(lr=1e-5) on adapter params", target_modules="all-linear")
    cols = ["dropout", "impl", "ms/step", "iqr ms", "tokens/s", "over base %", "speedup", "ceiling x", "target", "status",
            "saved MB", "saved x", "saved tgt", "saved status"] + (["peak MB", "peak x"] if ctx.is_cuda else [])
    table = Table(
        f"Llama {shape['layers']}L h{shape['hidden']} i{shape['intermediate']} v{shape['vocab']}, "
        f"batch {shape['batch']} x seq {shape['seq']}, LoRA r={shape['r']} all-linear, {dtype_name(dtype)}, "
        f"train step (fwd+bwd+AdamW), {ctx.device}",
        cols,
        notes=["speedup: median per-round peft_ms / fastpeft_ms (alternating steps)",
               "base: the model without adapters, frozen but for the input embeddings (fwd+bwd, no optimizer); "
               "ceiling x: peft_ms / base_ms, the speed-up if the adapters cost nothing",
               "saved MB: unique non-parameter storages saved for backward during the forward",
               "models built in fp32 through get_peft_model, then cast to the bench dtype as a whole"],
    )
    torch.manual_seed(5)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), device=ctx.device)
    for dropout in dropouts:
        try:
            models, notes = build_models(shape, dropout, dtype, ctx.device)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            res.errors.append(f"dropout {dropout}: build failed: {type(exc).__name__}: {exc}")
            continue
        res.errors += [f"dropout {dropout}: {n}" for n in notes]
        mismatch = None
        if "fastpeft" in models:
            mismatch = _eval_loss_mismatch(models, ids, "peft", dtype, res, f"dropout {dropout}")
        saved = _saved_bytes(models, ids)
        steps = {k: _make_step(m, ids, optimizer=(k != "base"))[0] for k, m in models.items()}
        timed = _time_steps(ctx, res, steps, f"dropout {dropout}")
        if timed is None:
            continue
        t, peaks = timed
        speed = t.ratio("peft", "fastpeft") if "fastpeft" in steps else None
        ceiling = t.ratio("peft", "base")
        sratio = safe_div(saved["fastpeft"].total, saved["peft"].total) if "fastpeft" in saved else None
        pratio = safe_div(peaks.get("fastpeft"), peaks.get("peft")) if peaks else None
        for k in steps:
            ms = t.median(k)
            row = table.add(dropout=dropout, impl=k, **{"ms/step": ms, "iqr ms": t.iqr(k), "tokens/s": tokens / (ms / 1e3),
                                                        "saved MB": mb(saved[k].total)})
            if k != "base":
                row["over base %"] = (t.ratio(k, "base") - 1.0) * 100.0
            row["timing"] = t.summary()[k]
            if ctx.is_cuda:
                row["peak MB"] = mb(peaks.get(k))
            if k == "fastpeft":
                row.update(speedup=speed, **{"ceiling x": ceiling}, target=SPEED_TARGET.describe("x"),
                           status="INVALID" if mismatch else SPEED_TARGET.check(speed))
                row.update(**{"saved x": sratio, "saved tgt": MEM_TARGET.describe("x"), "saved status": MEM_TARGET.check(sratio)})
                if ctx.is_cuda:
                    row["peak x"] = pratio
                if mismatch:
                    row["error"] = mismatch
        if speed is not None:
            res.ratios.append(Ratio(f"llama drop{dropout}: tokens/s fastpeft/peft", speed, SPEED_TARGET, "speedup"))
        if sratio is not None:
            res.ratios.append(Ratio(f"llama drop{dropout}: saved bytes fastpeft/peft", sratio, MEM_TARGET, "memory"))
        if pratio is not None:
            res.ratios.append(Ratio(f"llama drop{dropout}: CUDA peak fastpeft/peft", pratio, None, "memory"))
        del models, steps
    res.tables.append(table)
    if ctx.options.get("llama_qlora", True):
        _run_qlora(ctx, res, shape, dtype, ids)
    return res


# ---- QLoRA: the same step with the base in NF4 -----------------------------------------------------

QLORA_SPEED_TARGET = Target(1.2, ">=", "tokens/s vs peft+bnb")


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _bnb_linear4bit(layer, compute_dtype):
    """bitsandbytes' Linear4bit holding a fastpeft LinearNF4's exact state dict (same NF4 bytes)."""
    import bitsandbytes as bnb

    sd = layer.state_dict()
    m = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    m.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"].clone(), stats, device="cpu", module=m)
    if layer.bias is not None:
        m.bias = torch.nn.Parameter(sd["bias"].clone(), requires_grad=False)
    return m


def _bnb_train_mode(model):
    # bitsandbytes' CPU eval path repacks the weight for an optional kernel package; its training path
    # (dequantise + matmul) is the one that always works, and the one a training step uses anyway
    for m in model.modules():
        if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"):
            m.train()
    return model


def build_qlora_models(shape: Dict[str, int], dropout: float, dtype, device):
    """(models, notes): the same random Llama in `dtype`, its linear layers (not lm_head) quantised to NF4
    once by fastpeft; "peft+bnb" holds bitsandbytes Linear4bit layers with those exact bytes, "fastpeft"
    the LinearNF4 layers; both get LoRA (all-linear) through their get_peft_model with the same weights."""
    import peft

    import fastpeft

    base = random_llama(shape).to(dtype)
    quantized = fastpeft.quantize_model(copy.deepcopy(base), compute_dtype=dtype, progress=False)
    theirs = copy.deepcopy(quantized)
    for name, module in list(theirs.named_modules()):
        if isinstance(module, fastpeft.LinearNF4):
            parent, _, child = name.rpartition(".")
            setattr(theirs.get_submodule(parent), child, _bnb_linear4bit(module, dtype))
    theirs.is_loaded_in_4bit = True  # what transformers sets; peft dispatches bitsandbytes layers on it
    pm = peft.get_peft_model(theirs, peft.LoraConfig(**_lora_kwargs(shape["r"], dropout)))
    notes = []
    fm = fastpeft.get_peft_model(quantized, fastpeft.LoraConfig(**_lora_kwargs(shape["r"], dropout)))
    missing = copy_matching_state(pm, fm)
    if missing:
        raise RuntimeError(f"fastpeft parameters with no peft counterpart: {missing[:5]}...")
    np_, nf = (sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (pm, fm))
    if np_ != nf:
        raise RuntimeError(f"trainable parameter count differs: peft {np_} vs fastpeft {nf}")
    models = {"peft+bnb": pm.to(device), "fastpeft": fm.to(device)}
    return models, notes


def _run_qlora(ctx: BenchContext, res: SuiteResult, shape: Dict[str, int], dtype, ids) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        res.errors.append("qlora: bitsandbytes is not installed; QLoRA rows skipped")
        return
    shape = dict(shape)
    # bitsandbytes' CPU dequantiser is only right when in_features is a multiple of the blocksize
    shape["intermediate"] = _round_up(shape["intermediate"], 64)
    shape["hidden"] = _round_up(shape["hidden"], 64)
    tokens = shape["batch"] * shape["seq"]
    dropouts = ctx.options.get("llama_qlora_dropouts", [0.0] if ctx.quick else [0.0, 0.05])
    cols = ["dropout", "impl", "ms/step", "iqr ms", "tokens/s", "speedup", "target", "status", "saved MB", "saved x"] + (
        ["peak MB", "peak x"] if ctx.is_cuda else [])
    table = Table(
        f"QLoRA: Llama {shape['layers']}L h{shape['hidden']} i{shape['intermediate']} v{shape['vocab']}, batch "
        f"{shape['batch']} x seq {shape['seq']}, NF4 base (blocksize 64, double quant, compute {dtype_name(dtype)}), "
        f"LoRA r={shape['r']} all-linear, train step (fwd+bwd+AdamW), {ctx.device}",
        cols,
        notes=["both models hold the same NF4 bytes (quantised once by fastpeft, loaded into bitsandbytes' "
               "Linear4bit) and the same adapter weights (fp32, peft's autocast_adapter_dtype)",
               "speedup: median per-round peft+bnb ms / fastpeft ms (alternating steps)",
               "intermediate rounded up to a multiple of 64 (bitsandbytes' CPU dequantiser needs it)",
               "fastpeft: fused qlora_linear (NF4 matmul + LoRA, seeded dropout); peft+bnb: Linear4bit "
               "(dequantise + matmul) + peft's LoRA"],
    )
    ids = ids.remainder(shape["vocab"])
    for dropout in dropouts:
        try:
            models, notes = build_qlora_models(shape, dropout, dtype, ctx.device)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            res.errors.append(f"qlora dropout {dropout}: build failed: {type(exc).__name__}: {exc}")
            continue
        res.errors += [f"qlora dropout {dropout}: {n}" for n in notes]
        mismatch = _eval_loss_mismatch(models, ids, "peft+bnb", dtype, res, f"qlora dropout {dropout}",
                                       prepare=_bnb_train_mode)
        saved = _saved_bytes(models, ids)
        steps = {k: _make_step(m, ids)[0] for k, m in models.items()}
        timed = _time_steps(ctx, res, steps, f"qlora dropout {dropout}")
        if timed is None:
            continue
        t, peaks = timed
        speed = t.ratio("peft+bnb", "fastpeft")
        sratio = safe_div(saved["fastpeft"].total, saved["peft+bnb"].total)
        pratio = safe_div(peaks.get("fastpeft"), peaks.get("peft+bnb")) if peaks else None
        for k in steps:
            ms = t.median(k)
            row = table.add(dropout=dropout, impl=k, **{"ms/step": ms, "iqr ms": t.iqr(k), "tokens/s": tokens / (ms / 1e3),
                                                        "saved MB": mb(saved[k].total)})
            row["timing"] = t.summary()[k]
            if ctx.is_cuda:
                row["peak MB"] = mb(peaks.get(k))
            if k == "fastpeft":
                row.update(speedup=speed, target=QLORA_SPEED_TARGET.describe("x"),
                           status="INVALID" if mismatch else QLORA_SPEED_TARGET.check(speed), **{"saved x": sratio})
                if ctx.is_cuda:
                    row["peak x"] = pratio
                if mismatch:
                    row["error"] = mismatch
        res.ratios.append(Ratio(f"llama qlora drop{dropout}: tokens/s fastpeft/peft+bnb", speed, QLORA_SPEED_TARGET,
                                "speedup"))
        if sratio is not None:
            res.ratios.append(Ratio(f"llama qlora drop{dropout}: saved bytes fastpeft/peft+bnb", sratio, None, "memory"))
        if pratio is not None:
            res.ratios.append(Ratio(f"llama qlora drop{dropout}: CUDA peak fastpeft/peft+bnb", pratio, None, "memory"))
        del models, steps
    res.tables.append(table)
