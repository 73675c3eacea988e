"""The measured "comparison of methods" table: every landed PEFT method on one small Llama.

A randomly initialised transformers LlamaForCausalLM (4 layers, hidden 256, intermediate 704, 4 heads,
vocab 4000; batch 4 x seq 128 by default, bf16). Per method, built through fastpeft's public
``get_peft_model`` (and, where peft has the method, peft's with the same config):

* trainable parameters (and % of the base model's parameters),
* adapter size on disk (``adapter_model.safetensors`` as ``save_pretrained`` writes it),
* training-step time (forward + backward + AdamW on the trainable parameters), all methods timed in
  interleaved rounds so background load hits them alike,
* activation memory: the bytes saved for backward in one training forward (parameters excluded),
* inference latency of one no-grad forward over the batch, unmerged and, for mergeable methods, after
  ``merge_and_unload()``.

"full fine-tuning" is the reference row: every parameter trained, the checkpoint is the whole model.
Prompt methods (prompt / P- / prefix tuning, LLaMA-Adapter) add virtual tokens or prompts, so their
forward does more work per input token. A method that is not available (not landed, or failing to build)
becomes an error line, never a silent gap.
"""
from __future__ import annotations

import copy
import os
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from .bench_adalora import freeze_peft_ranknum
from .bench_llama import random_llama
from .common import (
    BenchContext,
    Ratio,
    SuiteResult,
    Table,
    dtype_name,
    mb,
    measure_saved_bytes,
    register,
    safe_div,
    time_interleaved,
)

FULL = dict(layers=4, hidden=256, intermediate=704, heads=4, vocab=4000, seq=128, batch=4)
QUICK = dict(layers=2, hidden=64, intermediate=192, heads=4, vocab=256, seq=16, batch=2)

_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Method:
    label: str
    config_cls: str  # class name, looked up in fastpeft (and in peft for the comparison)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    peft_has_it: bool = True  # build peft's version too
    peft_needs_cuda: bool = False  # peft runs this config only with its CUDA extension
    quantize: bool = False  # NF4 base (QLoRA)
    mergeable: bool = True
    note: str = ""


def methods(shape: Dict[str, int]) -> List[Method]:
    prompt_len = 20 if shape["seq"] >= 64 else 4
    half = max(1, shape["layers"] // 2)
    lora = dict(r=16, lora_alpha=32, target_modules="all-linear")
    return [
        Method("LoRA r16", "LoraConfig", lora),
        Method("LoRA r64", "LoraConfig", dict(r=64, lora_alpha=128, target_modules="all-linear")),
        Method("DoRA r16", "LoraConfig", {**lora, "use_dora": True}),
        Method("AdaLoRA r12->8", "AdaLoraConfig", dict(init_r=12, target_r=8, lora_alpha=32, total_step=1000,
                                                       target_modules=_LINEARS),
               note="step = forward with the orthogonality regulariser + backward + AdamW (update_and_allocate "
                    "not included; the adalora suite times it)"),
        Method("QLoRA r16 (NF4 base)", "LoraConfig", lora, peft_has_it=False, quantize=True,
               note="merge re-quantises into NF4; peft+bitsandbytes is compared in the llama suite"),
        Method("LoHa r8", "LoHaConfig", dict(r=8, alpha=16, target_modules=_LINEARS)),
        Method("LoKr r8", "LoKrConfig", dict(r=8, alpha=16, target_modules=_LINEARS)),
        Method("OFT b32", "OFTConfig", dict(oft_block_size=32, target_modules=_LINEARS)),
        Method("BOFT b8 x2", "BOFTConfig",
               dict(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=_LINEARS), peft_needs_cuda=True,
               note="peft without its fbd_cuda extension silently drops to butterfly factor 1: no peft row on CPU"),
        Method("IA3", "IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"],
                                        feedforward_modules=["down_proj"])),
        Method("BitFit (+zero biases)", "BitFitConfig", dict(target_modules="all-linear", add_missing_biases=True),
               peft_has_it=False),
        Method("Bottleneck (sequential)", "BottleneckConfig", dict(placement="sequential", reduction_factor=16),
               peft_has_it=False, mergeable=False),
        Method("Bottleneck (parallel)", "BottleneckConfig", dict(placement="parallel", reduction_factor=16),
               peft_has_it=False, mergeable=False),
        Method(f"LLaMA-Adapter len10 top{half}", "AdaptionPromptConfig",
               dict(adapter_len=10, adapter_layers=half, task_type="CAUSAL_LM"), mergeable=False),
        Method(f"Prompt tuning {prompt_len}", "PromptTuningConfig",
               dict(num_virtual_tokens=prompt_len, task_type="CAUSAL_LM"), mergeable=False),
        Method(f"P-tuning {prompt_len} (MLP)", "PromptEncoderConfig",
               dict(num_virtual_tokens=prompt_len, encoder_hidden_size=shape["hidden"], task_type="CAUSAL_LM"),
               mergeable=False),
        Method(f"Prefix tuning {prompt_len}", "PrefixTuningConfig",
               dict(num_virtual_tokens=prompt_len, task_type="CAUSAL_LM"), mergeable=False),
    ]


def _build(lib, method: Method, base, dtype):
    """The PEFT model of `method` from library `lib` (fastpeft or peft) on a copy of `base`, in `dtype`."""
    model = copy.deepcopy(base).to(dtype)
    if method.quantize:
        model = lib.quantize_model(model, compute_dtype=dtype, progress=False)
    config = getattr(lib, method.config_cls)(**method.kwargs)
    return lib.get_peft_model(model, config)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _train_step(model, ids) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        model.zero_grad(set_to_none=True)
        _loss(model, ids).backward()
        opt.step()

    return step


def _infer(model, ids) -> Callable[[], None]:
    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    return forward


def _adapter_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return os.path.getsize(os.path.join(d, "adapter_model.safetensors"))


def _model_bytes(model) -> int:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        seen, unique = set(), {}
        for k, v in sd.items():  # tied weights are stored once
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if key not in seen:
                seen.add(key)
                unique[k] = v
        save_file(unique, path)
        return os.path.getsize(path)


def _weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers in memory (each storage once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        seen[(st.data_ptr(), t.device)] = st.nbytes()
    return sum(seen.values())


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _saved_bytes(model, ids) -> int:
    model.train()
    sb, loss = measure_saved_bytes(lambda: _loss(model, ids), params=list(model.parameters()))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sb.total


@register("methods")
def run(ctx: BenchContext) -> SuiteResult:
    import fastpeft

    try:
        import peft
    except ImportError:
        peft = None
    res = SuiteResult("methods", ctx.device)
    shape = dict(QUICK if ctx.quick else FULL)
    shape.update({k: v for k, v in ctx.options.items() if k in FULL})
    dtype = ctx.options.get("methods_dtype", torch.bfloat16)
    only = ctx.options.get("methods_only")  # labels (prefix match), for the smoke test
    tokens = shape["batch"] * shape["seq"]
    res.meta.update(shape=shape, dtype=dtype_name(dtype), tokens_per_step=tokens,
                    optimizer="AdamW(lr=1e-5) on the trainable parameters")
    base = random_llama(shape, 2 * shape["seq"])
    n_base = sum(p.numel() for p in base.parameters())
    torch.manual_seed(5)
    ids = torch.randint(3, shape["vocab"], (shape["batch"], shape["seq"]), device=ctx.device)

    # reference: full fine-tuning of the same model
    full = copy.deepcopy(base).to(device=ctx.device, dtype=dtype)
    built: Dict[str, Dict[str, Any]] = {"full fine-tuning": {"fastpeft": full}}
    info: Dict[str, Dict[str, Any]] = {"full fine-tuning": dict(trainable=_trainable(full), disk=_model_bytes(full),
                                                                weights=_weight_bytes(full), mergeable=False)}
    for method in methods(shape):
        if only and not any(method.label.startswith(o) for o in only):
            continue
        try:
            fm = _build(fastpeft, method, base, dtype).to(ctx.device)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            res.errors.append(f"{method.label}: fastpeft build failed: {type(exc).__name__}: {exc}")
            continue
        models = {"fastpeft": fm}
        with_peft = method.peft_has_it and (ctx.is_cuda or not method.peft_needs_cuda)
        if with_peft and peft is not None and not ctx.options.get("methods_no_peft", False):
            try:
                pm = _build(peft, method, base, dtype).to(ctx.device)
                freeze_peft_ranknum(pm)
                if _trainable(pm) != _trainable(fm):
                    res.errors.append(f"{method.label}: trainable parameters differ: peft {_trainable(pm)} vs "
                                      f"fastpeft {_trainable(fm)}")
                models["peft"] = pm
            except Exception as exc:  # noqa: BLE001
                res.errors.append(f"{method.label}: peft build failed: {type(exc).__name__}: {exc}")
        built[method.label] = models
        try:
            disk = _adapter_bytes(fm)
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"{method.label}: save_pretrained failed: {type(exc).__name__}: {exc}")
            disk = None
        info[method.label] = dict(trainable=_trainable(fm), disk=disk, weights=_weight_bytes(fm),
                                  mergeable=method.mergeable)

    # activation memory
    for label, models in built.items():
        for impl, m in models.items():
            try:
                info[label][f"saved_{impl}"] = _saved_bytes(m, ids)
            except Exception as exc:  # noqa: BLE001
                res.errors.append(f"{label} ({impl}): training forward failed: {type(exc).__name__}: {exc}")

    # training steps, every method (and peft's) interleaved
    steps = {f"{label}|{impl}": _train_step(m, ids) for label, models in built.items() for impl, m in models.items()
             if f"saved_{impl}" in info[label]}
    ctx.log(f"methods: timing {len(steps)} training steps")
    t_train = time_interleaved(steps, ctx.device, warmup=max(1, ctx.warmup - 1), repeats=max(3, ctx.repeats),
                               min_sample_ms=0.0)

    # inference, unmerged vs merged
    infer = {}
    for label, models in built.items():
        fm = models["fastpeft"].eval()
        if f"saved_fastpeft" not in info[label]:
            continue
        infer[f"{label}|unmerged"] = _infer(fm, ids)
        if "peft" in models:
            infer[f"{label}|peft"] = _infer(models["peft"].eval(), ids)
        if info[label]["mergeable"]:
            try:
                merged = copy.deepcopy(fm).merge_and_unload()
                infer[f"{label}|merged"] = _infer(merged.eval(), ids)
            except Exception as exc:  # noqa: BLE001
                res.errors.append(f"{label}: merge_and_unload failed: {type(exc).__name__}: {exc}")
    ctx.log(f"methods: timing {len(infer)} inference forwards")
    t_infer = time_interleaved(infer, ctx.device, warmup=max(1, ctx.warmup - 1), repeats=max(3, ctx.repeats),
                               min_sample_ms=0.0)

    cols = ["method", "trainable", "trainable %", "adapter MB", "weights MB", "ms/step", "tokens/s", "vs full x", "saved MB",
            "infer ms", "merged ms", "peft ms/step", "vs peft x", "peft saved MB", "peft infer ms"]
    table = Table(
        f"Methods on Llama {shape['layers']}L h{shape['hidden']} i{shape['intermediate']} v{shape['vocab']} "
        f"({n_base / 1e6:.2f}M params), batch {shape['batch']} x seq {shape['seq']}, {dtype_name(dtype)}, "
        f"train step (fwd+bwd+AdamW), {ctx.device}",
        cols,
        notes=["trainable %: of the base model's parameters; adapter MB: adapter_model.safetensors as saved "
               "(full fine-tuning: the whole model); weights MB: parameters and buffers in memory (base + adapters)",
               "ms/step: median of interleaved rounds over every row; vs full x: full fine-tuning ms / this ms",
               "saved MB: unique non-parameter storages saved for backward in one training forward",
               "infer ms: one no-grad forward over the batch, adapters unmerged; merged ms: after "
               "merge_and_unload() (blank: not mergeable); peft infer ms: peft's unmerged forward",
               "vs peft x: median per-round peft ms / fastpeft ms for the same config (blank: peft lacks it)"]
        + [f"{m.label}: {m.note}" for m in methods(shape) if m.note],
    )
    full_key = "full fine-tuning|fastpeft"
    for label, models in built.items():
        key = f"{label}|fastpeft"
        if key not in steps:
            continue
        i = info[label]
        ms = t_train.median(key)
        row = table.add(method=label, trainable=i["trainable"], **{
            "trainable %": 100.0 * i["trainable"] / n_base, "adapter MB": mb(i["disk"]),
            "weights MB": mb(i["weights"]), "ms/step": ms,
            "tokens/s": tokens / (ms / 1e3), "vs full x": t_train.ratio(full_key, key),
            "saved MB": mb(i.get("saved_fastpeft")), "infer ms": t_infer.median(f"{label}|unmerged")})
        if f"{label}|merged" in infer:
            row["merged ms"] = t_infer.median(f"{label}|merged")
        pkey = f"{label}|peft"
        if pkey in steps:
            speed = t_train.ratio(pkey, key)
            row.update(**{"peft ms/step": t_train.median(pkey), "vs peft x": speed,
                          "peft saved MB": mb(i.get("saved_peft")), "peft infer ms": t_infer.median(f"{label}|peft")})
            res.ratios.append(Ratio(f"methods {label}: step time peft/fastpeft", speed, None, "speedup"))
            sratio = safe_div(i.get("saved_fastpeft"), i.get("saved_peft"))
            if sratio is not None:
                res.ratios.append(Ratio(f"methods {label}: saved bytes fastpeft/peft", sratio, None, "memory"))
        row["timing"] = t_train.summary()[key]
    res.tables.append(table)
    return res
