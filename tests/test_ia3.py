"""(IA)^3 conformance with peft 0.21.2 (the oracle): default target / feedforward mappings, structure, state-dict
keys and initialisation, outputs and gradients (Linear, Conv1D, Conv2d incl. grouped, Conv3d; feedforward or not;
float32 and bfloat16), several adapters, merge / unmerge (bias scaled for non-feedforward layers), disable,
unload, add_weighted_adapter, checkpoints both ways (tiny Llama with default targets, tiny GPT-2), config
checks, and the choice between `fastpeft.ops.ia3_linear` and plain torch.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from _peft_testing import close, inputs, logits, read_config, read_tensors, seeded_pair, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import ops  # noqa: E402
from fastpeft.tuners.base import BaseTunerLayer  # noqa: E402
from fastpeft.tuners.ia3 import (  # noqa: E402
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    IA3Config, IA3Model,
)
from fastpeft.tuners.ia3 import layer as ia3_layer  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


class Net(nn.Module):
    """Linear with / without bias, Conv1D (8 -> 10), Conv2d 3x3, grouped Conv2d, Conv3d; each input reaches
    several layers so that every input gradient is compared."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.lin_nb = nn.Linear(12, 6, bias=False)
        self.c1d = Conv1D(10, 8)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.gconv = nn.Conv2d(4, 6, 3, groups=2)
        self.conv3 = nn.Conv3d(2, 4, 2)
        with torch.no_grad():
            self.c1d.bias.normal_()

    def forward(self, x, img, vol):
        h = self.lin_nb(torch.tanh(self.lin(x)))
        c = self.c1d(x)
        i = torch.tanh(self.conv(img))
        g = self.gconv(img)
        v = self.conv3(vol)
        return torch.cat([t.flatten(1) for t in (h, c, i, g, v)], dim=1)


GEN = torch.Generator().manual_seed(3)
X = torch.randn(2, 5, 8, generator=GEN)
IMG = torch.randn(2, 4, 5, 5, generator=GEN)
VOL = torch.randn(2, 2, 3, 3, 3, generator=GEN)
ARGS = (X, IMG, VOL)
TARGETS = ["lin", "lin_nb", "c1d", "conv", "gconv", "conv3"]
FEEDFORWARD = {"none": [], "all": TARGETS, "mixed": ["lin_nb", "c1d", "gconv", "conv3"]}


def _kwargs(ff, **extra):
    return {"target_modules": TARGETS, "feedforward_modules": FEEDFORWARD[ff], "init_ia3_weights": False, **extra}


def pair(kwargs, base=None, adapter_name="default", seed=0):
    return seeded_pair(peft.IA3Model, peft.IA3Config(**copy.deepcopy(kwargs)), IA3Model,
                       IA3Config(**copy.deepcopy(kwargs)), Net() if base is None else base, adapter_name, seed)


def _grads(model, *args):
    model.zero_grad()
    args = [a.clone().requires_grad_(True) for a in args]
    model(*args).float().pow(2).mean().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    out.update({f"input{i}": a.grad for i, a in enumerate(args)})
    return out


def _peft_mapping_values(mapping):
    return {k: list(v) for k, v in mapping.items()}


# ---- mappings, structure, outputs, gradients -----------------------------------------------------------


def test_default_mappings_equal_peft():
    from peft.utils import constants

    assert TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING == _peft_mapping_values(
        constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)
    assert TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING == _peft_mapping_values(
        constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING)
    for model_type in ("llama", "mistral", "gpt2", "bert", "t5", "opt", "bloom", "gpt_neox", "falcon"):
        assert model_type in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("ff", list(FEEDFORWARD))
def test_outputs_and_gradients_match_peft(ff, mode):
    theirs, ours = pair(_kwargs(ff))
    for m in (theirs, ours):
        m.train(mode == "train")
    for name in TARGETS:
        t, o = theirs.model.get_submodule(name), ours.model.get_submodule(name)
        assert isinstance(o, BaseTunerLayer) and type(o).__name__ == type(t).__name__
        attrs = ("is_feedforward", "in_features", "out_features", "fan_in_fan_out")
        assert [getattr(o, a) for a in attrs] == [getattr(t, a) for a in attrs], name
        assert o.ia3_l["default"].shape == t.ia3_l["default"].shape
    close(theirs(*ARGS), ours(*ARGS))
    gt, go = _grads(theirs, *ARGS), _grads(ours, *ARGS)
    assert set(gt) == set(go) and any("ia3_l" in k for k in go)
    for k in gt:
        close(gt[k], go[k], tol=1e-5)


def test_vector_shapes_and_default_init():
    _, ours = pair({"target_modules": TARGETS, "feedforward_modules": FEEDFORWARD["mixed"]})
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters() if "ia3_l" in n}
    assert shapes == {
        "model.lin.ia3_l.default": (12, 1), "model.lin_nb.ia3_l.default": (1, 12), "model.c1d.ia3_l.default": (1, 8),
        "model.conv.ia3_l.default": (1, 6, 1, 1), "model.gconv.ia3_l.default": (1, 4, 1, 1),
        "model.conv3.ia3_l.default": (1, 2, 1, 1, 1),
    }
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in ours.named_parameters() if "ia3_l" in n)
    base = Net()
    close(base(*ARGS), IA3Model(copy.deepcopy(base), IA3Config(target_modules=TARGETS, feedforward_modules=[]))(*ARGS))
    assert all(p.requires_grad == ("ia3_l" in n) for n, p in ours.named_parameters())


def test_bfloat16_base_float32_adapters_outputs_gradients_and_merge():
    base = Net().to(torch.bfloat16)
    args = tuple(a.bfloat16() for a in ARGS)
    for ff in ("none", "mixed"):
        kw = _kwargs(ff)
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**copy.deepcopy(kw)))
        torch.manual_seed(0)
        fm = fastpeft.get_peft_model(copy.deepcopy(base), IA3Config(**copy.deepcopy(kw)))
        sp, sf = pm.state_dict(), fm.state_dict()
        assert list(sp) == list(sf) and all(sp[k].dtype == sf[k].dtype and torch.equal(sp[k], sf[k]) for k in sp)
        assert {v.dtype for k, v in sf.items() if "ia3_l" in k} == {torch.float32}
        yp, yf = pm(*args), fm(*args)
        assert yf.dtype == yp.dtype == torch.bfloat16
        close(yp.float(), yf.float(), tol=1e-2)
        gp, gf = _grads(pm, *args), _grads(fm, *args)
        assert set(gp) == set(gf)
        for k in gp:
            assert gp[k].dtype == gf[k].dtype, k
            close(gp[k].float(), gf[k].float(), tol=2e-2)
        pm.merge_adapter()
        fm.merge_adapter()
        for name in TARGETS:
            bp = pm.base_model.model.get_submodule(name).base_layer
            bf = fm.base_model.model.get_submodule(name).base_layer
            assert torch.equal(bp.weight, bf.weight), name
            assert (bp.bias is None) == (bf.bias is None) and (bp.bias is None or torch.equal(bp.bias, bf.bias))
        close(pm(*args).float(), fm(*args).float(), tol=1e-2)


def test_merge_unmerge_round_trip_scales_bias_of_non_feedforward_layers():
    for ff in FEEDFORWARD:
        theirs, ours = pair(_kwargs(ff))
        expected = ours(*ARGS)
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        theirs.merge_adapter()
        ours.merge_adapter()
        for k, v in theirs.state_dict().items():
            assert torch.equal(v, ours.state_dict()[k]), k  # peft's merged weights and biases, bit for bit
        for name in TARGETS:
            layer = ours.model.get_submodule(name)
            bias = layer.get_base_layer().bias
            if bias is not None:
                scaled = not torch.equal(bias, before[f"model.{name}.base_layer.bias"])
                assert scaled == (not layer.is_feedforward), name
        close(expected, ours(*ARGS), tol=1e-5)
        with pytest.warns(UserWarning, match="inaccurate"):
            ours.unmerge_adapter()
        theirs.unmerge_adapter()
        for k, v in ours.state_dict().items():
            close(before[k], v, tol=1e-6)
            assert torch.equal(theirs.state_dict()[k], v), k
        close(expected, ours(*ARGS), tol=1e-5)


def test_safe_merge_refuses_a_broken_adapter():
    _, ours = pair(_kwargs("none"))
    with torch.no_grad():
        ours.model.lin.ia3_l["default"][0, 0] = float("nan")
    weight = ours.model.lin.base_layer.weight.clone()
    with pytest.raises(ValueError, match="adapter default seems to be broken"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(weight, ours.model.lin.base_layer.weight)


def test_several_adapters_product_merge_disable_delete():
    kw_a, kw_b = _kwargs("mixed"), _kwargs("mixed", target_modules=["lin", "lin_nb", "conv", "conv3"],
                                             feedforward_modules=["lin_nb", "conv3"])
    theirs, ours = pair(kw_a, adapter_name="a")
    for m, cfg_cls in ((theirs, peft.IA3Config), (ours, IA3Config)):
        m.peft_config["b"] = cfg_cls(**copy.deepcopy(kw_b))
        torch.manual_seed(5)
        m.inject_adapter(m.model, "b")
    sp, so = theirs.state_dict(), ours.state_dict()
    assert list(sp) == list(so) and all(torch.equal(sp[k], so[k]) for k in sp)
    for m in (theirs, ours):
        m.set_adapter(["a", "b"])
    expected = theirs(*ARGS)
    close(expected, ours(*ARGS))
    gt, go = _grads(theirs, *ARGS), _grads(ours, *ARGS)
    assert set(gt) == set(go) and any(".b" in k for k in go)
    for k in gt:
        close(gt[k], go[k])
    # the product of both vectors
    lin = ours.model.lin
    y = lin.base_layer(X) * (lin.ia3_l["a"] * lin.ia3_l["b"]).flatten()
    close(y, lin(X))
    for m in (theirs, ours):
        m.merge_adapter()
    for k, v in theirs.state_dict().items():
        close(v, ours.state_dict()[k], tol=1e-6)
    close(expected, ours(*ARGS), tol=1e-5)
    ours.unmerge_adapter()
    base_only = copy.deepcopy(ours).unload()
    ours.disable_adapter_layers()
    close(base_only(*ARGS), ours(*ARGS))
    ours.enable_adapter_layers()
    close(expected, ours(*ARGS))
    ours.set_adapter("b")
    theirs.unmerge_adapter()
    theirs.set_adapter("b")
    close(theirs(*ARGS), ours(*ARGS))
    ours.delete_adapter("b")
    theirs.delete_adapter("b")
    assert list(theirs.state_dict()) == list(ours.state_dict())
    close(theirs(*ARGS), ours(*ARGS))


def test_disable_unload_and_merge_and_unload():
    base = Net()
    fm = fastpeft.get_peft_model(copy.deepcopy(base), IA3Config(**_kwargs("mixed")))
    expected = fm(*ARGS)
    assert not torch.allclose(expected, base(*ARGS), atol=1e-4)
    with fm.disable_adapter():
        close(base(*ARGS), fm(*ARGS))
    close(expected, fm(*ARGS))
    merged = copy.deepcopy(fm).merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    close(expected, merged(*ARGS), tol=1e-5)
    unloaded = copy.deepcopy(fm).unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    close(base(*ARGS), unloaded(*ARGS), tol=0)


def test_add_weighted_adapter_equals_peft():
    kw = _kwargs("mixed")
    theirs, ours = pair(kw, adapter_name="a")
    for m, cfg_cls in ((theirs, peft.IA3Config), (ours, IA3Config)):
        m.peft_config["b"] = cfg_cls(**copy.deepcopy(kw))
        torch.manual_seed(7)
        m.inject_adapter(m.model, "b")
        m.add_weighted_adapter(["a", "b"], [0.3, 0.7], "ab")
        assert not any(p.requires_grad for n, p in m.named_parameters() if ".ab" in n)  # not trainable until set
        m.set_adapter("ab")
    sp, so = theirs.state_dict(), ours.state_dict()
    assert list(sp) == list(so)
    for k in sp:
        close(sp[k], so[k], tol=1e-6)
    close(theirs(*ARGS), ours(*ARGS))


# ---- checkpoints ----------------------------------------------------------------------------------------


def _randomize(model, seed=11):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _comparable(d):
    d = {k: v for k, v in d.items() if k != "peft_version"}
    for k in ("target_modules", "exclude_modules", "feedforward_modules"):
        if isinstance(d.get(k), list):
            d[k] = sorted(d[k])
    return d


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_default_targets_outputs_gradients_and_checkpoints_both_ways(which, tmp_path):
    base = tiny_llama() if which == "llama" else tiny_gpt2()
    kw = {"task_type": "CAUSAL_LM"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kw))
        torch.manual_seed(0)
        fm = fastpeft.get_peft_model(copy.deepcopy(base), IA3Config(**kw))
    assert type(fm.base_model).__name__ == "IA3Model"
    assert fm.peft_config["default"].target_modules == pm.peft_config["default"].target_modules
    assert fm.peft_config["default"].feedforward_modules == pm.peft_config["default"].feedforward_modules
    sp, sf = pm.state_dict(), fm.state_dict()
    assert list(sp) == list(sf) and all(torch.equal(sp[k], sf[k]) for k in sp)
    layers = [m for m in fm.modules() if isinstance(m, ia3_layer.Linear)]
    assert len(layers) == (6 if which == "llama" else 4) and any(m.is_feedforward for m in layers)
    if which == "gpt2":
        assert all(m.fan_in_fan_out for m in layers)
    _randomize(pm)
    fm.load_state_dict(pm.state_dict())
    batch = inputs()
    for m in (pm, fm):
        m.train()
        m.zero_grad()
        m(**batch).logits.pow(2).mean().backward()
    gp = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    gf = {n: p.grad for n, p in fm.named_parameters() if p.requires_grad}
    assert set(gp) == set(gf) and gf and all(".ia3_l." in n for n in gf)
    for n in gp:
        close(gp[n], gf[n], tol=1e-4)
    pm.eval()
    fm.eval()
    expected = logits(pm, batch)
    close(expected, logits(fm, batch), tol=1e-4)

    pdir, fdir = str(tmp_path / "peft"), str(tmp_path / "fast")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(pdir)
        fm.save_pretrained(fdir)
    pt, ft = read_tensors(pdir), read_tensors(fdir)
    assert sorted(pt) == sorted(ft) and ft and all(k.endswith(".ia3_l") for k in ft)
    for k in pt:
        assert torch.equal(pt[k], ft[k]), k
    assert _comparable(read_config(fdir)) == _comparable(read_config(pdir))
    assert read_config(fdir)["peft_type"] == "IA3"

    loaded_f = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), pdir)  # peft -> fastpeft
    loaded_p = peft.PeftModel.from_pretrained(copy.deepcopy(base), fdir)  # fastpeft -> peft
    assert isinstance(loaded_f.peft_config["default"], IA3Config)
    close(expected, logits(loaded_f, batch), tol=1e-4)
    close(expected, logits(loaded_p.eval(), batch), tol=1e-4)
    assert not any(p.requires_grad for p in loaded_f.parameters())
    merged = loaded_f.merge_and_unload()
    close(expected, logits(merged, batch), tol=1e-4)


def test_modules_to_save_checkpoint(tmp_path):
    base = Net()
    kw = {**_kwargs("mixed", target_modules=["lin", "lin_nb", "c1d", "conv3"],
                    feedforward_modules=["lin_nb"]), "modules_to_save": ["conv"]}
    fm = fastpeft.get_peft_model(copy.deepcopy(base), IA3Config(**kw))
    with torch.no_grad():
        fm.base_model.model.conv.modules_to_save["default"].weight.mul_(2)
    fm.eval()
    expected = fm(*ARGS)
    fm.save_pretrained(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(expected, pm(*ARGS))
    back = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(expected, back(*ARGS))


# ---- configs --------------------------------------------------------------------------------------------


def test_config_fields_defaults_and_json_equal_peft(tmp_path):
    ours, theirs = IA3Config(), peft.IA3Config()
    assert ours.to_dict().keys() == theirs.to_dict().keys()
    for k, v in theirs.to_dict().items():
        if k != "peft_version":
            assert ours.to_dict()[k] == (v.value if hasattr(v, "value") else v), k
    kw = {"target_modules": ["a", "b"], "exclude_modules": ["c"], "feedforward_modules": ["b"],
          "fan_in_fan_out": True, "modules_to_save": ["head"], "init_ia3_weights": False, "task_type": "CAUSAL_LM"}
    peft.IA3Config(**kw).save_pretrained(str(tmp_path / "p"))
    IA3Config(**kw).save_pretrained(str(tmp_path / "f"))
    assert _comparable(read_config(str(tmp_path / "p"))) == _comparable(read_config(str(tmp_path / "f")))
    loaded = fastpeft.PeftConfig.from_pretrained(str(tmp_path / "p"))
    assert isinstance(loaded, IA3Config) and loaded.feedforward_modules == {"b"}
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "f")).to_dict()["peft_type"] == "IA3"
    assert IA3Config(target_modules=".*lin", feedforward_modules=".*nb").feedforward_modules == ".*nb"


@pytest.mark.parametrize("kwargs, match", [
    ({"target_modules": ["a"], "feedforward_modules": ["b"]},
     r"`feedforward_modules` should be a subset of `target_modules`: \['b'\]"),
    ({"target_modules": ["a", "b"], "feedforward_modules": ["a", "c"]}, "subset"),
])
def test_feedforward_not_subset_is_refused_as_peft(kwargs, match):
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(**kwargs)
    with pytest.raises(ValueError, match=match):
        IA3Config(**kwargs)


def test_bad_configs_and_unsupported_layers_raise_clear_errors():
    with pytest.raises(TypeError, match="init_ia3_weights"):
        IA3Config(init_ia3_weights="yes")
    with pytest.raises(ValueError, match="feedforward_modules"):
        IA3Model(Net(), IA3Config(target_modules=["lin"]))  # custom model: no default feedforward_modules
    with pytest.raises(ValueError, match="target_modules"):
        IA3Model(Net(), IA3Config(feedforward_modules=[]))
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(5, 4))
    with pytest.raises(ValueError, match="not supported"):
        IA3Model(model, IA3Config(target_modules=["1"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="not found"):
        IA3Model(Net(), IA3Config(target_modules=["nope"], feedforward_modules=[]))


def test_feedforward_matching_is_peft_suffix_rule_and_regex():
    net = Net()
    for kw in ({"target_modules": ["lin", "lin_nb", "nb"], "feedforward_modules": ["nb"]},  # no `.` boundary
               {"target_modules": "lin.*", "feedforward_modules": "lin"}):  # regex: full match
        theirs, ours = pair({**kw, "init_ia3_weights": False}, base=net)
        got = [ours.model.get_submodule(n).is_feedforward for n in ("lin", "lin_nb")]
        assert got == [theirs.model.get_submodule(n).is_feedforward for n in ("lin", "lin_nb")]
        assert got == ([False, True] if isinstance(kw["target_modules"], list) else [True, False])


def test_registered_in_fastpeft():
    """Passes once the tuner is registered (fastpeft._LAZY, config._CONFIG_MODULES, PEFT_TYPE_TO_TUNER_MAPPING)."""
    from fastpeft.config import _CONFIG_MODULES, PeftType
    from fastpeft.tuners import PEFT_TYPE_TO_TUNER_MAPPING

    assert fastpeft.IA3Config is IA3Config and fastpeft.IA3Model is IA3Model
    assert _CONFIG_MODULES[PeftType.IA3] == "fastpeft.tuners.ia3.config"
    assert PEFT_TYPE_TO_TUNER_MAPPING["IA3"] is IA3Model


# ---- fused op choice -------------------------------------------------------------------------------------


def _reference_ia3_linear(calls):
    """The op's contract in plain torch: y = (x * s) W^T + b (scale_input) or (x W^T + b) * s; W gets no grad."""

    def op(x, weight, bias, scale, scale_input):
        calls.append((x.shape, tuple(weight.shape), None if bias is None else tuple(bias.shape), tuple(scale.shape),
                      scale.dtype, scale_input))
        w = weight.detach()
        if scale_input:
            return torch.nn.functional.linear((x * scale).to(x.dtype), w, bias)
        y = torch.nn.functional.linear(x, w, bias)
        return (y * scale).to(y.dtype)

    return op


@pytest.mark.parametrize("ff", ["none", "all"])
def test_fused_op_is_called_with_peft_semantics_when_allowed(ff, monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "ia3_linear", _reference_ia3_linear(calls), raising=False)
    theirs, ours = pair(_kwargs(ff))
    close(theirs(*ARGS), ours(*ARGS))
    gt, go = _grads(theirs, *ARGS), _grads(ours, *ARGS)
    for k in gt:
        close(gt[k], go[k])
    is_ff = ff == "all"
    assert calls[:3] == [
        (X.shape, (12, 8), (12,), (8 if is_ff else 12,), torch.float32, is_ff),  # lin
        (torch.Size([2, 5, 12]), (6, 12), None, (12 if is_ff else 6,), torch.float32, is_ff),  # lin_nb
        (X.shape, (10, 8), (10,), (8 if is_ff else 10,), torch.float32, is_ff),  # Conv1D as [out, in]
    ]
    # a trainable base weight, or extra arguments: plain torch
    calls.clear()
    ours.model.lin.base_layer.weight.requires_grad_(True)
    ours.model.lin(X)
    assert calls == []


def test_fused_op_with_bf16_input_and_float32_adapter(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "ia3_linear", _reference_ia3_linear(calls), raising=False)
    base = Net().to(torch.bfloat16)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), IA3Config(**_kwargs("mixed")))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**_kwargs("mixed")))
    pm.load_state_dict(fm.state_dict())
    args = tuple(a.bfloat16() for a in ARGS)
    close(pm(*args).float(), fm(*args).float(), tol=1e-2)
    assert calls and all(c[4] == torch.float32 for c in calls)


@pytest.mark.skipif(not hasattr(ops, "ia3_linear"), reason="this build has no fastpeft.ops.ia3_linear")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_fused_op_matches_peft(dtype):
    base = Net().to(dtype)
    args = tuple(a.to(dtype) for a in ARGS)
    for ff in ("none", "mixed"):
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**_kwargs(ff)))
        torch.manual_seed(0)
        fm = fastpeft.get_peft_model(copy.deepcopy(base), IA3Config(**_kwargs(ff)))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        close(pm(*args).float(), fm(*args).float(), tol=tol)
        gp, gf = _grads(pm, *args), _grads(fm, *args)
        for k in gp:
            close(gp[k].float(), gf[k].float(), tol=tol)
