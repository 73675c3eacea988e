"""Model-merging math used by `add_weighted_adapter` (peft's `peft.utils.merge_utils` API and results).

Each merge takes a list of same-shaped "task tensors" (one per adapter) and a 1-D tensor of weights and returns
one tensor:

- `task_arithmetic`: sum_i w_i t_i
- `magnitude_prune`: every t_i keeps its `density` fraction of largest-magnitude entries, then task arithmetic
- `ties`: magnitude pruning, sign election across tasks, then the disjoint mean of the weighted entries that agree
  with the elected sign (TIES-Merging, Yadav et al. 2023)
- `dare_linear` / `dare_ties`: random pruning with rescaling by 1/density (DARE, Yu et al. 2023), then task
  arithmetic / the TIES sign election and disjoint mean

Random pruning draws with `torch.bernoulli` on a tensor filled with `density`, one call per task tensor in list
order, so under the same RNG state the masks are the ones peft draws.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch

__all__ = [
    "reshape_weight_task_tensors", "magnitude_based_pruning", "random_pruning", "prune",
    "calculate_majority_sign_mask", "disjoint_merge", "task_arithmetic", "magnitude_prune", "ties",
    "dare_linear", "dare_ties",
]


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`weights` [n] viewed as [n, 1, ..., 1] so that it broadcasts against stacked `task_tensors` [n, ...]."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) entries of largest magnitude."""
    flat = tensor.reshape(-1)
    keep = int(density * flat.numel())
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(keep, largest=True).indices] = 1
    return tensor * mask.view(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability `density` (torch.bernoulli); with `rescale`, divide the kept ones by it."""
    keep = torch.bernoulli(torch.full_like(tensor, density))
    out = tensor * keep
    return out / density if rescale else out


def prune(
    tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False
) -> torch.Tensor:
    """Prune `tensor` to the fraction `density` by "magnitude" or "random" (density >= 1: unchanged, with a warning)."""
    if density is None:
        raise ValueError("`density` must be given (a fraction in [0, 1]) for pruning combination types")
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(
    tensor: torch.Tensor, method: Literal["total", "frequency"] = "total"
) -> torch.Tensor:
    """For stacked task tensors [n, ...]: where each entry's sign equals the elected sign of its position.

    "total" elects the sign of the sum of the values, "frequency" the sign held by more tasks; ties (0) elect +.
    """
    sign = tensor.sign()
    if method == "total":
        votes = tensor.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    elected = torch.where(votes >= 0, 1, -1)
    return sign == elected


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks of the entries selected by the mask (positions with none selected: 0)."""
    total = (task_tensors * majority_sign_mask).sum(dim=0)
    count = majority_sign_mask.sum(dim=0)
    return total / torch.clamp(count, min=1.0)


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (stacked * reshape_weight_task_tensors(stacked, weights)).sum(dim=0)


def _ties_merge(stacked: torch.Tensor, weights: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)  # elected on the unweighted values
    return disjoint_merge(stacked * reshape_weight_task_tensors(stacked, weights), mask)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * task_tensors[i]."""
    return _weighted_sum(torch.stack(task_tensors, dim=0), weights)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Task arithmetic of the magnitude-pruned task tensors."""
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    return _weighted_sum(torch.stack(pruned, dim=0), weights)


def ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """TIES: magnitude pruning, sign election, disjoint merge of the weighted tensors."""
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    return _ties_merge(torch.stack(pruned, dim=0), weights, majority_sign_method)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: random pruning rescaled by 1/density, then task arithmetic."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _weighted_sum(torch.stack(pruned, dim=0), weights)


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """DARE pruning followed by TIES' sign election and disjoint merge."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _ties_merge(torch.stack(pruned, dim=0), weights, majority_sign_method)
