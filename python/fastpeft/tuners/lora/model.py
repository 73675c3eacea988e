"""`LoraModel`: injects LoRA / DoRA layers into a model (peft's LoraModel interface and state-dict keys)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ..base import BaseTuner, BaseTunerLayer, get_pattern_key
from .config import LoraConfig
from .layer import LoraLayer, dispatch_default

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
            if target_modules is None:
                raise ValueError(
                    "Please specify `target_modules` in `peft_config`: no default is known for model_type "
                    f"{model_config.get('model_type')!r}"
                )
            peft_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)
        return peft_config

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), current_key), lora_config.r)
        alpha = lora_config.alpha_pattern.get(
            get_pattern_key(lora_config.alpha_pattern.keys(), current_key), lora_config.lora_alpha
        )
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, r, lora_alpha=alpha, config=lora_config)
            return
        new_module = self._create_new_module(lora_config, adapter_name, target, r=r, lora_alpha=alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

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

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Mixed-adapter batches (peft's ``adapter_names``): one adapter per row, ``"__base__"`` for none; the
        LoRA Linear layers run them through the segmented multi-LoRA op (see tuners/lora/mixed.py)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if kwargs.get("alora_offsets") is not None:
            raise NotImplementedError("fastpeft does not support aLoRA (`alora_offsets`)")
        if adapter_names is None:
            yield
            return
        from .mixed import install_hooks

        handles = install_hooks(self, adapter_names, kwargs.get("num_beams"))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
