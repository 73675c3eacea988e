"""EVA (explained variance adaptation): data-driven LoRA A from the principal directions of each layer's inputs.

Workflow (peft's): `get_peft_model(model, LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...)))` creates
the adapter with B = 0, then `initialize_lora_eva_weights(peft_model, dataloader)`:

1. runs one batch and hashes each target layer's input, so layers that see the same input (e.g. q/k/v) share one
   decomposition;
2. cycles over the dataloader, feeding each layer's input rows (padding and label-masked positions dropped) to an
   incremental PCA (`torch.svd_lowrank` with a fixed seed, 4 iterations, q = 2 * components: deterministic);
   a layer stops once the cosine similarity of each of its first `rank` components with the previous step's is
   >= tau;
3. after every batch, redistributes the rank budget (sum of the configured ranks) to the components with the
   largest explained-variance ratio over all layers, each layer capped at round(r * rho);
4. sets A of each layer to its top components (divided by sqrt(singular value) with `whiten`), resizing the
   adapter to the assigned rank (alpha scaled by new_rank / r with `adjust_scaling_factors`; a layer assigned 0
   loses its adapter); the config's rank_pattern / alpha_pattern / target_modules record the result.
"""
from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..base import _conv1d_class, check_target_module_exists, get_pattern_key
from .config import EvaConfig, LoraConfig
from .layer import Embedding, LoraLayer, _ConvNd

__all__ = [
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "forward_fn_dict",
    "prepare_model_inputs_fn_language_modeling",
    "prepare_layer_inputs_fn_language_modeling",
]

# LoRA layer kinds EVA does not decompose; they keep the default init (as in peft)
_UNSUPPORTED_LAYERS = (Embedding, _ConvNd)
# above this many target modules the config's list is condensed to distinguishing suffixes (peft's threshold)
_MIN_TARGET_MODULES_FOR_SUFFIXES = 20


# ---- peft's default input functions (same names and signatures, so user code written for peft works) ----


def forward_fn_dict(model, inputs):
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input, peft_config: LoraConfig):
    """The (batch, position) indices of the tokens to use: attention mask, and label mask with `use_label_mask`."""
    if not isinstance(model_input, dict):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
    settings = _eva_settings(peft_config)
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if settings.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != settings.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """The rows of the layer input at the indices `prepare_model_inputs_fn_language_modeling` returned."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def _default_layer_inputs(layer_input, model_input, layer_name) -> torch.Tensor:
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


def _first_tensor(layer_input, layer_name) -> torch.Tensor:
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)):
        return layer_input[0]
    raise TypeError(
        f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer {layer_name}, "
        "please provide a custom prepare_layer_inputs_fn"
    )


def _eva_settings(peft_config: LoraConfig) -> EvaConfig:
    value = getattr(peft_config, "eva_config", None)
    if value is None:
        return EvaConfig()
    return value if isinstance(value, EvaConfig) else EvaConfig.from_dict(value)


# ---- incremental PCA ----


class _IncrementalPCA:
    """Incremental PCA (Ross et al. 2008, as in scikit-learn's IncrementalPCA), with a seeded randomized SVD.

    Each `partial_fit` decomposes [previous components scaled by their singular values; the centred batch; a mean
    correction row] and keeps the top `n_components`. Signs are fixed so that each component's largest-magnitude
    entry is positive. Running mean and variance are kept in float64.
    """

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4):
        self.n_components = n_components
        self.seed = seed
        self.niter = niter
        self.components_: Optional[torch.Tensor] = None
        self.singular_values_ = self.explained_variance_ratio_ = None
        self.mean_ = self.var_ = None
        self.n_samples_seen_ = 0

    def _update_moments(self, X: torch.Tensor):
        """Mean and variance over all samples so far (Chan et al.'s pairwise update, in float64)."""
        n_new = X.shape[0]
        n_total = self.n_samples_seen_ + n_new
        new_sum = X.sum(dim=0, dtype=torch.float64)
        centred = X - new_sum / n_new
        new_unnormalized_var = centred.square().sum(dim=0, dtype=torch.float64) - (
            centred.sum(dim=0, dtype=torch.float64).square() / n_new
        )
        if self.mean_ is None:
            return new_sum / n_total, new_unnormalized_var / n_total, n_total
        last_sum = self.mean_ * self.n_samples_seen_
        ratio = self.n_samples_seen_ / n_new
        unnormalized_var = (
            self.var_ * self.n_samples_seen_ + new_unnormalized_var
            + ratio / n_total * (last_sum / ratio - new_sum).square()
        )
        return (last_sum + new_sum) / n_total, unnormalized_var / n_total, n_total

    @torch.no_grad()
    def partial_fit(self, X: torch.Tensor) -> None:
        X = X.clone()
        n_samples, n_features = X.shape
        if self.n_components > n_features:
            raise ValueError(
                f"EVA needs {self.n_components} components of a layer with only {n_features} input features; "
                "lower r or rho"
            )
        mean, var, n_total = self._update_moments(X)
        if self.components_ is None:
            X -= mean
        else:
            batch_mean = X.mean(dim=0)
            X -= batch_mean
            correction = ((self.n_samples_seen_ / n_total) * n_samples) ** 0.5 * (self.mean_ - batch_mean)
            X = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, X, correction))
        with torch.random.fork_rng():  # the caller's RNG state is left as it was
            torch.manual_seed(self.seed)  # the randomized SVD is deterministic per call, as in peft
            _, S, V = torch.svd_lowrank(X, q=2 * self.n_components, niter=self.niter)
        Vt = V.mH
        # sign convention: the largest-magnitude entry of each component is positive
        signs = torch.sign(Vt[torch.arange(Vt.shape[0]), Vt.abs().argmax(dim=1)])
        Vt = Vt * signs.view(-1, 1)
        k = self.n_components
        self.components_ = Vt[:k]
        self.singular_values_ = S[:k]
        self.explained_variance_ratio_ = (S**2 / torch.sum(var * n_total))[:k]
        self.mean_, self.var_, self.n_samples_seen_ = mean, var, n_total


# ---- per-layer hooks ----


class _LayerHook:
    """Forward hook on one target layer: hashes the (prepared) input of the first batch, or feeds the incremental
    PCA and tracks convergence."""

    def __init__(self, name: str, prepare_fn: Callable):
        self.name = name
        self.prepare_fn = prepare_fn
        self.model_input = None
        self.input_hash = None
        self.svd: Optional[_IncrementalPCA] = None
        self.tau = None
        self.converged = None
        self.handle = None

    def start_svd(self, n_components: int, tau: float) -> None:
        self.svd = _IncrementalPCA(n_components)
        self.tau = tau
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module, inputs, output):
        states = self.prepare_fn(inputs, self.model_input, self.name)
        if self.svd is None:
            self.input_hash = hash(tuple(states.cpu().reshape(-1).tolist()))
            return
        if states.shape[0] < self.svd.n_components:
            warnings.warn(f"skipping SVD for {self.name} because there are less than {self.svd.n_components} examples")
            return
        previous = None if self.svd.components_ is None else self.svd.components_.clone()
        self.svd.partial_fit(states.to(torch.float32))
        if previous is not None:
            sim = nn.functional.cosine_similarity(self.svd.components_, previous)
            self.converged = (sim >= self.tau).cpu()


def _move_to(inputs, device):
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _move_to(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move_to(v, device) for v in inputs)
    return inputs


def _model_device(model: nn.Module):
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    if len(devices) > 1:
        warnings.warn(f"Could not determine device, model has multiple devices: {devices}")
        return None
    return devices.pop() if devices else None


def _rank_distribution(hooks, layer_to_hook, shared_with, budget, max_components) -> dict[str, int]:
    """The budget's ranks, given to the components with the largest explained-variance ratio over all layers (each
    layer its first max_components); a layer sharing another's input (`shared_with`) is counted separately, and the
    larger rank of the two goes to the layer that owns the decomposition."""
    owners, ratios = [], []
    for layer, hook_name in layer_to_hook.items():
        values = hooks[hook_name].svd.explained_variance_ratio_[: max_components[hook_name]]
        owners += [layer] * len(values)
        ratios.append(values)
    order = torch.cat(ratios).argsort(descending=True)[:budget]
    counts = {layer: 0 for layer in layer_to_hook}
    for i in order.tolist():
        counts[owners[i]] += 1
    for layer, owner in shared_with.items():
        if counts[owner] < counts[layer]:
            counts[owner], counts[layer] = counts[layer], counts[owner]
    return counts


def _compute_eva_state_dict(
    model, dataloader, peft_config, is_target, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn,
    show_progress_bar,
) -> dict[str, torch.Tensor]:
    if len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    settings = _eva_settings(peft_config)
    rho = settings.rho
    if rho > 1000:  # an effectively unlimited rho: cap it by the largest dimension in the model (peft's rule)
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)

    def model_input_for_hooks(inputs):
        return prepare_model_inputs_fn(inputs, peft_config) if prepare_model_inputs_fn is not None \
            else copy.deepcopy(inputs)

    layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    training, device = model.training, _model_device(model)
    model.eval()

    # 1. hash each target layer's input on the first batch
    hooks: dict[str, _LayerHook] = {}
    max_components: dict[str, int] = {}
    budget = 0
    first = _move_to(next(iter(dataloader)), device)
    for name, module in model.named_modules():
        if not is_target(name, module):
            continue
        fn = layer_fns.pop(name, None) if layer_fns is not None else prepare_layer_inputs_fn
        hook = _LayerHook(name, fn if fn is not None else _default_layer_inputs)
        hook.model_input = model_input_for_hooks(first)
        hook.handle = module.register_forward_hook(hook)
        hooks[name] = hook
        rank = peft_config.rank_pattern.get(get_pattern_key(peft_config.rank_pattern.keys(), name), peft_config.r)
        max_components[name] = round(rank * rho)
        budget += rank
    if layer_fns:
        raise ValueError(
            "prepare_layer_inputs_fn is a mapping but the following module names were not found in the model: "
            f"{list(layer_fns)}"
        )
    try:
        forward_fn(model, first)
    finally:
        for hook in hooks.values():
            hook.handle.remove()
    groups: dict[int, list[str]] = {}
    for name, hook in hooks.items():
        groups.setdefault(hook.input_hash, []).append(name)
    shared_with = {}  # layer -> the first layer with the same input, which owns the decomposition
    for names in groups.values():
        cap = max(max_components[n] for n in names)
        for n in names:
            max_components[n] = cap
        shared_with.update({n: names[0] for n in names[1:]})

    # 2. incremental SVD per distinct input, until every layer's assigned components converged
    svd_hooks = {name: hook for name, hook in hooks.items() if name not in shared_with}
    for name, hook in svd_hooks.items():
        hook.start_svd(max_components[name], settings.tau)
        hook.handle = model.get_submodule(name).register_forward_hook(hook)
    layer_to_hook = {**{n: n for n in svd_hooks}, **shared_with}
    done = {name: False for name in svd_hooks}
    rank_dist = dict(max_components)
    batches = itertools.cycle(dataloader)
    if show_progress_bar:
        from tqdm import tqdm

        batches = tqdm(batches, position=0, leave=False)
    try:
        for inputs in batches:
            inputs = _move_to(inputs, device)
            for name, hook in svd_hooks.items():
                converged = bool(torch.all(hook.converged[: rank_dist[name]]))
                if not done[name] and converged:
                    hook.handle.remove()
                    hook.handle, done[name] = None, True
                    continue
                if done[name] and not converged:  # the redistribution asked for components not converged yet
                    hook.handle = model.get_submodule(name).register_forward_hook(hook)
                    done[name] = False
                hook.model_input = model_input_for_hooks(inputs)
            if all(done.values()):
                break
            forward_fn(model, inputs)
            if all(h.svd.components_ is not None for h in svd_hooks.values()):
                rank_dist = _rank_distribution(svd_hooks, layer_to_hook, shared_with, budget, max_components)
    finally:
        for hook in svd_hooks.values():
            if hook.handle is not None:
                hook.handle.remove()

    state = {}
    for name, rank in rank_dist.items():
        hook = svd_hooks[layer_to_hook[name]]
        components = hook.svd.components_[:rank].clone()
        if settings.whiten:
            components /= hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        state[name] = components if device is None else components.to(device)
    model.train(training)
    return state


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Optional[LoraConfig] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict:
    """EVA's per-layer A (module name -> [rank, in_features] tensor; rank may differ from r), peft's function.

    Args:
        model: a fastpeft PeftModel / LoraModel (its LoRA Linear layers are used, adapters disabled while running), or
            a plain model (then `peft_config` is required and its targeted nn.Linear / Conv1D layers are used).
        dataloader: a sized iterable of batches (cycled until convergence).
        peft_config: the LoraConfig (taken from the model for a PeftModel).
        forward_fn: `forward_fn(model, batch)` runs one batch (default `model(**batch)`).
        prepare_model_inputs_fn: `fn(batch, peft_config)` -> what the layer function receives (default: the
            indices of non-padding, non-label-masked tokens).
        prepare_layer_inputs_fn: `fn(layer_input, model_input, layer_name)` -> 2-D rows for the SVD, or a dict
            layer name -> such a function (default: the rows at those indices).
        adapter_name: the adapter whose config is used.
        gather_distributed_inputs: in peft, gathers layer inputs over ranks under torch.distributed; fastpeft
            raises NotImplementedError if a process group is initialised and this is True.
        show_progress_bar: a tqdm bar over the batches.
    """
    if gather_distributed_inputs and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise NotImplementedError(
            "fastpeft's EVA does not gather layer inputs across distributed ranks; pass "
            "gather_distributed_inputs=False (each rank then decomposes its own inputs)"
        )
    is_peft_model = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft_model:
            raise ValueError("peft_config is required if model is not a PeftModel")
        peft_config = model.peft_config[adapter_name]
    conv1d = _conv1d_class()
    linear_types = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    if is_peft_model:
        def is_target(name, module):
            return isinstance(module, LoraLayer) and not isinstance(module, _UNSUPPORTED_LAYERS)

        ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else _AdaptersDisabled(model)
    else:
        def is_target(name, module):
            targeted = peft_config.target_modules is None or check_target_module_exists(peft_config, name)
            return isinstance(module, linear_types) and bool(targeted)

        ctx = nullcontext()
    with ctx:
        return _compute_eva_state_dict(
            model, dataloader, peft_config, is_target, forward_fn, prepare_model_inputs_fn,
            prepare_layer_inputs_fn, show_progress_bar,
        )


class _AdaptersDisabled:
    """A LoraModel's adapters switched off for the duration (PeftModel has `disable_adapter()` for this)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.disable_adapter_layers()

    def __exit__(self, *exc):
        self.model.enable_adapter_layers()


def _distinguishing_suffixes(targets: list[str], others: list[str]) -> set[str]:
    """For each target module name, its shortest dotted suffix that is no suffix of any other module's name."""
    def suffixes(name):
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    taken = {s for other in others for s in suffixes(other)}
    return {next(s for s in suffixes(t) if s not in taken) for t in targets}


@torch.no_grad()
def _load_eva_state_dict(model: nn.Module, eva_state_dict: dict, adapter_name: str) -> None:
    """Resize and set each LoRA layer's A from `eva_state_dict`; record ranks / alphas / targets in the config."""
    config = model.peft_config[adapter_name]
    settings = _eva_settings(config)
    state = dict(eva_state_dict)
    eva_targets, default_init, others = [], [], []
    rank_pattern, alpha_pattern = {}, {}
    for name, module in list(model.named_modules()):
        short = name.replace("base_model.model.", "")
        if not isinstance(module, LoraLayer):
            others.append(short)
            continue
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        if name in state:
            weight = state.pop(name)
            new_rank = weight.shape[0]
            if new_rank == 0:  # no component was worth a rank here: the layer goes back to its base layer
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.get_base_layer())
                continue
            if new_rank != r and settings.adjust_scaling_factors:
                alpha *= new_rank / r
            if new_rank != r or module.lora_A[adapter_name].weight.device.type == "meta":
                module.update_layer(adapter_name, new_rank, lora_alpha=alpha,
                                    config=_with_changes(config, init_lora_weights="eva"))
            module.lora_A[adapter_name].weight.copy_(weight)
            eva_targets.append(short)
        else:
            module.update_layer(adapter_name, r, lora_alpha=alpha,
                                config=_with_changes(config, init_lora_weights=True))
            default_init.append(short)
            new_rank = r
        if new_rank != config.r:
            rank_pattern[short] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
    targets = eva_targets + default_init
    if len(targets) >= _MIN_TARGET_MODULES_FOR_SUFFIXES:
        targets = _distinguishing_suffixes(targets, others)
    config.target_modules = targets
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if default_init:
        warnings.warn(
            "the following layers were initialized with init_lora_weights=True because they were not found in the "
            f"eva state_dict: {default_init}\ncurrently the following lora modules are not supported by EVA: "
            f"{_UNSUPPORTED_LAYERS}"
        )


def _with_changes(config: LoraConfig, **changes) -> LoraConfig:
    """A shallow copy of `config` with `changes` (no re-validation: only used to pass an init to update_layer)."""
    new = copy.copy(config)
    for key, value in changes.items():
        setattr(new, key, value)
    return new


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    eva_state_dict: Optional[dict] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
):
    """Initialise the LoRA A matrices of `model` (a PeftModel created with init_lora_weights="eva") by EVA, from
    `eva_state_dict` or computed with `get_eva_state_dict` on `dataloader` (same arguments). Returns `model`."""
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(
            model, dataloader, forward_fn=forward_fn, prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs, show_progress_bar=show_progress_bar,
        )
    _load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model
