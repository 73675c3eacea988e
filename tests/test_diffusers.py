"""The diffusion use case, end to end: LoRA, LoHa, LoKr, OFT and BOFT on a tiny diffusers UNet2DConditionModel
(built from a config, no download), through fastpeft's public API, with peft as the oracle.

For each method (LoHa / LoKr with `use_effective_conv2d` both ways on the resnet convs):
  * adapters go on the attention projections (to_q / to_k / to_v / to_out.0, nn.Linear) and the resnet
    convs (conv1 / conv2, 3x3 nn.Conv2d); the default initialisation leaves the UNet's output unchanged;
  * a few AdamW steps on an MSE-to-noise loss lower the loss and change only adapter parameters;
  * `merge_and_unload()` returns a plain UNet2DConditionModel with the adapted outputs;
  * the adapter saved by fastpeft loads into peft with the same outputs, and back (the file key sets and
    adapter_config.json's peft_type are peft's);
  * on the same (random) adapter weights, fastpeft's outputs, adapter gradients and merged weights are
    peft's.
LoHa / LoKr tests skip, naming the missing config, while fastpeft has no LoHaConfig / LoKrConfig.

OFT and BOFT (random adapter weights where compared with peft):
  * peft 0.21.2's unmerged OFT Conv2d forward is wrong for kernels > 1 (it unfolds the input, rotates the patches
    and F.fold's them back, summing the overlaps), while its merge (rotating the weight) is right; fastpeft
    computes the rotated-weight conv. So "oft" (attention projections + the 3x3 resnet convs) is compared with
    peft's MERGED model for outputs, and with peft whose OFT Conv2d forward applies peft's own merge formula
    differentiably for gradients; "oft-1x1" (attention projections + the 13 1x1 convs proj_in / proj_out /
    conv_shortcut, where peft's unmerged forward is right) is compared with plain peft, unmerged;
  * peft builds BOFT's block diagonal with its fbd_cuda extension and silently uses boft_n_butterfly_factor = 1
    when it cannot build it; the autouse fixture gives peft a pure-PyTorch stand-in (as in test_boft.py), so that
    peft is the oracle for the butterfly factor 2 used here.
Every targeted dimension (attention in_features 32 / 64; 1x1 in_channels 32 / 64 / 96 / 128; 3x3
in_channels * 9 = 288 / 576 / 864 / 1152) is a multiple of 16, so OFT blocks of 8 and BOFT blocks of 4 with two
butterfly factors fit every layer unadjusted.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from _peft_testing import FakeFbdCuda  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.tuners.base import BaseTunerLayer  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
# attention projections and the UNet's 1x1 convs (where peft's unmerged OFT Conv2d forward is right)
TARGETS_1X1 = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv_shortcut"]
N_TARGETS = {tuple(TARGETS): 48, tuple(TARGETS_1X1): 45}  # tiny_unet: 32 projections + 16 3x3 / 13 1x1 convs

# method id -> (config class name (same in peft and fastpeft), shared kwargs, kwargs for random adapter weights,
#               adapter parameter prefix)
METHODS = {
    "lora": ("LoraConfig", dict(r=4, lora_alpha=8), dict(init_lora_weights=False), "lora_"),
    "loha": ("LoHaConfig", dict(r=4, alpha=8, use_effective_conv2d=False), dict(init_weights=False), "hada_"),
    "loha-effconv": ("LoHaConfig", dict(r=4, alpha=8, use_effective_conv2d=True), dict(init_weights=False), "hada_"),
    "lokr": ("LoKrConfig", dict(r=4, alpha=8, use_effective_conv2d=False), dict(init_weights=False), "lokr_"),
    "lokr-effconv": ("LoKrConfig", dict(r=4, alpha=8, use_effective_conv2d=True), dict(init_weights=False), "lokr_"),
    "oft": ("OFTConfig", dict(r=0, oft_block_size=8, use_cayley_neumann=False), dict(init_weights=False), "oft_"),
    "oft-1x1": ("OFTConfig", dict(r=0, oft_block_size=8), dict(init_weights=False), "oft_"),
    "boft": ("BOFTConfig", dict(boft_block_size=4, boft_n_butterfly_factor=2), dict(init_weights=False), "boft_"),
}
METHOD_TARGETS = {"oft-1x1": TARGETS_1X1}  # method -> target_modules, TARGETS when not listed
# methods whose unmerged peft forward is wrong on some target (OFT's 3x3 convs): compare with peft merged
PEFT_UNMERGED_WRONG = {"oft"}


def targets_of(method: str) -> list[str]:
    return list(METHOD_TARGETS.get(method, TARGETS))


@pytest.fixture(autouse=True)
def peft_fbd(monkeypatch):
    """peft's BOFT keeps boft_n_butterfly_factor > 1 only with its fbd_cuda extension: give it the stand-in."""
    import peft.tuners.boft.layer as peft_boft_layer

    monkeypatch.setattr(peft_boft_layer, "_FBD_CUDA", FakeFbdCuda())


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def unet_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g))


def run(model, inputs):
    sample, t, enc = inputs
    return model(sample, t, encoder_hidden_states=enc).sample


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def config(lib, method: str, random: bool = False):
    """`lib.<Config>(target_modules=TARGETS, ...)`; skips when fastpeft does not have the config yet."""
    name, kwargs, random_kwargs, _ = METHODS[method]
    try:
        cls = getattr(lib, name)
    except (AttributeError, ImportError) as exc:
        if lib is fastpeft:
            pytest.skip(f"fastpeft.{name} is not available yet ({type(exc).__name__}: {exc})")
        raise
    return cls(target_modules=targets_of(method), **kwargs, **(random_kwargs if random else {}))


def target_module_names(unet, targets=TARGETS) -> list[str]:
    return [n for n, m in unet.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]


def tuner_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def run_peft(pm, inputs, method: str):
    """peft's output where peft is right: its merged model (on a copy) for PEFT_UNMERGED_WRONG methods."""
    if method in PEFT_UNMERGED_WRONG:
        pm = copy.deepcopy(pm)
        quiet(pm.merge_adapter)
    return run(pm, inputs)


# ---- training, merging and checkpoints of a fastpeft-trained adapter --------------------------------------------------


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, one_thread):
    """A fastpeft adapter (default init) trained a few AdamW steps on the tiny UNet; what the tests check."""
    method = request.param
    cfg = config(fastpeft, method)
    torch.manual_seed(0)
    unet = tiny_unet()
    inputs = unet_inputs()
    with torch.no_grad():
        y_base = run(unet, inputs)
    model = quiet(fastpeft.get_peft_model, copy.deepcopy(unet), cfg)
    with torch.no_grad():
        y_init = run(model, inputs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-2)
    target = torch.randn(y_base.shape, generator=torch.Generator().manual_seed(5))
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(run(model, inputs), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        y_trained = run(model, inputs)
    return dict(method=method, unet=unet, inputs=inputs, model=model, y_base=y_base, y_init=y_init,
                y_trained=y_trained, before=before, losses=losses)


def test_default_init_is_identity_and_every_target_is_adapted(trained):
    assert rel_err(trained["y_init"], trained["y_base"]) < 1e-6
    prefix = METHODS[trained["method"]][3]
    model, unet = trained["model"], trained["unet"]
    method_targets = targets_of(trained["method"])
    targets = target_module_names(unet, method_targets)
    assert len(targets) == N_TARGETS[tuple(method_targets)]  # see tiny_unet
    wrapped = {n.removeprefix("base_model.model.") for n in tuner_layers(model)}
    assert wrapped == set(targets)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(prefix in n for n in trainable), [n for n in trainable if prefix not in n]
    for t in targets:
        assert any(n.startswith(f"base_model.model.{t}.") for n in trainable), t


def test_training_lowers_the_loss_and_changes_only_adapter_parameters(trained):
    losses = trained["losses"]
    assert losses[-1] < 0.95 * losses[0] and losses[-1] == min(losses), losses
    model, before = trained["model"], trained["before"]
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"adapter parameter {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    assert rel_err(trained["y_trained"], trained["y_base"]) > 1e-3


def test_merge_and_unload_keeps_the_outputs(trained):
    model = copy.deepcopy(trained["model"])
    merged = model.merge_and_unload()
    assert isinstance(merged, diffusers.UNet2DConditionModel)
    assert not tuner_layers(merged)
    assert set(merged.state_dict()) == set(trained["unet"].state_dict())
    with torch.no_grad():
        y_merged = run(merged, trained["inputs"])
    assert rel_err(y_merged, trained["y_trained"]) < 1e-5


def test_checkpoint_round_trip_both_ways(trained, tmp_path):
    """fastpeft save -> peft load (same outputs) -> peft save -> fastpeft load (same outputs, same files)."""
    unet, inputs, y = trained["unet"], trained["inputs"], trained["y_trained"]
    fdir, pdir = tmp_path / "fastpeft", tmp_path / "peft"
    quiet(trained["model"].save_pretrained, str(fdir))
    pm = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(unet), str(fdir))
    with torch.no_grad():
        assert rel_err(run_peft(pm, inputs, trained["method"]), y) < 1e-5
    quiet(pm.save_pretrained, str(pdir))
    fm = quiet(fastpeft.PeftModel.from_pretrained, copy.deepcopy(unet), str(pdir))
    with torch.no_grad():
        assert rel_err(run(fm, inputs), y) < 1e-5
    f_sd = safetensors_torch.load_file(str(fdir / "adapter_model.safetensors"))
    p_sd = safetensors_torch.load_file(str(pdir / "adapter_model.safetensors"))
    assert set(f_sd) == set(p_sd)
    for k in f_sd:
        torch.testing.assert_close(f_sd[k], p_sd[k], rtol=0, atol=0, msg=k)
    f_cfg = json.loads((fdir / "adapter_config.json").read_text())
    p_cfg = json.loads((pdir / "adapter_config.json").read_text())
    assert f_cfg["peft_type"] == p_cfg["peft_type"]
    assert sorted(f_cfg["target_modules"]) == sorted(p_cfg["target_modules"]) == sorted(targets_of(trained["method"]))


# ---- the same random adapter weights in peft and fastpeft -------------------------------------------------------------


def _peft_loha_cp_weight_autograd(t1, w1a, w1b, t2, w2a, w2b, scale):
    """peft's LoHa effective-conv weight (forward formula of peft.tuners.loha.layer.HadaWeightCP) differentiated by
    autograd: peft 0.21.2's hand-written HadaWeightCP.backward builds the gradient of w1_a from (t2, w2_b) and that
    of w2_a from (t1, w1_b), so its hada_w{1,2}_a gradients are wrong (see the test below). Outputs are unchanged."""
    rebuild1 = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
    rebuild2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
    return rebuild1 * rebuild2 * scale


def test_peft_loha_effective_conv_backward_is_wrong_so_the_oracle_is_patched():
    from peft.tuners.loha.layer import HadaWeightCP

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 3, 3, 3), (3, 5), (3, 4), (3, 3, 3, 3), (3, 5), (3, 4)]
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    scale = torch.tensor(1.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: _peft_loha_cp_weight_autograd(*a, scale), args)
    gw = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((_peft_loha_cp_weight_autograd(*args, scale) * gw).sum(), args)
    theirs = torch.autograd.grad((HadaWeightCP.apply(*args, scale) * gw).sum(), args)
    for i in (0, 2, 3, 5):  # t1, w1_b, t2, w2_b: peft right
        torch.testing.assert_close(theirs[i], ours[i])
    if all(torch.allclose(theirs[i], ours[i]) for i in (1, 4)):
        pytest.fail("peft's HadaWeightCP.backward is right now: drop the patch in test_matches_peft_...")


def _peft_oft_conv_forward_by_merged_weight(self, x, *args, **kwargs):
    """peft's OFT Conv2d with its own merge formula (weight viewed [out, in*k*k] <- (R @ weight.T).T, R from
    get_delta_weight) applied differentiably in the forward: peft's right path, with gradients. peft 0.21.2's own
    unmerged forward rotates unfolded input patches and sums them back with F.fold, which is wrong for kernels > 1."""
    base = self.get_base_layer()
    weight = base.weight.reshape(self.out_features, -1)
    for adapter in self.active_adapters:
        if adapter in self.oft_R.keys():
            weight = torch.mm(self.get_delta_weight(adapter), weight.t()).t()
    return base._conv_forward(x, weight.reshape(base.weight.shape), base.bias)


@pytest.mark.parametrize("method", list(METHODS))
def test_matches_peft_outputs_gradients_and_merge(method, monkeypatch):
    fcfg = config(fastpeft, method, random=True)
    if method == "loha-effconv":
        import peft.tuners.loha.layer as peft_loha_layer

        monkeypatch.setattr(peft_loha_layer, "make_weight_cp", _peft_loha_cp_weight_autograd)
    unet = tiny_unet()
    inputs = unet_inputs()
    torch.manual_seed(7)
    pm = quiet(peft.get_peft_model, copy.deepcopy(unet), config(peft, method, random=True))
    fm = quiet(fastpeft.get_peft_model, copy.deepcopy(unet), fcfg)
    p_sd, f_sd = pm.state_dict(), fm.state_dict()
    assert set(p_sd) == set(f_sd), sorted(set(p_sd) ^ set(f_sd))
    for k in p_sd:
        assert p_sd[k].shape == f_sd[k].shape, k
    if METHODS[method][0] == "BOFTConfig":  # peft kept both butterfly factors (the fbd_cuda stand-in is in use)
        assert all(v.shape[0] == 2 for k, v in p_sd.items() if "boft_R" in k)
    fm.load_state_dict(p_sd)
    assert ({n for n, p in pm.named_parameters() if p.requires_grad}
            == {n for n, p in fm.named_parameters() if p.requires_grad})
    pm.eval(), fm.eval()
    if method in PEFT_UNMERGED_WRONG:
        import peft.tuners.oft.layer as peft_oft_layer

        with torch.no_grad():
            y_peft_unmerged, y_peft_merged = run(pm, inputs), run_peft(pm, inputs, method)
        assert rel_err(y_peft_unmerged, y_peft_merged) > 1e-3, "peft's unmerged OFT conv is right now: drop the patch"
        monkeypatch.setattr(peft_oft_layer.Conv2d, "forward", _peft_oft_conv_forward_by_merged_weight)
        with torch.no_grad():
            assert rel_err(run(pm, inputs), y_peft_merged) < 1e-5  # the patched forward is peft's merge
    outs = []
    for m in (pm, fm):
        y = run(m, inputs)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        outs.append((y.detach(), grads))
    with torch.no_grad():
        y_base = run(unet, inputs)
    assert rel_err(outs[0][0], y_base) > 1e-3  # the random adapters matter
    assert rel_err(outs[1][0], outs[0][0]) < 1e-5
    for n, gp in outs[0][1].items():
        assert rel_err(outs[1][1][n], gp) < 1e-4, n
    merged_p, merged_f = pm.merge_and_unload(), fm.merge_and_unload()
    with torch.no_grad():
        yp, yf = run(merged_p, inputs), run(merged_f, inputs)
    assert rel_err(yf, yp) < 1e-5 and rel_err(yf, outs[0][0]) < 1e-5
    mp_sd, mf_sd = merged_p.state_dict(), merged_f.state_dict()
    assert set(mp_sd) == set(mf_sd)
    for k in mp_sd:
        assert rel_err(mf_sd[k], mp_sd[k]) < 1e-5, k


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m][0] in ("LoHaConfig", "LoKrConfig")])
def test_rank_and_module_dropout_in_training_match_peft(method):
    """Training-mode forward with rank_dropout and module_dropout: the same seed gives peft's output."""
    name, kwargs, random_kwargs, _ = METHODS[method]
    kwargs = dict(kwargs, rank_dropout=0.2, module_dropout=0.2, **random_kwargs)
    fcls = type(config(fastpeft, method))  # skips while fastpeft lacks the config
    unet = tiny_unet()
    inputs = unet_inputs()
    pm = quiet(peft.get_peft_model, copy.deepcopy(unet), getattr(peft, name)(target_modules=list(TARGETS), **kwargs))
    fm = quiet(fastpeft.get_peft_model, copy.deepcopy(unet), fcls(target_modules=list(TARGETS), **kwargs))
    fm.load_state_dict(pm.state_dict())
    pm.train(), fm.train()
    with torch.no_grad():
        torch.manual_seed(3)
        yp = run(pm, inputs)
        torch.manual_seed(3)
        yf = run(fm, inputs)
        torch.manual_seed(4)
        yp_other = run(pm, inputs)
    assert rel_err(yp_other, yp) > 1e-3  # the dropouts are active
    assert rel_err(yf, yp) < 1e-5
