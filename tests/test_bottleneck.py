"""Bottleneck adapters (fastpeft's own method, peft has none): sequential (Houlsby) and parallel (He et al.).

The oracle is a plain-PyTorch reference of the math: a copy of the base model with forward hooks that add
s * up(act(down(LN?(x)))) where the method says, using the adapter's weights. Also: near-identity init, gradients
(adapters only), save -> load round trips (safetensors holds only adapter keys), config JSON, several adapters,
set / disable / delete, merge refused, unload, config checks, bf16 bases, custom models, and the README example.
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
import torch.nn.functional as F
from torch import nn

from _peft_testing import inputs, logits, tiny_bert, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import BottleneckConfig, BottleneckModel, PeftModel, get_peft_model  # noqa: E402
from fastpeft.tuners.bottleneck import BottleneckLayer, ParallelAdapterLayer, SequentialAdapterLayer  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

P = "base_model.model."
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
# module names (in the plain base model) wrapped by the defaults: placement -> model -> names of layer 0
WRAPPED = {
    "sequential": {"llama": ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"],
                   "gpt2": ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"],
                   "bert": ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"]},
    "parallel": {"llama": ["model.layers.0.self_attn", "model.layers.0.mlp"],
                 "gpt2": ["transformer.h.0.attn", "transformer.h.0.mlp"],
                 "bert": ["bert.encoder.layer.0.attention.output", "bert.encoder.layer.0.output"]},
}
ACTS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def layers(model) -> dict[str, BottleneckLayer]:
    """Plain-model module name -> bottleneck layer."""
    prefix = P if isinstance(model, PeftModel) else "model." if isinstance(model, BottleneckModel) else ""
    return {name.removeprefix(prefix): m for name, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def randomize(model, seed=7, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "bottleneck_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "bottleneck_scale" in name else 0.0))
    return model


def branch(x, layer: BottleneckLayer, adapter: str):
    """The reference adapter branch, from the layer's weights, in float32 plain torch."""
    x = x.float()
    if adapter in layer.bottleneck_ln:
        ln = layer.bottleneck_ln[adapter]
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        x = (x - mu) / torch.sqrt(var + ln.eps) * ln.weight.float() + ln.bias.float()
    down, up = layer.bottleneck_down[adapter], layer.bottleneck_up[adapter]
    z = ACTS[layer.bottleneck_non_linearity[adapter]](x @ down.weight.float().T + down.bias.float())
    learned = adapter in layer.bottleneck_scale
    s = layer.bottleneck_scale[adapter].float() if learned else layer.bottleneck_scaling[adapter]
    return s * (z @ up.weight.float().T + up.bias.float())


def reference(base, peft_model, adapters=("default",)):
    """A copy of `base` with hooks doing what the adapters of `peft_model` should do (sum of the active ones)."""
    ref = copy.deepcopy(base)
    for name, layer in layers(peft_model).items():
        names = [a for a in adapters if a in layer.bottleneck_down]
        if not names:
            continue
        module = ref.get_submodule(name)
        total = lambda x, layer=layer, names=names: sum(branch(x, layer, a) for a in names)  # noqa: E731

        def add(out, delta):
            if isinstance(out, tuple):
                return (out[0] + delta.to(out[0].dtype),) + tuple(out[1:])
            return out + delta.to(out.dtype)

        if isinstance(layer, SequentialAdapterLayer):
            module.register_forward_hook(
                lambda m, a, out, total=total: add(out, total(out if torch.is_tensor(out) else out[0])))
        elif not layer.residual_input:
            def hook(m, args, kwargs, out, total=total):
                x = args[0] if args else kwargs["hidden_states"]
                return add(out, total(x))
            module.register_forward_hook(hook, with_kwargs=True)
        else:  # BERT: the branch reads the sublayer's input, joins the dense output before dropout + LayerNorm
            store = {}
            module.register_forward_pre_hook(lambda m, a, store=store: store.__setitem__("x", a[1]))
            module.dense.register_forward_hook(lambda m, a, out, store=store, total=total: out + total(store["x"]))
    return ref


def make(kind, placement="sequential", **kwargs):
    base = BUILDERS[kind]()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(placement=placement, **kwargs))
    return base, model


def test_registered():
    from fastpeft.config import _CONFIG_MODULES, PeftType
    from fastpeft.peft_model import _tuner_cls

    assert fastpeft.BottleneckConfig is BottleneckConfig and fastpeft.BottleneckModel is BottleneckModel
    assert _CONFIG_MODULES[PeftType.BOTTLENECK] == "fastpeft.tuners.bottleneck.config"
    assert _tuner_cls("BOTTLENECK") is BottleneckModel
    assert BottleneckConfig().peft_type is PeftType.BOTTLENECK


# ---- the math ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("placement", ["sequential", "parallel"])
@pytest.mark.parametrize("extra", [{}, {"use_layer_norm": True, "non_linearity": "gelu", "scaling": 2.5},
                                   {"use_layer_norm": True, "scaling": "learned", "non_linearity": "tanh"}],
                         ids=["plain", "ln-gelu", "ln-learned"])
def test_matches_plain_pytorch_reference(kind, placement, extra):
    base, model = make(kind, placement, r=4, init_weights=False, **extra)
    assert sorted(n for n in layers(model) if ".0." in n) == sorted(WRAPPED[placement][kind])
    randomize(model)
    batch = inputs()
    out, want, plain = logits(model, batch), logits(reference(base, model), batch), logits(base, batch)
    assert (out - plain).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def _tiny(model_type):
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                 max_position_embeddings=64, pad_token_id=0)
    cfg_cls, model_cls, kw = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"num_key_value_heads": 2}),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {}),  # registers o_proj before qkv_proj
        "roberta": (transformers.RobertaConfig, transformers.RobertaForMaskedLM, {"pad_token_id": 1}),
    }[model_type]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**{**small, **kw})).eval()


@pytest.mark.parametrize("model_type", ["mistral", "phi3", "roberta"])
@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_other_model_type_defaults(model_type, placement):
    base = _tiny(model_type)
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(placement=placement, r=4, init_weights=False))
    assert len(layers(model)) == 4
    assert all(layer.adapter_in_features == layer.adapter_out_features == 32 for layer in layers(model).values())
    randomize(model)
    batch = {"input_ids": inputs()["input_ids"]}
    torch.testing.assert_close(logits(model, batch), logits(reference(base, model), batch), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_near_identity_init_equals_base(kind, placement):
    base, model = make(kind, placement, use_layer_norm=True)
    batch = inputs()
    torch.testing.assert_close(logits(model, batch), logits(base, batch), atol=0, rtol=0)
    for layer in layers(model).values():
        assert layer.bottleneck_r["default"] == 32 // 16  # hidden 32, reduction_factor 16
        assert not layer.bottleneck_up["default"].weight.any() and layer.bottleneck_down["default"].weight.any()


def test_wrapped_module_attributes_stay_reachable():
    _, model = make("llama", r=4)
    inner = model.get_base_model().model.layers[0]
    assert isinstance(inner.mlp.down_proj, SequentialAdapterLayer)
    assert (inner.mlp.down_proj.in_features, inner.mlp.down_proj.out_features) == (48, 32)
    assert (inner.mlp.down_proj.adapter_in_features, inner.mlp.down_proj.adapter_out_features) == (32, 32)
    _, model = make("llama", "parallel", r=4)
    attn = model.get_base_model().model.layers[1].self_attn
    assert isinstance(attn, ParallelAdapterLayer) and attn.layer_idx == 1 and not attn.residual_input
    with pytest.raises(AttributeError):
        attn.no_such_attribute


def test_reduction_factor_and_r():
    _, model = make("llama", reduction_factor=8)
    assert {layer.bottleneck_r["default"] for layer in layers(model).values()} == {4}
    _, model = make("llama", reduction_factor=8, r=5)
    assert {tuple(layer.bottleneck_down["default"].weight.shape) for layer in layers(model).values()} == {(5, 32)}
    with pytest.raises(ValueError, match="reduction_factor=64 leaves no bottleneck .* width 32; lower"):
        make("llama", reduction_factor=64)


# ---- training ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_gradients_reach_only_adapters(placement):
    base, model = make("llama", placement, use_layer_norm=True, scaling="learned")
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("bottleneck_" in n for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == sum(model.get_parameter(n).numel() for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = inputs()
    for step in range(2):
        opt.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(grads) <= set(trainable)
        if step == 0:  # at init only the up-projections (and nothing behind them) get gradient
            assert all(g.any() == ("bottleneck_up" in n) for n, g in grads.items()), \
                sorted(n for n, g in grads.items() if g.any())
        opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("bottleneck_" in k for k in changed)
    assert any("bottleneck_down" in k for k in changed)  # second step: down moves too


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_gradients_match_reference_with_two_active_adapters(kind, placement):
    base, model = make(kind, placement, r=4, init_weights=False)
    model.add_adapter("b", BottleneckConfig(placement=placement, r=3, init_weights=False, use_layer_norm=True,
                                            scaling="learned", non_linearity="silu", locations="feedforward"))
    model.base_model.set_adapter(["default", "b"])
    randomize(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".b." in n for n in params) and any(".default." in n for n in params)
    batch = inputs()
    grads = []
    for m in (model, reference(base, model, ["default", "b"])):  # the reference's hooks use the same parameters
        for p in params.values():
            p.grad = None
        out = m(**batch)
        (out.logits.float() ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
    for n in params:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_dropout_only_in_training():
    _, model = make("gpt2", "parallel", dropout=0.5, init_weights=False)
    batch = inputs()
    model.eval()
    torch.testing.assert_close(logits(model, batch), logits(model, batch))
    model.train()
    assert not torch.equal(logits(model, batch), logits(model, batch))


def test_bf16_base():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(placement="parallel", r=4, init_weights=False,
                                                                 use_layer_norm=True))
    adapter_params = {n: p for n, p in model.named_parameters() if "bottleneck_" in n}
    assert adapter_params and all(p.dtype == torch.float32 for p in adapter_params.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "bottleneck_" not in n)
    randomize(model)
    batch = inputs()
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_params.values())
    # close to the float32 computation with the same weights
    ref = reference(base.float(), model)
    with torch.no_grad():
        want = ref(**batch).logits
    err = (out.logits.float() - want).abs().max().item()
    assert err < 0.05 * max(1.0, want.abs().max().item()), err
    torch.testing.assert_close(logits(model.base_model.model, batch).float(), out.logits.detach().float())


# ---- checkpoints ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,placement", [("llama", "parallel"), ("gpt2", "sequential"), ("bert", "parallel")])
def test_save_load_round_trip(tmp_path, kind, placement):
    base, model = make(kind, placement, r=4, use_layer_norm=True, scaling="learned")
    randomize(model)
    batch = inputs()
    out = logits(model, batch)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["placement"] == placement and cfg["scaling"] == "learned"
    assert re.fullmatch(cfg["attention_modules"], WRAPPED[placement][kind][0])  # the defaults, written out
    sd = load_file(tmp_path / "adapter_model.safetensors")
    n_layers = 2 * 2  # 2 blocks x (attention, feedforward)
    assert len(sd) == n_layers * 7  # down w/b, up w/b, ln w/b, scale
    for k in sd:
        assert k.startswith(P) and re.search(r"\.bottleneck_(down|up|ln)\.(weight|bias)$|\.bottleneck_scale$", k), k
        assert ".default" not in k
    inner = model.state_dict()
    for k, v in sd.items():
        mk = re.sub(r"\.(bottleneck_\w+)(\.|$)", r".\1.default\2", k)
        assert torch.equal(v, inner[mk]), k

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(loaded.base_model, BottleneckModel)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode
    torch.testing.assert_close(logits(loaded, batch), out, atol=0, rtol=0)
    trainable = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True, adapter_name="other")
    assert trainable.active_adapter == "other"
    assert all("bottleneck_" in n for n, p in trainable.named_parameters() if p.requires_grad)
    torch.testing.assert_close(logits(trainable, batch), out, atol=0, rtol=0)


def test_modules_to_save_round_trip(tmp_path):
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base),
                           BottleneckConfig(task_type="SEQ_CLS", r=4, modules_to_save=["classifier"]))
    randomize(model)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    assert all("bottleneck_" in n or "modules_to_save" in n for n in trainable)
    batch = inputs()
    out = logits(model, batch)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert {k for k in keys if "classifier" in k} == {P + "classifier.weight", P + "classifier.bias"}
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), out, atol=0, rtol=0)


def test_load_into_wrong_shape_fails_clearly(tmp_path):
    _, model = make("llama", r=4)
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="shape"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, config=BottleneckConfig(r=6))


def test_config_json_round_trip(tmp_path):
    cfg = BottleneckConfig(placement="parallel", locations="feedforward", feedforward_modules=["mlp"],
                           reduction_factor=4, non_linearity="silu", scaling=4.0, use_layer_norm=True, dropout=0.1,
                           exclude_modules=r".*\.1\.mlp", modules_to_save=["lm_head"])
    d = cfg.to_dict()
    assert d["peft_type"] == "BOTTLENECK" and d["locations"] == ["feedforward"]
    again = BottleneckConfig.from_peft_type(**json.loads(json.dumps(d)))
    assert type(again) is BottleneckConfig and again == cfg
    cfg.save_pretrained(tmp_path)
    loaded = fastpeft.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is BottleneckConfig and loaded == cfg


# ---- several adapters -------------------------------------------------------------------------------------------


def test_adapters_set_disable_delete():
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(r=4, init_weights=False))
    model.add_adapter("ff", BottleneckConfig(r=2, locations="feedforward", init_weights=False, non_linearity="gelu"))
    randomize(model)
    batch = inputs()
    plain = logits(base, batch)
    a = logits(model, batch)
    torch.testing.assert_close(a, logits(reference(base, model, ["default"]), batch), atol=2e-5, rtol=2e-5)
    # "ff" is not trainable until activated
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ff." in n)

    model.set_adapter("ff")
    assert all((".ff." in n) == p.requires_grad for n, p in model.named_parameters() if "bottleneck_" in n)
    f = logits(model, batch)
    torch.testing.assert_close(f, logits(reference(base, model, ["ff"]), batch), atol=2e-5, rtol=2e-5)
    assert not torch.allclose(f, a)

    # both at once: the branches add up
    model.base_model.set_adapter(["default", "ff"])
    torch.testing.assert_close(logits(model, batch), logits(reference(base, model, ["default", "ff"]), batch),
                               atol=2e-5, rtol=2e-5)
    model.set_adapter("default")

    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), plain, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, batch), a, atol=0, rtol=0)

    model.delete_adapter("ff")
    assert set(model.peft_config) == {"default"}
    assert all("ff" not in layer.bottleneck_down and "ff" not in layer.bottleneck_non_linearity
               for layer in layers(model).values())
    assert not any(".ff." in k for k in model.state_dict())
    torch.testing.assert_close(logits(model, batch), a, atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("ff")


def test_mixing_placements_is_refused():
    model = get_peft_model(tiny_llama(), BottleneckConfig())
    with pytest.raises(ValueError, match="placement='parallel' differs .* share a placement"):
        model.add_adapter("par", BottleneckConfig(placement="parallel"))
    assert set(model.peft_config) == {"default"}


# ---- merge / unload ---------------------------------------------------------------------------------------------


def test_merge_is_refused_and_unload_returns_base():
    base = tiny_gpt2()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(placement="parallel", init_weights=False))
    batch = inputs()
    out = logits(model, batch)
    for call in (model.merge_adapter, model.merge_and_unload, lambda: model.base_model.merge_and_unload()):
        with pytest.raises(ValueError, match="cannot be merged .* non-linearity .* unload()"):
            call()
    layer = next(iter(layers(model).values()))
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge()
    torch.testing.assert_close(logits(model, batch), out, atol=0, rtol=0)  # untouched

    plain = model.unload()
    assert type(plain) is type(base)
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())
    assert not any("bottleneck" in k for k in plain.state_dict())
    assert plain.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(logits(plain, batch), logits(base, batch), atol=0, rtol=0)


# ---- configuration checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"placement": "serial"}, "placement"),
    ({"locations": ["attention", "ffn"]}, "locations"),
    ({"locations": []}, "locations"),
    ({"reduction_factor": 0}, "reduction_factor"),
    ({"r": 0}, "r"),
    ({"non_linearity": "softmax"}, "non_linearity"),
    ({"scaling": "auto"}, "scaling"),
    ({"scaling": float("inf")}, "scaling"),
    ({"dropout": 1.0}, "dropout"),
    ({"init_weights": "zeros"}, "init_weights"),
    ({"attention_modules": []}, "attention_modules"),
    ({"feedforward_modules": "mlp("}, "feedforward_modules"),
    ({"exclude_modules": [""]}, "exclude_modules"),
])
def test_bad_config_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"BottleneckConfig\.{field}\b"):
        BottleneckConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [({"r": "4"}, "r"), ({"use_layer_norm": "yes"}, "use_layer_norm"),
                                          ({"scaling": True}, "scaling")])
def test_bad_config_types(kwargs, field):
    with pytest.raises(TypeError, match=rf"BottleneckConfig\.{field}\b"):
        BottleneckConfig(**kwargs)


class Block(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.mix = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.ff(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("placement,attn,ff", [
    ("sequential", ["mix.2"], r"blocks\.\d+\.ff\.2"),
    ("parallel", ["mix"], ["ff"]),
])
def test_custom_model_with_named_modules(placement, attn, ff):
    base = Net()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(placement=placement, attention_modules=attn,
                                                                 feedforward_modules=ff, r=3, init_weights=False,
                                                                 exclude_modules=["blocks.1.mix", "blocks.1.mix.2"]))
    assert sorted(layers(model)) == sorted(
        ["blocks.0.mix.2", "blocks.0.ff.2", "blocks.1.ff.2"] if placement == "sequential"
        else ["blocks.0.mix", "blocks.0.ff", "blocks.1.ff"])
    assert {layer.bottleneck_location["default"] for n, layer in layers(model).items()} == {"attention", "feedforward"}
    randomize(model)
    x = torch.randn(4, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(base, model)(x), atol=2e-5, rtol=2e-5)


def test_tuner_without_peft_model():
    base = tiny_gpt2()
    tuner = BottleneckModel(copy.deepcopy(base), BottleneckConfig(r=4, init_weights=False), "a")
    randomize(tuner)
    batch = inputs()
    torch.testing.assert_close(logits(tuner, batch), logits(reference(base, tuner, ["a"]), batch), atol=2e-5, rtol=2e-5)
    sd = fastpeft.get_peft_model_state_dict(tuner, adapter_name="a")
    assert len(sd) == 2 * 2 * 4 and all("bottleneck_" in k and ".a." not in k for k in sd)


def test_features_not_last_fail_clearly():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv1d(8, 8, 1)
            self.out_features = self.in_features = 8

        def forward(self, x):  # [B, C, T]
            return self.proj(x)

    net = nn.Sequential(Conv())
    model = get_peft_model(net, BottleneckConfig(attention_modules=["0"], locations="attention", r=2))
    with pytest.raises(ValueError, match=r"expected features last.*got input \(2, 8, 5\)"):
        model(torch.randn(2, 8, 5))


def test_model_type_without_defaults_needs_names():
    with pytest.raises(ValueError, match="BottleneckConfig.attention_modules is needed: .* model_type .custom."):
        get_peft_model(Net(), BottleneckConfig())
    # naming only the feedforward modules is fine when only that location is used
    get_peft_model(Net(), BottleneckConfig(locations="feedforward", feedforward_modules=["ff"], placement="parallel",
                                           r=2))
    # a reduction factor leaving no bottleneck fails before the model is changed
    net = Net()
    with pytest.raises(ValueError, match=r"blocks\.0\.ff: BottleneckConfig.reduction_factor=16 leaves no bottleneck"):
        get_peft_model(net, BottleneckConfig(locations="feedforward", feedforward_modules=["ff"]))
    assert not any(isinstance(m, BottleneckLayer) for m in net.modules())


def test_unmatched_or_nested_names_fail_clearly():
    with pytest.raises(ValueError, match=r"BottleneckConfig\.feedforward_modules=\['mlp'\] matches no module of Net"):
        get_peft_model(Net(), BottleneckConfig(attention_modules=["mix"], feedforward_modules=["mlp"]))
    with pytest.raises(ValueError, match="lies inside another wrapped module"):
        get_peft_model(Net(), BottleneckConfig(attention_modules=["mix"], feedforward_modules=["mix.2"]))
    with pytest.raises(ValueError, match="blocks.0.mix.1: cannot tell the width of Tanh"):
        get_peft_model(Net(), BottleneckConfig(attention_modules=["mix.1"], locations="attention"))


# ---- README -----------------------------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Bottleneck and parallel adapters"


def _readme_code() -> str:
    text = README.read_text() if README.is_file() else ""
    if SECTION not in text:
        pytest.skip(f"README.md has no {SECTION!r} section yet")
    match = re.search(r"```python\n(.*?)```", text.split(SECTION, 1)[1], re.S)
    assert match, f"README's section {SECTION!r} has no python block"
    return match.group(1)


def test_readme_example_runs(tmp_path, monkeypatch):
    code = _readme_code()
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md:bottleneck", "exec"), ns)
    assert (tmp_path / "my-bottleneck" / "adapter_model.safetensors").is_file()
