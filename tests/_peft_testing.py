"""Shared helpers for the PeftModel / checkpoint / transformers conformance tests (peft is the oracle).

Tiny transformers models are built from configs (no downloads); adapters are randomised so that they
change the outputs.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96


def tiny_llama(seed: int = 0, cls_name: str = "LlamaForCausalLM", **overrides):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        num_labels=3, **overrides,
    )
    return getattr(transformers, cls_name)(cfg).eval()


def tiny_gpt2(seed: int = 0, cls_name: str = "GPT2LMHeadModel"):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, num_labels=3,
    )
    return getattr(transformers, cls_name)(cfg).eval()


def tiny_bert(seed: int = 0, cls_name: str = "BertForSequenceClassification", num_labels: int = 3):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=num_labels, pad_token_id=0,
    )
    return getattr(transformers, cls_name)(cfg).eval()


def inputs(batch: int = 2, seq: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def randomize_adapter(model, seed: int = 123, scale: float = 0.2):
    """Give every adapter tensor (and modules_to_save copy) random values so that adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name or "modules_to_save" in name:
                if "lora_magnitude_vector" in name:
                    p.mul_(1.0 + scale * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def logits(model, batch):
    with torch.no_grad():
        out = model(**batch)
    if hasattr(out, "start_logits"):
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def make_configs(kwargs: dict):
    """(peft LoraConfig, fastpeft LoraConfig) built from the same keyword arguments."""
    import fastpeft

    return peft.LoraConfig(**copy.deepcopy(kwargs)), fastpeft.LoraConfig(**copy.deepcopy(kwargs))


def read_config(path: str) -> dict:
    with open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f)


def read_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def safetensors_metadata(path: str):
    from safetensors import safe_open

    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as f:
        return f.metadata()


VERSION_FIELDS = {"peft_version"}


# fields peft holds as sets: written as lists in arbitrary (hash) order, so compared as sets
SET_FIELDS = {"target_modules", "exclude_modules"}


def comparable_config(d: dict) -> dict:
    out = {k: v for k, v in d.items() if k not in VERSION_FIELDS}
    for k in SET_FIELDS:
        if isinstance(out.get(k), list):
            out[k] = sorted(out[k])
    return out


def seeded_pair(peft_tuner, peft_config, our_tuner, our_config, base, adapter_name="default", seed=0):
    """(peft model, fastpeft model): each tuner class on its own copy of `base`, built under the same seed.
    Their state dicts must match in keys, shapes, dtypes and (same RNG use) values."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        theirs = peft_tuner(copy.deepcopy(base), peft_config, adapter_name)
        torch.manual_seed(seed)
        ours = our_tuner(copy.deepcopy(base), our_config, adapter_name)
    st, so = theirs.state_dict(), ours.state_dict()
    assert list(st) == list(so), sorted(set(st) ^ set(so))
    for k in st:
        assert (st[k].shape, st[k].dtype) == (so[k].shape, so[k].dtype), k
        assert torch.equal(st[k], so[k]), f"{k}: initialisation differs from peft's under the same seed"
    return theirs, ours


def close(a, b, tol=1e-5):
    """max |a - b| <= tol * max(1, max |a|) (shapes equal; float32 comparison)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return
    scale = max(1.0, a.abs().max().item())
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol * scale, f"max abs difference {err:.3g} > {tol * scale:.3g}"


class FakeFbdCuda:
    """peft's fbd_cuda extension in plain PyTorch: blocks [N, D, H, H] -> block-diagonal [N, D*H, D*H]."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks.unbind(0)])]

    @staticmethod
    def backward(grad, blocks):
        n, d, h, _ = blocks.shape
        diagonal = torch.diagonal(grad.reshape(n, d, h, d, h), dim1=1, dim2=3)  # [N, H, H, D]
        return [diagonal.permute(0, 3, 1, 2).contiguous()]
