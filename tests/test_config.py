"""Config JSON round trips with peft (both ways), defaults, dispatch, forward compatibility, validation."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest

peft = pytest.importorskip("peft")

from fastpeft.config import CONFIG_NAME, PEFT_TYPE_TO_CONFIG, PeftConfig, PeftType, TaskType  # noqa: E402
from fastpeft.tuners.lora.config import LoraConfig  # noqa: E402

VERSION_KEYS = {"peft_version"}


def _json(directory):
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        return json.load(f)


def _normalise(d: dict) -> dict:
    """Dict for comparison: no version, list order of set-valued fields ignored."""
    out = {}
    for k, v in d.items():
        if k in VERSION_KEYS:
            continue
        if k in ("target_modules", "exclude_modules", "modules_to_save") and isinstance(v, (list, set)):
            v = sorted(v)
        out[k] = v
    return out


CASES = [
    {},
    {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1, "task_type": "CAUSAL_LM"},
    {"target_modules": r".*\.(q|v)_proj", "exclude_modules": ["lm_head"], "bias": "lora_only", "use_rslora": True},
    {"target_modules": "all-linear", "use_dora": True, "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"},
    {"target_modules": ["q"], "layers_to_transform": [0, 2], "layers_pattern": "layers",
     "rank_pattern": {"q": 4}, "alpha_pattern": {r"layers\.0\.q": 3}},
    {"target_modules": ["q"], "init_lora_weights": "pissa_niter_4", "inference_mode": True},
    {"target_modules": ["q"], "init_lora_weights": False, "lora_bias": True, "fan_in_fan_out": True},
    {"target_modules": ["q"], "init_lora_weights": "gaussian", "megatron_core": None, "revision": "v1"},
    {"target_modules": ["q"], "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 2}},
]


def test_defaults_equal_peft():
    ours = LoraConfig().to_dict()
    theirs = json.loads(json.dumps(peft.LoraConfig().to_dict(), default=str))
    assert set(ours) == set(theirs)  # every field peft writes, none more
    for key, value in theirs.items():
        if key in VERSION_KEYS:
            continue
        assert ours[key] == value, key
    assert ours["peft_type"] == "LORA"


@pytest.mark.parametrize("kwargs", CASES)
def test_peft_written_config_loads(tmp_path, kwargs):
    theirs = peft.LoraConfig(**kwargs)
    theirs.save_pretrained(tmp_path)
    for loader in (PeftConfig.from_pretrained, LoraConfig.from_pretrained):
        ours = loader(str(tmp_path))
        assert type(ours) is LoraConfig
        assert _normalise(ours.to_dict()) == _normalise(_json(tmp_path))
    ours.save_pretrained(tmp_path / "again")
    assert _normalise(_json(tmp_path / "again")) == _normalise(_json(tmp_path))


@pytest.mark.parametrize("kwargs", CASES)
def test_our_config_loads_in_peft(tmp_path, kwargs):
    ours = LoraConfig(**kwargs)
    ours.save_pretrained(tmp_path)
    written = _json(tmp_path)
    assert written["peft_type"] == "LORA"
    assert isinstance(written["target_modules"], (list, str, type(None)))  # sets are written as lists
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown keys, nothing peft complains about
        theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert type(theirs) is peft.LoraConfig
    theirs_dict = json.loads(json.dumps(theirs.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    assert _normalise(theirs_dict) == _normalise(written)
    if kwargs.get("task_type"):
        assert theirs.task_type == kwargs["task_type"]


def test_saved_json_format(tmp_path):
    cfg = LoraConfig(target_modules=["v", "q"], task_type=TaskType.CAUSAL_LM)
    assert cfg.target_modules == {"q", "v"} and cfg.task_type is TaskType.CAUSAL_LM
    cfg.save_pretrained(tmp_path, auto_mapping_dict={"base_model_class": "X"})
    text = (tmp_path / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert data["target_modules"] == ["q", "v"] and data["task_type"] == "CAUSAL_LM" and data["peft_type"] == "LORA"
    assert data["auto_mapping"] == {"base_model_class": "X"}
    assert list(data) == sorted(data)  # sorted keys, like peft
    assert os.listdir(tmp_path) == [CONFIG_NAME]  # the atomic write leaves no temporary file
    assert LoraConfig.from_pretrained(str(tmp_path / CONFIG_NAME)).target_modules == {"q", "v"}  # a file path works
    with pytest.raises(ValueError, match="is a file"):
        cfg.save_pretrained(str(tmp_path / CONFIG_NAME))
    with pytest.raises(ValueError, match="can't find"):
        LoraConfig.from_pretrained(str(tmp_path / "missing"))


def test_from_pretrained_overrides_and_runtime_config(tmp_path):
    LoraConfig(target_modules=["q"]).save_pretrained(tmp_path)
    data = _json(tmp_path)
    data["runtime_config"] = {"ephemeral_gpu_offload": True}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="runtime_config"):
        cfg = PeftConfig.from_pretrained(str(tmp_path), inference_mode=True)
    assert cfg.inference_mode is True


def test_unknown_keys_from_newer_peft_are_ignored(tmp_path):
    LoraConfig(target_modules=["q"]).save_pretrained(tmp_path)
    data = _json(tmp_path)
    data["some_future_option"] = 3
    data["another_one"] = {"x": 1}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="another_one.*some_future_option"):
        cfg = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(cfg, LoraConfig) and cfg.target_modules == {"q"}


def test_from_peft_type_dispatch():
    assert PEFT_TYPE_TO_CONFIG[PeftType.LORA] is LoraConfig
    cfg = PeftConfig.from_peft_type(peft_type="LORA", r=4)
    assert isinstance(cfg, LoraConfig) and cfg.r == 4 and cfg.peft_type is PeftType.LORA
    with pytest.raises(ValueError, match="unknown peft_type"):
        PeftConfig.from_peft_type(peft_type="NOT_A_METHOD")
    with pytest.raises(NotImplementedError, match="MULTITASK_PROMPT_TUNING"):
        PeftConfig.from_peft_type(peft_type="MULTITASK_PROMPT_TUNING")  # a known type whose config is not registered
    base = PeftConfig(peft_type="LORA", task_type="SEQ_CLS")
    assert base.peft_type is PeftType.LORA and base.task_type is TaskType.SEQ_CLS


def test_enums():
    for name in ("LORA", "LOHA", "LOKR", "OFT", "BOFT", "IA3", "ADALORA", "XLORA", "ADAPTION_PROMPT",
                 "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "BITFIT", "BOTTLENECK"):
        assert PeftType(name).value == name and str(PeftType(name)) == name
        if name not in ("BITFIT", "BOTTLENECK"):
            assert peft.PeftType(name).value == name
    assert {t.value for t in TaskType} == {t.value for t in peft.TaskType}
    assert PeftType.LORA == "LORA" and TaskType.CAUSAL_LM == "CAUSAL_LM"


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"r": "8"}, TypeError, r"LoraConfig\.r must be int"),
        ({"r": 8.5}, TypeError, r"LoraConfig\.r "),
        ({"r": True}, TypeError, r"LoraConfig\.r "),
        ({"lora_dropout": "0.1"}, TypeError, "lora_dropout"),
        ({"target_modules": 5}, TypeError, "target_modules"),
        ({"target_modules": ["q", 3]}, TypeError, "target_modules"),
        ({"use_dora": "yes"}, TypeError, "use_dora"),
        ({"rank_pattern": {"q": "4"}}, TypeError, "rank_pattern"),
        ({"bias": "some"}, TypeError, r"LoraConfig\.bias must be one of 'none', 'all', 'lora_only'"),
        ({"task_type": "TRANSLATE"}, ValueError, "task_type"),
        ({"r": 0}, ValueError, r"LoraConfig\.r must be a positive integer"),
        ({"r": -2}, ValueError, r"LoraConfig\.r must be a positive"),
        ({"rank_pattern": {"q": 0}}, ValueError, "rank_pattern"),
        ({"lora_dropout": 1.5}, ValueError, "lora_dropout"),
        ({"init_lora_weights": "kaiming"}, ValueError, "init_lora_weights"),
        ({"init_lora_weights": "pissa_niter_x"}, ValueError, "init_lora_weights"),
        ({"layers_pattern": "layers"}, ValueError, "layers_pattern.*layers_to_transform"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, ValueError, "layers_to_transform"),
        ({"target_modules": ".*q", "layers_pattern": "h", "layers_to_transform": [0]}, ValueError, "layers_"),
        ({"init_lora_weights": "loftq"}, ValueError, "loftq_config"),
        ({"lora_bias": True, "use_dora": True}, ValueError, "lora_bias.*use_dora"),
        ({"lora_bias": True, "init_lora_weights": "pissa"}, ValueError, "lora_bias"),
        ({"use_dora": True, "megatron_config": {"a": 1}}, ValueError, "use_dora"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        LoraConfig(**kwargs)


def test_invalid_values_in_json_are_rejected(tmp_path):
    LoraConfig(target_modules=["q"]).save_pretrained(tmp_path)
    data = _json(tmp_path)
    data["r"] = "sixteen"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(TypeError, match=r"LoraConfig\.r"):
        PeftConfig.from_pretrained(str(tmp_path))
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        PeftConfig.from_pretrained(str(tmp_path))


def test_loftq_config_handling():
    cfg = LoraConfig(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4))
    assert cfg.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}  # dataclasses become dicts
    with pytest.warns(UserWarning, match="loftq_config"):
        cfg = LoraConfig(loftq_config={"loftq_bits": 4})
    assert cfg.loftq_config == {}


@pytest.mark.filterwarnings("ignore:`init_lora_weights` is 'eva'")
def test_peft_only_features_load_but_are_flagged(tmp_path):
    theirs = peft.LoraConfig(target_modules=["q"], init_lora_weights="eva")  # peft fills a default eva_config
    theirs.save_pretrained(tmp_path)
    ours = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(ours.eva_config, dict)
    assert ours.unsupported_features() == []  # EVA is implemented (tests/test_lora_inits.py)
    ours.kasa_config = {"beta": 0.1}
    assert "kasa_config" in ours.unsupported_features()
    assert LoraConfig(target_modules=["q"]).unsupported_features() == []


def test_config_is_a_dataclass_with_peft_field_names():
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)} - {"runtime_config"}
    assert ours == theirs
