"""Prompt tuning, P-tuning and prefix tuning against peft (the oracle) for causal LM, sequence classification and
seq-to-seq models: forward, loss, gradients, generate(), checkpoints both ways, config JSON, multiple adapters,
disabling, trainable parameters and input checks.

Where peft 0.21.2 is broken with transformers 5.x (generate() with any prompt-learning method on causal LMs, prefix
tuning generate() on seq-to-seq models, prefix tuning for sequence classification: peft still passes
`past_key_values`, which transformers renamed to `cache`), fastpeft is checked against plain-PyTorch references
instead: greedy decoding by repeated full forward passes, and a key/value cache built element by element.
"""
from __future__ import annotations

import copy
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from _peft_testing import close, comparable_config, inputs, peft, read_config, read_tensors, tiny_bert, tiny_llama

import fastpeft

transformers = pytest.importorskip("transformers")

NV = 3  # virtual tokens
VARIANTS = {
    "prompt": ("PromptTuningConfig", {}),
    "ptuning-mlp": ("PromptEncoderConfig", dict(encoder_hidden_size=16)),
    "ptuning-lstm": ("PromptEncoderConfig", dict(encoder_hidden_size=16, encoder_reparameterization_type="LSTM")),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix-proj": ("PrefixTuningConfig", dict(prefix_projection=True, encoder_hidden_size=16)),
}
NAMES = list(VARIANTS)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _configs(name, task_type, **extra):
    kind, kw = VARIANTS[name]
    kw = dict(kw, task_type=task_type, num_virtual_tokens=NV, **extra)
    return getattr(peft, kind)(**copy.deepcopy(kw)), getattr(fastpeft, kind)(**copy.deepcopy(kw))


def _pair(name, base, task_type):
    """(peft model, fastpeft model) on copies of `base`, built under the same seed: same initial weights."""
    pcfg, fcfg = _configs(name, task_type)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    sp, sf = pm.state_dict(), fm.state_dict()
    assert sorted(sp) == sorted(sf), sorted(set(sp) ^ set(sf))
    for k in sp:
        assert torch.equal(sp[k], sf[k]), f"{k}: initialisation differs from peft's under the same seed"
    return pm, fm


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _check_same_training_step(pm, fm, batch, tol=1e-4):
    op, of = pm(**batch), fm(**batch)
    close(op.logits, of.logits, tol)
    close(op.loss, of.loss, tol)
    op.loss.backward()
    of.loss.backward()
    gp, gf = _grads(pm), _grads(fm)
    assert sorted(gp) == sorted(gf)
    for n in gp:
        assert gf[n] is not None, n
        close(gp[n], gf[n], tol)
    assert pm.get_nb_trainable_parameters() == fm.get_nb_trainable_parameters()


def _sgd_step(model, batch, lr=0.5):
    model.zero_grad()
    model(**batch).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p.add_(p.grad, alpha=-lr)
    model.zero_grad()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, initializer_factor=4.0,
    )
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _s2s_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, 96, (2, 4), generator=g)}


# ---- causal LM ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_causal_lm_forward_loss_grads_like_peft(name):
    pm, fm = _pair(name, tiny_llama(), "CAUSAL_LM")
    b = inputs()
    _check_same_training_step(pm, fm, dict(b, labels=b["input_ids"]))
    # only the prompt encoder trains
    assert all(n.startswith("prompt_encoder.default.") for n, p in fm.named_parameters() if p.requires_grad)


def _greedy_reference(model, ids, mask, steps, position_ids=False):
    """Greedy decoding by full forward passes (no cache carried between steps)."""
    with torch.no_grad():
        for _ in range(steps):
            kw = {}
            if position_ids:  # generate()'s positions for left padding
                kw["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
            nxt = model(input_ids=ids, attention_mask=mask, **kw).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("name", NAMES)
def test_causal_lm_generate_equals_greedy_reference(name):
    base = tiny_llama()
    _, fm = _pair(name, base, "CAUSAL_LM")
    fm.eval()
    b = inputs(seed=3)
    with torch.no_grad():
        out = fm.generate(**b, max_new_tokens=6, do_sample=False)
        assert torch.equal(fm.generate(**b, max_new_tokens=6, do_sample=False, use_cache=False), out)
        with fm.disable_adapter():
            disabled = fm.generate(**b, max_new_tokens=6, do_sample=False)
        plain = base.generate(**b, max_new_tokens=6, do_sample=False)
    ref = _greedy_reference(fm, b["input_ids"], b["attention_mask"], 6, position_ids=name.startswith("prefix"))
    assert torch.equal(out, ref)
    assert torch.equal(disabled, plain)
    assert not torch.equal(out, plain)


def _save_dirs(tmp_path):
    return str(tmp_path / "peft"), str(tmp_path / "fast")


@pytest.mark.parametrize("name", NAMES)
def test_causal_lm_checkpoints_both_ways(name, tmp_path):
    base = tiny_llama()
    pm, fm = _pair(name, base, "CAUSAL_LM")
    b = inputs()
    batch = dict(b, labels=b["input_ids"])
    _sgd_step(pm, batch)
    _sgd_step(fm, batch)
    pdir, fdir = _save_dirs(tmp_path)
    pm.save_pretrained(pdir)
    fm.save_pretrained(fdir)
    # same files: the encoder's output under peft's key, the same config JSON
    tp, tf = read_tensors(pdir), read_tensors(fdir)
    assert list(tf) == ["prompt_embeddings"] and sorted(tp) == sorted(tf)
    close(tp["prompt_embeddings"], tf["prompt_embeddings"], 1e-4)
    assert comparable_config(read_config(pdir)) == comparable_config(read_config(fdir))

    ref_p, ref_f = _logits(pm.eval(), b), _logits(fm.eval(), b)
    # peft's directory in fastpeft, fastpeft's in peft: the same outputs as the model that wrote it
    f_from_p = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), pdir)
    p_from_f = peft.PeftModel.from_pretrained(copy.deepcopy(base), fdir)
    f_from_f = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), fdir)
    assert type(f_from_p) is fastpeft.PeftModelForCausalLM
    close(_logits(f_from_p, b), ref_p)
    close(_logits(p_from_f, b), ref_f)
    close(_logits(f_from_f, b), ref_f)
    assert not any(p.requires_grad for p in f_from_p.parameters())
    with torch.no_grad():
        assert torch.equal(
            f_from_f.generate(**b, max_new_tokens=4, do_sample=False),
            fm.generate(**b, max_new_tokens=4, do_sample=False),
        )
    # a saved-then-loaded (inference-mode) model saves the same tensor again
    f_from_f.save_pretrained(str(tmp_path / "again"))
    assert torch.equal(read_tensors(str(tmp_path / "again"))["prompt_embeddings"], tf["prompt_embeddings"])


def test_gpt2_prompt_and_prefix_like_peft():
    from _peft_testing import tiny_gpt2

    base = tiny_gpt2()
    b = inputs()
    for name in ("prompt", "prefix"):
        pm, fm = _pair(name, base, "CAUSAL_LM")
        _check_same_training_step(pm, fm, dict(b, labels=b["input_ids"]))


# ---- sequence classification ------------------------------------------------------------------------------------


def _llama_cls():
    return tiny_llama(cls_name="LlamaForSequenceClassification")


@pytest.mark.parametrize("builder", [_llama_cls, tiny_bert], ids=["llama", "bert"])
@pytest.mark.parametrize("name", ["prompt", "ptuning-mlp"])
def test_seq_cls_like_peft_with_checkpoints(name, builder, tmp_path):
    base = builder()
    pm, fm = _pair(name, base, "SEQ_CLS")
    b = inputs()
    if builder is _llama_cls:
        b["attention_mask"][:] = 1  # llama's classifier picks the last token
    else:  # BERT: token type ids get the virtual tokens' zeros in front
        b["token_type_ids"] = (torch.arange(7) >= 4).long().expand(2, -1)
    batch = dict(b, labels=torch.tensor([0, 2]))
    assert fm.modules_to_save == pm.modules_to_save
    _check_same_training_step(pm, fm, batch)
    trainable = {n.split(".")[0] if n.startswith("prompt_encoder") else n
                 for n, p in fm.named_parameters() if p.requires_grad}
    assert "prompt_encoder" in trainable and all(
        t == "prompt_encoder" or ".modules_to_save.default." in t for t in trainable
    ), trainable
    _sgd_step(pm, batch)
    _sgd_step(fm, batch)
    pdir, fdir = _save_dirs(tmp_path)
    pm.save_pretrained(pdir)
    fm.save_pretrained(fdir)
    tp, tf = read_tensors(pdir), read_tensors(fdir)
    assert sorted(tp) == sorted(tf) and len(tf) >= 2  # the prompt and the classifier head
    for k in tp:
        close(tp[k], tf[k], 1e-4)
    assert comparable_config(read_config(pdir)) == comparable_config(read_config(fdir))
    ref_p, ref_f = _logits(pm.eval(), b), _logits(fm.eval(), b)
    close(_logits(fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), pdir), b), ref_p)
    close(_logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), fdir), b), ref_f)


def _reference_prefix_cache(flat, n_layers, heads, batch):
    """peft's prefix layout element by element: row t of the flat prefix holds, for layer i, the keys at
    [2i * D, (2i + 1) * D) and the values at [(2i + 1) * D, (2i + 2) * D), head-major."""
    tokens, width = flat.shape
    dim = width // (2 * n_layers)
    hd = dim // heads
    layers = []
    for i in range(n_layers):
        k = torch.empty(batch, heads, tokens, hd)
        v = torch.empty(batch, heads, tokens, hd)
        for h in range(heads):
            for t in range(tokens):
                k[:, h, t] = flat[t, 2 * i * dim + h * hd: 2 * i * dim + (h + 1) * hd]
                v[:, h, t] = flat[t, (2 * i + 1) * dim + h * hd: (2 * i + 1) * dim + (h + 1) * hd]
        layers.append((k, v))
    return transformers.DynamicCache(layers)


@pytest.mark.parametrize("builder", [_llama_cls, tiny_bert], ids=["llama", "bert"])
def test_seq_cls_prefix_against_reference(builder, tmp_path):
    """peft cannot run prefix tuning for SEQ_CLS with transformers 5.x; the reference passes a hand-built cache to
    the model (with the trained head) and prepends the prefix's columns to the attention mask."""
    base = builder()
    _, fcfg = _configs("prefix", "SEQ_CLS")
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    b = inputs()
    b["attention_mask"][:] = 1
    batch = dict(b, labels=torch.tensor([0, 2]))
    _sgd_step(fm, batch)
    fm.eval()
    cfg = fm.peft_config["default"]
    flat = fm.prompt_encoder["default"].embedding.weight.detach()
    ref_model = copy.deepcopy(base)
    head = "score" if hasattr(ref_model, "score") else "classifier"
    getattr(ref_model, head).load_state_dict(getattr(fm.get_base_model(), head).modules_to_save["default"].state_dict())
    with torch.no_grad():
        ref = ref_model(
            input_ids=b["input_ids"],
            attention_mask=torch.cat([torch.ones(2, NV, dtype=torch.long), b["attention_mask"]], 1),
            cache=_reference_prefix_cache(flat, cfg.num_layers, cfg.num_attention_heads, 2),
        ).logits
        plain = base(**b).logits
    out = _logits(fm, b)
    close(out, ref)
    assert (out - plain).abs().max() > 1e-3
    # checkpoint: fastpeft -> fastpeft and fastpeft -> peft (peft loads it; its forward is the broken part)
    fm.save_pretrained(str(tmp_path / "a"))
    close(_logits(fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")), b), out)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    assert torch.equal(pm.prompt_encoder["default"].embedding.weight, fm.prompt_encoder["default"].embedding.weight)


def test_llama_prefix_layout_matches_peft_causal_lm():
    """The SEQ_CLS prefix path and peft's (working) CAUSAL_LM prefix path give the same final hidden states."""
    base = _llama_cls()
    _, fcfg = _configs("prefix", "SEQ_CLS")
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg).eval()
    lm = tiny_llama()
    lm.model.load_state_dict(base.model.state_dict())
    pm = peft.get_peft_model(lm, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV)).eval()
    pm.prompt_encoder["default"].load_state_dict(fm.prompt_encoder["default"].state_dict())
    b = inputs()
    with torch.no_grad():
        h_peft = pm(**b, output_hidden_states=True).hidden_states[-1]
        h_fast = fm(**b, output_hidden_states=True).hidden_states[-1]
    close(h_fast, h_peft)


# ---- seq-to-seq -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prompt", "ptuning-lstm", "prefix", "prefix-proj"])
def test_seq2seq_like_peft(name, tmp_path):
    base = tiny_t5()
    pm, fm = _pair(name, base, "SEQ_2_SEQ_LM")
    batch = _s2s_batch()
    _check_same_training_step(pm, fm, batch)
    _sgd_step(pm, batch)
    _sgd_step(fm, batch)
    pm.eval()
    fm.eval()
    enc = {k: batch[k] for k in ("input_ids", "attention_mask")}
    # generate(): greedy reference by full forward passes over the growing decoder input
    dec = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(5):
            nxt = fm(**enc, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat([dec, nxt], 1)
        out = fm.generate(**enc, max_new_tokens=5, do_sample=False)
        assert torch.equal(fm.generate(**enc, max_new_tokens=5, do_sample=False, use_cache=False), out)
        with fm.disable_adapter():
            disabled = fm.generate(**enc, max_new_tokens=5, do_sample=False)
        plain = base.generate(**enc, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, dec)
    assert torch.equal(disabled, plain)
    # checkpoints both ways
    pdir, fdir = _save_dirs(tmp_path)
    pm.save_pretrained(pdir)
    fm.save_pretrained(fdir)
    close(read_tensors(pdir)["prompt_embeddings"], read_tensors(fdir)["prompt_embeddings"], 1e-4)
    assert comparable_config(read_config(pdir)) == comparable_config(read_config(fdir))
    ref_p, ref_f = _logits(pm, batch), _logits(fm, batch)
    close(_logits(fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), pdir), batch), ref_p)
    close(_logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), fdir), batch), ref_f)


# ---- initialisation -------------------------------------------------------------------------------------------


def _word_level_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1}
    for i, w in enumerate("classify the sentiment of this review please".split()):
        vocab[w] = 10 + 7 * i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(str(path))
    return fast


@pytest.mark.parametrize("nv", [4, 9])
def test_text_init_like_peft(tmp_path, nv):
    tokenizer = _word_level_tokenizer(tmp_path / "tok")
    text = "classify the sentiment of this review"
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=nv, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
              tokenizer_name_or_path=str(tmp_path / "tok"))
    base = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(**kw))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(**kw))
    ids = tokenizer(text)["input_ids"]
    ids = (ids * nv)[:nv]  # cut or repeated to the number of virtual tokens
    weight = fm.prompt_encoder["default"].embedding.weight
    assert torch.equal(weight, base.model.embed_tokens.weight[ids])
    assert torch.equal(weight, pm.prompt_encoder["default"].embedding.weight)
    assert weight.requires_grad


def test_sample_vocab_init_like_peft():
    base = tiny_llama()
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB")
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(**kw))
    torch.manual_seed(3)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(**kw))
    w = fm.prompt_encoder["default"].embedding.weight
    assert torch.equal(w, pm.prompt_encoder["default"].embedding.weight)
    vocab = base.model.embed_tokens.weight
    assert all(any(torch.equal(row, v) for v in vocab) for row in w)


def test_prefix_zero_init_and_gqa_shapes():
    base = tiny_llama()  # 4 heads, 2 key/value heads, hidden 32
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=NV, init_weights="zero"))
    cfg = fm.peft_config["default"]
    assert (cfg.num_attention_heads, cfg.token_dim, cfg.num_layers) == (2, 16, 2)
    assert fm.prompt_encoder["default"].embedding.weight.shape == (NV, 2 * 2 * 16)
    assert not fm.prompt_encoder["default"].embedding.weight.any()


# ---- several adapters, disabling ------------------------------------------------------------------------------


def test_multiple_adapters_set_adapter_disable_delete():
    base = tiny_llama()
    b = inputs()
    _, c1 = _configs("prompt", "CAUSAL_LM")
    _, c2 = _configs("prompt", "CAUSAL_LM")
    torch.manual_seed(1)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), c1)
    torch.manual_seed(2)
    fm.add_adapter("other", c2)
    assert fm.active_adapter == "default"
    torch.manual_seed(2)
    single = fastpeft.get_peft_model(copy.deepcopy(base), copy.deepcopy(c2))
    first = _logits(fm, b)
    fm.set_adapter("other")
    close(_logits(fm, b), _logits(single, b))
    with fm.disable_adapter():
        close(_logits(fm, b), base(**b).logits.detach())
    close(_logits(fm, b), _logits(single, b))
    fm.set_adapter("default")
    close(_logits(fm, b), first)
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        fm.add_adapter("lora", fastpeft.LoraConfig(target_modules=["q_proj"]))
    fm.delete_adapter("other")
    assert list(fm.peft_config) == ["default"] and list(fm.prompt_encoder) == ["default"]


def test_seq_cls_two_adapters_heads_and_disable():
    base = _llama_cls()
    b = inputs()
    b["attention_mask"][:] = 1
    _, c1 = _configs("prompt", "SEQ_CLS")
    c2 = fastpeft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), c1)
    fm.add_adapter("two", c2)
    with torch.no_grad():
        fm.get_base_model().score.modules_to_save["two"].weight.normal_()
    a = _logits(fm, b)
    fm.set_adapter("two")
    assert fm.get_base_model().score.active_adapters == ["two"]
    assert not torch.allclose(_logits(fm, b), a)
    grads = {n: p.requires_grad for n, p in fm.named_parameters()}
    with fm.disable_adapter():  # the original head and no prompt: the base model's outputs
        close(_logits(fm, b), base(**b).logits.detach())
    assert grads == {n: p.requires_grad for n, p in fm.named_parameters()}


def test_load_adapter_inputs_embeds_generate_and_cache_api(tmp_path):
    base = tiny_llama()
    b = inputs()
    src = fastpeft.get_peft_model(copy.deepcopy(base), _configs("prefix-proj", "CAUSAL_LM")[1]).eval()
    src.save_pretrained(str(tmp_path))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), _configs("prefix", "CAUSAL_LM")[1]).eval()
    fm.load_adapter(str(tmp_path), "loaded")
    fm.set_adapter("loaded")
    close(_logits(fm, b), _logits(src, b))
    with torch.no_grad():
        by_ids = fm.generate(**b, max_new_tokens=4, do_sample=False)
        by_embeds = fm.generate(inputs_embeds=fm.word_embeddings(b["input_ids"]), attention_mask=b["attention_mask"],
                                max_new_tokens=4, do_sample=False)
        assert torch.equal(by_ids[:, -4:], by_embeds)
        assert fm.generate(**b, max_new_tokens=3, num_beams=2).shape == (2, 10)
    # the prefix goes through transformers' current cache argument (no deprecated `past_key_values`)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _logits(fm, b)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    cache = fm.get_prompt(2)
    assert isinstance(cache, transformers.DynamicCache) and cache.get_seq_length() == NV
    # prompt tuning: the prompt is broadcast over the batch, not copied
    pt = fastpeft.get_peft_model(copy.deepcopy(base), _configs("prompt", "CAUSAL_LM")[1])
    assert pt.get_prompt(4).shape == (4, NV, 32) and pt.get_prompt(4).stride(0) == 0


# ---- errors ---------------------------------------------------------------------------------------------------


def test_config_errors():
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path="x")
    with pytest.raises(ValueError, match="num_virtual_tokens must be >= 1"):
        fastpeft.PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="num_virtual_tokens must be set"):
        fastpeft.PromptEncoderConfig()
    with pytest.raises(ValueError, match="prompt_tuning_init"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS")
    with pytest.raises(ValueError, match="encoder_reparameterization_type"):
        fastpeft.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(TypeError, match="num_virtual_tokens"):
        fastpeft.PromptTuningConfig(num_virtual_tokens="3")


def test_input_and_model_errors(tmp_path):
    base = tiny_llama()
    _, fcfg = _configs("prompt", "CAUSAL_LM")
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    b = inputs()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), expected \(2, 7\)"):
        fm(input_ids=b["input_ids"], attention_mask=b["attention_mask"][:, :5])
    with pytest.raises(ValueError, match="2-D"):
        fm(input_ids=b["input_ids"], attention_mask=b["attention_mask"][:, None, None, :])
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        fm(attention_mask=b["attention_mask"])
    with pytest.raises(ValueError, match="merged"):
        fm.merge_and_unload()
    fm.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="trainable"):
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    # a model whose config says nothing about its layers and heads
    cfg = transformers.PretrainedConfig(hidden_size=32, vocab_size=96)

    class Bare(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(96, 32)

        def get_input_embeddings(self):
            return self.embed

    with pytest.raises(ValueError, match="set `num_layers` in the PrefixTuningConfig"):
        fastpeft.get_peft_model(Bare(cfg), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="set `num_attention_heads`"):
        fastpeft.get_peft_model(
            Bare(cfg), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_layers=2))
    # prompt tuning needs only the hidden size
    ok = fastpeft.get_peft_model(Bare(cfg), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert ok.prompt_encoder["default"].embedding.weight.shape == (2, 32)
    with pytest.raises(NotImplementedError, match="CAUSAL_LM, SEQ_CLS and SEQ_2_SEQ_LM"):
        fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(num_virtual_tokens=2))


def test_checkpoint_mismatch_errors(tmp_path):
    base = tiny_llama()
    fm = fastpeft.get_peft_model(copy.deepcopy(base), _configs("prefix", "CAUSAL_LM")[1])
    fm.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["num_virtual_tokens"] = NV + 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="prompt_embeddings"):
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))


# ---- README ---------------------------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Prompt tuning, P-tuning and prefix tuning"


def test_readme_prompt_learning_example_runs(tmp_path, monkeypatch):
    text = README.read_text() if README.is_file() else ""
    if SECTION not in text:
        pytest.skip(f"README.md has no section {SECTION!r} yet")
    match = re.search(r"```python\n(.*?)```", text.split(SECTION, 1)[1], re.S)
    assert match, f"README's section {SECTION!r} has no python block"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(match.group(1), "README.md:prompt-learning", "exec"), {})
    assert any(os.path.isfile(os.path.join(r, "adapter_model.safetensors")) for r, _, _ in os.walk(tmp_path))
