"""`AdaptedAttention`: an attention module with LLaMA-Adapter adaption prompts (peft's math and parameter names).

For the active adapter, with prompt P (1, adapter_len, hidden) and gate g (zero-initialised), every query q of the
wrapped attention also attends to the prompt through its own softmax:

    out = attention(x) + o_proj(g * softmax(rope(q) k_P^T / sqrt(head_dim)) v_P),   k_P = k_proj(P), v_P = v_proj(P)

(GPT-2: keys and values from c_attn, no rotary embedding, no output projection, as in peft.) The prompt keys carry no
position, so incremental decoding with a KV cache needs nothing cached for them.

Where peft recomputes things, this layer reuses them, exactly:
- the queries are those the wrapped attention computes (a forward hook on q_proj / c_attn captures them): no second
  q_proj;
- the prompt keys / values are computed once per forward (and, without autograd, e.g. in generate(), kept across
  forwards until the prompt or the projection weights change), never repeated per batch element or query head: the
  query heads that share a key/value head and all batch rows are folded into one row axis, so a single
  `scaled_dot_product_attention` call (no mask) does the prompt attention of the whole batch;
- with an `nn.Linear` o_proj the adapter output is added to o_proj's input (a forward pre-hook), so the output
  projection runs once, not twice; its bias, which peft's separate o_proj call adds a second time, is added back.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BaseTunerLayer
from .config import TRANSFORMERS_MODEL_CONFIG


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _PromptKVCache(dict):
    """adapter name -> (weak refs to the source tensors, their signature, (keys, values)); never copied or pickled
    with the module (a copy starts empty)."""

    def __deepcopy__(self, memo):
        return _PromptKVCache()

    def __reduce__(self):
        return (_PromptKVCache, ())


def _arg(args: tuple, kwargs: dict, name: str, index: int):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


class AdaptedAttention(nn.Module, BaseTunerLayer):
    """Wraps an attention module (`base_layer`) of a supported model type and adds adaption prompts to it.

    Holds one prompt (`adaption_prompt[name]`, shape (1, adapter_len, hidden_size)) and one gate
    (`adaption_gate[name]`, shape (1,)) per adapter; only the active adapter is applied.
    """

    adapter_layer_names = ("adaption_prompt", "adaption_gate")
    other_param_names = ("adapter_len",)

    def __init__(self, base_layer: nn.Module, model_type: str) -> None:
        if isinstance(base_layer, AdaptedAttention):
            raise TypeError("Unable to stack multiple adaption prompts")
        if model_type not in TRANSFORMERS_MODEL_CONFIG:
            raise ValueError(f"Unsupported model type for adaption prompt: {model_type!r}")
        super().__init__()
        self.base_layer = base_layer
        self.model_type = model_type
        self.adaption_prompt = nn.ParameterDict({})
        self.adaption_gate = nn.ParameterDict({})
        self.adapter_len: dict[str, int] = {}
        self._active_adapter = []
        self._disable_adapters = False
        self.merged_adapters = []

    # ---- structure -------------------------------------------------------------------------------------------------

    def __getattr__(self, name: str):
        """Attributes of the wrapped attention (layer_idx, head_dim, config, ...) stay reachable."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"model_type={self.model_type!r}, adapter_len={self.adapter_len}"

    @property
    def _spec(self):
        return TRANSFORMERS_MODEL_CONFIG[self.model_type]

    def _proj_weight_layer(self) -> nn.Module:
        """The layer whose weight dtype the adapter takes (peft: q_proj for Llama / Mistral, c_proj for GPT-2)."""
        base = self.get_base_layer()
        return base.c_proj if self.model_type == "gpt2" else base.q_proj

    def _base_device_dtype(self) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
        weight = getattr(self._proj_weight_layer(), "weight", None)
        if weight is None:
            return None, None
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        return weight.device, dtype

    def update_layer(self, adapter_name: str, adapter_len: int) -> None:
        """Add an adapter: prompt ~ N(0, 1) (peft: the official repo's nn.Embedding init), gate 0 (zero-init)."""
        base = self.get_base_layer()
        device = next(base.parameters()).device
        _, dtype = self._base_device_dtype()
        hidden_size = base.config.hidden_size
        self.adaption_prompt[adapter_name] = nn.Parameter(
            torch.empty(1, adapter_len, hidden_size, device=device, dtype=dtype).normal_()
        )
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))
        self.adapter_len[adapter_name] = adapter_len

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        raise ValueError(
            "Adaption prompts cannot be merged into the base weights: they add attention to learned prompt tokens, "
            "not a weight delta. Keep the adapter, or call unload() to get the base model back."
        )

    def _unmerge_adapter(self, adapter_name: str) -> None:  # nothing is ever merged
        pass

    def _current_adapter(self) -> Optional[str]:
        if self.disable_adapters:
            return None
        for name in self.active_adapters:
            if name in self.adaption_prompt:
                return name
        return None

    # ---- forward ---------------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        name = self._current_adapter()
        if name is None:
            return self.base_layer(*args, **kwargs)
        if self.model_type == "gpt2":
            return self._forward_gpt2(name, args, kwargs)
        return self._forward_llama(name, args, kwargs)

    def _kv_sources(self, name: str) -> list:
        base = self.get_base_layer()
        spec = self._spec
        mods = [getattr(base, spec.k_proj_layer)]
        if spec.v_proj_layer is not None:
            mods.append(getattr(base, spec.v_proj_layer))
        tensors = [self.adaption_prompt[name]]
        for m in mods:
            tensors.extend(m.parameters())
            tensors.extend(m.buffers())
        return tensors

    def _prompt_kv(self, name: str, head_dim: int):
        """Keys and values of the prompt, each (1, n_kv_heads, adapter_len, head_dim), computed once per forward.

        Without autograd (generation, evaluation) they are also kept between forwards, keyed on the identity, version
        counter, dtype and device of the prompt and of the k/v projection's tensors: any in-place update, load, cast
        or move recomputes them, so the cached values are always those a recomputation would give."""
        if torch.is_grad_enabled():
            return self._compute_prompt_kv(name, head_dim)
        tensors = self._kv_sources(name)
        try:
            sig = [(t.data_ptr(), t._version, t.dtype, t.device) for t in tensors] + [head_dim]
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return self._compute_prompt_kv(name, head_dim)
        cache = self.__dict__.setdefault("_prompt_kv_cache", _PromptKVCache())
        hit = cache.get(name)
        if hit is not None:
            refs, cached_sig, kv = hit
            if cached_sig == sig and len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors)):
                return kv
        kv = self._compute_prompt_kv(name, head_dim)
        cache[name] = ([weakref.ref(t) for t in tensors], sig, kv)
        return kv

    def _compute_prompt_kv(self, name: str, head_dim: int):
        base = self.get_base_layer()
        spec = self._spec
        prompt = self.adaption_prompt[name]
        if spec.v_proj_layer is None:  # fused q|k|v projection
            embed_dim = base.config.hidden_size
            _, key, value = getattr(base, spec.k_proj_layer)(prompt).split(embed_dim, dim=2)
        else:
            key = getattr(base, spec.k_proj_layer)(prompt)
            value = getattr(base, spec.v_proj_layer)(prompt)
        shape = (1, prompt.shape[1], key.shape[-1] // head_dim, head_dim)
        return key.reshape(shape).transpose(1, 2), value.reshape(shape).transpose(1, 2)

    def _prompt_attention(self, name: str, query: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Gated prompt attention of `query` (batch, q_len, num_heads, head_dim), already position-embedded;
        returns (batch, q_len, num_heads * head_dim) in the query's dtype."""
        bsz, q_len, n_heads, _ = query.shape
        key, value = self._prompt_kv(name, head_dim)
        n_kv = key.shape[1]
        if n_heads % n_kv:
            raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads of the adaption prompt")
        groups = n_heads // n_kv
        dtype = query.dtype
        # rows: every (batch, position, head) that reads key/value head j, in one matrix per j
        rows = query.reshape(bsz, q_len, n_kv, groups, head_dim).permute(2, 0, 1, 3, 4)
        rows = rows.reshape(1, n_kv, bsz * q_len * groups, head_dim)
        out = F.scaled_dot_product_attention(
            rows, key.to(dtype), value.to(dtype), scale=1.0 / math.sqrt(head_dim)
        )
        out = out.reshape(n_kv, bsz, q_len, groups, head_dim).permute(1, 2, 0, 3, 4)
        out = out.reshape(bsz, q_len, n_heads * head_dim)
        return (out * self.adaption_gate[name]).to(dtype)

    def _forward_llama(self, name: str, args: tuple, kwargs: dict):
        base = self.get_base_layer()
        hidden_states = _arg(args, kwargs, "hidden_states", 0)
        position_embeddings = _arg(args, kwargs, "position_embeddings", 1)
        if position_embeddings is None:
            raise ValueError(
                f"{type(base).__name__} was called without `position_embeddings`; adaption prompts need the rotary "
                "(cos, sin) the decoder layer passes to its attention (transformers >= 4.48)"
            )
        cos, sin = position_embeddings
        head_dim = base.head_dim
        n_heads = base.config.num_attention_heads
        o_proj = getattr(base, self._spec.o_proj_layer)
        inject = type(o_proj) is nn.Linear
        state: dict = {}

        def adapter_output():
            q = state.get("q")
            if q is None or q.shape[:-1] != hidden_states.shape[:-1]:
                q = base.q_proj(hidden_states)
            q = q.view(*q.shape[:-1], n_heads, head_dim)
            c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # (batch, q_len, 1, head_dim)
            q = q * c + _rotate_half(q) * s
            return self._prompt_attention(name, q, head_dim)

        def capture_query(module, inputs, output):
            state["q"] = output

        def add_to_o_proj_input(module, inputs):
            if state.get("done") or not inputs:
                return None
            state["done"] = True
            return (inputs[0] + adapter_output(),) + tuple(inputs[1:])

        handles = [base.q_proj.register_forward_hook(capture_query)]
        if inject:
            handles.append(o_proj.register_forward_pre_hook(add_to_o_proj_input))
        try:
            output, *rest = self.base_layer(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if state.get("done"):
            if o_proj.bias is not None:  # peft's separate o_proj(adapter_output) adds the bias a second time
                output = output + o_proj.bias
        else:
            output = output + o_proj(adapter_output())
        return (output, *rest)

    def _forward_gpt2(self, name: str, args: tuple, kwargs: dict):
        base = self.get_base_layer()
        hidden_states = _arg(args, kwargs, "hidden_states", 0)
        if kwargs.get("encoder_hidden_states") is not None:
            raise NotImplementedError("adaption prompts on GPT-2 cross-attention are not supported")
        c_attn = getattr(base, self._spec.k_proj_layer)
        embed_dim = base.config.hidden_size
        head_dim = base.head_dim
        state: dict = {}

        def capture_query(module, inputs, output):
            state.setdefault("qkv", output)

        handle = c_attn.register_forward_hook(capture_query)
        try:
            output, *rest = self.base_layer(*args, **kwargs)
        finally:
            handle.remove()
        qkv = state.get("qkv")
        if qkv is None or qkv.shape[:-1] != hidden_states.shape[:-1]:
            qkv = c_attn(hidden_states)
        query = qkv[..., :embed_dim]
        query = query.reshape(*query.shape[:-1], -1, head_dim)
        output = output + self._prompt_attention(name, query, head_dim)
        return (output, *rest)
