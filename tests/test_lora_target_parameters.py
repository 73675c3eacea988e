"""LoRA on nn.Parameters (`LoraConfig(target_parameters=[...])`, peft's lora.ParamWrapper), peft as the oracle:
tiny transformers MoE models (experts as 3-D parameters, the router as a 2-D one) built from configs offline."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from _peft_testing import VOCAB, close, inputs, make_configs, peft, randomize_adapter, read_tensors, transformers

import fastpeft
from fastpeft.tuners.lora.param_wrapper import ParamWrapper

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_mixtral(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    return transformers.MixtralForCausalLM(cfg).eval()


def tiny_qwen3_moe(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=4, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, decoder_sparse_step=1, mlp_only_layers=[],
    )
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe}
CASES = {
    "experts": dict(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS),
    "experts+router+attention": dict(
        r=2, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS + ["mlp.gate.weight"], use_rslora=True
    ),
    "down_proj only, rank_pattern": dict(
        r=2, target_modules=[], target_parameters=["experts.down_proj"], rank_pattern={"layers.1.mlp.experts": 3}
    ),
}


def pair(model="mixtral", **kw):
    """(peft model, fastpeft model) on copies of one base, with the same (random) adapter weights."""
    base = MODELS[model]()
    pcfg, fcfg = make_configs(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
        pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    randomize_adapter(fm, scale=0.3)
    peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm))
    return pm, fm, base


def loss_and_grads(model, batch, embeds):
    model.zero_grad()
    embeds = embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    loss = (out.logits ** 2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads, embeds.grad


# ---- structure, outputs, gradients ----


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
def test_keys_init_outputs_and_gradients_match_peft(model, case):
    kw = CASES[case]
    base = MODELS[model]()
    pcfg, fcfg = make_configs(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
        torch.manual_seed(5)
        fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    sp, sf = pm.state_dict(), fm.state_dict()
    assert list(sp) == list(sf)  # same nesting, same keys, same order
    for k in sp:  # same shapes and, drawn from the same RNG, the same initial values
        assert sp[k].shape == sf[k].shape and torch.equal(sp[k], sf[k]), k
    assert fm.base_model.targeted_parameter_names == pm.base_model.targeted_parameter_names

    randomize_adapter(fm, scale=0.3)
    peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm))
    batch = inputs()
    embeds = base.get_input_embeddings()(batch["input_ids"]).detach()
    lp, gp, ep = loss_and_grads(pm, batch, embeds)
    lf, gf, ef = loss_and_grads(fm, batch, embeds)
    with torch.no_grad():
        plain = base(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    assert (lf - plain).abs().max() > 1e-3  # the adapters matter
    close(lp, lf, 1e-5)
    close(ep, ef, 1e-5)  # the gradient reaches the input
    assert sorted(gp) == sorted(gf) and all("lora_" in n for n in gf)
    for n in gp:  # ... and every A and B
        assert gf[n].abs().max() > 0, n
        close(gp[n], gf[n], 1e-5)


def test_only_the_named_parameters_are_wrapped_and_the_router_is_2d():
    _, fm, _ = pair(r=2, target_modules=[], target_parameters=EXPERTS + ["mlp.gate.weight"])
    wrappers = {n: m for n, m in fm.named_modules() if isinstance(m, ParamWrapper)}
    assert sorted(wrappers) == sorted(
        f"base_model.model.model.layers.{i}.mlp.{s}" for i in range(2)
        for s in ("experts", "experts.base_layer", "gate")
    )
    experts = fm.base_model.model.model.layers[0].mlp.experts
    assert (experts.parameter_name, experts.base_layer.parameter_name) == ("down_proj", "gate_up_proj")
    assert experts.base_layer.lora_A["default"].weight.shape == (2 * 4, 16)  # [r * E, H]
    assert experts.base_layer.lora_B["default"].weight.shape == (48, 2 * 4)  # [2I, r * E]
    gate = fm.base_model.model.model.layers[0].mlp.gate
    assert gate.num_experts == 1 and gate.lora_A["default"].weight.shape == (2, 16)
    assert "parameter_name='down_proj'" in repr(experts)


class TransposedExperts(nn.Module):
    """Experts stored [E, in, out] and flagged `is_transposed` (gpt-oss' layout), plus a plain 2-D parameter."""

    is_transposed = True

    def __init__(self, experts=3, hidden=6, inter=5):
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, hidden, inter) * 0.3)
        self.down = nn.Parameter(torch.randn(experts, inter, hidden) * 0.3)
        self.mix = nn.Parameter(torch.randn(hidden, hidden) * 0.3)

    def forward(self, x):  # x [E, T, hidden]
        h = torch.relu(torch.bmm(x, self.up))
        return torch.bmm(h, self.down) @ self.mix.T


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TransposedExperts()

    def forward(self, x):
        return self.block(x)


def test_transposed_experts_and_2d_parameter_match_peft():
    torch.manual_seed(0)
    base = Net()
    kw = dict(r=2, lora_alpha=3, target_parameters=["block.up", "down", "block.mix"])
    pcfg, fcfg = make_configs(kw)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    randomize_adapter(fm, scale=0.3)
    peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm))
    x = torch.randn(3, 4, 6)
    xp, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yp, yf = pm(xp), fm(xf)
    close(yp, yf)
    yp.square().sum().backward()
    yf.square().sum().backward()
    close(xp.grad, xf.grad)
    gp = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for n, p in fm.named_parameters():
        if p.requires_grad:
            close(gp[n], p.grad)
    # the delta in the parameter's own layout, as peft computes it
    for (np_, mp), (nf, mf) in zip(pm.named_modules(), fm.named_modules()):
        if type(mf).__name__ == "ParamWrapper":
            close(mp.get_delta_weight("default").detach(), mf.get_delta_weight("default").detach())


def test_bfloat16_model_matches_peft_exactly():
    """float32 adapter weights on a bfloat16 model: the factors are cast to the parameter's dtype (peft's rule)."""
    pm, fm, _ = pair(**CASES["experts"])
    pm, fm = pm.to(torch.bfloat16), fm.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(pm(**inputs()).logits, fm(**inputs()).logits)


class Doubled(nn.Module):
    def forward(self, W):
        return 2 * W


def test_parameter_under_a_user_parametrization_matches_peft():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    torch.nn.utils.parametrize.register_parametrization(base[0], "weight", Doubled())
    pcfg, fcfg = make_configs(dict(r=2, target_parameters=["0.weight"]))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    randomize_adapter(fm)
    peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm))
    x = torch.randn(3, 4)
    close(pm(x), fm(x))
    assert (fm(x) - base(x)).abs().max() > 1e-3
    assert list(fm.base_model.model[0].base_layer.parametrizations.weight) == [fm.base_model.model[0].base_layer.parametrizations.weight[0]]
    with pytest.raises(NotImplementedError, match="parametrized"):
        fm.base_model.merge_adapter()


# ---- checkpoints ----


@pytest.mark.parametrize("model", list(MODELS))
def test_peft_checkpoint_loads_in_fastpeft_and_back(model, tmp_path):
    pm, fm, base = pair(model, **CASES["experts+router+attention"])
    batch = inputs()
    with torch.no_grad():
        expected = pm(**batch).logits
    pm.save_pretrained(tmp_path / "peft")
    fm.save_pretrained(tmp_path / "ours")
    theirs, ours = read_tensors(tmp_path / "peft"), read_tensors(tmp_path / "ours")
    assert sorted(theirs) == sorted(ours)
    assert any(".experts.base_layer.lora_A.weight" in k for k in ours)
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k

    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    with torch.no_grad():
        close(expected, loaded(**batch).logits)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    with torch.no_grad():
        close(expected, back(**batch).logits)


# ---- merging, disabling, unloading ----


def test_merge_unmerge_merge_and_unload_unload_disable():
    pm, fm, base = pair(**CASES["experts+router+attention"])
    batch = inputs()
    with torch.no_grad():
        plain = base(**batch).logits
        adapted = fm(**batch).logits
        with fm.disable_adapter():
            close(plain, fm(**batch).logits)
        fm.base_model.merge_adapter()
        assert all(m.merged for m in fm.modules() if isinstance(m, ParamWrapper))
        close(adapted, fm(**batch).logits, 1e-4)
        with fm.disable_adapter():  # a merged layer unmerges when disabled (peft)
            close(plain, fm(**batch).logits, 1e-4)
        assert not any(m.merged for m in fm.modules() if isinstance(m, ParamWrapper))
        close(adapted, fm(**batch).logits, 1e-4)
        fm.base_model.merge_adapter()
        fm.base_model.unmerge_adapter()
        close(adapted, fm(**batch).logits, 1e-4)
        unloaded = copy.deepcopy(fm).unload()
        assert not any("lora_" in k or "base_layer" in k for k in unloaded.state_dict())
        close(plain, unloaded(**batch).logits, 1e-4)
        merged = fm.merge_and_unload()
        assert list(merged.state_dict()) == list(base.state_dict())
        close(adapted, merged(**batch).logits, 1e-4)
        pmerged = pm.merge_and_unload()
        for k, v in pmerged.state_dict().items():
            close(v, merged.state_dict()[k], 1e-5)


def test_safe_merge_refuses_a_broken_adapter():
    _, fm, _ = pair(r=2, target_modules=[], target_parameters=EXPERTS)
    experts = fm.base_model.model.model.layers[0].mlp.experts
    before = experts.get_param().detach().clone()
    with torch.no_grad():
        experts.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        experts.merge(safe_merge=True)
    assert torch.equal(before, experts.get_param()) and not experts.merged


# ---- training ----


def test_training_changes_only_adapter_weights():
    _, fm, base = pair(**CASES["experts"])
    fm.train()
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    trainable = [n for n, p in fm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.SGD([p for p in fm.parameters() if p.requires_grad], lr=0.1)
    batch = inputs()
    for _ in range(3):
        loss = fm(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = fm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed == {k for k in before if ".lora_A." in k or ".lora_B." in k}
    # the parameter is a plain nn.Parameter again after each forward
    experts = fm.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    assert isinstance(experts.gate_up_proj, nn.Parameter) and "gate_up_proj" not in experts.__dict__


def test_gradient_checkpointing_trains():
    _, fm, _ = pair(**CASES["experts"])
    fm.train()
    fm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = inputs()
    fm(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [p.grad for n, p in fm.named_parameters() if p.requires_grad]
    assert all(g is not None and g.abs().max() > 0 for g in grads)


def test_delta_is_built_once_per_forward_of_the_experts(monkeypatch):
    """W + dW is built once per forward of the wrapped module, whatever the number of experts hit."""
    _, fm, _ = pair(**CASES["experts"])
    calls = []
    original = ParamWrapper._adapted
    monkeypatch.setattr(ParamWrapper, "_adapted", lambda self, W, a: calls.append(self.parameter_name) or original(self, W, a))
    with torch.no_grad():
        fm(**inputs())
    # 2 layers x 2 parameters
    assert sorted(calls) == ["down_proj"] * 2 + ["gate_up_proj"] * 2


# ---- several adapters ----


def test_two_adapters_match_peft(tmp_path):
    kw = CASES["experts"]
    pm, fm, base = pair(**kw)
    pcfg, fcfg = make_configs(dict(kw, r=3, lora_alpha=5))
    fm.add_adapter("other", fcfg)
    pm.add_adapter("other", pcfg)
    experts = fm.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts.base_layer, ParamWrapper) and not isinstance(experts.base_layer.base_layer, ParamWrapper)
    assert sorted(experts.lora_A) == ["default", "other"]
    assert not any(p.requires_grad for n, p in fm.named_parameters() if ".other." in n)  # not trainable until set
    randomize_adapter(fm, seed=7, scale=0.3)
    peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm, adapter_name="other"), "other")
    peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm))
    assert list(pm.state_dict()) == list(fm.state_dict())
    batch = inputs()
    with torch.no_grad():
        for active in ("other", "default"):
            pm.set_adapter(active)
            fm.set_adapter(active)
            close(pm(**batch).logits, fm(**batch).logits)
        pm.base_model.set_adapter(["default", "other"])
        fm.base_model.set_adapter(["default", "other"])
        both = fm(**batch).logits
        close(pm(**batch).logits, both)
        fm.base_model.merge_adapter()
        close(both, fm(**batch).logits, 1e-4)
        fm.base_model.unmerge_adapter()
    fm.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "other"), adapter_name="other")
    fm.set_adapter("other")
    with torch.no_grad():
        close(fm(**batch).logits, loaded(**batch).logits)
    fm.delete_adapter("other")
    assert not any(".other." in k for k in fm.state_dict())


def test_adapters_must_target_the_same_parameters():
    _, fm, _ = pair(**CASES["experts"])
    with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
        fm.add_adapter("other", fastpeft.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS[:1]))


# ---- bad input ----


class IntParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = nn.Module()
        self.sub.table = nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)
        self.sub.vector = nn.Parameter(torch.ones(4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) @ self.sub.table.float() * self.sub.vector


@pytest.mark.parametrize(
    "kw, error, message",
    [
        (dict(target_parameters=["nothere"]), fastpeft.NoMatchingPeftModuleError, "nothere.*matched no parameter"),
        (dict(target_parameters=["sub.table"]), ValueError, "dtype torch.int64.*floating-point.*target_parameters"),
        (dict(target_parameters=["sub.vector"]), ValueError, "1 dimensional Parameter, but only 2d and 3d"),
        (dict(target_parameters=["lin.weight"], target_modules=["lin"]), ValueError, "target_modules=\\[\\]"),
        (dict(target_parameters=["lin.weight"], lora_dropout=0.1), ValueError, "lora_dropout != 0"),
        (dict(target_parameters=["lin.weight"], use_dora=True), ValueError, "use_dora=True"),
        (dict(target_parameters=["lin.weight"], lora_bias=True), ValueError, "lora_bias=True"),
    ],
)
def test_bad_input_gives_peft_error_class(kw, error, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message):
            fastpeft.get_peft_model(IntParam(), fastpeft.LoraConfig(r=2, **kw))
        if kw.get("target_parameters") != ["sub.table"]:  # peft fails only later there, in forward
            with pytest.raises(ValueError):  # (peft's own NoMatchingPeftModuleError is a ValueError too)
                peft.get_peft_model(IntParam(), peft.LoraConfig(r=2, **kw))


def test_default_target_modules_come_with_parameters_and_unmatched_parameters_warn():
    """target_modules=None on a known model type: its default modules are targeted too (peft); a name that matches
    no parameter then only warns."""
    base = tiny_mixtral()
    with pytest.warns(RuntimeWarning, match="no parameter was matched"):
        fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_parameters=["nothere"]))
    assert not any(isinstance(m, ParamWrapper) for m in fm.modules())
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_parameters=EXPERTS))
    names = {n.rsplit(".", 1)[-1] for n, m in fm.named_modules() if isinstance(m, fastpeft.tuners.lora.LoraLayer)}
    assert {"q_proj", "v_proj", "experts"} <= names


def test_mixed_adapter_batches_are_refused():
    pm, fm, _ = pair(**CASES["experts"])
    for model in (pm, fm):
        model.eval()
        with pytest.raises(ValueError, match="ParamWrapper does not support mixed adapter batches"):
            model(**inputs(), adapter_names=["default", "default"])
