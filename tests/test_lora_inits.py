"""peft's data-driven and special LoRA inits ("orthogonal", "mica", "eva", "corda", "lora_ga"), against peft.

Loading: an adapter trained in peft with any of them loads in fastpeft (from_pretrained, load_adapter, trainable or
not), gives peft's outputs and re-saves to a config peft reads back to the same outputs. Creation: each init gives
peft's factors on the same weights / data / seed (up to the sign of singular vectors where an SVD decides them).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import config as peft_lora_config  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.tuners.lora import CordaConfig, EvaConfig, LoraGAConfig  # noqa: E402
from fastpeft.tuners.lora.corda import preprocess_corda  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = ["q", "v", "c1d", "up", "down"]


class ToyLM(nn.Module):
    """A tiny language model: embedding, a Linear / Conv1D block, an LM head; `model(**batch)` like transformers."""

    def __init__(self, vocab=24, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim, bias=False)
        self.c1d = Conv1D(dim, dim)  # transformers' Conv1D(nf=out, nx=in): weight [in, out]
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.emb(input_ids)
        h = h + torch.tanh(self.q(h)) * torch.sigmoid(self.v(h)) + self.c1d(h)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


def base_model(seed=0, anisotropic=False):
    torch.manual_seed(seed)
    model = ToyLM().eval()
    if anisotropic:  # inputs with a few dominant directions, so that EVA moves ranks between layers
        with torch.no_grad():
            model.emb.weight[:, 3:] *= 0.1
    return model


def batches(n=8, seed=1, size=4, length=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 24, (size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # some padding the EVA mask drops
        labels = ids.clone()
        labels[:, :2] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


X = batches(1, seed=7)[0]["input_ids"]


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def lora_config(lib, init, r=4, **kw):
    """The same LoraConfig in peft (`lib=peft`) or fastpeft, with the sub-config `init` needs."""
    sub = {}
    if init == "eva":
        sub["eva_config"] = (peft.EvaConfig if lib is peft else EvaConfig)(rho=2.0, tau=0.9)
    elif init == "corda":
        sub["corda_config"] = (peft_lora_config.CordaConfig if lib is peft else CordaConfig)(corda_method="ipm")
    elif init == "lora_ga":
        sub["lora_ga_config"] = (peft.LoraGAConfig if lib is peft else LoraGAConfig)()
    targets = kw.pop("target_modules", TARGETS)
    return lib.LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights=init, **sub, **kw)


def peft_corda_module():
    """peft.tuners.lora.corda; it imports `dataclass` from the attrs package, which may not be installed: stdlib
    dataclasses do the same job for its one small class."""
    try:
        import attr  # noqa: F401
    except ImportError:
        import dataclasses
        import sys
        import types

        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora import corda

    return corda


def run_peft_preprocess(model, config, init):
    """peft's data step for the data-driven inits (before get_peft_model)."""
    if init == "corda":
        peft_corda_module().preprocess_corda(model, config, run_model=lambda: [model(input_ids=b["input_ids"][:1]) for b in batches()])
    elif init == "lora_ga":
        peft.preprocess_loraga(model, config, train_step=lambda: _lm_backward(model))


def _lm_backward(model):
    for b in batches(2):
        logits = model(input_ids=b["input_ids"])
        nn.functional.cross_entropy(logits.flatten(0, 1), b["input_ids"].flatten()).backward()


def peft_trained_adapter(init, path, r=4, **kw):
    """An adapter created in peft with `init` and then 'trained' (every adapter weight moved), saved to `path`.
    Returns (peft model in eval mode, the base model it runs on: the residual model for inits that change W)."""
    model = base_model(anisotropic=True)
    config = lora_config(peft, init, r=r, **kw)
    run_peft_preprocess(model, config, init)
    pm = peft.get_peft_model(model, config)
    if init == "eva":
        peft.initialize_lora_eva_weights(pm, batches(), show_progress_bar=False)
        assert pm.peft_config["default"].rank_pattern  # so that loading must follow it
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(path)
    residual = copy.deepcopy(pm).unload().eval()
    return pm.eval(), residual


# ---- 1. loading adapters peft trained with these inits ----------------------------------------------


@pytest.mark.parametrize("init", ["orthogonal", "mica", "eva", "corda", "lora_ga"])
def test_load_peft_adapter_same_outputs_and_round_trip(init, tmp_path):
    pm, residual = peft_trained_adapter(init, tmp_path / "peft")
    with torch.no_grad():
        expected = pm(input_ids=X)

    ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "peft").eval()
    with torch.no_grad():
        close(ours(input_ids=X), expected)
    # the base weights are the ones passed in (no init re-run on load changed them)
    passed_in = dict(residual.named_parameters())
    for name, p in ours.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, passed_in[name.replace(".base_layer", "")]), name

    ours.save_pretrained(tmp_path / "ours")
    saved_by_peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    saved_by_us = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("init_lora_weights", "eva_config", "corda_config", "lora_ga_config", "r", "lora_alpha",
                "rank_pattern", "alpha_pattern"):
        assert saved_by_us[key] == saved_by_peft[key], key
    assert sorted(saved_by_us["target_modules"]) == sorted(saved_by_peft["target_modules"])
    if init == "corda":
        return  # peft itself cannot load a CorDA adapter (its init asks for `eigens`); fastpeft can
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "ours").eval()
    with torch.no_grad():
        close(theirs(input_ids=X), expected)


@pytest.mark.parametrize("init", ["orthogonal", "mica", "eva", "corda", "lora_ga"])
def test_load_trainable_and_load_adapter(init, tmp_path):
    pm, residual = peft_trained_adapter(init, tmp_path / "peft")
    ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "peft", is_trainable=True)
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    if init != "corda":
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "peft", is_trainable=True)
        assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    if init == "mica":  # MiCA trains A only
        assert trainable and all("lora_A" in n for n in trainable)
    else:
        assert any("lora_B" in n for n in trainable)

    # a second adapter through load_adapter, then made active: same outputs as peft's
    ours.load_adapter(tmp_path / "peft", adapter_name="other", is_trainable=True)
    ours.set_adapter("other")
    if init == "mica":
        assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_B" in n)
    ours.eval()
    with torch.no_grad():
        close(ours(input_ids=X), pm(input_ids=X))


def test_load_corda_low_cpu_mem_usage(tmp_path):
    pm, residual = peft_trained_adapter("corda", tmp_path / "peft")
    ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "peft", low_cpu_mem_usage=True)
    with torch.no_grad():
        close(ours.eval()(input_ids=X), pm(input_ids=X))


def test_peft_sub_configs_round_trip_as_peft_json(tmp_path):
    for init, name, ours_cls in (("eva", "eva_config", EvaConfig), ("corda", "corda_config", CordaConfig),
                                 ("lora_ga", "lora_ga_config", LoraGAConfig)):
        theirs = lora_config(peft, init)
        theirs.save_pretrained(tmp_path / init)
        loaded = fastpeft.PeftConfig.from_pretrained(str(tmp_path / init))
        assert isinstance(getattr(loaded, name), dict)
        assert loaded.init_subconfig(name) == ours_cls(**json.loads((tmp_path / init / "adapter_config.json")
                                                                     .read_text())[name])
        loaded.save_pretrained(tmp_path / f"{init}_ours")
        again = peft.LoraConfig.from_pretrained(str(tmp_path / f"{init}_ours"))
        assert getattr(again, name) == getattr(theirs, name)
        assert lora_config(fastpeft, init).unsupported_features() == []


def test_sub_config_checks():
    with pytest.raises(ValueError, match="rho"):
        EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="tau"):
        EvaConfig(tau=1.5)
    with pytest.raises(ValueError, match="corda_method"):
        CordaConfig(corda_method="xyz")
    with pytest.raises(ValueError, match="direction"):
        LoraGAConfig(direction="AB")
    with pytest.raises(ValueError, match="tau"):
        fastpeft.LoraConfig(init_lora_weights="eva", eva_config={"tau": 2.0})
    with pytest.warns(UserWarning, match="eva_config` is not specified"):
        cfg = fastpeft.LoraConfig(init_lora_weights="eva")
    assert cfg.eva_config == {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                              "whiten": False, "adjust_scaling_factors": True}
    with pytest.warns(UserWarning, match="ignoring unknown keys"):  # a newer peft's field does not block loading
        cfg = fastpeft.LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "kpm", "new_field": 1})
    assert cfg.init_subconfig("corda_config").corda_method == "kpm"


# ---- 2. "orthogonal" ---------------------------------------------------------------------------------


def _factors(model, layer):
    module = model.get_submodule(f"base_model.model.{layer}")
    if layer == "emb":
        return module.lora_embedding_A["default"].detach(), module.lora_embedding_B["default"].detach()
    return module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()


def _both(init, r=4, seed=5, **kw):
    """peft's and fastpeft's model for the same base, config and RNG seed."""
    base = base_model()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), lora_config(peft, init, r=r, **kw))
    torch.manual_seed(seed)
    ours = fastpeft.get_peft_model(copy.deepcopy(base), lora_config(fastpeft, init, r=r, **kw))
    return base, theirs, ours


def test_orthogonal_same_seed_same_factors_and_properties():
    base, theirs, ours = _both("orthogonal", r=6, target_modules=TARGETS + ["emb"])
    for layer in TARGETS + ["emb"]:
        (a, b), (pa, pb) = _factors(ours, layer), _factors(theirs, layer)
        assert torch.equal(a, pa) and torch.equal(b, pb), layer  # same draws in the same order
        if layer == "emb":
            continue  # peft gives embeddings their default init (A = 0)
        # rows of a random orthogonal Q are split between A and B: B A = 0, each factor of rank r / 2
        assert a.abs().min() > 0 and b.abs().min() > 0
        close(b @ a, torch.zeros(b.shape[0], a.shape[1]), tol=1e-6)
        assert torch.linalg.matrix_rank(a) == 3 and torch.linalg.matrix_rank(b) == 3
    # the base weights are untouched and the adapted model starts at the base model's output
    with torch.no_grad():
        close(ours(input_ids=X), base(input_ids=X))
    for name, p in base.named_parameters():
        assert torch.equal(ours.get_base_model().get_parameter(_wrapped(ours, name)), p)


def _wrapped(model, name):
    """The parameter name of `name` (a base-model parameter) inside the adapted model."""
    module_name, _, param = name.rpartition(".")
    module = model.get_base_model().get_submodule(module_name)
    return f"{module_name}.base_layer.{param}" if hasattr(module, "base_layer") else name


def test_orthogonal_forward_backward_match_peft_with_same_weights():
    _, theirs, ours = _both("orthogonal", seed=11)
    with torch.no_grad():  # move B so the adapters contribute, identically in both
        for (n, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
            if "lora_B" in n:
                p.add_(0.05)
                q.copy_(p)
    outs = []
    for model in (theirs, ours):
        model.train()
        loss = model(input_ids=X).square().mean()
        loss.backward()
        outs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    close(outs[1][0], outs[0][0])
    assert outs[1][1].keys() == outs[0][1].keys()
    for name in outs[0][1]:
        close(outs[1][1][name], outs[0][1][name])


def test_orthogonal_rejects_odd_rank_and_conv():
    with pytest.raises(ValueError, match="requires the LoRA rank to be even, got 3"):
        fastpeft.get_peft_model(base_model(), lora_config(fastpeft, "orthogonal", r=3))
    with pytest.raises(ValueError, match="even, got 5"):
        fastpeft.get_peft_model(base_model(), lora_config(fastpeft, "orthogonal", r=4, rank_pattern={"up": 5}))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="not supported for Conv2d"):
        fastpeft.get_peft_model(conv, fastpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights="orthogonal"))


# ---- 3. "mica" ------------------------------------------------------------------------------------------


def test_mica_factors_and_trainable_parameters_match_peft():
    targets = TARGETS + ["emb"]
    base, theirs, ours = _both("mica", target_modules=targets)
    for layer in targets:
        (a, b), (pa, pb) = _factors(ours, layer), _factors(theirs, layer)
        assert not a.any() and not pa.any()  # A = 0: the adapter starts at zero, W untouched
        sign = torch.sign((b * pb).sum(0))  # singular vectors are defined up to sign
        close(b * sign, pb)
        # B spans the left singular vectors of W [out, in] with the smallest singular values
        module = base.get_submodule(layer)
        weight = module.weight.detach()
        weight = weight.T if isinstance(module, (Conv1D, nn.Embedding)) else weight
        U, S, _ = torch.linalg.svd(weight, full_matrices=False)
        close(b.T @ b, torch.eye(4))
        close((U[:, -4:].T @ b).abs().sum(0), torch.ones(4))

    def trainable(model):
        return sorted(n for n, p in model.named_parameters() if p.requires_grad)

    assert trainable(ours) == trainable(theirs)
    assert trainable(ours) and not any("lora_B" in n or "lora_embedding_B" in n for n in trainable(ours))
    for model in (ours, theirs):  # re-activating an adapter must not unfreeze B
        model.set_adapter("default")
    assert trainable(ours) == trainable(theirs)
    ours.base_model.set_requires_grad("default", True)
    assert trainable(ours) == trainable(theirs)

    # a training step moves A only; with A != 0 the outputs follow peft's for the same weights
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours.train()
    ours(input_ids=X).square().mean().backward()
    opt.step()
    changed = sorted(n for n, p in ours.named_parameters() if not torch.equal(p, before[n]))
    assert changed == trainable(ours)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        close(ours.eval()(input_ids=X), theirs.eval()(input_ids=X))


def test_mica_errors():
    with pytest.raises(ValueError, match=r"r` <= min\(in_features, out_features\) but got r=20"):
        fastpeft.get_peft_model(base_model(), lora_config(fastpeft, "mica", r=20))
    with pytest.raises(ValueError, match="use_dora"):
        fastpeft.get_peft_model(base_model(), lora_config(fastpeft, "mica", use_dora=True))


# ---- 4. "eva" -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [dict(rho=2.0, tau=0.9), dict(rho=1.0, tau=0.95, use_label_mask=False),
                                      dict(rho=3.0, tau=0.9, adjust_scaling_factors=False)])
def test_eva_same_ranks_and_A_as_peft(settings):
    base = base_model(anisotropic=True)
    data = batches(12)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS + ["down"], init_lora_weights="eva",
        eva_config=peft.EvaConfig(**settings)))
    peft.initialize_lora_eva_weights(theirs, data, show_progress_bar=False)
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS + ["down"], init_lora_weights="eva",
        eva_config=EvaConfig(**settings)))
    fastpeft.initialize_lora_eva_weights(ours, data, show_progress_bar=False)

    pc, oc = theirs.peft_config["default"], ours.peft_config["default"]
    assert oc.rank_pattern == pc.rank_pattern and oc.alpha_pattern == pc.alpha_pattern
    assert sorted(oc.target_modules) == sorted(pc.target_modules)
    if settings["rho"] > 1:
        assert oc.rank_pattern  # the data moved ranks between layers
    for layer in pc.target_modules:
        (a, b), (pa, pb) = _factors(ours, layer), _factors(theirs, layer)
        assert a.shape == pa.shape and not b.any() and not pb.any()
        sign = torch.sign((a * pa).sum(1, keepdim=True))  # principal directions are defined up to sign
        close(a * sign, pa, tol=1e-4)
    with torch.no_grad():  # B = 0: the model still computes the base model's function
        close(ours(input_ids=X), base(input_ids=X))


def test_eva_state_dict_on_plain_model_whiten_and_errors():
    base = base_model()
    data = batches(12)
    settings = dict(rho=2.0, tau=0.9, whiten=True)
    # layers whose inputs differ (peft whitens a shared decomposition once per layer sharing it, in place)
    targets = ["up", "down"]
    theirs = peft.get_eva_state_dict(base, data, peft_config=peft.LoraConfig(
        r=4, target_modules=targets, init_lora_weights="eva", eva_config=peft.EvaConfig(**settings)),
        show_progress_bar=False)
    ours = fastpeft.get_eva_state_dict(base, data, peft_config=fastpeft.LoraConfig(
        r=4, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(**settings)),
        show_progress_bar=False)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        sign = torch.sign((ours[name] * theirs[name]).sum(1, keepdim=True))
        close(ours[name] * sign, theirs[name], tol=1e-4)

    with pytest.raises(ValueError, match="peft_config is required"):
        fastpeft.get_eva_state_dict(base, data)
    with pytest.raises(ValueError, match="dataloader is empty"):
        fastpeft.get_eva_state_dict(base, [], peft_config=fastpeft.LoraConfig(target_modules=targets))
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=targets))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        fastpeft.initialize_lora_eva_weights(pm, data)


# ---- 5. "corda" -----------------------------------------------------------------------------------------


def _calibration(model):
    return lambda: [model(input_ids=b["input_ids"][:1]) for b in batches()]


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(method):
    base = base_model()
    theirs_base, ours_base = copy.deepcopy(base), copy.deepcopy(base)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                           corda_config=peft_lora_config.CordaConfig(corda_method=method), rank_pattern={"up": 6})
    peft_corda_module().preprocess_corda(theirs_base, pcfg, run_model=_calibration(theirs_base))
    ocfg = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                               corda_config=CordaConfig(corda_method=method), rank_pattern={"up": 6})
    preprocess_corda(ours_base, ocfg, run_model=_calibration(ours_base))
    for layer in TARGETS:
        close(ours_base.get_submodule(layer).eigens.S_WC, theirs_base.get_submodule(layer).eigens.S_WC, tol=1e-4)
    theirs = peft.get_peft_model(theirs_base, pcfg)
    ours = fastpeft.get_peft_model(ours_base, ocfg)
    for layer in TARGETS:
        (a, b), (pa, pb) = _factors(ours, layer), _factors(theirs, layer)
        assert a.shape == pa.shape and a.shape[0] == (6 if layer == "up" else 4)
        sign = torch.sign((b * pb).sum(0))  # U and V columns flip sign together
        close(b * sign, pb, tol=1e-4)
        close(a * sign.view(-1, 1), pa, tol=1e-4)
        # the residual base weight, W - scaling * B A
        ours_w = ours.get_base_model().get_submodule(layer).base_layer.weight
        theirs_w = theirs.get_base_model().get_submodule(layer).base_layer.weight
        close(ours_w, theirs_w, tol=1e-4)
        assert not hasattr(ours.get_base_model().get_submodule(layer).base_layer, "eigens")
    with torch.no_grad():  # residual + adapter = the original layer
        close(ours(input_ids=X), base(input_ids=X), tol=1e-4)
        close(ours(input_ids=X), theirs(input_ids=X), tol=1e-4)


def test_corda_cache_and_covariance_files(tmp_path):
    base = base_model()
    cfg = fastpeft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="corda", corda_config=CordaConfig(
        cache_file=str(tmp_path / "cache.pt"), covariance_file=str(tmp_path / "cov.pt")))
    first = copy.deepcopy(base)
    preprocess_corda(first, cfg, run_model=_calibration(first))
    assert (tmp_path / "cache.pt").exists() and (tmp_path / "cov.pt").exists()
    second = copy.deepcopy(base)
    preprocess_corda(second, cfg)  # no run_model: read back from the cache
    for layer in TARGETS:
        assert torch.equal(first.get_submodule(layer).eigens.U_WC, second.get_submodule(layer).eigens.U_WC)
    (tmp_path / "cache.pt").unlink()
    third = copy.deepcopy(base)
    preprocess_corda(third, cfg)  # from the covariance file
    for layer in TARGETS:
        close(first.get_submodule(layer).eigens.S_WC, third.get_submodule(layer).eigens.S_WC)


def test_corda_errors():
    cfg = lora_config(fastpeft, "corda")
    with pytest.raises(ValueError, match="run `preprocess_corda` first"):
        fastpeft.get_peft_model(base_model(), cfg)
    with pytest.raises(ValueError, match="run_model must be given"):
        preprocess_corda(base_model(), cfg)
    model = base_model()
    preprocess_corda(model, cfg, run_model=_calibration(model))
    with pytest.raises(ValueError, match="Matrix U size mismatch"):  # preprocessed for another rank
        fastpeft.get_peft_model(model, lora_config(fastpeft, "corda", r=2))


# ---- 6. "lora_ga" ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "weight_svd"), ("A2rBr", "gd_scale"),
                                             ("random", "unit")])
def test_lora_ga_matches_peft(direction, scale, tmp_path):
    base = base_model()
    models = {}
    for lib, cfg_cls in ((peft, peft.LoraGAConfig), (fastpeft, LoraGAConfig)):
        model = copy.deepcopy(base)
        cfg = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=cfg_cls(direction=direction, scale=scale))
        lib.preprocess_loraga(model, cfg, train_step=lambda m=model: _lm_backward(m))
        assert not any(p.grad is not None for p in model.parameters())
        torch.manual_seed(9)  # the randomized SVD (and "random") draw from torch's RNG
        models[lib] = lib.get_peft_model(model, cfg)
    theirs, ours = models[peft], models[fastpeft]
    for layer in TARGETS:
        (a, b), (pa, pb) = _factors(ours, layer), _factors(theirs, layer)
        close(a, pa, tol=1e-4)
        close(b, pb, tol=1e-4)
        close(ours.get_base_model().get_submodule(layer).base_layer.weight,
              theirs.get_base_model().get_submodule(layer).base_layer.weight, tol=1e-5)
    with torch.no_grad():
        close(ours(input_ids=X), base(input_ids=X), tol=1e-4)


def test_lora_ga_cache_and_errors(tmp_path):
    base = base_model()
    cfg = lora_config(fastpeft, "lora_ga")
    first = copy.deepcopy(base)
    fastpeft.preprocess_loraga(first, cfg, train_step=lambda: _lm_backward(first), cache_file=str(tmp_path / "g.pt"))
    second = copy.deepcopy(base)
    fastpeft.preprocess_loraga(second, cfg, train_step=None, cache_file=str(tmp_path / "g.pt"))
    for layer in TARGETS:
        assert torch.equal(first.get_submodule(layer)._peft_loraga_grad, second.get_submodule(layer)._peft_loraga_grad)
    with pytest.raises(ValueError, match="lora_ga_config"):
        fastpeft.preprocess_loraga(base, fastpeft.LoraConfig(target_modules=TARGETS, init_lora_weights="lora_ga"),
                                   train_step=lambda: None)
    with pytest.warns(UserWarning, match="run preprocess_loraga first"):  # peft falls back to the default init
        fastpeft.get_peft_model(copy.deepcopy(base), cfg)


def test_weighted_combination_of_loaded_corda_adapters(tmp_path):
    """Combining adapters creates one with the first's config; a CorDA init must not run (or fail) there."""
    pm, residual = peft_trained_adapter("corda", tmp_path / "peft")
    ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "peft")
    ours.load_adapter(tmp_path / "peft", adapter_name="again")
    ours.add_weighted_adapter(["default", "again"], [0.5, 0.5], "mix", combination_type="cat")
    ours.set_adapter("mix")
    with torch.no_grad():
        close(ours.eval()(input_ids=X), pm(input_ids=X))
    for name, p in ours.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, residual.get_parameter(name.replace(".base_layer", ""))), name


def test_lora_ga_adapter_on_conv_and_embedding_loads(tmp_path):
    """peft gives conv and embedding layers the default init under "lora_ga", so such adapters exist and load."""
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.lin = nn.Linear(4, 2)

        def forward(self, ids):
            h = self.emb(ids).permute(0, 2, 1).unsqueeze(-1)  # [batch, 3, length, 1]
            return self.lin(self.conv(h).squeeze(-1).permute(0, 2, 1))

    torch.manual_seed(0)
    base = ConvNet()
    cfg = peft.LoraConfig(r=2, target_modules=["emb", "conv"], init_lora_weights="lora_ga",
                          lora_ga_config=peft.LoraGAConfig())
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.1)
    pm.save_pretrained(tmp_path)
    ids = torch.randint(0, 10, (2, 5))
    ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        close(ours(ids), pm(ids))
    fastpeft.get_peft_model(copy.deepcopy(base), lora_config(fastpeft, "lora_ga", target_modules=["emb", "conv"]))


@pytest.mark.parametrize("init", ["corda", "lora_ga", "pissa", "olora"])
def test_convert_to_plain_lora_for_the_original_base(init, tmp_path):
    """peft's workflow for inits that change W: save the initial adapter, train, save with
    path_initial_model_for_weight_conversion: a rank-2r LoRA for the *original* base, same as peft's conversion."""
    base = base_model()
    results = {}
    # peft's OLoRA factorises a Conv1D weight in its stored [in, out] layout, so W_res + s B A != W there
    targets = [t for t in TARGETS if not (init == "olora" and t == "c1d")]
    for lib in (peft, fastpeft):
        model = copy.deepcopy(base)
        cfg = lora_config(lib, init, target_modules=targets)
        if init == "corda":
            (preprocess_corda if lib is fastpeft else peft_corda_module().preprocess_corda)(
                model, cfg, run_model=_calibration(model))
        elif init == "lora_ga":
            lib.preprocess_loraga(model, cfg, train_step=lambda m=model: _lm_backward(m))
        torch.manual_seed(9)
        pm = lib.get_peft_model(model, cfg)
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(tmp_path / lib.__name__ / "init")
        torch.manual_seed(3)  # "training"
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.add_(0.1 * torch.randn_like(p))
        with torch.no_grad():
            results[lib] = pm.eval()(input_ids=X)
        pm.save_pretrained(tmp_path / lib.__name__ / "lora",
                           path_initial_model_for_weight_conversion=str(tmp_path / lib.__name__ / "init"))
    close(results[fastpeft], results[peft], tol=1e-4)
    saved = json.loads((tmp_path / "fastpeft" / "lora" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    for loader in (peft, fastpeft):  # ours, on the original base, in both libraries
        converted = loader.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fastpeft" / "lora").eval()
        with torch.no_grad():
            close(converted(input_ids=X), results[fastpeft], tol=1e-4)
