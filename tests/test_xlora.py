"""X-LoRA (XLoraConfig / XLoraModel) against peft 0.21's in-memory X-LoRA model on the same weights: outputs,
scalings, classifier gradients, top-k masking, the scalings API, checkpoints (ours load into peft and round-trip
in ours), and that the experts are mixed by one multi_lora_mix op per layer."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from _peft_testing import inputs, randomize_adapter, tiny_llama

import fastpeft
from fastpeft import ops

peft = pytest.importorskip("peft")

# three experts of different ranks and targets (so layers hold different subsets of experts)
EXPERTS = [(["q_proj", "v_proj"], 4), (["q_proj", "v_proj", "o_proj"], 6), (["v_proj", "down_proj"], 8)]


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Three LoRA adapters saved by peft: {"0": dir, "1": dir, "2": dir} (peft needs names "0", "1", ...)."""
    root = tmp_path_factory.mktemp("experts")
    paths = {}
    for i, (targets, r) in enumerate(EXPERTS):
        model = peft.get_peft_model(tiny_llama(use_cache=False), peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets))
        randomize_adapter(model, seed=10 + i)
        model.save_pretrained(str(root / str(i)))
        paths[str(i)] = str(root / str(i))
    return paths


def _config(lib, paths, **kw):
    base = dict(hidden_size=32, adapters=dict(paths), task_type="CAUSAL_LM", xlora_depth=1)
    base.update(kw)
    return lib.XLoraConfig(**base)


def _classifier_sd(model):
    return {k: v for k, v in model.state_dict().items() if "internal_xlora_classifier" in k}


def build_pair(paths, lora_dropout_seed=3, **kw):
    """(peft model, fastpeft model) with the same base, experts and (random) classifier weights."""
    pp = peft.get_peft_model(tiny_llama(use_cache=False), _config(peft, paths, **kw))
    ours = fastpeft.get_peft_model(tiny_llama(use_cache=False), _config(fastpeft, paths, **kw))
    g = torch.Generator().manual_seed(lora_dropout_seed)
    with torch.no_grad():
        for v in _classifier_sd(pp).values():
            v.copy_(torch.randn(v.shape, generator=g) * 0.5)
    missing, unexpected = ours.load_state_dict(_classifier_sd(pp), strict=False)
    assert not unexpected
    return pp, ours


def fwd(model, batch):
    with torch.no_grad():
        return model(**batch).logits


CONFIGS = [
    {},
    {"layerwise_scalings": True},
    {"xlora_depth": 3, "xlora_size": 16, "layerwise_scalings": True},
    {"enable_softmax": False, "global_scaling_weight": 0.7},
    {"softmax_temperature": 0.3, "layerwise_scalings": True},
    {"top_k_lora": 1},
    {"top_k_lora": 2, "layerwise_scalings": True},
    {"top_k_lora": 2, "enable_softmax": False, "enable_softmax_topk": True, "layerwise_scalings": True},
    {"scaling_pass_value": 0.5, "layerwise_scalings": True},
    {"scaling_pass_value": 0.5, "top_k_lora": 1},
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kw", CONFIGS, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CONFIGS])
def test_outputs_match_peft(experts, kw):
    pp, ours = build_pair(experts, **kw)
    batch = inputs()
    lp, lo = fwd(pp, batch), fwd(ours, batch)
    torch.testing.assert_close(lo, lp, atol=2e-5, rtol=1e-5)
    sp, so = pp.base_model.get_latest_scalings(), ours.base_model.get_latest_scalings()
    assert so.shape == sp.shape == (2, 7, 8, 3)
    torch.testing.assert_close(so, sp)
    # the experts matter: without X-LoRA the outputs differ
    with ours.disable_adapter():
        base = fwd(ours, batch)
    torch.testing.assert_close(base, fwd(tiny_llama(use_cache=False), batch))
    assert (base - lo).abs().max() > 1e-3


def test_batch_of_one_and_inputs_embeds(experts):
    pp, ours = build_pair(experts, layerwise_scalings=True)
    ids = inputs()["input_ids"][1:]
    torch.testing.assert_close(fwd(ours, {"input_ids": ids}), fwd(pp, {"input_ids": ids}), atol=2e-5, rtol=1e-5)
    emb = ours.get_base_model().get_input_embeddings()(ids)
    torch.testing.assert_close(fwd(ours, {"inputs_embeds": emb}), fwd(pp, {"input_ids": ids}), atol=2e-5, rtol=1e-5)


def test_classifier_gradients_match_peft(experts):
    # classifier dropout off, so both runs are deterministic; the experts are frozen (X-LoRA's default)
    pp, ours = build_pair(experts, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0, layerwise_scalings=True)
    batch = dict(inputs(), labels=inputs()["input_ids"])
    grads = []
    for model in (pp, ours):
        model.train()
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and all("internal_xlora_classifier" in k for k in grads[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trainable_experts_gradients_match_peft(experts):
    pp, ours = build_pair(experts, use_trainable_adapters=True)
    batch = dict(inputs(), labels=inputs()["input_ids"])
    grads = []
    for model in (pp, ours):
        model.train()
        out = model(**batch)
        out.loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and any(".lora_A." in k for k in grads[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-4)


def _dropout_experts(tmp_path, ps):
    paths = {}
    for i, p in enumerate(ps):
        m = peft.get_peft_model(tiny_llama(use_cache=False),
                                peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["q_proj", "v_proj"]))
        randomize_adapter(m, seed=30 + i)
        m.save_pretrained(str(tmp_path / str(i)))
        paths[str(i)] = str(tmp_path / str(i))
    return paths


def _count_mix_calls(monkeypatch):
    calls = []
    orig = ops.multi_lora_mix

    def counting(*a, **k):
        calls.append(a[5] if len(a) > 5 else k.get("dropout_p", 0.0))
        return orig(*a, **k)

    monkeypatch.setattr(ops, "multi_lora_mix", counting)
    return calls


def test_dropout_training_uses_the_op_with_per_expert_masks(tmp_path, monkeypatch):
    # experts with lora_dropout 0.3 in training: the op draws one seeded mask per expert (not nn.Dropout's draws)
    pp, ours = build_pair(_dropout_experts(tmp_path, [0.3, 0.3]))
    batch = dict(inputs(), labels=inputs()["input_ids"])
    calls = _count_mix_calls(monkeypatch)
    eval_logits = fwd(ours, batch)
    assert calls == [0.0] * 4
    ours.train()
    torch.manual_seed(7)
    out = ours(**batch)
    assert calls[4:] == [0.3] * 4  # one op per LoRA layer, dropout inside
    assert (out.logits.detach() - eval_logits).abs().max() > 1e-4
    out.loss.backward()
    assert all(p.grad is not None for p in ours.base_model.internal_xlora_classifier.parameters())
    torch.manual_seed(7)  # the masks come from torch's generator: reproducible
    torch.testing.assert_close(ours(**batch).logits, out.logits)
    # eval: no dropout, equal to peft
    pp.eval(), ours.eval()
    torch.testing.assert_close(fwd(ours, batch), fwd(pp, batch), atol=2e-5, rtol=1e-5)


def test_dropout_training_falls_back_to_peft_loop(tmp_path, monkeypatch):
    # experts with different dropout probabilities: peft's per-expert loop (nn.Dropout, as peft); with a
    # non-zero scaling pass both libraries draw the same masks in the same order, so outputs are equal
    pp, ours = build_pair(_dropout_experts(tmp_path, [0.3, 0.2]), scaling_pass_value=0.5)
    batch = inputs()
    pp.train(), ours.train()
    torch.manual_seed(5)
    lp = pp(**batch).logits
    calls = _count_mix_calls(monkeypatch)
    torch.manual_seed(5)
    lo = ours(**batch).logits
    assert not calls  # the loop, not the fused op
    torch.testing.assert_close(lo, lp, atol=2e-5, rtol=1e-5)


def test_one_mix_op_per_layer_and_fused_equals_loop(experts, monkeypatch):
    _, ours = build_pair(experts, layerwise_scalings=True, top_k_lora=2)
    batch = inputs()
    calls = []
    orig = ops.multi_lora_mix

    def counting(x, A, B, s, *args):
        calls.append(A.shape[0])
        return orig(x, A, B, s, *args)

    monkeypatch.setattr(ops, "multi_lora_mix", counting)
    fused = fwd(ours, batch)
    # 8 LoRA layers, one op each, in the real pass only (the scaling pass at value 0 adds exactly nothing)
    assert len(calls) == 8 and sorted(set(calls)) == [1, 2, 3]
    from fastpeft.tuners.xlora.layer import XLoraLinearLayer

    monkeypatch.setattr(XLoraLinearLayer, "_dropout_p", lambda self, names: None)  # -> peft's loop
    torch.testing.assert_close(fwd(ours, batch), fused, atol=2e-6, rtol=1e-5)


def test_topk_masking():
    from fastpeft.tuners.xlora.layer import XLoraLayer

    cfg = fastpeft.XLoraConfig(hidden_size=8, adapters={"a": "x"}, top_k_lora=2)
    layer = XLoraLayer(model=None, target=None, target_forward=None, layer_number=1, config=cfg)
    s = torch.rand(2, 5, 3, 6)
    got = layer.get_maybe_topk_scalings(s)
    xs = s[:, :, 1, :]
    assert got.shape == (2, 5, 6)
    assert torch.equal((got != 0).sum(-1), torch.full((2, 5), 2))
    top = xs.topk(2, dim=-1).indices
    assert torch.equal(got.gather(-1, top), xs.gather(-1, top))  # the two largest kept unchanged
    cfg.enable_softmax_topk = True
    got = layer.get_maybe_topk_scalings(s)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(got.gather(-1, top), torch.softmax(xs.gather(-1, top), -1))
    cfg.top_k_lora, cfg.enable_softmax_topk = None, False
    assert torch.equal(layer.get_maybe_topk_scalings(s), xs)


def test_topk_one_equals_single_expert(experts):
    # top-1 with softmax-top-k: every token uses exactly one expert at weight 1
    _, ours = build_pair(experts, top_k_lora=1, enable_softmax=False, enable_softmax_topk=True)
    batch = inputs()
    logs = []
    fwd(ours, batch)
    from fastpeft.tuners.xlora.layer import XLoraLinearLayer

    for module in ours.modules():
        fn = getattr(module, "forward", None)
        layer = getattr(fn, "__self__", None)
        if isinstance(layer, XLoraLinearLayer):
            logs.append(layer.get_maybe_topk_scalings(ours.base_model.get_latest_scalings()))
    assert logs
    for s in logs:
        assert torch.equal((s != 0).sum(-1), torch.ones(2, 7, dtype=torch.long))
        torch.testing.assert_close(s.sum(-1), torch.ones(2, 7))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_scalings_api(experts):
    pp, ours = build_pair(experts)
    xm = ours.base_model
    batch = inputs()
    assert xm.get_latest_scalings() is None
    xm.enable_scalings_logging()
    fwd(ours, batch)
    fwd(ours, {"input_ids": batch["input_ids"][:, :4]})
    log = xm.get_scalings_log()
    assert len(log) == 2 and log[0].shape == (2, 7, 8, 3) and log[1].shape == (2, 4, 8, 3)
    log.clear()
    assert len(xm.get_scalings_log()) == 2  # a copy
    buckets = xm.get_bucketed_scalings_log()
    assert sorted(buckets) == [4, 7] and buckets[7][0] == [0] and buckets[4][0] == [1]
    xm.disable_scalings_logging()
    fwd(ours, batch)
    assert len(xm.get_scalings_log()) == 2
    xm.clear_scalings_log()
    assert xm.get_scalings_log() == []
    torch.testing.assert_close(xm.get_latest_scalings(), fwd(pp, batch) is not None and pp.base_model.get_latest_scalings())
    # setters, mirrored on peft's model
    for model in (pp.base_model, xm):
        model.set_topk_lora(2)
        model.set_global_scaling_weight(1.5)
        model.set_scaling_pass_value(None)
    assert xm.xlora_config.top_k_lora == 2 and xm.get_global_scaling_weight() == 1.5
    assert xm.internal_xlora_classifier.override_scaling_pass_value == pytest.approx(1 / 3)
    assert xm.xlora_config.scaling_pass_value == pytest.approx(1 / 3)
    torch.testing.assert_close(fwd(ours, batch), fwd(pp, batch), atol=2e-5, rtol=1e-5)


def test_disable_adapter_and_direct_call(experts):
    pp, ours = build_pair(experts)
    batch = inputs()
    with ours.disable_adapter():
        torch.testing.assert_close(fwd(ours, batch), fwd(tiny_llama(use_cache=False), batch))
    # called without PeftModel's hooks, every expert adds with weight 1 (peft's behaviour without scalings)
    with torch.no_grad():
        torch.testing.assert_close(ours.base_model(**batch).logits, pp.base_model(**batch).logits, atol=2e-5, rtol=1e-5)


def test_other_expert_names(experts, tmp_path):
    # peft 0.21 raises a KeyError for expert names other than "0", "1", ...; fastpeft takes any names
    _, ours = build_pair(experts, layerwise_scalings=True)
    named = {"math": experts["0"], "code": experts["1"], "chat": experts["2"]}
    other = fastpeft.get_peft_model(tiny_llama(use_cache=False), _config(fastpeft, named, layerwise_scalings=True))
    other.load_state_dict(_classifier_sd(ours), strict=False)
    want = fwd(ours, inputs())
    torch.testing.assert_close(fwd(other, inputs()), want)
    assert any(".lora_A.math." in k for k in other.state_dict())
    # the experts' order (= the classifier's output order) survives the round trip (not sorted by name)
    other.save_pretrained(str(tmp_path / "x"))
    back = fastpeft.PeftModel.from_pretrained(tiny_llama(use_cache=False), str(tmp_path / "x"))
    assert list(back.base_model.xlora_config.adapters) == ["math", "code", "chat"]
    torch.testing.assert_close(fwd(back, inputs()), want)


def test_use_cache_and_bad_expert(experts, tmp_path):
    with pytest.raises(ValueError, match="use_cache"):
        fastpeft.get_peft_model(tiny_llama(), _config(fastpeft, experts))
    ia3 = fastpeft.get_peft_model(tiny_llama(use_cache=False), fastpeft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        fastpeft.get_peft_model(tiny_llama(use_cache=False), _config(fastpeft, {"0": str(tmp_path / "ia3")}))


def test_generate_matches_peft(experts):
    pp, ours = build_pair(experts, layerwise_scalings=True)
    ids = inputs()["input_ids"][:1]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        gp = pp.generate(input_ids=ids, **kw)
        go = ours.generate(input_ids=ids, **kw)
    assert torch.equal(go, gp)


# ---- checkpoints --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_checkpoint_keys_load_into_peft_and_round_trip(experts, tmp_path):
    from safetensors.torch import load_file

    pp, ours = build_pair(experts, xlora_depth=2, xlora_size=16, layerwise_scalings=True, top_k_lora=2)
    batch = inputs()
    want = fwd(ours, batch)
    out = tmp_path / "xlora"
    ours.save_pretrained(str(out))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(tensors) == [f"base_model.internal_xlora_classifier.layers.{i}.{p}" for i in (0, 3) for p in ("bias", "weight")]
    for k, v in _classifier_sd(ours).items():
        assert torch.equal(tensors[k], v)
    cfg = fastpeft.PeftConfig.from_pretrained(str(out))
    assert type(cfg).__name__ == "XLoraConfig" and cfg.adapters == experts and cfg.top_k_lora == 2
    assert sorted(p for p in os.listdir(out) if (out / p).is_dir()) == ["0", "1", "2"]  # the experts, as peft

    # into peft (its own loader; peft keeps the saved expert paths)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(use_cache=False), str(out))
    torch.testing.assert_close(fwd(theirs, batch), want, atol=2e-5, rtol=1e-5)
    # round trip in ours
    back = fastpeft.PeftModel.from_pretrained(tiny_llama(use_cache=False), str(out))
    assert isinstance(back, fastpeft.PeftModelForCausalLM)
    torch.testing.assert_close(fwd(back, batch), want)
    # the expert directories are gone: the copies saved next to the checkpoint are used
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    gone = {k: str(tmp_path / "nowhere" / k) for k in experts}
    import json

    with open(moved / "adapter_config.json") as f:
        data = json.load(f)
    data["adapters"] = gone
    with open(moved / "adapter_config.json", "w") as f:
        json.dump(data, f)
    torch.testing.assert_close(fwd(fastpeft.PeftModel.from_pretrained(tiny_llama(use_cache=False), str(moved)), batch), want)
    # or passed explicitly
    again = fastpeft.PeftModel.from_pretrained(tiny_llama(use_cache=False), str(moved), adapters=experts)
    torch.testing.assert_close(fwd(again, batch), want)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_checkpoint_missing_classifier_layers_is_a_clear_error(experts, tmp_path):
    # peft 0.21's save_pretrained drops classifier layer "layers.0" when an expert is named "0"
    pp, _ = build_pair(experts)
    pp.save_pretrained(str(tmp_path / "p"))
    from safetensors.torch import load_file

    assert not any("layers.0" in k for k in load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    with pytest.raises(ValueError, match="drops the classifier layers"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(use_cache=False), str(tmp_path / "p"), adapters=experts)


def test_bf16_matches_peft(experts):
    # experts are upcast to float32 (autocast_adapter_dtype, as peft) next to a bf16 base
    pp = peft.get_peft_model(tiny_llama(use_cache=False).bfloat16(), _config(peft, experts, layerwise_scalings=True))
    ours = fastpeft.get_peft_model(tiny_llama(use_cache=False).bfloat16(), _config(fastpeft, experts, layerwise_scalings=True))
    ours.load_state_dict(_classifier_sd(pp), strict=False)
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    batch = inputs()
    lp, lo = fwd(pp, batch), fwd(ours, batch)
    assert lo.dtype == torch.bfloat16
    torch.testing.assert_close(lo.float(), lp.float(), atol=3e-2, rtol=3e-2)


def test_training_the_classifier_reduces_the_loss(experts):
    _, ours = build_pair(experts, xlora_depth=2, xlora_size=16, layerwise_scalings=True, top_k_lora=2)
    ours.train()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for q in ours.base_model.internal_xlora_classifier.parameters()) for p in trainable)
    opt = torch.optim.Adam(trainable, lr=1e-2)
    batch = dict(inputs(), labels=inputs()["input_ids"])
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = ours(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_plain_peft_model_without_task_type(experts):
    cfg = dict(hidden_size=32, adapters=dict(experts), layerwise_scalings=True)
    pp = peft.PeftModel(tiny_llama(use_cache=False), peft.XLoraConfig(**cfg))
    ours = fastpeft.PeftModel(tiny_llama(use_cache=False), fastpeft.XLoraConfig(**cfg))
    ours.load_state_dict(_classifier_sd(pp), strict=False)
    batch = inputs()
    with torch.no_grad():
        want = pp(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, want, atol=2e-5, rtol=1e-5)
        # positional arguments (the whole model runs in the scaling pass then)
        torch.testing.assert_close(ours(batch["input_ids"], batch["attention_mask"]).logits, want, atol=2e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_embedding_experts_match_peft(tmp_path):
    # LoRA on embed_tokens: the layer runs peft's per-expert math (counted in the layer numbering as peft does)
    paths = {}
    for i, targets in enumerate([["embed_tokens", "q_proj"], ["embed_tokens", "v_proj"]]):
        m = peft.get_peft_model(tiny_llama(use_cache=False), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        randomize_adapter(m, seed=40 + i)
        m.save_pretrained(str(tmp_path / str(i)))
        paths[str(i)] = str(tmp_path / str(i))
    pp, ours = build_pair(paths, layerwise_scalings=True, top_k_lora=1)
    batch = inputs()
    torch.testing.assert_close(fwd(ours, batch), fwd(pp, batch), atol=2e-5, rtol=1e-5)
    assert ours.base_model.get_latest_scalings().shape == (2, 7, 5, 2)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lora_bias_experts_match_peft(tmp_path):
    # a LoRA bias is added unweighted by the scalings (also in the scaling pass): the per-expert loop
    paths = {}
    for i in range(2):
        m = peft.get_peft_model(tiny_llama(use_cache=False),
                                peft.LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"]))
        randomize_adapter(m, seed=50 + i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n and n.endswith("bias"):
                    p.normal_(0, 0.3)
        m.save_pretrained(str(tmp_path / str(i)))
        paths[str(i)] = str(tmp_path / str(i))
    pp, ours = build_pair(paths, global_scaling_weight=0.6)
    batch = inputs()
    torch.testing.assert_close(fwd(ours, batch), fwd(pp, batch), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours.base_model.get_latest_scalings(), pp.base_model.get_latest_scalings())
