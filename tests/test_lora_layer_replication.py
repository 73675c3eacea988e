"""LoraConfig.layer_replication against peft (the oracle) on a tiny Llama: the layer stack is rebuilt from the ranges
with shared base weights, each replica gets its own LoRA, module names / checkpoint keys / outputs (also generate with
the KV cache) are peft's, checkpoints load both ways."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from _peft_testing import close, inputs, logits, peft, randomize_adapter, read_tensors, tiny_llama, tiny_bert

import fastpeft

MAP = [[0, 2], [1, 2], [0, 1]]  # 2 layers -> [0, 1, 1, 0]
KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layer_replication=MAP)


def _pair(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kw)))
        ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**copy.deepcopy(kw)))
    return theirs, ours


def _load(lib, base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def test_structure_names_and_shared_weights_as_peft():
    base = tiny_llama()
    theirs, ours = _pair(base, **KW)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    layers = ours.base_model.model.model.layers
    assert len(layers) == 4 and ours.base_model.model.config.num_hidden_layers == 4
    src = [0, 1, 1, 0]
    for i, layer in enumerate(layers):
        assert layer.self_attn.layer_idx == i
        orig = base.model.layers[src[i]]
        assert torch.equal(layer.self_attn.q_proj.base_layer.weight, orig.self_attn.q_proj.weight)
    # replicas share their base weights (one tensor), not their adapters
    assert layers[0].self_attn.q_proj.base_layer.weight is layers[3].self_attn.q_proj.base_layer.weight
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight
    assert layers[0].self_attn.q_proj.lora_A["default"].weight is not layers[3].self_attn.q_proj.lora_A["default"].weight
    n_base = sum(p.numel() for n, p in base.named_parameters())
    n_ours = sum(p.numel() for n, p in ours.named_parameters() if "lora_" not in n)
    assert n_ours == n_base  # no base weight duplicated
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_outputs_and_checkpoints_both_ways(tmp_path):
    base = tiny_llama()
    theirs, _ = _pair(base, **KW)
    randomize_adapter(theirs)
    theirs.eval().save_pretrained(str(tmp_path / "peft"))
    ours = _load(fastpeft, base, tmp_path / "peft")
    batch = inputs()
    close(logits(ours, batch), logits(theirs, batch))
    # every replica's adapter matters: zeroing one changes the output
    ours.save_pretrained(str(tmp_path / "ours"))
    t_peft, t_ours = read_tensors(str(tmp_path / "peft")), read_tensors(str(tmp_path / "ours"))
    assert sorted(t_ours) == sorted(t_peft)
    assert "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" in t_ours
    for k in t_peft:
        assert torch.equal(t_ours[k], t_peft[k]), k
    back = _load(peft, base, tmp_path / "ours")
    close(logits(back, batch), logits(ours, batch))
    with torch.no_grad():
        ours.base_model.model.model.layers[2].self_attn.q_proj.lora_B["default"].weight.zero_()
    assert not torch.allclose(logits(ours, batch), logits(theirs, batch))


def test_generate_with_kv_cache_as_peft():
    base = tiny_llama()
    theirs, ours = _pair(base, **KW)
    randomize_adapter(theirs)
    ours.load_state_dict(theirs.state_dict())
    ids = inputs(batch=1)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.eval().generate(input_ids=ids, **kw), theirs.eval().generate(input_ids=ids, **kw))


def test_training_updates_each_replica_on_its_own():
    base = tiny_llama()
    _, ours = _pair(base, **KW)
    ours.train()
    batch = inputs()
    ours(**batch, labels=batch["input_ids"]).loss.backward()
    layers = ours.base_model.model.model.layers
    grads = [layer.self_attn.q_proj.lora_B["default"].weight.grad for layer in layers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not torch.allclose(grads[0], grads[3])
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_bert_encoder_layers_as_peft():
    base = tiny_bert()
    kw = dict(r=4, target_modules=["query", "value"], layer_replication=[[0, 2], [0, 2]])
    theirs, ours = _pair(base, **kw)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    randomize_adapter(theirs)
    ours.load_state_dict(theirs.state_dict())
    batch = inputs()
    close(logits(ours.eval(), batch), logits(theirs.eval(), batch))


def test_merge_refused_unload_keeps_the_stack():
    base = tiny_llama()
    _, ours = _pair(base, **KW)
    with pytest.raises(ValueError, match="replicated"):
        ours.merge_and_unload()
    plain = ours.unload()
    assert len(plain.model.layers) == 4
    assert not any("lora" in n for n, _ in plain.named_modules())


def test_bad_model_or_range():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Could not locate the layers"):
        fastpeft.get_peft_model(net, fastpeft.LoraConfig(target_modules=["0"], layer_replication=[[0, 1]]))
    with pytest.raises(ValueError, match="outside the model"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 5]]))
    assert "layer_replication" not in fastpeft.LoraConfig(layer_replication=[[0, 1]]).unsupported_features()
