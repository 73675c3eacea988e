"""CorDA (context-oriented decomposition adaptation): `preprocess_corda` and the factors of the CorDA init.

Workflow (peft's): `preprocess_corda(model, lora_config, run_model=...)` runs the model on sample data, collects the
covariance C of each target layer's input, and takes the SVD of W C (damped so that C is invertible):
W C = U S V^T, so W = U S (V^T C^-1). It keeps the top r triplets ("ipm", instruction-previewed mode) or the
smallest r ("kpm", knowledge-preserved mode) on the layer as `eigens`; then `get_peft_model(model, lora_config)`
with `init_lora_weights="corda"` sets A = sqrt(S / s) (C^-1 V)^T, B = U sqrt(S / s) (s = the adapter's scaling) and
leaves W - s B A as the base weight (the "residual model", to be saved alongside the adapter).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..base import _conv1d_class, check_target_module_exists, get_pattern_key
from .config import LoraConfig

__all__ = ["CordaEigens", "preprocess_corda"]


@dataclass
class CordaEigens:
    """The truncated SVD a CorDA layer is initialised from: W ~ U_WC diag(S_WC) V_WC^T (V_WC: [in, r])."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def _target_layers(model: nn.Module, config: LoraConfig) -> Iterator[tuple[str, nn.Module]]:
    """The (name, module) pairs CorDA handles: targeted nn.Linear / transformers Conv1D layers."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) or _is_conv1d(module)) and check_target_module_exists(config, name):
            yield name, module


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().float()
    return weight.T if _is_conv1d(module) else weight


def _model_device(model: nn.Module) -> torch.device:
    model = getattr(model, "module", model)  # DataParallel / DeepSpeed wrappers
    return next(iter(model.parameters())).device


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Optional[Callable[[], None]] = None,
    hooked_model: Optional[nn.Module] = None,
) -> None:
    """Compute CorDA's per-layer SVD and store it on each target layer as `eigens` (peft's function and semantics).

    Args:
        model: the model to adapt (before `get_peft_model`).
        lora_config: a LoraConfig with `init_lora_weights="corda"`; its `corda_config` (a CordaConfig or dict) sets
            the mode, the cache / covariance files, float16 covariance and pruning of temporaries.
        run_model: runs the model on the calibration data (e.g. a loop over batches); may be None only when the
            cache file or covariance file already exists.
        hooked_model: a model to hook instead of `model` (same module names), e.g. one on another device.

    Each layer's input x (one forward call, flattened to rows) adds (x / max(x))^T (x / max(x)) to its covariance;
    the sum is divided by the number of calls. With `cache_file` the SVD results are saved (and read back if the file
    exists); with `covariance_file` the covariances are.
    """
    settings = lora_config.init_subconfig("corda_config")
    if settings is None:
        raise ValueError(
            "preprocess_corda needs lora_config.corda_config; pass LoraConfig(init_lora_weights='corda', "
            "corda_config=CordaConfig(...))"
        )
    device = _model_device(model)
    cache_file = settings.cache_file
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location=device)
        for name, module in _target_layers(model, lora_config):
            module.eigens = CordaEigens(*(cache[f"{name}.eigens.{k}"] for k in ("S_WC", "U_WC", "V_WC")))
        return

    covariances, counts = _collect_covariances(model, lora_config, settings, run_model, hooked_model)
    layers = list(_target_layers(model, lora_config))
    if settings.verbose:
        from tqdm import tqdm

        layers = tqdm(layers, desc="Collecting eigens")
    for name, module in layers:
        rank = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), name), lora_config.r)
        eigens = _covariance_svd(_weight_out_in(module), covariances[name].float())
        module.eigens = _crop(eigens, rank, settings.corda_method, device)
        if not settings.prune_temporary_fields:  # peft keeps these on the layer when asked to
            module.covariance_matrix, module.corda_method, module.rank = covariances[name], settings.corda_method, rank
            if counts.get(name) is not None:
                module.sample_count = counts[name]

    if cache_file is not None:
        cache = {}
        for name, module in _target_layers(model, lora_config):
            for key in ("S_WC", "U_WC", "V_WC"):
                cache[f"{name}.eigens.{key}"] = getattr(module.eigens, key)
        os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
        torch.save(cache, cache_file)


def _collect_covariances(model, lora_config, settings, run_model, hooked_model):
    """name -> mean input covariance of each target layer (from `covariance_file` or by running the model)."""
    covariance_file = settings.covariance_file
    targets = dict(_target_layers(model, lora_config))
    if covariance_file is not None and os.path.exists(covariance_file) and os.path.getsize(covariance_file) > 0:
        stored = torch.load(covariance_file, map_location=_model_device(model))
        return {name: stored[name] for name in targets}, {}
    if run_model is None:
        raise ValueError(
            "preprocess_corda: run_model must be given (a function that runs the model on calibration data) unless "
            "corda_config.cache_file or corda_config.covariance_file points to an existing file"
        )
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])  # peft squeezes a batch of one; rows are what the covariance sums over
            if not settings.use_float16_for_covariance:
                x = x.float()
            x = x / torch.max(x).abs()  # peft's normalisation (the largest value, not the largest magnitude)
            if not torch.isfinite(x).all():
                raise ValueError(f"Invalid value found in the input of {name}, please check your input data.")
            cov = x.T @ x
            sums[name] = cov if name not in sums else sums[name] + cov
            counts[name] = counts.get(name, 0) + 1

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in _target_layers(hooked, lora_config) if n in targets]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(targets) - set(sums))
    if missing:
        raise ValueError(f"preprocess_corda: run_model did not run these target layers: {missing}")
    covariances = {name: sums[name] / counts[name] for name in targets}
    if covariance_file is not None:
        os.makedirs(os.path.dirname(covariance_file) or ".", exist_ok=True)
        torch.save(covariances, covariance_file)
    return covariances, counts


def _covariance_svd(weight: torch.Tensor, covariance: torch.Tensor) -> CordaEigens:
    """The full SVD of W C, with C damped by damp * mean(diag C) * I (damp doubling from 0.01 until C inverts
    to within 0.05 in Frobenius norm), as peft computes it."""
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    damp = 0.01
    while True:
        fixed = covariance + eye * (torch.mean(torch.diag(covariance)) * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(weight.to(fixed.device) @ fixed, full_matrices=False)
    return CordaEigens(S_WC=S, U_WC=U.cpu(), V_WC=(Vh @ inverse).T.cpu())


def _crop(eigens: CordaEigens, rank: int, method: str, device) -> CordaEigens:
    """Keep the top (ipm) or bottom (kpm) `rank` triplets."""
    if rank > eigens.S_WC.shape[0]:
        raise ValueError(
            f"CorDA rank {rank} exceeds min(in_features, out_features) = {eigens.S_WC.shape[0]} of a target layer; "
            "lower r or its rank_pattern entry"
        )
    keep = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return CordaEigens(
        S_WC=eigens.S_WC[keep].clone(),
        U_WC=eigens.U_WC[:, keep].clone().to(device),
        V_WC=eigens.V_WC[:, keep].clone().to(device),
    )


def corda_factors(base: nn.Module, r: int, scaling: float, fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the CorDA init from `base.eigens` (checked against the layer and r), in float32."""
    dtype = base.weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            "Please initialize CorDA under float32, float16, or bfloat16. "
            "Subsequently, re-quantize the residual model to help minimize quantization errors."
        )
    out_dim, in_dim = _weight_out_in(base).shape
    U, S, V = base.eigens.U_WC, base.eigens.S_WC, base.eigens.V_WC
    for label, tensor in (("S", S), ("U", U), ("V", V)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"Invalid value found in CorDA's matrix {label}; re-run preprocess_corda")
    hint = ("make sure preprocess_corda ran with the same model and LoraConfig (r, rank_pattern) as get_peft_model; "
            "a cache_file must have been built with them too")
    if tuple(U.shape) != (out_dim, r):
        raise ValueError(f"Matrix U size mismatch: {tuple(U.shape)} vs. ({out_dim}, {r}); {hint}")
    if tuple(S.shape) != (r,):
        raise ValueError(f"Matrix S size mismatch: {tuple(S.shape)} vs. ({r},); {hint}")
    if tuple(V.shape) != (in_dim, r):
        raise ValueError(f"Matrix V size mismatch: {tuple(V.shape)} vs. ({in_dim}, {r}); {hint}")
    root = (S / scaling).sqrt()
    lora_A = (V.T * root.view(-1, 1)).contiguous()
    lora_B = (U * root).contiguous()
    return lora_A, lora_B
