"""Trainable Tokens (standalone `TrainableTokensConfig` and `LoraConfig(trainable_token_indices=...)`), with peft as
the oracle on tiny transformers Llamas (tied and untied embeddings) built from configs."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from _peft_testing import VOCAB, inputs, logits, peft, randomize_adapter, tiny_llama

import fastpeft
from safetensors.torch import load_file

TOKENS = [3, 5, 7]
TIES = [pytest.param(False, id="untied"), pytest.param(True, id="tied")]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def batch():
    b = inputs()
    b["input_ids"][0, 3] = 5  # make sure trained tokens occur (twice for 7)
    b["input_ids"][1, 1] = 7
    b["input_ids"][1, 4] = 7
    return b


def randomize_tokens(model, seed: int = 5):
    """Random trained rows (and LoRA weights) so that the adapter changes the outputs."""
    randomize_adapter(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def pair(tie: bool, cfg_kwargs: dict, lora: bool = False, randomize: bool = True):
    """(peft model, fastpeft model) of the same base weights and config; adapters randomised identically."""
    pcls = peft.LoraConfig if lora else peft.TrainableTokensConfig
    fcls = fastpeft.LoraConfig if lora else fastpeft.TrainableTokensConfig
    pm = peft.get_peft_model(tiny_llama(tie_word_embeddings=tie), pcls(**cfg_kwargs))
    fm = fastpeft.get_peft_model(tiny_llama(tie_word_embeddings=tie), fcls(**cfg_kwargs))
    if randomize:
        randomize_tokens(pm)
        randomize_tokens(fm)
    return pm, fm


def close(a, b, atol=2e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def saved_keys(model, tmp_path, name):
    d = tmp_path / name
    model.save_pretrained(str(d))
    return d, load_file(os.path.join(d, "adapter_model.safetensors"))


LORA_SPECS = [
    pytest.param(TOKENS, id="list"),
    pytest.param({"embed_tokens": TOKENS}, id="dict"),
    pytest.param({"embed_tokens": [3, 5], "lm_head": [3, 5]}, id="dict-same-ids"),
    pytest.param({"embed_tokens": [3, 5], "lm_head": [4, 6]}, id="dict-other-ids"),
]


# ---- standalone: outputs, gradients, checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("init_weights", [True, False])
def test_outputs_match_peft(tie, init_weights):
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(tie_word_embeddings=tie),
                             peft.TrainableTokensConfig(token_indices=TOKENS, init_weights=init_weights))
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama(tie_word_embeddings=tie),
                                 fastpeft.TrainableTokensConfig(token_indices=TOKENS, init_weights=init_weights))
    b = batch()
    close(logits(fm, b), logits(pm, b))
    if init_weights:  # a no-op until trained
        close(logits(fm, b), logits(tiny_llama(tie_word_embeddings=tie), b))
    randomize_tokens(pm), randomize_tokens(fm)
    close(logits(fm, b), logits(pm, b))
    assert (logits(fm, b) - logits(tiny_llama(tie_word_embeddings=tie), b)).abs().max() > 1e-2
    pn = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    assert sorted(n for n, p in fm.named_parameters() if p.requires_grad) == pn
    assert type(fm.base_model.model.lm_head).__name__ == ("TrainableTokensLayer" if tie else "Linear")


@pytest.mark.parametrize("tie", TIES)
def test_gradients_match_peft(tie):
    pm, fm = pair(tie, {"token_indices": TOKENS})
    b = batch()
    for m in (pm, fm):
        m.train()
        out = m(**b, labels=b["input_ids"])
        out.loss.backward()
    pg = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    fg = {n: p.grad for n, p in fm.named_parameters() if p.requires_grad}
    assert pg.keys() == fg.keys() and len(fg) == 1
    for n in pg:
        assert fg[n].shape == (len(TOKENS), 32)
        close(fg[n], pg[n])


@pytest.mark.parametrize("tie", TIES)
def test_no_dense_vocab_sized_tensors_in_backward(tie):
    """Nothing vocab x dim is built for the backward pass except the frozen base weight itself (peft builds a full
    copy of the weight in forward and a dense vocab x dim gradient in backward)."""
    _, fm = pair(tie, {"token_indices": TOKENS})
    weight = fm.get_input_embeddings().get_base_layer().weight
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    b = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fm(**b, labels=b["input_ids"]).loss
    loss.backward()
    dense = [s for s, ptr in saved if s == (VOCAB, 32) and ptr != weight.untyped_storage().data_ptr()]
    assert not dense
    assert weight.grad is None and not weight.requires_grad


@pytest.mark.parametrize("tie", TIES)
def test_training_changes_only_selected_rows(tie):
    base_weight = tiny_llama(tie_word_embeddings=tie).model.embed_tokens.weight.detach().clone()
    fm = fastpeft.get_peft_model(tiny_llama(tie_word_embeddings=tie),
                                 fastpeft.TrainableTokensConfig(token_indices=TOKENS))
    opt = torch.optim.AdamW([p for p in fm.parameters() if p.requires_grad], lr=0.05)
    fm.train()
    b = batch()
    for _ in range(3):
        loss = fm(**b, labels=b["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    merged = fm.merge_and_unload()
    w = merged.model.embed_tokens.weight.detach()
    changed = sorted(torch.nonzero((w - base_weight).abs().amax(dim=1) > 0).flatten().tolist())
    assert changed == TOKENS
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tie


@pytest.mark.parametrize("tie", TIES)
def test_checkpoints_load_both_ways(tie, tmp_path):
    pm, fm = pair(tie, {"token_indices": TOKENS})
    b = batch()
    pdir, psd = saved_keys(pm, tmp_path, "peft")
    fdir, fsd = saved_keys(fm, tmp_path, "fast")
    assert sorted(fsd) == sorted(psd)
    expected = {"base_model.model.model.embed_tokens.trainable_tokens_delta"}
    if tie:
        expected.add("base_model.model.lm_head.trainable_tokens_delta")
    assert set(fsd) == expected
    # fastpeft -> peft
    p2 = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tie), str(fdir))
    close(logits(p2, b), logits(fm, b))
    # peft -> fastpeft
    f2 = fastpeft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tie), str(pdir))
    close(logits(f2, b), logits(pm, b))
    assert not any(p.requires_grad for p in f2.parameters())  # loaded for inference


@pytest.mark.parametrize("tie", TIES)
def test_merge_unmerge_unload_disable(tie):
    _, fm = pair(tie, {"token_indices": TOKENS})
    b = batch()
    base = logits(tiny_llama(tie_word_embeddings=tie), b)
    adapted = logits(fm, b)
    with fm.disable_adapter():
        close(logits(fm, b), base)
    close(logits(fm, b), adapted)
    fm.base_model.merge_adapter()
    close(logits(fm, b), adapted)
    with fm.disable_adapter():  # a merged adapter is unmerged when disabled (as peft)
        close(logits(fm, b), base)
    fm.base_model.merge_adapter()
    fm.base_model.unmerge_adapter()
    close(logits(fm, b), adapted)
    merged = fm.merge_and_unload()
    assert type(merged.model.embed_tokens) is torch.nn.Embedding
    close(logits(merged, b), adapted)

    _, fm = pair(tie, {"token_indices": TOKENS})
    unloaded = fm.unload()
    assert type(unloaded.model.embed_tokens) is torch.nn.Embedding
    close(logits(unloaded, b), base)


def test_several_adapters_match_peft():
    pm, fm = pair(False, {"token_indices": TOKENS})
    for m, lib in ((pm, peft), (fm, fastpeft)):
        m.add_adapter("other", lib.TrainableTokensConfig(token_indices=[4, 9]))
    randomize_tokens(pm, seed=9), randomize_tokens(fm, seed=9)
    b = batch()
    b["input_ids"][0, 5] = 9
    close(logits(fm, b), logits(pm, b))  # "default" active
    for m in (pm, fm):
        m.set_adapter("other")
    close(logits(fm, b), logits(pm, b))
    assert [n for n, p in fm.named_parameters() if p.requires_grad] == [
        "base_model.model.model.embed_tokens.trainable_tokens_delta.other"]
    # both at once (disjoint ids) on the tuner
    for m in (pm, fm):
        m.base_model.set_adapter(["default", "other"])
    close(logits(fm, b), logits(pm, b))


@pytest.mark.parametrize("tie", TIES)
def test_several_adapters(tie, tmp_path):
    """(peft 0.21.2 fails to add a second adapter to a tied model: its forward raises; fastpeft's own checks.)"""
    _, fm = pair(tie, {"token_indices": TOKENS})
    fm.add_adapter("other", fastpeft.TrainableTokensConfig(token_indices=[4, 9]))
    randomize_tokens(fm, seed=9)
    b = batch()
    b["input_ids"][0, 5] = 9
    single = {}
    for name, ids in (("default", TOKENS), ("other", [4, 9])):
        one = fastpeft.get_peft_model(tiny_llama(tie_word_embeddings=tie),
                                      fastpeft.TrainableTokensConfig(token_indices=ids))
        with torch.no_grad():
            one.get_input_embeddings().trainable_tokens_delta["default"].copy_(
                fm.get_input_embeddings().trainable_tokens_delta[name])
        single[name] = logits(one, b)
    close(logits(fm, b), single["default"])
    fm.set_adapter("other")
    close(logits(fm, b), single["other"])
    assert [n for n, p in fm.named_parameters() if p.requires_grad] == [
        "base_model.model.model.embed_tokens.trainable_tokens_delta.other"]
    # overlapping ids cannot be active together
    fm.add_adapter("overlap", fastpeft.TrainableTokensConfig(token_indices=[5]))
    fm.base_model.set_adapter(["default", "overlap"])
    with pytest.raises(ValueError, match="disjunct"):
        fm(**b)
    fm.base_model.set_adapter("default")
    fm.delete_adapter("overlap")
    # a named adapter saves / loads under its name
    fm.save_pretrained(str(tmp_path), selected_adapters=["other"])
    p2 = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tie), str(tmp_path / "other"))
    fm.set_adapter("other")
    close(logits(p2, b), logits(fm, b))


# ---- LoRA + trainable tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("spec", LORA_SPECS)
def test_lora_with_trainable_tokens_matches_peft(tie, spec, tmp_path):
    kwargs = {"target_modules": ["q_proj", "v_proj"], "trainable_token_indices": spec}
    pm, fm = pair(tie, kwargs, lora=True)
    b = batch()
    b["input_ids"][0, 5] = 4
    close(logits(fm, b), logits(pm, b))
    assert sorted(n for n, p in fm.named_parameters() if p.requires_grad) == sorted(
        n for n, p in pm.named_parameters() if p.requires_grad)
    pdir, psd = saved_keys(pm, tmp_path, "peft")
    fdir, fsd = saved_keys(fm, tmp_path, "fast")
    assert sorted(fsd) == sorted(psd)
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in fsd
    p2 = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tie), str(fdir))
    close(logits(p2, b), logits(fm, b))
    f2 = fastpeft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tie), str(pdir))
    close(logits(f2, b), logits(pm, b))
    # gradients of the trained rows
    for m in (pm, fm):
        m.train()
        m(**b, labels=b["input_ids"]).loss.backward()
    pg = {n: p.grad for n, p in pm.named_parameters() if "trainable_tokens" in n and p.requires_grad}
    fg = {n: p.grad for n, p in fm.named_parameters() if "trainable_tokens" in n and p.requires_grad}
    assert pg.keys() == fg.keys() and fg
    for n in pg:
        close(fg[n], pg[n])
    # merge_and_unload keeps the outputs (when tied layers train the same rows: tied weights hold one set of rows)
    if not (tie and isinstance(spec, dict) and spec.get("lm_head", spec["embed_tokens"]) != spec["embed_tokens"]):
        ref = logits(fm, b)
        merged = fm.merge_and_unload()
        assert type(merged.model.embed_tokens) is torch.nn.Embedding
        assert type(merged.lm_head) is torch.nn.Linear
        close(logits(merged, b), ref)


@pytest.mark.parametrize("tie", TIES)
def test_lora_trainable_tokens_adapters_and_disable(tie):
    kwargs = {"target_modules": ["q_proj"], "trainable_token_indices": TOKENS}
    pm, fm = pair(tie, kwargs, lora=True)
    b = batch()
    for m, lib in ((pm, peft), (fm, fastpeft)):
        m.add_adapter("second", lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[4, 6]))
        m.add_adapter("plain", lib.LoraConfig(target_modules=["v_proj"]))
    randomize_tokens(pm, seed=11), randomize_tokens(fm, seed=11)
    b["input_ids"][0, 5] = 4
    base = logits(tiny_llama(tie_word_embeddings=tie), b)
    for name in ("default", "second", "plain", "default"):
        pm.set_adapter(name), fm.set_adapter(name)
        close(logits(fm, b), logits(pm, b))
    with fm.disable_adapter():
        close(logits(fm, b), base)
    close(logits(fm, b), logits(pm, b))
    fm.delete_adapter("second"), pm.delete_adapter("second")
    close(logits(fm, b), logits(pm, b))
    unloaded = fm.unload()
    assert type(unloaded.model.embed_tokens) is torch.nn.Embedding
    close(logits(unloaded, b), base)


# ---- bad input ------------------------------------------------------------------------------------------------


def test_errors_name_what_to_change():
    with pytest.raises(ValueError, match=r"token_indices.*out of range.*96 rows"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.TrainableTokensConfig(token_indices=[3, VOCAB]))
    with pytest.raises(ValueError, match="token_indices must be token ids >= 0"):
        fastpeft.TrainableTokensConfig(token_indices=[-1])
    with pytest.raises(TypeError, match="TrainableTokensConfig.token_indices must be list"):
        fastpeft.TrainableTokensConfig(token_indices=3)
    with pytest.raises(ValueError, match="empty"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.TrainableTokensConfig(token_indices=[]))
    with pytest.raises(TypeError, match=r"target_modules matched 'model.norm', a LlamaRMSNorm.*embed_tokens"):
        fastpeft.get_peft_model(tiny_llama(),
                                fastpeft.TrainableTokensConfig(token_indices=[3], target_modules=["norm"]))
    with pytest.raises(ValueError, match=r"trainable_token_indices.*out of range.*model.embed_tokens"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                                  trainable_token_indices=[1000]))
    with pytest.raises(TypeError, match=r"trainable_token_indices targets 'model.norm', a LlamaRMSNorm.*embed_tokens"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                                  trainable_token_indices={"model.norm": [1]}))
    with pytest.raises(ValueError, match=r"'nothere' not found.*model.embed_tokens"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                                  trainable_token_indices={"nothere": [1]}))
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                                  modules_to_save=["embed_tokens"],
                                                                  trainable_token_indices={"embed_tokens": [1]}))
    with pytest.raises(TypeError, match="already adapted"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(target_modules=["q_proj", "embed_tokens"],
                                                                  trainable_token_indices=[1]))


def test_config_round_trip_and_registry(tmp_path):
    cfg = fastpeft.TrainableTokensConfig(token_indices=[1, 2], target_modules=["embed_tokens"], init_weights=False)
    cfg.save_pretrained(str(tmp_path))
    pcfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert type(pcfg).__name__ == "TrainableTokensConfig" and pcfg.token_indices == [1, 2] and not pcfg.init_weights
    back = fastpeft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(back, fastpeft.TrainableTokensConfig) and back.token_indices == [1, 2]
    assert fastpeft.PEFT_TYPE_TO_TUNER_MAPPING["TRAINABLE_TOKENS"] is fastpeft.TrainableTokensModel


# ---- embedding variants on a small custom model (no transformers config: no tying) -----------------------------


class _ScaledEmbedding(torch.nn.Embedding):
    """Gemma-style: the embedding multiplies its output by `embed_scale`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(2.5), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.embed_scale


class _Net(torch.nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb
        self.head = torch.nn.Linear(8, 20)

    def forward(self, x):
        return self.head(self.emb(x))


def _net(kind: str):
    torch.manual_seed(0)
    if kind == "scaled":
        emb = _ScaledEmbedding(20, 8)
    elif kind == "freq":
        emb = torch.nn.Embedding(20, 8, scale_grad_by_freq=True)
    else:
        emb = torch.nn.Embedding(20, 8, padding_idx=0)
    return _Net(emb)


@pytest.mark.parametrize("kind", ["padding", "scaled", "freq"])
def test_embedding_variants_match_peft(kind):
    ids = [0, 4, 9] if kind == "padding" else [4, 9]
    x = torch.tensor([[0, 4, 9, 4, 3], [9, 9, 1, 0, 4]])
    models = []
    for lib in (peft, fastpeft):
        m = lib.get_peft_model(_net(kind), lib.TrainableTokensConfig(token_indices=ids, target_modules=["emb"]))
        with torch.no_grad():
            m.base_model.model.emb.trainable_tokens_delta["default"].copy_(
                torch.randn(len(ids), 8, generator=torch.Generator().manual_seed(3)))
        out = m(x)
        (out.square().sum() + out[0, 1].sum()).backward()
        models.append((out.detach(), m.base_model.model.emb.trainable_tokens_delta["default"].grad))
    (p_out, p_grad), (f_out, f_grad) = models
    close(f_out, p_out)
    close(f_grad, p_grad)
    if kind == "padding":
        assert f_grad[0].abs().sum() == 0  # the padding token's row gets no gradient (F.embedding's padding_idx)


def test_targeting_a_linear_keeps_its_bias():
    """A Linear targeted directly (rows = output features). peft 0.21.2 drops the layer's bias there (its outputs
    change even before training); fastpeft keeps it, so the adapter starts as a no-op."""
    net = _net("padding")
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        ref = net(x)
    m = fastpeft.get_peft_model(net, fastpeft.TrainableTokensConfig(token_indices=[2, 5], target_modules=["head"]))
    close(m(x), ref)
    with torch.no_grad():
        m.base_model.model.head.trainable_tokens_delta["default"].add_(1.0)
    out = m(x)
    changed = torch.nonzero((out - ref).abs().amax(dim=(0, 1)) > 1e-6).flatten().tolist()
    assert changed == [2, 5]
    merged = m.merge_and_unload()
    close(merged(x), out)
