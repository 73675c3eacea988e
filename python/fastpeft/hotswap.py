"""Hot-swapping LoRA adapters in place (peft's `peft.utils.hotswap` API; also importable from there:
`fastpeft.utils.hotswap`).

`hotswap_adapter(model, path, adapter_name)` overwrites the weights (and scalings) of a loaded adapter with those
of another checkpoint that targets the same modules, without creating new modules or parameters, so a
`torch.compile`d model keeps its graph. To swap adapters of different ranks or alphas without recompilation, call
`prepare_model_for_compiled_hotswap(model, target_rank=...)` once after loading the first adapter and before
compiling: it zero-pads every adapter to `target_rank` (zero rows / columns add nothing) and turns the scalings
into 0-dim tensors, which a swap then fills in place.

fastpeft specifics:

- after preparation, LoRA Linear layers whose scaling is a tensor run the unfused path `B(A(x)) * scaling` (peft's
  math): the fused kernel takes the scale as a Python float, which a compiled graph would bake in.
- besides Linear and Conv2d (as peft), Conv1d (groups=1) and Embedding adapters are padded too.
- once prepared, a checkpoint whose rank exceeds the padded rank is refused (peft would replace the tensor and so
  trigger a recompilation); unprepared models take it, as in peft.
- every shape is checked before anything is written, so a refused swap leaves the model as it was.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Literal, Optional, Union

import torch
from torch import nn

from .config import PeftConfig, PeftType
from .tuners.base import BaseTunerLayer, get_pattern_key
from .tuners.lora.config import LoraConfig
from .tuners.lora.layer import Conv1d, Conv2d, Embedding, Linear, LoraLayer

__all__ = [
    "prepare_model_for_compiled_hotswap", "hotswap_adapter_from_state_dict", "hotswap_adapter",
    "check_hotswap_configs_compatible",
]

CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}

_PREPARED_ATTR = "_hotswap_target_rank"  # set on each LoRA layer padded by prepare_model_for_compiled_hotswap


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


# ---- preparation ------------------------------------------------------------------------------------


def _convert_scalings_to_tensor(model: nn.Module) -> bool:
    found = False
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        found = True
        device = module.get_base_layer().weight.device
        for name, value in module.scaling.items():
            if isinstance(value, (float, int)):
                module.scaling[name] = torch.tensor(float(value), device=device)
            elif not isinstance(value, torch.Tensor):
                raise TypeError(f"expected the scaling of adapter {name!r} to be a float, got {type(value).__name__}")
    return found


def _padded(weight: torch.Tensor, dim: int, target_rank: int, what: str) -> Optional[torch.Tensor]:
    """`weight` zero-padded along `dim` to `target_rank` (None if it already has that size)."""
    rank = weight.shape[dim]
    if rank == target_rank:
        return None
    if rank > target_rank:
        raise ValueError(
            f"Trying to pad the adapter to the target rank {target_rank}, but the original rank of {what} is "
            f"larger ({rank}). This is not possible."
        )
    shape = list(weight.shape)
    shape[dim] = target_rank
    out = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
    out.narrow(dim, 0, rank).copy_(weight.detach())
    return out


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    requires_grad = module.weight.requires_grad
    module.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups


def _pad_lora_weights(model: nn.Module, target_rank: int) -> bool:
    found = False
    for name, module in model.named_modules():
        if not isinstance(module, (Linear, Conv1d, Conv2d, Embedding)):
            continue
        if isinstance(module, (Conv1d, Conv2d)) and module.get_base_layer().groups > 1:
            raise NotImplementedError(f"{name}: padding LoRA adapters on grouped convolutions is not supported")
        found = True
        for adapter in list(module.lora_A):
            new_A = _padded(module.lora_A[adapter].weight, 0, target_rank, f"{name}.lora_A.{adapter}")
            new_B = _padded(module.lora_B[adapter].weight, 1, target_rank, f"{name}.lora_B.{adapter}")
            if new_A is not None:
                _set_weight(module.lora_A[adapter], new_A)
            if new_B is not None:
                _set_weight(module.lora_B[adapter], new_B)
        for adapter in list(module.lora_embedding_A):
            for container, dim in ((module.lora_embedding_A, 0), (module.lora_embedding_B, 1)):
                old = container[adapter]
                kind = "lora_embedding_A" if dim == 0 else "lora_embedding_B"
                new = _padded(old, dim, target_rank, f"{name}.{kind}.{adapter}")
                if new is not None:
                    container[adapter] = nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(module, _PREPARED_ATTR, target_rank)
    return found


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: Optional[int] = None,
    config: Optional[Union[LoraConfig, dict[str, LoraConfig]]] = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare a model with its first LoRA adapter loaded for hot-swapping after `torch.compile` (in place).

    Call it after loading the first adapter and *before* compiling. Scalings become 0-dim tensors (so that swapping
    an adapter with a different alpha / rank changes a value, not the graph) and, with `target_rank` (the largest
    rank of the adapters to come), every adapter is zero-padded to that rank. With `config` (a LoraConfig or a
    dict of them), `r` and the `rank_pattern` values are set to `target_rank`. `check_compiled`: what to do if the
    model is already compiled ("error", "warn" or "ignore").
    """
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called with a model that is already compiled. This will "
                "likely result in re-compilation, hurting performance. Call the function before compiling the model."
            )
        elif check_compiled != "ignore":
            raise ValueError(
                f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead."
            )
    if target_rank is not None and (not isinstance(target_rank, int) or target_rank <= 0):
        raise ValueError(f"target_rank must be a positive int, got {target_rank!r}")
    inner = _unwrap(model)
    found = _convert_scalings_to_tensor(inner)
    if target_rank is not None:
        found = _pad_lora_weights(inner, target_rank) or found
    if not found:
        raise ValueError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after loading "
            "the first adapter and before loading the second adapter."
        )
    if not config or target_rank is None:
        return
    for lora_config in (config.values() if isinstance(config, dict) else [config]):
        lora_config.r = target_rank
        for key in lora_config.rank_pattern:
            lora_config.rank_pattern[key] = target_rank


# ---- swapping ---------------------------------------------------------------------------------------


def _update_scaling(module: LoraLayer, adapter_name: str, scaling: float) -> None:
    current = module.scaling[adapter_name]
    if isinstance(current, torch.Tensor):
        if current.item() != scaling:
            current.fill_(scaling)
    elif current != scaling:
        module.scaling[adapter_name] = scaling


def _rank_dim(key: str) -> Optional[int]:
    if ".lora_A." in key or ".lora_embedding_A." in key or key.endswith(".lora_embedding_A"):
        return 0
    if ".lora_B." in key or ".lora_embedding_B." in key or key.endswith(".lora_embedding_B"):
        return 1
    return None


def _owner(model: nn.Module, key: str) -> tuple[str, LoraLayer]:
    """(module name, LoRA layer) that holds the tensor `key`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, LoraLayer):
            return name, module
    raise RuntimeError(f"Hot swapping the adapter did not succeed: {key} does not belong to a LoRA layer")


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Overwrite adapter `adapter_name` of `model` in place with `state_dict` (model keys, adapter name included).

    Keys of the adapter that `state_dict` lacks are zeroed (a swap to an adapter on fewer modules); keys the model
    lacks raise a RuntimeError naming them. A smaller rank is copied into the leading rows / columns (the rest
    zeroed); a larger one raises once the model was prepared with `prepare_model_for_compiled_hotswap` (its
    target_rank), else replaces the tensor (as peft; a compiled model then recompiles). Scalings are recomputed
    from `config` (r, lora_alpha, rank_pattern, alpha_pattern, use_rslora).
    """
    inner = _unwrap(model)
    if any(adapter_name in m.merged_adapters for m in inner.modules() if isinstance(m, BaseTunerLayer)):
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights. "
            "Please unmerge the adapter first by calling `peft_model.unmerge_adapter()`."
        )
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    params = {
        k: v for k, v in inner.state_dict(keep_vars=True).items()
        if parameter_prefix in k and (f".{adapter_name}." in k or k.endswith(f".{adapter_name}"))
    }
    unexpected = sorted(k for k in state_dict if k not in params)
    if unexpected:
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}. The new "
            f"adapter must target the same modules as adapter '{adapter_name}' (or a subset of them)."
        )

    # check every shape before writing anything
    plan = []
    for key, new in state_dict.items():
        old = params[key]
        name, module = _owner(inner, key)
        if old.shape == new.shape:
            plan.append((key, name, module, old, new, "copy"))
            continue
        dim = _rank_dim(key)
        other_dims_equal = old.dim() == new.dim() and dim is not None and all(
            o == n for i, (o, n) in enumerate(zip(old.shape, new.shape)) if i != dim
        )
        if not other_dims_equal:
            raise ValueError(
                f"Incompatible shapes found for LoRA weights {key}: {tuple(old.shape)} in the model vs "
                f"{tuple(new.shape)} in the new adapter; hot-swapping needs adapters on the same modules."
            )
        if new.shape[dim] < old.shape[dim]:
            plan.append((key, name, module, old, new, "pad"))
            continue
        target_rank = getattr(module, _PREPARED_ATTR, None)
        if target_rank is not None:
            raise ValueError(
                f"Cannot hot-swap {key}: the new adapter's rank {new.shape[dim]} is larger than the target_rank "
                f"{target_rank} the model was prepared with; call prepare_model_for_compiled_hotswap with "
                f"target_rank >= {new.shape[dim]}."
            )
        plan.append((key, name, module, old, new, "replace"))

    with torch.no_grad():
        for key in set(params) - set(state_dict):
            params[key].zero_()
        for key, name, module, old, new, how in plan:
            new = new.to(device=old.device, dtype=old.dtype)
            if how == "copy":
                old.copy_(new)
            elif how == "pad":
                dim = _rank_dim(key)
                old.zero_()
                old.narrow(dim, 0, new.shape[dim]).copy_(new)
            else:
                old.data = new.clone()
    for name in {name for _, name, _, _, _, _ in plan}:
        module = inner.get_submodule(name)
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        _update_scaling(module, adapter_name, scaling)


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Raise a ValueError unless two adapter configs can be hot-swapped (same method; for LoRA the same
    use_rslora, lora_dropout, alpha_pattern and use_dora)."""
    if config0.peft_type != config1.peft_type:
        raise ValueError(f"Incompatible PEFT types found: {PeftType(config0.peft_type).value} and "
                         f"{PeftType(config1.peft_type).value}")
    if config0.peft_type not in CONFIG_KEYS_TO_CHECK:
        raise ValueError(
            f"Hotswapping only supports {', '.join(k.value for k in CONFIG_KEYS_TO_CHECK)} but "
            f"{PeftType(config0.peft_type).value} was passed."
        )
    for key in CONFIG_KEYS_TO_CHECK[PeftType(config0.peft_type)]:
        val0, val1 = getattr(config0, key, None), getattr(config1, key, None)
        if val0 != val1:
            raise ValueError(f"Configs are incompatible: for {key}, {val0} != {val1}")


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str,
    torch_device: Optional[str] = None,
    **kwargs,
) -> None:
    """Replace the weights of the loaded adapter `adapter_name` of a PeftModel (compiled or not) with those of the
    adapter saved in `model_name_or_path` (a local directory); the name stays. `torch_device`: where to read the
    tensors (they end up on the device of the weights they replace). kwargs: `subfolder`, `key_mapping`.

    Raises a ValueError for incompatible configs (see `check_hotswap_configs_compatible`) or shapes, a RuntimeError
    naming the keys the model lacks.
    """
    from .checkpoint import _remap_for_load, load_adapter_config, load_peft_weights

    inner = _unwrap(model)
    subfolder = kwargs.get("subfolder")
    config = load_adapter_config(model_name_or_path, subfolder=subfolder)
    peft_config = getattr(inner, "peft_config", {})
    if adapter_name not in peft_config:
        raise ValueError(f"Adapter {adapter_name!r} is not loaded (loaded: {sorted(peft_config)})")
    check_hotswap_configs_compatible(peft_config[adapter_name], config)
    weights = load_peft_weights(
        model_name_or_path, device=torch_device or "cpu", subfolder=subfolder, key_mapping=kwargs.get("key_mapping")
    )
    state_dict = _remap_for_load(inner, config, adapter_name, weights)
    where = os.path.join(os.fspath(model_name_or_path), subfolder or "", "adapter_model.safetensors")
    not_float = [f"{k!r} ({v.dtype})" for k, v in state_dict.items() if not v.is_floating_point()]
    if not_float:
        raise ValueError(f"{where}: LoRA weights must be floating-point tensors, got {', '.join(not_float[:20])}")
    try:
        hotswap_adapter_from_state_dict(inner, state_dict, adapter_name, config, parameter_prefix="lora_")
    except (ValueError, RuntimeError) as exc:
        raise type(exc)(f"{where}: {exc}") from exc
