"""`TrainableTokensModel`: trains the embedding rows of selected tokens (peft's TrainableTokensModel interface and
state-dict keys: `<embedding>.trainable_tokens_delta`, plus the same tensor under a tied layer, e.g.
`lm_head.trainable_tokens_delta`, exactly as peft writes it)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..base import BaseTuner, BaseTunerLayer, _get_submodules
from .config import TrainableTokensConfig
from .layer import TrainableTokensLayer, check_token_indices

__all__ = ["TrainableTokensModel", "input_embeddings_name", "tied_embedding_module_names"]


def _input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def input_embeddings_name(model: nn.Module, default: Optional[str] = None) -> Optional[str]:
    """The qualified name of `model.get_input_embeddings()` in `model` (else `default`)."""
    embedding = _input_embeddings(model)
    if embedding is None:
        return default
    for name, module in model.named_modules():
        if module is embedding:
            return name
    return default


def _innermost(module: nn.Module) -> nn.Module:
    token_adapter = module._modules.get("token_adapter") if hasattr(module, "_modules") else None
    if isinstance(token_adapter, BaseTunerLayer):  # a trainable-tokens wrapper
        module = token_adapter
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def tied_embedding_module_names(model: nn.Module) -> list[str]:
    """Names of the modules whose weight *is* the input embedding's weight (e.g. ["lm_head"] for a causal LM with
    tie_word_embeddings=True), as the model names them before adaptation (adapter infixes removed). Empty when the
    model's config says the embeddings are not tied."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []
    embedding = _input_embeddings(model)
    if embedding is None:
        return []
    base = _innermost(embedding)
    weight = base._parameters.get("weight")
    if weight is None:
        return []
    names = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if module is base or module._parameters.get("weight") is not weight:
            continue
        name = name.removesuffix(".token_adapter.base_layer")
        while name.endswith(".base_layer"):
            name = name.removesuffix(".base_layer")
        names.add(name)
    return sorted(names)


class TrainableTokensModel(BaseTuner):
    """Trains only the embedding rows of `config.token_indices` (peft's TrainableTokensModel).

    Args:
        model: the base model; modified in place (available as `.model`).
        peft_config: a `TrainableTokensConfig`, or a dict adapter name -> `TrainableTokensConfig`.
        adapter_name: the name of the adapter to create (default "default").

    The targeted layer (default: the input embedding) becomes a `TrainableTokensLayer`. When the model ties its
    output layer to the input embedding (`tie_word_embeddings=True`), that layer becomes a `TrainableTokensLayer`
    tied to the embedding's: both see the same trained rows.
    """

    prefix: str = "trainable_tokens_"
    tuner_layer_cls = TrainableTokensLayer

    def _prepare_adapter_config(self, peft_config: TrainableTokensConfig, model_config: dict):
        if peft_config.target_modules is None:
            peft_config.target_modules = input_embeddings_name(self.model, "embed_tokens")
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key,
                            tied_adapter: Optional[TrainableTokensLayer] = None) -> None:
        if isinstance(target, TrainableTokensLayer):
            if tied_adapter is None and target.tied_adapter is None:
                check_token_indices(peft_config.token_indices, target.get_base_layer(), repr(current_key),
                                    "TrainableTokensConfig.token_indices")
            target.update_layer(adapter_name, config=peft_config, tied_adapter=tied_adapter)
            return
        if isinstance(target, BaseTunerLayer) or not isinstance(target, (nn.Embedding, nn.Linear)):
            raise TypeError(
                f"TrainableTokensConfig.target_modules matched {current_key!r}, a {type(target).__name__}; trainable "
                "tokens train rows of an nn.Embedding (or nn.Linear) weight. Set target_modules to the embedding "
                "layer's name (e.g. ['embed_tokens']) or leave it None for the model's input embedding."
            )
        if tied_adapter is None:
            check_token_indices(peft_config.token_indices, target, repr(current_key),
                                "TrainableTokensConfig.token_indices")
        new_module = self._create_new_module(peft_config, adapter_name, target, tied_adapter=tied_adapter)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(peft_config, adapter_name, target, tied_adapter=None, **kwargs) -> TrainableTokensLayer:
        new_module = TrainableTokensLayer(target, adapter_name, config=peft_config, tied_adapter=tied_adapter)
        new_module.update_layer(adapter_name, config=peft_config, tied_adapter=tied_adapter)
        return new_module

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """BaseTuner.inject_adapter, then (tied embeddings) a tied layer on each layer sharing the embedding's
        weight, so that e.g. the lm_head sees the trained rows too (as peft)."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        embedding = _input_embeddings(model)
        if not (isinstance(embedding, TrainableTokensLayer)
                and self.get_model_config(model).get("tie_word_embeddings", False)):
            return
        peft_config = self.peft_config[adapter_name]
        for name in tied_embedding_module_names(model):
            parent, target, target_name = _get_submodules(model, name)
            if isinstance(target, TrainableTokensLayer):
                if target.tied_adapter is embedding:
                    continue  # already follows the embedding (a later adapter is in the shared dicts)
                target = target.get_base_layer()  # targeted on its own: follow the embedding instead
            new_module = self._create_new_module(peft_config, adapter_name, target, tied_adapter=embedding)
            new_module._active_adapter = list(embedding.active_adapters)
            new_module._disable_adapters = embedding.disable_adapters
            self._replace_module(parent, target_name, new_module, target)
