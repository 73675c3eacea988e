"""peft's other public names in fastpeft, against peft (the oracle): AutoPeftModel*, inject_adapter_in_model,
get_peft_config, get_layer_status / get_model_status, cast_mixed_precision_params, get/set_base_model_state_dict,
the registries and the exception classes."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings

import pytest
import torch

from _peft_testing import VOCAB, inputs, logits, make_configs, peft, randomize_adapter, tiny_bert, tiny_llama

import fastpeft

transformers = pytest.importorskip("transformers")

LLAMA_KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _assert_same_outputs(a, b, batch, atol=ATOL):
    torch.testing.assert_close(logits(a, batch), logits(b, batch), atol=atol, rtol=1e-4)


# ---- names --------------------------------------------------------------------------------------------------------

PUBLIC_NAMES = [
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction",
    "inject_adapter_in_model", "get_peft_config", "get_layer_status", "get_model_status",
    "cast_mixed_precision_params", "get_base_model_state_dict", "set_base_model_state_dict", "PeftError",
    "PeftWarning", "NoMatchingPeftModuleError", "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
]


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_exists_as_in_peft(name):
    assert name in peft.__all__
    assert name in dir(fastpeft)
    assert getattr(fastpeft, name) is not None


def test_exception_hierarchy_matches_peft():
    for name in ("PeftError", "PeftWarning", "NoMatchingPeftModuleError"):
        ours, theirs = getattr(fastpeft, name), getattr(peft, name)
        assert [c.__name__ for c in ours.__mro__] == [c.__name__ for c in theirs.__mro__]
    assert issubclass(fastpeft.NoMatchingPeftModuleError, (fastpeft.PeftError, ValueError))
    assert issubclass(fastpeft.PeftWarning, UserWarning)


@pytest.mark.parametrize(
    "kw",
    [
        dict(target_modules=["does_not_exist"]),
        dict(target_modules=["q_proj"], exclude_modules=["q_proj"]),
    ],
    ids=["unmatched", "all-excluded"],
)
def test_no_matching_module_raises_peft_error_class(kw):
    base = tiny_llama()
    pcfg, fcfg = make_configs(dict(r=2, **kw))
    with pytest.raises(peft.NoMatchingPeftModuleError) as theirs:
        peft.get_peft_model(copy.deepcopy(base), pcfg)
    for cls in (fastpeft.NoMatchingPeftModuleError, fastpeft.PeftError, ValueError):
        with pytest.raises(cls) as ours:
            fastpeft.get_peft_model(copy.deepcopy(base), copy.deepcopy(fcfg))
    if kw["target_modules"] == ["does_not_exist"]:
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(fastpeft.NoMatchingPeftModuleError):
        fastpeft.inject_adapter_in_model(copy.deepcopy(fcfg), copy.deepcopy(base))


# ---- registries -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_MIXED_MODEL_MAPPING"]
)
def test_peft_type_mappings_match_peft(name):
    ours, theirs = getattr(fastpeft, name), getattr(peft, name)
    ours_types = {str(getattr(k, "value", k)) for k in ours}
    theirs_types = {k.value for k in theirs}
    own_methods = {"BITFIT", "BOTTLENECK"}  # fastpeft's own (not in peft)
    assert ours_types - theirs_types <= own_methods
    for peft_type in ours_types - own_methods:
        # both spellings of the key work, as with peft's str-enum keys
        assert ours[peft_type] is ours[fastpeft.PeftType(peft_type)]
        assert ours[peft_type].__name__ == theirs[peft.PeftType(peft_type)].__name__, peft_type


def test_registries_are_fastpeft_own_not_copies():
    from fastpeft import config, peft_model, tuners

    assert fastpeft.PEFT_TYPE_TO_CONFIG_MAPPING is config.PEFT_TYPE_TO_CONFIG
    assert fastpeft.PEFT_TYPE_TO_TUNER_MAPPING is tuners.PEFT_TYPE_TO_TUNER_MAPPING
    assert fastpeft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING is peft_model.MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    assert {k: v.__name__ for k, v in fastpeft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()} == {
        k: v.__name__ for k, v in peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()
    }


def test_get_peft_config_matches_peft():
    pcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], task_type="CAUSAL_LM", use_dora=True)
    d = json.loads(json.dumps(pcfg.to_dict(), default=list))
    ours, theirs = fastpeft.get_peft_config(copy.deepcopy(d)), peft.get_peft_config(copy.deepcopy(d))
    assert type(ours) is fastpeft.LoraConfig
    assert (ours.r, ours.lora_alpha, ours.use_dora, ours.target_modules) == (
        theirs.r, theirs.lora_alpha, theirs.use_dora, theirs.target_modules)
    assert fastpeft.get_peft_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}).num_virtual_tokens == 3
    with pytest.raises(KeyError):
        peft.get_peft_config({"peft_type": "NOPE"})
    with pytest.raises(KeyError):
        fastpeft.get_peft_config({"peft_type": "NOPE"})


# ---- inject_adapter_in_model --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        LLAMA_KW,
        dict(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True),
        dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ],
    ids=["lora", "dora-all-linear", "modules-to-save"],
)
def test_inject_adapter_in_model_matches_peft(kw):
    base = tiny_llama()
    pcfg, fcfg = make_configs(kw)
    theirs = peft.inject_adapter_in_model(pcfg, copy.deepcopy(base))
    ours = fastpeft.inject_adapter_in_model(fcfg, copy.deepcopy(base))
    assert type(ours) is type(base)
    st, so = theirs.state_dict(), ours.state_dict()
    assert sorted(st) == sorted(so)
    randomize_adapter(theirs)
    ours.load_state_dict(theirs.state_dict())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad}
    _assert_same_outputs(theirs, ours, inputs())


def test_inject_adapter_in_model_from_state_dict_keys():
    base = tiny_llama()
    donor = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["k_proj"]), copy.deepcopy(base))
    sd = {k: v for k, v in donor.state_dict().items() if "lora_" in k}
    # the config targets q_proj; the state dict's keys decide (k_proj), in both
    pcfg, fcfg = make_configs(dict(r=2, target_modules=["q_proj"]))
    theirs = peft.inject_adapter_in_model(pcfg, copy.deepcopy(base), state_dict=sd)
    ours = fastpeft.inject_adapter_in_model(fcfg, copy.deepcopy(base), adapter_name="other", state_dict=sd)
    lora_names = lambda m: sorted(n.replace(".other", ".default") for n in m.state_dict() if "lora_" in n)  # noqa: E731
    assert lora_names(ours) == lora_names(theirs)
    assert all("k_proj" in n for n in lora_names(ours))


def test_inject_adapter_in_model_twice_keeps_both_adapters_as_peft():
    base = tiny_llama()
    models = {}
    for lib in (peft, fastpeft):
        m = copy.deepcopy(base)
        assert lib.inject_adapter_in_model(lib.LoraConfig(r=2, target_modules=["q_proj"]), m, "a") is m
        lib.inject_adapter_in_model(lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), m, "b")
        models[lib.__name__] = m
    theirs, ours = models["peft"], models["fastpeft"]
    assert list(ours.peft_config) == list(theirs.peft_config) == ["a", "b"]
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    randomize_adapter(theirs)
    ours.load_state_dict(theirs.state_dict())
    _assert_same_outputs(theirs, ours, inputs())
    _assert_status_equal(theirs, ours)


def test_inject_adapter_in_model_refuses_prompt_learning():
    cfg = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    pcfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(ValueError) as theirs:
        peft.inject_adapter_in_model(pcfg, tiny_llama())
    with pytest.raises(ValueError) as ours:
        fastpeft.inject_adapter_in_model(cfg, tiny_llama())
    assert str(ours.value) == str(theirs.value)


# ---- status ---------------------------------------------------------------------------------------------------------


def _pair(kw, base=None):
    base = tiny_llama() if base is None else base
    pcfg, fcfg = make_configs(kw)
    return peft.get_peft_model(copy.deepcopy(base), pcfg), fastpeft.get_peft_model(copy.deepcopy(base), fcfg)


def _assert_status_equal(theirs, ours):
    lt, lo = peft.get_layer_status(theirs), fastpeft.get_layer_status(ours)
    assert [dataclasses.asdict(s) for s in lo] == [dataclasses.asdict(s) for s in lt]
    assert dataclasses.asdict(fastpeft.get_model_status(ours)) == dataclasses.asdict(peft.get_model_status(theirs))


@pytest.mark.parametrize("scenario", ["one", "two-adapters", "merged", "disabled", "modules-to-save", "loha"])
def test_layer_and_model_status_match_peft(scenario):
    kw = dict(LLAMA_KW, task_type="CAUSAL_LM")
    if scenario == "modules-to-save":
        kw["modules_to_save"] = ["lm_head"]
    if scenario == "loha":
        base = tiny_llama()
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(r=2, target_modules=["q_proj"]))
        ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoHaConfig(r=2, target_modules=["q_proj"]))
    else:
        theirs, ours = _pair(kw)
    if scenario == "two-adapters":
        extra = dict(r=2, target_modules=["q_proj", "k_proj"])
        pcfg, fcfg = make_configs(extra)
        theirs.add_adapter("other", pcfg)
        ours.add_adapter("other", fcfg)
        theirs.set_adapter("other")
        ours.set_adapter("other")
    elif scenario == "merged":
        theirs.merge_adapter()
        ours.merge_adapter()
    elif scenario == "disabled":
        theirs.base_model.disable_adapter_layers()
        ours.base_model.disable_adapter_layers()
    _assert_status_equal(theirs, ours)
    # the PeftModel methods are the same functions
    assert ours.get_model_status() == fastpeft.get_model_status(ours)
    assert ours.get_layer_status() == fastpeft.get_layer_status(ours)


def test_status_of_injected_model_and_errors_match_peft():
    base = tiny_llama()
    pcfg, fcfg = make_configs(LLAMA_KW)
    theirs = peft.inject_adapter_in_model(pcfg, copy.deepcopy(base))
    ours = fastpeft.inject_adapter_in_model(fcfg, copy.deepcopy(base))
    _assert_status_equal(theirs, ours)
    status = fastpeft.get_model_status(ours)
    assert (status.base_model_type, status.adapter_model_type, status.peft_types) == ("LlamaForCausalLM", "None", {})
    # a model without adapters
    with pytest.raises(ValueError) as t:
        peft.get_model_status(copy.deepcopy(base))
    with pytest.raises(ValueError) as o:
        fastpeft.get_model_status(copy.deepcopy(base))
    assert str(o.value) == str(t.value)
    # prompt learning: refused
    pt = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                  num_virtual_tokens=2))
    with pytest.raises(TypeError):
        fastpeft.get_layer_status(pt)
    with pytest.raises(TypeError):
        pt.get_model_status()


# ---- cast_mixed_precision_params, base-model state dict ----------------------------------------------------------


def test_cast_mixed_precision_params_matches_peft():
    theirs, ours = _pair(LLAMA_KW)
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    fastpeft.cast_mixed_precision_params(ours, torch.bfloat16)
    dt = {n: p.dtype for n, p in theirs.named_parameters()}
    do = {n: p.dtype for n, p in ours.named_parameters()}
    assert do == dt
    assert {d for n, d in do.items() if "lora_" in n} == {torch.float32}
    assert torch.bfloat16 in set(do.values())


@pytest.mark.parametrize(
    "kw",
    [
        dict(LLAMA_KW, task_type="CAUSAL_LM"),
        dict(r=2, target_modules="all-linear", use_dora=True, modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
    ],
    ids=["lora", "dora-modules-to-save"],
)
def test_get_and_set_base_model_state_dict_match_peft(kw):
    base = tiny_llama()
    original = copy.deepcopy(base).state_dict()
    theirs, ours = _pair(kw, base)
    sd_t, sd_o = peft.get_base_model_state_dict(theirs), fastpeft.get_base_model_state_dict(ours)
    assert list(sd_o) == list(sd_t)
    assert sorted(sd_o) == sorted(original)
    for k in sd_o:
        assert torch.equal(sd_o[k], original[k]), k

    new = {k: v + 1.0 for k, v in original.items()}
    res_t = peft.set_base_model_state_dict(theirs, new)
    res_o = fastpeft.set_base_model_state_dict(ours, new)
    assert tuple(res_o) == tuple(res_t) == ([], [])
    after = fastpeft.get_base_model_state_dict(ours)
    for k in new:
        assert torch.equal(after[k], new[k]), k

    partial = dict(list(new.items())[1:]) | {"nope.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError) as t:
        peft.set_base_model_state_dict(theirs, partial)
    with pytest.raises(RuntimeError) as o:
        fastpeft.set_base_model_state_dict(ours, partial)
    assert str(o.value) == str(t.value)
    res_t = peft.set_base_model_state_dict(theirs, partial, strict=False)
    res_o = fastpeft.set_base_model_state_dict(ours, partial, strict=False)
    assert tuple(res_o) == tuple(res_t)


def test_base_model_state_dict_prompt_learning():
    base = tiny_llama()
    pt = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                  num_virtual_tokens=2))
    assert sorted(fastpeft.get_base_model_state_dict(pt)) == sorted(base.state_dict())


# ---- AutoPeftModel ------------------------------------------------------------------------------------------------


def _save_base(model, path):
    model.save_pretrained(path)
    return str(path)


def _peft_adapter(base_cls, base_dir, cfg, path, seed=7, tokenizer=None, resize_to=None):
    """A peft adapter trained (randomised) on the base at `base_dir`, saved to `path`."""
    base = getattr(transformers, base_cls).from_pretrained(base_dir)
    if resize_to is not None:
        torch.manual_seed(0)
        base.resize_token_embeddings(resize_to)
    model = peft.get_peft_model(base, cfg)
    randomize_adapter(model, seed=seed)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save_base(tiny_llama(), tmp_path_factory.mktemp("llama-base"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return _save_base(tiny_bert(), tmp_path_factory.mktemp("bert-base"))


def _load_both(auto_name, adapter_dir, **kwargs):
    theirs = getattr(peft, auto_name).from_pretrained(adapter_dir, **kwargs)
    ours = getattr(fastpeft, auto_name).from_pretrained(adapter_dir, **kwargs)
    return theirs, ours


def test_auto_peft_model_for_causal_lm_matches_peft(llama_dir, tmp_path):
    adapter = _peft_adapter("LlamaForCausalLM", llama_dir, peft.LoraConfig(**LLAMA_KW, task_type="CAUSAL_LM"),
                            tmp_path / "a")
    theirs, ours = _load_both("AutoPeftModelForCausalLM", adapter)
    assert type(ours) is fastpeft.PeftModelForCausalLM
    assert type(ours.get_base_model()) is transformers.LlamaForCausalLM
    assert not any(p.requires_grad for p in ours.parameters())  # inference mode by default
    _assert_same_outputs(theirs, ours, inputs())
    # the adapter matters
    with ours.disable_adapter():
        assert not torch.allclose(logits(ours, inputs()), logits(theirs, inputs()), atol=1e-3)


def test_auto_peft_model_trainable_adapter_name_and_dtype(llama_dir, tmp_path):
    adapter = _peft_adapter("LlamaForCausalLM", llama_dir, peft.LoraConfig(**LLAMA_KW, task_type="CAUSAL_LM"),
                            tmp_path / "a")
    theirs, ours = _load_both("AutoPeftModelForCausalLM", adapter, adapter_name="mine", is_trainable=True,
                              dtype=torch.bfloat16)
    assert list(ours.peft_config) == ["mine"]
    trainable_o = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    trainable_t = sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert trainable_o == trainable_t and trainable_o
    dtypes_o = {n: p.dtype for n, p in ours.named_parameters()}
    dtypes_t = {n: p.dtype for n, p in theirs.named_parameters()}
    assert dtypes_o == dtypes_t
    assert ours.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16


def test_auto_peft_model_for_sequence_classification_matches_peft(bert_dir, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    adapter = _peft_adapter("BertForSequenceClassification", bert_dir, cfg, tmp_path / "a")
    theirs, ours = _load_both("AutoPeftModelForSequenceClassification", adapter)
    assert type(ours) is fastpeft.PeftModelForSequenceClassification
    _assert_same_outputs(theirs, ours, inputs())


def test_auto_peft_model_for_feature_extraction_matches_peft(bert_dir, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="FEATURE_EXTRACTION")
    adapter = _peft_adapter("BertModel", bert_dir, cfg, tmp_path / "a")
    theirs, ours = _load_both("AutoPeftModelForFeatureExtraction", adapter)
    assert type(ours) is fastpeft.PeftModelForFeatureExtraction
    _assert_same_outputs(theirs, ours, inputs())


def test_auto_peft_model_without_task_type_uses_auto_mapping(llama_dir, tmp_path):
    adapter = _peft_adapter("LlamaForCausalLM", llama_dir, peft.LoraConfig(**LLAMA_KW), tmp_path / "a")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    theirs, ours = _load_both("AutoPeftModel", adapter)
    assert type(ours) is fastpeft.PeftModel
    assert type(ours.get_base_model()) is transformers.LlamaForCausalLM
    _assert_same_outputs(theirs, ours, inputs())

    # an auto_mapping that names a library outside the allowlist is refused, not imported
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        d = json.load(f)
    d["auto_mapping"]["parent_library"] = "os"
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError) as t:
        peft.AutoPeftModel.from_pretrained(adapter)
    with pytest.raises(ValueError) as o:
        fastpeft.AutoPeftModel.from_pretrained(adapter)
    assert str(o.value) == str(t.value)


@pytest.mark.parametrize(
    "auto_name,task_type",
    [
        ("AutoPeftModelForSequenceClassification", "CAUSAL_LM"),
        ("AutoPeftModelForCausalLM", "SEQ_CLS"),
        ("AutoPeftModel", "CAUSAL_LM"),
        ("AutoPeftModelForTokenClassification", "QUESTION_ANS"),
    ],
)
def test_auto_peft_model_wrong_task_type_raises_as_peft(llama_dir, tmp_path, auto_name, task_type):
    cfg = peft.LoraConfig(**LLAMA_KW, task_type=task_type)
    base_cls = "LlamaForCausalLM" if task_type == "CAUSAL_LM" else (
        "LlamaForSequenceClassification" if task_type == "SEQ_CLS" else "LlamaForQuestionAnswering")
    adapter = _peft_adapter(base_cls, llama_dir, cfg, tmp_path / "a")
    with pytest.raises(ValueError) as t:
        getattr(peft, auto_name).from_pretrained(adapter)
    with pytest.raises(ValueError) as o:
        getattr(fastpeft, auto_name).from_pretrained(adapter)
    assert type(o.value) is type(t.value)
    assert str(o.value) == str(t.value)


def test_auto_peft_model_cannot_be_instantiated():
    with pytest.raises(OSError):
        peft.AutoPeftModelForCausalLM()
    with pytest.raises(OSError):
        fastpeft.AutoPeftModelForCausalLM()


def _tokenizer(n_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(n_tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def test_auto_peft_model_resizes_embeddings_to_the_adapter_tokenizer(llama_dir, tmp_path):
    n = VOCAB + 8
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], task_type="CAUSAL_LM")
    adapter = _peft_adapter("LlamaForCausalLM", llama_dir, cfg, tmp_path / "a", tokenizer=_tokenizer(n), resize_to=n)
    torch.manual_seed(0)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    torch.manual_seed(0)
    ours = fastpeft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert ours.get_base_model().get_input_embeddings().weight.shape[0] == n
    batch = inputs()
    batch["input_ids"][1, -1] = n - 1  # a new token
    _assert_same_outputs(theirs, ours, batch)


def test_auto_peft_model_hub_id_goes_through_huggingface_hub(llama_dir, tmp_path, monkeypatch):
    import huggingface_hub

    adapter = _peft_adapter("LlamaForCausalLM", llama_dir, peft.LoraConfig(**LLAMA_KW, task_type="CAUSAL_LM"),
                            tmp_path / "a")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return adapter

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ours = fastpeft.AutoPeftModelForCausalLM.from_pretrained("someone/tiny-lora", revision="v1")
    assert calls and calls[0][0] == "someone/tiny-lora" and calls[0][1]["revision"] == "v1"
    assert "adapter_model.safetensors" in calls[0][1]["allow_patterns"]
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    _assert_same_outputs(theirs, ours, inputs())


@pytest.mark.parametrize("name", ["/nonexistent/adapter-dir", "no-such-adapter-xyz"])
def test_auto_peft_model_missing_adapter_raises_value_error_as_peft(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        fastpeft.AutoPeftModelForCausalLM.from_pretrained(name)
