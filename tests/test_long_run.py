"""Long runs: 2,000 AdamW steps of a LoRA model (and DoRA with dropout, whose masks are seeded and whose norms are
cached) and 200 rounds of adapter bookkeeping (set_adapter, disable_adapter, merge/unmerge, add/delete,
save_pretrained) must not grow memory: neither the process's resident set, nor the number of live tensors or
other garbage-collected objects (a leak of one small tensor per step shows in the counts long before it shows in
the RSS), nor, on CUDA, the bytes the caching allocator has handed out."""
from __future__ import annotations

import gc
import os

import pytest
import torch

import fastpeft

transformers = pytest.importorskip("transformers")

WARMUP = 200
STEPS = 2000


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def _rss() -> int:
    """Resident set size in bytes (Linux: /proc/self/statm, the current value, not the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pytest.skip("needs /proc/self/statm")


def _counts() -> tuple[int, int]:
    """(live tensors, all gc-tracked objects) after a full collection."""
    gc.collect()
    objects = gc.get_objects()
    n_tensors = sum(1 for o in objects if isinstance(o, torch.Tensor))
    n = len(objects)
    del objects
    return n_tensors, n


def _snapshot(device: str) -> dict:
    snap = {}
    snap["tensors"], snap["objects"] = _counts()
    # after _counts: its list of every object (MBs) is freed by then but may stay resident (glibc raises its mmap
    # threshold after freeing a large block), the same in every snapshot once one was taken
    snap["rss"] = _rss()
    if device == "cuda":
        torch.cuda.synchronize()
        snap["cuda"] = torch.cuda.memory_allocated()
    return snap


_primed = []


def _first_snapshot(device: str) -> dict:
    if not _primed:  # once per process: primes the allocator for the object list (see _snapshot)
        _snapshot(device)
        _primed.append(True)
    return _snapshot(device)


# A per-step leak shows as growth over the measured steps (after the warm-up, when optimizer states, autograd's
# and the allocators' pools are in place). Bounds:
#  * live tensors: none may accumulate (a cache keyed on id() / version counters, a retained graph, a hook
#    re-registered each step all add at least one per step or per round);
#  * gc-tracked objects: fewer than one per 20 steps / per 2 rounds (the slack is for lazily filled caches of
#    transformers / typing; any per-step container leak adds at least one per step);
#  * RSS: 2 MiB. Steady-state training here moves it by < 0.2 MiB (glibc keeps freed blocks in its arenas), and
#    2 MiB over 1,800 steps is ~1.1 KiB per step: a leaked activation of this model ([2, 8, 16] fp32 is 1 KiB plus
#    its Python object) or any autograd graph exceeds it;
#  * CUDA allocated bytes: exactly as before (the caching allocator's `memory_allocated` counts live tensors
#    only, rounded to 512-byte blocks, so it does not drift).
RSS_BOUND = 2 * 2**20


def _assert_no_growth(before: dict, after: dict, units: int, what: str) -> None:
    assert after["tensors"] <= before["tensors"], f"{what}: live tensors {before['tensors']} -> {after['tensors']}"
    assert after["objects"] - before["objects"] < max(units // 20, 10), (
        f"{what}: gc-tracked objects {before['objects']} -> {after['objects']}"
    )
    grown = after["rss"] - before["rss"]
    assert grown < RSS_BOUND, f"{what}: RSS grew by {grown / 2**20:.2f} MiB"
    if "cuda" in before:
        assert after["cuda"] <= before["cuda"], f"{what}: CUDA allocated {before['cuda']} -> {after['cuda']} bytes"


def _tiny_llama(device: str):
    """Smaller than _peft_testing.tiny_llama (one layer, width 16): per-step cost is Python overhead, so the
    2,000 steps stay within a few seconds on one thread."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg).to(device)


def _batch(device: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 8), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _train(model, device: str, steps: int, warmup: int) -> tuple[dict, dict, list[float]]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch(device)
    model.train()
    losses, before = [], None
    for step in range(steps):
        if step == warmup:
            before = _first_snapshot(device)
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        if step % 100 == 0:
            losses.append(loss.item())
    del loss
    return before, _snapshot(device), losses


TRAIN_CASES = {
    "lora": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), STEPS),
    # DoRA with dropout: seeded masks regenerated in backward, cached weight norms; fewer steps (a DoRA step costs
    # ~2x a LoRA step) but the same warm-up
    "dora_dropout": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                          lora_dropout=0.1), 1000),
}


def _check_training(device: str, case: str) -> None:
    kwargs, steps = TRAIN_CASES[case]
    model = fastpeft.get_peft_model(_tiny_llama(device), fastpeft.LoraConfig(**kwargs))
    before, after, losses = _train(model, device, steps, WARMUP)
    assert losses[-1] < losses[0]  # it did train
    _assert_no_growth(before, after, steps - WARMUP, f"{case}, steps {WARMUP}..{steps}")


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_does_not_grow_memory(case):
    _check_training("cpu", case)


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_does_not_grow_memory_cuda(case):
    _check_training("cuda", case)


@pytest.fixture(scope="module")
def xlora_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_run_experts")
    for i in range(2):
        torch.manual_seed(i)
        expert = fastpeft.get_peft_model(_tiny_llama("cpu"), fastpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        expert.save_pretrained(str(root / str(i)))
    return {str(i): str(root / str(i)) for i in range(2)}


# methods with their own per-forward state: LLaMA-Adapter's key/value prefixes cached by version counter, prefix
# tuning's per-forward cache, X-LoRA's scalings pass and stacked-expert cache, a bottleneck with dropout; shorter
# runs (a leak of one tensor per step shows in the counts within a few steps)
OTHER_METHODS = {
    "adaption_prompt": lambda experts: fastpeft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1,
                                                                     task_type="CAUSAL_LM"),
    "prefix_tuning": lambda experts: fastpeft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "xlora": lambda experts: fastpeft.XLoraConfig(hidden_size=16, adapters=experts, task_type="CAUSAL_LM"),
    "bottleneck_dropout": lambda experts: fastpeft.BottleneckConfig(r=4, dropout=0.1),
}


@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_other_methods_training_does_not_grow_memory(method, xlora_experts):
    model = fastpeft.get_peft_model(_tiny_llama("cpu"), OTHER_METHODS[method](xlora_experts))
    before, after, _ = _train(model, "cpu", 250, 50)
    _assert_no_growth(before, after, 200, f"{method}, steps 50..250")


def _check_adapter_bookkeeping(device: str, tmp_path, rounds: int = 200, warmup: int = 20) -> None:
    targets = ["q_proj", "v_proj"]
    model = fastpeft.get_peft_model(_tiny_llama(device), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
                                    adapter_name="a")
    model.add_adapter("b", fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _batch(device)
    ids = batch["input_ids"]
    model.eval()
    before = None
    for i in range(rounds):
        if i == warmup:
            before = _first_snapshot(device)
        name = "ab"[i % 2]
        model.set_adapter(name)
        with torch.no_grad():
            out = model(input_ids=ids).logits
            with model.disable_adapter():
                plain = model(input_ids=ids).logits
            model.merge_adapter()
            merged = model(input_ids=ids).logits
            model.unmerge_adapter()
        torch.testing.assert_close(merged, out, rtol=1e-4, atol=1e-5)
        assert not torch.equal(plain, out)
        model.add_adapter("tmp", fastpeft.LoraConfig(r=2, target_modules=targets))
        model.set_adapter("tmp")
        model.train()
        model(**batch).loss.backward()  # a training step's graph and grads, then dropped
        model.zero_grad(set_to_none=True)
        model.eval()
        model.set_adapter(name)
        model.delete_adapter("tmp")
        model.save_pretrained(str(tmp_path))
    del out, plain, merged
    after = _snapshot(device)
    _assert_no_growth(before, after, 20 * (rounds - warmup) // 2, f"adapter bookkeeping, rounds {warmup}..{rounds}")


@pytest.fixture
def no_fsync(monkeypatch):
    """save_pretrained's atomic writes fsync every file and folder (~70 ms a save here); durability is not what
    these tests check, so 200 saves skip it."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def test_adapter_bookkeeping_does_not_grow_memory(tmp_path, no_fsync):
    _check_adapter_bookkeeping("cpu", tmp_path)


@pytest.mark.cuda
def test_adapter_bookkeeping_does_not_grow_memory_cuda(tmp_path, no_fsync):
    _check_adapter_bookkeeping("cuda", tmp_path)
