"""`TrainableTokensLayer`: a few trained rows over a frozen embedding (peft's attribute names and semantics).

Per adapter the layer holds

- `trainable_tokens_delta[name]`: the trained rows, [len(token_indices), dim] (a parameter; the checkpoint tensor),
- `trainable_tokens_original[name]`: the base rows they replace (a non-persistent buffer, for unmerging),
- `token_indices[name]`: the token ids (a plain list).

The adapted weight is the base weight with rows `token_indices` *replaced* by the trained rows (peft's semantics:
replacing, not adding, so a re-initialised resized embedding gives defined results).

Unlike peft, forward never builds a vocab x dim copy of the weight and backward never builds a dense vocab x dim
gradient:

- nn.Embedding: the base layer embeds the input as usual (frozen, no weight gradient); the positions holding a
  trained token then take their row from the trained rows (`F.embedding` over the [k, dim] tensor, so the gradient
  is [k, dim]). Tokens are looked up with `searchsorted` over the k sorted ids (no vocab-sized table).
- nn.Linear (an `lm_head` tied to the embedding, or a Linear targeted on purpose): the base layer computes all
  outputs; the k output columns of the trained tokens are recomputed from the trained rows and written in place.

Embeddings with `max_norm`, `scale_grad_by_freq` or `sparse` use peft's dense path (the rows replaced in a copy of
the weight), whose results these options define.

A layer can be *tied* to another (`tied_adapter`): it shares that layer's dicts (so the same trained rows apply
to, e.g., a tied `lm_head`) and adds nothing of its own.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BaseTunerLayer

__all__ = ["TrainableTokensLayer", "BufferDict", "check_token_indices"]


class BufferDict(nn.Module):
    """Tensors keyed by adapter name, registered as (by default non-persistent) buffers: they move with the
    module (`.to`) but are not part of the state dict (peft's BufferDict, as used by trainable tokens)."""

    def __init__(self, persistent: bool = False):
        super().__init__()
        self.persistent = persistent

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __contains__(self, key) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def values(self):
        return self._buffers.values()

    def items(self):
        return self._buffers.items()


def _rows_and_dim(base: nn.Module) -> tuple[int, int]:
    weight = base.weight
    return int(weight.shape[0]), int(weight.shape[1])


def check_token_indices(token_indices, base: nn.Module, where: str, field_name: str) -> list[int]:
    """`token_indices` as a list of ints, each a row of `base`'s weight; else ValueError naming `where` (the module)
    and `field_name` (the config field to change)."""
    if isinstance(token_indices, (int, str, bytes)) or not hasattr(token_indices, "__iter__"):
        raise ValueError(f"{field_name} for {where} must be a list of token ids, got {token_indices!r}")
    indices = list(token_indices)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise ValueError(f"{field_name} for {where} must hold integer token ids, got {bad!r}")
    if not indices:
        raise ValueError(f"{field_name} for {where} is empty: nothing would be trained; pass the ids of the tokens "
                         "to train")
    rows, _ = _rows_and_dim(base)
    out = sorted({i for i in indices if i < 0 or i >= rows})
    if out:
        raise ValueError(
            f"{field_name}: token id(s) {out} out of range for {where}, whose weight has {rows} rows (valid ids: "
            f"0..{rows - 1}). Fix {field_name}, or resize the embedding first (e.g. "
            "model.resize_token_embeddings(len(tokenizer)) after adding tokens)."
        )
    return indices


def _supported_base(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Embedding, nn.Linear))


class TrainableTokensLayer(nn.Module, BaseTunerLayer):
    """Trainable rows of selected tokens over a frozen nn.Embedding (or nn.Linear, e.g. a tied lm_head)."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None,
                 tied_adapter: Optional["TrainableTokensLayer"] = None, **kwargs) -> None:
        super().__init__()
        inner = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if isinstance(base_layer, BaseTunerLayer) or not _supported_base(inner):
            raise TypeError(
                f"trainable tokens need an nn.Embedding (or an nn.Linear such as a tied lm_head), got "
                f"{type(base_layer).__name__}; target the embedding layer instead"
            )
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        # a list keeps the tied layer out of .modules() / the state dict (it is registered where it lives)
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original = BufferDict(persistent=False)
            self.token_indices: dict[str, list[int]] = {}
        else:
            # share the tied layer's containers: the same trained rows, nothing of our own
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        if isinstance(inner, nn.Embedding):
            self.in_features, self.out_features = inner.num_embeddings, inner.embedding_dim
        else:
            self.in_features, self.out_features = inner.in_features, inner.out_features
        self._index_cache: dict[str, tuple] = {}

    @property
    def tied_adapter(self) -> Optional["TrainableTokensLayer"]:
        return self._tied_adapter[0] if self._tied_adapter else None

    # ---- adapters ----

    def update_layer(self, adapter_name: str, config=None, tied_adapter: Optional[nn.Module] = None,
                     **kwargs) -> None:
        """Add adapter `adapter_name` (token ids from `config.token_indices` or the `token_indices` keyword). A tied
        layer adds nothing: it follows the layer it is tied to."""
        if tied_adapter is not None or self.tied_adapter is not None:
            return
        token_indices = config.token_indices if config is not None else kwargs["token_indices"]
        init_weights = config.init_weights if config is not None else kwargs.get("init_weights", True)
        base = self.get_base_layer()
        token_indices = check_token_indices(token_indices, base, type(base).__name__, "token_indices")
        weight = base.weight
        self.token_indices[adapter_name] = token_indices
        with torch.no_grad():
            index = torch.tensor(token_indices, dtype=torch.long, device=weight.device)
            originals = weight.index_select(0, index).detach().clone()
        if init_weights:
            values = originals.clone()
        else:
            values = torch.randn((len(token_indices), weight.shape[1]), dtype=weight.dtype, device=weight.device)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values, requires_grad=True)
        self.trainable_tokens_original[adapter_name] = originals
        self._index_cache.pop(adapter_name, None)
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name)
        device, _ = self._base_device_dtype()
        if device is not None and adapter_name in self.trainable_tokens_original:
            original = self.trainable_tokens_original[adapter_name]
            if original.device != device and original.device.type != "meta":
                self.trainable_tokens_original[adapter_name] = original.to(device)

    def _active_token_adapters(self, adapter_names) -> list[str]:
        return [name for name in adapter_names if name in self.token_indices]

    def _check_overlapping_tokens(self, adapter_names: list[str]) -> None:
        """ValueError if two of these adapters (or an already merged one) train the same token: which of their rows
        would win is undefined (as peft)."""
        names = list(dict.fromkeys(self.merged_adapters + list(adapter_names)))
        if len(names) <= 1:
            return
        seen: set[int] = set()
        for name in names:
            indices = set(self.token_indices[name])
            if seen & indices:
                raise ValueError(
                    f"Token indices of adapter {name} are already defined and would result in undefined merging "
                    "behavior. Only disjunct token indices are currently supported."
                )
            seen |= indices

    # ---- lookup tables (k sorted ids; no vocab-sized table) ----

    def _lookup(self, adapter_name: str, device: torch.device, dtype: torch.dtype):
        """(sorted unique token ids, the delta row of each (the last occurrence wins, as index_copy), the delta row
        of the padding token or None), cached per adapter / device / id dtype."""
        indices = self.token_indices[adapter_name]
        key = (tuple(indices), device, dtype)
        cached = self._index_cache.get(adapter_name)
        if cached is not None and cached[0] == key:
            return cached[1]
        last = {token: row for row, token in enumerate(indices)}
        tokens = sorted(last)
        sorted_ids = torch.tensor(tokens, dtype=dtype, device=device)
        rows = torch.tensor([last[t] for t in tokens], dtype=torch.long, device=device)
        padding_idx = getattr(self.get_base_layer(), "padding_idx", None)
        if padding_idx is not None and padding_idx < 0:
            padding_idx += self.in_features
        pad_row = last.get(padding_idx) if padding_idx is not None else None
        value = (sorted_ids, rows, pad_row)
        self._index_cache[adapter_name] = (key, value)
        return value

    def _embed_scale(self) -> Optional[torch.Tensor]:
        """The `embed_scale` some embeddings (e.g. Gemma's) apply in forward; applied to the trained rows too."""
        base = self.get_base_layer()
        scale = getattr(base, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        warnings.warn(f"Found embed_scale attribute with shape {tuple(scale.shape)}, expected scalar. Embedding "
                      "scaling will not be applied to the trained tokens.")
        return None

    # ---- forward ----

    def get_merged_weights(self, active_adapters) -> torch.Tensor:
        """The base weight with the rows of the given adapters replaced (a new tensor, as peft; the dense path)."""
        weight = self.get_base_layer().weight
        for name in self._active_token_adapters(active_adapters):
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))
        return weight

    def _embedding_forward(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        scale = self._embed_scale()
        if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
            result = F.embedding(x, self.get_merged_weights(names), padding_idx=base.padding_idx,
                                 max_norm=base.max_norm, norm_type=base.norm_type,
                                 scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
            return result * scale.to(result.dtype) if scale is not None else result
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            sorted_ids, rows, pad_row = self._lookup(name, x.device, x.dtype)
            pos = torch.searchsorted(sorted_ids, x).clamp_(max=sorted_ids.numel() - 1)
            hit = sorted_ids[pos] == x
            delta = self.trainable_tokens_delta[name].to(base.weight.dtype)
            # the gradient reaches only the [k, dim] trained rows (the padding token's row gets none, as in peft)
            values = F.embedding(rows[pos], delta, padding_idx=pad_row)
            if scale is not None:
                values = values * scale.to(values.dtype)
            result = torch.where(hit.unsqueeze(-1), values.to(result.dtype), result)
        return result

    def _linear_forward(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        result = self.base_layer(x, *args, **kwargs)
        in_place = type(self.base_layer) is nn.Linear
        for name in names:
            sorted_ids, rows, _ = self._lookup(name, x.device, torch.long)
            delta = self.trainable_tokens_delta[name].to(base.weight.dtype).index_select(0, rows)
            bias = base.bias.index_select(0, sorted_ids) if base.bias is not None else None
            columns = F.linear(x.to(delta.dtype), delta, bias).to(result.dtype)
            # only the k output columns of the trained tokens are recomputed (no vocab x dim weight copy)
            if in_place:
                result = result.index_copy_(-1, sorted_ids, columns)
            else:
                result = result.index_copy(-1, sorted_ids, columns)
        return result

    def forward_adapters(self, x: torch.Tensor, active_adapters, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or not active_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        names = self._active_token_adapters(active_adapters)
        if not names:
            return self.base_layer(x, *args, **kwargs)
        self._check_overlapping_tokens(names)
        if isinstance(self.get_base_layer(), nn.Embedding):
            return self._embedding_forward(x, names, *args, **kwargs)
        return self._linear_forward(x, names, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward_adapters(x, self.active_adapters, *args, **kwargs)

    # ---- merging: rows are written into / restored in the base weight ----

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        self._check_overlapping_tokens(names)
        for name in names:
            self._merge_adapter(name, safe_merge)
            self.merged_adapters.append(name)

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        weight = self.get_base_layer().weight
        delta = self.trainable_tokens_delta[adapter_name].detach().to(weight)
        if safe_merge and not torch.isfinite(delta).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        index = torch.tensor(self.token_indices[adapter_name], dtype=torch.long, device=weight.device)
        with torch.no_grad():
            weight.data.index_copy_(0, index, delta)

    def _unmerge_adapter(self, adapter_name: str) -> None:
        weight = self.get_base_layer().weight
        original = self.trainable_tokens_original[adapter_name].to(weight)
        index = torch.tensor(self.token_indices[adapter_name], dtype=torch.long, device=weight.device)
        with torch.no_grad():
            weight.data.index_copy_(0, index, original)

    def __repr__(self) -> str:
        return "trainable_tokens." + super().__repr__()

    @property
    def peft_module_type(self) -> str:
        """The `module_type` peft's get_layer_status reports: peft's layer has no repr prefix."""
        return self._get_name()
