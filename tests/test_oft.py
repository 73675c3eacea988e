"""OFT conformance with peft 0.21.2 (the oracle): structure, state-dict keys and initialisation, outputs and
gradients (exact / Neumann Cayley, r / oft_block_size, block_share, coft; Linear, Conv1D, Conv2d, Embedding;
float32 and bfloat16), merging, several adapters, module dropout, checkpoints both ways, config checks.

Where peft 0.21.2 is wrong, fastpeft is compared with peft's correct path and peft's bug is pinned by a test
(so that a peft fix shows up): its unmerged Conv2d forward for kernels > 1, its module_dropout (never
applied), and its merge of several adapters on one input-rotating layer (folded in the wrong order).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from _peft_testing import (
    close, comparable_config, inputs, logits, read_config, read_tensors, seeded_pair, tiny_gpt2, tiny_llama,
)

peft = pytest.importorskip("peft")
from peft.tuners.oft.layer import OFTLayer as PeftOFTLayer  # noqa: E402
from peft.tuners.oft.layer import OFTRotationModule as PeftRotation  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.tuners.base import BaseTunerLayer  # noqa: E402
from fastpeft.tuners.oft import OFTConfig, OFTModel  # noqa: E402
from fastpeft.tuners.oft import layer as oft_layer  # noqa: E402
from fastpeft.tuners.oft.layer import adjust_oft_parameters  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


class Net(nn.Module):
    """Embedding (dim 8), Linear (8 -> 12), Conv2d 1x1 (4 -> 6) and 3x3 (6 -> 4, filter 54: block size 4
    is adjusted to 3), each on its own input so that every input gradient can be compared."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 12)
        self.c1 = nn.Conv2d(4, 6, 1)
        self.c3 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, ids, x, img):
        e = self.emb(ids)
        h = self.lin(x)
        c = self.c3(torch.tanh(self.c1(img)))
        return torch.cat([e.flatten(1), h.flatten(1), c.flatten(1)], dim=1)


GEN = torch.Generator().manual_seed(3)
IDS = torch.randint(0, 10, (2, 5), generator=GEN)
X = torch.randn(2, 5, 8, generator=GEN)
IMG = torch.randn(2, 4, 5, 5, generator=GEN)
# peft's unmerged Conv2d forward is right for 1x1 kernels only: the model comparisons target these
PEFT_SAFE = ["emb", "lin", "c1"]

VARIANTS = {
    "block4_neumann": {"oft_block_size": 4},
    "block4_exact": {"oft_block_size": 4, "use_cayley_neumann": False},
    "r2": {"r": 2, "oft_block_size": 0},
    "r2_exact": {"r": 2, "oft_block_size": 0, "use_cayley_neumann": False},
    "neumann3": {"oft_block_size": 2, "num_cayley_neumann_terms": 3},
    "block_share": {"oft_block_size": 2, "block_share": True},
    "block_share_exact": {"oft_block_size": 4, "block_share": True, "use_cayley_neumann": False},
    "coft": {"oft_block_size": 4, "coft": True, "eps": 0.05},
    "coft_block_share": {"oft_block_size": 2, "coft": True, "eps": 0.05, "block_share": True},
}


def _kwargs(variant, **extra):
    return {"target_modules": PEFT_SAFE, "init_weights": False, **VARIANTS[variant], **extra}


def pair(kwargs, base=None, adapter_name="default", seed=0):
    """(peft model, fastpeft model) on copies of `base` (default Net()) built under the same seed."""
    return seeded_pair(peft.OFTModel, peft.OFTConfig(**copy.deepcopy(kwargs)), OFTModel,
                       OFTConfig(**copy.deepcopy(kwargs)), Net() if base is None else base, adapter_name, seed)


def _grads(model, *args):
    model.zero_grad()
    args = [a.clone().requires_grad_(True) if a.is_floating_point() else a for a in args]
    model(*args).pow(2).mean().backward()
    out = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
           for n, p in model.named_parameters() if p.requires_grad}
    out.update({f"input{i}": a.grad for i, a in enumerate(args) if a.is_floating_point()})
    return out


def _peft_rotation(rot):
    """peft's own rotation module holding the same parameters as fastpeft's `rot` (its dense blockdiag(R) is
    the oracle where peft's layer forward cannot be used)."""
    module = PeftRotation(
        rot.r, rot.n_elements, rot.block_size, rot.in_features, coft=rot.coft, eps=rot.eps,
        block_share=rot.block_share, use_cayley_neumann=rot.neumann_terms > 0,
        num_cayley_neumann_terms=rot.neumann_terms,
    )
    module.weight = rot.weight
    return module


# ---- outputs, gradients, structure --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_and_gradients_match_peft(variant, mode):
    theirs, ours = pair(_kwargs(variant))
    for m in (theirs, ours):
        m.train(mode == "train")
    for name in PEFT_SAFE:
        t, o = theirs.model.get_submodule(name), ours.model.get_submodule(name)
        assert isinstance(o, BaseTunerLayer) and type(o).__name__ == type(t).__name__
        shape = ("r", "oft_block_size", "in_features", "out_features")
        assert [getattr(o, a) for a in shape] == [getattr(t, a) for a in shape]
    close(theirs(IDS, X, IMG), ours(IDS, X, IMG))
    gt, go = _grads(theirs, IDS, X, IMG), _grads(ours, IDS, X, IMG)
    assert set(gt) == set(go) and len(go) >= 5
    for n in gt:
        close(gt[n], go[n], tol=1e-4)
    if VARIANTS[variant].get("coft"):  # the projection happened, in place, in both
        close(theirs.model.lin.oft_R["default"].weight, ours.model.lin.oft_R["default"].weight)
        norms = ours.model.lin.oft_R["default"].weight.norm(dim=1) * math.sqrt(2)
        radius = 0.05 / math.sqrt(ours.model.lin.oft_R["default"].weight.shape[0])
        assert (norms <= radius * (1 + 1e-5)).all()


def test_default_init_is_the_identity_and_equals_peft():
    base = Net()
    _, ours = pair({"target_modules": ["emb", "lin", "c1", "c3"]}, base=base, seed=5)
    assert all(not v.any() for k, v in ours.state_dict().items() if "oft_" in k)
    close(base(IDS, X, IMG), ours(IDS, X, IMG), tol=1e-6)


@pytest.mark.parametrize("exact", [False, True])
def test_rotations_are_the_ops_of_peft_parametrisation(exact):
    """R = cayley(skew(upper-triangle vector)) equals peft's blocks; forward is one block_diag_rotate call and
    one cayley call per adapter (no dense matrix)."""
    _, ours = pair(_kwargs("block4_exact" if exact else "block4_neumann"))
    rot = ours.model.lin.oft_R["default"]
    dense = _peft_rotation(rot).get_weight()
    blocks = rot.rotation(dropout=False)
    close(torch.block_diag(*blocks.unbind(0)), dense, tol=1e-6)
    close(ours.model.lin.get_delta_weight("default"), dense, tol=1e-6)
    assert torch.equal(rot.skew(rot.weight), -rot.skew(rot.weight).transpose(-1, -2))
    if exact:  # orthogonal
        close(blocks @ blocks.transpose(-1, -2), torch.eye(4).expand_as(blocks), tol=1e-5)
    calls = []
    real_rotate, real_cayley = oft_layer.block_diag_rotate, oft_layer.cayley
    try:
        oft_layer.block_diag_rotate = lambda *a: calls.append("rotate") or real_rotate(*a)
        oft_layer.cayley = lambda *a: calls.append("cayley") or real_cayley(*a)
        ours.model.lin(X)
    finally:
        oft_layer.block_diag_rotate, oft_layer.cayley = real_rotate, real_cayley
    assert calls == ["cayley", "rotate"]


# ---- Conv2d --------------------------------------------------------------------------------------------


def test_peft_unmerged_conv_is_wrong_for_kernels_above_one():
    """Pins peft 0.21.2's bug: its unmerged Conv2d forward (unfold, rotate, fold) sums overlapping patches, so
    even the identity adapter changes a 3x3 conv's output; for 1x1 kernels it is right. Its merge is right."""
    base = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.OFTConfig(target_modules=["c1", "c3"], oft_block_size=2)
        theirs = peft.OFTModel(copy.deepcopy(base), config, "default")
    h = torch.tanh(base.c1(IMG))
    with torch.no_grad():
        close(base.c1(IMG), theirs.model.c1(IMG), tol=1e-6)  # 1x1: identity stays the identity
        assert not torch.allclose(base.c3(h), theirs.model.c3(h), atol=1e-3)  # 3x3: it does not
        theirs.merge_adapter()
        close(base.c3(h), theirs.model.c3(h), tol=1e-6)


CONV_CASES = {
    "3x3_pad1": dict(in_channels=6, out_channels=4, kernel_size=3, padding=1),
    "3x3_stride2": dict(in_channels=6, out_channels=5, kernel_size=3, stride=2, bias=False),
    "3x2_dilated": dict(in_channels=4, out_channels=4, kernel_size=(3, 2), dilation=2, padding=2),
    "grouped": dict(in_channels=8, out_channels=4, kernel_size=3, groups=2, padding=1),
    "reflect": dict(in_channels=4, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
    "1x1": dict(in_channels=4, out_channels=6, kernel_size=1),
}


@pytest.mark.parametrize("variant", ["block4_neumann", "r2_exact", "block_share", "coft"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_rotates_the_filter(case, variant):
    """Our unmerged Conv2d = the base conv (all its parameters) with W_flat @ blockdiag(R)^T, R from peft's
    parametrisation: outputs, input and oft_R gradients; equal to peft's merged conv where peft can build the
    layer (no dilation, no groups) and to peft's unmerged one for 1x1 kernels."""
    torch.manual_seed(1)
    conv = nn.Conv2d(**CONV_CASES[case])
    kw = {**VARIANTS[variant], "target_modules": ["0"], "init_weights": False}
    torch.manual_seed(2)
    ours = OFTModel(nn.Sequential(copy.deepcopy(conv)), OFTConfig(**kw))
    layer = ours.model[0]
    rot = layer.oft_R["default"]
    assert rot.in_features == conv.weight[0].numel()
    img = torch.randn(2, conv.in_channels, 7, 6, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = layer(img)
    gy = torch.randn_like(y)
    g_img, g_rot = torch.autograd.grad(y, (img, rot.weight), gy)

    reference = _peft_rotation(copy.deepcopy(rot))
    reference.coft = False  # our forward projected the weight in place already; peft's get_weight detaches it
    w_flat = conv.weight.reshape(conv.out_channels, -1)
    weight = (w_flat @ reference.get_weight().T).reshape(conv.weight.shape)
    y_ref = conv._conv_forward(img, weight, conv.bias)
    r_img, r_rot = torch.autograd.grad(y_ref, (img, reference.weight), gy)
    close(y_ref, y)
    close(r_img, g_img, tol=1e-4)
    close(r_rot, g_rot, tol=1e-4)

    if conv.dilation == (1, 1) and conv.groups == 1 and conv.kernel_size[0] == conv.kernel_size[1]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.OFTModel(nn.Sequential(copy.deepcopy(conv)), peft.OFTConfig(**kw), "default")
        theirs.load_state_dict(ours.state_dict())
        with torch.no_grad():
            if conv.kernel_size == (1, 1):
                close(theirs(img), y)
            theirs.merge_adapter()
            close(theirs(img), y)
    elif conv.dilation != (1, 1):
        with pytest.raises(ValueError, match="dilation"):  # peft refuses what fastpeft supports
            peft.OFTModel(nn.Sequential(copy.deepcopy(conv)), peft.OFTConfig(**kw), "default")


# ---- Conv1D (transformers), Embedding ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["block4_neumann", "r2_exact", "block_share"])
def test_conv1d_equals_peft_on_the_equivalent_linear(variant):
    """peft's OFT refuses transformers' Conv1D; fastpeft adapts it (fan_in_fan_out) exactly as peft adapts the
    nn.Linear with the transposed weight: outputs, gradients, merged weights."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    c1d = Conv1D(12, 8)  # nf=out, nx=in: weight [8, 12]
    lin = nn.Linear(8, 12)
    with torch.no_grad():
        lin.weight.copy_(c1d.weight.T)
        lin.bias.copy_(c1d.bias)
    kw = {**VARIANTS[variant], "target_modules": ["0"], "init_weights": False}
    with pytest.raises(TypeError, match="not supported"):
        peft.OFTModel(nn.Sequential(copy.deepcopy(c1d)), peft.OFTConfig(**kw), "default")
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        ours = OFTModel(nn.Sequential(copy.deepcopy(c1d)), OFTConfig(**kw))
    assert ours.model[0].fan_in_fan_out and ours.peft_config["default"].fan_in_fan_out
    theirs = peft.OFTModel(nn.Sequential(copy.deepcopy(lin)), peft.OFTConfig(**kw), "default")
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "oft_" in k}, strict=False)
    close(theirs(X), ours(X))
    gt, go = _grads(theirs, X), _grads(ours, X)
    for n in gt:
        close(gt[n], go[n], tol=1e-4)
    theirs.merge_adapter()
    ours.merge_adapter()
    close(theirs.model[0].base_layer.weight.T, ours.model[0].base_layer.weight)
    close(theirs(X), ours(X))


def test_embedding_with_padding_idx_and_merge():
    base = nn.Sequential(nn.Embedding(10, 8, padding_idx=0))
    theirs, ours = pair({"target_modules": ["0"], "init_weights": False, "oft_block_size": 4}, base=base)
    ids = torch.tensor([[0, 3, 9], [1, 0, 2]])
    close(theirs(ids), ours(ids))
    assert isinstance(ours.model[0], oft_layer.Embedding) and "default" in ours.model[0].oft_embedding_R
    gt, go = _grads(theirs, ids), _grads(ours, ids)
    for n in gt:
        close(gt[n], go[n], tol=1e-4)
    expected = ours(ids)
    theirs.merge_adapter()
    ours.merge_adapter()
    close(theirs.model[0].base_layer.weight, ours.model[0].base_layer.weight)
    close(expected, ours(ids))
    ours.unmerge_adapter()
    close(base[0].weight, ours.model[0].base_layer.weight)


# ---- merging ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["block4_neumann", "block4_exact", "block_share", "coft"])
def test_merge_unmerge_and_unload(variant):
    kw = _kwargs(variant, target_modules=["emb", "lin", "c1", "c3"])
    theirs, ours = pair(kw)
    for m in (theirs, ours):
        m.eval()
    base_weights = {n: ours.model.get_submodule(n).get_base_layer().weight.clone() for n in kw["target_modules"]}
    expected = ours(IDS, X, IMG)
    theirs.merge_adapter()
    ours.merge_adapter()
    for name in kw["target_modules"]:  # peft's merge is right for every layer (fp32, rounded once)
        close(theirs.model.get_submodule(name).get_base_layer().weight,
              ours.model.get_submodule(name).get_base_layer().weight)
        assert ours.model.get_submodule(name).merged
    close(expected, ours(IDS, X, IMG))
    close(theirs(IDS, X, IMG), ours(IDS, X, IMG))
    ours.unmerge_adapter()
    for name, w in base_weights.items():
        close(w, ours.model.get_submodule(name).get_base_layer().weight)
    close(expected, ours(IDS, X, IMG))
    ours.merge_adapter(safe_merge=True)
    ours.unmerge_adapter()
    merged = copy.deepcopy(ours).merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    close(expected, merged(IDS, X, IMG))
    plain = ours.unload()
    assert isinstance(plain.lin, nn.Linear) and isinstance(plain.emb, nn.Embedding)
    for name, w in base_weights.items():
        close(w, plain.get_submodule(name).weight)


def test_neumann_unmerge_inverts_a_non_orthogonal_rotation():
    """The truncated Neumann series is not orthogonal: unmerging must invert it (a transpose would not)."""
    _, ours = pair(_kwargs("block4_neumann", target_modules=["lin"]))
    layer = ours.model.lin
    with torch.no_grad():
        layer.oft_R["default"].weight.mul_(6)
    rot = layer.oft_R["default"].rotation(dropout=False)
    eye = torch.eye(4).expand_as(rot)
    assert (rot @ rot.transpose(-1, -2) - eye).abs().max() > 1e-2
    w0 = layer.base_layer.weight.clone()
    y = layer(X)
    ours.merge_adapter()
    close(y, layer(X), tol=1e-5)
    ours.unmerge_adapter()
    close(w0, layer.base_layer.weight, tol=1e-5)


def test_safe_merge_refuses_a_broken_adapter():
    _, ours = pair(_kwargs("block4_exact"))
    with torch.no_grad():
        ours.model.lin.oft_R["default"].weight[0, 0] = float("nan")
    before = ours.model.lin.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(before, ours.model.lin.base_layer.weight) and not ours.model.lin.merged


# ---- several adapters, disabling --------------------------------------------------------------------------


def _add_second(theirs, ours, **kw):
    kw2 = {"target_modules": ["lin", "c1", "emb"], "r": 2, "oft_block_size": 0, "init_weights": False,
           "use_cayley_neumann": False, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m, cfg in ((theirs, peft.OFTConfig), (ours, OFTConfig)):
            torch.manual_seed(11)
            m.peft_config["other"] = cfg(**kw2)
            m.inject_adapter(m.model, "other")
    st, so = theirs.state_dict(), ours.state_dict()
    assert list(st) == list(so) and all(torch.equal(st[k], so[k]) for k in st)


def test_several_adapters_set_adapter_disable_and_delete():
    base = Net()
    theirs, ours = pair(_kwargs("block4_neumann"), base=base)
    _add_second(theirs, ours)
    for m in (theirs, ours):
        m.eval()
    for active in ("other", ["default", "other"], ["other", "default"], "default"):
        theirs.set_adapter(active)
        ours.set_adapter(active)
        close(theirs(IDS, X, IMG), ours(IDS, X, IMG))  # peft's order: the first active rotates first
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    ours.set_adapter(["default", "other"])
    both = ours(IDS, X, IMG)
    ours.merge_adapter()
    close(both, ours(IDS, X, IMG))  # merged == unmerged (the fold order follows the forward)
    ours.disable_adapter_layers()  # the next forward unmerges, then runs the base model
    close(base(IDS, X, IMG), ours(IDS, X, IMG), tol=1e-5)
    assert not ours.model.lin.merged
    ours.enable_adapter_layers()
    close(both, ours(IDS, X, IMG))
    ours.delete_adapter("other")
    assert ours.active_adapters == ["default"]
    assert not any(".other" in k for k in ours.state_dict())


def test_peft_merges_several_adapters_of_a_linear_in_the_wrong_order():
    """Pins peft 0.21.2: its forward rotates x by R_1 then R_2, but merging [1, 2] folds W R_1^T R_2^T, which is
    R_2 then R_1 (rotations do not commute): merged != unmerged. Embeddings (output rotations) merge right."""
    theirs, ours = pair(_kwargs("block4_neumann"))
    _add_second(theirs, ours)
    theirs.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    with torch.no_grad():
        unmerged = theirs.model.lin(X)
        close(unmerged, ours.model.lin(X))
        theirs.merge_adapter()
        ours.merge_adapter()
        assert not torch.allclose(unmerged, theirs.model.lin(X), atol=1e-4)
        close(unmerged, ours.model.lin(X))
        close(theirs.model.emb(IDS), ours.model.emb(IDS))


def test_disable_adapter_gives_base_outputs_through_peft_model():
    base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    model = fastpeft.get_peft_model(copy.deepcopy(base), OFTConfig(target_modules=["0", "2"], init_weights=False,
                                                                   oft_block_size=2))
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(X), base(X))
        with model.disable_adapter():
            close(model(X), base(X), tol=0)


# ---- module dropout ----------------------------------------------------------------------------------


def _effective_rotation(layer, d):
    """blockdiag(R) as the layer applies it (identity base weight, zero bias)."""
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.eye(d))
        layer.base_layer.bias.zero_()
    return layer(torch.eye(d))


def test_module_dropout_replaces_blocks_by_the_identity_in_training():
    kw = {"target_modules": ["lin"], "init_weights": False, "oft_block_size": 2, "module_dropout": 0.5}
    ours = OFTModel(nn.ModuleDict({"lin": nn.Linear(8, 8)}), OFTConfig(**kw), "default")
    layer = ours.model.lin
    rot = layer.oft_R["default"]
    full = torch.block_diag(*rot.rotation(dropout=False).detach().unbind(0))
    layer.train()
    seen = set()
    for step in range(8):
        torch.manual_seed(step)
        dropped = (torch.randperm(4) < 2).tolist()  # peft's MultiplicativeDropoutLayer draw
        torch.manual_seed(step)
        eff = _effective_rotation(layer, 8)
        for k in range(4):
            block = eff[2 * k: 2 * k + 2, 2 * k: 2 * k + 2]
            close(torch.eye(2) if dropped[k] else full[2 * k: 2 * k + 2, 2 * k: 2 * k + 2], block, tol=1e-6)
        assert sum(dropped) == int(0.5 * 4)
        seen.add(tuple(dropped))
    assert len(seen) > 1
    # gradients reach only the kept blocks
    torch.manual_seed(0)
    dropped = torch.randperm(4) < 2
    torch.manual_seed(0)
    layer(X).pow(2).sum().backward()
    assert (rot.weight.grad[dropped] == 0).all() and (rot.weight.grad[~dropped] != 0).all()
    layer.eval()  # no dropout outside training
    close(full, _effective_rotation(layer, 8), tol=1e-6)


def test_module_dropout_with_block_share_does_nothing():
    kw = {"target_modules": ["0"], "init_weights": False, "oft_block_size": 2, "module_dropout": 0.9,
          "block_share": True}
    ours = OFTModel(nn.Sequential(nn.Linear(8, 8)), OFTConfig(**kw))
    eval_out = ours.eval()(X)
    close(eval_out, ours.train()(X), tol=0)


def test_peft_ignores_module_dropout():
    """Pins peft 0.21.2: module_dropout builds a MultiplicativeDropoutLayer that forward never calls."""
    theirs, _ = pair(_kwargs("block4_neumann", module_dropout=0.9))
    assert type(theirs.model.lin.oft_dropout["default"]).__name__ == "MultiplicativeDropoutLayer"
    with torch.no_grad():
        close(theirs.eval()(IDS, X, IMG), theirs.train()(IDS, X, IMG), tol=0)


# ---- transformers models, checkpoints -------------------------------------------------------------------


def _randomize(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "oft_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


LLAMA_CASES = {
    "default-targets": {"task_type": "CAUSAL_LM", "oft_block_size": 8},
    "exact-r": {"task_type": "CAUSAL_LM", "r": 4, "oft_block_size": 0, "use_cayley_neumann": False,
                "target_modules": ["q_proj", "down_proj", "embed_tokens"]},
    "coft-share": {"task_type": "CAUSAL_LM", "oft_block_size": 4, "coft": True, "eps": 0.1, "block_share": True,
                   "target_modules": ["k_proj", "up_proj"], "bias": "oft_only"},
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_outputs_gradients_and_checkpoints_both_ways(case, tmp_path):
    base = tiny_llama()
    kw = LLAMA_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**copy.deepcopy(kw)))
        torch.manual_seed(0)
        fm = fastpeft.get_peft_model(copy.deepcopy(base), OFTConfig(**copy.deepcopy(kw)))
    assert type(fm.base_model).__name__ == "OFTModel"
    sp, sf = pm.state_dict(), fm.state_dict()
    assert list(sp) == list(sf) and all(torch.equal(sp[k], sf[k]) for k in sp)
    _randomize(pm)
    fm.load_state_dict(pm.state_dict())
    batch = inputs()
    for m in (pm, fm):
        m.train()
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
    close(expected, logits(fm, batch), tol=1e-4)

    pdir, fdir = str(tmp_path / "peft"), str(tmp_path / "fast")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(pdir)
        fm.save_pretrained(fdir)
    pt, ft = read_tensors(pdir), read_tensors(fdir)
    assert sorted(pt) == sorted(ft) and any(k.endswith("oft_R.weight") for k in ft)
    for k in pt:
        assert torch.equal(pt[k], ft[k]), k
    assert comparable_config(read_config(fdir)) == comparable_config(read_config(pdir))
    assert read_config(fdir)["peft_type"] == "OFT"

    loaded_f = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), pdir)  # peft -> fastpeft
    loaded_p = peft.PeftModel.from_pretrained(copy.deepcopy(base), fdir)  # fastpeft -> peft
    assert isinstance(loaded_f.peft_config["default"], OFTConfig)
    close(expected, logits(loaded_f, batch), tol=1e-4)
    close(expected, logits(loaded_p.eval(), batch), tol=1e-4)
    assert not any(p.requires_grad for p in loaded_f.parameters())
    merged = loaded_f.merge_and_unload()
    close(expected, logits(merged, batch), tol=1e-4)


def test_small_model_checkpoint_with_3x3_conv_and_modules_to_save(tmp_path):
    """fastpeft -> peft on a model whose 3x3 conv peft only computes right when merged."""
    base = Net()
    kw = {"target_modules": ["emb", "lin", "c3"], "modules_to_save": ["c1"], "init_weights": False,
          "oft_block_size": 4, "use_cayley_neumann": False}
    fm = fastpeft.get_peft_model(copy.deepcopy(base), OFTConfig(**kw))
    with torch.no_grad():
        fm.base_model.model.c1.modules_to_save["default"].weight.mul_(2)
    fm.eval()
    expected = fm(IDS, X, IMG)
    fm.save_pretrained(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(expected, pm.merge_and_unload()(IDS, X, IMG))
    back = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(expected, back(IDS, X, IMG))


def test_gpt2_default_targets_conv1d(tmp_path):
    """GPT-2's default OFT target (c_attn) is a Conv1D: peft refuses it, fastpeft adapts it."""
    base = tiny_gpt2()
    kw = {"task_type": "CAUSAL_LM", "oft_block_size": 8, "init_weights": False}
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**kw))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), OFTConfig(**kw)).eval()
    layers = [m for m in fm.modules() if isinstance(m, oft_layer.Linear)]
    assert len(layers) == 2 and all(m.fan_in_fan_out for m in layers)
    batch = inputs()
    expected = logits(fm, batch)
    assert not torch.allclose(expected, logits(base, batch), atol=1e-4)
    fm.save_pretrained(str(tmp_path))
    assert read_config(str(tmp_path))["fan_in_fan_out"] is True
    back = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    close(expected, logits(back, batch), tol=1e-5)
    close(expected, logits(back.merge_and_unload(), batch), tol=1e-5)


def test_bfloat16_base_adapter_dtypes_outputs_and_merge_equal_peft():
    """A bf16 base: adapters kept in float32 (autocast_adapter_dtype), inputs rotated in float32 and cast back,
    outputs in bf16, merged weights in bf16 -- as peft; with autocast off, bf16 adapters."""
    base = tiny_llama().to(torch.bfloat16)
    kw = {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "init_weights": False, "oft_block_size": 4}
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**kw))
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), OFTConfig(**kw))
    sp, sf = pm.state_dict(), fm.state_dict()
    for k in sp:
        assert sp[k].dtype == sf[k].dtype and torch.equal(sp[k], sf[k]), k
    assert {v.dtype for k, v in sf.items() if "oft_" in k} == {torch.float32}
    batch = inputs()
    yp, yf = logits(pm, batch), logits(fm, batch)
    assert yf.dtype == yp.dtype == torch.bfloat16
    close(yp.float(), yf.float(), tol=1e-2)
    pm.merge_adapter()
    fm.merge_adapter()
    for name in ("q_proj", "v_proj"):
        wp = getattr(pm.base_model.model.model.layers[0].self_attn, name).base_layer.weight
        wf = getattr(fm.base_model.model.model.layers[0].self_attn, name).base_layer.weight
        assert wf.dtype == torch.bfloat16
        close(wp.float(), wf.float(), tol=1e-2)
    close(logits(pm, batch).float(), logits(fm, batch).float(), tol=1e-2)

    fm16 = fastpeft.get_peft_model(copy.deepcopy(base), OFTConfig(**kw), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in fm16.named_parameters() if "oft_" in n} == {torch.bfloat16}
    assert logits(fm16, inputs()).dtype == torch.bfloat16


def test_bfloat16_conv2d_matches_peft_merged():
    base = Net().to(torch.bfloat16)
    kw = {"target_modules": ["c1", "c3"], "init_weights": False, "oft_block_size": 4}
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**kw))
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), OFTConfig(**kw))
    args = (IDS, X.bfloat16(), IMG.bfloat16())
    y = fm(*args)
    assert y.dtype == torch.bfloat16
    pm.merge_adapter()
    close(pm(*args).float(), y.float(), tol=2e-2)


# ---- configs ---------------------------------------------------------------------------------------------


def test_config_fields_defaults_and_json_equal_peft(tmp_path):
    ours, theirs = OFTConfig(), peft.OFTConfig()
    assert ours.to_dict().keys() == theirs.to_dict().keys()
    for k, v in theirs.to_dict().items():
        if k != "peft_version":
            assert ours.to_dict()[k] == (v.value if hasattr(v, "value") else v), k
    kw = {"r": 4, "oft_block_size": 0, "target_modules": ["a", "b"], "exclude_modules": ["c"], "module_dropout": 0.1,
          "layers_to_transform": [0], "layers_pattern": "layers", "coft": True, "eps": 1e-3, "block_share": True,
          "use_cayley_neumann": False, "num_cayley_neumann_terms": 7, "bias": "oft_only", "init_weights": False,
          "fan_in_fan_out": True, "modules_to_save": ["head"]}
    peft.OFTConfig(**kw).save_pretrained(str(tmp_path / "p"))
    OFTConfig(**kw).save_pretrained(str(tmp_path / "f"))
    assert comparable_config(read_config(str(tmp_path / "f"))) == comparable_config(read_config(str(tmp_path / "p")))
    loaded = fastpeft.PeftConfig.from_pretrained(str(tmp_path / "p"))
    assert type(loaded) is OFTConfig and loaded.target_modules == {"a", "b"} and loaded.r == 4
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "f")).to_dict()["peft_type"] == "OFT"


@pytest.mark.parametrize("kwargs,error,match", [
    ({"r": 0, "oft_block_size": 0}, ValueError, "Either `r` or `oft_block_size` must be non-zero"),
    ({"r": 8}, ValueError, r"not both simultaneously.*Set the other one to 0"),
    ({"r": -2, "oft_block_size": 0}, ValueError, "must be >= 0"),
    ({"module_dropout": 1.5}, ValueError, "module_dropout"),
    ({"num_cayley_neumann_terms": -1}, ValueError, "num_cayley_neumann_terms"),
    ({"coft": True, "eps": 0.0}, ValueError, "eps must be positive"),
    ({"layers_pattern": "layers"}, ValueError, "layers_to_transform"),
    ({"init_weights": "gaussian"}, TypeError, "init_weights"),
    ({"bias": "lora_only"}, TypeError, "bias"),
    ({"oft_block_size": 2.5}, TypeError, r"OFTConfig\.oft_block_size must be int"),
])
def test_bad_configs_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        OFTConfig(**kwargs)


def test_config_warnings():
    with pytest.warns(UserWarning, match="identity"):
        OFTConfig(num_cayley_neumann_terms=1)
    with pytest.warns(UserWarning, match="0.18.0"):
        OFTConfig(peft_version="0.17.1")
    with pytest.warns(UserWarning, match="layers_to_transform is ignored"):
        OFTConfig(target_modules="lin.*", layers_to_transform=[0])


def test_parameter_adjustment_equals_peft():
    for features in list(range(1, 70)) + [96, 100, 768, 1000, 4096]:
        for value in (1, 2, 3, 4, 5, 7, 8, 16, 32, 50, 64, 128, 5000):
            assert adjust_oft_parameters(features, value) == PeftOFTLayer.adjust_oft_parameters(None, features, value)
    base = nn.Sequential(nn.Linear(12, 4), nn.Linear(12, 4))
    theirs, ours = pair({"target_modules": ["0"], "oft_block_size": 5}, base=base)
    assert ours.model[0].oft_block_size == theirs.model[0].oft_block_size == {"default": 4}
    with pytest.warns(UserWarning, match=r"Adjusted `r` to \(4\).*12 input features"):
        OFTModel(copy.deepcopy(base), OFTConfig(target_modules=["1"], r=5, oft_block_size=0))


def test_unsupported_layer_unknown_targets_and_old_checkpoints():
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(4, 4))
    with pytest.raises(TypeError, match="Conv1d is not supported by OFTModel"):
        OFTModel(copy.deepcopy(model), OFTConfig(target_modules=["0"], oft_block_size=2))
    with pytest.raises(ValueError, match="not found in the base model"):
        OFTModel(copy.deepcopy(model), OFTConfig(target_modules=["nope"]))
    fm = fastpeft.get_peft_model(copy.deepcopy(model), OFTConfig(target_modules=["1"], oft_block_size=2))
    old = {"base_model.model.1.oft_r.weight": torch.zeros(2, 2, 2)}
    with pytest.raises(ValueError, match="old OFT checkpoint"):
        fastpeft.set_peft_model_state_dict(fm, old)


def test_scale_helpers_warn_as_peft():
    _, ours = pair(_kwargs("block4_neumann"))
    with pytest.warns(UserWarning, match="not supported"):
        ours.model.lin.scale_layer(0.5)
    with pytest.warns(UserWarning, match="not supported"):
        ours.model.lin.set_scale("default", 2.0)


def test_config_of_peft_before_0_14_is_refused_with_the_reason(tmp_path):
    """peft < 0.14 wrote OFT configs without oft_block_size (r=8): its weights are incompatible."""
    import json

    OFTConfig(target_modules=["0"]).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["oft_block_size"]
    data.update(r=8, peft_version="0.13.0")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"peft < 0\.14"):
        fastpeft.PeftConfig.from_pretrained(str(tmp_path))


def test_conv2d_under_another_adapter_is_refused():
    from fastpeft.tuners.lora import LoraConfig, LoraModel

    lora = LoraModel(nn.Sequential(nn.Conv2d(4, 4, 3)), LoraConfig(target_modules=["0"], r=2), "default")
    with pytest.raises(TypeError, match="already adapted by another method"):
        OFTModel(lora.model, OFTConfig(target_modules=["0"], oft_block_size=4), "oft")


def test_peft_model_load_adapter_add_adapter_and_switch(tmp_path):
    """Two OFT adapters saved by peft, loaded into one fastpeft PeftModel; a third added; switching."""
    base = tiny_llama()
    batch = inputs()
    expected = {}
    for name, cfg in (("a", peft.OFTConfig(target_modules=["q_proj", "o_proj"], init_weights=False, oft_block_size=4)),
                      ("b", peft.OFTConfig(target_modules=["v_proj"], init_weights=False, r=4, oft_block_size=0,
                                           use_cayley_neumann=False))):
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        _randomize(pm, seed=ord(name))
        pm.eval()
        pm.save_pretrained(str(tmp_path / name))
        expected[name] = logits(pm, batch)
    fm = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"), adapter_name="a")
    fm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    for name in ("a", "b", "a"):
        fm.set_adapter(name)
        close(expected[name], logits(fm, batch), tol=1e-4)
    fm.add_adapter("c", OFTConfig(target_modules=["q_proj"]))  # default init: the identity
    fm.set_adapter("c")
    close(logits(base, batch), logits(fm, batch), tol=1e-5)
    assert {n.split(".")[-2] for n, p in fm.named_parameters() if p.requires_grad} == {"c"}


@pytest.mark.parametrize("use_cayley_neumann", [True, False])
def test_linear_forward_saves_no_dense_rotation(use_cayley_neumann):
    """Backward keeps x-sized and block-sized tensors only: no [d, d] matrix besides the base weight itself."""
    d = 64
    ours = OFTModel(nn.Sequential(nn.Linear(d, d)), OFTConfig(target_modules=["0"], oft_block_size=4,
                                                               use_cayley_neumann=use_cayley_neumann,
                                                               init_weights=False))
    weight_ptr = ours.model[0].base_layer.weight.data_ptr()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ours(x)
    y.sum().backward()
    assert saved and ours.model[0].oft_R["default"].weight.grad is not None
    big = [tuple(t.shape) for t in saved if t.numel() >= d * d and t.data_ptr() != weight_ptr]
    assert not big, big


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_is_saved_in_its_own_dtype(dtype):
    """A bf16/fp16 layer with float32 adapters (peft's autocast_adapter_dtype) rotates in the input's dtype:
    backward keeps x itself, not a float32 copy of it (peft keeps the float32 copy)."""
    d, tokens = 64, 48
    model = fastpeft.get_peft_model(nn.Sequential(nn.Linear(d, d)).to(dtype),
                                    OFTConfig(target_modules=["0"], oft_block_size=8, init_weights=False))
    assert model.base_model.model[0].oft_R["default"].weight.dtype == torch.float32
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    assert y.dtype == dtype
    weight_ptr = model.base_model.model[0].base_layer.weight.data_ptr()
    token_sized = [t for t in saved if t.numel() >= tokens * d and t.data_ptr() != weight_ptr]
    assert token_sized and all(t.dtype == dtype for t in token_sized), [(t.shape, t.dtype) for t in token_sized]
    y.float().square().sum().backward()
    assert model.base_model.model[0].oft_R["default"].weight.grad.dtype == torch.float32


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 6)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "r2" not in v])
@pytest.mark.parametrize("bias", ["none", "oft_only"])
def test_linear_with_more_rows_than_outputs_rotates_the_weight_and_matches_peft(variant, bias, monkeypatch):
    """More rows than output features: the layer folds R into W (one small product) instead of rotating
    every row; outputs and gradients (input, oft_R, and the bias when trainable) stay peft's."""
    used = []
    real = oft_layer._RotatedWeightLinear.apply
    monkeypatch.setattr(oft_layer._RotatedWeightLinear, "apply", lambda *a: used.append(1) or real(*a))
    kwargs = {"target_modules": ["lin"], "init_weights": False, "bias": bias, **VARIANTS[variant]}
    theirs, ours = pair(kwargs, base=Wide())
    x = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(5))  # 40 rows > 6 outputs
    close(theirs(x), ours(x), tol=1e-5)
    assert used
    g_theirs, g_ours = _grads(theirs, x), _grads(ours, x)
    assert set(g_theirs) == set(g_ours)
    for name in g_theirs:
        close(g_theirs[name], g_ours[name], tol=1e-5)
    if bias == "oft_only":
        assert g_ours["model.lin.base_layer.bias"].abs().sum() > 0


def test_conv1d_rotated_weight_path_equals_rotated_input_path():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = OFTModel(nn.Sequential(Conv1D(6, 16)), OFTConfig(target_modules=["0"], oft_block_size=4,
                                                             init_weights=False))
    layer = model.model[0]
    x = torch.randn(30, 16, requires_grad=True)
    y_fold = layer(x)
    y_plain = oft_layer.OFTLayer._adapted_forward(layer, x)
    close(y_plain, y_fold, tol=1e-5)
    (gx_fold,) = torch.autograd.grad(y_fold.square().sum(), x)
    (gx_plain,) = torch.autograd.grad(y_plain.square().sum(), x)
    close(gx_plain, gx_fold, tol=1e-5)
