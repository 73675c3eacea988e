"""LoraModel.add_weighted_adapter and fastpeft.tuners.merge_utils against peft (the oracle): every combination
type on Linear / Conv1D / Embedding / Conv1d / Conv2d LoRA layers gives peft's tensors (the random dare types
bit for bit under the same seed), peft's errors, and an adapter that saves and loads like any other."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.utils import merge_utils as peft_merge  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.tuners import merge_utils  # noqa: E402
from fastpeft.tuners.lora.config import LoraConfig  # noqa: E402
from fastpeft.tuners.lora.model import LoraModel  # noqa: E402

from _peft_testing import close, inputs, logits, tiny_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Tiny(nn.Module):
    """One of each LoRA layer kind, all on the forward path."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 16)
        self.c1d = Conv1D(16, 12)
        self.conv1 = nn.Conv1d(16, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.pw = nn.Conv2d(6, 5, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.emb(x)
        a = torch.tanh(self.lin(h) + self.c1d(h))
        c = self.conv1(a.transpose(1, 2))
        d = self.pw(self.conv2(c.unsqueeze(-1).expand(-1, -1, -1, 3)))
        return torch.cat([self.head(a).flatten(1), d.flatten(1)], 1)


ALL = ["emb", "lin", "c1d", "conv1", "conv2", "pw", "head"]
X = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(3))


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def pair(configs: dict, base: nn.Module):
    """(peft LoraModel, fastpeft LoraModel) with the same adapters (name -> LoraConfig kwargs), same values."""
    names = list(configs)
    models = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tuner, cfg in ((peft.tuners.lora.LoraModel, peft.LoraConfig), (LoraModel, LoraConfig)):
            torch.manual_seed(0)
            m = tuner(copy.deepcopy(base), cfg(**copy.deepcopy(configs[names[0]])), names[0])
            for name in names[1:]:
                m.peft_config[name] = cfg(**copy.deepcopy(configs[name]))
                m.inject_adapter(m.model, name)
            _randomize(m, 11)
            models.append(m.eval())
    theirs, ours = models
    st, so = theirs.state_dict(), ours.state_dict()
    assert set(st) == set(so)
    assert all(torch.equal(st[k], so[k]) for k in st)
    return theirs, ours


def adapter_tensors(model, name):
    return {k: v for k, v in model.state_dict().items() if f".{name}." in k or k.endswith(f".{name}")}


def assert_same_adapter(theirs, ours, name, exact=False, tol=1e-5):
    st, so = adapter_tensors(theirs, name), adapter_tensors(ours, name)
    assert st and set(st) == set(so), sorted(set(st) ^ set(so))
    for k in st:
        assert st[k].shape == so[k].shape, k
        if exact:
            assert torch.equal(st[k], so[k]), k
        else:
            close(st[k], so[k], tol)
    assert theirs.peft_config[name].r == ours.peft_config[name].r
    assert theirs.peft_config[name].lora_alpha == ours.peft_config[name].lora_alpha
    assert set(theirs.peft_config[name].target_modules) == set(ours.peft_config[name].target_modules)


def both(theirs, ours, *args, seed=7, **kwargs):
    for m in (theirs, ours):
        torch.manual_seed(seed)
        m.add_weighted_adapter(*args, **kwargs)


SAME_RANK = {"a": dict(r=4, lora_alpha=8, target_modules=ALL), "b": dict(r=4, lora_alpha=3, target_modules=ALL)}
MIXED = {
    "a": dict(r=4, lora_alpha=8, target_modules=ALL),
    "b": dict(r=2, lora_alpha=5, target_modules=["lin", "c1d", "emb", "conv2"]),
}


# ---- merge_utils ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_merge_utils_equal_peft(fn, sign):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = torch.tensor([0.7, -0.4, 1.2])
    kwargs = {} if fn == "task_arithmetic" else {"density": 0.4}
    if fn in ("ties", "dare_ties"):
        kwargs["majority_sign_method"] = sign
    torch.manual_seed(5)
    expected = getattr(peft_merge, fn)(tensors, weights, **kwargs)
    torch.manual_seed(5)
    got = getattr(merge_utils, fn)(tensors, weights, **kwargs)
    assert torch.equal(expected, got)


def test_prune_helpers():
    t = torch.tensor([[0.1, -3.0], [2.0, -0.5]])
    assert torch.equal(merge_utils.prune(t, 0.5, "magnitude"), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))
    with pytest.warns(UserWarning, match="no pruning"):
        assert merge_utils.prune(t, 1.0, "magnitude") is t
    with pytest.raises(ValueError, match="Density should be >= 0"):
        merge_utils.prune(t, -0.1, "magnitude")
    with pytest.raises(ValueError, match="Unknown method"):
        merge_utils.prune(t, 0.5, "nope")
    with pytest.raises(ValueError, match="density"):
        merge_utils.ties([t, t], torch.ones(2), None)
    stacked = torch.tensor([[1.0, -1.0], [-3.0, -1.0], [1.0, 2.0]])
    assert torch.equal(merge_utils.calculate_majority_sign_mask(stacked, "frequency"),
                       peft_merge.calculate_majority_sign_mask(stacked, "frequency"))
    with pytest.raises(RuntimeError, match="Unimplemented"):
        merge_utils.calculate_majority_sign_mask(stacked, "median")
    # DARE's contract: kept with probability density, rescaled so that the expectation is unchanged
    torch.manual_seed(0)
    big = torch.ones(200_000)
    pruned = merge_utils.random_pruning(big, 0.3, rescale=True)
    assert torch.equal(pruned.unique(), torch.tensor([0.0, 1 / 0.3]))
    assert abs((pruned != 0).float().mean().item() - 0.3) < 0.01 and abs(pruned.mean().item() - 1) < 0.03


# ---- add_weighted_adapter vs peft ------------------------------------------------------------------


@pytest.mark.parametrize("combination", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_factor_combinations_equal_peft(combination, sign):
    theirs, ours = pair(SAME_RANK, Tiny())
    kwargs = dict(combination_type=combination)
    if combination != "linear":
        kwargs["density"] = 0.5
    if "ties" in combination:
        kwargs["majority_sign_method"] = sign
    both(theirs, ours, ["a", "b"], [0.8, -0.6], "ab", **kwargs)
    assert_same_adapter(theirs, ours, "ab", exact=True)  # dare: the same masks under the same seed
    theirs.set_adapter("ab")
    ours.set_adapter("ab")
    close(theirs(X), ours(X), 1e-5)


def test_cat_equal_peft_and_exact():
    theirs, ours = pair(MIXED, Tiny())
    both(theirs, ours, ["a", "b"], [0.8, -0.6], "ab", combination_type="cat")
    assert_same_adapter(theirs, ours, "ab", exact=True)
    assert ours.peft_config["ab"].r == 6
    lin = ours.model.lin  # cat is exact: delta = sum_i w_i delta_i
    close(lin.get_delta_weight("ab"), 0.8 * lin.get_delta_weight("a") - 0.6 * lin.get_delta_weight("b"), 1e-5)


@pytest.mark.parametrize("combination", ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"])
def test_svd_combinations_equal_peft(combination):
    # peft's svd path handles Conv2d but not Conv1d (it runs a batched SVD on the 3-D delta), so conv1 is left out
    targets = [t for t in ALL if t != "conv1"]
    configs = {"a": dict(r=4, lora_alpha=8, target_modules=targets),
               "b": dict(r=2, lora_alpha=5, target_modules=["lin", "c1d", "emb", "pw"])}  # layers without b: a only
    theirs, ours = pair(configs, Tiny())
    kwargs = dict(combination_type=combination)
    if combination != "svd":
        kwargs["density"] = 0.6
    both(theirs, ours, ["a", "b"], [0.8, -0.6], "ab", svd_rank=3, **kwargs)
    assert_same_adapter(theirs, ours, "ab", tol=1e-4)  # SVD factors: equal up to float rounding
    theirs.set_adapter("ab")
    ours.set_adapter("ab")
    close(theirs(X), ours(X), 1e-4)


def test_svd_options_equal_peft():
    targets = [t for t in ALL if t != "conv1"]
    configs = {"a": dict(r=4, lora_alpha=8, target_modules=targets),
               "b": dict(r=4, lora_alpha=2, target_modules=targets)}
    theirs, ours = pair(configs, Tiny())
    both(theirs, ours, ["a", "b"], [1.0, 0.5], "c", svd_clamp=0.9, svd_full_matrices=False)
    assert_same_adapter(theirs, ours, "c", tol=1e-4)
    assert ours.peft_config["c"].r == 4  # default svd_rank: the largest rank


def test_svd_on_conv1d_is_a_truncation():
    """peft cannot svd-merge Conv1d adapters; fastpeft flattens them like Conv2d: full rank -> exact."""
    configs = {"a": dict(r=2, lora_alpha=4, target_modules=["conv1"]),
               "b": dict(r=2, lora_alpha=2, target_modules=["conv1"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = LoraModel(Tiny(), LoraConfig(**configs["a"]), "a")
        ours.peft_config["b"] = LoraConfig(**configs["b"])
        ours.inject_adapter(ours.model, "b")
    _randomize(ours, 3)
    ours.add_weighted_adapter(["a", "b"], [1.0, -2.0], "ab", combination_type="svd", svd_rank=4)
    conv = ours.model.conv1
    close(conv.get_delta_weight("ab"), conv.get_delta_weight("a") - 2 * conv.get_delta_weight("b"), 1e-4)


def test_single_adapter_uses_linear_and_llama_outputs():
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    theirs, ours = pair({"a": cfg}, tiny_llama())
    both(theirs, ours, ["a"], [0.5], "scaled", combination_type="svd")  # one adapter: always linear
    assert_same_adapter(theirs, ours, "scaled", exact=True)
    batch = inputs()
    theirs.set_adapter("scaled")
    ours.set_adapter("scaled")
    close(logits(theirs, batch), logits(ours, batch), 1e-5)


def test_peft_model_delegates_and_new_adapter_round_trips(tmp_path):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base = tiny_llama()
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg), adapter_name="a")
    model.add_adapter("b", fastpeft.LoraConfig(**cfg))
    _randomize(model, 5)
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    assert "mix" in model.peft_config
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)
    model.set_adapter("mix")
    batch = inputs()
    expected = logits(model, batch)
    model.save_pretrained(str(tmp_path), selected_adapters=["mix"])
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "mix"))
    close(expected, logits(loaded, batch), 1e-5)
    # ... and peft loads it with the same outputs
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "mix"))
    close(expected, logits(theirs, batch), 1e-5)


def test_existing_name_is_a_no_op():
    theirs, ours = pair(SAME_RANK, Tiny())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "b", combination_type="linear")
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


# ---- errors -----------------------------------------------------------------------------------------


def _raises_like_peft(theirs, ours, exc, match, *args, peft_too=True, **kwargs):
    if peft_too:
        with pytest.raises(exc, match=match):
            theirs.add_weighted_adapter(*args, **kwargs)
    with pytest.raises(exc, match=match):
        ours.add_weighted_adapter(*args, **kwargs)
    assert "new" not in ours.peft_config


def test_errors():
    theirs, ours = pair(MIXED, Tiny())
    _raises_like_peft(theirs, ours, ValueError, "Adapter nope does not exist", ["a", "nope"], [1, 1], "new")
    _raises_like_peft(theirs, ours, ValueError, "same r value", ["a", "b"], [1, 1], "new", combination_type="linear")
    _raises_like_peft(theirs, ours, ValueError, "same r value", ["a", "b"], [1, 1], "new", combination_type="ties",
                      density=0.5)
    _raises_like_peft(theirs, ours, ValueError, "Invalid combination_type", ["a", "b"], [1, 1], "new",
                      combination_type="average")
    # fastpeft only (peft zips silently): one weight per adapter
    _raises_like_peft(theirs, ours, ValueError, "weights", ["a", "b"], [1.0], "new", peft_too=False)
    # density missing for a pruning type: peft fails with a TypeError deep inside, fastpeft says what is missing
    _raises_like_peft(theirs, ours, ValueError, "density", ["a", "b"], [1, 1], "new", combination_type="ties_svd",
                      peft_too=False)

    str_targets = {"a": dict(r=4, target_modules=ALL), "b": dict(r=4, target_modules="lin")}
    theirs, ours = pair(str_targets, Tiny())
    _raises_like_peft(theirs, ours, ValueError, "same target modules type", ["a", "b"], [1, 1], "new",
                      combination_type="linear")


def test_regex_targets_are_joined():
    configs = {"a": dict(r=4, target_modules=r".*lin"), "b": dict(r=4, target_modules=r".*head")}
    theirs, ours = pair(configs, Tiny())
    both(theirs, ours, ["a", "b"], [1.0, 1.0], "ab", combination_type="linear")
    assert ours.peft_config["ab"].target_modules == theirs.peft_config["ab"].target_modules == "(.*lin)|(.*head)"
    assert_same_adapter(theirs, ours, "ab", exact=True)
