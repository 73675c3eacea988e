"""LoftQ (fastpeft.quant.loftq): the math (Q + s B A ~ W, better than plain NF4, scaling-aware), conformance
with peft (config, JSON, the algorithm with lora_alpha == r), the LoRA model path, saving / loading, and
replace_lora_weights_loftq on an NF4-quantised model."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import save_file  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import LoftQConfig, LoraConfig, get_peft_model, replace_lora_weights_loftq  # noqa: E402
from fastpeft.quant import loftq as lq  # noqa: E402
from fastpeft.quant.nf4 import LinearNF4, dequantize_nf4, quantize_model, quantize_nf4  # noqa: E402
from fastpeft.tuners.lora.layer import Embedding as LoraEmbedding  # noqa: E402
from fastpeft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---- helpers --------------------------------------------------------------------------------------


def lowrank_plus_noise(out_f=96, in_f=160, rank=6, noise=0.3, seed=0, device="cpu"):
    """A weight with a strong rank-`rank` part plus dense noise (entries ~0.02, as in LLM layers)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) / math.sqrt(rank)
    w = (low + noise * torch.randn(out_f, in_f, generator=g)) * 0.02
    return w.to(device)


def nf4_roundtrip(w, double_quant=False):
    packed, state = quantize_nf4(w.float().contiguous(), 64, double_quant)
    return dequantize_nf4(packed, state, torch.float32)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def lora_linear(weight, r, alpha, use_rslora=False, loftq=None, fan_in_fan_out=False):
    """A fastpeft LoRA Linear (or Conv1D with fan_in_fan_out) over a copy of `weight` [out, in], LoftQ-initialised."""
    out_f, in_f = weight.shape
    if fan_in_fan_out:
        base = Conv1D(out_f, in_f)
        base.weight.data = weight.T.contiguous().clone()
    else:
        base = nn.Linear(in_f, out_f, bias=False)
        base.weight.data = weight.clone()
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, init_lora_weights="loftq",
                     loftq_config=loftq or LoftQConfig(), fan_in_fan_out=fan_in_fan_out)
    return LoraLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, is_target_conv_1d_layer=fan_in_fan_out)


def effective_weight(layer):
    """[out, in]: base weight + s B A, the weight the layer applies."""
    base = layer.get_base_layer().weight.detach()
    base = base.T if layer.fan_in_fan_out else base
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    return base.float() + delta.detach().float() * layer.scaling["default"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    # give the linear weights a low-rank part, as trained weights have (random init has none)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                o, i = module.weight.shape
                module.weight.add_(torch.randn(o, 4, generator=g) @ torch.randn(4, i, generator=g) * 0.03)
    return model


# LoftQ removes the part of the quantisation error in the top-r singular directions: on these weights
# 7-35% of plain NF4's error (more with r and loftq_iter). "Clearly below" = below 93% of NF4's.
CLEARLY = 0.93

X_LLAMA = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- config ---------------------------------------------------------------------------------------


def test_loftq_config_matches_peft():
    from peft import LoftQConfig as PeftLoftQConfig

    ours, theirs = LoftQConfig(), PeftLoftQConfig()
    assert dataclasses.asdict(ours) == dataclasses.asdict(theirs) == {"loftq_bits": 4, "loftq_iter": 1}
    assert [f.name for f in dataclasses.fields(LoftQConfig)] == [f.name for f in dataclasses.fields(PeftLoftQConfig)]
    assert fastpeft.LoftQConfig is LoftQConfig
    from fastpeft.tuners.lora import LoftQConfig as FromTuners

    assert FromTuners is LoftQConfig
    # an instance, a dict and peft's own LoftQConfig all give the dict peft stores
    for given in (LoftQConfig(loftq_bits=8, loftq_iter=2), {"loftq_bits": 8, "loftq_iter": 2},
                  PeftLoftQConfig(loftq_bits=8, loftq_iter=2)):
        cfg = LoraConfig(init_lora_weights="loftq", loftq_config=given)
        assert cfg.loftq_config == {"loftq_bits": 8, "loftq_iter": 2}
    assert LoftQConfig.from_dict({"loftq_iter": 3}) == LoftQConfig(loftq_bits=4, loftq_iter=3)


def test_loftq_config_json_round_trips_with_peft(tmp_path):
    ours = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="loftq",
                      loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2))
    ours.save_pretrained(str(tmp_path / "ours"))
    with open(tmp_path / "ours" / "adapter_config.json") as f:
        written = json.load(f)
    assert written["init_lora_weights"] == "loftq"
    assert written["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    theirs = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="loftq",
                             loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    with open(tmp_path / "theirs" / "adapter_config.json") as f:
        peft_written = json.load(f)
    assert peft_written["loftq_config"] == written["loftq_config"]
    assert set(peft_written) <= set(written)  # every key peft writes, we write
    # each loads the other's file
    back = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
    assert back.init_lora_weights == "loftq" and back.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    mine = LoraConfig.from_pretrained(str(tmp_path / "theirs"))
    assert mine.init_lora_weights == "loftq" and mine.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}


@pytest.mark.parametrize("bits", [2, 3, 16, True])
def test_bad_loftq_bits(bits):
    with pytest.raises(ValueError, match="loftq_bits"):
        LoftQConfig(loftq_bits=bits)
    with pytest.raises(ValueError, match="loftq_bits"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": bits, "loftq_iter": 1})
    with pytest.raises(ValueError, match="loftq_bits"):
        lq.loftq_decompose(torch.randn(8, 8), 2, num_bits=bits)


def test_bad_loftq_config():
    for it in (0, -1, 1.5):
        with pytest.raises(ValueError, match="loftq_iter"):
            LoftQConfig(loftq_iter=it)
    with pytest.raises(ValueError, match="loftq_config must be given"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="unknown keys"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "bits": 4})
    with pytest.raises(ValueError, match="2-D"):
        lq.loftq_decompose(torch.randn(4, 4, 4), 2)
    with pytest.raises(ValueError, match="scaling"):
        lq.loftq_decompose(torch.randn(8, 8), 2, scaling=0.0)


# ---- the math -------------------------------------------------------------------------------------


@pytest.mark.parametrize("r,alpha,rslora", [(8, 8, False), (8, 16, False), (8, 4, False), (16, 32, True), (4, 1, False)])
def test_loftq_beats_plain_nf4(r, alpha, rslora):
    W = lowrank_plus_noise()
    x = torch.randn(64, W.shape[1], generator=torch.Generator().manual_seed(1))
    y = x @ W.T
    nf4_err = rel(nf4_roundtrip(W), W)
    nf4_out = rel(x @ nf4_roundtrip(W).T, y)
    errs = []
    for it in (1, 2, 4):
        layer = lora_linear(W, r, alpha, use_rslora=rslora, loftq=LoftQConfig(loftq_bits=4, loftq_iter=it))
        s = alpha / math.sqrt(r) if rslora else alpha / r
        assert layer.scaling["default"] == pytest.approx(s)
        W_eff = effective_weight(layer)
        err = rel(W_eff, W)
        with torch.no_grad():
            out = layer(x)
        assert rel(out, y) < CLEARLY * nf4_out
        assert err < CLEARLY * nf4_err, (it, err, nf4_err)
        errs.append(err)
    # more alternations never make the fit worse
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0] and errs[-1] < 0.9 * nf4_err


def test_base_weight_is_the_quantised_q():
    W = lowrank_plus_noise()
    layer = lora_linear(W, 8, 16)
    base = layer.get_base_layer().weight.detach()
    assert torch.equal(base, nf4_roundtrip(W))  # one iteration: Q = NF4(W), dequantised, float32
    Q, A, B = lq.loftq_decompose(W, 8, 2.0)
    assert torch.equal(Q, base)
    torch.testing.assert_close(layer.lora_A["default"].weight, A)
    torch.testing.assert_close(layer.lora_B["default"].weight, B)
    U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
    torch.testing.assert_close(2.0 * B @ A, (U[:, :8] * S[:8]) @ Vh[:8], atol=1e-6, rtol=1e-4)


def test_scaling_awareness():
    """alpha != r: fastpeft's Q + s B A ~ W; peft's unscaled fit (B A ~ W - Q) applied with s would not be."""
    W = lowrank_plus_noise()
    r, alpha = 8, 32  # s = 4
    s = alpha / r
    layer = lora_linear(W, r, alpha)
    ours = rel(effective_weight(layer), W)
    Q = nf4_roundtrip(W)
    U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
    B_peft, A_peft = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]  # peft: fits B A ~ W - Q
    peft_style = rel(Q + s * B_peft @ A_peft, W)
    assert ours < rel(Q, W) < peft_style
    assert peft_style > 1.5 * ours
    # ours is the unscaled fit divided by s: same product s B A == B_peft A_peft
    torch.testing.assert_close(s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight,
                               B_peft @ A_peft, atol=1e-6, rtol=1e-4)


def test_fan_in_fan_out_conv1d():
    W = lowrank_plus_noise(out_f=80, in_f=48)  # [out, in]; Conv1D stores [in, out]
    layer = lora_linear(W, 8, 16, fan_in_fan_out=True)
    base = layer.get_base_layer()
    assert base.weight.shape == (48, 80)
    assert torch.equal(base.weight.detach().T, nf4_roundtrip(W))  # quantised as the [out, in] matrix
    assert rel(effective_weight(layer), W) < CLEARLY * rel(nf4_roundtrip(W), W)
    x = torch.randn(5, 48)
    with torch.no_grad():
        assert rel(layer(x), x @ W.T) < CLEARLY * rel(x @ nf4_roundtrip(W).T, x @ W.T)


def test_embedding():
    emb = nn.Embedding(40, 24)
    with torch.no_grad():
        emb.weight.copy_(lowrank_plus_noise(out_f=40, in_f=24, rank=3))
    W = emb.weight.detach().clone()
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="loftq", loftq_config=LoftQConfig())
    layer = LoraEmbedding(emb, "default", config=cfg, r=4, lora_alpha=8)
    W_eff = layer.get_base_layer().weight.detach() + layer.get_delta_weight("default").detach()
    assert rel(W_eff, W) < rel(nf4_roundtrip(W.T).T, W)
    idx = torch.arange(40)
    with torch.no_grad():
        torch.testing.assert_close(layer(idx), W_eff, atol=1e-6, rtol=1e-5)


def test_int8_matches_bitsandbytes():
    import bitsandbytes as bnb

    W = lowrank_plus_noise(out_f=32, in_f=64)
    A8, stats, _ = bnb.functional.int8_vectorwise_quant(W.to(torch.float16))  # what peft's Int8Params does
    expected = bnb.functional.int8_vectorwise_dequant(A8, stats)
    assert torch.equal(lq.quantize_roundtrip(W, 8), expected)
    layer = lora_linear(W, 4, 8, loftq=LoftQConfig(loftq_bits=8))
    assert torch.equal(layer.get_base_layer().weight.detach(), expected)
    assert rel(effective_weight(layer), W) < rel(expected, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_requantising_the_saved_base(dtype, double_quant):
    """The LoftQ workflow saves the base model holding dequant(Q) and loads it in 4 bits later."""
    W = lowrank_plus_noise().to(dtype)
    layer = lora_linear(W, 8, 16, loftq=LoftQConfig(loftq_iter=2))
    saved = layer.get_base_layer().weight.detach()
    assert saved.dtype == dtype
    Q = lq.loftq_decompose(W, 8, 2.0, num_iter=2)[0]
    packed_q, state_q = quantize_nf4(Q, 64, False)
    packed, state = quantize_nf4(saved, 64, double_quant)
    assert torch.equal(packed, packed_q)  # the same NF4 codes
    reloaded = dequantize_nf4(packed, state, torch.float32)
    if dtype == torch.float32 and not double_quant:
        assert torch.equal(state.absmax, state_q.absmax)
        assert torch.equal(reloaded, Q)  # exact: loading in 4 bits gives back Q bit for bit
    else:
        assert rel(reloaded, Q) < 5e-3  # absmax rounded to the dtype / 8-bit absmax statistics


def test_double_quant_fit_requantises_closely():
    """For a base that will be loaded with double quantisation: fit against the double-quantised Q."""
    W = lowrank_plus_noise(out_f=128, in_f=256)
    for num_iter in (1, 2):
        Q, A, B = lq.loftq_decompose(W, 8, 2.0, num_iter=num_iter, double_quant=True)
        packed, state = quantize_nf4(Q, 64, True)
        assert torch.equal(packed, quantize_nf4(Q, 64, False)[0])  # the same codes
        assert rel(dequantize_nf4(packed, state, torch.float32), Q) < 5e-4  # vs ~2e-3 for the plain fit
        assert rel(Q + 2.0 * B @ A, W) < CLEARLY * rel(nf4_roundtrip(W, double_quant=True), W)


def test_matches_peft_algorithm_on_cpu():
    """peft's loftq_init hard-codes a CUDA/XPU device (bitsandbytes 0.50.2 quantises on CPU, but peft 0.21.2
    moves the weight to 'cuda' first), so on CPU the oracle is peft's loop restated with peft's own
    `_low_rank_decomposition` and bitsandbytes' CPU NF4 (`Params4bit(compress_statistics=False)` ==
    `quantize_4bit(..., compress_statistics=False)`). With lora_alpha == r the results must agree.
    (in_features is a multiple of 64: bitsandbytes 0.50.2's CPU `dequantize_4bit` mis-scales blocks that
    straddle two rows, e.g. a [96, 160] weight; its quantised bytes are right, and fastpeft's dequantisation
    is the flat code[q] * absmax[i // 64].)"""
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    W = lowrank_plus_noise(in_f=192)
    for num_iter in (1, 3):
        res = W.clone()
        for i in range(num_iter):
            q, st = bnb.functional.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
            deq = bnb.functional.dequantize_4bit(q, st)
            out = _low_rank_decomposition(W - deq, reduced_rank=8)
            if i + 1 == num_iter:
                break
            res = W - out["L"] @ out["R"]
        layer = lora_linear(W, 8, 8, loftq=LoftQConfig(loftq_iter=num_iter))
        assert torch.equal(layer.get_base_layer().weight.detach(), deq)
        torch.testing.assert_close(layer.lora_A["default"].weight, out["R"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B["default"].weight, out["L"], atol=1e-5, rtol=1e-4)


def test_peft_loftq_init_needs_cuda():
    """Documents why the direct comparison with peft's loftq_init is CUDA-only."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: see test_matches_peft_loftq_init_cuda")
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    with pytest.raises((RuntimeError, AssertionError)):
        peft_loftq_init(torch.randn(16, 64), num_bits=4, reduced_rank=4, num_iter=1)


# ---- through the LoRA model -----------------------------------------------------------------------


def test_get_peft_model_tiny_llama_save_load(tmp_path):
    original = tiny_llama()
    model = copy.deepcopy(original)
    with torch.no_grad():
        ref = original(X_LLAMA).logits
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights="loftq",
                     loftq_config=LoftQConfig(loftq_bits=4))
    pm = get_peft_model(model, cfg)
    layers = [m for m in pm.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 14
    with torch.no_grad():
        out = pm(X_LLAMA).logits
        with pm.disable_adapter():
            nf4_only = pm(X_LLAMA).logits  # base weights = dequant(NF4(W)) without the adapters
    assert rel(out, ref) < CLEARLY * rel(nf4_only, ref)
    for name, m in original.named_modules():
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in LORA_TARGETS:
            lora = pm.get_base_model().get_submodule(name)
            assert torch.equal(lora.get_base_layer().weight.detach(), nf4_roundtrip(m.weight.detach()))

    pm.save_pretrained(str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        written = json.load(f)
    assert written["init_lora_weights"] == "loftq" and written["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    peft_keys = set(peft.LoraConfig(init_lora_weights="loftq", loftq_config=peft.LoftQConfig()).to_dict())
    assert peft_keys <= set(written) | {"runtime_config"}

    # the user's LoftQ workflow: the base model now holds dequant(Q) (save it), the adapter is loaded on it
    base = copy.deepcopy(original)
    with torch.no_grad():
        for name, m in base.named_modules():
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] in LORA_TARGETS:
                m.weight.copy_(pm.get_base_model().get_submodule(name).get_base_layer().weight)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = fastpeft.PeftModel.from_pretrained(base, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(X_LLAMA).logits, out, atol=1e-5, rtol=1e-5)
    # loading re-runs LoftQ (as peft does), which leaves a dequant(Q) base weight unchanged (requantisation exact)
    after = loaded.get_base_model().state_dict()
    for k, v in before.items():
        k2 = k.replace(".weight", ".base_layer.weight") if any(f"{t}.weight" in k for t in LORA_TARGETS) else k
        assert torch.equal(after[k2], v), k


def test_loftq_workflow_reload_in_4_bits_is_exact(tmp_path):
    """peft's LoftQ workflow: save the adapter (init_lora_weights=True) and the unloaded base holding
    dequant(Q); load the base in 4 bits (no double quantisation) and the adapter on it: the NF4 weights
    are Q bit for bit and the QLoRA model computes what the LoftQ model did."""
    original = tiny_llama()
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="loftq",
                     loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2))
    pm = get_peft_model(copy.deepcopy(original), cfg)
    with torch.no_grad():
        expected = pm(X_LLAMA).logits
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(tmp_path / "adapter"))
    q_weights = {n: m.get_base_layer().weight.detach().clone() for n, m in pm.get_base_model().named_modules()
                 if isinstance(m, LoraLinear)}
    pm.unload().save_pretrained(str(tmp_path / "base"))
    qbase = quantize_model(transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base")).eval(),
                           double_quant=False, compute_dtype=torch.float32, progress=False)
    for name, w in q_weights.items():
        assert torch.equal(qbase.get_submodule(name).dequantize(torch.float32), w), name
    try:
        qlora = fastpeft.PeftModel.from_pretrained(qbase, str(tmp_path / "adapter"))
    except (ValueError, TypeError, NotImplementedError) as exc:  # pragma: no cover - QLoRA layer missing
        pytest.skip(f"LoRA cannot wrap LinearNF4 in this tree yet: {exc}")
    with torch.no_grad():
        torch.testing.assert_close(qlora(X_LLAMA).logits, expected, atol=1e-4, rtol=1e-4)


def test_loftq_init_on_nf4_base_warns_and_falls_back():
    model = quantize_model(tiny_llama(), compute_dtype=None, progress=False)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=LoftQConfig())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = get_peft_model(model, cfg)
    except (ValueError, TypeError, NotImplementedError) as exc:  # pragma: no cover - QLoRA layer missing
        pytest.skip(f"LoRA cannot wrap LinearNF4 in this tree yet: {exc}")
    assert any("replace_lora_weights_loftq" in str(w.message) for w in caught)
    for m in pm.modules():
        if isinstance(m, LoraLinear):
            assert torch.count_nonzero(m.lora_B["default"].weight) == 0


# ---- replace_lora_weights_loftq -------------------------------------------------------------------


def _quantised_peft_model(original, r=8, alpha=16, double_quant=True, use_rslora=False):
    model = quantize_model(copy.deepcopy(original), double_quant=double_quant, compute_dtype=None, progress=False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, use_rslora=use_rslora)
    try:
        return get_peft_model(model, cfg)
    except (ValueError, TypeError, NotImplementedError) as exc:  # pragma: no cover - QLoRA layer missing
        pytest.skip(f"LoRA cannot wrap LinearNF4 in this tree yet (QLoRA layer not available): {exc}")


def _save_original(model, path):
    tensors = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    tensors.pop("lm_head.weight", None)  # tied / not needed
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("use_rslora", [False, True])
def test_replace_lora_weights_loftq_on_quantised_llama(tmp_path, use_rslora):
    original = tiny_llama()
    with torch.no_grad():
        ref = original(X_LLAMA).logits
    pm = _quantised_peft_model(original, use_rslora=use_rslora)
    with torch.no_grad():
        qlora_out = pm(X_LLAMA).logits  # B == 0: the NF4 model
    d = tmp_path / "orig"
    d.mkdir()
    _save_original(original, d / "model.safetensors")
    replace_lora_weights_loftq(pm, model_path=str(d))
    with torch.no_grad():
        out = pm(X_LLAMA).logits
    assert rel(out, ref) < CLEARLY * rel(qlora_out, ref)
    # per layer: A, B are the rank-r SVD of (W - dequant(Q)) / s
    for name, m in original.named_modules():
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in LORA_TARGETS:
            layer = pm.get_base_model().get_submodule(name)
            base = layer.get_base_layer()
            assert isinstance(base, LinearNF4)
            W = m.weight.detach()
            Qd = base.dequantize(torch.float32)
            s = layer.scaling["default"]
            W_eff = Qd + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            assert rel(W_eff, W) < rel(Qd, W)

    # the same from a file path, a sharded directory, and a dict
    for source in ("file", "sharded", "dict"):
        pm2 = _quantised_peft_model(original, use_rslora=use_rslora)
        if source == "file":
            replace_lora_weights_loftq(pm2, model_path=str(d / "model.safetensors"))
        elif source == "sharded":
            sd = {k: v.contiguous().clone() for k, v in original.state_dict().items() if k != "lm_head.weight"}
            keys = sorted(sd)
            sh = tmp_path / "sharded"
            sh.mkdir()
            half = len(keys) // 2
            save_file({k: sd[k] for k in keys[:half]}, str(sh / "model-00001-of-00002.safetensors"))
            save_file({k: sd[k] for k in keys[half:]}, str(sh / "model-00002-of-00002.safetensors"))
            weight_map = {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
                          for i, k in enumerate(keys)}
            with open(sh / "model.safetensors.index.json", "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f)
            replace_lora_weights_loftq(pm2, model_path=str(sh))
        else:
            # keys without the "model." base_model_prefix are found too
            weights = {k.removeprefix("model."): v for k, v in original.state_dict().items()}
            replace_lora_weights_loftq(pm2, original_weights=weights)
        for (k1, v1), (k2, v2) in zip(pm.state_dict().items(), pm2.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2), (source, k1)


def test_replace_lora_weights_loftq_callback_rolls_back():
    original = tiny_llama()
    pm = _quantised_peft_model(original)
    seen = []

    def keep_attention_only(model, name):
        assert model is pm
        seen.append(name)
        return "self_attn" in name

    replace_lora_weights_loftq(pm, original_weights=original.state_dict(), callback=keep_attention_only)
    assert len(seen) == 14 and all(n.startswith("model.layers.") for n in seen)
    for name in seen:
        B = pm.get_base_model().get_submodule(name).lora_B["default"].weight
        assert (torch.count_nonzero(B) > 0) == ("self_attn" in name), name


def test_replace_lora_weights_loftq_errors(tmp_path):
    original = tiny_llama()
    pm = _quantised_peft_model(original)
    sd = dict(original.state_dict())
    missing = "model.layers.1.mlp.down_proj.weight"
    del sd[missing]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        replace_lora_weights_loftq(pm, original_weights=sd)
    sd = dict(original.state_dict())
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"q_proj\.weight.*shape \(3, 3\)"):
        replace_lora_weights_loftq(pm, original_weights=sd)
    torch.save(original.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        replace_lora_weights_loftq(pm, model_path=str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        replace_lora_weights_loftq(pm, model_path=str(tmp_path))
    with pytest.raises(ValueError, match="either model_path or original_weights"):
        replace_lora_weights_loftq(pm, model_path=str(tmp_path), original_weights={})
    with pytest.raises(ValueError, match="adapter 'other'"):
        replace_lora_weights_loftq(pm, original_weights=original.state_dict(), adapter_name="other")
    dora = get_peft_model(quantize_model(copy.deepcopy(original), compute_dtype=None, progress=False),
                          LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="DoRA"):
        replace_lora_weights_loftq(dora, original_weights=original.state_dict())
    plain = get_peft_model(copy.deepcopy(original), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no LoRA layer"):
        replace_lora_weights_loftq(plain, original_weights=original.state_dict())


def test_progress_bar_counts_layers(monkeypatch):
    counted = []

    class Bar:
        def __init__(self, *args, **kwargs):
            self.n = 0

        def update(self, k):
            self.n += k

        def close(self):
            counted.append(self.n)

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
                     loftq_config=LoftQConfig())
    get_peft_model(tiny_llama(), cfg)
    assert counted == [4]  # one bar over the model's LoftQ layers


# ---- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_loftq_cuda_matches_cpu():
    W = lowrank_plus_noise()
    Qc, Ac, Bc = lq.loftq_decompose(W, 8, 2.0, num_iter=2)
    Qg, Ag, Bg = lq.loftq_decompose(W.cuda(), 8, 2.0, num_iter=2)
    assert Qg.is_cuda
    # NF4 on CUDA has the same bytes; the SVD may differ in the last bits and the sign of singular vectors
    assert rel(Qg.cpu(), Qc) < 1e-3
    assert rel(Qg + 2.0 * Bg @ Ag, W.cuda()) == pytest.approx(rel(Qc + 2.0 * Bc @ Ac, W), rel=1e-2)
    assert rel(Qg + 2.0 * Bg @ Ag, W.cuda()) < CLEARLY * rel(nf4_roundtrip(W), W)
    layer = lora_linear(W.cuda(), 8, 16).cuda()
    assert layer.get_base_layer().weight.is_cuda and layer.lora_A["default"].weight.is_cuda


@pytest.mark.cuda
def test_matches_peft_loftq_init_cuda():
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    W = lowrank_plus_noise().cuda()
    for num_iter in (1, 2):
        q_peft, A_peft, B_peft = peft_loftq_init(W, num_bits=4, reduced_rank=8, num_iter=num_iter)
        Q, A, B = lq.loftq_decompose(W, 8, 1.0, num_iter=num_iter)
        assert rel(Q, q_peft.float()) < 1e-3
        torch.testing.assert_close(B @ A, (B_peft @ A_peft).float(), atol=1e-4, rtol=1e-3)
