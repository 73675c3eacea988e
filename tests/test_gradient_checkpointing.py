"""Gradient checkpointing with frozen inputs, for every method: transformers' ``gradient_checkpointing_enable``
is called on the base model before it is wrapped (as users do; also on the adapter model, as Trainer does), with
reentrant and non-reentrant checkpointing, and the adapter gradients of two training steps must equal those of the
same model without checkpointing (fp32; dropout 0, and dropout > 0 for the methods that have it: the recomputation
must draw the same masks), be non-zero, and the checkpointed layers must really be recomputed in backward. peft
with checkpointing is a second oracle where it supports the method."""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

from _peft_testing import inputs, tiny_llama, transformers

import fastpeft

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two saved LoRA adapters for X-LoRA (names "0", "1", as peft's X-LoRA wants)."""
    root = tmp_path_factory.mktemp("gc_experts")
    paths = {}
    for i, (targets, r) in enumerate([(["q_proj", "v_proj"], 4), (["v_proj", "down_proj"], 2)]):
        torch.manual_seed(10 + i)
        model = fastpeft.get_peft_model(tiny_llama(use_cache=False), fastpeft.LoraConfig(r=r, lora_alpha=8,
                                                                                         target_modules=targets))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        model.save_pretrained(str(root / str(i)))
        paths[str(i)] = str(root / str(i))
    return paths


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def _lora(**kw):
    return lambda lib, base, experts: lib.get_peft_model(base, lib.LoraConfig(**{**LORA, **kw}))


def _cfg(name, **kw):
    return lambda lib, base, experts: lib.get_peft_model(base, getattr(lib, name)(**kw))


def _qlora(lib, base, experts):
    return lib.get_peft_model(base, lib.LoraConfig(**LORA))


def _mixed(lib, base, experts):
    model = lib.get_peft_model(base, lib.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]),
                               adapter_name="loha", mixed=True)
    model.add_adapter("lora", lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    model.add_adapter("lokr", lib.LoKrConfig(r=2, alpha=4, target_modules=["v_proj", "o_proj"]))
    model.set_adapter(["loha", "lora", "lokr"])
    return model


def _xlora(lib, base, experts):
    return lib.get_peft_model(base, lib.XLoraConfig(hidden_size=32, adapters=dict(experts), task_type="CAUSAL_LM",
                                                    xlora_depth=2, xlora_dropout_p=0.0))


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = {
    "lora": _lora(),
    "dora": _lora(use_dora=True),
    "rslora": _lora(use_rslora=True),
    "qlora": _qlora,
    "loha": _cfg("LoHaConfig", r=2, alpha=4, target_modules=ATTN + ["down_proj"]),
    "lokr": _cfg("LoKrConfig", r=2, alpha=4, target_modules=ATTN + ["up_proj"]),
    "oft": _cfg("OFTConfig", r=0, oft_block_size=8, target_modules=ATTN),
    "boft": _cfg("BOFTConfig", boft_block_size=4, boft_n_butterfly_factor=2, target_modules=ATTN, boft_dropout=0.0),
    "ia3": _cfg("IA3Config", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "bitfit": _cfg("BitFitConfig", add_missing_biases=True),
    "bottleneck": _cfg("BottleneckConfig", placement="sequential", r=4, init_weights=False),
    "bottleneck_parallel": _cfg("BottleneckConfig", placement="parallel", r=4, init_weights=False),
    "adaption_prompt": _cfg("AdaptionPromptConfig", adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"),
    "prompt_tuning": _cfg("PromptTuningConfig", num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "p_tuning": _cfg("PromptEncoderConfig", num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM"),
    # peft refuses prefix tuning with checkpointing; fastpeft keeps the prefix (a read-only cache) in the recompute
    "prefix_tuning": _cfg("PrefixTuningConfig", num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "prefix_tuning_projection": _cfg("PrefixTuningConfig", num_virtual_tokens=4, prefix_projection=True,
                                     encoder_hidden_size=16, task_type="CAUSAL_LM"),
    "adalora": _cfg("AdaLoraConfig", init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2, lora_dropout=0.0,
                    target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"),
    "xlora": _xlora,
    "mixed": _mixed,
}

# dropout > 0: checkpointing restores the RNG state before recomputing, so seeded masks drawn from torch's generator
# (fastpeft's kernels regenerate theirs from a seed drawn in forward) must come out the same in the recomputation
DROPOUT_METHODS = {
    "lora_dropout": _lora(lora_dropout=0.3),
    "dora_dropout": _lora(lora_dropout=0.3, use_dora=True),
    "loha_dropout": _cfg("LoHaConfig", r=2, alpha=4, target_modules=ATTN, rank_dropout=0.3, module_dropout=0.3),
    "lokr_dropout": _cfg("LoKrConfig", r=2, alpha=4, target_modules=ATTN, rank_dropout=0.3, module_dropout=0.3),
    "oft_dropout": _cfg("OFTConfig", r=0, oft_block_size=8, target_modules=ATTN, module_dropout=0.3),
    "adalora_dropout": _cfg("AdaLoraConfig", init_r=4, target_r=2, total_step=10, lora_dropout=0.3,
                            target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "bottleneck_dropout": _cfg("BottleneckConfig", r=4, dropout=0.3, init_weights=False),
    "p_tuning_dropout": _cfg("PromptEncoderConfig", num_virtual_tokens=4, encoder_hidden_size=16,
                             encoder_reparameterization_type="LSTM", encoder_dropout=0.3, encoder_num_layers=2,
                             task_type="CAUSAL_LM"),
    "xlora_dropout": lambda lib, base, experts: lib.get_peft_model(
        base, lib.XLoraConfig(hidden_size=32, adapters=dict(experts), task_type="CAUSAL_LM", xlora_depth=2,
                              xlora_dropout_p=0.3)),
}
DROPOUT_METHODS["qlora_dropout"] = _lora(lora_dropout=0.3)
METHODS.update(DROPOUT_METHODS)


def _base(method, device="cpu"):
    base = tiny_llama(use_cache=False) if method.startswith("xlora") else tiny_llama()  # X-LoRA refuses use_cache (as peft)
    base = base.to(device)
    if method.startswith("qlora"):
        fastpeft.quantize_model(base, compute_dtype=torch.float32, progress=False)
    return base


def _enable(model, gc_kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 calls the name deprecated
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)


def _build(method, base, gc_kwargs, experts, lib=fastpeft, after=False):
    """The method's model on a copy of `base`: checkpointing enabled on the base model first when `gc_kwargs` is
    not None (on the adapter model, as transformers' Trainer does, with `after`); adapter weights perturbed by a
    fixed generator so that every trainable tensor gets a gradient."""
    base = copy.deepcopy(base)
    if gc_kwargs is not None and not after:
        _enable(base, gc_kwargs)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = METHODS[method](lib, base, experts)
    if gc_kwargs is not None and after:
        _enable(model, gc_kwargs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.1)
    return model.train()


def _train(model, steps=2):
    """Gradients of the trainable parameters after each of `steps` AdamW steps, and how many times the first
    decoder layer's MLP started (a pre-hook: non-reentrant recomputation stops once it has what backward needs)."""
    calls = []
    mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
    handle = mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    device = next(iter(params.values())).device
    batch = {k: v.to(device) for k, v in inputs(batch=2, seq=8).items()}
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in params.items()})
        opt.step()
    handle.remove()
    return grads, len(calls)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", [m for m in METHODS if m not in DROPOUT_METHODS])
def test_gradient_checkpointing_matches_plain_training(method, use_reentrant, experts):
    base = _base(method)
    plain, plain_calls = _train(_build(method, base, None, experts))
    model = _build(method, base, {"use_reentrant": use_reentrant}, experts)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ckpt, ckpt_calls = _train(model, steps=2)
    assert ckpt_calls == plain_calls + 2  # the checkpointed layer ran again in each step's backward
    for step, (want, got) in enumerate(zip(plain, ckpt)):
        assert want.keys() == got.keys()
        for name, g in want.items():
            assert g is not None and got[name] is not None, (step, name)
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
        total = sum(g.abs().sum() for g in got.values())
        assert total > 0
        if method not in ("xlora",):  # X-LoRA's experts are frozen; only its classifier trains
            nonzero = [n for n, g in got.items() if g.abs().sum() > 0]
            assert len(nonzero) == len(got), sorted(set(got) - set(nonzero))


def _check_dropout(method, use_reentrant, experts, device="cpu"):
    base = _base(method, device)
    plain, _ = _train(_build(method, base, None, experts))
    ckpt, _ = _train(_build(method, base, {"use_reentrant": use_reentrant}, experts))
    for step, (want, got) in enumerate(zip(plain, ckpt)):
        for name, g in want.items():
            if g is None:  # e.g. LoHa / LoKr skipped by module dropout this step
                assert got[name] is None or not got[name].any(), (step, name)
                continue
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", list(DROPOUT_METHODS))
def test_gradient_checkpointing_with_dropout(method, use_reentrant, experts):
    _check_dropout(method, use_reentrant, experts)


@pytest.mark.cuda
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", ["lora_dropout", "dora_dropout", "qlora_dropout", "xlora_dropout"])
def test_gradient_checkpointing_with_dropout_cuda(method, use_reentrant, experts):
    """The CUDA kernels' dropout masks, regenerated from seeds, under checkpointing's RNG save/restore."""
    _check_dropout(method, use_reentrant, experts, device="cuda")


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_qlora_prepared_for_kbit_training_with_checkpointing(use_reentrant):
    """The QLoRA path users take: prepare_model_for_kbit_training turns checkpointing on (and, reentrant, the
    input embeddings' require-grad hook, once)."""
    base = _base("qlora")
    grads = []
    for gc in (False, True):
        model = fastpeft.prepare_model_for_kbit_training(
            copy.deepcopy(base), use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
        )
        assert model.is_gradient_checkpointing == gc
        torch.manual_seed(0)
        model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(**LORA))
        hooks = model.get_base_model()._require_grads_hooks if gc else []
        assert len(hooks) == gc
        assert len(model.get_base_model().get_input_embeddings()._forward_hooks) == gc
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        grads.append(_train(model.train())[0])
    for step, (want, got) in enumerate(zip(*grads)):
        for name, g in want.items():
            assert g is not None and got[name] is not None and g.any(), (step, name)
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")


@pytest.mark.parametrize("method", ["lora", "adaption_prompt", "prompt_tuning", "prefix_tuning", "xlora", "mixed"])
def test_gradient_checkpointing_enabled_on_the_adapter_model(method, experts):
    """`gradient_checkpointing_enable()` called on the adapter model (as transformers' Trainer does), reentrant."""
    base = _base(method)
    plain, plain_calls = _train(_build(method, base, None, experts))
    ckpt, ckpt_calls = _train(_build(method, base, {"use_reentrant": True}, experts, after=True))
    assert ckpt_calls == plain_calls + 2
    for step, (want, got) in enumerate(zip(plain, ckpt)):
        for name, g in want.items():
            assert g is not None and got[name] is not None, (step, name)
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")


# peft with checkpointing as the oracle (the methods whose peft counterpart checkpoints on CPU: not prefix tuning,
# which peft refuses; not BOFT, whose peft kernel is CUDA-only; not X-LoRA / mixed, whose peft layers get their
# scalings / adapters from hooks that are gone when backward recomputes)
PEFT_METHODS = ["lora", "dora", "rslora", "loha", "lokr", "oft", "ia3", "adaption_prompt", "prompt_tuning",
                "p_tuning", "adalora"]


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_gradient_checkpointing_matches_peft(method, use_reentrant, experts):
    base = _base(method)
    gc_kwargs = {"use_reentrant": use_reentrant}
    ours = _build(method, base, gc_kwargs, experts)
    theirs = _build(method, base, gc_kwargs, experts, lib=peft)
    # in-memory names agree but for LLaMA-Adapter's, which are per adapter in fastpeft (`adaption_gate.default`)
    mine = {n.removesuffix(".default"): p for n, p in ours.named_parameters() if p.requires_grad}
    other = {n.removesuffix(".default"): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == other.keys()
    with torch.no_grad():
        for n, p in other.items():
            p.copy_(mine[n])
    got, _ = _train(ours)
    want, _ = _train(theirs)
    for step, (w, g) in enumerate(zip(want, got)):
        w = {n.removesuffix(".default"): v for n, v in w.items()}
        g = {n.removesuffix(".default"): v for n, v in g.items()}
        for name in w:
            assert w[name] is not None and g[name] is not None, (step, name)
            torch.testing.assert_close(g[name], w[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")


def test_prefix_tuning_checkpointing_leaves_layers_and_generation_as_they_were():
    """The checkpointed layers keep the prefix cache only during a training forward; generation (no grad, in
    train mode too) still gets the ordinary cache and gives the same tokens as without checkpointing."""
    base = _base("prefix_tuning")
    plain = _build("prefix_tuning", base, None, None)
    model = _build("prefix_tuning", base, {"use_reentrant": False}, None)
    layers = [m for m in model.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]
    assert layers and all(m.gradient_checkpointing for m in layers)
    _train(model, steps=1)
    _train(plain, steps=1)
    assert all("_can_checkpoint_with_cache" not in m.__dict__ for m in layers)
    batch = inputs(batch=2, seq=5)
    for m in (plain, model):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-6)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**batch, **kw), plain.generate(**batch, **kw))


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_prefix_tuning_sequence_classification_with_checkpointing(use_reentrant):
    base = tiny_llama(cls_name="LlamaForSequenceClassification")
    batch = inputs(batch=2, seq=6)
    labels = torch.tensor([0, 2])
    grads = []
    for gc_kwargs in (None, {"use_reentrant": use_reentrant}):
        model = copy.deepcopy(base)
        if gc_kwargs is not None:
            _enable(model, gc_kwargs)
        torch.manual_seed(0)
        model = fastpeft.get_peft_model(model, fastpeft.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
        model.train()
        model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and grads[1][name] is not None and g.any(), name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def test_prefix_tuning_encoder_decoder_with_checkpointing_is_refused():
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg)
    _enable(model, {"use_reentrant": False})
    with pytest.raises(ValueError, match="decoder-only"):
        fastpeft.get_peft_model(model, fastpeft.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"))


# ---- the extra checkpoint input (fastpeft.training.add_extra_checkpoint_input) --------------------------------------
# X-LoRA's scalings and prefix tuning's prefixes reach the checkpointed layers through a side channel; they go in
# as a checkpoint input, so that reentrant checkpointing (which back-propagates to its inputs only) still returns
# their gradient, and the recomputation sees the value of the forward.


def _side_channel_tensors(method, model):
    """Where `method`'s side-channel tensor will appear: a list the next forward appends it to (its grad retained)."""
    seen = []

    def keep(t):
        t.retain_grad()
        seen.append(t)

    if method == "xlora":
        classifier = model.base_model.internal_xlora_classifier
        classifier.register_forward_hook(lambda module, args, out: keep(out))
    else:  # prefix tuning with a projection: the prefix is the projection's output (not a leaf)
        model.prompt_encoder["default"].transform.register_forward_hook(lambda module, args, out: keep(out))
    return seen


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", ["xlora", "prefix_tuning_projection"])
def test_extra_checkpoint_input_gets_the_gradient_of_plain_training(method, use_reentrant, experts):
    """The side-channel tensor itself (X-LoRA's scalings, the projected prefix) gets, under checkpointing, the
    gradient it gets without."""
    base = _base(method)
    batch = inputs(batch=2, seq=8)
    grads = []
    for gc_kwargs in (None, {"use_reentrant": use_reentrant}):
        model = _build(method, base, gc_kwargs, experts)
        seen = _side_channel_tensors(method, model)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        assert len(seen) == 1 and seen[0].grad is not None
        grads.append(seen[0].grad)
    assert grads[0].any()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


class _SideChannelModel(torch.nn.Module):
    """Two layers reading one tensor from a side channel (``self.side``, as X-LoRA's layers read the scalings),
    checkpointed as transformers checkpoints its layers: ``_gradient_checkpointing_func(partial(layer, **kw), x)``."""

    def __init__(self, checkpoint=None):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.rand(4) + 0.5)
        self.side = None
        self.layer_calls = 0
        if checkpoint is not None:
            self._gradient_checkpointing_func = checkpoint

    def layer(self, x, shift):
        self.layer_calls += 1
        return torch.tanh(self.linear(x) * self.side) + shift

    def forward(self, x):
        # not a leaf, shared by the layers, its graph holding saved tensors: outside the checkpoints' inputs, the
        # first reentrant recomputation's backward would free that graph and the second fail
        self.side = self.scale.exp()
        function = functools.partial(self.layer, shift=1.0)
        try:
            for _ in range(2):
                if "_gradient_checkpointing_func" in self.__dict__:
                    x = self._gradient_checkpointing_func(function, x)
                else:
                    x = function(x)
            return x
        finally:
            self.side = None  # cleared before backward recomputes the layer, as X-LoRA's scalings are

    def capture_side(self, function):
        def run_with(side, *args, **kwargs):
            previous, self.side = self.side, side
            try:
                return function(*args, **kwargs)
            finally:
                self.side = previous

        return self.side, run_with


def _side_channel_grads(model):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    model(x).square().sum().backward()
    return {"x": x.grad, "scale": model.scale.grad, "linear": model.linear.weight.grad}


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_add_extra_checkpoint_input_returns_the_gradient_and_rebinds_the_recomputation(use_reentrant):
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    from fastpeft.training import add_extra_checkpoint_input

    want = _side_channel_grads(_SideChannelModel())
    checkpoint = functools.partial(torch_checkpoint, use_reentrant=use_reentrant)
    model = _SideChannelModel(checkpoint)
    add_extra_checkpoint_input(model, model.capture_side)
    add_extra_checkpoint_input(model, model.capture_side)  # another bound method of the same capture: no second wrap
    wrapper = model._gradient_checkpointing_func
    assert wrapper.checkpoint is checkpoint
    got = _side_channel_grads(model)
    assert model.layer_calls == 4  # each layer ran again in backward (with `side` cleared: it got the captured value)
    for name, g in want.items():
        assert g is not None and g.any() and got[name] is not None, name
        torch.testing.assert_close(got[name], g, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_add_extra_checkpoint_input_passes_through_what_it_does_not_capture():
    """A capture returning None leaves the call as it is; a non-tensor value is bound in the recomputation but is
    no checkpoint input."""
    from fastpeft.training import add_extra_checkpoint_input

    calls = []

    def checkpoint(function, *args, **kwargs):
        calls.append((function, args))
        return function(*args, **kwargs)

    holder = torch.nn.Module()
    holder._gradient_checkpointing_func = checkpoint
    add_extra_checkpoint_input(holder, lambda function: None)
    layer = functools.partial(torch.add, other=1)
    x = torch.zeros(2)
    assert torch.equal(holder._gradient_checkpointing_func(layer, x), x + 1)
    assert calls[-1] == (layer, (x,))

    bound = []
    holder._gradient_checkpointing_func = checkpoint  # as a new gradient_checkpointing_enable sets it
    add_extra_checkpoint_input(holder, lambda function: ("scalings", lambda value, *a: bound.append(value) or
                                                           function(*a)))
    assert torch.equal(holder._gradient_checkpointing_func(layer, x), x + 1)
    assert bound == ["scalings"] and calls[-1][1] == (x,)
