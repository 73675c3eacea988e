"""AdaLoRA conformance with peft 0.21.2 (the oracle): config fields / defaults / checks, structure and seeded
initialisation, outputs and gradients (Linear, Conv1D, Conv2d; the orthogonality regulariser in the loss),
the rank allocator step for step (same weights and gradients -> the same importance state, masks and
rank_pattern), a training run that reaches target_r, checkpoints both ways (also after pruning: rank_pattern in
the config, resized tensors), merge / unmerge / merge_and_unload, disable_adapter, the one-trainable-adapter
rule, a bfloat16 base, and the README example.
"""
from __future__ import annotations

import copy
import pathlib
import re
import warnings

import pytest
import torch
from torch import nn

from _peft_testing import close, inputs, read_config, read_tensors, seeded_pair, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.tuners.adalora import (  # noqa: E402
    TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING, AdaLoraConfig, AdaLoraModel, SVDConv2d, SVDLinear,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KW = dict(init_r=6, target_r=2, tinit=2, tfinal=2, total_step=12, deltaT=1, lora_alpha=16, target_modules=LLAMA_TARGETS)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(12 + 5 * 16, 4)

    def forward(self, x, img):
        return self.head(torch.cat([torch.tanh(self.lin(x)), self.conv(img).flatten(1)], dim=1))


def _randomize(*models, seed=7, scale=0.3):
    """The same random values in every adapter tensor of each model (state dicts must line up)."""
    g = torch.Generator().manual_seed(seed)
    named = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, p in named[0].items():
            if "lora_" in name:
                v = torch.randn(p.shape, generator=g) * scale
                for d in named:
                    d[name].copy_(v)


def _peft_pair(kw, base, cls_name=None, seed=0, task_type="CAUSAL_LM"):
    """(peft PeftModel, fastpeft PeftModel) on copies of `base` under the same seed, identical state dicts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(task_type=task_type, **copy.deepcopy(kw)))
        torch.manual_seed(seed)
        fm = fastpeft.get_peft_model(copy.deepcopy(base), AdaLoraConfig(task_type=task_type, **copy.deepcopy(kw)))
    sp, sf = pm.state_dict(), fm.state_dict()
    assert list(sp) == list(sf)
    for k in sp:
        assert sp[k].dtype == sf[k].dtype and torch.equal(sp[k], sf[k]), k
    return pm, fm


def _no_labels(b):
    """peft's AdaLoraModel.forward raises AttributeError for labels with an inference-only adapter."""
    return {k: v for k, v in b.items() if k != "labels"}


def _batch():
    b = inputs(batch=2, seq=8)
    b["labels"] = b["input_ids"].clone()
    return b


# ---- config ------------------------------------------------------------------------------------------------


def test_config_dict_and_mapping_equal_peft():
    from peft.utils import constants

    assert TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING == {
        k: v for k, v in constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING.items()}
    for kw in (dict(total_step=100), KW):
        ours = AdaLoraConfig(**copy.deepcopy(kw)).to_dict()
        theirs = peft.AdaLoraConfig(**copy.deepcopy(kw)).to_dict()
        theirs = {k: (v.value if hasattr(v, "value") else v) for k, v in theirs.items()}
        for d in (ours, theirs):
            d.pop("peft_version", None)
            if isinstance(d.get("target_modules"), (set, list)):
                d["target_modules"] = sorted(d["target_modules"])
        missing = set(theirs) - set(ours)
        assert not missing, missing
        for k in theirs:
            assert ours[k] == theirs[k] or (not ours[k] and not theirs[k]), (k, ours[k], theirs[k])
    assert AdaLoraConfig(total_step=10).rank_pattern is None  # peft's null, not {}
    # a JSON round trip through the generic loader
    cfg = fastpeft.PeftConfig.from_peft_type(**AdaLoraConfig(**KW).to_dict())
    assert isinstance(cfg, AdaLoraConfig) and cfg.init_r == 6


@pytest.mark.parametrize("kw, match", [
    (dict(), "total_step must be set"),
    (dict(total_step=0), "total_step must be set"),
    (dict(total_step=10, tinit=5, tfinal=5), "no budgeting phase.*increase `total_step` to more than 10"),
    (dict(total_step=10, init_r=4, target_r=8), r"target_r \(8\) must not exceed init_r \(4\)"),
    (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight should be greater than or equal to 0"),
    (dict(total_step=10, use_dora=True), "does not support DoRA"),
    (dict(total_step=10, beta1=1.0), "beta1 must lie strictly between 0 and 1"),
    (dict(total_step=10, deltaT=0), "deltaT must be a positive integer"),
    (dict(total_step=10, init_r=0), "init_r must be a positive integer"),
    (dict(total_step=10, rank_pattern={"a.lora_E": 3}), "rank_pattern must map module names to lists"),
])
def test_config_checks_say_what_to_change(kw, match):
    with pytest.raises(ValueError, match=match):
        AdaLoraConfig(**kw)


def test_config_r_warning_as_peft():
    with pytest.warns(UserWarning, match="`r` is not used in AdaLora"):
        AdaLoraConfig(total_step=10, r=4)


# ---- structure, outputs, gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_llama_outputs_loss_and_gradients_equal_peft(mode):
    pm, fm = _peft_pair(KW, tiny_llama())
    _randomize(pm, fm)
    for m in (pm, fm):
        m.train(mode == "train")
    layer = fm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SVDLinear) and layer.lora_A["default"].shape == (6, 32)
    assert layer.lora_E["default"].shape == (6, 1) and layer.scaling["default"] == 16
    b = _batch()
    op, of = pm(**b), fm(**b)
    close(op.logits, of.logits)
    close(op.loss, of.loss)  # includes orth_reg_weight * the orthogonality regulariser
    plain = fm.get_base_model()(**b).loss
    assert of.loss.item() > plain.item() + 1e-3  # the regulariser is there
    op.loss.backward()
    of.loss.backward()
    gp = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    gf = {n: p.grad for n, p in fm.named_parameters() if p.grad is not None}
    assert set(gp) == set(gf) and any("lora_E" in n for n in gf)
    for n in gp:
        close(gp[n], gf[n], tol=1e-4)
    assert all(p.requires_grad == ("lora_" in n) for n, p in fm.named_parameters())


def test_gpt2_conv1d_and_conv2d_outputs_and_gradients_equal_peft():
    kw = dict(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=["c_attn", "c_proj"])
    pm, fm = _peft_pair(kw, tiny_gpt2())
    _randomize(pm, fm)
    assert fm.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    b = _batch()
    op, of = pm(**b), fm(**b)
    close(op.logits, of.logits)
    close(op.loss, of.loss)
    op.loss.backward()
    of.loss.backward()
    for (n, p), (_, q) in zip(pm.named_parameters(), fm.named_parameters()):
        if p.grad is not None:
            close(p.grad, q.grad, tol=1e-4)

    kw = dict(init_r=3, target_r=1, total_step=10, lora_alpha=4, target_modules=["lin", "conv"])
    theirs, ours = seeded_pair(peft.tuners.AdaLoraModel, peft.AdaLoraConfig(**kw), AdaLoraModel,
                               AdaLoraConfig(**kw), Net())
    _randomize(theirs, ours)
    assert isinstance(ours.model.conv, SVDConv2d) and ours.model.conv.lora_A["default"].shape == (3, 27)
    g = torch.Generator().manual_seed(1)
    x, img = torch.randn(2, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    yt, yo = theirs(x, img), ours(x, img)
    close(yt, yo)
    yt.pow(2).sum().backward()
    yo.pow(2).sum().backward()
    for (n, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
        if p.grad is not None:
            close(p.grad, q.grad, tol=1e-4)


def test_forward_runs_the_fused_lora_op_with_A_times_E(monkeypatch):
    from fastpeft import ops

    calls = []
    real = ops.lora_linear

    def spy(x, weight, bias, lora_A, lora_B, scaling, *args, **kwargs):
        calls.append((tuple(lora_A.shape), scaling))
        return real(x, weight, bias, lora_A, lora_B, scaling, *args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear", spy)
    model = fastpeft.get_peft_model(tiny_llama(), AdaLoraConfig(**KW))
    model(**inputs())
    assert len(calls) == 2 * len(LLAMA_TARGETS)
    assert all(shape == (6, 32) or shape == (6, 48) for shape, _ in calls)
    assert all(abs(s - 16 / (6 + 1e-5)) < 1e-9 for _, s in calls)


def test_gpt2_merge_and_unload_equal_peft():
    kw = dict(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=["c_attn", "c_proj"])
    pm, fm = _peft_pair(kw, tiny_gpt2())
    _randomize(pm, fm)
    b = inputs()
    with torch.no_grad():
        expected = fm.eval()(**b).logits
        mp, mf = pm.merge_and_unload(), fm.merge_and_unload()
        assert type(mf) is transformers.GPT2LMHeadModel
        sp, sf = mp.state_dict(), mf.state_dict()
        assert list(sp) == list(sf)
        for k in sp:
            close(sp[k], sf[k], tol=1e-6)
        close(expected, mf(**b).logits)


def test_unsupported_module_and_bad_input_errors():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

    with pytest.raises(ValueError, match="only `torch.nn.Linear`, `Conv1D`, and `torch.nn.Conv2d`"):
        AdaLoraModel(Emb(), AdaLoraConfig(total_step=10, target_modules=["emb"]), "default")
    with pytest.raises(ValueError, match="not found in the base model"):
        AdaLoraModel(Net(), AdaLoraConfig(total_step=10, target_modules=["nope"]), "default")
    with pytest.raises(TypeError, match="needs an AdaLoraConfig"):
        AdaLoraModel(Net(), fastpeft.LoraConfig(target_modules=["lin"]), "default")
    model = AdaLoraModel(Net(), AdaLoraConfig(total_step=10, target_modules=["lin"]), "default")
    with pytest.raises(RuntimeError, match=r"call it after loss.backward\(\)"):
        model.update_and_allocate(0)
    with pytest.raises(ValueError, match="global_step must be a non-negative int"):
        model.update_and_allocate(-1)
    with pytest.raises(TypeError, match="does not support add_weighted_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "x")


# ---- rank allocator ----------------------------------------------------------------------------------------


def test_rank_allocator_equal_peft_step_for_step():
    """Same weights and the same gradients every step: peft's importance state, masks and rank_pattern, exactly."""
    kw = dict(KW, total_step=14, tinit=2, tfinal=3, deltaT=2)
    pm, fm = _peft_pair(kw, tiny_llama())
    _randomize(pm, fm)
    tp, tf = pm.base_model, fm.base_model
    assert (tf.rankallocator.init_bgt, tf.rankallocator.target_bgt) == (tp.rankallocator.init_bgt,
                                                                       tp.rankallocator.target_bgt)
    pp, pf = dict(pm.named_parameters()), dict(fm.named_parameters())
    g = torch.Generator().manual_seed(11)
    seen_pattern = False
    for step in range(kw["total_step"] + 3):
        with torch.no_grad():
            for n, p in pp.items():
                if p.requires_grad:
                    grad = torch.randn(p.shape, generator=g)
                    p.grad, pf[n].grad = grad.clone(), grad.clone()
                    p.add_(grad, alpha=-1e-3)  # an optimizer-like change, so that masked E comes back unless masked
                    pf[n].add_(grad, alpha=-1e-3)
        tp.update_and_allocate(step)
        tf.update_and_allocate(step)
        assert tf.rankallocator.budget_schedule(step) == tp.rankallocator.budget_schedule(step)
        for n, p in pp.items():
            assert torch.equal(p, pf[n]), (step, n)
        ap, af = tp.rankallocator, tf.rankallocator
        assert set(ap.exp_avg_ipt) == set(af.exp_avg_ipt), step
        for n in ap.exp_avg_ipt:
            for d in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                assert torch.equal(getattr(ap, d)[n], getattr(af, d)[n]), (step, d, n)
        rp, rf = pm.peft_config["default"].rank_pattern, fm.peft_config["default"].rank_pattern
        assert rp == rf, step
        seen_pattern |= rp is not None
    assert seen_pattern
    kept = sum(sum(v) for v in fm.peft_config["default"].rank_pattern.values())
    assert kept == tf.rankallocator.target_bgt


def test_real_training_steps_equal_peft(tmp_path):
    """forward(labels) + backward + AdamW + update_and_allocate on both: the same rank_pattern every step and
    the same weights (to float tolerance: the fused op rounds differently)."""
    kw = dict(KW, total_step=10, tinit=1, tfinal=3, deltaT=1)
    pm, fm = _peft_pair(kw, tiny_llama())
    b = _batch()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (pm, fm)]
    for m in (pm, fm):
        m.train()
    for step in range(kw["total_step"] + 2):
        losses = []
        for m, opt in zip((pm, fm), opts):
            loss = m(**b).loss
            loss.backward()
            opt.step()
            m.base_model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-4, step
        assert pm.peft_config["default"].rank_pattern == fm.peft_config["default"].rank_pattern, step
    for (n, p), (_, q) in zip(pm.named_parameters(), fm.named_parameters()):
        if "lora_" in n:
            close(p, q, tol=1e-4)
            assert torch.equal(p == 0, q == 0) if "lora_E" in n else True, n
    # peft's pruned checkpoint (written by peft's save_pretrained) loads into fastpeft with peft's outputs
    pm.eval()
    x = inputs()
    with torch.no_grad():
        expected = pm(**x).logits
    pm.save_pretrained(tmp_path / "peft")
    assert read_config(tmp_path / "peft")["rank_pattern"] is not None
    ours = fastpeft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        close(expected, ours(**x).logits)


def test_training_run_reaches_target_r_and_checkpoints_round_trip(tmp_path):
    """A real AdaLoRA run (AdamW, labels, orth regulariser): every step through the schedule; the final rank
    pattern keeps target_r triplets per layer on average, pruned E stay zero; the pruned adapter saves with
    rank_pattern and resized tensors, reloads into fastpeft and into peft with the same outputs."""
    kw = dict(KW, total_step=16, tinit=2, tfinal=4, deltaT=1)
    torch.manual_seed(0)
    base = tiny_llama()
    model = fastpeft.get_peft_model(copy.deepcopy(base), AdaLoraConfig(task_type="CAUSAL_LM", **kw))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = _batch()
    losses = []
    for step in range(kw["total_step"] + 2):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    config = model.peft_config["default"]
    n_layers = len(model.base_model.rankallocator.name_set)
    assert n_layers == 2 * len(LLAMA_TARGETS)
    kept = {k: sum(v) for k, v in config.rank_pattern.items()}
    assert sum(kept.values()) == kw["target_r"] * n_layers
    assert len(set(kept.values())) > 1  # ranks were re-distributed, not cut uniformly
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, SVDLinear):
            mask = torch.tensor(config.rank_pattern[f"{name}.lora_E.default"])
            assert torch.all(layer.lora_E["default"][~mask] == 0)
            assert torch.all(layer.lora_E["default"][mask] != 0)

    model.eval()
    with torch.no_grad():
        expected = model(**b).logits
    model.save_pretrained(tmp_path / "ours")
    saved = read_config(tmp_path / "ours")
    assert saved["peft_type"] == "ADALORA" and "model.layers.0.self_attn.q_proj.lora_E" in saved["rank_pattern"]
    tensors = read_tensors(tmp_path / "ours")
    assert not any("ranknum" in k for k in tensors)
    top = max(kept, key=kept.get)  # a layer that kept triplets
    module = top[: -len(".lora_E.default")]
    key, r0 = f"base_model.model.{module}", kept[top]
    assert tensors[f"{key}.lora_A"].shape[0] == r0 and tensors[f"{key}.lora_B"].shape[1] == r0

    reloaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    layer = reloaded.base_model.model.get_submodule(module)
    assert layer.lora_A["default"].shape[0] == r0 and layer.ranknum["default"].item() == kw["init_r"]
    with torch.no_grad():
        close(expected, reloaded(**b).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        close(expected, theirs(**_no_labels(b)).logits)
    # and back: peft writes it, fastpeft reads it
    theirs.save_pretrained(tmp_path / "peft")
    again = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    lean = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", low_cpu_mem_usage=True).eval()
    with torch.no_grad():
        close(expected, again(**b).logits)
        close(expected, lean(**b).logits)
    # a reloaded trainable pruned adapter keeps training (pruned triplets stay out)
    trainable = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    out = trainable(**b)
    out.loss.backward()
    trainable.base_model.update_and_allocate(kw["total_step"] + 5)


def test_checkpoints_both_ways_unpruned(tmp_path):
    pm, fm = _peft_pair(dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]), tiny_llama())
    _randomize(pm, fm)
    base = tiny_llama()
    b = _batch()
    with torch.no_grad():
        expected = pm.eval()(**b).logits
    pm.save_pretrained(tmp_path / "peft")
    fm.save_pretrained(tmp_path / "ours")
    tp, to = read_tensors(tmp_path / "peft"), read_tensors(tmp_path / "ours")
    assert sorted(tp) == sorted(to) and all(torch.equal(tp[k], to[k]) for k in tp)
    cp, co = read_config(tmp_path / "peft"), read_config(tmp_path / "ours")
    for k in ("peft_type", "init_r", "target_r", "total_step", "rank_pattern", "lora_alpha", "orth_reg_weight"):
        assert cp[k] == co[k], k
    ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        close(expected, ours(**b).logits)
        close(expected, theirs(**_no_labels(b)).logits)
    assert not any(p.requires_grad for p in ours.parameters())
    ours(**b)  # labels with an inference-only adapter: no regulariser, no error (peft raises AttributeError)


# ---- merge, disable, adapters, dtype -----------------------------------------------------------------------


def test_merge_unmerge_unload_and_disable():
    pm, fm = _peft_pair(KW, tiny_llama())
    _randomize(pm, fm)
    pm.eval()
    fm.eval()
    b = inputs()
    with torch.no_grad():
        expected = fm(**b).logits
        with fm.disable_adapter():
            disabled = fm(**b).logits
        close(disabled, tiny_llama()(**b).logits)
        assert (expected - disabled).abs().max() > 1e-3
        pm.base_model.merge_adapter()
        fm.base_model.merge_adapter()
        close(expected, fm(**b).logits)
        sp, sf = pm.state_dict(), fm.state_dict()
        for k in sp:
            close(sp[k], sf[k], tol=1e-6)
        fm.base_model.unmerge_adapter()
        close(expected, fm(**b).logits)
        merged = fm.merge_and_unload()
    assert type(merged) is transformers.LlamaForCausalLM
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        close(expected, merged(**b).logits)


def test_one_trainable_adapter_rule():
    model = fastpeft.get_peft_model(tiny_llama(), AdaLoraConfig(total_step=10, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="supports only 1 trainable adapter.*inference_mode to True"):
        model.add_adapter("second", AdaLoraConfig(total_step=10, target_modules=["q_proj"]))
    assert "second" not in model.peft_config
    model.add_adapter("frozen", AdaLoraConfig(total_step=10, target_modules=["q_proj"], inference_mode=True))
    assert model.base_model.trainable_adapter_name == "default"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer.lora_A["frozen"].requires_grad
    model.delete_adapter("frozen")
    assert "frozen" not in layer.lora_A and "frozen" not in layer.ranknum
    model(**_batch()).loss.backward()
    model.base_model.update_and_allocate(1)  # the allocator sees only the trainable adapter
    assert all(".default" in n for n in model.base_model.rankallocator.exp_avg_ipt)
    with pytest.raises(ValueError, match="supports only 1 trainable adapter"):
        AdaLoraModel(tiny_llama(), {"a": AdaLoraConfig(total_step=10, target_modules=["q_proj"]),
                                    "b": AdaLoraConfig(total_step=10, target_modules=["v_proj"])}, "a")


def test_bfloat16_base_float32_adapters():
    base = tiny_llama().to(torch.bfloat16)
    pm, fm = _peft_pair(dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj", "down_proj"]),
                        base)
    _randomize(pm, fm)
    assert {p.dtype for n, p in fm.named_parameters() if "lora_" in n} == {torch.float32}
    b = _batch()
    op, of = pm(**b), fm(**b)
    assert of.logits.dtype == op.logits.dtype
    close(op.logits.float(), of.logits.float(), tol=3e-2)
    of.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in fm.named_parameters() if "lora_E" in n)
    fm.base_model.update_and_allocate(3)


# ---- README ------------------------------------------------------------------------------------------------


def test_readme_adalora_example_runs(tmp_path, monkeypatch):
    text = README.read_text() if README.exists() else ""
    if "## AdaLoRA" not in text:
        pytest.skip("README.md has no '## AdaLoRA' section yet")
    section = text.split("## AdaLoRA", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's section '## AdaLoRA' has no python block"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(match.group(1), "README.md:adalora", "exec"), ns)
    saved = tmp_path / "my-adalora-adapter"
    if saved.is_dir():  # the example as written in /work/notes/readme-adalora.md
        assert read_config(saved)["rank_pattern"]
        config = ns["model"].peft_config["default"]
        assert sum(sum(v) for v in config.rank_pattern.values()) == config.target_r * len(config.rank_pattern)


def test_target_r_equal_to_init_r_prunes_nothing():
    """peft's kthvalue(k=0) raises here; fastpeft keeps every triplet."""
    model = fastpeft.get_peft_model(tiny_llama(), AdaLoraConfig(init_r=4, target_r=4, total_step=6,
                                                                target_modules=["q_proj"]))
    _randomize(model)
    for step in range(8):
        model(**_batch()).loss.backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern and all(all(v) for v in pattern.values())


def test_bench_suite_quick_tiny(tmp_path):
    """bench/bench_adalora.py end to end on tiny shapes (asserts nothing about timings)."""
    import json
    import sys

    root = str(pathlib.Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    import bench.bench_adalora  # noqa: F401  (registers the suite)
    from bench import common, run

    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.float32, torch.bfloat16], quick=True, warmup=1, repeats=2, min_sample_ms=0.5,
        verbose=False,
        options={"layers": 1, "hidden": 32, "intermediate": 64, "heads": 4, "vocab": 64, "seq": 8, "batch": 1,
                 "init_r": 4, "target_r": 2},
    )
    res = run.run_suite("adalora", ctx, str(tmp_path), plot=False)
    assert not res.errors, res.errors
    rows = json.loads((tmp_path / "adalora-cpu.json").read_text())["tables"][0]["rows"]
    assert {(r["dtype"], r["impl"]) for r in rows} == {(d, i) for d in ("fp32", "bf16")
                                                       for i in ("base", "peft", "fastpeft")}
    assert {r.label for r in res.ratios} == {"adalora fp32: train step fastpeft/peft",
                                             "adalora bf16: train step fastpeft/peft"}
    assert all(r.target is not None and r.target.threshold == 1.2 for r in res.ratios)
    parts = json.loads((tmp_path / "adalora-cpu.json").read_text())["tables"][1]["rows"]
    assert {(r["dtype"], r["part"]) for r in parts} == {(d, p) for d in ("fp32", "bf16")
                                                        for p in ("update_and_allocate", "orth regulariser fwd+bwd")}
    assert all(r["fastpeft ms"] > 0 and r["peft ms"] > 0 and r["speedup"] > 0 for r in parts)


def test_seq_cls_head_and_bias_checkpoint_both_ways(tmp_path):
    kw = dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"], bias="all")
    base = tiny_llama(cls_name="LlamaForSequenceClassification")
    pm, fm = _peft_pair(kw, base, task_type="SEQ_CLS")
    _randomize(pm, fm)
    with torch.no_grad():  # a trained head copy
        for m in (pm, fm):
            torch.manual_seed(3)
            m.base_model.model.score.modules_to_save["default"].weight.normal_()
    b = inputs()
    with torch.no_grad():
        expected = pm.eval()(**b).logits
        close(expected, fm.eval()(**b).logits)
    pm.save_pretrained(tmp_path / "peft")
    fm.save_pretrained(tmp_path / "ours")
    tp, to = read_tensors(tmp_path / "peft"), read_tensors(tmp_path / "ours")
    assert sorted(tp) == sorted(to) and all(torch.equal(tp[k], to[k]) for k in tp)
    assert any(k.endswith("score.weight") for k in to)
    ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        close(expected, ours(**b).logits)
        close(expected, theirs(**b).logits)


# ---- the flat rank allocator and the batched regulariser vs peft, on several layer shapes -----------------------


def _tuner_pair(case):
    """(peft AdaLoraModel, fastpeft AdaLoraModel) with identical random adapters, for `case`:
    gpt2 = Conv1D (fan_in_fan_out) of three shapes; net = Linear and Conv2d; resized = Llama whose layers were
    resized by a rank_pattern to mixed ranks (one layer to 0) before training."""
    kw = dict(init_r=5, target_r=2, tinit=2, tfinal=3, total_step=14, deltaT=1, lora_alpha=8)
    if case == "gpt2":
        kw["target_modules"] = ["c_attn", "c_proj", "c_fc"]
        pm, fm = _peft_pair(kw, tiny_gpt2())
        tp, tf = pm.base_model, fm.base_model
        assert tf.model.transformer.h[0].mlp.c_fc.fan_in_fan_out
    elif case == "net":
        kw["target_modules"] = ["lin", "conv", "head"]
        tp, tf = seeded_pair(peft.tuners.AdaLoraModel, peft.AdaLoraConfig(**kw), AdaLoraModel, AdaLoraConfig(**kw),
                             Net())
        assert isinstance(tf.model.conv, SVDConv2d)
    else:
        kw["target_modules"] = LLAMA_TARGETS
        pm, fm = _peft_pair(kw, tiny_llama())
        tp, tf = pm.base_model, fm.base_model
        pattern = {}
        for i, (name, _) in enumerate((n, m) for n, m in tf.model.named_modules() if isinstance(m, SVDLinear)):
            keep = [True] * 5
            if i % 3 == 1:
                keep[i % 5] = False
            if i % 5 == 4:
                keep[:3] = [False] * 3
            if i == 6:
                keep = [False] * 5
            pattern[f"{name}.lora_E"] = keep
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in (tp, tf):
                torch.manual_seed(0)
                t.resize_modules_by_rank_pattern(pattern, "default")
        ranks = {m.lora_A["default"].shape[0] for m in tf.model.modules() if isinstance(m, SVDLinear)}
        assert {0, 2, 4, 5} <= ranks
    _randomize(tp, tf)
    return tp, tf


@pytest.mark.parametrize("piece", [None, 37], ids=["whole", "pieces"])
@pytest.mark.parametrize("case", ["gpt2", "net", "resized"])
def test_flat_allocator_state_masks_and_rank_pattern_equal_peft(case, piece, monkeypatch):
    """Same weights and gradients every step through warm-up, budget phase, final allocation and final
    fine-tuning: peft's ipt / exp_avg_ipt / exp_avg_unc (to the bit), the masked E, the rank_pattern. Mid-run,
    an entry of the state is replaced (both then use it) and, later, the state is reset (both restart at 0).
    "pieces": the CPU split of the flat ops (below ATen's parallel grain) made tiny, so that it is exercised."""
    from fastpeft.tuners.adalora import model as adalora_model

    if piece is not None:
        monkeypatch.setattr(adalora_model, "_CPU_SERIAL_ELEMS", piece)
    tp, tf = _tuner_pair(case)
    pp, pf = dict(tp.named_parameters()), dict(tf.named_parameters())
    assert list(pp) == list(pf)
    g = torch.Generator().manual_seed(3)
    total = tf.peft_config["default"].total_step
    masked_seen = final_seen = False
    for step in range(total + 3):
        with torch.no_grad():
            for n, p in pp.items():
                if p.requires_grad:
                    grad = torch.randn(p.shape, generator=g)
                    p.grad, pf[n].grad = grad.clone(), grad.clone()
                    p.add_(grad, alpha=-1e-3)
                    pf[n].add_(grad, alpha=-1e-3)
        tp.update_and_allocate(step)
        tf.update_and_allocate(step)
        ap, af = tp.rankallocator, tf.rankallocator
        if step < total - tf.peft_config["default"].tfinal:
            assert af._flat is not None  # the flat path ran (not the per-tensor fallback)
            assert (len(af._flat.pieces) > 1) == (piece is not None)
        assert sorted(ap.exp_avg_ipt) == sorted(af.exp_avg_ipt), step
        for d in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            for n, v in getattr(ap, d).items():
                assert torch.equal(v, getattr(af, d)[n]), (step, d, n)
        for n, p in pp.items():
            assert torch.equal(p, pf[n]), (step, n)
        rp, rf = tp.peft_config["default"].rank_pattern, tf.peft_config["default"].rank_pattern
        assert rp == rf, step
        masked_seen |= rp is not None and not all(all(v) for v in rp.values())
        final_seen |= step > total - tf.peft_config["default"].tfinal
        if step == 4:  # someone edits the state: both continue from the edited value
            name = sorted(af.exp_avg_unc)[1]
            for a in (ap, af):
                a.exp_avg_unc[name] = a.exp_avg_unc[name] * 2
        if step == 7:
            ap.reset_ipt()
            af.reset_ipt()
    assert masked_seen and final_seen
    kept = sum(sum(v) for v in tf.peft_config["default"].rank_pattern.values())
    if case != "resized":  # (peft's budget counts the triplets before the resize)
        assert kept == tf.rankallocator.target_bgt


def _loss_only_regulariser(tuner):
    """Make the wrapped model's forward return only a zero loss: the tuner's forward then returns
    orth_reg_weight * regulariser, peft's and ours alike."""
    import types

    tuner.model.forward = lambda *a, **k: types.SimpleNamespace(loss=torch.zeros(()))


@pytest.mark.parametrize("case", ["gpt2", "net", "resized"])
def test_orth_regulariser_value_and_gradients_equal_peft(case):
    tp, tf = _tuner_pair(case)
    for t in (tp, tf):
        _loss_only_regulariser(t)
    lp, lf = tp().loss, tf().loss
    assert lp.item() > 0
    close(lp, lf, tol=1e-6)
    lp.backward()
    lf.backward()
    pf = dict(tf.named_parameters())
    n_grads = 0
    for n, p in tp.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            assert pf[n].grad is not None and pf[n].grad.shape == p.shape, n
            close(p.grad, pf[n].grad, tol=1e-5)
            n_grads += 1
        elif "lora_E" in n:
            assert p.grad is None and pf[n].grad is None
    assert n_grads > 0
    # two forwards before one backward (the second overwrites the stacked workspace): gradients add up
    for t in (tp, tf):
        t.zero_grad()
    (tp().loss + 3 * tp().loss).backward()
    (tf().loss + 3 * tf().loss).backward()
    for n, p in tp.named_parameters():
        if p.grad is not None:
            close(p.grad, pf[n].grad, tol=1e-5)


def test_orth_regulariser_in_the_llama_loss_and_zero_weight():
    """The regulariser in a real forward with labels (Llama, orth_reg_weight 0.5 and 0) equals peft's."""
    for weight in (0.5, 0.0):
        kw = dict(KW, orth_reg_weight=weight)
        pm, fm = _peft_pair(kw, tiny_llama())
        _randomize(pm, fm)
        b = _batch()
        lp, lf = pm(**b).loss, fm(**b).loss
        close(lp, lf, tol=1e-5)
        lp.backward()
        lf.backward()
        for (n, p), (_, q) in zip(pm.named_parameters(), fm.named_parameters()):
            if p.grad is not None:
                close(p.grad, q.grad, tol=1e-4)


def test_allocator_mixed_dtypes_takes_the_generic_path_equal_peft():
    """Adapters in two dtypes (one layer in float64): the per-tensor path, still peft's values to the bit."""
    tp, tf = _tuner_pair("net")
    for t in (tp, tf):
        t.model.lin.double()
    pp, pf = dict(tp.named_parameters()), dict(tf.named_parameters())
    g = torch.Generator().manual_seed(5)
    for step in range(tf.peft_config["default"].total_step + 2):
        with torch.no_grad():
            for n, p in pp.items():
                if p.requires_grad:
                    grad = torch.randn(p.shape, generator=g).to(p.dtype)
                    p.grad, pf[n].grad = grad.clone(), grad.clone()
                    p.add_(grad, alpha=-1e-3)
                    pf[n].add_(grad, alpha=-1e-3)
        tp.update_and_allocate(step)
        tf.update_and_allocate(step)
        assert tf.rankallocator._flat is None
        for n, p in pp.items():
            assert torch.equal(p, pf[n]), (step, n)
        for n, v in tp.rankallocator.exp_avg_unc.items():
            assert torch.equal(v, tf.rankallocator.exp_avg_unc[n]), (step, n)
        assert tp.peft_config["default"].rank_pattern == tf.peft_config["default"].rank_pattern, step


def test_orth_regulariser_under_autocast_equal_peft():
    """Under CPU bf16 autocast (Gram matrices in bf16, the matrices fp32): peft's value and gradients."""
    tp, tf = _tuner_pair("gpt2")
    for t in (tp, tf):
        _loss_only_regulariser(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, lf = tp().loss, tf().loss
    close(lp.float(), lf.float(), tol=2e-2)
    lp.backward()
    lf.backward()
    pf = dict(tf.named_parameters())
    for n, p in tp.named_parameters():
        if p.grad is not None:
            assert pf[n].grad.dtype == p.grad.dtype == torch.float32
            close(p.grad, pf[n].grad, tol=5e-2)
