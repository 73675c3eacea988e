"""LoRA / DoRA tuner conformance with peft (the oracle): same structure and state-dict keys, same outputs
and gradients, same merging, same module selection, same initialisations."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import fastpeft.tuners.lora.layer as lora_layer  # noqa: E402
from fastpeft.tuners.base import BaseTunerLayer, ModulesToSaveWrapper  # noqa: E402
from fastpeft.tuners.lora.config import LoraConfig  # noqa: E402
from fastpeft.tuners.lora.model import LoraModel  # noqa: E402


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---- models ---------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """One of each supported layer kind, all on the forward path."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 16)
        self.c1d = Conv1D(16, 12)  # transformers' Conv1D(nf=out, nx=in)
        self.conv1 = nn.Conv1d(16, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.emb(x)
        a = torch.tanh(self.lin(h) + self.c1d(h))
        c = self.conv1(a.transpose(1, 2))
        d = self.conv2(c.unsqueeze(-1).expand(-1, -1, -1, 3))
        return torch.cat([self.head(a).flatten(1), d.flatten(1)], 1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8, bias=False)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, h):
        return h + self.mlp(self.q(h) * torch.sigmoid(self.v(h)))


class Stack(nn.Module):
    """Numbered layers, for target matching (layers_to_transform / patterns)."""

    def __init__(self, n=3):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.backbone = nn.Module()
        self.backbone.layers = nn.ModuleList(Block() for _ in range(n))  # keys "backbone.layers.<i>...."
        self.lm_head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.backbone.layers:
            h = layer(h)
        return self.lm_head(h)


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


X_TINY = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(3))
X_STACK = torch.randint(0, 10, (2, 4), generator=torch.Generator().manual_seed(4))


def randomize(model, seed=123):
    """Random adapter weights (magnitudes near 1) so that adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.rand(p.shape, generator=g))
            elif "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def pair(kwargs, base=None, adapter_name="default", random=True):
    """(peft LoraModel, fastpeft LoraModel) on copies of the same base, with peft's adapter weights copied
    into ours by state-dict key (the key sets must be identical)."""
    base = Tiny().eval() if base is None else base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.tuners.lora.LoraModel(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kwargs)), adapter_name)
        ours = LoraModel(copy.deepcopy(base), LoraConfig(**copy.deepcopy(kwargs)), adapter_name)
    if random:
        randomize(theirs)
    sd_theirs, sd_ours = theirs.state_dict(), ours.state_dict()
    assert set(sd_theirs) == set(sd_ours), sorted(set(sd_theirs) ^ set(sd_ours))
    for k in sd_theirs:
        assert sd_theirs[k].shape == sd_ours[k].shape, k
    ours.load_state_dict(sd_theirs)
    return theirs.eval(), ours.eval()  # new adapter layers start in training mode (as in peft)


def close(a, b, tol=1e-5):
    scale = max(1.0, a.abs().max().item())
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()


LAYERS = ["lin", "c1d", "conv1", "conv2", "emb"]
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True, "r": 3, "lora_alpha": 5}}


# ---- structure, forward, backward -----------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layer", LAYERS)
def test_forward_and_gradients_match_peft(layer, variant):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": [layer], **VARIANTS[variant]}
    theirs, ours = pair(kwargs)
    adapted = ours.model.get_submodule(layer)
    assert isinstance(adapted, BaseTunerLayer)
    assert type(adapted).__name__ == type(theirs.model.get_submodule(layer)).__name__
    y_theirs, y_ours = theirs(X_TINY), ours(X_TINY)
    close(y_theirs, y_ours)

    grads = {}
    for name, model in (("theirs", theirs), ("ours", ours)):
        model.zero_grad()
        model(X_TINY).pow(2).mean().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads["theirs"]) == set(grads["ours"])
    assert grads["ours"], "no trainable adapter parameters"
    for n in grads["theirs"]:
        close(grads["theirs"][n], grads["ours"][n], tol=1e-4)


def test_all_layer_kinds_at_once_dora_keys_and_scaling():
    theirs, ours = pair({"r": 4, "lora_alpha": 6, "target_modules": LAYERS, "use_dora": True})
    assert any(k.endswith("lora_magnitude_vector.default.weight") for k in ours.state_dict())
    for layer in LAYERS:
        t, o = theirs.model.get_submodule(layer), ours.model.get_submodule(layer)
        assert o.scaling == t.scaling and o.r == t.r and o.lora_alpha == t.lora_alpha
        assert o.merged_adapters == [] and not o.merged and not o.disable_adapters
        assert o.active_adapters == ["default"]
    close(theirs(X_TINY), ours(X_TINY))


def test_linear_forward_goes_through_the_fused_ops(monkeypatch):
    import fastpeft.ops

    calls = []
    for name in ("lora_linear", "dora_linear"):
        real = getattr(fastpeft.ops, name)
        monkeypatch.setattr(fastpeft.ops, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    for use_dora in (False, True):
        _, ours = pair({"target_modules": ["lin", "c1d"], "use_dora": use_dora})
        ours(X_TINY)
    assert calls == ["lora_linear"] * 2 + ["dora_linear"] * 2


def test_wrapper_interface():
    base = Tiny()
    model = LoraModel(base, LoraConfig(target_modules=["lin"]))
    assert model.model is base and isinstance(base.lin, lora_layer.Linear)
    assert set(model.peft_config) == {"default"} and base.peft_config is model.peft_config
    assert model.active_adapters == ["default"]  # active_adapter: ["default"] after injection, as in peft
    assert model.emb is base.emb  # __getattr__ forwards to the model
    assert torch.equal(model(X_TINY), base(X_TINY))
    assert model.targeted_module_names == ["lin"]


def test_fan_in_fan_out_forced_for_conv1d():
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = LoraModel(Tiny(), LoraConfig(target_modules=["c1d"]))
    assert model.model.c1d.fan_in_fan_out and model.model.c1d.is_target_conv_1d_layer
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = LoraModel(Tiny(), LoraConfig(target_modules=["lin"], fan_in_fan_out=True))
    assert not model.model.lin.fan_in_fan_out


def test_lora_bias_forward_and_merge():
    theirs, ours = pair({"target_modules": ["lin", "conv2"], "lora_bias": True})
    assert "model.lin.lora_B.default.bias" in ours.state_dict()
    y = theirs(X_TINY)
    close(y, ours(X_TINY))
    ours.merge_adapter()
    close(y, ours(X_TINY))
    ours.unmerge_adapter()
    close(y, ours(X_TINY))


def test_dropout_train_vs_eval():
    theirs, ours = pair({"target_modules": ["lin", "conv1"], "lora_dropout": 0.5})
    assert isinstance(ours.model.lin.lora_dropout["default"], nn.Dropout)
    close(theirs(X_TINY), ours(X_TINY))  # eval: no dropout
    ours.train()
    torch.manual_seed(1)
    y1 = ours(X_TINY)
    assert not torch.allclose(y1, ours.eval()(X_TINY))  # dropout acts in training


def test_unsupported_module_raises():
    base = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="not supported"):
        LoraModel(base, LoraConfig(target_modules=["0"]))


def test_unsupported_peft_features_raise():
    with pytest.raises(NotImplementedError, match="megatron_config"):
        LoraModel(Tiny(), LoraConfig(target_modules=["lin"], megatron_config={"num_layers": 2}))
    with pytest.raises(NotImplementedError, match="kasa_config"):
        LoraModel(Tiny(), LoraConfig(target_modules=["lin"], kasa_config={"beta": 0.1}))


# ---- merging --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("layer", LAYERS)
def test_merge_unmerge_unload(layer, variant):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": [layer], **VARIANTS[variant]}
    base = Tiny().eval()
    theirs, ours = pair(kwargs, base=base)
    base_out = ours.model.get_submodule(layer).get_base_layer()
    y = theirs(X_TINY)
    ours.merge_adapter()
    assert ours.model.get_submodule(layer).merged
    close(y, ours(X_TINY))
    theirs.merge_adapter()
    close(theirs.model.get_submodule(layer).get_base_layer().weight, base_out.weight)
    ours.unmerge_adapter()
    close(y, ours(X_TINY))

    merged = copy.deepcopy(ours).merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert type(merged.get_submodule(layer)) is type(base_out)
    close(y, merged(X_TINY))

    unloaded = ours.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert not hasattr(unloaded, "peft_config")
    close(base(X_TINY), unloaded(X_TINY))


def test_merge_two_dora_adapters_matches_peft():
    base = Tiny().eval()
    theirs, ours = pair({"target_modules": ["lin", "conv2", "emb"], "use_dora": True}, base=base)
    for model, cfg_cls in ((theirs, peft.LoraConfig), (ours, LoraConfig)):
        model.peft_config["other"] = cfg_cls(target_modules=["lin", "conv2", "emb"], use_dora=True, r=2)
        model.inject_adapter(model.model, "other")
    randomize(theirs, seed=5)
    ours.load_state_dict(theirs.state_dict())
    theirs.merge_adapter(["default", "other"])
    ours.merge_adapter(["default", "other"])
    for layer in ("lin", "conv2", "emb"):
        close(theirs.model.get_submodule(layer).weight, ours.model.get_submodule(layer).weight)
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    close(base.lin.weight, ours.model.lin.weight)


def test_safe_merge_raises_on_nan_naming_adapter():
    model = LoraModel(Tiny(), LoraConfig(target_modules=["lin"], init_lora_weights=False), "broken")
    with torch.no_grad():
        model.model.lin.lora_B["broken"].weight[0, 0] = float("nan")
    before = model.model.lin.weight.clone()
    with pytest.raises(ValueError, match="broken"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(before, model.model.lin.weight) and not model.model.lin.merged
    with pytest.raises(ValueError, match="broken"):
        model.merge_and_unload(safe_merge=True)


def test_disable_and_enable_adapter_layers():
    base = Tiny().eval()
    theirs, ours = pair({"target_modules": LAYERS, "use_dora": True}, base=base)
    y = ours(X_TINY)
    ours.disable_adapter_layers()
    close(base(X_TINY), ours(X_TINY))
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)
    ours.enable_adapter_layers()
    close(y, ours(X_TINY))
    assert all(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)
    ours.merge_adapter()  # disabling a merged model unmerges it
    ours.disable_adapter_layers()
    close(base(X_TINY), ours(X_TINY))


# ---- several adapters -----------------------------------------------------------------------------


def _add(model, cfg_cls, name, **kwargs):
    model.peft_config[name] = cfg_cls(**kwargs)
    model.inject_adapter(model.model, name)


def test_two_adapters_set_and_delete():
    theirs, ours = pair({"target_modules": ["lin", "c1d", "conv1", "emb"]})
    for model, cfg_cls in ((theirs, peft.LoraConfig), (ours, LoraConfig)):
        _add(model, cfg_cls, "other", target_modules=["lin", "conv2"], r=2, lora_alpha=4)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    randomize(theirs, seed=9)
    ours.load_state_dict(theirs.state_dict())
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(theirs) == trainable(ours)  # a new adapter is not trainable until activated
    close(theirs(X_TINY), ours(X_TINY))

    for active in ("other", ["default", "other"], "default"):
        theirs.set_adapter(active)
        ours.set_adapter(active)
        assert ours.active_adapter == active and ours.model.lin.active_adapters == theirs.model.lin.active_adapters
        close(theirs(X_TINY), ours(X_TINY))
        assert trainable(theirs) == trainable(ours)

    ours.set_adapter(["default", "other"])
    theirs.set_adapter(["default", "other"])
    theirs.delete_adapter("default")
    ours.delete_adapter("default")
    assert set(theirs.state_dict()) == set(ours.state_dict())
    assert ours.active_adapters == theirs.active_adapters == ["other"]
    assert list(ours.peft_config) == ["other"]
    close(theirs(X_TINY), ours(X_TINY))
    with pytest.raises(ValueError, match="does not exist"):
        ours.delete_adapter("default")


def test_delete_merged_adapter_raises():
    model = LoraModel(Tiny(), LoraConfig(target_modules=["lin"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("default")


def test_only_one_adapter_with_bias():
    model = LoraModel(Tiny(), LoraConfig(target_modules=["lin"], bias="all"))
    model.peft_config["b"] = LoraConfig(target_modules=["lin"], bias="lora_only")
    with pytest.raises(ValueError, match="bias"):
        model.inject_adapter(model.model, "b")


# ---- trainability, modules_to_save ----------------------------------------------------------------


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_parameters_match_peft(bias):
    theirs, ours = pair({"target_modules": ["lin", "conv1", "emb"], "bias": bias, "modules_to_save": ["head"]})
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(theirs) == trainable(ours)
    if bias == "lora_only":
        assert ours.model.lin.base_layer.bias.requires_grad and not ours.model.head.original_module.bias.requires_grad


def test_modules_to_save():
    base = Tiny().eval()
    theirs, ours = pair({"target_modules": ["lin"], "modules_to_save": ["head"]}, base=base)
    assert isinstance(ours.model.head, ModulesToSaveWrapper)
    assert "model.head.modules_to_save.default.weight" in ours.state_dict()
    assert "model.head.original_module.weight" in ours.state_dict()
    close(theirs(X_TINY), ours(X_TINY))
    assert ours.model.head.weight is ours.model.head.modules_to_save["default"].weight  # attribute forwarding
    ours.disable_adapter_layers()
    close(base(X_TINY), ours(X_TINY))
    ours.enable_adapter_layers()
    merged = copy.deepcopy(ours).merge_and_unload()
    assert isinstance(merged.head, nn.Linear)
    close(theirs(X_TINY), merged(X_TINY))


# ---- target selection -----------------------------------------------------------------------------


def _targeted(model):
    return sorted(n for n, m in model.model.named_modules() if isinstance(m, (BaseTunerLayer, peft.tuners.tuners_utils.BaseTunerLayer)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["q", "v"]},
        {"target_modules": ["layers.1.q", "mlp.0"]},
        {"target_modules": r".*\.(q|mlp\.2)"},
        {"target_modules": "all-linear"},
        {"target_modules": "all-linear", "exclude_modules": ["v", "lm_head"]},
        {"target_modules": ["q", "v", "mlp.0", "mlp.2"], "exclude_modules": r".*layers\.0\..*"},
        {"target_modules": ["q", "v"], "layers_to_transform": [0, 2]},
        {"target_modules": ["q", "v"], "layers_to_transform": 1, "layers_pattern": "layers"},
        {"target_modules": ["q", "v"], "layers_to_transform": [1], "layers_pattern": ["blocks", "layers"]},
        {"target_modules": ["q", "v", "embed"], "modules_to_save": ["v"]},
        {"target_modules": ["q", "v", "mlp.2"], "rank_pattern": {"q": 2, r"layers\.1\.v": 5}, "alpha_pattern": {"mlp.2": 3}},
    ],
)
def test_target_selection_matches_peft(kwargs):
    theirs, ours = pair(kwargs, base=Stack().eval())
    assert _targeted(theirs) == _targeted(ours)
    assert theirs.targeted_module_names == ours.targeted_module_names
    for name in _targeted(ours):
        t, o = theirs.model.get_submodule(name), ours.model.get_submodule(name)
        assert (o.r, o.lora_alpha, o.scaling) == (t.r, t.lora_alpha, t.scaling), name
    close(theirs(X_STACK), ours(X_STACK))


def test_all_linear_skips_output_layer_of_transformers_model():
    theirs, ours = pair({"target_modules": "all-linear"}, base=tiny_llama())
    assert _targeted(theirs) == _targeted(ours)
    assert "lm_head" not in _targeted(ours) and "model.layers.0.mlp.down_proj" in _targeted(ours)


def test_default_target_modules_for_known_model_type():
    theirs, ours = pair({}, base=tiny_llama())
    assert _targeted(ours) == _targeted(theirs)
    assert all(n.endswith(("q_proj", "v_proj")) for n in _targeted(ours))
    assert ours.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    ids = torch.randint(0, 40, (1, 6))
    close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
    with pytest.raises(ValueError, match="target_modules"):
        LoraModel(Stack(), LoraConfig())


def test_no_match_raises():
    with pytest.raises(ValueError, match="not found"):
        LoraModel(Stack(), LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoraModel(Stack(), LoraConfig(target_modules=["q"], layers_to_transform=[7]))
    with pytest.raises(ValueError, match="exclude_modules"):
        LoraModel(Stack(), LoraConfig(target_modules=["q"], exclude_modules=["q"]))
    with pytest.raises(ValueError, match="All modules were excluded"):
        LoraModel(nn.Sequential(nn.Linear(2, 2)), LoraConfig(target_modules=["0"], exclude_modules=["0"]))


# ---- initialisation -------------------------------------------------------------------------------


def _fresh_pair(kwargs, base_fn=Tiny, seed=0):
    base = base_fn().eval()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.tuners.lora.LoraModel(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kwargs)), "default")
    torch.manual_seed(seed)
    ours = LoraModel(copy.deepcopy(base), LoraConfig(**copy.deepcopy(kwargs)), "default")
    return base, theirs, ours


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_default_inits_match_peft(init):
    base, theirs, ours = _fresh_pair({"target_modules": LAYERS, "init_lora_weights": init, "r": 4})
    # same construction order as peft: with the same seed the draws are identical
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)
    if init is False:
        assert not torch.allclose(base(X_TINY), ours(X_TINY))  # not an identity adapter
        assert ours.model.lin.lora_B["default"].weight.abs().sum() > 0
    else:
        close(base(X_TINY), ours(X_TINY))
        assert torch.count_nonzero(ours.model.lin.lora_B["default"].weight) == 0
        assert torch.count_nonzero(ours.model.emb.lora_embedding_A["default"]) == 0


def test_init_distributions():
    lin = nn.Linear(1024, 16)
    layer = lora_layer.Linear.from_linear(lin, r=64)
    bound = 1 / math.sqrt(1024)  # kaiming_uniform(a=sqrt(5))
    a = layer.lora_A["default"].weight
    assert a.abs().max() <= bound and a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    layer = lora_layer.Linear.from_linear(nn.Linear(1024, 16), r=64, init_lora_weights="gaussian")
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 64, rel=0.05)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("layer", ["lin", "c1d"])
def test_pissa_olora_keep_outputs_and_match_peft_residual(init, layer):
    if init == "olora" and layer == "c1d":
        pytest.skip("peft factorises Conv1D's [in, out] weight untransposed; shapes only fit square layers")
    kwargs = {"target_modules": [layer], "init_lora_weights": init, "r": 4, "lora_alpha": 6}
    base, theirs, ours = _fresh_pair(kwargs)
    close(base(X_TINY), ours(X_TINY), tol=1e-4)
    w_theirs = theirs.model.get_submodule(layer).get_base_layer().weight
    w_ours = ours.model.get_submodule(layer).get_base_layer().weight
    assert not torch.allclose(w_ours, base.get_submodule(layer).weight)  # the principal part moved out
    tol = 5e-2 if "niter" in init else 1e-4  # randomized SVD
    torch.testing.assert_close(w_ours, w_theirs, atol=tol, rtol=tol)
    delta = ours.model.get_submodule(layer).get_delta_weight("default")
    torch.testing.assert_close(w_ours + delta, base.get_submodule(layer).weight, atol=1e-4, rtol=1e-4)


def test_pissa_with_rslora_and_rank_pattern():
    kwargs = {"target_modules": ["lin", "c1d"], "init_lora_weights": "pissa", "use_rslora": True,
              "rank_pattern": {"c1d": 2}}
    base, theirs, ours = _fresh_pair(kwargs)
    close(base(X_TINY), ours(X_TINY), tol=1e-4)
    for layer in ("lin", "c1d"):
        torch.testing.assert_close(ours.model.get_submodule(layer).weight, theirs.model.get_submodule(layer).weight,
                                   atol=1e-4, rtol=1e-4)


def test_pissa_rejected_on_conv_and_embedding():
    with pytest.raises(ValueError, match="pissa"):
        LoraModel(Tiny(), LoraConfig(target_modules=["conv1"], init_lora_weights="pissa"))


def test_dora_magnitude_init_matches_peft():
    base, theirs, ours = _fresh_pair({"target_modules": LAYERS, "use_dora": True, "init_lora_weights": False})
    for k, v in theirs.state_dict().items():
        if "lora_magnitude_vector" in k:
            torch.testing.assert_close(ours.state_dict()[k], v, msg=k)
    lin_norm = torch.linalg.norm(base.lin.weight + ours.model.lin.get_delta_weight("default"), dim=1)
    torch.testing.assert_close(ours.model.lin.lora_magnitude_vector["default"].weight, lin_norm)


# ---- fastpeft.nn ----------------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_nn_lora_linear_from_linear(use_dora):
    from fastpeft.nn import LoraLinear

    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    x = torch.randn(3, 4, 12)
    y0 = linear(x)
    layer = LoraLinear.from_linear(linear, r=4, lora_alpha=8, use_dora=use_dora)
    assert layer.get_base_layer() is linear and not linear.weight.requires_grad
    close(y0, layer(x))  # B = 0: identity at init
    randomize(layer)
    expected = peft.tuners.lora.Linear(copy.deepcopy(linear), "default", config=peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora), r=4, lora_alpha=8)
    expected.load_state_dict(layer.state_dict())
    y = layer(x)
    close(expected(x), y)
    y.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None
    layer.merge()
    close(y, layer(x))
    layer.unmerge()
    close(y, layer(x))
    conv1d = LoraLinear.from_linear(Conv1D(10, 12), r=2)
    assert conv1d.fan_in_fan_out
    with pytest.raises(TypeError):
        LoraLinear.from_linear(nn.Conv1d(2, 2, 1))


# ---- precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_half_precision_and_autocast_match_peft(use_dora):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), Conv1D(8, 16))
    kwargs = {"target_modules": ["0", "2"], "use_dora": use_dora, "init_lora_weights": False}
    x = torch.randn(3, 16)

    theirs, ours = pair(kwargs, base=copy.deepcopy(base).to(torch.bfloat16), random=False)
    assert ours.model[0].lora_A["default"].weight.dtype == torch.bfloat16  # adapters follow the base dtype
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(ours(xb), theirs(xb), atol=1e-2, rtol=1e-2)
    theirs._cast_adapter_dtype("default")
    ours._cast_adapter_dtype("default")  # peft's autocast_adapter_dtype: fp32 adapters on a bf16 base
    assert ours.model[0].lora_A["default"].weight.dtype == torch.float32
    y = ours(xb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, theirs(xb), atol=1e-2, rtol=1e-2)

    theirs, ours = pair(kwargs, base=base, random=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_theirs, y_ours = theirs(x), ours(x)
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("use_dora", [False, True])
def test_gradients_reach_trainable_base_bias_and_weight(use_dora):
    """bias="all" and an unfrozen base weight: the fused path must give the base the same gradients as peft."""
    theirs, ours = pair({"target_modules": ["lin", "c1d", "conv1"], "bias": "all", "use_dora": use_dora})
    for model in (theirs, ours):
        model.model.lin.base_layer.weight.requires_grad_(True)
    grads = {}
    for name, model in (("theirs", theirs), ("ours", ours)):
        model(X_TINY).pow(2).mean().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads["theirs"]) == set(grads["ours"])
    assert "model.lin.base_layer.bias" in grads["ours"] and "model.lin.base_layer.weight" in grads["ours"]
    for n in grads["theirs"]:
        close(grads["theirs"][n], grads["ours"][n], tol=1e-4)


def test_training_with_dropout_backpropagates():
    theirs, ours = pair({"target_modules": ["lin", "c1d"], "lora_dropout": 0.3, "use_dora": True})
    ours.train()
    ours(X_TINY).pow(2).mean().backward()
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_set_requires_grad():
    theirs, ours = pair({"target_modules": ["lin", "emb"], "modules_to_save": ["head"]})
    for model in (theirs, ours):
        model.set_requires_grad("default", requires_grad=False)
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs) == []
    for model in (theirs, ours):
        model.set_requires_grad(["default"], requires_grad=True)
    assert trainable(ours) == trainable(theirs) != []


def test_package_exports():
    # the package __init__ files (run only once the editable install knows them)
    import importlib

    lora = importlib.import_module("fastpeft.tuners.lora")
    if getattr(lora, "__file__", None) is None:
        pytest.skip("stale editable install: fastpeft.tuners.lora is seen as a namespace package; reinstall fastpeft")
    assert lora.LoraModel is LoraModel and lora.LoraConfig is LoraConfig
    tuners = importlib.import_module("fastpeft.tuners")
    assert tuners.PEFT_TYPE_TO_TUNER_MAPPING["LORA"] is LoraModel
    import fastpeft

    assert fastpeft.LoraModel is LoraModel and fastpeft.LoraConfig is LoraConfig


def test_inject_from_state_dict_keys():
    base = Stack().eval()
    source = LoraModel(copy.deepcopy(base), LoraConfig(target_modules=["q"], layers_to_transform=[1]))
    keys = {k.removeprefix("model."): v for k, v in source.state_dict().items() if "lora_" in k}
    ours = LoraModel(copy.deepcopy(base), LoraConfig(target_modules=["q", "v"]), state_dict=keys)
    assert _targeted(ours) == _targeted(source) == ["backbone.layers.1.q"]


def test_merge_and_unload_subset_of_adapters():
    base = Tiny().eval()
    theirs, ours = pair({"target_modules": ["lin", "conv1"]}, base=base)
    for model, cfg_cls in ((theirs, peft.LoraConfig), (ours, LoraConfig)):
        _add(model, cfg_cls, "other", target_modules=["lin"], r=2)
    randomize(theirs, seed=11)
    ours.load_state_dict(theirs.state_dict())
    merged_theirs = theirs.merge_and_unload(adapter_names=["other"])
    merged_ours = ours.merge_and_unload(adapter_names=["other"])
    close(merged_theirs(X_TINY), merged_ours(X_TINY))
    close(merged_ours.lin.weight, merged_theirs.lin.weight)
    close(merged_ours.conv1.weight, base.conv1.weight)  # "default" was not merged


def test_conv_groups_merge_not_supported():
    base = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2))
    model = LoraModel(base, LoraConfig(target_modules=["0"], r=2))
    with pytest.raises(NotImplementedError, match="groups"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="divisible by groups"):
        LoraModel(nn.Sequential(nn.Conv2d(4, 4, 1, groups=2)), LoraConfig(target_modules=["0"], r=3))


# ---- torch.compile ------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize(
    "backend, use_dora, training",
    [("aot_eager", dora, training) for dora in (False, True) for training in (True, False)]
    + [("inductor", False, True)],
)
def test_torch_compile_fullgraph_matches_eager(backend, use_dora, training):
    import torch._inductor.config

    import fastpeft

    config = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=0.1,
                                 use_dora=use_dora)
    model = randomize(fastpeft.get_peft_model(MLP(), config)).train(training)
    x = torch.randn(6, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    # inductor draws random numbers (here: the dropout seed) with its own generator unless fallback_random
    with torch._inductor.config.patch(fallback_random=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(1)  # same dropout draws as the eager run below
        out = compiled(x)
        out.pow(2).sum().backward()
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    model.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    expected = model(x)
    expected.pow(2).sum().backward()
    torch.testing.assert_close(out, expected)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, msg=n)
