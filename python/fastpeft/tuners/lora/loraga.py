"""LoRA-GA (gradient approximation): `preprocess_loraga` and the factors of the LoRA-GA init (peft's semantics).

`preprocess_loraga(model, lora_config, train_step)` runs `train_step` (forward + backward on sample batches) with
gradients enabled on the target layers' weights only, and leaves the mean weight gradient G on each layer
(`_peft_loraga_grad`). `get_peft_model` with `init_lora_weights="lora_ga"` then takes a randomized SVD of G
(`torch.svd_lowrank`, 4 iterations, so torch's RNG state decides the result, as in peft), splits the top 2r
singular vectors between A and B per `LoraGAConfig.direction`, scales them per `LoraGAConfig.scale`, and leaves
W - scaling * B A as the base weight.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import nn

from ..base import transpose
from .config import LoraConfig, LoraGAConfig
from .corda import _model_device, _target_layers

__all__ = ["preprocess_loraga"]


@torch.no_grad()
def preprocess_loraga(
    model: nn.Module,
    lora_config: LoraConfig,
    train_step: Callable[[], None],
    cache_file: Optional[str] = None,
) -> None:
    """Estimate the weight gradient of each target nn.Linear / Conv1D layer and store it as `_peft_loraga_grad`.

    Args:
        model: the model to adapt (before `get_peft_model`).
        lora_config: a LoraConfig with `init_lora_weights="lora_ga"` and `lora_ga_config` set.
        train_step: runs forward and backward passes; the gradient is the accumulated `.grad` divided by the number
            of backward passes through the layer.
        cache_file: where the gradients are saved; read back instead of running `train_step` when it exists.
    """
    if lora_config.lora_ga_config is None:
        raise ValueError(
            "If you want to use LoRA-GA, please initialize the LoraConfig with init_lora_weights='lora_ga' and "
            "lora_ga_config=LoraGAConfig(...)."
        )
    if lora_config.target_modules is None:
        raise ValueError("preprocess_loraga: please specify `target_modules` in the LoraConfig")
    targets = list(_target_layers(model, lora_config))
    for name, module in targets:
        if hasattr(module, "quant_state"):
            raise ValueError(
                f"LoRA-GA does not support quantized models. Found quantized module: '{name}'. "
                "LoRA-GA requires full-precision gradients during preprocessing."
            )
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location=_model_device(model))
        for name, module in targets:
            module._peft_loraga_grad = cache[f"{name}._peft_loraga_grad"]
        return
    if not targets:
        raise ValueError(
            "No supported layers found for LoRA-GA initialization: it needs nn.Linear or Conv1D layers in "
            "target_modules."
        )
    _estimate_gradients(model, targets, train_step)
    if cache_file is not None:
        os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
        torch.save({f"{name}._peft_loraga_grad": m._peft_loraga_grad for name, m in targets}, cache_file)


def _estimate_gradients(model: nn.Module, targets, train_step) -> None:
    was_training = model.training
    model.train()
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad = False
    counts = {id(m): 0 for _, m in targets}

    def count_backward(module, grad_input, grad_output):
        counts[id(module)] += 1

    handles = []
    for _, module in targets:
        module.weight.requires_grad = True
        handles.append(module.register_full_backward_hook(count_backward))
    try:
        with torch.enable_grad():
            train_step()
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad = previous.get(name, p.requires_grad)
    for _, module in targets:
        if counts[id(module)] > 0:
            module._peft_loraga_grad = module.weight.grad.detach() / counts[id(module)]
        module.weight.grad = None
    if not was_training:
        model.eval()


def loraga_factors(layer, adapter_name: str, settings: Optional[LoraGAConfig]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the LoRA-GA init of `layer` (a LoRA Linear whose base carries `_peft_loraga_grad`)."""
    if settings is None:
        raise ValueError(
            "lora_ga_config must be provided when init_lora_weights='lora_ga'. "
            "Please pass lora_ga_config=LoraGAConfig(...) to LoraConfig."
        )
    base = layer.get_base_layer()
    weight = base.weight
    dtype = weight.dtype
    grad = transpose(base._peft_loraga_grad.to(torch.float32), layer.fan_in_fan_out)  # [out, in]
    r = layer.r[adapter_name]
    U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    U, S, Vh = U[:, : 2 * r], S[: 2 * r], V.T[: 2 * r]
    if settings.direction == "ArBr":  # A: the odd-indexed components, B: the even-indexed ones
        a_idx, b_idx = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
    elif settings.direction == "A2rBr":
        a_idx, b_idx = slice(r, 2 * r), slice(0, r)
    elif settings.direction == "ArB2r":
        a_idx, b_idx = slice(0, r), slice(r, 2 * r)
    else:  # "random": the same r components for both (drawn from torch's RNG)
        a_idx = b_idx = torch.randperm(2 * r)[:r]
    lora_A = Vh[a_idx]
    S_B = S[b_idx]
    lora_B = U[:, b_idx] @ torch.diag(S_B)

    scaling = layer.scaling[adapter_name]
    if settings.scale == "stable":
        # peft uses the stored weight's first dimension (out_features for nn.Linear, in_features for Conv1D)
        lora_B = lora_B * ((weight.shape[0] ** 0.25) / (settings.stable_gamma ** 0.5))
    elif settings.scale == "weight_svd":
        _, weight_S, _ = torch.svd_lowrank(transpose(weight.detach().float(), layer.fan_in_fan_out), q=r, niter=4)
        if S_B[0] > 0:
            lora_B = lora_B * (weight_S[0] / S_B[0])
    elif settings.scale == "gd_scale":
        lora_A = lora_A / scaling
        lora_B = lora_B / scaling
    return lora_A.to(dtype), lora_B.to(dtype)
