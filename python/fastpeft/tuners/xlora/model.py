"""`XLoraModel`: X-LoRA (mixture of LoRA experts, https://huggingface.co/papers/2402.07148) with peft's interface,
module structure and checkpoint keys.

Structure (as peft): `XLoraModel.lora_model` is a `LoraModel` holding every expert (the adapters of
`XLoraConfig.adapters`, loaded from their directories under their names there), and
`XLoraModel.internal_xlora_classifier` the classifier. Each LoRA layer's forward is replaced by an X-LoRA one
(`layer.py`): the experts are mixed by ONE `multi_lora_mix` op per layer.

Forward (inside `PeftModel.forward` / `generate`, which enter `_enable_peft_forward_hooks`): a forward pre-hook
on the base model first runs the scaling pass (no grad, all expert weights = the scaling pass value, the last
hidden state requested; for a transformers model with a head only its backbone runs, as the head's output is
not used), feeds its last hidden state to the classifier, and then lets the real forward run
with the classifier's scalings [batch, seq, n_layers, n_experts] in every LoRA layer. With a scaling pass value
of 0 (the default) the experts add exactly nothing in the scaling pass, so it runs as the bare base model.

Checkpoint (`save_pretrained`): `adapter_config.json` (the XLoraConfig, expert directories included) and
`adapter_model.safetensors` with every classifier tensor under `base_model.internal_xlora_classifier.layers.N.*`,
the keys peft intends (peft 0.21.2 itself drops the layers whose index equals an expert name, so it cannot
reload its own checkpoints); plus, as peft also writes, each expert as a LoRA adapter in `<dir>/<expert name>`,
used on load when the original expert directory is gone.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ...checkpoint import (
    AdapterCheckpointError,
    load_adapter_config,
    load_peft_weights,
    save_adapter_files,
    set_peft_model_state_dict,
)
from ...training import add_extra_checkpoint_input
from ..base import BaseTuner
from ..lora import layer as lora_layer
from ..lora.model import LoraModel
from .classifier import XLoraClassifier
from .config import XLoraConfig
from .layer import XLoraConv2dLayer, XLoraEmbeddingLayer, XLoraLinearLayer, _ConstantScalings

_CLASSIFIER = "internal_xlora_classifier"
_HEAD_ONLY_KWARGS = ("labels", "logits_to_keep", "num_logits_to_keep")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _load_expert(lora_model: Optional[LoraModel], model: nn.Module, name: str, path: str, device,
                 autocast_adapter_dtype: bool) -> LoraModel:
    """Add the LoRA adapter saved in `path` to `lora_model` (created on the first call) under `name`."""
    config = load_adapter_config(path)
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"X-LoRA expert {name!r} at {path!r} is a {config.peft_type} adapter, not a LoRA adapter")
    config.inference_mode = False
    if lora_model is None:
        lora_model = LoraModel(model, {name: config}, name)
    else:
        lora_model.peft_config[name] = config
        lora_model.inject_adapter(model, name)
    weights = load_peft_weights(path, device=device)
    # peft's keys are relative to a PeftModel (base_model.model....); here they are loaded into the LoraModel
    weights = {k.removeprefix("base_model."): v for k, v in weights.items()}
    try:
        set_peft_model_state_dict(lora_model, weights, adapter_name=name)
    except AdapterCheckpointError as exc:
        raise AdapterCheckpointError(
            f"X-LoRA expert {name!r}: {os.path.join(os.fspath(path), 'adapter_model.safetensors')}: {exc}"
        ) from exc
    lora_model._cast_adapter_dtype(name, autocast_adapter_dtype=autocast_adapter_dtype)
    return lora_model


def resolve_expert_paths(config: XLoraConfig, model_id, adapters: Optional[dict] = None) -> None:
    """Where a saved X-LoRA model's experts are loaded from: `adapters` (name -> directory) when given, else the
    directories stored in the config, else the copies `save_pretrained` wrote to `<model_id>/<name>`."""
    if adapters is not None:
        config.adapters = dict(adapters)
        return
    resolved = {}
    for name, path in (config.adapters or {}).items():
        local = os.path.join(os.fspath(model_id), str(name))
        if not os.path.isdir(str(path)) and os.path.isfile(os.path.join(local, "adapter_config.json")):
            path = local
        resolved[name] = path
    config.adapters = resolved


class XLoraModel(BaseTuner):
    """X-LoRA over `model`: loads every LoRA expert of `config.adapters` and adds the scalings classifier.

    Args:
        model: the base model (a transformers model; `config.use_cache` must be False).
        config: an `XLoraConfig` (or dict adapter name -> config).
        adapter_name: the X-LoRA adapter's name (does not name the experts).
        torch_device: the device the experts are loaded to (default: the model's).
        autocast_adapter_dtype: upcast float16 / bfloat16 experts to float32 (as peft).
    """

    prefix: str = "lora_"

    def __init__(
        self,
        model: nn.Module,
        config: Union[dict[str, XLoraConfig], XLoraConfig],
        adapter_name: str = "default",
        torch_device: Optional[str] = None,
        ephemeral_gpu_offload: bool = False,
        autocast_adapter_dtype: bool = True,
        **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        conf = config[adapter_name] if isinstance(config, dict) else config
        if getattr(getattr(model, "config", None), "use_cache", False):
            raise ValueError("`use_cache` must be False")
        if not conf.adapters:
            raise ValueError("X-LoRA needs at least one LoRA adapter in `XLoraConfig.adapters`")
        self.xlora_config = conf
        self.peft_config = {adapter_name: conf}
        self.active_adapter = adapter_name
        self.targeted_module_names: list[str] = []
        self._scalings_state = None

        device = torch_device if torch_device is not None else _model_device(model)
        names = [str(name) for name in conf.adapters]
        lora_model = None
        for name, path in zip(names, conf.adapters.values()):
            lora_model = _load_expert(lora_model, model, name, path, device, autocast_adapter_dtype)
        self.lora_model = lora_model
        self.lora_model.set_adapter(names)
        self._maybe_freeze_all_adapters()

        n_layers, layer_device = self._convert_layers(model, conf)
        self.internal_xlora_classifier = XLoraClassifier(model, conf, len(names), n_layers, layer_device)
        self.internal_xlora_scalings = None
        self.disabled = False
        self.eval()

    def _convert_layers(self, model: nn.Module, conf: XLoraConfig):
        """Replace the forward of every LoRA Linear / Embedding / Conv2d layer (peft's order and numbering)."""
        total, device = 0, None
        for module in model.modules():
            if isinstance(module, lora_layer.Linear):
                cls, first = XLoraLinearLayer, module.lora_A[next(iter(module.lora_A))].weight
            elif isinstance(module, lora_layer.Embedding):
                cls, first = XLoraEmbeddingLayer, module.lora_embedding_A[next(iter(module.lora_embedding_A))]
            elif isinstance(module, lora_layer.Conv2d):
                cls, first = XLoraConv2dLayer, module.lora_A[next(iter(module.lora_A))].weight
            else:
                continue
            device = first.device
            layer = cls(model=self, target=module, target_forward=module.forward, layer_number=total, config=conf)
            module.forward = layer.forward
            total += 1
        return total, device

    def _maybe_freeze_all_adapters(self) -> None:
        if not self.xlora_config.use_trainable_adapters:
            # ".lora_" (not "lora_") so that the classifier ("internal_xlora_classifier") stays trainable
            for name, param in self.named_parameters():
                if ".lora_" in name:
                    param.requires_grad = False

    def __getattr__(self, name: str):
        """Forward missing attributes to the wrapped LoraModel."""
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name == "lora_model":
                raise
            return getattr(self.lora_model, name)

    # ---- forward ----

    def forward(self, *args, **kwargs):
        return self.lora_model.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        kwargs["use_cache"] = False
        res = self.lora_model.generate(*args, **kwargs)
        self._maybe_freeze_all_adapters()
        return res

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Around one PeftModel forward / generate: every base-model forward first runs the scaling pass."""
        if self.disabled:
            yield
            return
        self._bind_checkpointed_scalings()
        handle = self.lora_model.model.register_forward_pre_hook(self._scaling_pass, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self._scalings_state = None

    def _bind_checkpointed_scalings(self) -> None:
        """Gradient checkpointing recomputes a layer in backward, after this forward's scalings were cleared: each
        checkpointed layer runs, both times, with the scalings current when it was first called (a tensor of them
        goes in as a checkpoint input, so that reentrant checkpointing returns their gradient to the classifier)."""
        add_extra_checkpoint_input(self.lora_model.model, self._capture_scalings)

    def _capture_scalings(self, function):
        """``add_extra_checkpoint_input``'s capture: the scalings now, and how to run ``function`` with given ones."""

        def run_with(scalings, *args, **kwargs):
            previous = self._scalings_state
            self._scalings_state = scalings
            try:
                return function(*args, **kwargs)
            finally:
                self._scalings_state = previous

        return self._scalings_state, run_with

    def _scaling_pass(self, module: nn.Module, args: tuple, kwargs: dict):
        classifier = self.internal_xlora_classifier
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        self._scalings_state = _ConstantScalings(
            classifier.override_scaling_pass_value,
            lambda: classifier.make_dummy_scalings(input_ids=input_ids, inputs_embeds=inputs_embeds),
        )
        pass_kwargs = dict(kwargs)
        for key in _HEAD_ONLY_KWARGS:  # only the last hidden state is needed: no loss, no logits
            pass_kwargs.pop(key, None)
        pass_kwargs["output_hidden_states"] = True
        pass_kwargs["return_dict"] = True
        # A transformers model with a head (e.g. LlamaForCausalLM): run its backbone only (the same hidden
        # states; the head's output, often a vocabulary-sized GEMM, is not used). Otherwise the whole model.
        backbone = getattr(module, "base_model", None)
        use_backbone = isinstance(backbone, nn.Module) and backbone is not module and len(args) <= 1
        try:
            with torch.no_grad():
                if use_backbone:
                    base_output = backbone(*args, **pass_kwargs)
                else:
                    base_output = module.forward(*args, **pass_kwargs)  # .forward: this hook does not run again
            scalings = classifier(base_output, input_ids=input_ids, inputs_embeds=inputs_embeds)
        except BaseException:
            self._scalings_state = None
            raise
        self.internal_xlora_scalings = scalings
        self._scalings_state = scalings
        return None

    # ---- peft's BaseTuner hooks (X-LoRA injects nothing itself) ----

    @staticmethod
    def _prepare_adapter_config(peft_config, _model_config):
        return peft_config

    def _mark_only_adapters_as_trainable(self, *args, **kwargs) -> None:
        """Does nothing: the experts' trainability is `use_trainable_adapters`."""

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Does nothing: each expert is cast when it is loaded."""

    def _create_and_replace(self, *args, **kwargs) -> None:
        pass

    @staticmethod
    def _check_target_module_exists(lora_config, key):
        return False

    def enable_adapter_layers(self) -> None:
        """Enable X-LoRA."""
        self.disabled = False

    def disable_adapter_layers(self) -> None:
        """Disable X-LoRA: the LoRA layers compute their base layer only."""
        self.disabled = True

    # ---- peft's X-LoRA API ----

    def set_topk_lora(self, value: Optional[int]) -> None:
        """Keep only the `value` experts with the largest weights per token (None: dense); reflected in the config."""
        self.internal_xlora_classifier.config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        """Set the factor on every expert's output (default 1); reflected in the config."""
        self.internal_xlora_classifier.config.global_scaling_weight = weight

    def set_scaling_pass_value(self, value: Optional[float]) -> None:
        """Set the expert weight of the scaling pass; None means 1 / number of experts."""
        self.internal_xlora_classifier._set_override_scaling_pass_value(value)

    def get_global_scaling_weight(self) -> float:
        return self.internal_xlora_classifier.config.global_scaling_weight

    def get_latest_scalings(self) -> Optional[torch.Tensor]:
        """The latest scalings [batch, seq, n_layers, n_experts], or None before the first forward."""
        return self.internal_xlora_scalings

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the list of logged scalings (the tensors are not copied)."""
        return self.internal_xlora_classifier.log_scalings.copy()

    def enable_scalings_logging(self) -> None:
        self.internal_xlora_classifier.scalings_logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging (the log is kept)."""
        self.internal_xlora_classifier.scalings_logging = False

    def clear_scalings_log(self) -> None:
        self.internal_xlora_classifier.log_scalings.clear()

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log bucketed by seq_len: seq_len -> (positions in the log, tensors)."""
        return self.internal_xlora_classifier._get_bucketed_scalings()

    # ---- checkpoints ----

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        return {k: v for k, v in state_dict.items() if f"{_CLASSIFIER}." in k}

    @staticmethod
    def _remove_adapter_name_from_key(key: str, adapter_name: str) -> str:
        return key  # X-LoRA keys carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict, model_to_ckpt=None):
        expected = [k for k in model.state_dict() if f"{_CLASSIFIER}." in k]
        missing = [k for k in expected if k not in state_dict]
        if missing:
            from ...checkpoint import AdapterCheckpointError

            raise AdapterCheckpointError(
                f"the X-LoRA checkpoint lacks {len(missing)} classifier tensor(s): {sorted(missing)[:10]}. "
                "(peft 0.21's X-LoRA save_pretrained drops the classifier layers whose index equals an expert "
                "name, e.g. layers.0 with experts named '0', '1', ...; such a checkpoint cannot be restored.)"
            )
        return state_dict

    def _save_experts(self, save_directory: str, is_main_process: bool = True) -> None:
        """Write every expert as a LoRA adapter directory `<save_directory>/<expert name>` (peft's layout)."""
        if not is_main_process:
            return
        for name, lora_config in self.lora_model.peft_config.items():
            tensors = {}
            for module_name, module in self.lora_model.named_modules():
                if not isinstance(module, lora_layer.LoraLayer):
                    continue
                for attr in module.adapter_layer_names:
                    container = getattr(module, attr, None)
                    if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or name not in container:
                        continue
                    item = container[name]
                    key = f"base_model.{module_name}.{attr}"
                    if isinstance(item, torch.Tensor):
                        tensors[key] = item.detach()
                    else:
                        for pname, p in item.named_parameters():
                            tensors[f"{key}.{pname}"] = p.detach()
            out_dir = os.path.join(save_directory, name)
            to_save = copy.copy(lora_config)
            to_save.inference_mode = True
            # weights and config committed together: a killed save leaves the previous expert or the new one
            save_adapter_files(out_dir, tensors, to_save.to_json_text(), metadata={"format": "pt"})
