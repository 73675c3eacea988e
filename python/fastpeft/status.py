"""peft's adapter status report: `get_layer_status` / `get_model_status` and their dataclasses.

`PeftModel.get_layer_status()` / `.get_model_status()` call these; they also take a plain model into which adapters
were injected (`inject_adapter_in_model`). The fields and their values are peft's.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Optional, Union

from torch import nn

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _all_or_none(values) -> Union[bool, Irregular]:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _available_adapters(module: nn.Module) -> set[str]:
    own = getattr(module, "_get_available_adapters", None)
    if callable(own):
        try:
            return set(own())
        except NotImplementedError:
            pass
    names: set[str] = set()
    for attr in getattr(module, "adapter_layer_names", ()):
        container = getattr(module, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            names.update(container.keys())
    return names


def _quantization_backend(module: nn.Module) -> Optional[str]:
    backend = getattr(module, "quantization_backend", None)
    if backend is not None:
        return getattr(backend, "backend_name", str(backend))
    get_base = getattr(module, "get_base_layer", None)
    base = get_base() if callable(get_base) else None
    kind = type(base).__name__ if base is not None else ""
    if kind in ("LinearNF4", "Linear4bit"):  # fastpeft's NF4 layer holds bitsandbytes' 4-bit format
        return "bnb 4bit"
    if kind == "Linear8bitLt":
        return "bnb 8bit"
    return None


def _tuner_of(model: nn.Module, what: str) -> nn.Module:
    """The module to scan: the tuner of a PeftModel (refusing what peft refuses), else the model itself."""
    from .peft_model import PeftModel
    from .tuners.base import BaseTuner

    if not isinstance(model, PeftModel):
        return model
    base_model = model.base_model
    adaption_prompt = any(cfg.is_adaption_prompt for cfg in model.peft_config.values())
    if not isinstance(base_model, BaseTuner) or adaption_prompt:
        raise TypeError(
            f"{what}() got an invalid PeftModel instance; prefix tuning and adaption prompt are not supported."
        )
    return base_model


def _module_type(module: nn.Module) -> str:
    """peft's `module_type`: the layer's repr up to "(" (e.g. "lora.Linear"); a layer whose repr carries a prefix
    that peft's does not (IA3: "ia3.Linear", peft "Linear") names its peft type as `peft_module_type`."""
    own = getattr(type(module), "peft_module_type", None)  # the class's own: not one forwarded from a wrapped layer
    return own.__get__(module) if isinstance(own, property) else repr(module).partition("(")[0]


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of each adapter layer (and modules_to_save wrapper) of ``model``, as peft's ``get_layer_status``.

    ``model`` is a ``PeftModel`` or a model with injected adapter layers. Raises ``ValueError`` when it holds none.
    """
    from .tuners.base import AuxiliaryTrainingWrapper, BaseTunerLayer

    base_model = _tuner_of(model, "get_layer_status")
    layer_status: list[TunerLayerStatus] = []
    for name, module in base_model.named_modules():
        if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            continue
        if type(module).__name__ == "TrainableTokensWrapper":
            continue  # as peft: the trainable-tokens layer inside it is the one reported
        adapter_attrs = tuple(getattr(module, "adapter_layer_names", ()))
        other_attrs = tuple(getattr(module, "other_param_names", ()))

        grads: dict[str, list[bool]] = collections.defaultdict(list)
        for attr in adapter_attrs:
            container = getattr(module, attr, None)
            if isinstance(container, nn.ModuleDict):
                for key, sub in container.items():
                    grads[key].extend(p.requires_grad for p in sub.parameters())
            elif isinstance(container, nn.ParameterDict):
                for key, p in container.items():
                    grads[key].append(p.requires_grad)
        # per layer, an adapter without parameters counts as True (all([]) in peft)
        requires_grad = {k: (True if all(v) else False if not any(v) else "irregular") for k, v in grads.items()}

        devices_dd: dict[str, list[str]] = collections.defaultdict(list)
        for attr in adapter_attrs + other_attrs:
            container = getattr(module, attr, None)
            if isinstance(container, nn.ModuleDict):
                for key, sub in container.items():
                    devices_dd[key].extend(p.device.type for p in sub.parameters())
            elif isinstance(container, nn.ParameterDict) or type(container).__name__ == "BufferDict":
                for key, p in container.items():
                    devices_dd[key].append(p.device.type)

        layer_status.append(
            TunerLayerStatus(
                name=name,
                module_type=_module_type(module),
                enabled=not module.disable_adapters,
                active_adapters=module.active_adapters,
                merged_adapters=getattr(module, "merged_adapters", []),
                requires_grad=requires_grad,
                available_adapters=sorted(_available_adapters(module)),
                devices={k: sorted(set(v)) for k, v in devices_dd.items()},
                quantization_backend=_quantization_backend(module),
            )
        )
    if not layer_status:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            "injected in the model."
        )
    return layer_status


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter status of the whole model, as peft's ``get_model_status`` (inconsistent layers: ``"irregular"``)."""
    from .peft_model import PeftModel

    if isinstance(model, PeftModel):
        base_model = _tuner_of(model, "get_model_status")
        base_model_type = type(model.get_base_model()).__name__
        trainable_params, total_params = model.get_nb_trainable_parameters()
        peft_types = {key: getattr(cfg.peft_type, "value", str(cfg.peft_type)) for key, cfg in base_model.peft_config.items()}
        adapter_model_type = type(base_model).__name__
    else:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is optional
            PreTrainedModel = ()
        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        trainable_params, total_params = PeftModel.get_nb_trainable_parameters(model)
        peft_types = {}
        adapter_model_type = "None"

    layer_status = get_layer_status(model)

    enabled_set = {s.enabled for s in layer_status}
    enabled = enabled_set.pop() if len(enabled_set) == 1 else "irregular"

    available = sorted(set().union(*(s.available_adapters for s in layer_status)))

    active_set = {tuple(s.active_adapters) for s in layer_status}
    active = list(active_set.pop()) if len(active_set) == 1 else ("irregular" if active_set else [])

    merged_all: set[str] = set()
    for s in layer_status:
        merged_all.update(s.merged_adapters)
    merged: Union[list[str], Irregular] = sorted(merged_all)
    for s in layer_status:
        if (set(s.available_adapters) - set(s.merged_adapters)) & merged_all:
            merged = "irregular"
            break

    grads_all: dict[str, list] = collections.defaultdict(list)
    for s in layer_status:
        for key, val in s.requires_grad.items():
            grads_all[key].append(val)
    requires_grad = {key: _all_or_none(vals) for key, vals in grads_all.items()}

    devices_dd: dict[str, list[str]] = collections.defaultdict(list)
    for s in layer_status:
        for key, val in s.devices.items():
            devices_dd[key].extend(val)

    backends = {s.quantization_backend for s in layer_status}
    backend = backends.pop() if len(backends) == 1 else "irregular"

    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable_params,
        total_params=total_params,
        num_adapter_layers=len(layer_status),
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad=requires_grad,
        available_adapters=available,
        devices={k: sorted(set(v)) for k, v in devices_dd.items()},
        quantization_backend=backend,
    )
