"""Activated LoRA (aLoRA): ``LoraConfig(alora_invocation_tokens=[...])`` (peft's semantics).

An aLoRA adapter acts only on the tokens from the *last* occurrence of its invocation token sequence onward, so the
KV cache of everything before it is the base model's and can be reused. Per row of a batch, the "offset" is the
number of tokens, counted from the end of that forward's input, that the adapter acts on (the length from the start
of the invocation sequence to the end); ``None`` (sequence not found) means the row gets the base output only. In a
forward over T new tokens (e.g. a decoding step with a KV cache, T=1) the offset is clipped to T, so once the
invocation has been seen every new token is adapted.

- :func:`calculate_alora_offsets` finds the offsets in ``input_ids`` (peft's ``calculate_alora_offsets``);
  ``PeftModelForCausalLM.forward`` / ``generate`` call :func:`offsets_for_forward` / :func:`offsets_for_generate`
  unless ``alora_offsets`` is passed explicitly.
- ``LoraModel._enable_peft_forward_hooks`` wraps the offsets in one :class:`AloraOffsets` and hands it to the LoRA
  Linear layers that hold an aLoRA adapter through a forward pre-hook (peft's mechanism).
- A layer adds ``B(A(drop(x))) * s`` to the selected tokens only (:func:`masked_delta`): the rows are gathered,
  the adapter runs on them, the result is scattered back; nothing vocabulary- or d x d-sized is built. In a
  mixed-adapter batch the masked-out tokens of aLoRA rows get adapter index -1 in the segmented op
  (:func:`mixed_token_index`).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

BASE = "__base__"


def invocation_tokens(config) -> Optional[list]:
    """The config's invocation tokens, or None when it is not an aLoRA config (peft: an empty list is plain LoRA)."""
    tokens = getattr(config, "alora_invocation_tokens", None)
    return list(tokens) if tokens else None


def validate_invocation_tokens(tokens) -> None:
    """LoraConfig's check of ``alora_invocation_tokens``: a list of token ids (ints >= 0); empty = plain LoRA."""
    if tokens is None:
        return
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (list, tuple)):
        raise TypeError(
            f"LoraConfig.alora_invocation_tokens must be a list of token ids (ints), got {type(tokens).__name__}; "
            "tokenize the invocation string, e.g. tokenizer.encode(invocation_string, add_special_tokens=False)"
        )
    if len(tokens) == 0:
        # a warning, not an error: peft accepts [] (and runs plain LoRA), so configs saved with it must load
        warnings.warn(
            "LoraConfig.alora_invocation_tokens is empty, so the adapter runs as plain (always active) LoRA, as in "
            "peft; pass the token ids of the invocation string for aLoRA, or None"
        )
        return
    bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, int) or t < 0]
    if bad:
        raise ValueError(
            f"LoraConfig.alora_invocation_tokens must contain token ids (ints >= 0), got {bad[:5]}; tokenize the "
            "invocation string, e.g. tokenizer.encode(invocation_string, add_special_tokens=False)"
        )


# ---- offsets from input_ids (peft's calculate_alora_offsets / get_alora_offsets_for_forward / _for_generate) ----


def _last_match_start(row: torch.Tensor, pattern: torch.Tensor) -> int:
    """Start of the last occurrence of `pattern` in the 1-D `row`, or -1."""
    n, k = row.shape[0], pattern.shape[0]
    if k > n:
        return -1
    # windows of length k, compared at once: [n-k+1, k]
    hits = (row.unfold(0, k, 1) == pattern).all(dim=1).nonzero()
    return int(hits[-1]) if hits.numel() else -1


def calculate_alora_offsets(peft_config: dict, active_adapter: str, input_ids: torch.Tensor,
                            adapter_names: Optional[Sequence[str]] = None) -> list:
    """Per row of `input_ids` [B, T]: the number of tokens from the start of the last occurrence of the row's
    adapter's invocation sequence to the end (>= len(invocation)), or None where the sequence does not occur or the
    row's adapter is not an aLoRA (``adapter_names`` gives one adapter per row, else `active_adapter` for all)."""
    if input_ids is None:
        return []
    batch = input_ids.shape[0]
    offsets: list = [None] * batch
    patterns: dict = {}
    for i in range(batch):
        name = adapter_names[i] if adapter_names and i < len(adapter_names) else active_adapter
        if name == BASE:
            continue
        if name not in peft_config:
            warnings.warn(f"Adapter '{name}' not found in peft_config. Using base model for row {i}.")
            continue
        tokens = invocation_tokens(peft_config[name])
        if tokens is None:
            continue
        if name not in patterns:
            patterns[name] = torch.tensor(tokens, dtype=torch.long, device=input_ids.device)
        start = _last_match_start(input_ids[i], patterns[name].to(input_ids.dtype))
        if start >= 0:
            offsets[i] = input_ids.shape[1] - start
    return offsets


def alora_relevant(peft_model, adapter_names=None) -> bool:
    """Whether the active adapter, or one of the per-row `adapter_names`, is an aLoRA."""
    try:
        config = peft_model.active_peft_config
    except (AttributeError, KeyError):  # e.g. every adapter deleted: nothing is active
        config = None
    if config is not None and invocation_tokens(config):
        return True
    for name in adapter_names or ():
        if name != BASE and invocation_tokens(peft_model.peft_config.get(name)):
            return True
    return False


def offsets_for_forward(peft_model, input_ids, inputs_embeds, kwargs: dict) -> dict:
    """PeftModelForCausalLM.forward: put the offsets computed from `input_ids` into `kwargs` (in place) when the
    batch uses an aLoRA adapter and none were passed."""
    names = kwargs.get("adapter_names")
    if not alora_relevant(peft_model, names) or kwargs.get("alora_offsets") is not None:
        return kwargs
    if input_ids is None:
        if inputs_embeds is not None:
            warnings.warn(
                "Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA for this "
                "forward pass (pass `alora_offsets` explicitly to enable it)."
            )
        kwargs["alora_offsets"] = None
        return kwargs
    kwargs["alora_offsets"] = calculate_alora_offsets(
        peft_model.peft_config, peft_model.active_adapter, input_ids, adapter_names=names)
    return kwargs


def offsets_for_generate(peft_model, args: tuple, kwargs: dict) -> dict:
    """PeftModelForCausalLM.generate: the offsets from the prompt (``input_ids`` or the first positional tensor),
    fixed for the whole generation (each decoding step's new token is then adapted)."""
    names = kwargs.get("adapter_names")
    if not alora_relevant(peft_model, names) or kwargs.get("alora_offsets") is not None:
        return kwargs
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args[0]
    if input_ids is None:
        warnings.warn(
            "Cannot calculate aLoRA offsets during generate as input_ids are not available. Disabling aLoRA "
            "(pass `alora_offsets` explicitly to enable it)."
        )
        kwargs["alora_offsets"] = None
        return kwargs
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    kwargs["alora_offsets"] = calculate_alora_offsets(
        peft_model.peft_config, peft_model.active_adapter, input_ids, adapter_names=names)
    return kwargs


# ---- the offsets of one forward, as the layers use them ----


class AloraOffsets:
    """The per-row offsets of one forward / generate (ints >= 0 or None), shared by every aLoRA layer; the flat
    indices of the adapted tokens are built once per (device, batch, tokens) and cached."""

    def __init__(self, offsets):
        if isinstance(offsets, AloraOffsets):
            offsets = offsets.offsets
        if isinstance(offsets, torch.Tensor):
            if offsets.dim() != 1:
                raise ValueError(f"alora_offsets must be 1-D (one offset per row), got shape {tuple(offsets.shape)}")
            offsets = offsets.tolist()
        if isinstance(offsets, (str, bytes)) or not isinstance(offsets, (list, tuple)):
            raise TypeError("alora_offsets must be a list with one int (or None) per row of the batch, got "
                            f"{type(offsets).__name__}")
        clean = []
        for o in offsets:
            if o is None:
                clean.append(None)
                continue
            if isinstance(o, torch.Tensor) and o.numel() == 1:
                o = o.item()
            if isinstance(o, bool) or not isinstance(o, int) or o < 0:
                raise ValueError(
                    f"alora_offsets entries must be ints >= 0 (tokens from the end to adapt) or None (base model "
                    f"for that row), got {o!r}")
            clean.append(o)
        self.offsets = clean
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def _check_batch(self, batch: int) -> None:
        if len(self.offsets) != batch:
            raise ValueError(
                f"alora_offsets has {len(self.offsets)} entries but the batch has {batch} rows; pass one offset (or "
                "None) per row (beam search and num_return_sequences > 1 are not supported with aLoRA)")

    def row_mask(self, batch: int, tokens: int, device) -> torch.Tensor:
        """[batch, tokens] bool: the adapted positions (the last min(offset, tokens) of each row)."""
        key = ("mask", device, batch, tokens)
        mask = self._cache.get(key)
        if mask is None:
            self._check_batch(batch)
            off = torch.tensor([0 if o is None else min(o, tokens) for o in self.offsets], dtype=torch.long)
            mask = (torch.arange(tokens).unsqueeze(0) >= (tokens - off).unsqueeze(1)).to(device)
            self._cache[key] = mask
        return mask

    def token_index(self, lead: tuple, device):
        """The flat indices (over the leading dims `lead` = (B,) or (B, T)) of the adapted tokens; "all" when every
        token is adapted."""
        key = ("index", device, lead)
        hit = self._cache.get(key)
        if hit is None:
            if len(lead) == 1:
                batch, tokens = lead[0], 1
            elif len(lead) == 2:
                batch, tokens = lead
            else:
                raise ValueError(f"aLoRA layers take inputs of shape [batch, tokens, features] or [batch, features], "
                                 f"got leading dims {lead}")
            self._check_batch(batch)
            off = [0 if o is None else min(o, tokens) for o in self.offsets]
            if all(o == tokens for o in off):
                hit = "all"
            else:  # built on the CPU (no device sync), moved once
                off_t = torch.tensor(off, dtype=torch.long)
                mask = torch.arange(tokens).unsqueeze(0) >= (tokens - off_t).unsqueeze(1)
                hit = mask.view(-1).nonzero().squeeze(1).to(device)
            self._cache[key] = hit
        return hit


def masked_delta(layer, name: str, x: torch.Tensor, result: torch.Tensor, offsets: Optional[AloraOffsets]):
    """`result` + the aLoRA adapter `name`'s delta on the selected tokens only (peft's ALoraLinearVariant math).
    Without offsets no token is selected (the base output, with zero gradients for the adapter, as in peft)."""
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    dropout, scaling = layer.lora_dropout[name], layer.scaling[name]
    x = x.to(lora_A.weight.dtype)
    lead = tuple(result.shape[:-1])
    if offsets is None:
        sel = torch.empty(0, dtype=torch.long, device=x.device)
    else:
        sel = offsets.token_index(lead, x.device)
    if isinstance(sel, str):  # every token
        return result + (lora_B(lora_A(dropout(x))) * scaling).to(result.dtype)
    d_out = result.shape[-1]
    x_sel = x.reshape(-1, x.shape[-1]).index_select(0, sel)
    delta = lora_B(lora_A(dropout(x_sel))) * scaling
    return result.reshape(-1, d_out).index_add(0, sel, delta.to(result.dtype)).view(result.shape)


def mixed_token_index(mixed, x: torch.Tensor, alora_positions: Sequence[int], offsets: Optional[AloraOffsets]):
    """The per-token adapter index of a mixed batch (`mixed.index_for(x)`) with the tokens of aLoRA rows
    (adapters at `alora_positions` in `mixed.names`) that are not adapted set to -1 (base output); cached."""
    idx = mixed.index_for(x)
    if not alora_positions:
        return idx
    lead = tuple(x.shape[:-1])
    key = ("alora", x.device, lead, tuple(alora_positions), id(offsets))
    hit = mixed._cache.get(key)
    if hit is not None:
        return hit
    batch, tokens = (lead[0], 1) if len(lead) == 1 else lead
    if offsets is None:
        keep = torch.zeros((batch, tokens), dtype=torch.bool, device=x.device)
    else:
        keep = offsets.row_mask(batch, tokens, x.device)
    rows = mixed.rows.to(x.device)
    is_alora_row = torch.zeros_like(rows, dtype=torch.bool)
    for k in alora_positions:
        is_alora_row |= rows == k
    drop = is_alora_row.unsqueeze(1) & ~keep  # [B, T]
    hit = idx.masked_fill(drop.view(lead), -1)
    mixed._cache[key] = hit
    return hit
