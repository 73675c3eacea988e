"""LoHa / LoKr conformance with peft 0.21.2 (the oracle): structure and state-dict keys, initialisation,
factorisation, outputs and gradients (train and eval), merging, several adapters, dropout behaviour,
checkpoints both ways through PeftModel, and config checks."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from _peft_testing import close, comparable_config, inputs, logits, read_config, read_tensors, seeded_pair, tiny_llama

peft = pytest.importorskip("peft")
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.tuners import lycoris  # noqa: E402
from fastpeft.tuners.base import BaseTunerLayer  # noqa: E402
from fastpeft.tuners.loha import LoHaConfig, LoHaModel  # noqa: E402
from fastpeft.tuners.lokr import LoKrConfig, LoKrModel, factorization  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

METHODS = {
    "loha": (peft.LoHaConfig, peft.LoHaModel, LoHaConfig, LoHaModel, "hada_"),
    "lokr": (peft.LoKrConfig, peft.LoKrModel, LoKrConfig, LoKrModel, "lokr_"),
}


class Net(nn.Module):
    """Linear, Conv1d (k=3; k=1 with stride 2), Conv2d (3x3; grouped and dilated 3x3; 1x1), all on the forward
    path."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 16)
        self.c1 = nn.Conv1d(16, 8, 3, padding=1)
        self.c1k1 = nn.Conv1d(8, 8, 1, stride=2, bias=False)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.c2g = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.c11 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        c = self.c1k1(torch.relu(self.c1(h.transpose(1, 2))))
        d = self.c2g(torch.tanh(self.c2(c.unsqueeze(-1).expand(-1, -1, -1, 3))))
        return self.c11(d).flatten(1)


LAYERS = ["lin", "c1", "c1k1", "c2", "c2g", "c11"]
X = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))

VARIANTS = {
    "plain": {},
    "effective_conv": {"use_effective_conv2d": True},
    "low_rank": {"r": 2, "alpha": 3},  # LoKr: decomposed lokr_w2 everywhere
    "patterns": {"r": 4, "rank_pattern": {"c2": 2, "lin": 1}, "alpha_pattern": {"c1": 7.5}},
}
LOKR_VARIANTS = {
    "decompose_both": {"r": 1, "decompose_both": True},
    "decompose_factor": {"r": 2, "decompose_factor": 4},
    "decompose_factor_8": {"r": 8, "decompose_factor": 2, "decompose_both": True},
}
CASES = [(m, v) for m in METHODS for v in VARIANTS] + [("lokr", v) for v in LOKR_VARIANTS]


def _kwargs(method, variant, **extra):
    kw = {"target_modules": LAYERS, "init_weights": False, **({**VARIANTS, **LOKR_VARIANTS}[variant])}
    return {**kw, **extra}


def pair(method, kwargs, base=None, adapter_name="default", seed=0):
    """(peft model, fastpeft model) on copies of `base` (default Net()) built under the same seed; peft's
    state dict is then loaded into ours anyway."""
    pcfg, pmodel, fcfg, fmodel, _ = METHODS[method]
    theirs, ours = seeded_pair(pmodel, pcfg(**copy.deepcopy(kwargs)), fmodel, fcfg(**copy.deepcopy(kwargs)),
                               Net() if base is None else base, adapter_name, seed)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    model(x).pow(2).mean().backward()
    out = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}
    out["x"] = x.grad
    return out


def _peft_cp_weight_autograd(t1, w1a, w1b, t2, w2a, w2b, scale):
    """peft's LoHa CP weight with plain autograd. peft 0.21.2's hand-written HadaWeightCP.backward builds the
    gradients of hada_w1_a / hada_w2_a from the other factor's (t, w_b) and so gets them wrong (its forward is
    right; see test_peft_loha_cp_backward_is_wrong): the comparisons with peft use this in its place."""
    cp = lambda t, a, b: torch.einsum("ijkl,jr,ip->prkl", t, b, a)  # noqa: E731
    return cp(t1, w1a, w1b) * cp(t2, w2a, w2b) * scale


@pytest.fixture(autouse=True)
def _fix_peft_loha_cp_backward(monkeypatch):
    import peft.tuners.loha.layer as peft_loha_layer

    monkeypatch.setattr(peft_loha_layer, "make_weight_cp", _peft_cp_weight_autograd)


# ---- structure, forward, backward -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("method,variant", CASES)
def test_outputs_and_gradients_match_peft(method, variant, mode):
    theirs, ours = pair(method, _kwargs(method, variant))
    for m in (theirs, ours):
        m.train(mode == "train")  # train: rank/module dropout 0, but the RNG draws still happen
    for layer in LAYERS:
        t, o = theirs.model.get_submodule(layer), ours.model.get_submodule(layer)
        assert isinstance(o, BaseTunerLayer) and type(o).__name__ == type(t).__name__
        assert (o.r, o.alpha, o.scaling) == (t.r, t.alpha, t.scaling)
    close(theirs(X), ours(X))
    gt, go = _grads(theirs, X), _grads(ours, X)
    assert set(gt) == set(go) and len(go) > 1
    for n in gt:
        close(gt[n], go[n], tol=1e-4)


def test_loha_cp_gradients_are_correct():
    """gradcheck (finite differences, float64) of LoHa's CP conv weights, where peft's backward is wrong."""
    model = LoHaModel(Net().double(), LoHaConfig(target_modules=["c2"], use_effective_conv2d=True, init_weights=False, r=2))
    layer = model.model.c2
    names = ["hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b"]
    params = [getattr(layer, n)["default"] for n in names]
    x = torch.randn(1, 8, 4, 3, dtype=torch.float64)

    def f(*ps):
        return torch.func.functional_call(layer, {f"{n}.default": v for n, v in zip(names, ps)}, (x,))

    inputs_ = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(f, inputs_, eps=1e-6, atol=1e-5)


def test_peft_loha_cp_backward_is_wrong():
    """Why the fixture above replaces peft's CP weight: its forward equals ours, its w_a gradients do not."""
    from peft.tuners.loha.layer import HadaWeightCP

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 2, 3, 3), (2, 4), (2, 5), (2, 2, 3, 3), (2, 4), (2, 5)]
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    scale = torch.tensor(0.5, dtype=torch.float64)
    gw = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64)
    ref, theirs = _peft_cp_weight_autograd(*args, scale), HadaWeightCP.apply(*args, scale)
    torch.testing.assert_close(ref, theirs)
    g_ref = torch.autograd.grad((ref * gw).sum(), args)
    g_theirs = torch.autograd.grad((theirs * gw).sum(), args)
    right = [torch.allclose(a, b) for a, b in zip(g_ref, g_theirs)]
    assert right == [True, False, True, True, False, True]  # t1, w1_a, w1_b, t2, w2_a, w2_b


def test_ops_shim_contract():
    """The three ops (stand-ins until fastpeft.ops has them) against their definitions."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 12, generator=g)
    w1, w2 = torch.randn(4, 3, generator=g), torch.randn(5, 4, generator=g)
    a1, b1, a2, b2 = (torch.randn(s, generator=g) for s in ((4, 2), (2, 3), (5, 2), (2, 4)))
    expect = nn.functional.linear(x, torch.kron(w1, w2)) * 0.7
    close(expect, lycoris.kron_linear(x, w1, w2, scale=0.7))
    close(nn.functional.linear(x, torch.kron(a1 @ b1, a2 @ b2)),
          lycoris.kron_linear(x, w1_a=a1, w1_b=b1, w2_a=a2, w2_b=b2))
    close(nn.functional.linear(x, torch.kron(w1, a2 @ b2)), lycoris.kron_linear(x, w1, w2_a=a2, w2_b=b2))
    ha, hb, ka, kb = (torch.randn(s, generator=g) for s in ((6, 2), (2, 12), (6, 2), (2, 12)))
    delta = (ha @ hb) * (ka @ kb) * 1.5
    close(delta, lycoris.hadamard_delta(ha, hb, ka, kb, 1.5))
    close(nn.functional.linear(x, delta), lycoris.hadamard_linear(x, ha, hb, ka, kb, scale=1.5))


def test_ops_are_used_for_linear_layers(monkeypatch):
    calls = []
    for name in ("kron_linear", "hadamard_linear"):
        real = getattr(lycoris, name)
        for mod in ("fastpeft.tuners.loha.layer", "fastpeft.tuners.lokr.layer"):
            import importlib

            module = importlib.import_module(mod)
            if hasattr(module, name):
                monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    for method in METHODS:
        _, ours = pair(method, _kwargs(method, "plain"))
        ours(X)
    assert calls == ["hadamard_linear", "kron_linear"]


@pytest.mark.parametrize("method,init", [("loha", True), ("lokr", True), ("lokr", "lycoris")])
def test_default_init_equals_peft_and_is_a_no_op(method, init):
    kw = {"target_modules": LAYERS, "init_weights": init, "use_effective_conv2d": True, "r": 2}
    base = Net()
    theirs, ours = pair(method, kw, base=base, seed=7)  # same values as peft's under the same seed
    with torch.no_grad():
        close(base(X), ours(X), tol=0)
    sd = ours.state_dict()
    zero = [k for k, v in sd.items() if METHODS[method][4] in k and not v.any()]
    nonzero = [k for k, v in sd.items() if METHODS[method][4] in k and v.any()]
    assert zero and nonzero
    for k in nonzero:  # He-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        fan_in = sd[k][0].numel()
        assert sd[k].abs().max() <= 1 / fan_in**0.5 + 1e-6, k


def test_factorization_equals_peft():
    for dim in list(range(1, 400)) + [512, 768, 1000, 1024, 1536, 2048, 3072, 4096, 4097, 5120, 11008]:
        for factor in (-1, 0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64, 100, 4096):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("use_w", ["full", "decomposed"])
def test_lokr_scaling_is_alpha_over_r_as_peft(use_w):
    """LyCORIS uses scale 1 when both factors are full; peft (and so fastpeft) keeps alpha / r."""
    r = 16 if use_w == "full" else 1
    theirs, ours = pair("lokr", {"target_modules": ["lin"], "r": r, "alpha": 4, "init_weights": False})
    layer = ours.model.lin
    assert ("default" in layer.lokr_w1 and "default" in layer.lokr_w2) == (use_w == "full")
    assert layer.scaling["default"] == theirs.model.lin.scaling["default"] == 4 / r
    w1 = layer.lokr_w1["default"] if "default" in layer.lokr_w1 else None
    if w1 is not None and "default" in layer.lokr_w2:
        close(torch.kron(w1, layer.lokr_w2["default"]) * 4 / r, layer.get_delta_weight("default"))


# ---- merging, several adapters, disabling --------------------------------------------------------


@pytest.mark.parametrize("method,variant", [(m, v) for m in METHODS for v in ("plain", "effective_conv")])
def test_merge_unmerge_and_unload(method, variant):
    theirs, ours = pair(method, _kwargs(method, variant))
    ours.eval()
    theirs.eval()
    expected = ours(X)
    base_out = ours.model.lin.base_layer(X)
    theirs.merge_adapter()
    ours.merge_adapter()
    for layer in LAYERS:
        close(theirs.model.get_submodule(layer).get_base_layer().weight,
              ours.model.get_submodule(layer).get_base_layer().weight)
        assert ours.model.get_submodule(layer).merged
    close(expected, ours(X))
    ours.unmerge_adapter()
    assert not ours.model.lin.merged
    close(base_out, ours.model.lin.base_layer(X))
    close(expected, ours(X))
    ours.merge_adapter(safe_merge=True)
    ours.unmerge_adapter()
    merged = copy.deepcopy(ours).merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    close(expected, merged(X))
    close(theirs.merge_and_unload()(X), merged(X))
    plain = ours.unload()
    assert isinstance(plain.lin, nn.Linear) and not any(isinstance(m, BaseTunerLayer) for m in plain.modules())


def test_safe_merge_refuses_a_broken_adapter():
    _, ours = pair("loha", _kwargs("loha", "plain"))
    with torch.no_grad():
        ours.model.lin.hada_w1_a["default"][0, 0] = float("nan")
    before = ours.model.lin.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(before, ours.model.lin.base_layer.weight)


@pytest.mark.parametrize("method", METHODS)
def test_several_adapters_and_disable(method):
    pcfg, _, fcfg, _, _ = METHODS[method]
    kw1 = _kwargs(method, "plain")
    kw2 = {"target_modules": ["lin", "c2", "c11"], "r": 2, "alpha": 5, "init_weights": False,
           "use_effective_conv2d": True}
    base = Net()
    theirs, ours = pair(method, kw1, base=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(11)
        theirs.peft_config["other"] = pcfg(**kw2)
        theirs.inject_adapter(theirs.model, "other")
        torch.manual_seed(11)
        ours.peft_config["other"] = fcfg(**kw2)
        ours.inject_adapter(ours.model, "other")
    st, so = theirs.state_dict(), ours.state_dict()
    assert set(st) == set(so)
    for k in st:
        assert torch.equal(st[k], so[k]), k
    theirs.eval()
    ours.eval()
    for active in ("other", ["default", "other"], "default"):
        theirs.set_adapter(active)
        ours.set_adapter(active)
        close(theirs(X), ours(X))
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    ours.set_adapter(["default", "other"])
    y_both = ours(X)
    ours.merge_adapter()
    close(y_both, ours(X))
    ours.disable_adapter_layers()  # unmerges, then runs the base model
    close(ours(X), base(X), tol=1e-6)  # (merge + unmerge leaves float rounding in the base weights)
    assert not ours.model.lin.merged
    ours.enable_adapter_layers()
    close(y_both, ours(X))
    ours.delete_adapter("other")
    assert ours.active_adapters == ["default"]
    assert not any("other" in k for k in ours.state_dict())


def test_disable_adapter_gives_base_outputs_through_peft_model():
    base = Net()
    model = fastpeft.get_peft_model(copy.deepcopy(base), LoKrConfig(target_modules=LAYERS, init_weights=False))
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(X), base(X))
        with model.disable_adapter():
            close(model(X), base(X), tol=0)


# ---- dropout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,extra", [
    ("loha", {}), ("lokr", {"rank_dropout_scale": True}), ("lokr", {"rank_dropout_scale": False}),
])
def test_rank_and_module_dropout_match_peft_under_the_same_seed(method, extra):
    """fastpeft draws torch's default RNG as peft does (one rand(1) per adapter for module dropout, one
    rand(out_features) for rank dropout), so the same seed gives the same masks and outputs; for Linear the
    mask scales the op's output columns instead of ΔW's rows (same product)."""
    kw = _kwargs(method, "plain", rank_dropout=0.4, module_dropout=0.3, **extra)
    theirs, ours = pair(method, kw)
    theirs.train()
    ours.train()
    outs = []
    for step in range(6):
        torch.manual_seed(100 + step)
        yt = theirs(X)
        torch.manual_seed(100 + step)
        yo = ours(X)
        close(yt, yo)
        outs.append(yo)
    assert any(not torch.allclose(outs[0], o) for o in outs[1:]), "dropout must vary between steps"
    torch.manual_seed(1)
    gt = _grads(theirs, X)
    torch.manual_seed(1)
    go = _grads(ours, X)
    for n in gt:
        close(gt[n], go[n], tol=1e-4)


@pytest.mark.parametrize("method,rescale", [("loha", True), ("lokr", True), ("lokr", False)])
def test_rank_dropout_formula(method, rescale):
    kw = {"target_modules": ["lin"], "init_weights": False, "rank_dropout": 0.5}
    if method == "lokr":
        kw["rank_dropout_scale"] = rescale
    _, ours = pair(method, kw)
    layer = ours.model.lin
    layer.train()
    torch.manual_seed(5)
    torch.rand(1)  # module dropout draw
    keep = (torch.rand(16) > 0.5).float()
    if rescale:
        keep = keep / keep.mean()
    torch.manual_seed(5)
    got = layer(X) - layer.base_layer(X)
    expected = nn.functional.linear(X, layer.get_delta_weight("default") * keep[:, None])
    close(expected, got)
    assert (got.abs().amax(dim=(0, 1)) == 0).sum() == (keep == 0).sum()  # dropped output features
    # all rows dropped (p -> 1): peft divides 0 by 0; here the delta is zero, never NaN
    layer.rank_dropout["default"] = 0.999999
    torch.manual_seed(0)
    assert torch.isfinite(layer(X)).all()


def test_module_dropout_one_skips_the_adapter_in_training_only():
    base = Net()
    _, ours = pair("loha", _kwargs("loha", "plain", module_dropout=1.0), base=base)
    ours.train()
    close(base(X), ours(X), tol=0)
    ours.eval()
    assert not torch.allclose(base(X), ours(X))


# ---- PeftModel, checkpoints, config JSON ----------------------------------------------------------

LLAMA_CASES = {
    "loha": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM",
             "init_weights": False, "rank_pattern": {"down_proj": 2}},
    "lokr": {"r": 2, "alpha": 6, "target_modules": ["q_proj", "k_proj", "gate_proj"], "task_type": "CAUSAL_LM",
             "init_weights": False, "decompose_both": True, "decompose_factor": 4, "alpha_pattern": {"k_proj": 3}},
    "lokr-default-targets": {"task_type": "CAUSAL_LM", "init_weights": "lycoris", "rank_dropout_scale": True},
}


def _llama_pair(case):
    method = case.split("-")[0]
    pcfg, _, fcfg, _, _ = METHODS[method]
    base = tiny_llama()
    kw = LLAMA_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(base), pcfg(**copy.deepcopy(kw)))
        torch.manual_seed(0)
        fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg(**copy.deepcopy(kw)))
    return base, pm, fm


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_outputs_gradients_and_checkpoints_both_ways(case, tmp_path):
    base, pm, fm = _llama_pair(case)
    assert type(fm.base_model).__name__ == type(pm.base_model).__name__
    sp, sf = pm.state_dict(), fm.state_dict()
    assert list(sp) == list(sf)
    assert all(torch.equal(sp[k], sf[k]) for k in sp)  # same init under the same seed
    _randomize(pm)
    fm.load_state_dict(pm.state_dict())
    batch = inputs()
    for mode in ("train", "eval"):
        pm.train(mode == "train")
        fm.train(mode == "train")
        close(logits(pm, batch), logits(fm, batch), tol=1e-4)
    for m in (pm, fm):
        m.zero_grad()
        m(**batch).logits.pow(2).mean().backward()
    gp = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    gf = {n: p.grad for n, p in fm.named_parameters() if p.requires_grad}
    assert set(gp) == set(gf) and gf
    for n in gp:
        close(gp[n], gf[n], tol=1e-4)

    pm.eval()
    fm.eval()
    expected = logits(pm, batch)
    pdir, fdir = str(tmp_path / "peft"), str(tmp_path / "fast")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(pdir)
        fm.save_pretrained(fdir)
    pt, ft = read_tensors(pdir), read_tensors(fdir)
    assert sorted(pt) == sorted(ft)
    for k in pt:
        assert torch.equal(pt[k], ft[k]), k
    assert comparable_config(read_config(fdir)) == comparable_config(read_config(pdir))
    assert read_config(fdir)["peft_type"] == case.split("-")[0].upper()

    loaded_f = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), pdir)  # peft -> fastpeft
    loaded_p = peft.PeftModel.from_pretrained(copy.deepcopy(base), fdir)  # fastpeft -> peft
    assert isinstance(loaded_f.peft_config["default"], METHODS[case.split("-")[0]][2])
    close(expected, logits(loaded_f, batch), tol=1e-4)
    close(expected, logits(loaded_p.eval(), batch), tol=1e-4)
    assert not any(p.requires_grad for p in loaded_f.parameters())  # inference mode, as peft
    merged = loaded_f.merge_and_unload()
    close(expected, logits(merged, batch), tol=1e-4)


def test_small_model_checkpoint_with_modules_to_save(tmp_path):
    base = Net()
    kw = {"target_modules": ["lin", "c1", "c2"], "modules_to_save": ["c11"], "init_weights": False,
          "use_effective_conv2d": True, "r": 2}
    fm = fastpeft.get_peft_model(copy.deepcopy(base), LoKrConfig(**kw))
    _randomize(fm)
    with torch.no_grad():
        fm.base_model.model.c11.modules_to_save["default"].weight.mul_(2)
    fm.eval()
    expected = fm(X)
    fm.save_pretrained(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(expected, pm(X))
    back = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(expected, back(X))


# ---- configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_config_fields_defaults_and_json_equal_peft(method, tmp_path):
    pcfg, _, fcfg, _, _ = METHODS[method]
    ours, theirs = fcfg(), pcfg()
    assert ours.to_dict().keys() == theirs.to_dict().keys()
    for k, v in theirs.to_dict().items():
        if k not in ("peft_version",):
            assert ours.to_dict()[k] == (v.value if hasattr(v, "value") else v), k
    kw = {"r": 3, "alpha": 5, "target_modules": ["a", "b"], "exclude_modules": ["c"], "rank_pattern": {"a": 2},
          "alpha_pattern": {"b": 1.5}, "layers_to_transform": [0], "layers_pattern": "layers", "module_dropout": 0.1}
    if method == "lokr":
        kw.update(decompose_both=True, decompose_factor=4, rank_dropout_scale=True, init_weights="lycoris")
    pcfg(**kw).save_pretrained(str(tmp_path / "p"))
    fcfg(**kw).save_pretrained(str(tmp_path / "f"))
    assert comparable_config(read_config(str(tmp_path / "f"))) == comparable_config(read_config(str(tmp_path / "p")))
    loaded = fastpeft.PeftConfig.from_pretrained(str(tmp_path / "p"))
    assert type(loaded) is fcfg and loaded.target_modules == {"a", "b"}
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "f")).to_dict()["peft_type"] == method.upper()


@pytest.mark.parametrize("method,kwargs,error,match", [
    ("loha", {"r": 0}, ValueError, "r must be a positive"),
    ("lokr", {"r": -1}, ValueError, "r must be a positive"),
    ("loha", {"rank_pattern": {"x": 0}}, ValueError, "rank_pattern"),
    ("loha", {"rank_dropout": 1.0}, ValueError, "rank_dropout"),
    ("lokr", {"module_dropout": -0.1}, ValueError, "module_dropout"),
    ("lokr", {"decompose_factor": 0}, ValueError, "decompose_factor"),
    ("lokr", {"init_weights": "gaussian"}, TypeError, "init_weights"),
    ("loha", {"init_weights": "lycoris"}, TypeError, "init_weights"),
    ("loha", {"r": 2.5}, TypeError, r"LoHaConfig\.r must be int"),
    ("lokr", {"layers_pattern": "layers"}, ValueError, "layers_to_transform"),
])
def test_bad_configs_raise_clear_errors(method, kwargs, error, match):
    with pytest.raises(error, match=match):
        METHODS[method][2](**kwargs)


def test_regex_targets_with_layers_to_transform_warn_as_peft_ignores_them():
    with pytest.warns(UserWarning, match="layers_to_transform is ignored"):
        cfg = LoHaConfig(target_modules="lin.*", layers_to_transform=[0])
    assert cfg.layers_to_transform == [0]


@pytest.mark.parametrize("method", METHODS)
def test_unsupported_layer_and_unknown_targets(method):
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4))
    with pytest.raises(TypeError, match="Embedding is not supported"):
        METHODS[method][3](copy.deepcopy(model), METHODS[method][2](target_modules=["0"]))
    with pytest.raises(ValueError, match="not found in the base model"):
        METHODS[method][3](copy.deepcopy(model), METHODS[method][2](target_modules=["nope"]))


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_base_adapter_dtypes_outputs_and_merge_equal_peft(method):
    """A bf16 base: adapters kept in float32 (autocast_adapter_dtype), the delta computed in float32 and the
    output cast back to bf16, merged weights in bf16 -- all as peft."""
    pcfg, _, fcfg, _, prefix = METHODS[method]
    base = tiny_llama().to(torch.bfloat16)
    kw = {"target_modules": ["q_proj", "v_proj"], "init_weights": False, "r": 2}
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg(**kw))
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg(**kw))
    sp, sf = pm.state_dict(), fm.state_dict()
    for k in sp:
        assert sp[k].dtype == sf[k].dtype and torch.equal(sp[k], sf[k]), k
    assert {v.dtype for k, v in sf.items() if prefix in k} == {torch.float32}
    batch = inputs()
    yp, yf = logits(pm, batch), logits(fm, batch)
    assert yf.dtype == yp.dtype == torch.bfloat16
    close(yp.float(), yf.float(), tol=1e-2)
    pm.merge_adapter()
    fm.merge_adapter()
    wp = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    wf = fm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert wf.dtype == torch.bfloat16
    close(wp.float(), wf.float(), tol=1e-2)


def test_peft_model_load_adapter_add_adapter_and_switch(tmp_path):
    """Two LoKr adapters saved by peft, loaded into one fastpeft PeftModel; a third added; switching between them."""
    base = tiny_llama()
    batch = inputs()
    expected = {}
    for name, cfg in (("a", peft.LoKrConfig(target_modules=["q_proj", "o_proj"], init_weights=False, r=2)),
                      ("b", peft.LoKrConfig(target_modules=["v_proj"], init_weights=False, decompose_both=True,
                                            r=1, alpha=3))):
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        _randomize(pm, seed=len(name) + ord(name))
        pm.eval()
        pm.save_pretrained(str(tmp_path / name))
        expected[name] = logits(pm, batch)
    fm = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"), adapter_name="a")
    fm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    for name in ("a", "b", "a"):
        fm.set_adapter(name)
        close(expected[name], logits(fm, batch), tol=1e-4)
    fm.add_adapter("c", LoKrConfig(target_modules=["q_proj"]))  # default init: a no-op adapter
    fm.set_adapter("c")
    close(logits(base, batch), logits(fm, batch), tol=1e-5)
    assert {n.split(".")[-1] for n, p in fm.named_parameters() if p.requires_grad} == {"c"}


@pytest.mark.parametrize("method", METHODS)
def test_scale_helpers_equal_peft(method):
    theirs, ours = pair(method, _kwargs(method, "patterns"))
    for m in (theirs, ours):
        layer = m.model.c1
        layer.scale_layer(0.5)
        a = dict(layer.scaling)
        layer.set_scale("default", 3.0)
        b = dict(layer.scaling)
        layer.unscale_layer()
        c = dict(layer.scaling)
        m._scales = (a, b, c)
    assert ours._scales == theirs._scales


@pytest.mark.parametrize("method", METHODS)
def test_dropout_with_two_active_adapters_matches_peft(method):
    pcfg, _, fcfg, _, _ = METHODS[method]
    extra = {"rank_dropout_scale": True} if method == "lokr" else {}
    theirs, ours = pair(method, _kwargs(method, "plain", rank_dropout=0.3, module_dropout=0.5, **extra))
    kw2 = {"target_modules": ["lin", "c2"], "r": 2, "init_weights": False, "rank_dropout": 0.5, "module_dropout": 0.2}
    for m, cfg in ((theirs, pcfg), (ours, fcfg)):
        torch.manual_seed(3)
        m.peft_config["second"] = cfg(**kw2)
        m.inject_adapter(m.model, "second")
        m.set_adapter(["default", "second"])
        m.train()
    ours.load_state_dict(theirs.state_dict())
    for step in range(4):
        torch.manual_seed(step)
        yt = theirs(X)
        torch.manual_seed(step)
        close(yt, ours(X))
