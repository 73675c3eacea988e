"""Mixed-adapter batches (`adapter_names=[...]`, one adapter per row, "__base__" for none) against peft."""
from __future__ import annotations

import copy

import pytest
import torch

from _peft_testing import inputs, logits, make_configs, peft, randomize_adapter, tiny_llama

import fastpeft

KW_A = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"], task_type="CAUSAL_LM")
KW_B = dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")  # other rank/layers
KW_C = dict(r=2, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "v_proj"], task_type="CAUSAL_LM")
ADAPTERS = {"alpha": KW_A, "beta": KW_B, "gamma": KW_C}


def _pair(dtype=torch.float32, names=("alpha", "beta", "gamma")):
    base = tiny_llama().to(dtype)
    first = names[0]
    fm = fastpeft.get_peft_model(copy.deepcopy(base), make_configs(ADAPTERS[first])[1], adapter_name=first)
    for n in names[1:]:
        fm.add_adapter(n, make_configs(ADAPTERS[n])[1])
    randomize_adapter(fm, seed=5)
    fm = fm.to(dtype)
    pm = peft.get_peft_model(copy.deepcopy(base), make_configs(ADAPTERS[first])[0], adapter_name=first)
    for n in names[1:]:
        pm.add_adapter(n, make_configs(ADAPTERS[n])[0])
    for n in names:
        peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm, adapter_name=n), n)
    pm = pm.to(dtype)
    return fm.eval(), pm.eval()


ROWS = ["alpha", "__base__", "beta", "gamma", "alpha", "beta"]


def test_forward_matches_peft_with_base_rows_and_mixed_ranks():
    fm, pm = _pair()
    batch = inputs(batch=len(ROWS), seq=5)
    got = logits(fm, dict(batch, adapter_names=ROWS))
    want = logits(pm, dict(batch, adapter_names=ROWS))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # each row equals a single-adapter forward of that row (and the base model for "__base__")
    for i, name in enumerate(ROWS):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        if name == "__base__":
            with fm.disable_adapter():
                one = logits(fm, row)
        else:
            fm.set_adapter(name)
            one = logits(fm, row)
        torch.testing.assert_close(got[i:i + 1], one, atol=1e-4, rtol=1e-4)
    fm.set_adapter("alpha")


def test_all_rows_one_adapter_equals_plain_forward():
    fm, _ = _pair()
    batch = inputs(batch=3, seq=4)
    fm.set_adapter("beta")
    torch.testing.assert_close(logits(fm, dict(batch, adapter_names=["beta"] * 3)), logits(fm, batch),
                               atol=1e-5, rtol=1e-5)
    fm.set_adapter("alpha")


def test_bf16_matches_peft():
    fm, pm = _pair(torch.bfloat16)
    batch = inputs(batch=len(ROWS), seq=5)
    got = logits(fm, dict(batch, adapter_names=ROWS)).float()
    want = logits(pm, dict(batch, adapter_names=ROWS)).float()
    ref32 = logits(_pair()[1], dict(batch, adapter_names=ROWS))
    # both bf16 runs are within bf16 noise of the fp32 result, and of each other
    err_ours, err_peft = (got - ref32).abs().max(), (want - ref32).abs().max()
    assert err_ours <= 2 * err_peft + 0.05, (err_ours, err_peft)
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_adapter_names_matches_peft(num_beams):
    fm, pm = _pair()
    batch = inputs(batch=4, seq=5)
    names = ["alpha", "__base__", "gamma", "beta"]
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        got = fm.generate(**batch, adapter_names=names, **kw)
        want = pm.generate(**batch, adapter_names=names, **kw)
    assert torch.equal(got, want)
    # hooks are gone afterwards: a plain forward is unchanged
    torch.testing.assert_close(logits(fm, batch), logits(pm, batch), atol=1e-4, rtol=1e-4)


def test_errors_like_peft():
    fm, _ = _pair()
    batch = inputs(batch=2, seq=4)
    with pytest.raises(ValueError, match="non-existing adapter\\(s\\): nope"):
        fm(**batch, adapter_names=["alpha", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        fm(**batch, adapter_names=["alpha", "beta", "gamma"])
    with pytest.raises(TypeError, match="expected a list of str"):
        fm(**batch, adapter_names="alpha")
    fm.train()
    with pytest.raises(ValueError, match="training mode"):
        fm(**batch, adapter_names=["alpha", "beta"])
    fm.eval()
    fm.merge_adapter(["alpha"])
    with pytest.raises(ValueError, match="merged adapters"):
        fm(**batch, adapter_names=["alpha", "beta"])
    fm.unmerge_adapter()
    # nothing left behind by the failed calls
    assert logits(fm, dict(batch, adapter_names=["alpha", "beta"])).shape[0] == 2


def test_dora_is_refused_like_peft():
    base = tiny_llama()
    fm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).eval()
    with pytest.raises(ValueError, match="DoRA"):
        fm(**inputs(batch=2, seq=3), adapter_names=["default", "__base__"])


def test_embedding_and_linear_targets_match_peft():
    base = tiny_llama()
    kws = {"emb": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
           "lin": dict(r=2, lora_alpha=2, target_modules=["v_proj", "embed_tokens"])}
    fm = fastpeft.get_peft_model(copy.deepcopy(base), make_configs(kws["emb"])[1], adapter_name="emb")
    fm.add_adapter("lin", make_configs(kws["lin"])[1])
    randomize_adapter(fm, seed=9)
    pm = peft.get_peft_model(copy.deepcopy(base), make_configs(kws["emb"])[0], adapter_name="emb")
    pm.add_adapter("lin", make_configs(kws["lin"])[0])
    for n in kws:
        peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm, adapter_name=n), n)
    batch = inputs(batch=4, seq=5)
    names = ["lin", "emb", "__base__", "emb"]
    torch.testing.assert_close(logits(fm.eval(), dict(batch, adapter_names=names)),
                               logits(pm.eval(), dict(batch, adapter_names=names)), atol=1e-4, rtol=1e-4)


def test_conv_target_is_a_clear_error():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 3)

        def forward(self, x):
            return self.conv(x)

    fm = fastpeft.get_peft_model(Net(), fastpeft.LoraConfig(r=2, target_modules=["conv"])).eval()
    with pytest.raises(NotImplementedError, match="LoRA Linear and Embedding layers only"):
        fm(torch.randn(2, 4, 8), adapter_names=["default", "__base__"])


def test_layer_accepts_adapter_names_directly():
    lin = torch.nn.Linear(12, 7)
    layer = fastpeft.nn.LoraLinear.from_linear(lin, r=3, init_lora_weights=False).eval()
    x = torch.randn(3, 4, 12)
    y = layer(x, adapter_names=["default", "__base__", "default"])
    torch.testing.assert_close(y[1], lin(x[1]))
    torch.testing.assert_close(y[0], layer(x[:1])[0], atol=1e-5, rtol=1e-5)


def test_weight_updates_and_scaling_changes_are_seen():
    """The layers cache the op's argument lists (and B^T); in-place updates, reassigned weights and new
    scalings must show up in the next mixed forward."""
    fm, _ = _pair()
    batch = inputs(batch=3, seq=4)
    names = ["alpha", "beta", "__base__"]

    def fresh():
        out = []
        for i, name in enumerate(names[:2]):
            fm.set_adapter(name)
            out.append(logits(fm, {k: v[i:i + 1] for k, v in batch.items()}))
        fm.set_adapter("alpha")
        return torch.cat(out)

    logits(fm, dict(batch, adapter_names=names))  # fill the caches
    with torch.no_grad():
        for name, p in fm.named_parameters():
            if "lora_B.beta" in name:
                p.mul_(3.0)  # in place
            if "lora_A.alpha" in name:
                p.data = p.data * 0.5  # new storage
    for module in fm.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "beta" in module.scaling:
            module.scaling["beta"] *= 2.0
    got = logits(fm, dict(batch, adapter_names=names))
    torch.testing.assert_close(got[:2], fresh(), atol=1e-4, rtol=1e-4)
