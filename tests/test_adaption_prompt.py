"""LLaMA-Adapter (adaption prompts) conformance with peft 0.21.2 (the oracle): config and model-type table, seeded
initialisation, outputs and gradients (Llama with GQA and with attention bias, Mistral, GPT-2; float32 and
bfloat16), checkpoints both ways, several adapters (add / set / delete, saving an inactive one), disable_adapter,
greedy generation with the KV cache, trainable parameters, merge refused, unload, bad input, and the README example.
"""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from _peft_testing import close, inputs, read_config, read_tensors, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.checkpoint import AdapterCheckpointError  # noqa: E402
from fastpeft.tuners.adaption_prompt import (  # noqa: E402
    TRANSFORMERS_MODEL_CONFIG, AdaptedAttention, AdaptionPromptConfig, AdaptionPromptModel,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

README = Path(__file__).resolve().parents[1] / "README.md"
PARAMS = ("adaption_prompt", "adaption_gate")


def tiny_mistral(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.MistralForCausalLM(cfg).eval()


BUILDERS = {
    "llama": tiny_llama,
    "llama_bias": lambda: tiny_llama(attention_bias=True),
    "mistral": tiny_mistral,
    "gpt2": tiny_gpt2,
}


def canonical(key: str, adapter_name: str = "default"):
    """peft's key of an adaption prompt / gate (no adapter name), or None for other keys."""
    for p in PARAMS:
        if key.endswith(f".{p}.{adapter_name}"):
            return key[: -len(adapter_name) - 1]
        if key.endswith(f".{p}"):
            return key
    return None


def adapter_tensors(model, adapter_name="default") -> dict:
    out = {}
    for k, v in model.state_dict().items():
        c = canonical(k, adapter_name)
        if c is not None:
            out[c] = v
    return out


def randomize(model, adapter_name="default", seed=5):
    """Same random prompts and non-zero gates on peft's and our model (drawn in peft's key order)."""
    g = torch.Generator().manual_seed(seed)
    params = {canonical(n, adapter_name): p for n, p in model.named_parameters() if canonical(n, adapter_name)}
    with torch.no_grad():
        for k in sorted(params):
            p = params[k]
            if k.endswith("gate"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def pair(kind="llama", base=None, adapter_name="default", **kw):
    """(peft model, fastpeft model) on copies of one base, built under the same seed; same initial adapters."""
    base = BUILDERS[kind]() if base is None else base
    kw = {"adapter_len": 3, "adapter_layers": 2, "task_type": "CAUSAL_LM", **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(**kw), adapter_name=adapter_name)
        torch.manual_seed(0)
        ours = fastpeft.get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(**kw), adapter_name=adapter_name)
    at, ao = adapter_tensors(theirs), adapter_tensors(ours, adapter_name)
    assert list(at) == list(ao) and at
    for k in at:
        assert at[k].dtype == ao[k].dtype and torch.equal(at[k], ao[k]), f"{k}: init differs from peft's"
    return theirs, ours, base


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def grads(model, batch) -> dict:
    model.zero_grad()
    torch.manual_seed(0)  # same dropout masks (GPT-2 has dropout in train mode)
    model(**batch).logits.float().pow(2).mean().backward()
    return {canonical(n) or n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- config ------------------------------------------------------------------------------------------------------


def test_config_fields_table_and_json_equal_peft(tmp_path):
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG as PEFT_TABLE

    assert set(TRANSFORMERS_MODEL_CONFIG) == set(PEFT_TABLE)
    for k, v in PEFT_TABLE.items():
        ours = TRANSFORMERS_MODEL_CONFIG[k]
        assert (ours.target_modules, ours.k_proj_layer, ours.v_proj_layer, ours.o_proj_layer) == (
            v.target_modules, v.k_proj_layer, v.v_proj_layer, v.o_proj_layer)
    assert fastpeft.AdaptionPromptConfig is AdaptionPromptConfig and fastpeft.AdaptionPromptModel is AdaptionPromptModel
    c = AdaptionPromptConfig(adapter_len=4, adapter_layers=1)
    assert c.is_adaption_prompt and not c.is_prompt_learning and c.peft_type == "ADAPTION_PROMPT"
    theirs, ours, _ = pair()
    theirs.save_pretrained(tmp_path / "p")
    ours.save_pretrained(tmp_path / "o")
    jt, jo = read_config(tmp_path / "p"), read_config(tmp_path / "o")
    jt.pop("peft_version"), jo.pop("peft_version")
    assert jt == jo and jo["target_modules"] == "self_attn"
    loaded = fastpeft.PeftConfig.from_pretrained(str(tmp_path / "p"))
    assert isinstance(loaded, AdaptionPromptConfig) and (loaded.adapter_len, loaded.adapter_layers) == (3, 2)


# ---- outputs, gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_outputs_and_gradients_match_peft(kind):
    theirs, ours, base = pair(kind, adapter_layers=2, adapter_len=3)
    batch = inputs()
    close(logits(base, batch), logits(ours, batch))  # zero-init gate: the base model's outputs
    randomize(theirs), randomize(ours)
    expected = logits(theirs, batch)
    assert (expected - logits(base, batch)).abs().max() > 1e-2  # the adapter matters
    close(expected, logits(ours, batch))
    ours.train(), theirs.train()  # no dropout in the adapter path; attention dropout is 0
    gt, go = grads(theirs, batch), grads(ours, batch)
    assert set(gt) == set(go) and {k.rsplit(".", 1)[-1] for k in go} == set(PARAMS)
    for k in gt:
        close(gt[k], go[k], tol=1e-5)
    targets = [n for n, m in ours.named_modules() if isinstance(m, AdaptedAttention)]
    assert len(targets) == 2 and all(t.endswith(TRANSFORMERS_MODEL_CONFIG[ours.config.model_type].target_modules)
                                     for t in targets)


def test_fallback_paths_match_peft():
    """An o_proj that is not a plain nn.Linear (here with a bias): the adapter output goes through its own o_proj
    call, as in peft; and a user's forward hook on q_proj that replaces its output does not disturb the capture."""

    class MyLinear(nn.Linear):
        pass

    def swap(model):
        for m in model.modules():
            if isinstance(getattr(m, "o_proj", None), nn.Linear) and type(m.o_proj) is nn.Linear:
                new = MyLinear(m.o_proj.in_features, m.o_proj.out_features, bias=True)
                new.load_state_dict({"weight": m.o_proj.weight, "bias": torch.randn(m.o_proj.out_features) * 0.1})
                m.o_proj = new
        return model

    base = swap(tiny_llama())
    theirs, ours, _ = pair(base=base)
    randomize(theirs), randomize(ours)
    batch = inputs()
    close(logits(theirs, batch), logits(ours, batch))
    layer = next(m for m in ours.modules() if isinstance(m, AdaptedAttention))
    layer.get_base_layer().q_proj.register_forward_hook(lambda m, i, o: o.clone())  # harmless extra hook
    close(logits(theirs, batch), logits(ours, batch))


class RefAdapted(nn.Module):
    """Plain-PyTorch reference of the Llama adaption prompt (peft's formula, with the key/value head count taken from
    the config, which peft gets wrong when head_dim * num_heads != hidden_size)."""

    def __init__(self, attn, prompt, gate):
        super().__init__()
        self.attn, self.prompt, self.gate = attn, prompt, gate

    def forward(self, hidden_states, position_embeddings, **kwargs):
        out, weights = self.attn(hidden_states=hidden_states, position_embeddings=position_embeddings, **kwargs)
        a, cfg = self.attn, self.attn.config
        b, t, _ = hidden_states.shape
        hd, nh, nkv = a.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q = a.q_proj(hidden_states).view(b, t, nh, hd).transpose(1, 2)
        cos, sin = (x.unsqueeze(1) for x in position_embeddings)
        q = q * cos + torch.cat((-q[..., hd // 2:], q[..., : hd // 2]), -1) * sin
        k = a.k_proj(self.prompt).view(1, -1, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
        v = a.v_proj(self.prompt).view(1, -1, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
        p = torch.softmax(q @ k.transpose(2, 3) / hd**0.5, dim=-1)
        return out + a.o_proj((self.gate * p @ v).transpose(1, 2).reshape(b, t, nh * hd)), weights


def test_head_dim_not_hidden_over_heads_matches_plain_reference():
    base = tiny_llama(head_dim=16)  # q_proj 32 -> 64: peft's k/v head count (hidden // k_proj.out) is wrong here
    ours = fastpeft.get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    randomize(ours)
    layer = ours.base_model.model.model.layers[1].self_attn
    ref = copy.deepcopy(base)
    ref.model.layers[1].self_attn = RefAdapted(ref.model.layers[1].self_attn, layer.adaption_prompt["default"],
                                               layer.adaption_gate["default"])
    batch = inputs()
    close(logits(ref, batch), logits(ours, batch))
    assert (logits(ref, batch) - logits(base, batch)).abs().max() > 1e-2


def test_projections_run_once_per_adapted_layer():
    """peft runs q_proj and o_proj twice in an adapted layer (once in the attention, once for the prompt);
    here each runs once, and k_proj / v_proj once more, for the prompt, whatever the batch size."""
    _, ours, _ = pair(adapter_layers=1)
    randomize(ours)
    attn = ours.base_model.model.model.layers[1].self_attn.get_base_layer()
    calls = dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), 0)

    def count(name):
        return lambda module, args, output: calls.__setitem__(name, calls[name] + 1)

    for name in calls:
        getattr(attn, name).register_forward_hook(count(name))
    logits(ours, inputs(batch=3))
    assert calls == {"q_proj": 1, "k_proj": 2, "v_proj": 2, "o_proj": 1}


def test_prompt_keys_values_are_reused_without_autograd_until_something_changes():
    theirs, ours, _ = pair(adapter_layers=1)
    randomize(theirs), randomize(ours)
    attn = ours.base_model.model.model.layers[1].self_attn.get_base_layer()
    calls = []
    attn.k_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    batch = inputs()
    logits(ours, inputs(batch=1, seq=5)), logits(ours, batch)
    assert calls == [5, 3, 7]  # the sequence's keys each time, the prompt's (3 tokens) once, then reused
    theirs_attn = theirs.base_model.model.model.layers[1].self_attn
    ours_prompt = ours.base_model.model.model.layers[1].self_attn.adaption_prompt["default"]
    for p_theirs, p_ours in ((theirs_attn.adaption_prompt, ours_prompt), (theirs_attn.model.v_proj.weight,
                                                                          attn.v_proj.weight)):
        with torch.no_grad():  # an in-place change (optimizer step, load) invalidates the reused keys / values
            p_theirs.mul_(1.5), p_ours.mul_(1.5)
        close(logits(theirs, batch), logits(ours, batch))
    ours.train()
    calls.clear()
    ours(**batch).logits.sum().backward()  # with autograd: computed in the forward, never reused
    ours(**batch).logits.sum().backward()
    assert calls == [7, 3, 7, 3]


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours, _ = pair()
    randomize(ours)
    ours.train()
    batch = inputs()
    expected = grads(ours, batch)
    for reentrant in (False, True):
        ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        got = grads(ours, batch)
        assert set(got) == set(expected)
        for k in expected:
            close(expected[k], got[k], tol=1e-6)


def test_bfloat16_base():
    theirs, ours, _ = pair(base=tiny_llama().to(torch.bfloat16))
    assert {v.dtype for v in adapter_tensors(ours).values()} == {torch.bfloat16}  # as peft: the attention's dtype
    randomize(theirs), randomize(ours)
    batch = inputs()
    lt, lo = logits(theirs, batch), logits(ours, batch)
    assert lo.dtype == lt.dtype == torch.bfloat16
    close(lt.float(), lo.float(), tol=3e-2)
    gt, go = grads(theirs, batch), grads(ours, batch)
    assert set(gt) == set(go)
    for k in gt:
        assert go[k].dtype == torch.bfloat16
        close(gt[k].float(), go[k].float(), tol=5e-2)


def test_trainable_parameters_are_prompts_and_gates_only():
    theirs, ours, _ = pair(adapter_layers=1, adapter_len=5)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.model.layers.1.self_attn.adaption_prompt.default",
                         "base_model.model.model.layers.1.self_attn.adaption_gate.default"}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 5 * 32 + 1
    # one training step changes only the adapter
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    batch = inputs()
    ours.train()
    ours(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    changed = {k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])}
    # zero-init: the first step moves only the gates (the prompts' gradient is gate * ... = 0)
    assert changed == {k for k in before if canonical(k) and "adaption_gate" in k}


# ---- checkpoints ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_checkpoints_both_ways(kind, tmp_path):
    theirs, ours, base = pair(kind)
    randomize(theirs), randomize(ours, seed=9)  # different adapters: each direction must carry its own
    batch = inputs()
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    tp, to = read_tensors(tmp_path / "peft"), read_tensors(tmp_path / "ours")
    assert sorted(tp) == sorted(to) and all(tp[k].shape == to[k].shape and tp[k].dtype == to[k].dtype for k in tp)
    assert all(torch.equal(to[k], adapter_tensors(ours)[k]) for k in to)

    # peft -> fastpeft
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    assert isinstance(loaded, fastpeft.PeftModelForCausalLM)
    close(logits(theirs, batch), logits(loaded, batch))
    assert not any(p.requires_grad for p in loaded.parameters())
    # low_cpu_mem_usage path
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"), low_cpu_mem_usage=True)
    close(logits(theirs, batch), logits(loaded, batch))
    trainable = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n in trainable.state_dict() if canonical(n)}

    # fastpeft -> peft
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    close(logits(ours, batch), logits(back, batch))
    assert not torch.allclose(logits(ours, batch), logits(theirs, batch), atol=1e-3)


def test_checkpoint_of_other_shape_is_refused(tmp_path):
    from fastpeft.checkpoint import set_peft_model_state_dict

    theirs, _, base = pair(adapter_layers=1)
    theirs.save_pretrained(tmp_path)
    model = fastpeft.get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=3, adapter_layers=2))
    with pytest.raises(AdapterCheckpointError, match=r"missing key.*layers\.0\.self_attn\.adaption_prompt'"):
        set_peft_model_state_dict(model, read_tensors(tmp_path))
    model = fastpeft.get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=4, adapter_layers=1))
    with pytest.raises(AdapterCheckpointError, match="shape mismatch"):
        set_peft_model_state_dict(model, read_tensors(tmp_path))


# ---- several adapters, disable, delete, unload, merge ------------------------------------------------------------


def test_several_adapters_match_peft(tmp_path):
    theirs, ours, base = pair()
    randomize(theirs), randomize(ours)
    other = {"adapter_len": 2, "adapter_layers": 1, "task_type": "CAUSAL_LM"}
    torch.manual_seed(1)
    theirs.add_adapter("other", peft.AdaptionPromptConfig(**other))
    torch.manual_seed(1)
    ours.add_adapter("other", AdaptionPromptConfig(**other))
    batch = inputs()
    assert ours.active_adapters == ["default"]
    close(logits(theirs, batch), logits(ours, batch))  # adding does not change the active adapter

    theirs.set_adapter("other"), ours.set_adapter("other")
    assert ours.active_adapters == theirs.active_adapters == ["other"]
    assert adapter_tensors(theirs).keys() == adapter_tensors(ours, "other").keys()
    for k, v in adapter_tensors(theirs).items():
        assert torch.equal(v, adapter_tensors(ours, "other")[k]), k  # same seeded init
    randomize(theirs, seed=11), randomize(ours, "other", seed=11)
    close(logits(theirs, batch), logits(ours, batch))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".other") for n in trainable)
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0] == 2 * 32 + 1

    ours.set_adapter("other", inference_mode=True)  # (peft refuses inference_mode here)
    assert not any(p.requires_grad for p in ours.parameters())
    ours.set_adapter("other")
    with pytest.raises(ValueError, match="exactly one active adapter"):
        ours.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="does not exist|not found"):
        ours.set_adapter("nope")

    # saving every adapter (the inactive one too) writes peft's files
    theirs.save_pretrained(tmp_path / "p")
    ours.save_pretrained(tmp_path / "o")
    for sub in ("", "other"):
        tp, to = read_tensors(tmp_path / "p" / sub), read_tensors(tmp_path / "o" / sub)
        assert sorted(tp) == sorted(to) and all(torch.equal(tp[k], to[k]) for k in tp), sub

    # loading a second adapter from peft's directory, then switching to it
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p"))
    loaded.load_adapter(str(tmp_path / "p" / "other"), adapter_name="other")
    assert loaded.active_adapters == ["default"]
    loaded.set_adapter("other")
    close(logits(theirs, batch), logits(loaded, batch))

    # disable_adapter: the base model, then the active adapter again
    with theirs.disable_adapter(), ours.disable_adapter():
        close(logits(base, batch), logits(ours, batch))
        close(logits(theirs, batch), logits(ours, batch))
    close(logits(theirs, batch), logits(ours, batch))

    # delete the active adapter: the first remaining one becomes active (peft's rule)
    theirs.delete_adapter("other"), ours.delete_adapter("other")
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert list(ours.peft_config) == ["default"]
    assert not any(k.endswith(".other") for k in ours.state_dict())
    close(logits(theirs, batch), logits(ours, batch))
    with pytest.raises(ValueError, match="does not exist"):
        ours.base_model.delete_adapter("other")

    # an adapter added inside disable_adapter() stays off until the context ends; deleting the last adapter and
    # adding a new one makes the new one active (peft's rule)
    with ours.disable_adapter():
        ours.add_adapter("late", AdaptionPromptConfig(**other))
        ours.set_adapter("late")
        close(logits(base, batch), logits(ours, batch))
    ours.delete_adapter("default"), ours.delete_adapter("late")
    assert ours.active_adapters == [] and not any(isinstance(m, AdaptedAttention) for m in ours.modules())
    close(logits(base, batch), logits(ours, batch))
    ours.add_adapter("again", AdaptionPromptConfig(**other))
    assert ours.active_adapters == ["again"] and ours.get_nb_trainable_parameters()[0] == 2 * 32 + 1


def test_delete_restores_unadapted_layers_and_unload_restores_original_attention():
    base = tiny_llama()
    originals = [layer.self_attn for layer in base.model.layers]
    model = fastpeft.get_peft_model(base, AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    model.add_adapter("wide", AdaptionPromptConfig(adapter_len=2, adapter_layers=2))
    assert [type(layer.self_attn) for layer in base.model.layers] == [AdaptedAttention] * 2
    model.delete_adapter("wide")
    assert base.model.layers[0].self_attn is originals[0]  # no adapter left in that layer: unwrapped
    assert isinstance(base.model.layers[1].self_attn, AdaptedAttention)
    batch = inputs()
    randomize(model)
    adapted = logits(model, batch)
    unloaded = model.unload()
    assert unloaded is base and [layer.self_attn for layer in base.model.layers] == originals
    assert not any(isinstance(m, AdaptedAttention) for m in unloaded.modules())
    assert not (logits(unloaded, batch) - adapted).abs().max() < 1e-3
    close(logits(tiny_llama(), batch), logits(unloaded, batch))


def test_tuner_without_peft_model_and_wrapper_attributes():
    base = tiny_llama()
    batch = inputs()
    torch.manual_seed(0)
    tuner = AdaptionPromptModel(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=3, adapter_layers=2), "default")
    theirs, _, _ = pair(base=base)
    randomize(tuner), randomize(theirs)
    close(logits(theirs, batch), logits(tuner, batch))
    layer = tuner.model.model.layers[1].self_attn
    assert isinstance(layer, AdaptedAttention) and layer.layer_idx == 1 and layer.head_dim == 8
    assert "adapter_len={'default': 3}" in repr(layer)


def test_merge_is_refused_clearly():
    _, ours, _ = pair()
    for call in (ours.merge_and_unload, ours.merge_adapter, ours.base_model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged"):
            call()
    assert any(isinstance(m, AdaptedAttention) for m in ours.modules())


# ---- generation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generation_with_cache_matches_peft(kind):
    theirs, ours, base = pair(kind, adapter_len=4, adapter_layers=2)
    randomize(theirs, seed=3), randomize(ours, seed=3)
    with torch.no_grad():  # stronger adapter so that it changes the generated tokens
        for m in (theirs, ours):
            for n, p in m.named_parameters():
                if "adaption_gate" in n:
                    p.mul_(4)
    batch = inputs(batch=2, seq=5)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    gt = theirs.generate(**batch, **kw)
    go = ours.generate(**batch, **kw)
    assert torch.equal(gt, go)
    assert torch.equal(go, ours.generate(**batch, use_cache=False, **kw))  # cache-consistent decoding
    with ours.disable_adapter():
        plain = ours.generate(**batch, **kw)
    assert torch.equal(plain, base.generate(**batch, **kw)) and not torch.equal(plain, go)


# ---- bad input -------------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="more adapter layers '5' than the model has '2'"):
        fastpeft.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=2, adapter_layers=5))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match="Unsupported model type for adaption prompt: 'bert'.*llama, mistral"):
        fastpeft.get_peft_model(bert, AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules="self"))
    with pytest.raises(ValueError, match="adapter_len must be set"):
        fastpeft.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_layers=1))
    with pytest.raises(ValueError, match="no module .* named like that"):
        fastpeft.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=2, adapter_layers=1,
                                                                   target_modules="attention"))
    for bad in ({"adapter_len": 0, "adapter_layers": 1}, {"adapter_len": 2, "adapter_layers": -1}):
        with pytest.raises(ValueError, match="positive integer"):
            AdaptionPromptConfig(**bad)
    with pytest.raises(TypeError, match="adapter_len"):
        AdaptionPromptConfig(adapter_len="4", adapter_layers=1)
    with pytest.raises(TypeError, match="Unable to stack"):
        AdaptedAttention(AdaptedAttention(tiny_llama().model.layers[0].self_attn, "llama"), "llama")
    model = fastpeft.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        model.add_adapter("lora", fastpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", AdaptionPromptConfig(adapter_len=2, adapter_layers=1))


# ---- README ----------------------------------------------------------------------------------------------------

SECTION = "## LLaMA-Adapter (adaption prompts)"


def _code_under(heading: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README's section {heading!r} has no python block"
    return match.group(1)


def test_readme_section_runs(tmp_path, monkeypatch):
    if not README.is_file() or SECTION not in README.read_text():
        pytest.skip(f"README.md has no section {SECTION!r} yet")
    monkeypatch.chdir(tmp_path)
    exec(compile(_code_under(SECTION), "README.md:adaption-prompt", "exec"), {})
