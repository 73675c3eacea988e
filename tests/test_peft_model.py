"""PeftModel behaviour against peft (the oracle): task classes, trainable parameters, merging, disabling,
multiple adapters, training touching only adapter weights, inference mode and input checks."""
from __future__ import annotations

import copy

import pytest
import torch

from _peft_testing import inputs, logits, make_configs, peft, randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama

import fastpeft
from fastpeft.tuners.base import ModulesToSaveWrapper
from fastpeft.tuners.lora.model import LoraModel

ATOL = 1e-4
LLAMA_KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _fast(base, kw, adapter_name="default"):
    _, fcfg = make_configs(kw)
    return fastpeft.get_peft_model(copy.deepcopy(base), fcfg, adapter_name=adapter_name)


@pytest.mark.parametrize(
    "task_type,cls",
    [
        (None, fastpeft.PeftModel),
        ("CAUSAL_LM", fastpeft.PeftModelForCausalLM),
        ("SEQ_CLS", fastpeft.PeftModelForSequenceClassification),
        ("SEQ_2_SEQ_LM", fastpeft.PeftModelForSeq2SeqLM),
        ("TOKEN_CLS", fastpeft.PeftModelForTokenClassification),
        ("QUESTION_ANS", fastpeft.PeftModelForQuestionAnswering),
        ("FEATURE_EXTRACTION", fastpeft.PeftModelForFeatureExtraction),
    ],
)
def test_task_type_selects_class(task_type, cls):
    base = tiny_llama()
    fm = _fast(base, dict(r=2, target_modules=["q_proj"], task_type=task_type))
    assert type(fm) is cls


def test_attributes_and_forwarding():
    base = tiny_llama()
    inner = copy.deepcopy(base)
    _, fcfg = make_configs(LLAMA_KW)
    fm = fastpeft.get_peft_model(inner, fcfg)
    assert isinstance(fm.base_model, LoraModel)
    assert fm.get_base_model() is inner
    assert list(fm.peft_config) == ["default"] and fm.peft_config["default"] is fcfg
    assert fm.active_adapter == "default" and fm.active_adapters == ["default"]
    assert fm.config is inner.config  # __getattr__ -> LoraModel -> model
    assert fm.modules_to_save is None
    assert fm.peft_type == fastpeft.PeftType.LORA
    assert fcfg.base_model_name_or_path is None  # from-config model: no name


def test_seq_cls_head_in_modules_to_save_like_peft():
    base = tiny_bert()
    pcfg, fcfg = make_configs(dict(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    assert sorted(fcfg.modules_to_save) == sorted(pcfg.modules_to_save)
    assert fm.modules_to_save == pm.modules_to_save
    assert isinstance(fm.get_base_model().classifier, ModulesToSaveWrapper)
    assert getattr(fm, "cls_layer_name", None) == getattr(pm, "cls_layer_name", None)


@pytest.mark.parametrize(
    "builder,kw",
    [
        (tiny_llama, LLAMA_KW),
        (tiny_llama, dict(LLAMA_KW, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"])),
        (tiny_bert, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                         modules_to_save=["pooler.dense"])),
        (tiny_gpt2, dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    ],
)
def test_trainable_parameter_counts_equal_peft(builder, kw, capsys):
    base = builder()
    pcfg, fcfg = make_configs(kw)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    pm.print_trainable_parameters()
    expected = capsys.readouterr().out
    fm.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    assert {n for n, p in fm.named_parameters() if p.requires_grad} == {
        n for n, p in pm.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize(
    "builder,kw",
    [
        (tiny_llama, LLAMA_KW),
        (tiny_llama, dict(LLAMA_KW, use_dora=True)),
        (tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
        (tiny_bert, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    ],
)
def test_merge_unmerge_and_merge_and_unload_keep_outputs(builder, kw):
    base = builder()
    fm = _fast(base, kw)
    randomize_adapter(fm)
    fm.eval()
    batch = inputs()
    expected = logits(fm, batch)
    fm.merge_adapter()
    torch.testing.assert_close(logits(fm, batch), expected, atol=ATOL, rtol=ATOL)
    fm.unmerge_adapter()
    torch.testing.assert_close(logits(fm, batch), expected, atol=ATOL, rtol=ATOL)
    merged = fm.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), expected, atol=ATOL, rtol=ATOL)


def test_unload_gives_base_model():
    base = tiny_llama()
    fm = _fast(base, LLAMA_KW)
    randomize_adapter(fm)
    batch = inputs()
    plain = fm.unload()
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, batch), logits(base, batch))


def test_disable_adapter_gives_base_outputs():
    base = tiny_bert()
    fm = _fast(base, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    randomize_adapter(fm)  # also randomises the classifier copy in modules_to_save
    fm.eval()
    batch = inputs()
    with_adapter = logits(fm, batch)
    base_out = logits(base, batch)
    assert not torch.allclose(with_adapter, base_out, atol=1e-3)
    with fm.disable_adapter():
        torch.testing.assert_close(logits(fm, batch), base_out, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(logits(fm, batch), with_adapter)


def test_training_changes_only_adapter_and_modules_to_save():
    base = tiny_bert()
    fm = _fast(base, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    fm.train()
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in fm.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs(batch=4)
    labels = torch.tensor([0, 1, 2, 1])
    losses = []
    for _ in range(4):
        out = fm(**batch, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    after = fm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert all("lora_" in k or ".modules_to_save.default." in k for k in changed), sorted(changed)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    assert any("modules_to_save" in k for k in changed)
    assert losses[-1] < losses[0]


def test_two_adapters_add_switch_delete():
    base = tiny_llama()
    fm = _fast(base, LLAMA_KW)
    randomize_adapter(fm, seed=1)
    _, cfg_b = make_configs(dict(LLAMA_KW, r=2))
    fm.add_adapter("b", cfg_b)
    assert fm.active_adapter == "default"  # adding does not activate
    assert not any(p.requires_grad for n, p in fm.named_parameters() if ".b." in n)
    with torch.no_grad():
        for n, p in fm.named_parameters():
            if ".b." in n and "lora_" in n:
                p.normal_(0, 0.3)
    fm.eval()
    batch = inputs()
    out_default = logits(fm, batch)
    fm.set_adapter("b")
    assert fm.active_adapter == "b" and fm.active_adapters == ["b"]
    out_b = logits(fm, batch)
    assert not torch.allclose(out_default, out_b, atol=1e-3)
    assert all(p.requires_grad for n, p in fm.named_parameters() if ".b." in n and "lora_" in n)

    # the same weights loaded alone into peft give the same outputs
    pcfg_b, _ = make_configs(dict(LLAMA_KW, r=2))
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg_b)
    peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm, adapter_name="b"))
    pm.eval()
    torch.testing.assert_close(logits(pm, batch), out_b, atol=ATOL, rtol=ATOL)

    with pytest.raises(ValueError, match="already exists"):
        fm.add_adapter("b", make_configs(LLAMA_KW)[1])
    with pytest.raises(ValueError, match="nope"):
        fm.set_adapter("nope")
    with pytest.raises(ValueError, match="nope"):
        fm.delete_adapter("nope")

    fm.set_adapter("default")
    fm.delete_adapter("b")
    assert list(fm.peft_config) == ["default"]
    assert not any(".b." in k for k in fm.state_dict())
    torch.testing.assert_close(logits(fm, batch), out_default)


def test_from_pretrained_trainable_and_inference(tmp_path):
    base = tiny_llama()
    fm = _fast(base, LLAMA_KW)
    randomize_adapter(fm)
    fm.save_pretrained(str(tmp_path))
    frozen = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert isinstance(frozen, fastpeft.PeftModelForCausalLM)
    assert not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.peft_config["default"].inference_mode is True
    trainable = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert trainable.peft_config["default"].inference_mode is False
    # the config passed explicitly wins over the stored one
    _, cfg = make_configs(LLAMA_KW)
    explicit = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), config=cfg)
    torch.testing.assert_close(logits(explicit, inputs()), logits(frozen, inputs()))
    with pytest.raises(ValueError, match="PeftConfig"):
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), config={"r": 4})


def test_load_adapter_then_switch(tmp_path):
    base = tiny_llama()
    fm = _fast(base, LLAMA_KW)
    randomize_adapter(fm, seed=5)
    fm.save_pretrained(str(tmp_path))
    expected = logits(fm.eval(), inputs())
    other = _fast(base, dict(LLAMA_KW, r=2))
    result = other.load_adapter(str(tmp_path), adapter_name="loaded")
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert set(other.peft_config) == {"default", "loaded"}
    other.set_adapter("loaded")
    torch.testing.assert_close(logits(other, inputs()), expected, atol=ATOL, rtol=ATOL)


def test_input_checks():
    base = tiny_llama()
    pcfg, fcfg = make_configs(LLAMA_KW)
    with pytest.raises(TypeError, match="PeftConfig"):
        fastpeft.get_peft_model(copy.deepcopy(base), pcfg)  # peft's config, not fastpeft's
    with pytest.raises(TypeError, match="nn.Module"):
        fastpeft.get_peft_model("not a model", fcfg)
    with pytest.raises(ValueError, match="adapter_name"):
        fastpeft.get_peft_model(copy.deepcopy(base), make_configs(LLAMA_KW)[1], adapter_name="a.b")
    with pytest.raises(ValueError, match="task"):
        fastpeft.LoraConfig(r=2, target_modules=["q_proj"], task_type="NOT_A_TASK")
    cfg = make_configs(LLAMA_KW)[1]
    cfg.task_type = "NOT_A_TASK"
    with pytest.raises(ValueError, match="task_type"):
        fastpeft.get_peft_model(copy.deepcopy(base), cfg)
    # mixed=True: a PeftMixedModel (tested in test_mixed_model.py)
    assert type(fastpeft.get_peft_model(copy.deepcopy(base), make_configs(LLAMA_KW)[1], mixed=True)).__name__ == (
        "PeftMixedModel"
    )
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    other_type = fastpeft.PeftConfig(peft_type="IA3")
    with pytest.raises(ValueError, match="different peft types"):
        fm.add_adapter("x", other_type)
    assert list(fm.peft_config) == ["default"]
    with pytest.raises(ValueError, match="nope"):
        fm.merge_adapter(adapter_names=["nope"])


def test_revision_and_name_recorded():
    base = tiny_llama()
    _, fcfg = make_configs(LLAMA_KW)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg, revision="abc")
    assert fm.peft_config["default"].revision == "abc"


def test_feature_extraction_and_plain_forward():
    base = tiny_bert(cls_name="BertModel")
    fm = _fast(base, dict(r=2, target_modules=["query"], task_type="FEATURE_EXTRACTION"))
    out = fm(**inputs())
    assert out.last_hidden_state.shape == (2, 7, 32)
    plain = _fast(base, dict(r=2, target_modules=["query"]))
    torch.testing.assert_close(plain(**inputs()).last_hidden_state, out.last_hidden_state)


@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_autocast_like_peft(autocast):
    base = tiny_llama().to(torch.bfloat16)
    pcfg, fcfg = make_configs(LLAMA_KW)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg, autocast_adapter_dtype=autocast)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg, autocast_adapter_dtype=autocast)
    assert {n: p.dtype for n, p in fm.named_parameters()} == {n: p.dtype for n, p in pm.named_parameters()}


def test_seq_cls_load_second_adapter_like_peft(tmp_path):
    base = tiny_bert()
    kw = dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    donor = _fast(base, kw)
    randomize_adapter(donor, seed=11)
    donor.save_pretrained(str(tmp_path))
    fm = _fast(base, kw)
    fm.load_adapter(str(tmp_path), adapter_name="loaded")
    fm.set_adapter("loaded")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    pm.eval()
    fm.eval()
    batch = inputs()
    torch.testing.assert_close(logits(fm, batch), logits(pm, batch), atol=ATOL, rtol=ATOL)
    # switching back gives the first adapter's (untrained: base + fresh head copy) outputs
    fm.set_adapter("default")
    with fm.disable_adapter():
        base_out = logits(fm, batch)
    torch.testing.assert_close(base_out, logits(base, batch), atol=ATOL, rtol=ATOL)


def test_mixed_adapter_batches_match_peft_or_are_refused():
    base = tiny_llama()
    fm = _fast(base, LLAMA_KW)
    randomize_adapter(fm, seed=1)
    fm.add_adapter("b", make_configs(LLAMA_KW)[1])
    randomize_adapter(fm, seed=2)
    batch = inputs()
    names = ["default", "b"]
    try:
        got = logits(fm.eval(), dict(batch, adapter_names=names))
    except NotImplementedError as exc:  # never silently ignored
        assert "adapter_names" in str(exc)
        return
    pm = peft.get_peft_model(copy.deepcopy(base), make_configs(LLAMA_KW)[0])
    pm.add_adapter("b", make_configs(LLAMA_KW)[0])
    for name in names:
        peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm, adapter_name=name), name)
    torch.testing.assert_close(got, logits(pm.eval(), dict(batch, adapter_names=names)), atol=ATOL, rtol=ATOL)
