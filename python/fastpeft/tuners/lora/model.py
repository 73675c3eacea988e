"""`LoraModel`: injects LoRA / DoRA layers into a model (peft's LoraModel interface and state-dict keys)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
import os
import re
import warnings
from typing import Literal, Optional, Union

import torch
from torch import nn

from torch.nn.utils import parametrize

from .. import merge_utils
from ..base import _get_submodules
from ..base import BaseTuner, BaseTunerLayer, ModulesToSaveWrapper, _is_tied_target, get_pattern_key
from .config import LoraConfig
from .inits import adapter_weights_assigned_later
from .layer import LoraLayer, _ConvNd, dispatch_default

_SVD_COMBINATIONS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_FACTOR_COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_MERGE_FNS = {
    "linear": lambda t, w, density, sign: merge_utils.task_arithmetic(t, w),
    "svd": lambda t, w, density, sign: merge_utils.task_arithmetic(t, w),
    "ties": lambda t, w, density, sign: merge_utils.ties(t, w, density, sign),
    "dare_linear": lambda t, w, density, sign: merge_utils.dare_linear(t, w, density),
    "dare_ties": lambda t, w, density, sign: merge_utils.dare_ties(t, w, density, sign),
    "magnitude_prune": lambda t, w, density, sign: merge_utils.magnitude_prune(t, w, density),
}

# model_type -> default target_modules when the config leaves them None (peft's mapping).
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: dict[str, Union[list[str], str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


class LoraModel(BaseTuner):
    """Creates LoRA (or DoRA) adapters on a model.

    Args:
        model: the base model; modified in place (available as `.model`).
        peft_config: a `LoraConfig`, or a dict adapter name -> `LoraConfig`.
        adapter_name: the name of the adapter to create (default "default").

    Layers supported: nn.Linear, fastpeft's LinearNF4 (QLoRA), transformers' Conv1D, nn.Embedding, nn.Conv1d,
    nn.Conv2d. The result has peft's structure, so `state_dict()` keys are the ones peft produces for the same
    model and config.
    """

    prefix: str = "lora_"
    tuner_layer_cls = LoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config: LoraConfig) -> None:
        super()._check_new_adapter_config(config)
        unsupported = config.unsupported_features()
        if unsupported:
            raise NotImplementedError(
                f"fastpeft's LoRA does not support these LoraConfig settings yet: {', '.join(unsupported)}"
            )
        # adapters with target_parameters must all target the same parameters: which parameter a LoRA weight belongs
        # to is encoded by its place in the nest of ParamWrappers (peft's rule and message)
        target_parameters = getattr(config, "target_parameters", None)
        if target_parameters:
            for name, other in self.peft_config.items():
                other_targets = getattr(other, "target_parameters", None)
                if other is not config and other_targets and set(other_targets) != set(target_parameters):
                    raise ValueError(
                        "When using multiple adapters with `target_parameters`, all adapters must target the same set "
                        f"of parameters, but got {sorted(target_parameters)} for the new adapter and "
                        f"{sorted(other_targets)} for adapter '{name}'."
                    )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """BaseTuner.inject_adapter; with init_lora_weights="loftq", one tqdm bar counts the LoftQ layers."""
        if getattr(self.peft_config[adapter_name], "init_lora_weights", None) != "loftq":
            return super().inject_adapter(model, adapter_name, *args, **kwargs)
        from ...quant.loftq import loftq_progress

        with loftq_progress():
            return super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _prepare_adapter_config(self, peft_config: LoraConfig, model_config: dict) -> LoraConfig:
        if peft_config.target_modules is None:
            target_modules = self.target_module_mapping.get(model_config.get("model_type"))
            if target_modules is None and peft_config.target_parameters:
                return peft_config  # parameters only (peft); a known model type still gets its default modules
            if target_modules is None:
                raise ValueError(
                    "Please specify `target_modules` in `peft_config`: no default is known for model_type "
                    f"{model_config.get('model_type')!r}"
                )
            peft_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)
        return peft_config

    def _create_and_replace(
        self, lora_config, adapter_name, target, target_name, parent, current_key, *, parameter_name=None
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), current_key), lora_config.r)
        alpha = lora_config.alpha_pattern.get(
            get_pattern_key(lora_config.alpha_pattern.keys(), current_key), lora_config.lora_alpha
        )
        if parameter_name is not None:  # target_parameters: LoRA on the parameter `parameter_name` of `target`
            self._create_and_replace_param(lora_config, adapter_name, target, target_name, parent, parameter_name, r, alpha)
            return
        from ..adalora.layer import AdaLoraLayer  # here: adalora imports this module

        # an AdaLoRA layer is a LoraLayer too, but in a mixed model (PeftMixedModel) it is another method's
        # layer, which a LoRA adapter wraps (as peft) instead of adding itself to it
        if isinstance(target, LoraLayer) and not isinstance(target, AdaLoraLayer):
            target.update_layer(adapter_name, r, lora_alpha=alpha, config=lora_config)
            if _is_tied_target(lora_config, current_key):
                self._tie_to_embedding_adapter(target, adapter_name)
            return
        new_module = self._create_new_module(lora_config, adapter_name, target, r=r, lora_alpha=alpha)
        if _is_tied_target(lora_config, current_key):
            self._tie_to_embedding_adapter(new_module, adapter_name)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    # ---- ensure_weight_tying (peft's semantics) ----

    def _tie_to_embedding_adapter(self, layer: nn.Module, adapter_name: str) -> None:
        """A layer tied to the input embedding (lm_head) takes the embedding's LoRA, transposed: its lora_A / lora_B
        weights are views of lora_embedding_B / lora_embedding_A (shared storage, as peft)."""
        embedding = self.model.get_input_embeddings()
        if not isinstance(layer, LoraLayer) or adapter_name not in getattr(embedding, "lora_embedding_A", {}):
            raise ValueError(f"ensure_weight_tying: cannot tie {type(layer).__name__} to the input embedding's "
                             f"adapter {adapter_name!r}; only Linear layers tied to a LoRA embedding can be tied")
        layer.lora_A[adapter_name].weight = nn.Parameter(embedding.lora_embedding_B[adapter_name].t())
        layer.lora_B[adapter_name].weight = nn.Parameter(embedding.lora_embedding_A[adapter_name].t())
        # (kept outside the module tree, not a submodule: merging skips the delta the embedding's merge already wrote;
        # a strong reference, as merge_and_unload may drop the embedding's LoRA layer before it reaches this one)
        layer.__dict__.setdefault("_tied_embedding", {})[adapter_name] = embedding

    def _add_modules_to_save_to_tie(self, peft_config: LoraConfig, tied_names: list[str]) -> None:
        """The input embedding goes into `modules_to_save`, the layers tied to it leave it (their copies share the
        embedding's copy, see BaseTuner.inject_adapter); the config is updated in place, as peft."""
        peft_config.modules_to_tie = set(tied_names)
        modules_to_save = getattr(peft_config, "modules_to_save", None) or []
        embedding_name = _module_name(self.model, self.model.get_input_embeddings())
        if embedding_name not in modules_to_save:
            modules_to_save.append(embedding_name)
        _drop_names_matching(modules_to_save, peft_config.modules_to_tie)
        peft_config.modules_to_save = modules_to_save

    def _add_targets_to_tie(self, peft_config: LoraConfig, tied_names: list[str]) -> None:
        """The input embedding goes into `target_modules`, the layers tied to it leave it (they get the embedding's
        adapter, transposed); the config is updated in place, as peft."""
        peft_config.target_modules_to_tie = set(tied_names)
        embedding_name = _module_name(self.model, self.model.get_input_embeddings())
        raw = peft_config.target_modules
        if isinstance(raw, str):
            suffix = rf"|^{re.escape(embedding_name)}$)"
            if not (raw.startswith("(?:") and raw.endswith(suffix)):  # not again on reload (peft nests it again)
                peft_config.target_modules = rf"(?:{raw}{suffix}"
            return
        target_modules = set(raw or [])
        target_modules.add(embedding_name)
        _drop_names_matching(target_modules, peft_config.target_modules_to_tie)
        peft_config.target_modules = target_modules

    # ---- target_parameters (peft's lora.ParamWrapper) ----

    def _create_and_replace_param(self, lora_config, adapter_name, target, target_name, parent, parameter_name, r, alpha):
        from .param_wrapper import ParamWrapper

        if isinstance(target, ParamWrapper) and adapter_name not in target.lora_A:
            target.update_layer(adapter_name, r, lora_alpha=alpha, config=lora_config)  # a further adapter
            return
        if isinstance(target, ParamWrapper) and target.parameter_name == parameter_name:
            raise ValueError(f"Trying to target the nn.Parameter '{parameter_name}' of '{target_name}' twice")
        new_module = ParamWrapper(target, adapter_name, parameter_name, config=lora_config, r=r, lora_alpha=alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    def _inject_parameters(self, peft_config: LoraConfig, model: nn.Module, adapter_name: str) -> list[str]:
        """Wrap the parameters named by `peft_config.target_parameters` (peft's matching: the parameter's full name
        without `.base_layer` segments equals a name or ends with `.<name>`); returns the names wrapped.

        Modules are visited in `named_modules()` order and a module's parameters in registration order, so with
        several parameters of one module the first is wrapped innermost (peft's nesting, hence its keys). A further
        adapter is added to the existing wrappers. A parameter registered on the model itself cannot be wrapped."""
        from .param_wrapper import ParamWrapper

        names = sorted(set(peft_config.target_parameters))
        targeted: list[str] = []
        wrapper_names = {k for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        for module_name, module in list(model.named_modules()):
            parts = module_name.split(".") if module_name else []
            # inside an adapter layer only the chain of base_layers leads to base-model parameters
            if any(".".join(parts[:i]) in wrapper_names and parts[i] != "base_layer" for i in range(len(parts))):
                continue
            plain_name = ".".join(p for p in parts if p != "base_layer")
            exact_only = parametrize.is_parametrized(module)  # a parametrized parameter: exact names only (peft)
            if exact_only:
                candidates = [k.rpartition(".")[2] for k in names if k.rpartition(".")[0] == plain_name]
                candidates = [c for c in candidates if c in module.parametrizations]
            else:
                candidates = [n for n, _ in module.named_parameters(recurse=False)]
            for param_name in candidates:
                key = f"{plain_name}.{param_name}" if plain_name else param_name
                if not exact_only and not (key in names or any(key.endswith(f".{t}") for t in names)):
                    continue
                if not module_name:
                    raise ValueError(
                        f"Targeting an nn.Parameter on the top-level module is not supported (parameter "
                        f"'{param_name}'). Move the parameter into a submodule or remove it from `target_parameters`."
                    )
                parent, target, target_name = _get_submodules(model, module_name)
                owner = model.get_submodule(plain_name)
                if isinstance(owner, BaseTunerLayer) and not isinstance(owner, ParamWrapper):
                    raise ValueError(
                        f"Trying to wrap an `nn.Parameter` of layer '{plain_name}' of type {type(target).__name__}, "
                        "which is not a valid target. Make sure that this layer is not also targeted with "
                        "`target_modules`. For some models, PEFT will do this automatically, try setting "
                        "`target_modules=[]` to prevent it."
                    )
                existing = owner
                while isinstance(existing, ParamWrapper) and existing.parameter_name != param_name:
                    existing = existing.base_layer
                if isinstance(existing, ParamWrapper):
                    target = existing  # wrapped for an earlier adapter: add this one to that wrapper
                self._create_and_replace(
                    peft_config, adapter_name, target, target_name, parent, current_key=key, parameter_name=param_name
                )
                targeted.append(key)
        return targeted

    @staticmethod
    def _create_new_module(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        new_module = dispatch_default(target, adapter_name, lora_config, **kwargs)
        if new_module is None:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            raise ValueError(
                f"Target module {type(base).__name__} is not supported. Currently, only the following modules are "
                "supported: `torch.nn.Linear`, `fastpeft.LinearNF4`, `torch.nn.Embedding`, `torch.nn.Conv1d`, "
                "`torch.nn.Conv2d`, `transformers.pytorch_utils.Conv1D`."
            )
        return new_module

    def _check_merge_allowed(self) -> None:
        if getattr(self.model, "quantization_method", None) == "gptq":
            raise ValueError("Cannot merge LORA layers when the model is gptq quantized")
        if any(getattr(c, "layer_replication", None) for c in self.peft_config.values()):
            raise ValueError("Cannot merge LORA layers when base model layers are replicated")

    def _prepare_model(self, peft_config: LoraConfig, model: nn.Module) -> None:
        if peft_config.layer_replication:
            from .replication import replicate_layers

            replicate_layers(model, peft_config.layer_replication)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
        *, requantize: bool = False, dtype: Optional[torch.dtype] = None,
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model (no adapter layers).

        LoRA layers on fastpeft NF4 layers (QLoRA) are replaced by an ``nn.Linear`` holding
        ``dequant(W) + dW`` (DoRA: rescaled), merged in float32 and stored in ``dtype`` (default: the NF4
        layer's ``compute_dtype``, else its original weight dtype), so the merge adds no quantisation
        error. With ``requantize=True`` they are replaced by a new ``LinearNF4`` of the merged weight
        instead (same blocksize, double quantisation and compute dtype; ``dtype`` is then unused). That
        adds NF4 rounding error, which is measured per layer against the float32 merged weight
        (max abs and relative Frobenius error), logged (logger ``fastpeft.qlora``, INFO per layer),
        summarised in a warning, and kept: ``model.nf4_requantization_report`` (a
        :class:`~fastpeft.tuners.lora.nf4.RequantizationReport`) and each layer's
        ``requantization_error``. Layers on other base layers merge as usual.
        """
        self._check_merge_allowed()
        model = self._unload_and_optionally_merge(
            merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names,
            merge_kwargs={"requantize": requantize, "dtype": dtype},
        )
        if requantize:
            from .nf4 import RequantizationReport, logger

            report = RequantizationReport(dict(self._merge_infos))
            for name, err in report.layers.items():
                logger.info("re-quantised %s: max abs error %.3e, relative Frobenius error %.3e",
                            name, err.max_abs, err.rel_fro)
            if report.layers:
                warnings.warn(str(report))
            model.nf4_requantization_report = report
        return model

    # ---- weighted combination (peft's add_weighted_adapter) ----

    def _check_add_weighted_adapter(
        self, adapters: list[str], combination_type: str, svd_rank: Optional[int]
    ) -> tuple[str, int, Union[str, set]]:
        """Validate the arguments of `add_weighted_adapter`; return (combination type, new rank, new target_modules)."""
        for adapter in adapters:
            if adapter not in self.peft_config:
                raise ValueError(f"Adapter {adapter} does not exist")
        for adapter in adapters:
            if getattr(self.peft_config[adapter], "target_parameters", None):
                raise ValueError(
                    f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{adapter}')"
                )
        wrappers = [m for m in self.modules() if isinstance(m, ModulesToSaveWrapper)]
        shared = [w for w in wrappers if sum(a in w.modules_to_save for a in adapters) > 1]
        if shared:
            raise ValueError(
                "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                f"{len(shared)} such instance(s)."
            )
        if len(adapters) == 1:  # one adapter: only a (scaled) copy makes sense
            combination_type = "linear"
        ranks = [
            c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values())
            for c in (self.peft_config[a] for a in adapters)
        ]
        if combination_type in _FACTOR_COMBINATIONS:
            if len(set(ranks)) != 1:
                raise ValueError(
                    "All adapters must have the same r value when using combination_type linear, ties, dare_ties, "
                    f"dare_linear or magnitude_prune (got ranks {dict(zip(adapters, ranks))}); use 'cat' or an "
                    "'*svd' combination_type for adapters of different ranks."
                )
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type in _SVD_COMBINATIONS:
            new_rank = svd_rank or max(ranks)
        else:
            raise ValueError(
                f"Invalid combination_type: {combination_type} (expected one of "
                f"{', '.join(('cat',) + _FACTOR_COMBINATIONS + _SVD_COMBINATIONS)})"
            )
        target_types = {type(self.peft_config[a].target_modules) for a in adapters}
        if not target_types:
            raise ValueError(f"Found no adapter matching the names in {adapters}")
        if len(target_types) > 1:
            raise ValueError(
                "all adapter configs should follow the same target modules type. "
                "Combining adapters with `target_modules` type being a mix of list/set and string is not supported."
            )
        kind = target_types.pop()
        if kind is str:
            new_targets = "|".join(f"({self.peft_config[a].target_modules})" for a in adapters)
        elif kind in (set, list):
            new_targets = functools.reduce(operator.or_, (set(self.peft_config[a].target_modules) for a in adapters))
        else:
            raise TypeError(f"Invalid type {kind} found in target_modules")
        return combination_type, new_rank, new_targets

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: Literal[
            "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
            "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd",
        ] = "svd",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: bool = True,
        svd_driver: Optional[str] = None,
        density: Optional[float] = None,
        majority_sign_method: Literal["total", "frequency"] = "total",
    ) -> None:
        """Add adapter `adapter_name` combining `adapters` with `weights` (peft's method, arguments and results).

        - "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": the A factors are combined with weights
          sign(w s) sqrt(|w s|) and the B factors with sqrt(|w s|) (s: each adapter's scaling), each by the named
          merge of `fastpeft.tuners.merge_utils`; all adapters need the same rank. An approximation of the
          weighted sum of the deltas.
        - "cat": A and B are the concatenations (rank = sum of ranks): exactly sum_i w_i dW_i.
        - "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd": the deltas dW_i are merged
          (weighted sum, or the named merge), and the result truncated to rank `svd_rank` (default: the largest
          rank) by `torch.linalg.svd(full_matrices=svd_full_matrices, driver=svd_driver)`; `svd_clamp` clamps both
          factors to the +-`svd_clamp` quantile of their entries.

        `density` (the fraction kept) is needed by the ties / dare / magnitude_prune types, `majority_sign_method`
        ("total" or "frequency") is used by the ties types. The dare types draw with torch's RNG in peft's order
        (layers in module order, adapters in list order, A before B), so a fixed seed reproduces peft's result.
        The new adapter has lora_alpha = r (scaling 1 without rslora), is not active and not trainable; a layer
        that some adapters lack combines only the others. Does nothing if `adapter_name` already exists (as peft).
        """
        if adapter_name in self.peft_config:
            return
        if len(weights) != len(adapters):
            raise ValueError(f"Got {len(weights)} weights for {len(adapters)} adapters; pass one weight per adapter")
        combination_type, new_rank, new_targets = self._check_add_weighted_adapter(adapters, combination_type, svd_rank)

        self.peft_config[adapter_name] = dataclasses.replace(
            self.peft_config[adapters[0]], r=new_rank, lora_alpha=new_rank, target_modules=new_targets,
            alpha_pattern={}, rank_pattern={},
        )
        try:
            with adapter_weights_assigned_later():  # e.g. a CorDA adapter's init needs data it cannot have here
                self.inject_adapter(self.model, adapter_name)
            for layer in [m for m in self.model.modules() if isinstance(m, LoraLayer)]:
                self._combine_into_layer(
                    layer, adapters, weights, adapter_name, combination_type, new_rank, svd_clamp,
                    svd_full_matrices, svd_driver, density, majority_sign_method,
                )
        except Exception:
            if adapter_name in self.peft_config:  # leave no half-built adapter behind
                try:
                    self.delete_adapter(adapter_name)
                except Exception:  # pragma: no cover - the original error is the one to report
                    self.peft_config.pop(adapter_name, None)
            raise
        for name, param in self.model.named_parameters():
            if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
                param.requires_grad = False

    @staticmethod
    def _factors(layer: LoraLayer, adapter: str):
        """(A, B) weight tensors of `adapter` in `layer` (linear / conv modules or embedding parameters), or None."""
        if adapter in layer.lora_A:
            return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if adapter in layer.lora_embedding_A:
            return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
        return None

    def _combine_into_layer(
        self, layer, adapters, weights, adapter_name, combination_type, new_rank, svd_clamp, full_matrices, driver,
        density, majority_sign_method,
    ) -> None:
        target = self._factors(layer, adapter_name)
        if target is None:
            return
        target_A, target_B = target
        present = [(a, w) for a, w in zip(adapters, weights) if self._factors(layer, a) is not None]
        if not present:
            raise ValueError(f"No matching LoRAs found in layer {type(layer).__name__} for adapters {adapters}")
        with torch.no_grad():
            if combination_type == "cat":
                loras_A = torch.cat(
                    [self._factors(layer, a)[0] * w * float(layer.scaling[a]) for a, w in present], dim=0
                )
                loras_B = torch.cat([self._factors(layer, a)[1] for a, _ in present], dim=1)
                target_A.zero_()
                target_B.zero_()
                target_A[: loras_A.shape[0]] = loras_A
                target_B[:, : loras_B.shape[1]] = loras_B
            elif combination_type in _SVD_COMBINATIONS:
                new_A, new_B = self._svd_combination(
                    layer, present, combination_type, new_rank, target_A, target_B, density, majority_sign_method,
                    svd_clamp, full_matrices, driver,
                )
                target_A.data, target_B.data = new_A, new_B
            else:
                weights_A, weights_B, deltas_A, deltas_B = [], [], [], []
                for adapter, weight in present:
                    a, b = self._factors(layer, adapter)
                    scaled = weight * float(layer.scaling[adapter])
                    root = math.sqrt(abs(scaled))
                    # the sign goes on one factor only (on both it would cancel)
                    weights_A.append(root if scaled >= 0 else -root)
                    weights_B.append(root)
                    deltas_A.append(a.detach())
                    deltas_B.append(b.detach())
                merge = _MERGE_FNS[combination_type]
                dtype = deltas_A[0].dtype
                new_A = merge(deltas_A, torch.tensor(weights_A).to(deltas_A[0].device), density, majority_sign_method)
                new_B = merge(deltas_B, torch.tensor(weights_B).to(deltas_B[0].device), density, majority_sign_method)
                target_A.data, target_B.data = new_A.to(dtype), new_B.to(dtype)

    @staticmethod
    def _svd_combination(
        layer, present, combination_type, new_rank, target_A, target_B, density, majority_sign_method, clamp,
        full_matrices, driver,
    ):
        is_embedding = any(a in layer.lora_embedding_A for a, _ in present)
        deltas = [layer.get_delta_weight(a).detach() for a, _ in present]  # scaling included
        weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
        merge = _MERGE_FNS[combination_type.removesuffix("_svd")]
        delta = merge(deltas, weights, density, majority_sign_method)
        conv = isinstance(layer, _ConvNd)
        if conv:
            kernel = layer.get_base_layer().weight.shape[2:]
            delta = delta.squeeze() if all(k == 1 for k in kernel) else delta.flatten(start_dim=1)
        if getattr(layer, "fan_in_fan_out", False) or is_embedding:
            delta = delta.T
        U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
        U = U[:, :new_rank] @ torch.diag(S[:new_rank])
        Vh = Vh[:new_rank, :]
        if clamp is not None:
            hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
            U = U.clamp(-hi, hi)
            Vh = Vh.clamp(-hi, hi)
        if conv:
            U = U.reshape(target_B.shape)
            Vh = Vh.reshape(target_A.shape)
        return Vh, U

    # ---- converting an adapter that changed the base weights into a plain LoRA (peft's API) ----

    @classmethod
    def _convert_state_dict_for_initial_model(
        cls, peft_model, peft_config, path_initial_model_for_weight_conversion, output_state_dict, kwargs
    ):
        """`save_pretrained(..., path_initial_model_for_weight_conversion=...)`: the adapter saved at that path right
        after a PiSSA / OLoRA / CorDA / LoRA-GA init (with init_lora_weights=True) is loaded, and the trained adapter
        becomes a rank-2r LoRA for the *original* base weights (see `subtract_mutated_init`)."""
        if peft_config.use_rslora and (peft_config.rank_pattern or peft_config.alpha_pattern):
            raise ValueError(
                "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
                "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
            )
        if not any(str(peft_config.init_lora_weights).lower().startswith(p)
                   for p in ("pissa", "corda", "olora", "lora_ga", "true")):
            warnings.warn(
                "`path_initial_model_for_weight_conversion` only works for converting a PiSSA/CorDA/OLoRA/LoRA-GA "
                "adapter to a LoRA adapter"
            )
        initial_name = os.path.basename(path_initial_model_for_weight_conversion)
        try:
            peft_model.load_adapter(
                os.path.dirname(path_initial_model_for_weight_conversion), subfolder=initial_name,
                adapter_name=initial_name,
            )
            init = str(peft_model.peft_config[initial_name].init_lora_weights).lower()
            if init.startswith("pissa") or init in ("corda", "olora", "lora_ga"):
                raise ValueError(
                    "The `init_lora_weights` parameter of the initial adapter should be set to `True`. Otherwise, "
                    "`self.load_adapter` will subtract the decomposed values again based on the residual model."
                )
            return peft_model.base_model.subtract_mutated_init(output_state_dict, initial_name, kwargs)
        finally:
            peft_model.delete_adapter(initial_name)

    def subtract_mutated_init(self, output_state_dict: dict, adapter_name: str, kwargs=None) -> dict:
        """The trained adapter in `output_state_dict` (A, B; trained on W_res = W - s B0 A0) as a LoRA for W itself:
        W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0], with A0, B0 the initial adapter `adapter_name`.
        Keys are those of `output_state_dict` (peft's: "base_model.model.<module>.lora_A.weight")."""
        converted = {}
        for key, tensor in output_state_dict.items():
            kind = "lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else None
            if kind is None or not key.endswith(".weight"):
                converted[key] = tensor
                continue
            # the first component is the PeftModel's `base_model`, i.e. this LoraModel
            module_path = key.split(f".{kind}.")[0].split(".", 1)[1]
            initial = getattr(self.get_submodule(module_path), kind)[adapter_name].weight.detach()
            initial = initial.to(device=tensor.device, dtype=tensor.dtype)
            converted[key] = torch.cat([tensor, initial], 0) if kind == "lora_A" else torch.cat([tensor, -initial], 1)
        return converted

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Mixed-adapter batches (peft's ``adapter_names``): one adapter per row, ``"__base__"`` for none; the
        LoRA Linear layers run them through the segmented multi-LoRA op (see tuners/lora/mixed.py). aLoRA
        (``alora_offsets``, per row the number of trailing tokens an aLoRA adapter acts on): see
        tuners/lora/alora.py."""
        adapter_names = kwargs.pop("adapter_names", None)
        alora_offsets = kwargs.pop("alora_offsets", None)
        if adapter_names is None and alora_offsets is None:
            yield
            return
        handles = []
        try:
            if alora_offsets is not None:
                handles += self._install_alora_hooks(alora_offsets, kwargs.get("num_beams"))
            if adapter_names is not None:
                from .param_wrapper import ParamWrapper

                if any(isinstance(m, ParamWrapper) for m in self.model.modules()):  # peft's error (class, message)
                    raise ValueError("lora.ParamWrapper does not support mixed adapter batches yet.")
                from .mixed import install_hooks

                handles += install_hooks(self, adapter_names, kwargs.get("num_beams"))
            yield
        finally:
            for h in handles:
                h.remove()

    def _install_alora_hooks(self, alora_offsets, num_beams=None) -> list:
        """aLoRA (see alora.py): one AloraOffsets for this forward / generate, handed to every LoRA layer that holds an
        aLoRA adapter by a forward pre-hook (peft's mechanism). Returns the hook handles."""
        from .alora import AloraOffsets

        if isinstance(num_beams, int) and num_beams > 1:
            raise ValueError("Beam search not yet supported for aLoRA.")  # peft's error
        offsets = AloraOffsets(alora_offsets)
        layers = [m for m in self.model.modules()
                  if isinstance(m, LoraLayer) and getattr(m, "alora_invocation_tokens", None)]
        handles = [layer.register_forward_pre_hook(functools.partial(_alora_pre_forward_hook, offsets=offsets),
                                                   with_kwargs=True) for layer in layers]
        if layers and self.training and torch.is_grad_enabled():
            try:
                from transformers.modeling_layers import GradientCheckpointingLayer
            except ImportError:  # no transformers (or one without checkpointed layers): nothing is recomputed
                GradientCheckpointingLayer = None
            for module in self.model.modules():
                if (GradientCheckpointingLayer is not None and isinstance(module, GradientCheckpointingLayer)
                        and getattr(module, "gradient_checkpointing", False) and module.training):
                    _arm_alora_recomputation(module, offsets)
        return handles


def _alora_pre_forward_hook(module, args, kwargs, offsets):
    kwargs["alora_offsets"] = offsets
    return args, kwargs


def _arm_alora_recomputation(block: nn.Module, offsets) -> None:
    """Gradient checkpointing (transformers' GradientCheckpointingLayer): the block's forward runs again in backward,
    after the forward's hooks are gone, so the block itself gets a pre-hook that hands `offsets` to its aLoRA layers
    whenever it runs, removed (with what it added) by the block's backward hook (peft's mechanism and error)."""
    sublayers = [m for m in block.modules() if isinstance(m, LoraLayer) and getattr(m, "alora_invocation_tokens", None)]
    if not sublayers:
        return
    if block.__dict__.get("_fastpeft_alora_gc_hooks"):
        raise ValueError(
            "Multiple invocations of PEFT forward hooks before .backward() with enabled gradient "
            "checkpointing. Disable gradient checkpointing or only call forward once per backward."
        )
    pending: list = []
    block.__dict__["_fastpeft_alora_gc_hooks"] = pending

    def on_forward(module, args):
        for layer in sublayers:
            pending.append(layer.register_forward_pre_hook(
                functools.partial(_alora_pre_forward_hook, offsets=offsets), with_kwargs=True))

    def on_backward(module, grad_input, grad_output):
        while pending:
            pending.pop().remove()

    pending.append(block.register_forward_pre_hook(on_forward))
    pending.append(block.register_full_backward_hook(on_backward))


def _module_name(model: nn.Module, module: nn.Module) -> str:
    """The name of `module` in `model` ("" if absent; peft's find_parameter_name_by_module)."""
    return next((name for name, m in model.named_modules() if m is module), "")


def _drop_names_matching(names, tied_keys) -> None:
    """Remove from `names` (a list or set, in place), for each tied module key, the first name that matches it as a
    dotted suffix (peft's rule): a tied layer leaves the config, it follows the embedding instead."""
    for key in tied_keys:
        for name in names:
            if re.match(rf"(^|.*\.){name}($|\..*)", key):
                names.remove(name)
                break
