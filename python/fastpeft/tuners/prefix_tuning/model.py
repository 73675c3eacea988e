"""`PrefixEncoder`: prefix tuning's key/value prefixes, trained directly or through a projection MLP (peft's
layout: one row per virtual token, ``num_layers * 2 * token_dim`` values, layer-major, key before value)."""
from __future__ import annotations

import torch
from torch import nn

from ...training import add_extra_checkpoint_input
from ..prompt_tuning.model import BasePromptModule


class PrefixEncoder(BasePromptModule):
    """``prompt()`` is ``[num_virtual_tokens, num_layers * 2 * token_dim]``: ``embedding.weight`` itself, or
    ``transform(embedding.weight)`` with ``prefix_projection`` (in inference mode the projection's output is the
    stored ``embedding``, as peft saves it)."""

    def __init__(self, config):
        super().__init__()
        self.prefix_projection = bool(config.prefix_projection) and not config.inference_mode
        token_dim, num_layers = config.token_dim, config.num_layers
        out_dim = num_layers * 2 * token_dim
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, config.encoder_hidden_size), nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, out_dim),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, out_dim)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def prompt(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding(prefix))
        return self.embedding(prefix)


# ---- gradient checkpointing ----------------------------------------------------------------------------------------
#
# transformers' checkpointed decoder layers drop a key/value cache (``cache=None``): it would be written twice, once
# in the forward and again when backward recomputes the layer. Prefix tuning's prefixes come in as that cache, so
# under checkpointing the model gets a read-only prefix cache instead: ``update`` returns prefix + new keys/values
# and stores nothing, so the recomputation sees exactly what the forward saw. The layers are told to keep it
# (``_can_checkpoint_with_cache``) for the duration of the forward, and each checkpointing function is wrapped
# (``fastpeft.training.add_extra_checkpoint_input``) so that the prefix tensor is an input of the checkpoint:
# reentrant checkpointing back-propagates to its inputs only.

_READ_ONLY_CACHE_CLASS = None


def read_only_prefix_cache(source: torch.Tensor, build):
    """A transformers ``DynamicCache`` holding ``build(source)`` (per layer (key, value)) whose ``update`` stores
    nothing. ``rebuilt(source)`` makes the same cache over another (e.g. detached) source tensor."""
    global _READ_ONLY_CACHE_CLASS
    if _READ_ONLY_CACHE_CLASS is None:
        from transformers import DynamicCache

        class ReadOnlyPrefixCache(DynamicCache):
            def __init__(self, source, build):
                super().__init__(build(source))
                self.source = source
                self._build = build

            def rebuilt(self, source):
                return type(self)(source, self._build)

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                layer = self.layers[layer_idx]
                return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))

        _READ_ONLY_CACHE_CLASS = ReadOnlyPrefixCache
    return _READ_ONLY_CACHE_CLASS(source, build)


def checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that checkpoint their forward now (transformers' ``gradient_checkpointing``)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def _capture_prefix_cache(function):
    """``add_extra_checkpoint_input``'s capture: when ``function`` (transformers' ``partial(forward, layer,
    **kwargs)``) holds a read-only prefix cache, its source tensor, and how to run ``function`` with the cache
    rebuilt over a given source."""
    keywords = getattr(function, "keywords", None) or {}
    key = next((k for k, v in keywords.items() if isinstance(v, _READ_ONLY_CACHE_CLASS or ())), None)
    if key is None:
        return None
    cache = keywords[key]

    def run_with(source, *args, **kwargs):
        return function(*args, **{**kwargs, key: cache.rebuilt(source)})

    return cache.source, run_with


class keep_prefix_under_checkpointing:
    """Context manager over one forward of a checkpointing model with a read-only prefix cache (see above)."""

    def __init__(self, model: nn.Module) -> None:
        # transformers' checkpointed layers (GradientCheckpointingLayer) have the class attribute; the model
        # classes that also carry a `gradient_checkpointing` flag do not checkpoint themselves
        self.layers = [m for m in checkpointing_layers(model) if hasattr(type(m), "_can_checkpoint_with_cache")]
        if not self.layers:
            raise ValueError(
                "PREFIX_TUNING with gradient checkpointing needs transformers' checkpointed layers that can keep a "
                f"cache (`_can_checkpoint_with_cache`, transformers >= 5); {type(model).__name__} has none, so its "
                "checkpointing would drop the prefix"
            )
        self.model = model

    def __enter__(self):
        add_extra_checkpoint_input(self.model, _capture_prefix_cache)
        self._saved = [(layer, layer.__dict__.get("_can_checkpoint_with_cache", _MISSING)) for layer in self.layers]
        for layer in self.layers:
            layer._can_checkpoint_with_cache = True
        return self

    def __exit__(self, *exc):
        for layer, value in self._saved:
            if value is _MISSING:
                layer.__dict__.pop("_can_checkpoint_with_cache", None)
            else:
                layer._can_checkpoint_with_cache = value
        return False


_MISSING = object()
