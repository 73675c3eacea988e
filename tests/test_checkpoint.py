"""Checkpoint conformance with peft (the oracle): peft-saved adapters load into fastpeft with peft's
outputs, fastpeft-saved adapters load into peft, and the files (keys, shapes, adapter_config.json) are
peft's. Plus the bad-input paths: missing/invalid config, pickle-only checkpoints, mismatched keys."""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

from _peft_testing import (
    comparable_config,
    inputs,
    logits,
    make_configs,
    peft,
    randomize_adapter,
    read_config,
    read_tensors,
    safetensors_metadata,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

import fastpeft
from fastpeft import checkpoint as ckpt

ATOL = 1e-4

CASES = {
    "llama-lora": (lambda: tiny_llama(), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              task_type="CAUSAL_LM"), "default"),
    "llama-dora": (lambda: tiny_llama(), dict(r=4, lora_alpha=16, use_dora=True, task_type="CAUSAL_LM",
                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), "default"),
    "llama-rslora-patterns": (
        lambda: tiny_llama(),
        dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 32},
             target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], task_type="CAUSAL_LM"),
        "default",
    ),
    "llama-seqcls-named": (lambda: tiny_llama(cls_name="LlamaForSequenceClassification"),
                           dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
                           "other"),
    "gpt2-conv1d": (lambda: tiny_gpt2(), dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                              fan_in_fan_out=True, task_type="CAUSAL_LM"), "default"),
    "bert-seqcls-bias": (lambda: tiny_bert(), dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                   task_type="SEQ_CLS", bias="lora_only",
                                                   modules_to_save=["pooler.dense"]), "default"),
    "bert-tokcls": (lambda: tiny_bert(cls_name="BertForTokenClassification"),
                    dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="TOKEN_CLS"), "default"),
    "bert-qa": (lambda: tiny_bert(cls_name="BertForQuestionAnswering", num_labels=2),
                dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="QUESTION_ANS"), "default"),
    "bert-features": (lambda: tiny_bert(cls_name="BertModel"),
                      dict(r=4, lora_alpha=8, target_modules=["query", "key", "dense"],
                           task_type="FEATURE_EXTRACTION"), "default"),
    "llama-no-task-type": (lambda: tiny_llama(), dict(r=2, lora_alpha=4, target_modules=["q_proj"]), "default"),
    "llama-embedding": (lambda: tiny_llama(), dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                   task_type="CAUSAL_LM"), "default"),
}


def _adapter_dir(root, adapter_name):
    return root if adapter_name == "default" else os.path.join(root, adapter_name)


def _build_pair(case):
    builder, kwargs, name = CASES[case]
    base = builder()
    pcfg, fcfg = make_configs(kwargs)
    return base, pcfg, fcfg, name


def _randomize_save_and_run(model, directory):
    """Random adapter weights, eval mode, `save_pretrained(directory)` (warnings silenced); returns
    (batch, the model's logits on it)."""
    randomize_adapter(model)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(directory))
    batch = inputs()
    return batch, logits(model, batch)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_adapter_loads_into_fastpeft(case, tmp_path):
    base, pcfg, _, name = _build_pair(case)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg, adapter_name=name)
    batch, expected = _randomize_save_and_run(pm, tmp_path)
    with torch.no_grad():
        base_out = logits(base, batch)
    assert not torch.allclose(expected, base_out, atol=1e-3), "adapter must change the outputs"

    fm = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), _adapter_dir(str(tmp_path), name), adapter_name=name)
    assert fm.active_adapter == name
    torch.testing.assert_close(logits(fm, batch), expected, atol=ATOL, rtol=ATOL)
    # inference mode: trainable exactly what peft leaves trainable (nothing, or the biases with bias != "none")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), _adapter_dir(str(tmp_path), name), adapter_name=name)
    assert {n for n, p in fm.named_parameters() if p.requires_grad} == {
        n for n, p in pm2.named_parameters() if p.requires_grad
    }
    assert not any(p.requires_grad for n, p in fm.named_parameters() if "lora_" in n or "modules_to_save" in n)


@pytest.mark.parametrize("case", list(CASES))
def test_fastpeft_saved_adapter_loads_into_peft(case, tmp_path):
    base, _, fcfg, name = _build_pair(case)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg, adapter_name=name)
    batch, expected = _randomize_save_and_run(fm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), _adapter_dir(str(tmp_path), name), adapter_name=name)
    pm.eval()
    torch.testing.assert_close(logits(pm, batch), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_saved_files_equal_peft(case, tmp_path):
    base, pcfg, fcfg, name = _build_pair(case)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg, adapter_name=name)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg, adapter_name=name)
    pdir, fdir = tmp_path / "peft", tmp_path / "fast"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(pdir))
        fm.save_pretrained(str(fdir))
    pd, fd = _adapter_dir(str(pdir), name), _adapter_dir(str(fdir), name)
    assert set(os.listdir(fd)) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not [f for f in os.listdir(fd) if f.endswith(".tmp") or f.startswith(".")], "temp files left behind"
    pt, ft = read_tensors(pd), read_tensors(fd)
    assert sorted(ft) == sorted(pt)
    for k in pt:
        assert ft[k].shape == pt[k].shape, k
        assert ft[k].dtype == pt[k].dtype, k
    assert safetensors_metadata(fd) == {"format": "pt"}
    assert comparable_config(read_config(fd)) == comparable_config(read_config(pd))


def test_get_set_state_dict_roundtrip_under_another_name():
    base = tiny_llama()
    _, fcfg = make_configs(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    randomize_adapter(fm)
    sd = fastpeft.get_peft_model_state_dict(fm)
    assert all(".default" not in k for k in sd)
    assert any(k.endswith("lora_magnitude_vector") for k in sd)
    assert all(k.startswith("base_model.model.") for k in sd)

    _, fcfg2 = make_configs(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    fm.add_adapter("second", fcfg2)
    result = fastpeft.set_peft_model_state_dict(fm, sd, adapter_name="second")
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    sd2 = fastpeft.get_peft_model_state_dict(fm, adapter_name="second")
    assert sorted(sd2) == sorted(sd)
    for k in sd:
        torch.testing.assert_close(sd2[k], sd[k])
    batch = inputs()
    out_default = logits(fm, batch)
    fm.set_adapter("second")
    torch.testing.assert_close(logits(fm, batch), out_default)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_keys_equal_peft(bias):
    base = tiny_bert(cls_name="BertModel")
    pcfg, fcfg = make_configs(dict(r=2, target_modules=["query", "value"], bias=bias))
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    pk = sorted(peft.get_peft_model_state_dict(pm))
    fk = sorted(fastpeft.get_peft_model_state_dict(fm))
    assert fk == pk
    assert any(k.endswith(".bias") for k in fk)


def test_save_embedding_layers_keys_equal_peft():
    base = tiny_llama()
    pcfg, fcfg = make_configs(dict(r=2, target_modules=["q_proj"]))
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    pk = sorted(peft.get_peft_model_state_dict(pm, save_embedding_layers=True))
    fk = sorted(fastpeft.get_peft_model_state_dict(fm, save_embedding_layers=True))
    assert fk == pk
    assert "base_model.model.model.embed_tokens.weight" in fk and "base_model.model.lm_head.weight" in fk


def test_two_adapters_saved_in_subfolders_like_peft(tmp_path):
    base = tiny_llama()
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    pcfg, fcfg = make_configs(kw)
    pcfg2, fcfg2 = make_configs(dict(kw, r=3))
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    pm.add_adapter("extra", pcfg2)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    fm.add_adapter("extra", fcfg2)
    randomize_adapter(fm)
    pm.save_pretrained(str(tmp_path / "p"))
    fm.save_pretrained(str(tmp_path / "f"))
    assert os.path.isdir(tmp_path / "f" / "extra")
    for sub in ("", "extra"):
        pd, fd = str(tmp_path / "p" / sub), str(tmp_path / "f" / sub)
        assert sorted(read_tensors(fd)) == sorted(read_tensors(pd))
        assert comparable_config(read_config(fd)) == comparable_config(read_config(pd))
    # selected_adapters: only the named one is written
    fm.save_pretrained(str(tmp_path / "sel"), selected_adapters=["extra"])
    assert sorted(os.listdir(tmp_path / "sel")) == ["extra"]
    with pytest.raises(ValueError, match="selected_adapters"):
        fm.save_pretrained(str(tmp_path / "bad"), selected_adapters=["nope"])
    # the non-default adapter loads back from its sub-folder and matches
    batch = inputs()
    fm.set_adapter("extra")
    expected = logits(fm, batch)
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "f" / "extra"), adapter_name="extra")
    torch.testing.assert_close(logits(pm2, batch), expected, atol=ATOL, rtol=ATOL)
    fm2 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "f"), subfolder="extra")
    torch.testing.assert_close(logits(fm2, batch), expected, atol=ATOL, rtol=ATOL)


# ---- saving is atomic and safetensors-only -------------------------------------------------------------------------


def test_save_overwrites_atomically_and_refuses_pickle(tmp_path):
    base = tiny_llama()
    _, fcfg = make_configs(dict(r=2, target_modules=["q_proj"]))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    fm.save_pretrained(str(tmp_path))
    first = read_tensors(str(tmp_path))
    randomize_adapter(fm, seed=9)
    fm.save_pretrained(str(tmp_path))  # overwrite in place
    second = read_tensors(str(tmp_path))
    assert sorted(first) == sorted(second)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match="safetensors"):
        fm.save_pretrained(str(tmp_path / "x"), safe_serialization=False)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="directory"):
        fm.save_pretrained(str(f))


def test_atomic_write_failure_leaves_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "w.safetensors")
    ckpt.save_safetensors_atomic({"a": torch.ones(2)}, path, metadata={"format": "pt"})
    import safetensors.torch as st

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_safetensors_atomic({"a": torch.zeros(2)}, path)
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert torch.equal(st.load_file(path)["a"], torch.ones(2))


def test_shared_and_noncontiguous_tensors_are_saved(tmp_path):
    t = torch.arange(6.0).reshape(2, 3)
    path = str(tmp_path / "s.safetensors")
    ckpt.save_safetensors_atomic({"a": t, "b": t, "c": t.t()}, path)
    from safetensors.torch import load_file

    out = load_file(path)
    assert torch.equal(out["a"], t) and torch.equal(out["b"], t) and torch.equal(out["c"], t.t())


# ---- bad inputs ----------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_llama(tmp_path):
    base = tiny_llama()
    _, fcfg = make_configs(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    randomize_adapter(fm)
    d = tmp_path / "adapter"
    fm.save_pretrained(str(d))
    return base, d


def test_missing_config_file(saved_llama):
    base, d = saved_llama
    os.remove(d / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d))


def test_invalid_config_file(saved_llama):
    base, d = saved_llama
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d))
    (d / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match="peft_type"):
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "NOT_A_METHOD"}))
    with pytest.raises(ValueError, match="NOT_A_METHOD"):
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d))


def test_pickle_only_checkpoint_is_refused(saved_llama, monkeypatch):
    base, d = saved_llama
    os.remove(d / "adapter_model.safetensors")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(ValueError, match="pickle") as exc:
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d))
    assert "save_file" in str(exc.value)  # tells how to convert


def test_missing_weights_file(saved_llama):
    base, d = saved_llama
    os.remove(d / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d))


def test_hub_id_gives_clear_error():
    base = tiny_llama()
    with pytest.raises(FileNotFoundError, match="Hub"):
        fastpeft.PeftModel.from_pretrained(base, "some-user/some-adapter-that-is-not-local")


def _rewrite(d, fn):
    from safetensors.torch import load_file, save_file

    path = str(d / "adapter_model.safetensors")
    sd = load_file(path)
    save_file(fn(sd), path, metadata={"format": "pt"})


def test_unexpected_key_is_named(saved_llama):
    base, d = saved_llama
    bogus = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    _rewrite(d, lambda sd: {**sd, bogus: torch.zeros(4, 32)})
    with pytest.raises(ValueError, match="unexpected") as exc:
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d))
    assert "k_proj.lora_A" in str(exc.value)


def test_missing_key_is_named(saved_llama):
    base, d = saved_llama
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite(d, lambda sd: {k: v for k, v in sd.items() if k != gone})
    with pytest.raises(ValueError, match="missing") as exc:
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d))
    assert "layers.1.self_attn.v_proj.lora_B" in str(exc.value)


def test_shape_mismatch_names_key_and_shapes(saved_llama):
    base, d = saved_llama
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 8  # the config now says r=8 but the tensors are r=4
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape") as exc:
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d))
    msg = str(exc.value)
    assert "lora_A" in msg and "(4, 32)" in msg and "(8, 32)" in msg
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d), ignore_mismatched_sizes=True)


def test_unknown_adapter_name_in_state_dict_functions():
    base = tiny_llama()
    _, fcfg = make_configs(dict(r=2, target_modules=["q_proj"]))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    with pytest.raises(ValueError, match="nope"):
        fastpeft.get_peft_model_state_dict(fm, adapter_name="nope")
    with pytest.raises(ValueError, match="nope"):
        fastpeft.set_peft_model_state_dict(fm, {}, adapter_name="nope")


def test_failed_load_adapter_rolls_back(saved_llama):
    base, d = saved_llama
    _, fcfg = make_configs(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    _rewrite(d, lambda sd: {k: v for k, v in sd.items() if "layers.0" not in k})
    with pytest.raises(ValueError, match="missing"):
        fm.load_adapter(str(d), adapter_name="broken")
    assert list(fm.peft_config) == ["default"]
    assert not any(".broken." in k for k in fm.state_dict())


def test_low_cpu_mem_usage_loading(tmp_path):
    base = tiny_llama()
    _, fcfg = make_configs(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                task_type="CAUSAL_LM"))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    randomize_adapter(fm)
    fm.save_pretrained(str(tmp_path))
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    batch = inputs()
    torch.testing.assert_close(logits(loaded, batch), logits(fm.eval(), batch), atol=ATOL, rtol=ATOL)


def test_error_names_keys_as_in_the_file(saved_llama):
    base, d = saved_llama
    gone = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite(d, lambda sd: {k: v for k, v in sd.items() if k != gone})
    with pytest.raises(ValueError) as exc:
        fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d), adapter_name="mine")
    assert repr(gone) in str(exc.value) and "'mine'" in str(exc.value)


def test_resized_vocabulary_saves_embeddings_like_peft(tmp_path):
    """save_embedding_layers="auto": a local base model whose vocabulary was resized gets its embeddings saved."""
    base_dir = tmp_path / "base"
    base = tiny_llama()
    base.config.save_pretrained(str(base_dir))
    base.resize_token_embeddings(base.config.vocab_size + 8)
    base.name_or_path = str(base_dir)
    pcfg, fcfg = make_configs(dict(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "p"))
    with pytest.warns(UserWarning, match="resized"):
        fm.save_pretrained(str(tmp_path / "f"))
    fk, pk = sorted(read_tensors(str(tmp_path / "f"))), sorted(read_tensors(str(tmp_path / "p")))
    assert fk == pk and "base_model.model.model.embed_tokens.weight" in fk
    cfg = read_config(str(tmp_path / "f"))
    assert cfg["base_model_name_or_path"] == str(base_dir)
    assert comparable_config(cfg) == comparable_config(read_config(str(tmp_path / "p")))


def test_injected_without_peft_model_keys_and_loading(tmp_path):
    """Adapters injected by the tuner alone (no PeftModel): keys have no prefix, as peft's inject_adapter_in_model."""
    from fastpeft.tuners.lora.model import LoraModel

    base = tiny_bert()
    kw = dict(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    pcfg, fcfg = make_configs(kw)
    theirs = peft.inject_adapter_in_model(pcfg, copy.deepcopy(base))
    ours = LoraModel(copy.deepcopy(base), fcfg, "default").model
    assert sorted(fastpeft.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))

    # a PeftModel checkpoint (keys with peft's prefix) loads into the bare injected model
    donor = fastpeft.get_peft_model(copy.deepcopy(base), make_configs(kw)[1])
    randomize_adapter(donor)
    donor.save_pretrained(str(tmp_path))
    fastpeft.set_peft_model_state_dict(ours, read_tensors(str(tmp_path)))
    batch = inputs()
    torch.testing.assert_close(logits(ours.eval(), batch), logits(donor.eval(), batch), atol=ATOL, rtol=ATOL)
