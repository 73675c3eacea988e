"""LoraConfig.ensure_weight_tying against peft (the oracle) on a tiny Llama with tied embeddings (lm_head.weight is
embed_tokens.weight): the embedding in modules_to_save or target_modules gives the tied lm_head the *same* copy /
adapter (transposed), the config is rewritten as peft rewrites it, the checkpoints are peft's (both ways), plus the
warnings and errors (also for trainable tokens)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from _peft_testing import close, inputs, logits, peft, randomize_adapter, read_tensors, tiny_llama

import fastpeft


def _tied():
    base = tiny_llama(tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    return base


def _pair(base, **kw):
    """(peft model, fastpeft model), each on its own copy of `base`, the same config keywords."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kw)))
        ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**copy.deepcopy(kw)))
    return theirs, ours


def _load(lib, base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


CASES = {
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "target_embedding": dict(target_modules=["q_proj", "embed_tokens"]),
    "target_lm_head": dict(target_modules=["q_proj", "lm_head"]),
    "target_regex": dict(target_modules=r".*(q_proj|embed_tokens)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_structure_config_and_checkpoint_as_peft(case, tmp_path):
    base = _tied()
    theirs, ours = _pair(base, r=4, lora_alpha=8, ensure_weight_tying=True, **CASES[case])
    pc, oc = theirs.peft_config["default"], ours.peft_config["default"]
    # the config is rewritten in place as peft rewrites it
    assert oc.target_modules == pc.target_modules
    assert oc.modules_to_save == pc.modules_to_save
    assert getattr(oc, "modules_to_tie", None) == getattr(pc, "modules_to_tie", None)
    assert getattr(oc, "target_modules_to_tie", None) == getattr(pc, "target_modules_to_tie", None)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

    m = ours.base_model.model
    if case == "modules_to_save":
        assert m.lm_head.modules_to_save["default"].weight is m.model.embed_tokens.modules_to_save["default"].weight
    else:
        emb, head = m.model.embed_tokens, m.lm_head
        assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
        assert head.lora_B["default"].weight.data_ptr() == emb.lora_embedding_A["default"].data_ptr()

    # peft's checkpoint -> fastpeft, and fastpeft's -> peft: same keys, same config, same outputs
    randomize_adapter(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    loaded = _load(fastpeft, base, tmp_path / "peft")
    batch = inputs()
    close(logits(loaded, batch), logits(theirs.eval(), batch))
    loaded.save_pretrained(str(tmp_path / "ours"))
    t_peft, t_ours = read_tensors(str(tmp_path / "peft")), read_tensors(str(tmp_path / "ours"))
    assert sorted(t_ours) == sorted(t_peft)
    for k in t_peft:
        assert torch.equal(t_ours[k], t_peft[k]), k
    cfg_peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("target_modules", "modules_to_save", "ensure_weight_tying"):
        a, b = cfg_ours[key], cfg_peft[key]
        assert (sorted(a) if isinstance(a, list) else a) == (sorted(b) if isinstance(b, list) else b), key
    back = _load(peft, base, tmp_path / "ours")
    close(logits(back, batch), logits(loaded, batch))


@pytest.mark.parametrize("case", ["modules_to_save", "target_embedding"])
def test_training_keeps_the_tie(case):
    """After optimizer steps, the lm_head still sees exactly the embedding's (copy / adapter)."""
    base = _tied()
    _, ours = _pair(base, r=4, lora_alpha=8, ensure_weight_tying=True, **CASES[case])
    ours.train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    batch = inputs()
    for _ in range(2):
        opt.zero_grad()
        ours(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    m = ours.base_model.model
    if case == "modules_to_save":
        assert m.lm_head.modules_to_save["default"].weight is m.model.embed_tokens.modules_to_save["default"].weight
        assert not torch.equal(m.model.embed_tokens.modules_to_save["default"].weight, base.model.embed_tokens.weight)
    else:
        emb, head = m.model.embed_tokens, m.lm_head
        assert torch.equal(head.lora_A["default"].weight, emb.lora_embedding_B["default"].t())
        assert torch.equal(head.lora_B["default"].weight, emb.lora_embedding_A["default"].t())
        assert emb.lora_embedding_A["default"].abs().sum() > 0  # trained (starts at zero)


def test_modules_to_save_unload_stays_tied():
    base = _tied()
    _, ours = _pair(base, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)
    randomize_adapter(ours)
    batch = inputs()
    expected = logits(ours.eval(), batch)
    plain = ours.merge_and_unload()
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    close(logits(plain, batch), expected)


def _messages(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "tie" in str(w.message)]


@pytest.mark.parametrize("kw, tied", [
    (dict(target_modules=["q_proj"], ensure_weight_tying=True), True),          # nothing tied is adapted
    (dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True), False),  # the model is not tied
    (dict(target_modules=["q_proj", "embed_tokens"]), True),                     # tied, not asked to tie
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), True),
    (dict(target_modules=["q_proj"]), True),                                      # no warning
])
def test_warnings_as_peft(kw, tied):
    base = _tied() if tied else tiny_llama(tie_word_embeddings=False)
    theirs = _messages(lambda: peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kw))))
    ours = _messages(lambda: fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**copy.deepcopy(kw))))
    assert ours == theirs


def test_trainable_tokens_tying_as_peft(tmp_path):
    base = _tied()
    kw = dict(r=4, target_modules=["q_proj"], ensure_weight_tying=True,
              trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [3, 6]})
    for lib in (peft, fastpeft):
        with pytest.raises(ValueError, match="Cannot ensure weight tying when different token indices"):
            lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**copy.deepcopy(kw)))
    kw["trainable_token_indices"] = {"embed_tokens": [3, 5], "lm_head": [3, 5]}
    theirs, ours = _pair(base, **kw)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    randomize_adapter(theirs)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn_like(p))
    theirs.save_pretrained(str(tmp_path))
    loaded = _load(fastpeft, base, tmp_path)
    close(logits(loaded, inputs()), logits(theirs.eval(), inputs()))


def test_unsupported_list_no_longer_names_it():
    assert "ensure_weight_tying" not in fastpeft.LoraConfig(ensure_weight_tying=True).unsupported_features()


def test_lora_on_tied_layers_merges_once():
    """The lm_head shares the embedding's base weight and its adapter (transposed), so the embedding's merge is the
    lm_head's too: merged outputs equal unmerged ones. (peft 0.21 merges the shared delta twice.)"""
    base = _tied()
    _, ours = _pair(base, r=4, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True)
    randomize_adapter(ours, seed=1)
    batch = inputs()
    expected = logits(ours.eval(), batch)
    ours.merge_adapter()
    close(logits(ours, batch), expected)
    ours.unmerge_adapter()
    close(ours.base_model.model.model.embed_tokens.base_layer.weight, base.model.embed_tokens.weight)
    plain = ours.merge_and_unload()
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    close(logits(plain, batch), expected)
