"""Trainable tokens next to another method: `LoraConfig(trainable_token_indices=...)` (peft's
`TrainableTokensWrapper` and the injection peft does in `set_additional_trainable_modules`).

The embedding is wrapped in a `TrainableTokensWrapper` whose `token_adapter` is a `TrainableTokensLayer`, so the
checkpoint key is peft's `<embedding>.token_adapter.trainable_tokens_delta`. With tied embeddings the tied layer
(e.g. `lm_head`) gets a wrapper whose token adapter is tied to the embedding's; it saves nothing of its own.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from ..base import AuxiliaryTrainingWrapper, BaseTunerLayer, _AdapterActivity, iter_named_targets
from .layer import TrainableTokensLayer, check_token_indices
from .model import input_embeddings_name, tied_embedding_module_names

__all__ = ["TrainableTokensWrapper", "set_trainable_tokens"]


class TrainableTokensWrapper(_AdapterActivity, AuxiliaryTrainingWrapper):
    """Trains selected rows of a module (an embedding, or a layer tied to it) alongside another adapter method."""

    adapter_layer_names = ("token_adapter.trainable_tokens_delta",)
    other_param_names = ("token_adapter.token_indices", "token_adapter.trainable_tokens_original")

    def __init__(self, module_to_save: nn.Module, adapter_name: str, token_indices: list[int],
                 tied_adapter: Optional[TrainableTokensLayer] = None) -> None:
        super().__init__()
        forbidden = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
        if isinstance(module_to_save, forbidden) or isinstance(module_to_save, BaseTunerLayer):
            raise TypeError(
                f"trainable_token_indices cannot be applied to modules of type {type(module_to_save)}: the layer is "
                "already adapted (e.g. by LoRA). Remove it from target_modules or from trainable_token_indices."
            )
        self._active_adapter: Union[str, list[str]] = [adapter_name]
        self._disable_adapters = False
        self._adapters: set[str] = set()
        module_to_save.requires_grad_(False)
        self.token_adapter = TrainableTokensLayer(module_to_save, adapter_name, tied_adapter=tied_adapter)
        self.update(adapter_name, token_indices=token_indices, tied_adapter=tied_adapter)

    @property
    def original_module(self) -> nn.Module:
        # a property, not a submodule: the wrapped module is saved once (as token_adapter.base_layer)
        return self.token_adapter.base_layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if "_modules" not in self.__dict__ or "token_adapter" not in self.__dict__["_modules"]:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        token_adapter = self.__dict__["_modules"]["token_adapter"]
        if name == "weight" and not self._disable_adapters and self.active_adapters:
            # the weight the model effectively uses (peft's behaviour): a new tensor with the rows replaced
            return token_adapter.get_merged_weights(token_adapter.active_adapters)
        return getattr(token_adapter.base_layer, name)

    def update(self, adapter_name: str, **kwargs) -> None:
        """Add adapter `adapter_name` (keywords: `token_indices`, `tied_adapter`, `init_weights`)."""
        if adapter_name not in self._adapters:
            self.token_adapter.update_layer(adapter_name, **kwargs)
        self._adapters.add(adapter_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mixed = kwargs.pop("adapter_names", None)
        if mixed is not None:  # mixed-adapter batch: each row's adapter's token rows
            from ..lora.mixed import mixed_aux_forward

            return mixed_aux_forward(self, x, mixed, *args, **kwargs)
        if self._disable_adapters:
            return self.token_adapter.forward_adapters(x, [], *args, **kwargs)
        return self.token_adapter(x, *args, **kwargs)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        self.token_adapter.enable_adapters(enabled)

    def check_set_adapter(self, adapter_names: Union[str, list[str]]) -> Optional[str]:
        """The one adapter of `adapter_names` that has trainable tokens here (None if none has)."""
        if isinstance(adapter_names, str):
            return adapter_names
        if not adapter_names:
            raise ValueError("Please specify at least one adapter to set")
        present = [n for n in adapter_names if n in self.token_adapter.trainable_tokens_delta]
        if len(present) > 1:
            raise ValueError(f"Only one adapter can be set at a time for trainable tokens, got {present}")
        return present[0] if present else None

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        if isinstance(adapter_names, str):
            self._active_adapter = adapter_names
        else:
            for name in adapter_names:
                if name not in self._adapters:
                    raise ValueError(f"Adapter {name} not found in {self._adapters}")
            self._active_adapter = list(adapter_names)
        self.token_adapter.set_adapter(adapter_names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]]) -> None:
        self.token_adapter.delete_adapter(adapter_name)
        if isinstance(new_active_adapters, (list, tuple)) and len(new_active_adapters) > 1:
            raise ValueError(f"Attempted to set multiple ({new_active_adapters}) adapters at once for trainable "
                             "tokens, which is not allowed.")
        self._adapters.discard(adapter_name)
        if not new_active_adapters or new_active_adapters[0] not in self.token_adapter.trainable_tokens_delta:
            self._active_adapter = []
            self.token_adapter.set_adapter([])
            return
        self.set_adapter(new_active_adapters[0])

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.Module:
        """The wrapped module, with the trained rows written into its weight when `merge`."""
        if merge:
            self.token_adapter.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.token_adapter.get_base_layer()

    # ---- checkpoint (keys relative to the wrapper, without the adapter name) ----

    def adapter_state_dict(self, adapter_name: str, state_dict: dict) -> dict:
        # a tied wrapper saves nothing: its rows are the embedding's
        if self.token_adapter.tied_adapter is not None or adapter_name not in self._adapters:
            return {}
        key = f"token_adapter.trainable_tokens_delta.{adapter_name}"
        return {"token_adapter.trainable_tokens_delta": state_dict[key]}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict:
        if self.token_adapter.tied_adapter is not None or adapter_name not in self._adapters:
            return {}
        return {"token_adapter.trainable_tokens_delta": f"token_adapter.trainable_tokens_delta.{adapter_name}"}


def _wrap(model: nn.Module, adapter_name: str, module_names: list[str], token_indices, inference_mode: bool,
          activate: bool, tied_adapter: Optional[TrainableTokensLayer] = None) -> list[str]:
    """Wrap (or extend the wrapper of) every module whose name ends with one of `module_names`; the names found."""
    found = []
    for key, parent, target_name, target, grandparent in iter_named_targets(model, module_names, adapter_name,
                                                                             "trainable_token_indices"):
        if isinstance(grandparent, TrainableTokensWrapper) or isinstance(parent, TrainableTokensWrapper):
            continue  # the module inside an existing wrapper
        if isinstance(target, TrainableTokensWrapper):
            if tied_adapter is None and target.token_adapter.tied_adapter is None:
                check_token_indices(token_indices, target.original_module, repr(key), "trainable_token_indices")
            target.update(adapter_name, token_indices=token_indices, tied_adapter=tied_adapter)
            target.set_adapter(target.active_adapter, inference_mode=inference_mode)
        else:
            inner = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not isinstance(target, BaseTunerLayer) and not isinstance(inner, (nn.Embedding, nn.Linear)):
                raise TypeError(
                    f"trainable_token_indices targets {key!r}, a {type(target).__name__}; trainable tokens need an "
                    "nn.Embedding (or an nn.Linear such as a tied lm_head). Name the embedding layer instead, e.g. "
                    "trainable_token_indices={'embed_tokens': [...]}, or pass a list for the input embedding."
                )
            if tied_adapter is None:
                check_token_indices(token_indices, inner, repr(key), "trainable_token_indices")
            wrapper = TrainableTokensWrapper(target, adapter_name, token_indices=token_indices,
                                             tied_adapter=tied_adapter)
            wrapper.set_adapter(adapter_name if activate else [], inference_mode=inference_mode)
            setattr(parent, target_name, wrapper)
        found.append(key)
    return found


def set_trainable_tokens(model: nn.Module, peft_config, adapter_name: str, activate: bool,
                         model_config: dict) -> None:
    """Apply `peft_config.trainable_token_indices` (a list: the input embedding; a dict: module name -> ids) to
    `model` for `adapter_name`, tying layers that share the embedding's weight (peft's rules)."""
    spec = getattr(peft_config, "trainable_token_indices", None)
    if spec is None:
        return
    if isinstance(spec, dict):
        targets = dict(spec)
        if not targets:
            raise ValueError("trainable_token_indices is an empty dict; name the embedding layer(s) and their token "
                             "ids, e.g. {'embed_tokens': [...]}, or pass a list for the input embedding")
    else:
        targets = {input_embeddings_name(model, "embed_tokens"): spec}
    modules_to_save = getattr(peft_config, "modules_to_save", None) or ()
    for name in targets:
        if name in modules_to_save:
            raise ValueError(
                "The embedding layer is already marked to be trained fully, either specify "
                f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{\'{name}\': x}}` but not both.'
            )
    inference_mode = peft_config.inference_mode
    weights_tied = bool(model_config.get("tie_word_embeddings", False))
    ensure_tying = bool(getattr(peft_config, "ensure_weight_tying", False))

    # several targets that are the embedding and layers tied to it: with the same ids the tied ones just follow
    # the embedding; with different ids each is trained on its own (no tying)
    mismatch, skip = False, set()
    if len(targets) > 1 and weights_tied:
        tied_names = set(tied_embedding_module_names(model))
        embedding_name = input_embeddings_name(model, "") or ""
        tied_keys = [t for t in targets if embedding_name.endswith(t)
                     or any(n.endswith(t) or t in n.split(".") for n in tied_names)]
        if len(tied_keys) >= 2:
            first = list(targets[tied_keys[0]])
            mismatch = any(list(targets[k]) != first for k in tied_keys[1:])
            if mismatch and ensure_tying:
                info = ", ".join(f"{k}: {targets[k]}" for k in tied_keys)
                raise ValueError(
                    "Cannot ensure weight tying when different token indices are specified for tied layers. "
                    f"Conflicting layers: {info}. Please use the same indices for all tied layers or set "
                    "ensure_weight_tying=False."
                )
            if not mismatch:
                skip = set(tied_keys) & tied_names

    for name, token_indices in targets.items():
        if name in skip:
            continue
        if not _wrap(model, adapter_name, [name], token_indices, inference_mode, activate):
            embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
            raise ValueError(
                f"trainable_token_indices: module {name!r} not found in the base model. Name an embedding layer "
                f"(embedding layers of this model: {embeddings}) or pass a list of ids for the input embedding."
            )

    if not weights_tied and ensure_tying:
        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                      "Weight tying will not be applied for trainable_token_indices.")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if (weights_tied and isinstance(embedding, TrainableTokensWrapper) and (ensure_tying or not mismatch)
            and adapter_name in embedding.token_adapter.token_indices):
        tied_names = tied_embedding_module_names(model)
        if tied_names:
            _wrap(model, adapter_name, tied_names, embedding.token_adapter.token_indices[adapter_name],
                  inference_mode, activate, tied_adapter=embedding.token_adapter)
