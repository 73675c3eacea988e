"""torch.compile(fullgraph=True) of every adapter layer type: one graph, no graph breaks, no recompiles on a
second call with the same shapes, and the same outputs and gradients (input and trainable adapter weights) as
eager, in training mode with every method's dropout on, in float32 and bfloat16.

Covered: LoRA (+ rsLoRA) and DoRA on Linear and Conv2d, QLoRA / QDoRA (on LinearNF4); LoHa, LoKr, OFT (+ COFT),
BOFT and IA³ on Linear and Conv2d; eval mode with the merged / unmerged / disable_adapter states; LyCORIS
module dropout; the fastpeft.nn drop-in layers.

Backends: LoRA + QLoRA (what users compile most) go through the default inductor backend, in float32 training
(one graph: inductor's C++ compile costs seconds per graph on a small CPU). Everything else, bfloat16 LoRA /
QLoRA included, uses backend="aot_eager": graph breaks and recompiles are dynamo's (independent of the backend),
and aot_eager still runs AOTAutograd (fake tensors, functionalisation, the joint forward/backward graph).

Randomness: inductor normally replaces torch's RNG ops with its own generator, so the checks run under
`fallback_random=True` (inductor then draws with torch's generator, as eager does) to compare dropout masks
exactly; `test_inductor_dropout_without_fallback_random` checks the default setting too.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import fastpeft
from fastpeft import BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, get_peft_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


class Net(nn.Module):
    """A Conv2d whose output pixels are tokens for two Linear layers (every target kind in one graph). With
    x [2, 8, 4, 4] the Linears see 32 rows: `a` (32 outputs) as many rows as outputs, `b` (8 outputs) more
    rows than outputs, so OFT / BOFT run both their rotate-the-input and rotate-the-weight paths. For the LoRA
    family `a` is quantised to NF4 first: one model holds a LoRA Conv2d, a QLoRA layer and a LoRA Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # [N, H*W, 8]
        return self.b(torch.relu(self.a(h)))


ALL = ["conv", "a", "b"]
# Init weights that are not the identity / zero, so that every adapter changes outputs and gradients. Every
# dropout is on. (A LyCORIS module dropout that drops an adapter makes the compiled RNG stream differ from eager's
# from then on, see LycorisLayer._module_kept; with these seeds none is dropped in the train checks.)
CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.1, use_rslora=True,
                       init_lora_weights=False),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.1, use_dora=True,
                       init_lora_weights=False),
    "loha": LoHaConfig(r=4, alpha=8, target_modules=ALL, rank_dropout=0.2, module_dropout=0.1, init_weights=False),
    "lokr": LoKrConfig(r=4, alpha=8, target_modules=ALL, rank_dropout=0.2, module_dropout=0.1, init_weights=False,
                       rank_dropout_scale=True),
    "oft": OFTConfig(r=0, oft_block_size=4, target_modules=ALL, module_dropout=0.25, coft=True, eps=1.0,
                     init_weights=False),
    "boft": BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=ALL, boft_dropout=0.25,
                       init_weights=False),
    "ia3": IA3Config(target_modules=ALL, feedforward_modules=["b"], init_ia3_weights=False),
}


def build(method: str, dtype: torch.dtype = torch.float32):
    """(PeftModel, input) for `method` in `dtype`; LoRA / DoRA with `a` in NF4 (QLoRA / QDoRA)."""
    torch.manual_seed(0)
    base = Net()
    if method in ("lora", "dora"):
        fastpeft.quantize_model(base, compute_dtype=None, skip_modules=("b",), progress=False)
    model = get_peft_model(base, copy.deepcopy(CONFIGS[method])).to(dtype)
    return model, torch.randn(2, 8, 4, 4, dtype=dtype)


def forward_backward(model, x, params, seed=7):
    """[output, grad x, grad of each of `params`] of a fixed random projection of model(x) (eval: [output])."""
    training = model.training
    x = x.detach().clone().requires_grad_(training)
    torch.manual_seed(seed)
    out = model(x)
    if not training:
        return [out.detach()]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    loss = (out.float() * weights).sum()
    inputs = [x, *params]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def assert_close(expected, got, tol, what=""):
    assert len(expected) == len(got)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert e.shape == g.shape and e.dtype == g.dtype, (what, i)
        scale = max(1.0, e.float().abs().max().item())
        err = (e.float() - g.float()).abs().max().item()
        assert err <= tol * scale, f"{what} tensor {i}: max abs difference {err:.3g} > {tol * scale:.3g}"


def compile_and_compare(model, x, backend, tol, seed=7):
    """Compile `model` with fullgraph=True and the counting `backend`; check one graph, no graph break, no recompile
    on a second call, and the eager outputs and gradients. Returns the compiled call's [output, grad x, grads...]."""
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params or not model.training
    # COFT projects its weights in place in every forward: each run starts from the same weights
    state = copy.deepcopy(model.state_dict())
    with inductor_config.patch(fallback_random=True):
        got = forward_backward(compiled, x, params, seed)
        assert counter.frame_count == 1
        model.load_state_dict(state)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = forward_backward(compiled, x, params, seed)
    assert counter.frame_count == 1, "the second call with the same shapes recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    model.load_state_dict(state)
    expected = forward_backward(model, x, params, seed)
    assert_close(expected, got, tol, "compiled vs eager")
    assert_close(expected, again, tol, "second compiled call vs eager")
    return got


# ---- LoRA / QLoRA: inductor ----------------------------------------------------------------------


def test_lora_qlora_inductor_train():
    """LoRA (rsLoRA, dropout) on a Conv2d and a Linear and QLoRA on an NF4 layer, one inductor graph (forward and
    backward), in training mode."""
    model, x = build("lora")
    model.train()
    types = {type(model.base_model.model.get_submodule(n)).__name__ for n in ALL}
    assert types == {"Conv2d", "Linear4bit", "Linear"}
    # one compile worker: no subprocess pool to start for a single small graph
    with inductor_config.patch(compile_threads=1):
        compile_and_compare(model, x, "inductor", TOL[torch.float32])


# ---- every method in training mode: aot_eager ----------------------------------------------------


TRAIN_CASES = [(m, d) for m in CONFIGS for d in ("fp32", "bf16") if (m, d) != ("lora", "fp32")]  # that one: inductor


@pytest.mark.parametrize("method,dtype", TRAIN_CASES, ids=[f"{m}-{d}" for m, d in TRAIN_CASES])
def test_methods_aot_eager_train(method, dtype):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model, x = build(method, dtype)
    model.train()
    compile_and_compare(model, x, "aot_eager", TOL[dtype])


@pytest.mark.parametrize("method", ["boft", "loha"])
def test_dropout_draws_without_graph_break(method):
    """Without fullgraph, dynamo would quietly split the graph where fullgraph=True may instead capture a scalar
    (e.g. `.item()` of a drawn index): torch._dynamo.explain sees one graph, no break, in training mode."""
    model, x = build(method)
    model.train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


# ---- adapter states ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(CONFIGS))
def test_merged_unmerged_disabled(method):
    """One compiled model (eval) through the states unmerged -> disabled -> unmerged -> merged -> (merged and
    disabled: the forward unmerges first, as peft's; for QLoRA that re-quantises inside the graph) -> unmerged:
    each new state compiles one graph (its guards fail), a state seen before reuses its graph, and every call
    matches an eager twin taken through the same states."""
    model, x = build(method)
    model.eval()
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)

    def check(graphs):
        with torch.no_grad():
            got, expected = compiled(x), twin(x)
        assert_close([expected], [got], 1e-5)
        assert counter.frame_count == graphs
        return got

    def disabled():
        stack = contextlib.ExitStack()
        for m in (model, twin):
            stack.enter_context(m.disable_adapter())
        return stack

    unmerged = check(1)
    with disabled():
        check(2)
    check(2)
    for m in (model, twin):
        m.merge_adapter()
    check(3)
    for _ in range(2):  # merged + disabled: the forward unmerges (in the graph) and runs the base layer
        with disabled():
            check(4)
        assert not any(getattr(m, "merged", False) for m in model.modules())
        restored = check(4)
        if method not in ("lora", "dora"):  # (QLoRA's merge/unmerge re-quantises: lossy, checked against the twin)
            assert_close([unmerged], [restored], 1e-5)  # the unmerged weights are back
        for m in (model, twin):
            m.merge_adapter()
        check(4)
    assert not counters["graph_break"], dict(counters["graph_break"])


# ---- LyCORIS module dropout -------------------------------------------------------------------------


def test_lycoris_module_dropout_drops_under_compile():
    """A dropped adapter (module_dropout=1: always) adds nothing under compile either: the draw cannot branch
    there, so it masks the adapter's contribution (and its gradient) instead (conv: folded into the weight)."""
    torch.manual_seed(0)
    config = LoHaConfig(r=4, target_modules=ALL, module_dropout=1.0, rank_dropout=0.5, init_weights=False)
    model = get_peft_model(Net(), config).train()
    x = torch.randn(2, 8, 4, 4)
    out, _, *grads = compile_and_compare(model, x, "aot_eager", 1e-5)
    with model.disable_adapter():
        base = model(x)
    assert torch.equal(out, base)
    assert all(not g.any() for g in grads)


# ---- drop-in layers, inductor's own RNG -----------------------------------------------------------


def test_nn_dropin_layers():
    """fastpeft.nn's LoraLinear (DoRA) and LoraLinearNF4 layers compiled on their own, no wrapper model."""
    from fastpeft.nn import LinearNF4, LoraLinear, LoraLinearNF4

    torch.manual_seed(0)
    model = nn.Sequential(
        LoraLinear.from_linear(nn.Linear(64, 64), r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True,
                               init_lora_weights=False),
        nn.GELU(),
        LoraLinearNF4.from_linear(LinearNF4.from_linear(nn.Linear(64, 32)), r=4, lora_alpha=8, lora_dropout=0.1,
                                  init_lora_weights=False),
    ).train()
    compile_and_compare(model, torch.randn(3, 64), "aot_eager", 1e-5)


def test_lora_first_forward_compiled_does_not_recompile(monkeypatch):
    """In a process whose first LoRA forward is a compiled one, fastpeft.ops is already imported by then (the
    layer imports it when built), so the second call does not recompile on a changed module global."""
    from fastpeft.nn import LoraLinear
    from fastpeft.tuners.lora import layer as lora_layer

    monkeypatch.setattr(lora_layer, "_ops_module", None)
    layer = LoraLinear.from_linear(nn.Linear(16, 8), r=2, init_lora_weights=False)
    compile_and_compare(layer.eval(), torch.randn(3, 16), "aot_eager", 1e-5)


def test_inductor_dropout_without_fallback_random():
    """With inductor's default RNG the LoRA dropout seed is drawn by inductor's generator (other numbers than
    eager's), seeded by torch.manual_seed all the same: one graph, reproducible, and the mask really drops."""
    from fastpeft.nn import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear.from_linear(nn.Linear(16, 8), r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    with torch.no_grad(), inductor_config.patch(compile_threads=1):
        torch.manual_seed(1)
        first = compiled(x)
        torch.manual_seed(1)
        second = compiled(x)
        no_dropout = layer.eval()(x)
    assert counter.frame_count == 1 and not counters["graph_break"]
    assert torch.equal(first, second)
    assert not torch.allclose(first, no_dropout)
