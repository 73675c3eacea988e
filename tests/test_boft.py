"""BOFT conformance with peft 0.21.2 (the oracle) and with a dense plain-PyTorch reference: permutations,
initialisation and state-dict layout, outputs and gradients (Linear, Conv1D, Conv2d; float32 and bfloat16;
train and eval), butterfly factors > 1, multiplicative dropout under the same seed, merging, several
adapters, checkpoints both ways, activation memory, and config / layer checks.

peft builds BOFT's rotation with its fbd_cuda extension when boft_n_butterfly_factor > 1 and silently drops the
factor to 1 when the extension cannot build (as on a machine without CUDA). The autouse fixture below gives
peft a pure-PyTorch stand-in for that extension, so peft itself is the oracle for every factor count."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _peft_testing import (
    FakeFbdCuda, close, comparable_config, inputs, logits, read_config, read_tensors, seeded_pair, tiny_gpt2,
    tiny_llama,
)

peft = pytest.importorskip("peft")
import peft.tuners.boft.layer as peft_boft_layer  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import reference  # noqa: E402
from fastpeft.tuners.base import BaseTunerLayer  # noqa: E402
from fastpeft.tuners.boft import BOFTConfig, BOFTModel  # noqa: E402
from fastpeft.tuners.boft.layer import butterfly_permutation  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def peft_fbd(monkeypatch):
    monkeypatch.setattr(peft_boft_layer, "_FBD_CUDA", FakeFbdCuda())


class Net(nn.Module):
    """Linear (16 -> 16) and two Conv2d (2x2 with padding; 1x1) on the forward path; every rotated dimension
    (16, 4*2*2 = 16, 8) allows up to 3 butterfly factors with blocks of 2."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.conv = nn.Conv2d(4, 8, 2, padding=1)
        self.conv1 = nn.Conv2d(8, 6, 1, bias=False)

    def forward(self, x):
        h = torch.tanh(self.lin(x))  # [B, 5, 16]
        h = h.reshape(h.shape[0], 5, 4, 4).transpose(1, 2)  # [B, 4, 5, 4]
        return self.conv1(torch.tanh(self.conv(h))).flatten(1)


LAYERS = ["lin", "conv", "conv1"]
X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
BLOCKS = {  # name -> config fields
    "m1_size4": {"boft_block_size": 4},
    "m1_num2": {"boft_block_size": 0, "boft_block_num": 2},
    "m2_size2": {"boft_block_size": 2, "boft_n_butterfly_factor": 2},
    "m3_size2": {"boft_block_size": 2, "boft_n_butterfly_factor": 3},
    "m3_num4": {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 3},
}


def kwargs(blocks="m2_size2", **extra):
    return {"target_modules": LAYERS, "init_weights": False, **BLOCKS[blocks], **extra}


def pair(kw, base=None, adapter_name="default", seed=0):
    """(peft model, fastpeft model) on copies of `base` (default Net()) built under the same seed."""
    return seeded_pair(peft.tuners.BOFTModel, peft.BOFTConfig(**copy.deepcopy(kw)), BOFTModel,
                       BOFTConfig(**copy.deepcopy(kw)), Net() if base is None else base, adapter_name, seed)


def grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    model(x).float().pow(2).mean().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    out["x"] = x.grad
    return out


# ---- a dense plain-PyTorch reference (float64) -------------------------------------------------


def dense_cayley(r):
    s = 0.5 * (r - r.transpose(-1, -2))
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    return (eye - s) @ torch.linalg.inv(eye + s)


def dense_rotation(boft_r):
    """peft's B = Q_(m-1) ... Q_0, Q_i = P_i blockdiag(cayley(R_i)) P_i^T, from peft's own permutations
    (float64; differentiable in boft_r)."""
    r = boft_r.double()
    m, n, b, _ = r.shape
    d = n * b
    total = torch.eye(d, dtype=torch.float64)
    for i in range(m):
        perm = peft_boft_layer.BOFTLayer.block_butterfly_perm(None, d, int(n / 2**i), int(b / 2), m - 1)
        p = torch.zeros(d, d, dtype=torch.float64)
        p[torch.arange(d), perm] = 1.0
        total = p @ torch.block_diag(*dense_cayley(r[i]).unbind(0)) @ p.T @ total
    return total


def dense_linear(layer, x, names):
    """x B_k ... B_1, then the base weight, then the product of the scales, plus the bias (float64)."""
    rotation = torch.eye(layer.in_features, dtype=torch.float64)
    scale = torch.ones(layer.out_features, dtype=torch.float64)
    for name in names:
        rotation = dense_rotation(layer.boft_R[name]) @ rotation
        scale = scale * layer.boft_s[name].detach().double().reshape(-1)
    base = layer.get_base_layer()
    weight = base.weight.detach().double()
    weight = weight.T if layer.fan_in_fan_out else weight
    y = F.linear(x.double() @ rotation, weight) * scale
    return y if base.bias is None else y + base.bias.detach().double()


def dense_conv_weight(layer, names):
    base = layer.get_base_layer()
    rows = base.weight.detach().double().reshape(base.out_channels, -1)
    for name in names:
        rows = rows @ dense_rotation(layer.boft_R[name]).T * layer.boft_s[name].detach().double().reshape(-1, 1)
    return rows.reshape(base.weight.shape)


# ---- permutations, ops, initialisation -------------------------------------------------------------


def test_butterfly_permutations_equal_peft():
    for dim, size, m in [(16, 2, 3), (16, 4, 3), (48, 4, 2), (64, 8, 4), (96, 6, 3), (128, 2, 7), (24, 6, 3)]:
        num = dim // size
        for i in range(m):
            theirs = peft_boft_layer.BOFTLayer.block_butterfly_perm(None, dim, int(num / 2**i), int(size / 2), m - 1)
            assert torch.equal(butterfly_permutation(dim, size, i), theirs), (dim, size, m, i)


def test_dense_reference_is_fastpeft_reference_butterfly_matrix():
    """peft's B = Q_(m-1) ... Q_0 is butterfly_rotate's M_0 ... M_(m-1) with the factors reversed."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 8, 2, 2, generator=g, dtype=torch.float64)
    perm = torch.stack([butterfly_permutation(16, 2, i) for i in range(3)])
    blocks = reference.cayley(0.5 * (r - r.transpose(-1, -2)).reshape(-1, 2, 2)).reshape(3, 8, 2, 2)
    close(dense_rotation(r), reference.butterfly_matrix(blocks.flip(0), perm.flip(0)).double(), tol=1e-6)


def test_layers_use_fastpeft_ops(monkeypatch):
    calls = []
    for name in ("cayley", "butterfly_rotate"):
        real = getattr(fastpeft.ops, name)
        monkeypatch.setattr(fastpeft.ops, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    _, ours = pair(kwargs())
    ours(X)
    assert calls.count("cayley") == 3 and calls.count("butterfly_rotate") == 3


@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_default_init_is_a_no_op_and_layout_is_peft(blocks):
    base = Net()
    theirs, ours = pair(kwargs(blocks, init_weights=True), base=base)
    with torch.no_grad():
        close(base(X), ours(X), tol=1e-6)
    lin, conv = ours.model.lin, ours.model.conv
    m = BLOCKS[blocks].get("boft_n_butterfly_factor", 1)
    size = BLOCKS[blocks]["boft_block_size"]
    n = BLOCKS[blocks]["boft_block_num"] if size == 0 else 16 // size
    assert lin.boft_R["default"].shape == (m, n, 16 // n, 16 // n) and lin.boft_s["default"].shape == (16, 1)
    assert conv.boft_s["default"].shape == (1, 8)  # peft's Conv2d layout
    assert lin.boft_block_size == theirs.model.lin.boft_block_size
    assert lin.boft_block_num == theirs.model.lin.boft_block_num
    assert not any("boft_P" in k or "perm" in k for k in ours.state_dict())


# ---- outputs and gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_outputs_and_gradients_match_peft(blocks, mode):
    theirs, ours = pair(kwargs(blocks))
    for m in (theirs, ours):
        m.train(mode == "train")
    for name in LAYERS:
        t, o = theirs.model.get_submodule(name), ours.model.get_submodule(name)
        assert isinstance(o, BaseTunerLayer) and type(o).__name__ == type(t).__name__
    close(theirs(X), ours(X))
    gt, go = grads(theirs, X), grads(ours, X)
    assert set(gt) == set(go) and len(go) == 7  # x, boft_R and boft_s of three layers
    for n in gt:
        close(gt[n], go[n], tol=1e-4)


@pytest.mark.parametrize("bias", ["boft_only", "all"])
def test_trained_biases_match_peft(bias):
    theirs, ours = pair(kwargs("m2_size2", bias=bias))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert "model.lin.base_layer.bias" in trainable
    gt, go = grads(theirs, X), grads(ours, X)
    for n in gt:
        close(gt[n], go[n], tol=1e-4)


@pytest.mark.parametrize("blocks", ["m1_size4", "m3_size2", "m3_num4"])
def test_factors_match_the_dense_reference(blocks):
    _, ours = pair(kwargs(blocks))
    lin, conv = ours.model.lin, ours.model.conv
    x = torch.randn(4, 16, dtype=torch.float64)
    close(dense_linear(lin, x, ["default"]), lin(x.float()).double(), tol=1e-5)
    rotation, _ = lin.get_delta_weight("default")
    close(dense_rotation(lin.boft_R["default"]), rotation.double(), tol=1e-5)
    xc = torch.randn(2, 4, 5, 4, dtype=torch.float64)
    expected = F.conv2d(xc, dense_conv_weight(conv, ["default"]), conv.base_layer.bias.double(), padding=1)
    close(expected, conv(xc.float()).double(), tol=1e-5)


def test_linear_gradients_against_autograd_on_the_dense_reference():
    """The custom backward of the rotated linear (x and the pre-scale output saved, the rotation recomputed)
    against plain autograd through the dense float64 reference, bias and base weight trainable too."""
    layer = BOFTModel(Net(), BOFTConfig(**kwargs("m3_size2"))).model.lin
    layer.base_layer.weight.requires_grad_(True)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, 16, requires_grad=True)
    gy = torch.randn(2, 3, 16)
    params = [x, layer.boft_R["default"], layer.boft_s["default"], layer.base_layer.weight, layer.base_layer.bias]
    got = torch.autograd.grad((layer(x) * gy).sum(), params)
    ref = copy.deepcopy(layer).double()
    xd = x.detach().double().requires_grad_(True)
    r, s = ref.boft_R["default"], ref.boft_s["default"]
    total = dense_rotation(r)
    y = F.linear(xd @ total, ref.base_layer.weight) * s.reshape(-1) + ref.base_layer.bias
    want = torch.autograd.grad((y * gy.double()).sum(), [xd, r, s, ref.base_layer.weight, ref.base_layer.bias])
    for a, b_ in zip(want, got):
        close(a, b_.double(), tol=1e-5)


def test_gradcheck_float64():
    """Finite differences (float64) through the custom backward (Linear) and the rotated weight (Conv2d)."""
    model = BOFTModel(Net().double(), BOFTConfig(**kwargs("m3_size2", bias="boft_only")))
    for name, x in (("lin", torch.randn(2, 16, dtype=torch.float64)),
                    ("conv", torch.randn(1, 4, 3, 3, dtype=torch.float64))):
        layer = model.model.get_submodule(name)
        names = ["boft_R.default", "boft_s.default", "base_layer.bias"]
        params = [layer.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

        def f(x_, *ps, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, ps)), (x_,))

        assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-6)


def test_conv1d_matches_peft_linear_and_merges_correctly():
    """peft's BOFTModel rejects transformers' Conv1D; its Linear layer class runs on one, but its merge ignores
    the [in, out] weight layout. Forward and gradients are compared with peft's Linear on the Conv1D, merging
    with the dense reference."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 16)  # in 16, out 12
    kw = {"target_modules": ["c"], "init_weights": False, "boft_block_size": 2, "boft_n_butterfly_factor": 3,
          "fan_in_fan_out": True}
    torch.manual_seed(1)
    theirs = peft_boft_layer.Linear(copy.deepcopy(base), "default", config=peft.BOFTConfig(**kw))
    torch.manual_seed(1)
    model = BOFTModel(nn.ModuleDict({"c": copy.deepcopy(base)}), BOFTConfig(**kw))
    ours = model.model["c"]
    assert ours.is_target_conv_1d_layer and ours.fan_in_fan_out
    for name in ("boft_R", "boft_s"):
        assert torch.equal(getattr(theirs, name)["default"], getattr(ours, name)["default"])
    ours.base_layer.requires_grad_(True)  # the base weight and bias get gradients through our backward too
    x = torch.randn(2, 5, 16)
    close(theirs(x), ours(x))
    gt, go = grads(theirs, x), grads(ours, x)
    assert set(gt) == set(go) == {"x", "base_layer.weight", "base_layer.bias", "boft_R.default", "boft_s.default"}
    for n in gt:
        close(gt[n], go[n], tol=1e-4)
    expected = dense_linear(ours, x, ["default"])
    close(expected, ours(x).double())
    ours.merge()
    assert ours.base_layer.weight.shape == (16, 12)
    close(expected, ours(x).double())
    ours.unmerge()
    close(base.weight, ours.base_layer.weight)


def test_conv2d_uses_all_base_conv_parameters():
    """stride, padding, dilation, groups, padding_mode and a non-square kernel (peft passes only stride[0] and
    padding[0] to F.conv2d, and rejects groups > 1): with the identity init BOFT reproduces the base conv, and
    with random weights it equals the base conv run on the dense-rotated weight."""
    conv = nn.Conv2d(8, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, padding_mode="reflect")
    x = torch.randn(2, 8, 9, 7)
    for init in (True, False):
        cfg = BOFTConfig(target_modules=["c"], boft_block_size=2, boft_n_butterfly_factor=2, init_weights=init)
        model = BOFTModel(nn.ModuleDict({"c": copy.deepcopy(conv)}), cfg)
        layer = model.model["c"]
        assert layer.boft_R["default"].shape == (2, 12, 2, 2)  # flattened filter: 8/2 * 3 * 2 = 24
        base = copy.deepcopy(conv)
        if not init:
            base.weight.data = dense_conv_weight(layer, ["default"]).float()
        close(base(x), layer(x), tol=1e-5)
        layer.merge()
        close(base(x), layer(x), tol=1e-5)


# ---- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", ["m1_size4", "m2_size2"])
def test_bfloat16_base_matches_peft(blocks):
    """A bf16 base through get_peft_model: adapters upcast to float32, outputs bf16, Conv2d run in float32 (the
    float32 scale promotes the rotated weight), merged weights bf16 -- as peft."""
    base = Net().to(torch.bfloat16)
    kw = kwargs(blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(**kw))
        torch.manual_seed(0)
        fm = fastpeft.get_peft_model(copy.deepcopy(base), BOFTConfig(**kw))
    sp, sf = pm.state_dict(), fm.state_dict()
    for k in sp:
        assert sp[k].dtype == sf[k].dtype and torch.equal(sp[k], sf[k]), k
    assert {v.dtype for k, v in sf.items() if "boft_" in k} == {torch.float32}
    x = X.to(torch.bfloat16)
    yp, yf = pm(x), fm(x)
    assert yf.dtype == yp.dtype == torch.bfloat16
    close(yp, yf, tol=2e-2)
    gp, gf = grads(pm, x), grads(fm, x)
    assert set(gp) == set(gf)
    for n in gp:
        assert gp[n].dtype == gf[n].dtype, n
        close(gp[n], gf[n], tol=5e-2)
    pm.base_model.merge_adapter()
    fm.base_model.merge_adapter()
    for name in LAYERS:
        wp = pm.base_model.model.get_submodule(name).get_base_layer().weight
        wf = fm.base_model.model.get_submodule(name).get_base_layer().weight
        assert wf.dtype == torch.bfloat16
        close(wp, wf, tol=1e-2)


def test_bfloat16_linear_against_the_dense_reference():
    _, ours = pair(kwargs("m3_size2"))
    layer = ours.model.lin.to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    close(dense_linear(layer, x, ["default"]), y.double(), tol=3e-2)


# ---- dropout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", ["m1_size4", "m3_size2"])
def test_multiplicative_dropout_matches_peft_under_the_same_seed(blocks):
    theirs, ours = pair(kwargs(blocks, boft_dropout=0.5))
    theirs.train()
    ours.train()
    outs = []
    for step in range(5):
        torch.manual_seed(100 + step)
        yt = theirs(X)
        torch.manual_seed(100 + step)
        yo = ours(X)
        close(yt, yo)
        outs.append(yo)
    assert any(not torch.allclose(outs[0], o) for o in outs[1:]), "dropout must vary between steps"
    torch.manual_seed(7)
    gt = grads(theirs, X)
    torch.manual_seed(7)
    go = grads(ours, X)
    for n in gt:
        close(gt[n], go[n], tol=1e-4)
    ours.eval()
    theirs.eval()
    close(theirs(X), ours(X))
    assert not torch.allclose(outs[0], ours(X))


def test_dropout_replaces_blocks_of_one_factor_by_the_identity():
    layer = BOFTModel(Net(), BOFTConfig(**kwargs("m3_size2", boft_dropout=0.5))).model.lin
    layer.train()
    blocks = layer._blocks("default")
    torch.manual_seed(3)
    dropped = layer.boft_dropout["default"](blocks)
    torch.manual_seed(3)
    factor = int(torch.randint(0, 3, (1,)).item())
    replaced = torch.randperm(8) < 4
    eye = torch.eye(2)
    for i in range(3):
        for j in range(8):
            expect = eye if (i == factor and replaced[j]) else blocks[i, j]
            assert torch.equal(dropped[i, j], expect), (i, j)


# ---- merging, several adapters, disabling --------------------------------------------------------


@pytest.mark.parametrize("blocks", ["m1_size4", "m3_num4"])
def test_merge_unmerge_and_unload(blocks):
    base = Net()
    theirs, ours = pair(kwargs(blocks), base=base)
    ours.eval()
    theirs.eval()
    expected = ours(X)
    theirs.merge_adapter()
    ours.merge_adapter()
    for name in LAYERS:
        layer = ours.model.get_submodule(name)
        assert layer.merged
        close(theirs.model.get_submodule(name).get_base_layer().weight, layer.get_base_layer().weight, tol=1e-6)
    close(expected, ours(X))
    ours.unmerge_adapter()
    for name in LAYERS:
        close(base.get_submodule(name).weight, ours.model.get_submodule(name).get_base_layer().weight, tol=1e-6)
    close(expected, ours(X))
    ours.merge_adapter(safe_merge=True)
    ours.unmerge_adapter()
    merged = copy.deepcopy(ours).merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    close(expected, merged(X))
    close(theirs.merge_and_unload()(X), merged(X))
    plain = ours.unload()
    assert isinstance(plain.lin, nn.Linear) and not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    close(base(X), plain(X), tol=1e-6)


def test_merge_is_exact_in_float32_and_rounded_once():
    """A bf16 base weight merged in float32 (rotation and scale) and rounded once: equal to the rounded dense
    float64 result up to one bf16 rounding."""
    _, ours = pair(kwargs("m3_size2"))
    layer = ours.model.lin
    layer.base_layer.to(torch.bfloat16)
    w = layer.base_layer.weight.detach().double()
    expected = (w @ dense_rotation(layer.boft_R["default"]).T) * layer.boft_s["default"].detach().double()
    layer.merge()
    got = layer.base_layer.weight.detach().clone()
    assert got.dtype == torch.bfloat16
    # one rounding: within bf16's unit roundoff (2^-8 relative) of the exact value, element by element
    assert ((got.double() - expected).abs() <= 2**-8 * expected.abs() * (1 + 1e-4)).all()
    # rounding every factor to bf16 (as applying them one by one in bf16 does) is measurably worse
    rows = w.to(torch.bfloat16)
    with torch.no_grad():
        for rot, perm in layer._weight_factors([layer._blocks("default")], [layer.boft_perm["default"]]):
            for i in range(rot.shape[0]):
                rows = fastpeft.ops.butterfly_rotate(rows, rot[i : i + 1].to(rows.dtype), perm[i : i + 1])
        rows = rows * layer.boft_s["default"].to(rows.dtype)
    assert (rows.double() - expected).abs().max() > (got.double() - expected).abs().max()


def test_safe_merge_refuses_a_broken_adapter():
    for name in ("lin", "conv"):
        _, ours = pair(kwargs())
        layer = ours.model.get_submodule(name)
        with torch.no_grad():
            layer.boft_s["default"].view(-1)[0] = float("nan")
        before = layer.base_layer.weight.clone()
        with pytest.raises(ValueError, match="NaNs detected"):
            ours.merge_adapter(safe_merge=True)
        assert torch.equal(before, layer.base_layer.weight)


def test_several_adapters_set_adapter_and_disable():
    base = Net()
    theirs, ours = pair(kwargs("m2_size2"), base=base)
    kw2 = {"target_modules": ["lin", "conv"], "boft_block_size": 2, "boft_n_butterfly_factor": 2,
           "init_weights": False, "boft_dropout": 0.25}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, cfg in ((theirs, peft.BOFTConfig), (ours, BOFTConfig)):
            torch.manual_seed(11)
            model.peft_config["other"] = cfg(**kw2)
            model.inject_adapter(model.model, "other")
    st, so = theirs.state_dict(), ours.state_dict()
    assert list(st) == list(so) and all(torch.equal(st[k], so[k]) for k in st)
    for mode in ("eval", "train"):
        theirs.train(mode == "train")
        ours.train(mode == "train")
        for active in ("other", ["default", "other"], ["other", "default"], "default"):
            theirs.set_adapter(active)
            ours.set_adapter(active)
            torch.manual_seed(5)
            yt = theirs(X)
            torch.manual_seed(5)
            close(yt, ours(X))
            trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
            assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
            if mode == "train":
                torch.manual_seed(6)
                gt = grads(theirs, X)
                torch.manual_seed(6)
                go = grads(ours, X)
                for n in gt:
                    close(gt[n], go[n], tol=1e-4)
    ours.eval()
    ours.set_adapter(["default", "other"])
    y_both = ours(X)
    close(dense_linear(ours.model.lin, X.double(), ["default", "other"]), ours.model.lin(X).double())
    ours.merge_adapter()
    close(y_both, ours(X))
    ours.disable_adapter_layers()  # unmerges, then runs the base model
    close(base(X), ours(X), tol=1e-6)
    assert not ours.model.lin.merged
    ours.enable_adapter_layers()
    close(y_both, ours(X))
    ours.delete_adapter("other")
    assert ours.active_adapters == ["default"]
    assert not any("other" in k for k in ours.state_dict()) and "other" not in ours.model.lin.boft_perm


def test_adapters_with_different_block_layouts():
    """peft keeps one permutation buffer per layer (the last adapter's), so adapters with different layouts
    break there; here each adapter keeps its own index maps (checked against the dense reference)."""
    model = BOFTModel(Net(), BOFTConfig(**kwargs("m3_size2")))
    model.peft_config["b"] = BOFTConfig(**kwargs("m1_size4"))
    model.inject_adapter(model.model, "b")
    model.peft_config["c"] = BOFTConfig(**kwargs("m2_size2"))
    model.inject_adapter(model.model, "c")
    model.eval()
    names = ["default", "b", "c"]
    model.set_adapter(names)
    lin, conv = model.model.lin, model.model.conv
    x = torch.randn(4, 16)
    close(dense_linear(lin, x, names), lin(x).double())
    xc = torch.randn(2, 4, 5, 4)
    expected = F.conv2d(xc.double(), dense_conv_weight(conv, names), conv.base_layer.bias.double(), padding=1)
    close(expected, conv(xc).double())
    y = model(X)
    model.merge_adapter()
    close(y, model(X))


def test_disable_adapter_gives_base_outputs_through_peft_model():
    base = Net()
    model = fastpeft.get_peft_model(copy.deepcopy(base), BOFTConfig(**kwargs()))
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(X), base(X))
        with model.disable_adapter():
            close(model(X), base(X), tol=0)


# ---- activation memory -------------------------------------------------------------------------------


def _saved_activation_bytes(layer, x):
    """Bytes of the distinct tensors autograd keeps for backward, parameters and buffers excluded."""
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    return sum(seen.values()), y


@pytest.mark.parametrize("blocks", ["m1_size4", "m2_size2"])
def test_linear_activation_memory_at_most_0_8_of_peft(blocks):
    """At the benchmark's proportions (tokens = 2 d). peft keeps x, its pre-scale output and its dense [d, d]
    rotation products; fastpeft keeps x and the pre-scale output (the rotation is recomputed in backward)."""
    torch.manual_seed(0)
    base = nn.ModuleDict({"lin": nn.Linear(256, 256)})
    kw = {"target_modules": ["lin"], "init_weights": False, **BLOCKS[blocks]}
    theirs = peft.tuners.BOFTModel(copy.deepcopy(base), peft.BOFTConfig(**kw), "default").model["lin"]
    ours = BOFTModel(copy.deepcopy(base), BOFTConfig(**kw)).model["lin"]
    x = torch.randn(512, 256)
    mem_theirs, _ = _saved_activation_bytes(theirs, x)
    mem_ours, y = _saved_activation_bytes(ours, x)
    assert mem_ours <= 0.8 * mem_theirs, (mem_ours, mem_theirs)
    assert mem_ours <= 2 * x.nbytes + 64 * 1024  # x and the pre-scale output, plus the small blocks and scale
    y.sum().backward()  # the saved tensors suffice for backward
    assert ours.boft_R["default"].grad is not None


# ---- transformers models, checkpoints both ways ----------------------------------------------------

LLAMA_CASES = {
    "m1": {"boft_block_size": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM",
           "init_weights": False},
    "m2_dropout": {"boft_block_num": 8, "boft_block_size": 0, "boft_n_butterfly_factor": 2, "boft_dropout": 0.2,
                   "target_modules": ["k_proj", "up_proj"], "task_type": "CAUSAL_LM", "init_weights": False},
}


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "boft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "boft_s" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_outputs_gradients_and_checkpoints_both_ways(case, tmp_path):
    base = tiny_llama()
    kw = LLAMA_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(**copy.deepcopy(kw)))
        torch.manual_seed(0)
        fm = fastpeft.get_peft_model(copy.deepcopy(base), BOFTConfig(**copy.deepcopy(kw)))
    assert type(fm.base_model).__name__ == type(pm.base_model).__name__ == "BOFTModel"
    sp, sf = pm.state_dict(), fm.state_dict()
    assert list(sp) == list(sf) and all(torch.equal(sp[k], sf[k]) for k in sp)
    _randomize(pm)
    fm.load_state_dict(pm.state_dict())
    batch = inputs()
    for mode in ("train", "eval"):
        pm.train(mode == "train")
        fm.train(mode == "train")
        torch.manual_seed(3)
        lp = logits(pm, batch)
        torch.manual_seed(3)
        close(lp, logits(fm, batch), tol=1e-4)
    for m in (pm, fm):
        m.zero_grad()
        torch.manual_seed(4)
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
    assert sorted(pt) == sorted(ft) and all(torch.equal(pt[k], ft[k]) for k in pt)
    assert comparable_config(read_config(fdir)) == comparable_config(read_config(pdir))
    assert read_config(fdir)["peft_type"] == "BOFT"

    loaded_f = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), pdir)  # peft -> fastpeft
    loaded_p = peft.PeftModel.from_pretrained(copy.deepcopy(base), fdir)  # fastpeft -> peft
    assert isinstance(loaded_f.peft_config["default"], BOFTConfig)
    assert loaded_f.peft_config["default"].boft_n_butterfly_factor == kw.get("boft_n_butterfly_factor", 1)
    close(expected, logits(loaded_f, batch), tol=1e-4)
    close(expected, logits(loaded_p.eval(), batch), tol=1e-4)
    assert not any(p.requires_grad for p in loaded_f.parameters())  # inference mode, as peft
    close(expected, logits(loaded_f.merge_and_unload(), batch), tol=1e-4)


def test_gpt2_conv1d_model_trains_and_merges():
    base = tiny_gpt2()
    cfg = BOFTConfig(target_modules=["c_attn", "c_fc"], boft_block_size=4, boft_n_butterfly_factor=2,
                     init_weights=False, task_type="CAUSAL_LM")
    fm = fastpeft.get_peft_model(copy.deepcopy(base), cfg)
    assert fm.peft_config["default"].fan_in_fan_out  # Conv1D: set (with a warning), as peft's LoRA does
    batch = inputs()
    fm.train()
    fm(**batch).logits.pow(2).mean().backward()
    assert all(p.grad is not None for n, p in fm.named_parameters() if p.requires_grad)
    fm.eval()
    expected = logits(fm, batch)
    layer = fm.base_model.model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 32)
    close(dense_linear(layer, x, ["default"]), layer(x).double())
    close(expected, logits(fm.merge_and_unload(), batch), tol=1e-4)


# ---- configs and layer checks ----------------------------------------------------------------------


def test_config_fields_defaults_and_json_equal_peft(tmp_path):
    ours, theirs = BOFTConfig(), peft.BOFTConfig()
    assert ours.to_dict().keys() == theirs.to_dict().keys()
    for k, v in theirs.to_dict().items():
        if k != "peft_version":
            assert ours.to_dict()[k] == (v.value if hasattr(v, "value") else v), k
    kw = {"boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 3, "target_modules": ["a", "b"],
          "exclude_modules": ["c"], "boft_dropout": 0.1, "bias": "boft_only", "layers_to_transform": [0],
          "layers_pattern": "layers", "init_weights": False}
    peft.BOFTConfig(**kw).save_pretrained(str(tmp_path / "p"))
    BOFTConfig(**kw).save_pretrained(str(tmp_path / "f"))
    assert comparable_config(read_config(str(tmp_path / "f"))) == comparable_config(read_config(str(tmp_path / "p")))
    loaded = fastpeft.PeftConfig.from_pretrained(str(tmp_path / "p"))
    assert type(loaded) is BOFTConfig and loaded.target_modules == {"a", "b"}
    assert loaded.boft_n_butterfly_factor == 3
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "f")).to_dict()["peft_type"] == "BOFT"


@pytest.mark.parametrize("kw,error,match", [
    ({"boft_block_size": 0}, ValueError, "Either `boft_block_size` or `boft_block_num` must be non-zero"),
    ({"boft_block_num": 4}, ValueError, "only specify either boft_block_size"),
    ({"boft_block_size": -2}, ValueError, "must not be negative"),
    ({"boft_n_butterfly_factor": 0}, ValueError, "boft_n_butterfly_factor must be a positive integer"),
    ({"boft_dropout": 1.5}, ValueError, r"boft_dropout must be in \[0, 1\]"),
    ({"bias": "lora_only"}, ValueError, "bias must be one of"),
    ({"layers_pattern": "layers"}, ValueError, "layers_to_transform"),
    ({"boft_block_size": 2.0}, TypeError, r"BOFTConfig\.boft_block_size must be int"),
    ({"init_weights": "gaussian"}, TypeError, "init_weights"),
])
def test_bad_configs_raise_clear_errors(kw, error, match):
    with pytest.raises(error, match=match):
        BOFTConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    ({"boft_block_size": 3}, r"in_features \(16\) must be divisible by boft_block_size \(3\)"),
    ({"boft_block_size": 0, "boft_block_num": 5}, r"in_features \(16\) must be divisible by boft_block_num \(5\)"),
    ({"boft_block_size": 4, "boft_n_butterfly_factor": 4}, r"divisible by boft_block_size \* 2\^\(boft_n_butterfly"),
    ({"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 4}, "lower boft_n_butterfly_factor"),
    ({"boft_block_size": 1, "boft_n_butterfly_factor": 2}, "must be even"),
])
def test_bad_block_layouts_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        BOFTModel(Net(), BOFTConfig(target_modules=["lin"], **kw))


def test_conv_layout_error_names_the_filter_dimension():
    with pytest.raises(ValueError, match=r"Convolutional kernel dimension \(in_channels \* 1 \* 1\) \(8\)"):
        BOFTModel(Net(), BOFTConfig(target_modules=["conv1"], boft_block_size=3))


def test_unsupported_layer_and_unknown_targets():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4))
    with pytest.raises(TypeError, match="Embedding is not supported by BOFT"):
        BOFTModel(copy.deepcopy(model), BOFTConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="not found in the base model"):
        BOFTModel(copy.deepcopy(model), BOFTConfig(target_modules=["nope"]))


def test_factor_above_one_is_kept_where_peft_without_its_extension_drops_it(monkeypatch):
    monkeypatch.setattr(peft_boft_layer, "_FBD_CUDA", None)
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: None)  # as when fbd_cuda fails to build
    kw = kwargs("m3_size2")
    theirs = peft.tuners.BOFTModel(Net(), peft.BOFTConfig(**kw), "default")
    ours = BOFTModel(Net(), BOFTConfig(**kw))
    assert theirs.model.lin.boft_R["default"].shape[0] == 1
    assert ours.model.lin.boft_R["default"].shape[0] == 3


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 6)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("bias", ["none", "boft_only"])
def test_linear_with_more_rows_than_outputs_rotates_the_weight_and_matches_peft(blocks, bias, monkeypatch):
    """More rows than output features: the butterfly is applied to W's rows once (W M^T) instead of to every
    row; outputs and gradients (input, boft_R, boft_s, a trainable bias) stay peft's, for every factor count."""
    rotated = []
    real = fastpeft.ops.butterfly_rotate
    monkeypatch.setattr(fastpeft.ops, "butterfly_rotate",
                        lambda x, *a: rotated.append(tuple(x.shape)) or real(x, *a))
    kw = {"target_modules": ["lin"], "init_weights": False, "bias": bias, **BLOCKS[blocks]}
    theirs, ours = pair(kw, base=Wide())
    x = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(5))  # 40 rows > 6 outputs
    close(theirs(x), ours(x), tol=1e-5)
    assert rotated == [(6, 16)]  # W's rows, not x's
    g_theirs, g_ours = grads(theirs, x), grads(ours, x)
    assert set(g_theirs) == set(g_ours)
    for name in g_theirs:
        close(g_theirs[name], g_ours[name], tol=1e-5)
