"""Activated LoRA (aLoRA, `LoraConfig(alora_invocation_tokens=...)`) against peft on a tiny Llama built offline."""
import copy
import warnings

import pytest
import torch

from _peft_testing import VOCAB, close, randomize_adapter, tiny_llama

import peft  # noqa: E402  (skipped by _peft_testing when missing)

import fastpeft
from fastpeft.tuners.lora.alora import AloraOffsets, calculate_alora_offsets

INVOKE = [5, 6, 7]
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _kwargs(**over):
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, alora_invocation_tokens=INVOKE, task_type="CAUSAL_LM")
    kw.update(over)
    return kw


def _pair(seed=0, adapters=None, **over):
    """(peft model, fastpeft model, base): the same randomised adapter(s) on copies of one tiny Llama."""
    base = tiny_llama(seed)
    adapters = adapters or {"default": _kwargs(**over)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = list(adapters)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**adapters[names[0]]), names[0])
        ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**adapters[names[0]]), names[0])
        for name in names[1:]:
            theirs.add_adapter(name, peft.LoraConfig(**adapters[name]))
            ours.add_adapter(name, fastpeft.LoraConfig(**adapters[name]))
    randomize_adapter(theirs)
    theirs.eval()
    ours.eval()
    missing = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not missing.unexpected_keys and not [k for k in missing.missing_keys if "lora_" in k]
    return theirs, ours, base


def _batch():
    """3 rows of 12 tokens: row 0 has the invocation twice (the last one counts), row 1 at its very end, row 2 not at
    all (and is left-padded)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, VOCAB, (3, 12), generator=g)
    ids[0, 1:4] = torch.tensor(INVOKE)
    ids[0, 6:9] = torch.tensor(INVOKE)
    ids[1, 9:12] = torch.tensor(INVOKE)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0
    return ids, mask


def _logits(model, **kw):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**kw).logits


def test_offsets_match_peft():
    from peft.tuners.lora.variants import calculate_alora_offsets as peft_offsets

    ids, _ = _batch()
    configs = {"a": fastpeft.LoraConfig(alora_invocation_tokens=INVOKE, task_type="CAUSAL_LM"),
               "b": fastpeft.LoraConfig(alora_invocation_tokens=[ids[2, 4].item()], task_type="CAUSAL_LM"),
               "plain": fastpeft.LoraConfig()}
    assert calculate_alora_offsets(configs, "a", ids) == [6, 3, None]
    assert calculate_alora_offsets(configs, "a", ids) == peft_offsets(configs, "a", ids)
    names = ["b", "plain", "b"]
    assert calculate_alora_offsets(configs, "a", ids, names) == peft_offsets(configs, "a", ids, names)
    names = ["__base__", "a", "b"]
    assert calculate_alora_offsets(configs, "a", ids, names) == peft_offsets(configs, "a", ids, names)


def test_forward_matches_peft_and_is_base_before_the_invocation():
    theirs, ours, base = _pair()
    ids, mask = _batch()
    expected = _logits(theirs, input_ids=ids, attention_mask=mask)
    got = _logits(ours, input_ids=ids, attention_mask=mask)
    close(expected, got)
    plain = _logits(base, input_ids=ids, attention_mask=mask)
    # before the (last) invocation: the base model's outputs (its KV cache is reusable); the row without one: base
    torch.testing.assert_close(got[0, :6], plain[0, :6], rtol=0, atol=0)
    torch.testing.assert_close(got[1, :9], plain[1, :9], rtol=0, atol=0)
    torch.testing.assert_close(got[2], plain[2], rtol=0, atol=0)
    assert (got[0, 6:] - plain[0, 6:]).abs().max() > 1e-3
    assert (got[1, 9:] - plain[1, 9:]).abs().max() > 1e-3


def test_explicit_offsets_match_peft():
    theirs, ours, _ = _pair()
    ids, mask = _batch()
    for offsets in ([2, None, 12], [0, 5, 1], torch.tensor([12, 12, 3])):
        expected = _logits(theirs, input_ids=ids, attention_mask=mask, alora_offsets=offsets)
        close(expected, _logits(ours, input_ids=ids, attention_mask=mask, alora_offsets=offsets))
    # an offset longer than the input: the whole row (as peft)
    long = [40, 40, 40]
    close(_logits(theirs, input_ids=ids, alora_offsets=long), _logits(ours, input_ids=ids, alora_offsets=long))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_match_peft(dropout):
    theirs, ours, _ = _pair(lora_dropout=dropout)
    ids, mask = _batch()
    labels = ids.clone()
    losses = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(7)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses.append(out.loss.detach())
    if dropout:  # dropout draws are not peft's; the adapted positions still train, with finite gradients
        grads = {n: p.grad for n, p in ours.named_parameters() if "lora_" in n}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert any(g.abs().sum() > 0 for g in grads.values())
        return
    close(losses[0], losses[1])
    expected = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(expected) == sorted(got)
    for n in expected:
        close(expected[n], got[n], tol=1e-4)


def test_no_invocation_anywhere_gives_base_output_and_zero_grads():
    theirs, ours, base = _pair()
    ids = torch.randint(10, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    close(_logits(base, input_ids=ids), _logits(ours, input_ids=ids), tol=0)
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in ours.named_parameters() if "lora_" in n]
    assert all(g is not None and g.abs().max() == 0 for g in grads)  # peft: zero (not missing) gradients


def test_kv_cache_prefix_from_base_model():
    """The base model's KV cache of the context is reused; the adapted suffix (invocation + rest) runs with it."""
    theirs, ours, base = _pair()
    ids, _ = _batch()
    ids = ids[:2, :].clone()
    ids[1, 4:7] = torch.tensor(INVOKE)  # both rows: invocation in the last 8 tokens
    ids[0, 1:4] = 50
    prefix, suffix = ids[:, :4], ids[:, 4:]
    full = _logits(ours, input_ids=ids)
    for model in (theirs, ours):
        with torch.no_grad():
            with model.disable_adapter():
                cache = model(input_ids=prefix, use_cache=True).past_key_values
        out = _logits(model, input_ids=suffix, past_key_values=cache, use_cache=True)
        close(full[:, 4:], out, tol=1e-5)


def test_generate_greedy_matches_peft():
    theirs, ours, _ = _pair()
    ids, mask = _batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.generate(**kw)
        got = ours.generate(**kw)
        assert torch.equal(expected, got)
        # the prompt positionally, and explicit offsets
        assert torch.equal(theirs.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
                           ours.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
        kw["alora_offsets"] = [1, 4, None]
        assert torch.equal(theirs.generate(**kw), ours.generate(**kw))


@pytest.mark.parametrize("direction", ["peft_to_fastpeft", "fastpeft_to_peft"])
def test_checkpoints_both_ways(tmp_path, direction):
    theirs, ours, base = _pair()
    ids, mask = _batch()
    src, dst_lib = (theirs, fastpeft) if direction == "peft_to_fastpeft" else (ours, peft)
    src.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["alora_invocation_tokens"] == INVOKE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = dst_lib.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    close(_logits(src, input_ids=ids, attention_mask=mask), _logits(loaded, input_ids=ids, attention_mask=mask))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(src.generate(**kw), loaded.generate(**kw))


def test_mixed_adapter_batch_matches_peft():
    adapters = {"alora": _kwargs(), "plain": _kwargs(alora_invocation_tokens=None),
                "alora2": _kwargs(alora_invocation_tokens=[ids_tok := 8])}
    theirs, ours, _ = _pair(adapters=adapters)
    ids, mask = _batch()
    ids[2, 5] = ids_tok
    ids = torch.cat([ids, ids[:1]])
    mask = torch.cat([mask, mask[:1]])
    for names in (["alora", "plain", "alora2", "__base__"], ["alora2", "alora", "alora", "plain"]):
        kw = dict(input_ids=ids, attention_mask=mask, adapter_names=names)
        close(_logits(theirs, **kw), _logits(ours, **kw))
        gk = dict(kw, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(theirs.generate(**gk), ours.generate(**gk))


def test_plain_adapter_active_with_alora_loaded_keeps_fused_path():
    adapters = {"alora": _kwargs(), "plain": _kwargs(alora_invocation_tokens=None)}
    theirs, ours, _ = _pair(adapters=adapters)
    theirs.set_adapter("plain")
    ours.set_adapter("plain")
    ids, mask = _batch()
    close(_logits(theirs, input_ids=ids, attention_mask=mask), _logits(ours, input_ids=ids, attention_mask=mask))


def test_merge_is_refused():
    _, ours, _ = _pair()
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        ours.merge_and_unload()


def test_inputs_embeds_only_warns_and_runs_the_base_model():
    _, ours, base = _pair()
    ids, _ = _batch()
    emb = base.get_input_embeddings()(ids)
    with pytest.warns(UserWarning, match="inputs_embeds"):
        out = ours(inputs_embeds=emb).logits
    close(_logits(base, input_ids=ids), out.detach(), tol=1e-6)


def test_bad_configs_raise_clear_errors():
    with pytest.warns(UserWarning, match="alora_invocation_tokens is empty"):  # peft runs it as plain LoRA
        assert fastpeft.LoraConfig(alora_invocation_tokens=[], task_type="CAUSAL_LM").alora_invocation_tokens == []
    with pytest.raises(TypeError, match="alora_invocation_tokens must be"):
        fastpeft.LoraConfig(alora_invocation_tokens="<|assistant|>", task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="token ids"):
        fastpeft.LoraConfig(alora_invocation_tokens=[1, -2], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="use_dora=False"):
        fastpeft.LoraConfig(alora_invocation_tokens=INVOKE, use_dora=True, task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match="CAUSAL_LM"):
        fastpeft.LoraConfig(alora_invocation_tokens=INVOKE)
    with pytest.raises(ValueError, match="Linear / Conv1D layers only"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(**_kwargs(target_modules=["embed_tokens"])))
    assert fastpeft.LoraConfig(**_kwargs()).unsupported_features() == []


def test_bad_offsets_raise_clear_errors():
    _, ours, _ = _pair()
    ids, _ = _batch()
    with pytest.raises(ValueError, match="alora_offsets has 2 entries but the batch has 3 rows"):
        ours(input_ids=ids, alora_offsets=[1, 2])
    with pytest.raises(ValueError, match="ints >= 0"):
        ours(input_ids=ids, alora_offsets=[1, -2, 3])
    with pytest.raises(TypeError, match="one int"):
        ours(input_ids=ids, alora_offsets=3)
    with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
        ours.generate(input_ids=ids, num_beams=2, max_new_tokens=2)
    assert len(AloraOffsets(torch.tensor([1, 2]))) == 2


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_matches_plain_training(use_reentrant):
    """transformers' gradient checkpointing recomputes the decoder layers in backward, after the forward's hooks are
    gone: the recomputation must see the same offsets (peft's mechanism), and no hook may be left behind."""
    ids, _ = _batch()
    grads = []
    for gc in (False, True):
        base = tiny_llama(use_cache=False)
        if gc:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            base.enable_input_require_grads()
        model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**_kwargs()))
        randomize_adapter(model)
        model.train()
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert not [m for m in model.modules() if m.__dict__.get("_fastpeft_alora_gc_hooks")]
        assert not [m for m in model.modules() if m._forward_pre_hooks]
        with torch.no_grad():  # evaluation in training mode arms nothing
            model(input_ids=ids)
        assert not [m for m in model.modules() if m._forward_pre_hooks]
    for n in grads[0]:
        close(grads[0][n], grads[1][n], tol=1e-5)


def test_qlora_alora_on_nf4_layers():
    """aLoRA over fastpeft's NF4 layers (peft's bnb Linear4bit has the same variant): base output before the
    invocation, the adapter after it, as the same adapter on the dequantised weights."""
    base = tiny_llama()
    fastpeft.quantize_model(base, blocksize=32, compute_dtype=torch.float32)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**_kwargs(target_modules=["q_proj", "v_proj"])))
    randomize_adapter(model)
    model.eval()
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids, mask = _batch()
    got = _logits(model, input_ids=ids, attention_mask=mask)
    with model.disable_adapter():
        plain = _logits(model, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got[0, :6], plain[0, :6], rtol=0, atol=0)
    torch.testing.assert_close(got[2], plain[2], rtol=0, atol=0)
    assert (got[0, 6:] - plain[0, 6:]).abs().max() > 1e-3
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_fused_path_untouched_for_plain_adapters_and_index_built_once(monkeypatch):
    """A plain LoRA adapter next to an aLoRA one still runs the fused op; an aLoRA forward builds the adapted-token
    index once for all layers (the hook hands every layer the same AloraOffsets)."""
    from fastpeft import ops

    adapters = {"alora": _kwargs(), "plain": _kwargs(alora_invocation_tokens=None)}
    _, ours, _ = _pair(adapters=adapters)
    ids, mask = _batch()
    calls = []
    real = ops.lora_linear
    monkeypatch.setattr(ops, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours.set_adapter("plain")
    _logits(ours, input_ids=ids, attention_mask=mask)
    assert len(calls) == 2 * len(TARGETS)  # every targeted layer of the 2 decoder layers, fused
    calls.clear()
    ours.set_adapter("alora")
    built = []
    real_index = AloraOffsets.token_index
    monkeypatch.setattr(AloraOffsets, "token_index",
                        lambda self, lead, device: built.append(self) or real_index(self, lead, device))
    _logits(ours, input_ids=ids, attention_mask=mask)
    assert not calls and len(built) == 2 * len(TARGETS)
    offsets = {id(x) for x in built}
    assert len(offsets) == 1


def test_inputs_embeds_with_explicit_offsets_and_generate_without_input_ids():
    theirs, ours, base = _pair()
    ids, mask = _batch()
    emb = base.get_input_embeddings()(ids).detach()
    offsets = [6, 3, None]  # what the invocation search gives for these rows
    close(_logits(ours, input_ids=ids, attention_mask=mask),
          _logits(ours, inputs_embeds=emb, attention_mask=mask, alora_offsets=offsets))
    close(_logits(theirs, inputs_embeds=emb, attention_mask=mask, alora_offsets=offsets),
          _logits(ours, inputs_embeds=emb, attention_mask=mask, alora_offsets=offsets))
    with pytest.warns(UserWarning, match="input_ids are not available"):
        ours.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_forward_and_generate_after_every_adapter_is_deleted():
    """With no adapter left, the offsets lookup must not fail on the stale active-adapter name: base outputs."""
    base = tiny_llama(0)
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**_kwargs()))
    ours.add_adapter("plain", fastpeft.LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    ours.delete_adapter("default"), ours.delete_adapter("plain")
    ids, _ = _batch()
    close(_logits(base, input_ids=ids), _logits(ours, input_ids=ids), tol=1e-6)
    with torch.no_grad():
        out = ours.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
        ref = base.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
