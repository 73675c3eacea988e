"""Hot-swapping LoRA adapters (fastpeft.hotswap; peft's peft.utils.hotswap API): a swapped model gives the outputs
of a freshly loaded one, a prepared torch.compile'd model does not recompile when adapters of different ranks and
alphas are swapped, and incompatible adapters are refused naming the key, with the model left untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.utils.hotswap import (  # noqa: E402
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)

from _peft_testing import close, inputs, logits, randomize_adapter, tiny_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 16)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.lin(self.emb(x)))  # [b, s, 16]
        c = self.conv(h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 3))  # [b, 8, s, 3]
        return self.head(c.mean(dim=(2, 3)))


X = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(3))


def save_adapter(base, path, seed, **cfg):
    torch.manual_seed(seed)
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    randomize_adapter(model, seed=seed, scale=0.3)
    model.save_pretrained(str(path))
    return str(path)


def load(base, path):
    return fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


class CountingBackend:
    """A torch.compile backend that counts compilations (each graph it is handed) and runs the graph eagerly."""

    def __init__(self):
        self.compilations = 0

    def __call__(self, gm, example_inputs):
        self.compilations += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_hotswap_equals_fresh_load_llama(tmp_path):
    base = tiny_llama()
    batch = inputs()
    p0 = save_adapter(base, tmp_path / "a0", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    p1 = save_adapter(base, tmp_path / "a1", 2, r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    model = load(base, p0)
    before = logits(model, batch)
    hotswap_adapter(model, p1, adapter_name="default")
    close(logits(load(base, p1), batch), logits(model, batch), 1e-5)
    assert not torch.allclose(before, logits(model, batch))
    # peft's hotswap of the same checkpoint into peft's model gives the same outputs
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), p0).eval()
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    peft_hotswap(theirs, p1, adapter_name="default", torch_device="cpu")
    close(logits(theirs, batch), logits(model, batch), 1e-5)


def test_compiled_hotswap_does_not_recompile(tmp_path):
    base = Tiny().eval()
    targets = ["emb", "lin", "conv", "head"]
    p0 = save_adapter(base, tmp_path / "a0", 1, r=4, lora_alpha=8, target_modules=targets)
    p1 = save_adapter(base, tmp_path / "a1", 2, r=2, lora_alpha=5, target_modules=targets)  # smaller rank, other alpha
    p2 = save_adapter(base, tmp_path / "a2", 3, r=6, lora_alpha=6, target_modules=["lin", "conv"])  # subset
    expected = {p: load(base, p)(X) for p in (p0, p1, p2)}

    model = load(base, p0)
    prepare_model_for_compiled_hotswap(model, target_rank=6)
    assert isinstance(model.base_model.model.lin.scaling["default"], torch.Tensor)
    close(expected[p0], model(X), 1e-5)  # padding and tensor scalings change nothing
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        close(expected[p0], compiled(X), 1e-5)
        compilations = backend.compilations
        assert compilations >= 1
        for path in (p1, p2, p0):
            hotswap_adapter(compiled, path, adapter_name="default")
            close(expected[path], compiled(X), 1e-5)
        assert backend.compilations == compilations, "hot-swapping recompiled the model"

    with pytest.raises(ValueError, match="before"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8)


def test_unprepared_compiled_model_recompiles_on_new_alpha(tmp_path):
    """The counter does see recompilations: without preparation a new scaling is a new constant (as with peft)."""
    base = Tiny().eval()
    p0 = save_adapter(base, tmp_path / "a0", 1, r=4, lora_alpha=8, target_modules=["lin"])
    p1 = save_adapter(base, tmp_path / "a1", 2, r=4, lora_alpha=3, target_modules=["lin"])
    model = load(base, p0)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(X)
        compilations = backend.compilations
        hotswap_adapter(compiled, p1, adapter_name="default")
        close(load(base, p1)(X), compiled(X), 1e-5)
    assert backend.compilations > compilations


def test_incompatible_adapters_are_refused(tmp_path):
    base = Tiny().eval()
    p0 = save_adapter(base, tmp_path / "a0", 1, r=4, lora_alpha=8, target_modules=["lin", "conv"])
    other_targets = save_adapter(base, tmp_path / "t", 2, r=4, lora_alpha=8, target_modules=["lin", "head"])
    too_big = save_adapter(base, tmp_path / "big", 3, r=8, lora_alpha=8, target_modules=["lin", "conv"])
    rslora = save_adapter(base, tmp_path / "rs", 4, r=4, lora_alpha=8, use_rslora=True, target_modules=["lin", "conv"])
    model = load(base, p0)
    prepare_model_for_compiled_hotswap(model, target_rank=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(RuntimeError, match=r"unexpected keys found: .*head\.lora_A\.weight"):
        hotswap_adapter(model, other_targets, adapter_name="default")
    too_big_msg = r"(lin|conv)\.lora_A\.default\.weight.*rank 8 is larger than the target_rank 6"
    with pytest.raises(ValueError, match=too_big_msg):
        hotswap_adapter(model, too_big, adapter_name="default")
    with pytest.raises(ValueError, match="use_rslora"):
        hotswap_adapter(model, rslora, adapter_name="default")
    with pytest.raises(ValueError, match="not loaded"):
        hotswap_adapter(model, p0, adapter_name="other")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refused swap changed the model"

    with pytest.raises(ValueError, match="original rank .* larger"):
        prepare_model_for_compiled_hotswap(load(base, too_big), target_rank=4)
    with pytest.raises(ValueError, match="No adapter layers"):
        prepare_model_for_compiled_hotswap(Tiny())


def test_merged_adapter_is_refused_and_state_dict_api(tmp_path):
    base = Tiny().eval()
    p0 = save_adapter(base, tmp_path / "a0", 1, r=4, lora_alpha=8, target_modules=["lin"])
    p1 = save_adapter(base, tmp_path / "a1", 2, r=4, lora_alpha=4, target_modules=["lin"])
    model = load(base, p0)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        hotswap_adapter(model, p1, adapter_name="default")
    model.unmerge_adapter()
    # the low-level API takes model keys (adapter name included) and the new config
    fresh = load(base, p1)
    state_dict = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    hotswap_adapter_from_state_dict(model, state_dict, "default", fresh.peft_config["default"])
    close(fresh(X), model(X), 1e-6)


def test_public_paths():
    assert fastpeft.hotswap_adapter is hotswap_adapter
    assert fastpeft.prepare_model_for_compiled_hotswap is prepare_model_for_compiled_hotswap


def test_dora_hotswap_equals_fresh_load(tmp_path):
    base = Tiny().eval()
    p0 = save_adapter(base, tmp_path / "a0", 1, r=4, lora_alpha=8, use_dora=True, target_modules=["lin", "head"])
    p1 = save_adapter(base, tmp_path / "a1", 2, r=2, lora_alpha=3, use_dora=True, target_modules=["lin", "head"])
    model = load(base, p0)
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    hotswap_adapter(model, p1, adapter_name="default")
    close(load(base, p1)(X), model(X), 1e-5)
    plain = save_adapter(base, tmp_path / "plain", 3, r=4, lora_alpha=8, target_modules=["lin", "head"])
    with pytest.raises(ValueError, match="use_dora"):
        hotswap_adapter(model, plain, adapter_name="default")
