"""`BottleneckModel`: injects sequential (Houlsby) or parallel (He et al.) bottleneck adapters.

Which modules are wrapped: per location ("attention", "feedforward"), `attention_modules` /
`feedforward_modules` of the config, or the defaults for the model type below (full-match regexes, filled into
the config when the adapter is created, so a saved config names its modules explicitly):

- llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, olmo, olmo2, granite: sequential
  `self_attn.o_proj`, `mlp.down_proj`; parallel `self_attn`, `mlp` (and mixtral*);
- gpt2: sequential `attn.c_proj`, `mlp.c_proj`; parallel `attn`, `mlp`;
- bert, roberta, xlm-roberta, electra, camembert: sequential `attention.output.dense`, `output.dense`; parallel
  `attention.output`, `output`.

(* mixtral: attention only by default, its experts have no single MLP.) For BERT-style post-LN encoders the
parallel adapter wraps the blocks that hold each sublayer's residual (`BertSelfOutput`, `BertOutput`, whose
`forward(hidden_states, input_tensor)` computes LayerNorm(dropout(dense(hidden_states)) + input_tensor)): the
branch reads the sublayer's input (`input_tensor`: the attention's input, resp. the feed-forward's input) and its
output joins the sublayer's output before the residual LayerNorm, as in He et al.

Checkpoint keys: `base_model.model.<module>.bottleneck_down.weight` etc. (adapter name removed, peft's rule).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

from ..base import BaseTuner, BaseTunerLayer, _ExcludedModule, _is_under, check_target_module_exists
from .config import BottleneckConfig
from .layer import (
    NOT_MERGEABLE, BottleneckLayer, ParallelAdapterLayer, SequentialAdapterLayer, bottleneck_width, module_features,
    sublayer_features,
)

_P = r"(?:.*\.)?"
_LLAMA_LIKE = {
    "sequential": {"attention": _P + r"layers\.\d+\.self_attn\.o_proj",
                   "feedforward": _P + r"layers\.\d+\.mlp\.down_proj"},
    "parallel": {"attention": _P + r"layers\.\d+\.self_attn", "feedforward": _P + r"layers\.\d+\.mlp"},
}
_GPT2 = {
    "sequential": {"attention": _P + r"h\.\d+\.attn\.c_proj", "feedforward": _P + r"h\.\d+\.mlp\.c_proj"},
    "parallel": {"attention": _P + r"h\.\d+\.attn", "feedforward": _P + r"h\.\d+\.mlp"},
}
_BERT_LIKE = {
    "sequential": {"attention": _P + r"layer\.\d+\.attention\.output\.dense",
                   "feedforward": _P + r"layer\.\d+\.output\.dense"},
    "parallel": {"attention": _P + r"layer\.\d+\.attention\.output", "feedforward": _P + r"layer\.\d+\.output"},
}
_MIXTRAL = {
    "sequential": {"attention": _LLAMA_LIKE["sequential"]["attention"]},
    "parallel": {"attention": _LLAMA_LIKE["parallel"]["attention"]},
}

# model_type -> placement -> location -> full-match regex of the module names to wrap
TRANSFORMERS_MODELS_TO_BOTTLENECK_MODULES_MAPPING: dict[str, dict[str, dict[str, str]]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                                "olmo", "olmo2", "granite")},
    "mixtral": _MIXTRAL,
    "gpt2": _GPT2,
    **{t: _BERT_LIKE for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
}

_LAYER_CLS = {"sequential": SequentialAdapterLayer, "parallel": ParallelAdapterLayer}
_EXAMPLES = {"sequential": "'self_attn.o_proj' / 'mlp.down_proj'", "parallel": "'self_attn' / 'mlp'"}


class BottleneckModel(BaseTuner):
    """Bottleneck adapters on a model (placements: see `BottleneckConfig`).

    Args:
        model: the base model; modified in place (available as `.model`).
        peft_config: a `BottleneckConfig`, or a dict adapter name -> `BottleneckConfig`.
        adapter_name: the adapter's name (default "default").

    All adapters of one model share a placement. Not mergeable: `merge_adapter` / `merge_and_unload` raise;
    `unload()` returns the base model without the adapters.
    """

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_BOTTLENECK_MODULES_MAPPING

    # ---- configuration ----

    def _check_new_adapter_config(self, config) -> None:
        if not isinstance(config, BottleneckConfig):
            raise TypeError(f"BottleneckModel needs a BottleneckConfig, got {type(config).__name__}")
        others = {n: c.placement for n, c in self.peft_config.items() if c is not config}
        clash = sorted(n for n, p in others.items() if p != config.placement)
        if clash:
            raise ValueError(
                f"BottleneckConfig.placement={config.placement!r} differs from that of the existing adapter(s) "
                f"{clash} ({others[clash[0]]!r}): all adapters of one model share a placement (the two wrap "
                "different modules). Use the same placement, or add this adapter to a fresh copy of the base model."
            )

    def _prepare_adapter_config(self, config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        """Fill attention_modules / feedforward_modules of the configured locations from the model type's defaults."""
        model_type = model_config.get("model_type")
        defaults = TRANSFORMERS_MODELS_TO_BOTTLENECK_MODULES_MAPPING.get(model_type, {}).get(config.placement, {})
        for location in config.locations:
            attr = f"{location}_modules"
            if getattr(config, attr) is not None:
                continue
            if location not in defaults:
                known = sorted(TRANSFORMERS_MODELS_TO_BOTTLENECK_MODULES_MAPPING)
                raise ValueError(
                    f"BottleneckConfig.{attr} is needed: no default {location} modules are known for model_type "
                    f"{model_type!r} (defaults exist for {', '.join(known)}). Name the modules to wrap (names, "
                    f"`.`-suffixes or a regex): for placement={config.placement!r} e.g. {_EXAMPLES[config.placement]}"
                    f"; or drop {location!r} from locations."
                )
            setattr(config, attr, defaults[location])
        return config

    @staticmethod
    def _match_location(config: BottleneckConfig, key: str):
        """"attention" / "feedforward" when `key` is wrapped at that location (attention first), an
        `_ExcludedModule` when excluded, else False."""
        for location in config.locations:
            matcher = types.SimpleNamespace(
                target_modules=config.modules_for(location), exclude_modules=config.exclude_modules,
                modules_to_save=config.modules_to_save,
            )
            result = check_target_module_exists(matcher, key)
            if isinstance(result, _ExcludedModule):
                return result
            if result:
                return location
        return False

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        return BottleneckModel._match_location(peft_config, key)

    # ---- injection ----

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Check that every configured location matches modules, that no wrapped module sits inside another and
        that each has a bottleneck width (all before the model is changed), then inject as every tuner does."""
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        model_config = self.get_model_config(model)
        config = self._prepare_adapter_config(config, model_config)
        # the residual width, which a parallel adapter spans (None for models without a config saying it)
        widths = [model_config.get(k) for k in ("hidden_size", "n_embd", "d_model")]
        self._hidden_size = next((w for w in widths if isinstance(w, int) and not isinstance(w, bool)), None)
        if state_dict is None:
            self._check_targets(model, config)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _check_targets(self, model: nn.Module, config: BottleneckConfig) -> None:
        named = list(model.named_modules())
        layers = {k for k, m in named if isinstance(m, BaseTunerLayer)}
        found: dict[str, list[str]] = {loc: [] for loc in config.locations}
        for key, module in named:
            if not key or (layers and _is_under(key.rpartition(".")[0], layers)):
                continue
            location = self._match_location(config, key)
            if location:
                found[location].append(key)
        for location, keys in found.items():
            if not keys:
                raise ValueError(
                    f"BottleneckConfig.{location}_modules={config.modules_for(location)!r} matches no module of "
                    f"{type(model).__name__} (placement={config.placement!r}, exclude_modules="
                    f"{config.exclude_modules!r}); name existing modules, e.g. {_EXAMPLES[config.placement]}, or drop "
                    f"{location!r} from locations"
                )
        keys = sorted(k for ks in found.values() for k in ks)
        wrapped = set(keys)
        nested = [k for k in keys if _is_under(k.rpartition(".")[0], wrapped)]
        if nested:
            raise ValueError(
                f"BottleneckConfig: {nested[0]!r} lies inside another wrapped module; attention_modules / "
                "feedforward_modules must name modules that do not contain each other"
            )
        for key in keys:  # every module has a bottleneck width (fail before changing the model)
            module = model.get_submodule(key)
            if not isinstance(module, BottleneckLayer):
                try:
                    width = (module_features(module) if config.placement == "sequential"
                             else sublayer_features(module, self._hidden_size))[1]
                    bottleneck_width(config, width)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None

    def _create_and_replace(self, config: BottleneckConfig, adapter_name, target, target_name, parent,
                            current_key) -> None:
        location = self._match_location(config, current_key) or config.locations[0]
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, config, location=location)
            return
        new_module = _LAYER_CLS[config.placement](target, adapter_name, config, location=location,
                                                  hidden_size=getattr(self, "_hidden_size", None))
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    # ---- not mergeable ----

    def _check_merge_allowed(self) -> None:
        raise ValueError(NOT_MERGEABLE)
