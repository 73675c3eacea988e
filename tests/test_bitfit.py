"""BitFit (fastpeft's own method, peft_type "BITFIT"): only the selected biases train; checkpoints hold just them.

Checked against plain PyTorch: the trainable set, zero added biases (outputs unchanged), one optimizer step equal
to the same step on a plain model with requires_grad only on the biases, save -> load round trips (keys, values,
outputs), merge_and_unload giving a plain model, config errors, and tiny transformers models.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastpeft.checkpoint import AdapterCheckpointError
from fastpeft.peft_model import PeftModel, get_peft_model
from fastpeft.tuners.bitfit import BitFitConfig, BitFitModel


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8, bias=False)
        self.conv = nn.Conv1d(1, 2, 3, padding=1, bias=False)
        self.emb_like = nn.Linear(16, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc2(self.norm(torch.relu(self.fc1(x))))
        h = self.conv(h.unsqueeze(1)).flatten(1)
        return self.head(torch.tanh(self.emb_like(h)))


def net(seed=0):
    torch.manual_seed(seed)
    return Net()


def x_batch(seed=1):
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def randomize_biases(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


P = "base_model.model."


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, ["emb_like", "fc1", "head", "norm"]),
        ({"target_modules": "all"}, ["emb_like", "fc1", "head", "norm"]),
        ({"target_modules": ["fc1", "head"]}, ["fc1", "head"]),
        ({"target_modules": r"(fc\d|norm)"}, ["fc1", "norm"]),
        ({"exclude_modules": ["norm"]}, ["emb_like", "fc1", "head"]),
        ({"exclude_modules": "fc.*|emb_like"}, ["head", "norm"]),
        ({"add_missing_biases": True}, ["conv", "emb_like", "fc1", "fc2", "head", "norm"]),
        ({"target_modules": ["fc2", "fc1"], "add_missing_biases": True}, ["fc1", "fc2"]),
    ],
)
def test_trainable_parameters_are_the_selected_biases(kwargs, expected):
    model = get_peft_model(net(), BitFitConfig(**kwargs))
    assert trainable(model) == [f"{P}{n}.bias" for n in expected]
    assert sorted(model.base_model.targeted_module_names) == expected


def test_added_biases_start_at_zero_and_do_not_change_outputs():
    base, x = net(), x_batch()
    ref = base(x)
    model = get_peft_model(copy.deepcopy(base), BitFitConfig(add_missing_biases=True))
    assert sorted(model.base_model.added_bias_module_names) == ["conv", "fc2"]
    inner = model.get_base_model()
    assert torch.equal(inner.fc2.bias, torch.zeros(8)) and torch.equal(inner.conv.bias, torch.zeros(2))
    assert type(inner.fc2) is nn.Linear and type(inner.conv) is nn.Conv1d
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{}, {"target_modules": ["fc1", "fc2"], "add_missing_biases": True},
                                    {"add_missing_biases": True, "exclude_modules": ["head"]}])
def test_training_step_matches_plain_pytorch(kwargs):
    base, x = net(), x_batch()
    model = get_peft_model(copy.deepcopy(base), BitFitConfig(**kwargs))
    # the reference: the same model in plain PyTorch, zero biases added by hand, requires_grad on the biases only
    ref = copy.deepcopy(base)
    names = model.base_model.targeted_module_names
    for n in model.base_model.added_bias_module_names:
        m = ref.get_submodule(n)
        m.bias = nn.Parameter(torch.zeros(m.weight.shape[0]))
    for pn, p in ref.named_parameters():
        p.requires_grad = pn in {f"{n}.bias" for n in names}
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}

    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (model, ref)]
    for _ in range(2):
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    after = model.get_base_model().state_dict()
    assert after.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(after[k], v), k
        changed = not torch.equal(after[k], before[k])
        assert changed == (k in {f"{n}.bias" for n in names}), k  # only the selected biases moved (all did)


def test_save_load_round_trip(tmp_path):
    base, x = net(), x_batch()
    model = get_peft_model(copy.deepcopy(base), BitFitConfig(target_modules=["fc1", "fc2", "conv", "norm"],
                                                             add_missing_biases=True))
    randomize_biases(model)
    out = model(x)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BITFIT" and cfg["add_missing_biases"] is True
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(sd) == [f"{P}{n}.bias" for n in ("conv", "fc1", "fc2", "norm")]
    inner = model.get_base_model()
    for k, v in sd.items():
        assert torch.equal(v, inner.get_parameter(k[len(P):]))

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(loaded.base_model, BitFitModel) and isinstance(loaded.peft_config["default"], BitFitConfig)
    assert trainable(loaded) == []  # inference mode
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    assert not torch.allclose(base(x), out)
    for k, v in sd.items():
        assert torch.equal(loaded.get_base_model().get_parameter(k[len(P):]), v)
    trainable_again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert trainable(trainable_again) == sorted(sd)


def test_round_trip_with_modules_to_save(tmp_path):
    base, x = net(), x_batch()
    model = get_peft_model(copy.deepcopy(base), BitFitConfig(modules_to_save=["head"]))
    assert trainable(model) == [f"{P}emb_like.bias", f"{P}fc1.bias", f"{P}head.modules_to_save.default.bias",
                                f"{P}head.modules_to_save.default.weight", f"{P}norm.bias"]
    randomize_biases(model)
    out = model(x)
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(sd) == [f"{P}{n}" for n in ("emb_like.bias", "fc1.bias", "head.bias", "head.weight", "norm.bias")]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    plain = loaded.merge_and_unload()
    assert type(plain.head) is nn.Linear
    torch.testing.assert_close(plain(x), out, rtol=0, atol=0)


def test_mismatched_checkpoint_names_the_key(tmp_path):
    base = net()
    model = get_peft_model(copy.deepcopy(base), BitFitConfig(add_missing_biases=True))
    model.save_pretrained(tmp_path)
    # loading into a config that does not add the missing biases: fc2/conv biases are unexpected
    cfg = BitFitConfig()
    with pytest.raises(AdapterCheckpointError, match=r"base_model\.model\.(conv|fc2)\.bias"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=cfg)
    # a checkpoint lacking a bias, one carrying a weight, one with a wrong shape
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    from safetensors.torch import save_file

    bad = dict(sd)
    del bad[f"{P}norm.bias"]
    save_file(bad, path)
    with pytest.raises(AdapterCheckpointError, match=r"missing.*base_model\.model\.norm\.bias"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    bad = dict(sd, **{f"{P}fc1.weight": torch.zeros(8, 6)})
    save_file(bad, path)
    with pytest.raises(AdapterCheckpointError, match=r"unexpected.*base_model\.model\.fc1\.weight"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    bad = dict(sd, **{f"{P}fc1.bias": torch.zeros(3)})
    save_file(bad, path)
    with pytest.raises(AdapterCheckpointError, match=r"base_model\.model\.fc1\.bias.*\(3,\)"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_merge_and_unload_return_the_plain_model():
    x = x_batch()
    for method in ("merge_and_unload", "unload"):
        model = get_peft_model(net(), BitFitConfig(add_missing_biases=True, modules_to_save=["head"]))
        randomize_biases(model)
        out = model(x)
        model.merge_adapter()  # no-op
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        plain = getattr(model, method)()
        assert type(plain) is Net and not hasattr(plain, "peft_config")
        assert all(not type(m).__module__.startswith("fastpeft") for m in plain.modules())
        torch.testing.assert_close(plain(x), out, rtol=0, atol=0)
        assert plain.fc2.bias is not None  # added biases stay (with their trained values)


def test_bad_configs_and_unsupported_operations():
    with pytest.raises(TypeError, match="add_missing_biases"):
        BitFitConfig(add_missing_biases="yes")
    with pytest.raises(ValueError, match="regular expression"):
        BitFitConfig(target_modules="fc(")
    with pytest.raises(ValueError, match="empty"):
        BitFitConfig(target_modules=[])
    with pytest.raises(TypeError, match="target_modules"):
        BitFitConfig(target_modules=3)
    with pytest.raises(ValueError, match="no biases.*add_missing_biases=True"):
        get_peft_model(net(), BitFitConfig(target_modules=["fc2", "conv"]))
    with pytest.raises(ValueError, match="no biases"):
        get_peft_model(net(), BitFitConfig(target_modules=["nothing"]))
    with pytest.raises(ValueError, match="no biases"):
        get_peft_model(net(), BitFitConfig(exclude_modules=".*"))
    model = get_peft_model(net(), BitFitConfig())
    with pytest.raises(ValueError, match="one set of BitFit biases"):
        model.add_adapter("other", BitFitConfig())
    assert list(model.peft_config) == ["default"]
    with pytest.raises(RuntimeError, match="in place"):
        with model.disable_adapter():
            pass
    with pytest.raises(RuntimeError, match="in place"):
        model.delete_adapter("default")


def test_config_json_round_trip(tmp_path):
    from fastpeft.config import PeftConfig

    cfg = BitFitConfig(target_modules=["a", "b"], exclude_modules="c.*", add_missing_biases=True, task_type="CAUSAL_LM")
    cfg.save_pretrained(tmp_path)
    again = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, BitFitConfig) and again.to_dict() == cfg.to_dict()
    assert again.target_modules == {"a", "b"}


def test_registered():
    # registrations done outside the bitfit package
    import fastpeft
    from fastpeft.config import _CONFIG_MODULES, PeftType
    from fastpeft.tuners import PEFT_TYPE_TO_TUNER_MAPPING

    assert fastpeft.BitFitConfig is BitFitConfig and fastpeft.BitFitModel is BitFitModel
    assert _CONFIG_MODULES[PeftType.BITFIT] == "fastpeft.tuners.bitfit.config"
    assert PEFT_TYPE_TO_TUNER_MAPPING["BITFIT"] is BitFitModel


# ---- tiny transformers models ----


@pytest.mark.parametrize("builder, kwargs", [
    ("tiny_llama", {"add_missing_biases": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("tiny_gpt2", {}),
    ("tiny_bert", {"exclude_modules": r".*LayerNorm"}),
])
def test_tiny_transformers(tmp_path, builder, kwargs):
    helpers = pytest.importorskip("_peft_testing")
    build = getattr(helpers, builder)
    base = build()
    batch = helpers.inputs()
    ref = helpers.logits(base, batch)
    model = get_peft_model(build(), BitFitConfig(**kwargs))
    names = trainable(model)
    assert names and all(n.endswith(".bias") for n in names)
    torch.testing.assert_close(helpers.logits(model, batch), ref, rtol=0, atol=0)  # biases untouched / zero
    if builder == "tiny_llama":
        assert len(names) == 2 * 3  # 2 layers x 3 added biases
    if builder == "tiny_bert":
        assert not any("LayerNorm" in n for n in names)
    # train a step: only the biases move, outputs change
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(**batch)
    (out.logits.float().square().mean()).backward()
    opt.step()
    model.eval()
    new = helpers.logits(model, batch)
    assert not torch.allclose(new, ref)
    model.save_pretrained(tmp_path)
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == names
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(helpers.logits(loaded, batch), new, rtol=0, atol=0)
    plain = loaded.merge_and_unload()
    assert all(not type(m).__module__.startswith("fastpeft") for m in plain.modules())
    torch.testing.assert_close(helpers.logits(plain, batch), new, rtol=0, atol=0)


def test_set_adapter_inference_mode_and_trainable_count():
    model = get_peft_model(net(), BitFitConfig())
    model.set_adapter("default", inference_mode=True)
    assert trainable(model) == []
    model.set_adapter("default")
    assert trainable(model) == [f"{P}{n}.bias" for n in ("emb_like", "fc1", "head", "norm")]
    n_trainable, n_all = model.get_nb_trainable_parameters()
    assert n_trainable == 4 + 8 + 3 + 8 and n_all == sum(p.numel() for p in net().parameters())
