"""PeftMixedModel (adapters of different methods active together) against peft's PeftMixedModel.

Adapters are saved by fastpeft and by peft (randomised so that they matter) and loaded into both mixed models
on a tiny Llama; outputs must agree for every active set, with the adapters disabled, after merge_and_unload,
after delete_adapter, and in generate. Incompatible methods and bad calls raise as peft does.
"""
from __future__ import annotations

import copy
import io
import warnings
from contextlib import redirect_stdout

import pytest
import torch

from _peft_testing import close, inputs, logits, peft, tiny_llama

import fastpeft

METHOD_PREFIXES = ("lora_", "hada_", "lokr_", "oft_")

# adapters overlap on some modules (q_proj: all three; v_proj / up_proj / down_proj: two), so layers nest
ADAPTERS = {
    # name: (config class name, config kwargs, library that trains and saves it)
    "lora": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), "fastpeft"),
    "loha": ("LoHaConfig", dict(r=2, alpha=4, target_modules=["q_proj", "k_proj", "down_proj"]), "peft"),
    "lokr": ("LoKrConfig", dict(r=2, alpha=4, target_modules=["q_proj", "v_proj", "o_proj"]), "fastpeft"),
    "lora_p": ("LoraConfig", dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]), "peft"),
}


def _randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if any(k in name for k in METHOD_PREFIXES):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: directory} of the adapters in ADAPTERS, each saved by its library from a plain PeftModel."""
    root = tmp_path_factory.mktemp("mixed")
    base = tiny_llama()
    dirs = {}
    for i, (name, (cfg_name, kwargs, lib_name)) in enumerate(ADAPTERS.items()):
        lib = fastpeft if lib_name == "fastpeft" else peft
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(copy.deepcopy(base), getattr(lib, cfg_name)(**kwargs))
        _randomize(model, seed=10 + i)
        model.save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    return dirs


def _load(lib, base, dirs, names):
    """lib's PeftMixedModel with the adapters `names` loaded in this order (first via from_pretrained)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.PeftMixedModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], names[0])
        for name in names[1:]:
            model.load_adapter(dirs[name], name)
    return model.eval()


def _pair(dirs, names):
    base = tiny_llama()
    return base, _load(peft, base, dirs, names), _load(fastpeft, base, dirs, names)


def _same(pm, fm, batch):
    close(logits(pm, batch), logits(fm, batch))


@pytest.mark.parametrize("order", [("lora", "loha", "lokr"), ("loha", "lokr", "lora", "lora_p")])
def test_loaded_adapters_match_peft(saved, order):
    """LoRA / LoHa / LoKr saved by fastpeft and by peft, loaded in either nesting order (LoRA innermost or
    outermost): same structure and state dict as peft's, same outputs for each active set, adapters not in the
    active set have no effect, the order given to set_adapter does not matter (as peft)."""
    base, pm, fm = _pair(saved, list(order))
    sp, sf = pm.state_dict(), fm.state_dict()
    assert list(sp) == list(sf)
    for k in sp:
        assert torch.equal(sp[k], sf[k]), k
    batch = inputs()
    base_out = logits(base, batch)
    # from_pretrained leaves the first adapter active, load_adapter does not activate
    assert fm.active_adapters == pm.active_adapters == [order[0]]
    _same(pm, fm, batch)
    outs = {}
    for active in ([order[1]], [order[0], order[2]], list(order), list(reversed(order))):
        pm.set_adapter(active)
        fm.set_adapter(active)
        assert fm.active_adapters == pm.active_adapters == active
        trainable = [{n for n, p in m.named_parameters() if p.requires_grad} for m in (pm, fm)]
        assert trainable[0] == trainable[1] and trainable[1]
        out = logits(fm, batch)
        close(logits(pm, batch), out)
        assert (out - base_out).abs().max() > 1e-3  # the adapters matter
        outs[tuple(active)] = out
    close(outs[tuple(order)], outs[tuple(reversed(order))])  # applied in injection order, not list order
    assert not torch.allclose(outs[tuple(order)], outs[(order[1],)], atol=1e-4)

    with pm.disable_adapter(), fm.disable_adapter():
        close(logits(fm, batch), base_out)
        _same(pm, fm, batch)
    _same(pm, fm, batch)  # enabled again

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_p, merged_f = pm.merge_and_unload(), fm.merge_and_unload()
    assert not any(isinstance(m, fastpeft.tuners.BaseTunerLayer) for m in merged_f.modules())
    assert type(merged_f.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    close(logits(merged_p, batch), logits(merged_f, batch))
    close(logits(merged_f, batch), outs[tuple(reversed(order))], tol=1e-4)


def test_add_adapter_structure_trainable_params_and_generate():
    """get_peft_model(mixed=True) + add_adapter: the same nested layers and state-dict keys as peft, the same
    trainable-parameter count, and greedy generate equal to peft's."""
    base = tiny_llama()
    models = []
    for lib in (peft, fastpeft):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(copy.deepcopy(base), lib.LoHaConfig(**ADAPTERS["loha"][1]), adapter_name="loha",
                                       mixed=True)
            model.add_adapter("lora", lib.LoraConfig(**ADAPTERS["lora"][1]))
            model.add_adapter("lokr", lib.LoKrConfig(**ADAPTERS["lokr"][1]))
        models.append(model)
    pm, fm = models
    assert type(fm).__name__ == "PeftMixedModel"
    q = fm.base_model.model.model.layers[0].self_attn.q_proj  # lokr( lora( loha( Linear ) ) )
    from fastpeft.tuners.loha.layer import LoHaLayer
    from fastpeft.tuners.lokr.layer import LoKrLayer
    from fastpeft.tuners.lora.layer import LoraLayer

    assert isinstance(q, LoKrLayer) and isinstance(q.base_layer, LoraLayer)
    assert isinstance(q.base_layer.base_layer, LoHaLayer) and type(q.get_base_layer()) is torch.nn.Linear
    assert repr(q.base_layer).startswith("lora.Linear(")
    assert list(pm.state_dict()) == list(fm.state_dict())
    counts = []
    for m in (pm, fm):
        buf = io.StringIO()
        with redirect_stdout(buf):
            m.print_trainable_parameters()
        counts.append(buf.getvalue())
    assert counts[0] == counts[1]
    assert pm.get_nb_trainable_parameters() == fm.get_nb_trainable_parameters()

    _randomize(pm, seed=5)
    fm.load_state_dict(pm.state_dict())
    pm.set_adapter(["loha", "lora", "lokr"])
    fm.set_adapter(["loha", "lora", "lokr"])
    batch = inputs()
    _same(pm, fm, batch)
    kwargs = dict(input_ids=batch["input_ids"][1:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(pm.generate(**kwargs), fm.generate(**kwargs))


def test_delete_adapter_and_unload(saved):
    base, pm, fm = _pair(saved, ["lora", "loha", "lokr"])
    batch = inputs()
    for m in (pm, fm):
        m.set_adapter(["lora", "loha", "lokr"])
        m.delete_adapter("loha")
    assert sorted(fm.active_adapters) == sorted(pm.active_adapters) == ["lokr", "lora"]
    assert sorted(fm.peft_config) == sorted(pm.peft_config) == ["lokr", "lora"]
    assert list(pm.state_dict()) == list(fm.state_dict())
    _same(pm, fm, batch)
    with pytest.raises(ValueError, match="not found"):
        fm.delete_adapter("loha")
    fm.merge_adapter(["lora"])
    with pytest.raises(ValueError, match="merged"):
        fm.delete_adapter("lora")
    fm.unmerge_adapter()
    _same(pm, fm, batch)
    plain = fm.unload()
    assert not any(isinstance(m, fastpeft.tuners.BaseTunerLayer) for m in plain.modules())
    close(logits(plain, batch), logits(base, batch))


def test_bad_combinations_raise_like_peft(saved, tmp_path):
    """IA³ is not one of peft's mixed-compatible methods (COMPATIBLE_TUNER_TYPES), nor is a prompt-learning
    method; from_pretrained refuses OFT checkpoints (peft's PEFT_TYPE_TO_MIXED_MODEL_MAPPING); saving is
    not supported; unknown / duplicate adapter names. Each raises the same error type as peft."""
    base = tiny_llama()
    for lib in (peft, fastpeft):
        ia3 = lib.IA3Config(target_modules=["q_proj"], feedforward_modules=[])
        with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
            lib.get_peft_model(copy.deepcopy(base), ia3, mixed=True)
        with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
            lib.get_peft_model(copy.deepcopy(base), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                               mixed=True)
        model = lib.PeftMixedModel.from_pretrained(copy.deepcopy(base), saved["lora"], "lora")
        with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
            model.add_adapter("ia3", ia3)
        assert list(model.peft_config) == ["lora"]
        with pytest.raises(ValueError, match="already exists"):
            model.add_adapter("lora", lib.LoHaConfig(target_modules=["k_proj"]))
        with pytest.raises(ValueError, match="not found"):
            model.set_adapter(["lora", "nope"])
        with pytest.raises(NotImplementedError, match="Saving is not supported"):
            model.save_pretrained(str(tmp_path / "x"))
        with pytest.raises(TypeError, match="not supported"):
            model.get_layer_status()

    ia3_dir, oft_dir = str(tmp_path / "ia3"), str(tmp_path / "oft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[])
                            ).save_pretrained(ia3_dir)
        peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"])
                            ).save_pretrained(oft_dir)
    for lib in (peft, fastpeft):
        with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
            lib.PeftMixedModel.from_pretrained(copy.deepcopy(base), ia3_dir, "ia3")
        with pytest.raises(ValueError, match="not supported for mixed models"):
            lib.PeftMixedModel.from_pretrained(copy.deepcopy(base), oft_dir, "oft")
        model = lib.PeftMixedModel.from_pretrained(copy.deepcopy(base), saved["lora"], "lora")
        with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
            model.load_adapter(ia3_dir, "ia3")
        assert list(model.peft_config) == ["lora"]


def test_oft_and_adalora_nest_like_peft():
    """peft's other compatible methods: OFT (rotates the input of the layers below it) and AdaLoRA (a LoraLayer
    subclass that a LoRA adapter must wrap, not join) nested with LoHa and LoRA."""
    base = tiny_llama()
    models = []
    for lib in (peft, fastpeft):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = lib.get_peft_model(copy.deepcopy(base), lib.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
                                   adapter_name="loha", mixed=True)
            m.add_adapter("oft", lib.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "o_proj"]))
            m.add_adapter("lora", lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
            m.add_adapter("ada", lib.AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["v_proj"]))
            m.add_adapter("lora2", lib.LoraConfig(r=2, target_modules=["v_proj", "k_proj"]))
        models.append(m)
    pm, fm = models
    assert list(pm.state_dict()) == list(fm.state_dict())
    _randomize(pm, seed=7)
    fm.load_state_dict(pm.state_dict())
    batch = inputs()
    for active in (["loha", "oft"], ["oft", "lora", "loha", "ada", "lora2"], ["ada", "lora2"]):
        pm.set_adapter(active)
        fm.set_adapter(active)
        _same(pm, fm, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close(logits(pm.merge_and_unload(), batch), logits(fm.merge_and_unload(), batch))


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv1d = torch.nn.Conv1d(8, 8, 1)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(x).relu()  # [B, 8, 6, 6]
        h = self.conv1d(h.flatten(2)).relu().mean(-1)  # [B, 8]
        return self.lin(h)


def _flat(key: str) -> str:
    return key.replace(".base_layer", "")


@pytest.mark.parametrize("order", [("lora", "loha", "lokr"), ("loha", "lokr", "lora")])
def test_conv_layers_nest_like_peft(order):
    """Conv2d / Conv1d / Linear targeted by LoRA, LoHa and LoKr (a LyCORIS conv layer over another method's
    layer must not fold its delta into the innermost weight). peft's LoRA cannot wrap another method's conv
    layer (AttributeError: no `groups`), fastpeft's can: the reference is then peft's model with LoRA
    innermost and the same adapter weights (additive adapters: the nesting order does not matter)."""
    torch.manual_seed(0)
    base = _ConvNet().eval()
    x = torch.randn(2, 3, 6, 6)
    kw = {"lora": dict(r=2, target_modules=["conv", "conv1d", "lin"]),
          "loha": dict(r=2, alpha=4, target_modules=["conv", "conv1d", "lin"]),
          "lokr": dict(r=2, alpha=4, target_modules=["conv", "lin"])}
    names = {"lora": "LoraConfig", "loha": "LoHaConfig", "lokr": "LoKrConfig"}
    models = []
    for lib, names_in_order in ((peft, ("lora", "loha", "lokr")), (fastpeft, order)):
        torch.manual_seed(0)
        m = lib.get_peft_model(copy.deepcopy(base), getattr(lib, names[names_in_order[0]])(**kw[names_in_order[0]]),
                               adapter_name=names_in_order[0], mixed=True)
        for n in names_in_order[1:]:
            m.add_adapter(n, getattr(lib, names[n])(**kw[n]))
        m.set_adapter(list(order))
        models.append(m.eval())
    pm, fm = models
    _randomize(pm, seed=3)
    theirs = {_flat(k): v for k, v in pm.state_dict().items()}
    ours = fm.state_dict()
    assert sorted(theirs) == sorted(_flat(k) for k in ours)
    if order[0] == "lora":
        assert list(pm.state_dict()) == list(ours)
    fm.load_state_dict({k: theirs[_flat(k)] for k in ours})
    with torch.no_grad():
        expected = pm(x)
        close(expected, fm(x))
        assert (expected - base(x)).abs().max() > 1e-3
        with pm.disable_adapter(), fm.disable_adapter():
            close(fm(x), base(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            close(pm.merge_and_unload()(x), fm.merge_and_unload()(x))
