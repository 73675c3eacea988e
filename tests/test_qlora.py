"""QLoRA: LoRA / DoRA on fastpeft's LinearNF4, against peft + bitsandbytes (the oracle) on this CPU.

The two sides hold the same NF4 bytes (a LinearNF4 state dict loaded into bitsandbytes' Linear4bit) and the
same adapter weights. bitsandbytes' Linear4bit is kept in training mode throughout: its CPU eval path repacks
the weight for a kernel this machine lacks; its training path is dequantise + linear, the same math.
"""
from __future__ import annotations

import copy
import json
import logging
import warnings

import pytest
import torch
from torch import nn

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.quant.nf4 import LinearNF4  # noqa: E402
from fastpeft.tuners.lora.nf4 import Linear4bit, RequantizationReport  # noqa: E402

from _peft_testing import VOCAB, inputs, randomize_adapter, tiny_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---- the two models -------------------------------------------------------------------------------


class Net(nn.Module):
    is_loaded_in_4bit = True  # peft dispatches bitsandbytes layers only on models that say so

    def __init__(self):
        super().__init__()
        # in_features multiples of the blocksize: bitsandbytes' CPU dequantiser is wrong otherwise
        self.lin1 = nn.Linear(64, 64)
        self.lin2 = nn.Linear(64, 40, bias=False)
        self.head = nn.Linear(40, 5)

    def forward(self, x):
        return self.head(torch.nn.functional.gelu(self.lin2(torch.nn.functional.gelu(self.lin1(x)))))


def bnb_from_state_dict(sd, in_f, out_f, bias, compute_dtype=None):
    m = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    m.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"].clone(), stats, device="cpu", module=m)
    if bias:
        m.bias = nn.Parameter(sd["bias"].clone())
    return m


def bnb_train_mode(model):
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.train()
    return model


def make_pair(dtype=torch.float32, compute_dtype=None, seed=0):
    """(fastpeft-quantised Net, bitsandbytes Net) with the same NF4 bytes; head left unquantised."""
    torch.manual_seed(seed)
    net = Net().to(dtype)
    ours = fastpeft.quantize_model(copy.deepcopy(net), compute_dtype=compute_dtype, skip_modules=("head",),
                                   progress=False)
    theirs = copy.deepcopy(net)
    for name in ("lin1", "lin2"):
        layer = ours.get_submodule(name)
        setattr(theirs, name, bnb_from_state_dict(layer.state_dict(), layer.in_features, layer.out_features,
                                                  layer.bias is not None, compute_dtype))
    return ours, theirs


def peft_pair(lora_kwargs, dtype=torch.float32, compute_dtype=None, seed=0, adapters=("default",), scale=0.2):
    ours, theirs = make_pair(dtype, compute_dtype, seed)
    pm = pf = None
    for i, name in enumerate(adapters):
        kw = dict(target_modules=["lin1", "lin2"], **lora_kwargs)
        if pm is None:
            pm = peft.get_peft_model(theirs, peft.LoraConfig(**kw), adapter_name=name)
            pf = fastpeft.get_peft_model(ours, fastpeft.LoraConfig(**kw), adapter_name=name)
        else:
            pm.add_adapter(name, peft.LoraConfig(**kw))
            pf.add_adapter(name, fastpeft.LoraConfig(**kw))
    randomize_adapter(pm, seed=11, scale=scale)
    # the same adapter weights on both sides (DoRA magnitudes were initialised from different A, B draws)
    lora_sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert set(lora_sd) <= set(pf.state_dict())
    pf.load_state_dict(lora_sd, strict=False)
    if len(adapters) > 1:
        pm.base_model.set_adapter(list(adapters))
        pf.base_model.set_adapter(list(adapters))
    return pf, bnb_train_mode(pm)


def run(model, x, w, train):
    model.train(train)
    bnb_train_mode(model)
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y.float() * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def assert_same(pf, pm, dtype, train, seed=None, loose=False):
    torch.manual_seed(3)
    x = torch.randn(4, 5, 64).to(dtype)
    w = torch.randn(4, 5, 5)
    if seed is not None:
        torch.manual_seed(seed)
    yf, gxf, gf = run(pf, x, w, train)
    if seed is not None:
        torch.manual_seed(seed)
    ym, gxm, gm = run(pm, x, w, train)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 and not loose else dict(rtol=3e-2, atol=3e-2)
    assert yf.dtype == ym.dtype == dtype
    torch.testing.assert_close(yf.float(), ym.float(), **tol)
    torch.testing.assert_close(gxf.float(), gxm.float(), **tol)
    assert set(gf) == set(gm) and gf, (set(gf) ^ set(gm))
    for k in gm:
        assert "lora_" in k, k  # only adapters get gradients
        torch.testing.assert_close(gf[k].float(), gm[k].float(), **tol, msg=k)


# ---- layer: outputs and gradients as peft + bitsandbytes ------------------------------------------


@pytest.mark.parametrize(
    "dtype,compute_dtype,kwargs",
    [
        (torch.float32, None, {}),
        (torch.float32, torch.float32, {"use_rslora": True}),
        (torch.float32, None, {"use_dora": True}),
        (torch.bfloat16, None, {}),
        (torch.float32, torch.bfloat16, {"use_dora": True}),
        (torch.bfloat16, torch.bfloat16, {"lora_bias": True}),
    ],
)
def test_forward_and_grads_match_peft_bnb(dtype, compute_dtype, kwargs):
    pf, pm = peft_pair(dict(r=4, lora_alpha=8, init_lora_weights=False, **kwargs), dtype, compute_dtype)
    layer = pf.base_model.model.lin1
    assert isinstance(layer, Linear4bit) and isinstance(layer.base_layer, LinearNF4)
    assert not layer.base_layer.weight.requires_grad and layer.base_layer.weight.dtype == torch.uint8
    assert set(pf.state_dict()) == set(pm.state_dict())
    assert pf.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    for train in (False, True):
        assert_same(pf, pm, dtype, train, loose=compute_dtype == torch.bfloat16)


def test_dora_magnitude_is_initialised_from_the_dequantised_weight():
    ours, theirs = make_pair()
    kw = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["lin1", "lin2"])  # B = 0: m = ||dequant(W)||
    pf = fastpeft.get_peft_model(ours, fastpeft.LoraConfig(**kw))
    pm = peft.get_peft_model(theirs, peft.LoraConfig(**kw))
    for name in ("lin1", "lin2"):
        mf = pf.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        mp = pm.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        assert mf.dtype == mp.dtype == torch.float32
        torch.testing.assert_close(mf, mp, rtol=1e-6, atol=1e-6)


class SeededDropout(nn.Module):
    """fastpeft's seeded dropout as an nn.Module: drawn like the fused QLoRA op draws its mask."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        return fastpeft.ops.seeded_dropout(x, self.p, fastpeft.ops.new_dropout_seed())


def test_dropout_with_a_fixed_seed_matches_peft():
    # DoRA runs unfused, with nn.Dropout as peft does; plain LoRA runs the fused op, whose mask is a hash of
    # a seed drawn per call: peft with that dropout in place of nn.Dropout is the oracle then.
    for kwargs in ({}, {"use_dora": True}):
        pf, pm = peft_pair(dict(r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False, **kwargs))
        if not kwargs:
            for name in ("lin1", "lin2"):
                getattr(pm.base_model.model, name).lora_dropout["default"] = SeededDropout(0.3)
        assert_same(pf, pm, torch.float32, train=True, seed=7)
        assert_same(pf, pm, torch.float32, train=False)


def test_several_adapters_and_disable_adapter_match_peft():
    pf, pm = peft_pair(dict(r=4, lora_alpha=8, init_lora_weights=False), adapters=("a", "b"))
    assert pf.base_model.model.lin1.active_adapters == ["a", "b"]
    assert_same(pf, pm, torch.float32, train=False)
    x = torch.randn(3, 64)
    with torch.no_grad(), pf.disable_adapter():
        base_f = pf(x)
    pm.eval()
    bnb_train_mode(pm)
    with torch.no_grad(), pm.disable_adapter():
        base_m = pm(x)
    torch.testing.assert_close(base_f, base_m, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (pf(x) - base_f).abs().max() > 1e-3


def test_all_linear_targets_nf4_layers_and_repr():
    ours, _ = make_pair()
    pf = fastpeft.get_peft_model(ours, fastpeft.LoraConfig(r=2, target_modules="all-linear"))
    kinds = {n: type(m).__name__ for n, m in pf.base_model.model.named_children()}
    assert kinds == {"lin1": "Linear4bit", "lin2": "Linear4bit", "head": "Linear"}
    assert repr(pf.base_model.model.lin1).startswith("lora.Linear4bit(")


# ---- checkpoints move between fastpeft and peft + bitsandbytes -------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_checkpoints_move_both_ways(tmp_path, use_dora):
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=use_dora, target_modules=["lin1", "lin2"])
    pf, pm = peft_pair({k: v for k, v in kw.items() if k != "target_modules"})
    x = torch.randn(3, 64)
    pf.eval()
    pm.eval()
    bnb_train_mode(pm)
    with torch.no_grad():
        yf, ym = pf(x), pm(x)
    pf.save_pretrained(tmp_path / "ours")
    pm.save_pretrained(tmp_path / "theirs")

    ours, theirs = make_pair()
    into_peft = bnb_train_mode(peft.PeftModel.from_pretrained(theirs, str(tmp_path / "ours")).eval())
    into_ours = fastpeft.PeftModel.from_pretrained(ours, str(tmp_path / "theirs")).eval()
    assert isinstance(into_ours.base_model.model.lin1, Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(into_peft(x), yf, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(into_ours(x), ym, rtol=1e-5, atol=1e-5)


# ---- merging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_adapter_requantizes_in_place_like_peft(use_dora):
    pf, pm = peft_pair(dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=use_dora), scale=0.05)
    pf.eval()
    pm.eval()
    bnb_train_mode(pm)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = pf(x)
    with pytest.warns(UserWarning, match="re-quantises"):
        pf.merge_adapter()
    pm.merge_adapter()
    layer = pf.base_model.model.lin1
    assert layer.merged and layer.base_layer.weight.dtype == torch.uint8
    # the same dequantise + add + re-quantise: the same NF4 bytes as peft + bitsandbytes
    for name in ("lin1", "lin2"):
        ours = pf.base_model.model.get_submodule(name).base_layer
        theirs = pm.base_model.model.get_submodule(name).base_layer
        assert torch.equal(ours.weight.data, theirs.weight.data), name
    with torch.no_grad():
        merged = pf(x)
        torch.testing.assert_close(merged, pm(x), rtol=1e-5, atol=1e-5)
    assert (merged - before).norm() < 0.3 * before.norm()  # lossy (a second NF4 rounding), but close
    with pytest.warns(UserWarning, match="re-quantises"):
        pf.unmerge_adapter()
    assert not layer.merged
    with torch.no_grad():
        after = pf(x)
    assert (after - before).norm() < 0.3 * before.norm()


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_returns_dequantised_linear(compute_dtype, use_dora):
    pf, _ = peft_pair(dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=use_dora, lora_dropout=0.1),
                      compute_dtype=compute_dtype)
    pf.eval()
    x = torch.randn(6, 64)
    with torch.no_grad():
        expected = pf(x)
    model = pf.merge_and_unload()
    for name in ("lin1", "lin2"):
        lin = model.get_submodule(name)
        assert type(lin) is nn.Linear and lin.weight.dtype == (compute_dtype or torch.float32), name
        assert not lin.weight.requires_grad
    with torch.no_grad():
        got = model.float()(x)  # the merged layers are in the compute dtype, the rest of the model is not
    tol = dict(rtol=1e-4, atol=1e-5) if compute_dtype is None else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, expected, **tol)


def test_from_linear_wraps_a_single_nf4_layer():
    nf4 = LinearNF4.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    layer = Linear4bit.from_linear(nf4, r=4, lora_alpha=8, use_dora=True)
    assert layer.base_layer is nf4 and not any(p.requires_grad for p in nf4.parameters())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default.weight"}
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), nf4(x), rtol=1e-5, atol=1e-5)  # B = 0 and m = ||W||: the base output
    with pytest.raises(TypeError, match="expects a fastpeft LinearNF4"):
        Linear4bit.from_linear(nn.Linear(4, 4))


def test_unload_gives_back_the_nf4_layers_and_fused_path_choice():
    pf, _ = peft_pair(dict(r=4, lora_alpha=8, init_lora_weights=False))
    layer = pf.base_model.model.lin1
    x = torch.randn(3, 64)
    assert layer._can_fuse(x, ["default"], (), {})  # one plain adapter: the fused qlora_linear op
    assert not layer._can_fuse(x.double(), ["default"], (), {})  # float64 compute: no NF4 kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._can_fuse(x, ["default"], (), {})
    nf4 = layer.base_layer
    with torch.no_grad():
        pf.base_model.model.lin2.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="adapter default seems to be broken"):
        copy.deepcopy(pf).merge_and_unload(safe_merge=True)
    model = pf.unload()
    assert model.lin1 is nf4 and isinstance(model.lin2, LinearNF4)


def test_merge_and_unload_requantize_reports_the_error(caplog):
    pf, _ = peft_pair(dict(r=4, lora_alpha=8, init_lora_weights=False), compute_dtype=torch.bfloat16)
    ref = copy.deepcopy(pf).merge_and_unload(dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="fastpeft.qlora"), pytest.warns(UserWarning, match="re-quantised 2"):
        model = pf.merge_and_unload(requantize=True)
    report = model.nf4_requantization_report
    assert isinstance(report, RequantizationReport) and set(report.layers) == {"lin1", "lin2"}
    assert "lin1" in caplog.text and "relative Frobenius" in caplog.text
    for name in ("lin1", "lin2"):
        layer = model.get_submodule(name)
        assert isinstance(layer, LinearNF4) and layer.compute_dtype == torch.bfloat16
        assert layer.blocksize == 64 and layer.double_quant
        merged = ref.get_submodule(name).weight
        deq = layer.dequantize(torch.float32)
        err = report.layers[name]
        assert layer.requantization_error is err
        assert err.max_abs == pytest.approx((deq - merged).abs().max().item(), rel=1e-5)
        assert err.rel_fro == pytest.approx((torch.linalg.norm(deq - merged) / torch.linalg.norm(merged)).item(),
                                            rel=1e-5)
        assert 0 < err.rel_fro < 0.2  # NF4's rounding error on a random weight is ~10%
    assert report.max_rel_fro >= report.mean_rel_fro > 0 and "re-quantised 2 merged layers" in str(report)
    # the state dict is bitsandbytes' again, loadable by it
    sd = model.lin1.state_dict()
    back = bnb_from_state_dict(sd, 64, 64, True, compute_dtype=torch.bfloat16).train()
    x = torch.randn(2, 64)
    torch.testing.assert_close(back(x), model.lin1(x), rtol=2e-2, atol=2e-2)  # bf16 compute, two matmul orders


# ---- training a tiny Llama -----------------------------------------------------------------------


def test_prepare_model_for_kbit_training_trains_adapters_only():
    model = tiny_llama().to(torch.bfloat16)
    fastpeft.quantize_model(model, progress=False)
    model = fastpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    assert model.model.norm.weight.dtype == torch.float32  # non-quantised params cast to fp32, as peft does
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    assert model.is_gradient_checkpointing
    pm = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                            lora_dropout=0.05))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = inputs(batch=4, seq=12)
    labels = batch["input_ids"]
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    torch.manual_seed(0)
    for _ in range(8):
        loss = pm(**batch, labels=labels).loss
        loss.backward()
        with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
        assert with_grad == trainable
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# ---- loading a transformers checkpoint saved in bitsandbytes 4-bit form ----------------------------


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """A tiny Llama quantised by transformers + bitsandbytes on this CPU and saved with save_pretrained."""
    root = tmp_path_factory.mktemp("bnb4")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(  # in_features multiples of the blocksize (bitsandbytes' CPU dequantiser)
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "fp")
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = transformers.AutoModelForCausalLM.from_pretrained(str(root / "fp"), quantization_config=qc,
                                                              device_map="cpu")
        q.save_pretrained(root / "q4")
    return root / "q4", bnb_train_mode(q.eval())


def test_load_nf4_model_matches_bitsandbytes(bnb_checkpoint, tmp_path):
    path, theirs = bnb_checkpoint
    model = fastpeft.load_nf4_model(path, transformers.AutoModelForCausalLM)
    assert model.is_loaded_in_4bit and not model.training
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LinearNF4) and q_proj.compute_dtype == torch.float32 and q_proj.double_quant
    assert type(model.lm_head) is nn.Linear  # transformers leaves the head unquantised
    sm, st = model.state_dict(), theirs.state_dict()
    assert set(sm) == set(st)
    for k in st:
        assert torch.equal(sm[k], st[k].cpu()), k
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4)
    # the bare model from a head model's checkpoint (transformers drops the head the same way)
    bare = fastpeft.load_nf4_model(path, transformers.AutoModel, dtype=torch.bfloat16)
    assert type(bare).__name__ == "LlamaModel" and bare.embed_tokens.weight.dtype == torch.bfloat16
    assert bare.layers[0].self_attn.q_proj.quant_state.nested_absmax.dtype == torch.float32
    assert torch.equal(bare.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    # compute dtype override
    assert fastpeft.load_nf4_model(path, compute_dtype=torch.bfloat16).model.layers[0].mlp.up_proj.compute_dtype \
        == torch.bfloat16
    # it trains with QLoRA, and the adapter loads into peft on transformers' bitsandbytes model
    model = fastpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    pm = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    pm.train()
    for _ in range(6):
        loss = pm(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    pm.save_pretrained(tmp_path / "adapter")
    pm.eval()
    into_peft = bnb_train_mode(peft.PeftModel.from_pretrained(copy.deepcopy(theirs), str(tmp_path / "adapter")).eval())
    with torch.no_grad():
        torch.testing.assert_close(into_peft(**batch).logits, pm(**batch).logits, rtol=1e-4, atol=1e-4)


def _edit_config(path, tmp_path, **changes):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(path, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_load_nf4_model_rejects_what_it_cannot_read(bnb_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = bnb_checkpoint
    with pytest.raises(ValueError, match="bnb_4bit_quant_type is 'fp4'.*NF4 only"):
        fastpeft.load_nf4_model(_edit_config(path, tmp_path / "a", bnb_4bit_quant_type="fp4"))
    with pytest.raises(ValueError, match="8-bit"):
        fastpeft.load_nf4_model(_edit_config(path, tmp_path / "b", load_in_8bit=True, load_in_4bit=False))
    with pytest.raises(ValueError, match="llm_int8_skip_modules"):
        fastpeft.load_nf4_model(_edit_config(path, tmp_path / "c", llm_int8_skip_modules=["q_proj"]))
    with pytest.raises(FileNotFoundError, match="config.json"):
        fastpeft.load_nf4_model(tmp_path)
    # a tensor that does not fit: the error names the key
    bad = _edit_config(path, tmp_path / "d")
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:-1].clone()
    sd["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.mlp.extra.weight"):
        fastpeft.load_nf4_model(bad)
    del sd["model.layers.1.mlp.extra.weight"]
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
        fastpeft.load_nf4_model(bad)
    del sd["model.norm.weight"]
    sd["model.layers.0.self_attn.q_proj.weight"] = load_file(path / "model.safetensors")[
        "model.layers.0.self_attn.q_proj.weight"]
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 'model.norm.weight'"):
        fastpeft.load_nf4_model(bad)


# ---- the QLoRA rows of the Llama benchmark run end to end (tiny shapes; nothing asserted on speed) ---


def test_bench_llama_qlora_rows_smoke():
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import bench_llama, common

    shape = dict(layers=1, hidden=64, intermediate=100, heads=2, vocab=128, seq=16, batch=2, r=4)
    ctx = common.BenchContext(device="cpu", quick=True, warmup=1, repeats=2, min_sample_ms=0.0, verbose=False,
                              options={**shape, "llama_dropouts": [], "llama_qlora_dropouts": [0.0],
                                       "llama_dtype": torch.float32})
    res = bench_llama.run(ctx)
    assert not res.errors, res.errors
    table = res.tables[-1]
    assert table.title.startswith("QLoRA") and "i128" in table.title  # rounded up to the blocksize
    assert {r["impl"] for r in table.rows} == {"peft+bnb", "fastpeft"}
    row = next(r for r in table.rows if r["impl"] == "fastpeft")
    assert row["speedup"] > 0 and row["status"] in ("PASS", "MISS") and row["saved MB"] > 0


def test_lora_linear_nf4_from_linear_without_a_wrapper_model():
    from fastpeft.nn import LinearNF4, LoraLinearNF4, LoraLinear

    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    base = LinearNF4.from_linear(dense, compute_dtype=torch.float32)
    layer = LoraLinearNF4.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    assert layer.get_base_layer() is base and not base.weight.requires_grad
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    # the same adapter on the dequantised dense weight (fastpeft's LoRA on nn.Linear) is the oracle
    ref_base = nn.Linear(64, 32)
    with torch.no_grad():
        ref_base.weight.copy_(base.dequantize(torch.float32))
        ref_base.bias.copy_(base.bias)
    ref = LoraLinear.from_linear(ref_base, r=4, lora_alpha=8, init_lora_weights=False)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if "lora_" in k}, strict=False)
    xr = x.detach().clone().requires_grad_(True)
    yr = ref(xr)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    yr.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(layer, name)["default"].weight.grad,
                                   getattr(ref, name)["default"].weight.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="LinearNF4"):
        LoraLinearNF4.from_linear(dense)
