"""Mixed-adapter batches (`adapter_names=[...]`) with trainable tokens (LoraConfig.trainable_token_indices, also on a
tied lm_head) and with modules_to_save, against peft (the oracle): each row gets its adapter's token rows / module
copy, "__base__" rows the original module; forward and greedy generate."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from _peft_testing import inputs, logits, peft, randomize_adapter, tiny_llama

import fastpeft

TOKENS_A = [5, 7, 9, 11]
TOKENS_B = [7, 20, 30]


def _randomize_tokens(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def _pair(configs: dict, tied: bool, with_peft: bool = True):
    """(fastpeft model, peft model) with the adapters of `configs` (name -> LoraConfig kwargs), same weights."""
    base = tiny_llama(tie_word_embeddings=tied)
    names = list(configs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**configs[names[0]]), adapter_name=names[0])
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**configs[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            fm.add_adapter(n, fastpeft.LoraConfig(**configs[n]))
            pm.add_adapter(n, peft.LoraConfig(**configs[n]))
    randomize_adapter(fm, seed=5)
    _randomize_tokens(fm, seed=6)
    if not with_peft:
        return fm.eval(), None
    for n in names:
        peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm, adapter_name=n), n)
    return fm.eval(), pm.eval()


def _batch(n):
    batch = inputs(batch=n, seq=6)
    ids = batch["input_ids"].clone()
    ids[:, 2] = 7   # a token both adapters train
    ids[:, 3] = 20  # one only b trains
    ids[::2, 4] = 5  # one only a trains
    batch["input_ids"] = ids
    return batch


TT = {
    "a": dict(r=4, target_modules=["q_proj"], trainable_token_indices=TOKENS_A),
    "b": dict(r=2, target_modules=["v_proj"], trainable_token_indices=TOKENS_B),
}


@pytest.mark.parametrize("tied", [False, True])
def test_trainable_tokens_rows_match_peft(tied):
    fm, pm = _pair(TT, tied)
    rows = ["a", "__base__", "b", "a", "b"]
    batch = _batch(len(rows))
    got = logits(fm, dict(batch, adapter_names=rows))
    torch.testing.assert_close(got, logits(pm, dict(batch, adapter_names=rows)), atol=1e-4, rtol=1e-4)
    # each row is the single-adapter forward of that row
    for i, name in enumerate(rows):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        if name == "__base__":
            with fm.disable_adapter():
                one = logits(fm, row)
        else:
            fm.set_adapter(name)
            one = logits(fm, row)
        torch.testing.assert_close(got[i:i + 1], one, atol=1e-4, rtol=1e-4)
    fm.set_adapter("a")


def test_one_adapter_for_all_rows_and_generate_match_peft():
    fm, pm = _pair(TT, tied=True)
    batch = _batch(3)
    for rows in (["b", "b", "b"], ["__base__"] * 3, ["b", "a", "__base__"]):
        torch.testing.assert_close(logits(fm, dict(batch, adapter_names=rows)),
                                   logits(pm, dict(batch, adapter_names=rows)), atol=1e-4, rtol=1e-4)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    rows = ["b", "a", "__base__"]
    with torch.no_grad():
        got = fm.generate(**batch, adapter_names=rows, **kw)
        want = pm.generate(**batch, adapter_names=rows, **kw)
    assert torch.equal(got, want)


def test_adapter_without_tokens_uses_the_base_rows():
    """An adapter with no trainable tokens on the embedding: its rows see the original embedding (peft raises a
    KeyError there)."""
    configs = {"a": TT["a"], "c": dict(r=2, target_modules=["k_proj"])}
    fm, _ = _pair(configs, tied=False, with_peft=False)  # (peft cannot even load "c" next to "a" here)
    rows = ["c", "a"]
    batch = _batch(2)
    got = logits(fm, dict(batch, adapter_names=rows))
    fm.set_adapter("c")
    torch.testing.assert_close(got[:1], logits(fm, {k: v[:1] for k, v in batch.items()}), atol=1e-4, rtol=1e-4)


def test_modules_to_save_rows_match_peft():
    configs = {"a": dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
               "b": dict(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"])}
    fm, pm = _pair(configs, tied=False)
    rows = ["b", "__base__", "a", "b"]
    batch = _batch(len(rows))
    torch.testing.assert_close(logits(fm, dict(batch, adapter_names=rows)),
                               logits(pm, dict(batch, adapter_names=rows)), atol=1e-4, rtol=1e-4)


def test_merged_token_adapter_refused():
    fm, _ = _pair(TT, tied=False)
    fm.base_model.model.model.embed_tokens.token_adapter.merge(adapter_names=["a"])
    with pytest.raises(ValueError, match="merged adapters"):
        logits(fm, dict(_batch(2), adapter_names=["a", "b"]))
