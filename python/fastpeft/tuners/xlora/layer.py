"""X-LoRA's LoRA layers: each LoRA layer of the wrapped `LoraModel` gets its `forward` replaced (as peft does) by
one that mixes all of its LoRA experts with the current per-token scalings.

Linear / Conv1D layers run the mix as ONE op, `fastpeft.ops.multi_lora_mix` (a shrink GEMM over all experts, a
per-token block scaling, an expand GEMM accumulating onto the base output), with the experts' weights stacked
(smaller ranks zero-padded) and, while they need no gradient, cached between calls. peft's math is
``base(x) + sum_j B_j(A_j(dropout_j(x * s_j))) * scaling_j * global_scaling_weight`` (dropout_j(x * s_j) =
dropout_j(x) * s_j). In training with lora_dropout p > 0 the op gives every expert its own seeded mask
(drawn from torch's generator, so not nn.Dropout's draws, but the same distribution) and its shrink becomes one
GEMM per expert inside the op. Layers whose experts have different dropout probabilities, or a LoRA bias
(`lora_bias=True`: a term the scalings do not weight), FALL BACK to peft's per-expert loop (nn.Dropout, as
peft); Embedding and Conv2d layers always use that loop.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import layer as lora_layer
from ..lora.layer import _ops

class _ConstantScalings:
    """The scaling pass's scalings, all equal to `value` ([batch, seq, n_layers, n_classes] made on demand)."""

    def __init__(self, value, make):
        self.value = value
        self._make = make
        self._tensor = None

    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = self._make()
        return self._tensor


class XLoraLayer:
    """Wraps one LoRA layer (`target`) of the X-LoRA model; `forward` replaces the target's forward."""

    def __init__(self, model: nn.Module, target: lora_layer.LoraLayer, target_forward, layer_number: int,
                 config) -> None:
        self.model = model
        self.target = target
        self.target_forward = target_forward
        self.layer_number = layer_number
        self.config = config

    @property
    def adapters_disabled(self) -> bool:
        """Whether X-LoRA is disabled (e.g. inside `disable_adapter()`)."""
        return self.model.disabled

    def get_maybe_topk_scalings(self, scalings: torch.Tensor) -> torch.Tensor:
        """This layer's [batch, seq, n_classes] slice of the scalings, with top-k masking and the top-k softmax
        applied as configured (peft's semantics: the k largest kept, the rest 0; then an optional softmax over
        the non-zero entries)."""
        xs = scalings[:, :, self.layer_number, :]
        if self.config.top_k_lora is not None:
            _, topk_indices = torch.topk(xs, k=self.config.top_k_lora, dim=-1)
            mask = torch.zeros_like(xs, dtype=torch.bool)
            mask.scatter_(-1, topk_indices, True)
            xs = xs * mask.to(xs.dtype)
        if self.config.enable_softmax_topk:
            nonzero = xs != 0
            xs = torch.softmax(xs.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return xs

    def _current(self):
        """(layer scalings [batch, seq, n] or None, weight): None outside an X-LoRA forward (every expert with
        weight 1, as peft without scalings); `skip` when the scaling pass value is 0 (the experts add exactly 0)."""
        state = self.model._scalings_state
        if state is None:
            return None, 1.0
        if isinstance(state, _ConstantScalings):
            if state.value == 0:
                return "skip", self.config.global_scaling_weight
            state = state.tensor()
        return self.get_maybe_topk_scalings(state), self.config.global_scaling_weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


class XLoraLinearLayer(XLoraLayer):
    """X-LoRA over a LoRA Linear / Conv1D layer: the experts mixed by `multi_lora_mix` (see module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._cache_key = None
        self._cache = None

    def _experts(self):
        t = self.target
        cols, names = [], []
        for j, name in enumerate(t.active_adapters):
            if name not in t.lora_A:
                continue
            if t.use_dora.get(name, False):
                raise ValueError("X-LoRA currently does not support LoRA layers with DoRA")
            cols.append(j)
            names.append(name)
        return cols, names

    def _stacked(self, names: list[str], dtype: torch.dtype):
        """(A [n, r, in], B [n, out, r], per-expert lora scaling [n]) in `dtype`; cached while frozen."""
        t = self.target
        params = [(t.lora_A[n].weight, t.lora_B[n].weight) for n in names]
        grad = torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b in params)
        key = (tuple(names), dtype, tuple(t.scaling[n] for n in names),
               tuple((a.data_ptr(), a._version, b.data_ptr(), b._version, a.device) for a, b in params))
        if not grad and key == self._cache_key:
            return self._cache
        r = max(a.shape[0] for a, _ in params)
        A = torch.stack([a if a.shape[0] == r else F.pad(a, (0, 0, 0, r - a.shape[0])) for a, _ in params]).to(dtype)
        B = torch.stack([b if b.shape[1] == r else F.pad(b, (0, r - b.shape[1])) for _, b in params]).to(dtype)
        scale = torch.tensor([t.scaling[n] for n in names], dtype=dtype, device=A.device)
        if grad:
            self._cache_key = self._cache = None
            return A, B, scale
        self._cache_key, self._cache = key, (A.detach(), B.detach(), scale)
        return self._cache

    def _dropout_p(self, names: list[str]) -> Optional[float]:
        """The experts' common dropout probability in this mode (0 in eval), or None when they differ."""
        t = self.target
        ps = {float(t.lora_dropout[n].p) if isinstance(t.lora_dropout[n], nn.Dropout) and t.lora_dropout[n].training
              else 0.0 for n in names}
        return ps.pop() if len(ps) == 1 else None

    def _needs_loop(self, names: list[str]) -> bool:
        t = self.target
        return any(t.lora_bias.get(n, False) for n in names) or self._dropout_p(names) is None

    def forward(self, x: torch.Tensor, *args: Any, scalings: Optional[torch.Tensor] = None, **kwargs: Any):
        t = self.target
        previous_dtype = x.dtype
        if self.adapters_disabled:
            return t.base_layer(x, *args, **kwargs).to(previous_dtype)
        if scalings is not None:  # peft's calling convention (scalings passed explicitly)
            xs, weight = self.get_maybe_topk_scalings(scalings), self.config.global_scaling_weight
        else:
            xs, weight = self._current()
        result = t.base_layer(x, *args, **kwargs)
        if t.merged:
            return result.to(previous_dtype)
        cols, names = self._experts()
        if isinstance(xs, str):  # scaling pass at value 0: only LoRA biases (unweighted in peft) contribute
            if not any(t.lora_bias.get(n, False) for n in names):
                return result.to(previous_dtype)
            xs = self.get_maybe_topk_scalings(self.model._scalings_state.tensor())
        if not names:
            return result.to(previous_dtype)
        dtype = t.lora_A[names[0]].weight.dtype
        x = x.to(dtype)
        if self._needs_loop(names):
            result = self._loop(x, result, xs, weight, cols, names)
            return result.to(previous_dtype)
        A, B, scale = self._stacked(names, dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if xs is None:
            s = scale.expand(x2.shape[0], -1)
        else:
            if len(cols) != xs.shape[-1]:
                xs = xs[..., cols]
            if tuple(xs.shape[:-1]) != tuple(lead):
                raise ValueError(
                    f"X-LoRA scalings are for inputs of shape {tuple(xs.shape[:-1])} but layer {self.layer_number} "
                    f"got {tuple(lead)}"
                )
            s = xs.reshape(-1, xs.shape[-1]).to(dtype) * (scale * weight)
        res2 = result.reshape(-1, result.shape[-1])
        p = self._dropout_p(names)
        if res2.dtype == dtype:
            out = _ops().multi_lora_mix(x2, A, B, s, res2, p)
        else:  # experts kept in float32 next to a half-precision base: add as peft's in-place `+=` does
            out = (res2.to(dtype) + _ops().multi_lora_mix(x2, A, B, s, None, p)).to(res2.dtype)
        return out.reshape(*lead, out.shape[-1]).to(previous_dtype)

    def _loop(self, x, result, xs, weight, cols, names):
        """peft's per-expert loop (dropout in training, LoRA biases)."""
        t = self.target
        for j, name in zip(cols, names):
            x_mod = x if xs is None else x * xs[:, :, j].unsqueeze(-1)
            delta = t.lora_B[name](t.lora_A[name](t.lora_dropout[name](x_mod))) * t.scaling[name] * weight
            result = result + delta.to(result.dtype)
        return result


class XLoraEmbeddingLayer(XLoraLayer):
    """X-LoRA over a LoRA Embedding layer (peft's per-expert math; embeddings have no GEMM to fuse into)."""

    def forward(self, x: torch.Tensor, *args: Any, scalings: Optional[torch.Tensor] = None, **kwargs: Any):
        t = self.target
        if self.adapters_disabled:
            return t.base_layer(x, *args, **kwargs)
        if scalings is not None:
            xs, weight = self.get_maybe_topk_scalings(scalings), self.config.global_scaling_weight
        else:
            xs, weight = self._current()
        result = t.base_layer(x, *args, **kwargs)
        if t.merged or (isinstance(xs, str) and xs == "skip"):
            return result
        embed_scale = t._embed_scale()
        for j, name in enumerate(t.active_adapters):
            if name not in t.lora_embedding_A:
                continue
            if t.use_dora.get(name, False):
                raise ValueError("X-LoRA currently does not support LoRA layers with DoRA")
            after_A = t._embed(x, t.lora_embedding_A[name].T)
            if xs is not None:
                after_A = after_A * xs[:, :, j].unsqueeze(-1)
            out = (after_A @ t.lora_embedding_B[name].T) * t.scaling[name] * weight
            if embed_scale is not None:
                out = out * embed_scale.to(out.dtype)
            result = result + out
        return result


class XLoraConv2dLayer(XLoraLayer):
    """X-LoRA over a LoRA Conv2d layer (peft's per-expert math)."""

    def forward(self, x: torch.Tensor, *args: Any, scalings: Optional[torch.Tensor] = None, **kwargs: Any):
        t = self.target
        previous_dtype = x.dtype
        if self.adapters_disabled:
            return t.base_layer(x, *args, **kwargs).to(previous_dtype)
        if scalings is not None:
            xs, weight = self.get_maybe_topk_scalings(scalings), self.config.global_scaling_weight
        else:
            xs, weight = self._current()
        result = t.base_layer(x, *args, **kwargs)
        if t.merged or (isinstance(xs, str) and xs == "skip"):
            return result.to(previous_dtype)
        for j, name in enumerate(t.active_adapters):
            if name not in t.lora_A:
                continue
            if t.use_dora.get(name, False):
                raise ValueError("X-LoRA currently does not support LoRA layers with DoRA")
            x = x.to(t.lora_A[name].weight.dtype)
            x_mod = x if xs is None else x * xs[:, :, j].unsqueeze(-1)
            result = result + t.lora_B[name](t.lora_A[name](t.lora_dropout[name](x_mod))) * t.scaling[name] * weight
        return result.to(previous_dtype)
