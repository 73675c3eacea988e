"""Mixed-adapter batches for LoRA: ``model(..., adapter_names=[...])``, one adapter per row (peft's semantics).

``LoraModel._enable_peft_forward_hooks`` checks the names once, builds one :class:`MixedBatch` (the distinct
adapters in order of first use and a row -> adapter index tensor) and hands it to every LoRA layer through a
forward pre-hook, as peft does with the list of names. Each layer adds the delta of
:func:`fastpeft.ops.segmented_lora` (rows grouped by adapter, shrink then expand) to its base output; the
per-token index on the device is built once per forward and input shape and shared by every layer.
modules_to_save and trainable-tokens wrappers get the same hook and run each adapter's rows through that
adapter's copy / token rows (:func:`mixed_aux_forward`, peft's ``_mixed_batch_forward``).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

BASE = "__base__"


class MixedBatch:
    """The per-row adapters of one forward: ``names`` (distinct, base excluded) and ``rows`` [B] int64 CPU
    (an index into ``names``, -1 for ``"__base__"``)."""

    def __init__(self, adapter_names: Sequence[str]):
        if isinstance(adapter_names, str) or not all(isinstance(a, str) for a in adapter_names):
            raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
        self.adapter_names = list(adapter_names)
        self.names: list[str] = []
        pos: dict[str, int] = {}
        idx = []
        for a in self.adapter_names:
            if a == BASE:
                idx.append(-1)
                continue
            if a not in pos:
                pos[a] = len(self.names)
                self.names.append(a)
            idx.append(pos[a])
        self.rows = torch.tensor(idx, dtype=torch.int64)
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.adapter_names)

    def index_for(self, x: torch.Tensor) -> torch.Tensor:
        """int64 index shaped like x's leading dims on x's device (rows repeated over the sequence), cached."""
        lead = tuple(x.shape[:-1])
        key = (x.device, lead)
        idx = self._cache.get(key)
        if idx is None:
            rows = self.rows.to(x.device)
            idx = rows.view(-1, *([1] * (len(lead) - 1))).expand(lead).contiguous() if lead else rows
            self._cache[key] = idx
        return idx


def check_layer_args(layer, x: torch.Tensor, mixed: MixedBatch) -> None:
    """peft's per-layer checks for adapter_names (length, merged adapters, DoRA)."""
    if len(x) != len(mixed):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(mixed)} and {len(x)} respectively."
        )
    if layer.merged:
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first.")
    for name in mixed.names:
        if name in layer.lora_magnitude_vector:
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")


def mixed_linear_forward(layer, x: torch.Tensor, mixed: MixedBatch, *args, alora_offsets=None,
                         **kwargs) -> torch.Tensor:
    """LoRA Linear over a mixed batch: base(x) + segmented_lora(x, per-row adapters). The rows of aLoRA adapters
    get their adapter on the tokens `alora_offsets` selects only (the others: index -1, the base output)."""
    from ... import ops

    result = layer.base_layer(x, *args, **kwargs)
    op_args = _layer_args(layer, mixed.names, x.device)
    if op_args is None:  # no adapter of the batch on this layer
        return result
    dtype, in_f, out_f, lora_A, lora_B, scalings = op_args
    index = mixed.index_for(x)
    alora_tokens = getattr(layer, "alora_invocation_tokens", None)
    if alora_tokens:
        alora_positions = [k for k, n in enumerate(mixed.names) if n in alora_tokens]
        if alora_positions:
            from .alora import AloraOffsets, mixed_token_index

            if alora_offsets is not None and not isinstance(alora_offsets, AloraOffsets):
                alora_offsets = AloraOffsets(alora_offsets)
            index = mixed_token_index(mixed, x, alora_positions, alora_offsets)
    delta = ops._segmented_lora_checked(x.to(dtype), lora_A, lora_B, scalings, index, in_f, out_f,
                                        check_range=False)
    return result + delta.to(result.dtype)


def _stamp(layer, names: list) -> list:
    """What the cached op arguments depend on, per adapter: its parameters (identity, in-place version,
    storage) and scaling. Plain dict reads (no nn.Module attribute lookups): O(n) but cheap."""
    la, lb, sc = layer.lora_A._modules, layer.lora_B._modules, layer.scaling
    out = []
    for n in names:
        ma = la.get(n)
        if ma is None:
            out.append(None)
            continue
        a, b = ma._parameters["weight"], lb[n]._parameters["weight"]
        out.append((id(a), a._version, a.data_ptr(), a.dtype, id(b), b._version, b.data_ptr(), sc[n]))
    return out


def _layer_args(layer, names: list, device):
    """(dtype, in, out, lora_A, lora_B, scalings) for the op, in the order of `names` (None when no adapter of
    `names` is on this layer); cached on the layer per names and revalidated by `_stamp`, so generate's steps
    and repeated batches skip rebuilding them."""
    key = (tuple(names), device)
    cache = layer.__dict__.setdefault("_fastpeft_mixed_args", {})
    stamp = _stamp(layer, names)
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    present = [n for n, st in zip(names, stamp) if st is not None]
    if not present:
        args = None
    else:
        for n in present:
            if layer.lora_bias.get(n, False):
                raise NotImplementedError("fastpeft: `adapter_names` with lora_bias=True adapters is not supported")
        first = layer.lora_A[present[0]].weight
        dtype, in_f = first.dtype, first.shape[1]
        out_f = layer.lora_B[present[0]].weight.shape[0]
        lora_A, lora_B, scalings = [], [], []
        for n, st in zip(names, stamp):
            if st is not None:
                a = layer.lora_A[n].weight
                lora_A.append(a.detach().to(dtype) if a.dtype != dtype else a)
                lora_B.append(_b_for_kernel(layer, n, dtype, device))
                scalings.append(float(st[-1]))
            else:  # an adapter this layer lacks: rank 0, its rows get the base output only (as in peft)
                lora_A.append(torch.empty((0, in_f), dtype=dtype, device=device))
                lora_B.append(torch.empty((out_f, 0), dtype=dtype, device=device))
                scalings.append(0.0)
        args = (dtype, in_f, out_f, lora_A, lora_B, scalings)
    if len(cache) > 8:
        cache.clear()
    cache[key] = (stamp, args)
    return args


def _b_for_kernel(layer, name: str, dtype, device) -> torch.Tensor:
    """lora_B [out, r] for the op. On the CPU: a transposed view of a cached contiguous B^T [r, out], which
    gives the kernel a vectorised expand; rebuilt when the weight changes (in-place version or storage)."""
    w = layer.lora_B[name].weight
    if device.type != "cpu":
        return w.to(dtype)
    cache = layer.__dict__.setdefault("_fastpeft_bt_cache", {})
    key = (w.data_ptr(), w._version, dtype, tuple(w.shape))
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = (key, w.detach().to(dtype).t().contiguous())
        cache[name] = hit
    return hit[1].t()


def _pre_forward_hook(module, args, kwargs, mixed: MixedBatch):
    kwargs["adapter_names"] = mixed
    return args, kwargs


def mixed_embedding_forward(layer, x: torch.Tensor, mixed: MixedBatch, *args, **kwargs) -> torch.Tensor:
    """LoRA Embedding over a mixed batch (peft's math: the shrink is a gather of A's columns, so it runs per
    adapter present in the batch; embeddings are one layer per model)."""
    result = layer.base_layer(x, *args, **kwargs)
    embed_scale = layer._embed_scale()
    for k, name in enumerate(mixed.names):
        if name not in layer.lora_embedding_A:
            continue
        sel = (mixed.rows == k).nonzero().flatten().to(x.device)
        A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        out = (layer._embed(x.index_select(0, sel), A.T) @ B.T) * layer.scaling[name]
        if embed_scale is not None:
            out = out * embed_scale.to(out.dtype)
        result = result.index_add(0, sel, out.to(result.dtype))
    return result


def supports_mixed(layer) -> bool:
    from .layer import Embedding, Linear

    return ((isinstance(layer, Linear) and type(layer).forward is Linear.forward)
            or (isinstance(layer, Embedding) and type(layer).forward is Embedding.forward))


def install_hooks(model, adapter_names, num_beams=None) -> list:
    """Validate ``adapter_names`` against ``model`` (a LoraModel) and register the pre-hooks; returns their handles."""
    from ..base import AuxiliaryTrainingWrapper
    from .layer import LoraLayer

    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    expected = set()
    for layer in layers:
        expected |= set(layer.lora_A.keys()) | set(layer.lora_embedding_A.keys())
    unexpected = {n for n in adapter_names if n != BASE} - expected
    if unexpected:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
    if isinstance(num_beams, int) and num_beams > 1:
        # generate() repeats every input num_beams times: repeat each row's adapter as well
        adapter_names = [n for n in adapter_names for _ in range(num_beams)]
    for layer in layers:
        if not supports_mixed(layer):
            raise NotImplementedError(
                f"fastpeft: `adapter_names` (mixed-adapter batches) supports LoRA Linear and Embedding layers only, got "
                f"lora.{type(layer).__name__}; target Linear/Embedding layers or call set_adapter() instead")
    # modules_to_save / trainable-tokens wrappers select per row as well (see mixed_aux_forward)
    wrappers = [m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    mixed = MixedBatch(adapter_names)
    return [module.register_forward_pre_hook(partial(_pre_forward_hook, mixed=mixed), with_kwargs=True)
            for module in layers + wrappers]


def mixed_aux_forward(wrapper, x: torch.Tensor, mixed, *args, **kwargs) -> torch.Tensor:
    """A modules_to_save or trainable-tokens wrapper over a mixed batch (peft's `_mixed_batch_forward`): the rows of
    each adapter go through that adapter's copy / trained token rows, `"__base__"` rows (and those of an adapter the
    wrapper does not have) through the original module; each row is computed once."""
    from ..trainable_tokens.wrapper import TrainableTokensWrapper

    mixed = mixed if isinstance(mixed, MixedBatch) else MixedBatch(mixed)
    if len(x) != len(mixed):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(mixed)} and {len(x)} respectively."
        )
    tokens = isinstance(wrapper, TrainableTokensWrapper)
    if tokens:
        layer = wrapper.token_adapter
        if layer.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first.")
        original = layer.base_layer
        has = layer.trainable_tokens_delta
    else:
        original, has = wrapper.original_module, wrapper.modules_to_save
    supported = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    if not isinstance(original, supported):
        raise TypeError("Mixed batching is only supported for the following modules: "
                        + ", ".join(c.__name__ for c in supported) + ".")
    if wrapper.disable_adapters:
        return original(x, *args, **kwargs)
    groups = []  # (row indices on x's device, the rows' output function)
    plain = mixed.rows < 0
    for k, name in enumerate(mixed.names):
        if name not in has:
            plain |= mixed.rows == k
            continue
        if tokens:
            fn = partial(_token_rows_forward, wrapper.token_adapter, name)
        else:
            fn = wrapper.modules_to_save[name]
        groups.append(((mixed.rows == k).nonzero().flatten(), fn))
    if plain.any():
        groups.append((plain.nonzero().flatten(), original))
    if len(groups) == 1 and len(groups[0][0]) == len(x):  # one group: no gather / scatter
        return groups[0][1](x, *args, **kwargs)
    result = None
    for sel, fn in groups:
        sel = sel.to(x.device)
        out = fn(x.index_select(0, sel), *args, **kwargs)
        if result is None:
            result = out.new_empty((len(x), *out.shape[1:]))
        result.index_copy_(0, sel, out.to(result.dtype))
    return result


def _token_rows_forward(layer, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return layer.forward_adapters(x, [name], *args, **kwargs)
