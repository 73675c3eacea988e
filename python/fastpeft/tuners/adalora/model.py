"""`AdaLoraModel` and its `RankAllocator` (peft's AdaLoRA interface, algorithm and checkpoint format).

Training loop (as in peft)::

    loss = model(**batch).loss          # with labels: + orth_reg_weight * orthogonality regulariser
    loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(step)   # importance EMA, budget, masking of pruned triplets
    optimizer.zero_grad()

The rank allocator keeps peft's per-parameter state (`ipt`, `exp_avg_ipt`, `exp_avg_unc`, keyed by parameter
name) and makes the same decisions step for step; its updates run as foreach ops over all adapter tensors and
its scoring / masking as a few ops per layer, with one host sync per allocation.
"""
from __future__ import annotations

import operator
import warnings
import weakref
from typing import Optional, Union

import torch
from torch import nn

from ..base import BaseTunerLayer
from ..lora.model import LoraModel
from .config import AdaLoraConfig
from .layer import _LAYER_GENERATION, AdaLoraLayer, dispatch_adalora, layer_cache_changed

# model_type -> default target_modules (peft's mapping for AdaLoRA)
TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING: dict[str, Union[list[str], str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

_LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

_TRAINABLE_ERROR = (
    "{cls} supports only 1 trainable adapter. When using multiple adapters, set inference_mode to True for all "
    "adapters except the one you want to train."
)


def _adalora_layers(root: nn.Module, adapter_name: str) -> list[tuple[str, AdaLoraLayer]]:
    """(module name relative to `root`, layer) of every AdaLoRA layer holding `adapter_name`, in module order.

    Cached per root (the training step needs it three times); adding, resizing or deleting an AdaLoRA adapter
    and unloading invalidate the cache (`layer_cache_changed`)."""
    generation = _LAYER_GENERATION[0]
    entry = _LAYER_CACHE.get(root)
    if entry is None or entry[0] != generation:
        entry = (generation, {})
        _LAYER_CACHE[root] = entry
    layers = entry[1].get(adapter_name)
    if layers is None:
        layers = [(n, m) for n, m in root.named_modules() if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_A]
        entry[1][adapter_name] = layers
    return layers


def _layer_key(name: str, adapter_name: str) -> str:
    """Module name of a rank_pattern key: `<module>.lora_E.<adapter>` or `<module>.lora_E` (peft writes both)."""
    for suffix in (f".lora_E.{adapter_name}", ".lora_E"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"rank_pattern key {name!r} does not name a lora_E parameter (`<module>.lora_E[.<adapter>]`)")


def _as_bool_mask(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().view(-1).to(torch.bool)
    if isinstance(value, (list, tuple)):
        return torch.tensor([bool(v) for v in value], dtype=torch.bool)
    raise TypeError(f"Unexpected type of rank_idx: {type(value).__name__} (expected a list of booleans)")


def resize_modules_by_rank_pattern(root: nn.Module, rank_pattern: dict, adapter_name: str,
                                   config: AdaLoraConfig) -> None:
    """Shrink the AdaLoRA layers under `root` to the triplets rank_pattern keeps (peft's loading of pruned
    checkpoints). A layer already at the pattern's rank is left alone."""
    for name, mask in rank_pattern.items():
        keep = _as_bool_mask(mask)
        key = _layer_key(name, adapter_name)
        try:
            layer = root.get_submodule(key)
        except AttributeError:
            raise ValueError(f"rank_pattern names module {key!r}, which the model does not have") from None
        if not isinstance(layer, AdaLoraLayer) or adapter_name not in layer.lora_A:
            raise ValueError(f"rank_pattern names {key!r}, which holds no AdaLoRA adapter {adapter_name!r}")
        current = layer.lora_A[adapter_name].shape[0]
        rank = int(keep.sum().item())
        if current == keep.numel():
            layer.resize_adapter(adapter_name, keep, config)
        elif current != rank:
            raise ValueError(
                f"rank_pattern[{name!r}] has {keep.numel()} entries ({rank} kept) but the layer has {current} "
                "triplets; the pattern was written for another init_r"
            )


class RankAllocator:
    """AdaLoRA's budget allocation (peft's `RankAllocator`): importance = EMA of |p * grad| times the EMA of its
    deviation, per element; a triplet's score = E's + mean over A's row + mean over B's column; the lowest scoring
    triplets beyond the budget (cubic schedule) have their E set to 0.

    Args:
        model: the module holding the AdaLoRA layers (`AdaLoraModel.model`); parameter names are relative to it.
        peft_config: the adapter's `AdaLoraConfig`.
        adapter_name: the trainable adapter.
    """

    def __init__(self, model: nn.Module, peft_config: AdaLoraConfig, adapter_name: str):
        self.peft_config = peft_config
        self.adapter_name = adapter_name
        self.beta1 = peft_config.beta1
        self.beta2 = peft_config.beta2
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must lie in (0, 1), got {self.beta1}, {self.beta2}")
        self._mask_cache: Optional[tuple] = None
        self.reset_ipt()
        self._set_budget_scheduler(model)

    def set_total_step(self, total_step: int) -> None:
        self.peft_config.total_step = total_step

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _set_budget_scheduler(self, model: nn.Module) -> None:
        layers = _adalora_layers(model, self.adapter_name)
        self.init_bgt = sum(layer.lora_A[self.adapter_name].shape[0] for _, layer in layers)
        self.name_set = sorted(f"{name}.%s.{self.adapter_name}" for name, _ in layers)
        self.target_bgt = self.peft_config.target_r * len(self.name_set)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step): full budget until tinit, cubic decrease to the target until
        total_step - tfinal, masking every deltaT steps; the target afterwards."""
        tinit, tfinal, total_step = self.peft_config.tinit, self.peft_config.tfinal, self.peft_config.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total_step - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % self.peft_config.deltaT == 0

    def _triplets(self, model: nn.Module):
        """[(module name, A, B, E)] of the adapter, in module order."""
        a = self.adapter_name
        return [(name, layer.lora_A[a], layer.lora_B[a], layer.lora_E[a]) for name, layer in _adalora_layers(model, a)]

    def _named_params(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        a, out = self.adapter_name, []
        for name, A, B, E in self._triplets(model):
            out += [(f"{name}.lora_A.{a}", A), (f"{name}.lora_B.{a}", B), (f"{name}.lora_E.{a}", E)]
        return out

    def update_ipt(self, model: nn.Module) -> None:
        """Update the sensitivity (|p * grad|), its EMA and the EMA of its uncertainty for every A, B, E."""
        named = self._named_params(model)
        missing = [n for n, p in named if p.grad is None]
        if missing:
            raise RuntimeError(
                f"update_and_allocate needs the gradients of the AdaLoRA weights, but {len(missing)} have none "
                f"(e.g. {missing[0]!r}): call it after loss.backward() (and optimizer.step()) and before "
                "optimizer.zero_grad()"
            )
        for n, p in named:
            if n not in self.ipt or self.ipt[n].shape != p.shape:
                self.ipt[n] = torch.zeros_like(p)
                self.exp_avg_ipt[n] = torch.zeros_like(p)
                self.exp_avg_unc[n] = torch.zeros_like(p)
        names = [n for n, _ in named]
        params = [p.detach() for _, p in named]
        grads = [p.grad for _, p in named]
        b1, b2 = self.beta1, self.beta2
        with torch.no_grad():
            ipt = torch._foreach_abs(torch._foreach_mul(params, grads))
            avg = [self.exp_avg_ipt[n] for n in names]
            avg = torch._foreach_add(torch._foreach_mul(avg, b1), torch._foreach_mul(ipt, 1 - b1))
            unc = [self.exp_avg_unc[n] for n in names]
            dev = torch._foreach_abs(torch._foreach_sub(ipt, avg))
            unc = torch._foreach_add(torch._foreach_mul(unc, b2), torch._foreach_mul(dev, 1 - b2))
        for n, i, a_, u in zip(names, ipt, avg, unc):
            self.ipt[n], self.exp_avg_ipt[n], self.exp_avg_unc[n] = i, a_, u

    def _element_score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Mask (E = 0) the lowest scoring triplets so that `budget` remain; returns the rank_pattern
        (`<module>.lora_E.<adapter>` -> kept flags)."""
        a = self.adapter_name
        triplets = self._triplets(model)
        names, scores, sizes = [], [], []
        with torch.no_grad():
            for name, _, _, _ in triplets:
                s_a = self._element_score(f"{name}.lora_A.{a}").mean(dim=1)
                s_b = self._element_score(f"{name}.lora_B.{a}").mean(dim=0)
                s_e = self._element_score(f"{name}.lora_E.{a}").view(-1)
                scores.append(s_e + (s_a + s_b))
                names.append(f"{name}.lora_E.{a}")
                sizes.append(s_e.numel())
            all_scores = torch.cat(scores) if scores else torch.zeros(0)
            k = self.init_bgt - budget
            if k <= 0 or all_scores.numel() == 0:  # nothing to prune (peft's kthvalue would fail on k=0)
                masked = torch.zeros_like(all_scores, dtype=torch.bool)
            else:
                threshold = torch.kthvalue(all_scores, k=min(k, all_scores.numel()))[0]
                masked = all_scores <= threshold
            for (_, _, _, E), m in zip(triplets, masked.split(sizes)):
                E.masked_fill_(m.view(-1, 1), 0.0)
            kept = (~masked).tolist()
        rank_pattern, start = {}, 0
        for n, size in zip(names, sizes):
            rank_pattern[n] = kept[start : start + size]
            start += size
        return rank_pattern

    def update_and_allocate(self, model: nn.Module, global_step: int, force_mask: bool = False):
        """Update the importance (before the final phase), then mask to the scheduled budget when due.
        Returns (budget, rank_pattern or None)."""
        if global_step < self.peft_config.total_step - self.peft_config.tfinal:
            self.update_ipt(model)
        budget, mask_ind = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(model, budget) if (mask_ind or force_mask) else None
        return budget, rank_pattern

    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict) -> None:
        """Set E = 0 at the triplets `rank_pattern` marks as pruned (keys with or without the adapter name)."""
        if not rank_pattern:
            return
        a = self.adapter_name
        cache = self._mask_cache
        if cache is None or cache[0] is not rank_pattern or cache[1] is not model or cache[3] != _LAYER_GENERATION[0]:
            masks = []
            for name, layer in _adalora_layers(model, a):
                key = f"{name}.lora_E.{a}"
                value = rank_pattern.get(key, rank_pattern.get(f"{name}.lora_E"))
                if value is None:
                    raise KeyError(f"rank_pattern has no entry for {key!r}")
                E = layer.lora_E[a]
                pruned = ~_as_bool_mask(value).to(E.device)
                if pruned.numel() != E.shape[0] and E.shape[0] == int((~pruned).sum()):
                    continue  # the layer was resized to the kept triplets (a loaded pruned checkpoint)
                if pruned.numel() != E.shape[0]:
                    raise ValueError(f"rank_pattern[{key!r}] has {pruned.numel()} entries, the layer {E.shape[0]}")
                masks.append((layer, pruned.view(-1, 1)))
            cache = self._mask_cache = (rank_pattern, model, masks, _LAYER_GENERATION[0])
        with torch.no_grad():
            for layer, pruned in cache[2]:
                layer.lora_E[a].masked_fill_(pruned, 0.0)


class AdaLoraModel(LoraModel):
    """Creates AdaLoRA (adaptive-rank LoRA) adapters on a model (peft's `AdaLoraModel`).

    Args:
        model: the base model; modified in place (available as `.model`).
        peft_config: an `AdaLoraConfig`, or a dict adapter name -> `AdaLoraConfig`.
        adapter_name: the adapter to create (default "default").

    Only one adapter may be trainable (the others must have `inference_mode=True`), as in peft. Layers
    supported: nn.Linear, transformers' Conv1D, nn.Conv2d. With labels, `forward` adds
    `orth_reg_weight * mean ||P P^T - I||_F` over the trainable adapter's A (rows) and B (columns) to the loss.
    Call `update_and_allocate(global_step)` every training step after backward (see the module docstring).
    """

    target_module_mapping = TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING

    def __init__(self, model: nn.Module, config, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
                 state_dict: Optional[dict] = None) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        if sum(not c.inference_mode for c in self.peft_config.values()) > 1:
            raise ValueError(_TRAINABLE_ERROR.format(cls=type(self).__name__))

    # ---- adapters ----

    def _check_new_adapter_config(self, config: AdaLoraConfig) -> None:
        if not isinstance(config, AdaLoraConfig):
            raise TypeError(f"{type(self).__name__} needs an AdaLoraConfig, got {type(config).__name__}")
        super()._check_new_adapter_config(config)
        if sum(not c.inference_mode for c in self.peft_config.values()) > 1:
            raise ValueError(_TRAINABLE_ERROR.format(cls=type(self).__name__))

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        layer_cache_changed()
        with warnings.catch_warnings():
            # AdaLoRA's rank_pattern names lora_E parameters (kept-triplet masks), not modules to match
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if config.inference_mode:
            for layer in self._tuner_layers():
                if isinstance(layer, AdaLoraLayer):
                    layer.set_requires_grad(adapter_name, False)
        else:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self.model, config, adapter_name)

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r, alpha = lora_config.init_r, lora_config.lora_alpha
        if isinstance(target, AdaLoraLayer):
            target.update_layer(adapter_name, r, alpha, config=lora_config)
            return
        new_module = self._create_new_module(lora_config, adapter_name, target, r=r, lora_alpha=alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs) -> nn.Module:
        new_module = dispatch_adalora(target, adapter_name, lora_config, **kwargs)
        if new_module is None:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            raise ValueError(
                f"Target module {type(base).__name__} is not supported. Currently, only `torch.nn.Linear`, `Conv1D`, "
                "and `torch.nn.Conv2d` are supported."
            )
        return new_module

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        layer_cache_changed()
        if getattr(self, "trainable_adapter_name", None) == adapter_name:
            del self.trainable_adapter_name
            self.__dict__.pop("rankallocator", None)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        layer_cache_changed()
        try:
            return super()._unload_and_optionally_merge(*args, **kwargs)
        finally:
            layer_cache_changed()

    def add_weighted_adapter(self, *args, **kwargs):
        """Not supported for AdaLoRA (as in peft); use LoRA instead."""
        raise TypeError(f"{type(self).__name__} does not support add_weighted_adapter method.")

    # ---- training ----

    def _orth_reg_loss(self, adapter_name: str) -> Optional[torch.Tensor]:
        """mean over the adapter's A and B of ||A A^T - I||_F / ||B^T B - I||_F (peft's regulariser); the
        matrices of one shape are handled in one batched product."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        count = 0
        for _, layer in _adalora_layers(self.model, adapter_name):
            A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            groups.setdefault(("A",) + tuple(A.shape) + (A.dtype, A.device), []).append(A)
            groups.setdefault(("B",) + tuple(B.shape) + (B.dtype, B.device), []).append(B)
            count += 2
        if count == 0:
            return None
        total = None
        for key, mats in groups.items():
            stacked = torch.stack(mats)  # [n, r, in] (A) or [n, out, r] (B)
            if key[0] == "A":
                cov = torch.bmm(stacked, stacked.transpose(1, 2))
            else:
                cov = torch.bmm(stacked.transpose(1, 2), stacked)
            r = cov.shape[-1]
            if r == 0:
                continue
            eye = torch.eye(r, dtype=cov.dtype, device=cov.device)
            norms = torch.linalg.vector_norm((cov - eye).flatten(1), dim=1).sum()
            total = norms if total is None else total + norms
        if total is None:
            return None
        return total / count

    def forward(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        adapter = getattr(self, "trainable_adapter_name", None)
        if isinstance(loss, torch.Tensor) and adapter is not None and adapter in self.peft_config:
            orth_reg_weight = self.peft_config[adapter].orth_reg_weight
            if orth_reg_weight < 0:
                raise ValueError("orth_reg_weight should be greater than or equal to 0. ")
            if orth_reg_weight > 0:
                regu_loss = self._orth_reg_loss(adapter)
                if regu_loss is not None:
                    outputs.loss = loss + orth_reg_weight * regu_loss.to(loss.dtype)
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance scores and the rank budget, and mask the pruned triplets.

        Call it every training step after `loss.backward()` (peft's loop: after `optimizer.step()`) and before
        `zero_grad()`. Until `total_step - tfinal` the budget follows the schedule (masking every `deltaT` steps,
        the config's `rank_pattern` updated); at `total_step - tfinal` the final allocation (`target_r` per
        layer on average) is made; afterwards the pruned triplets are kept at zero.
        """
        adapter = getattr(self, "trainable_adapter_name", None)
        if adapter is None or not hasattr(self, "rankallocator"):
            raise ValueError(
                "update_and_allocate needs a trainable AdaLoRA adapter (inference_mode=False); this model has none"
            )
        try:
            global_step = operator.index(global_step)
        except TypeError:
            global_step = None
        if global_step is None or global_step < 0:
            raise ValueError("global_step must be a non-negative int (the training step)")
        lora_config = self.peft_config[adapter]
        final = lora_config.total_step - lora_config.tfinal
        if global_step < final:
            _, rank_pattern = self.rankallocator.update_and_allocate(self.model, global_step)
            if rank_pattern:
                lora_config.rank_pattern = rank_pattern
        elif global_step == final:
            _, rank_pattern = self.rankallocator.update_and_allocate(self.model, global_step, force_mask=True)
            lora_config.rank_pattern = rank_pattern
            self.rankallocator.reset_ipt()
        else:
            self.rankallocator.mask_using_rank_pattern(self.model, lora_config.rank_pattern)

    def resize_modules_by_rank_pattern(self, rank_pattern: dict, adapter_name: str) -> None:
        """Shrink the layers of `adapter_name` to the triplets `rank_pattern` keeps (peft's method)."""
        resize_modules_by_rank_pattern(self.model, rank_pattern, adapter_name, self.peft_config[adapter_name])

    def resize_state_dict_by_rank_pattern(self, rank_pattern: dict, state_dict: dict, adapter_name: str) -> dict:
        """Keep only the kept triplets' rows / columns of lora_E, lora_A, lora_B in `state_dict` (peft's method)."""
        return _resize_state_dict(rank_pattern, state_dict, adapter_name)

    # ---- checkpoint hooks (fastpeft.checkpoint; peft's names) ----

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        from ... import checkpoint as ckpt

        prefixes = ckpt._tuner_key_prefixes(model)
        to_return = {k: v for k, v in state_dict.items() if ckpt._is_key_under_prefixes(k, prefixes)}
        to_return.update(ckpt._learnable_bias_state_dict(model, state_dict, config))
        # ranknum is deterministic (r) and not saved, as in peft
        to_return = {k: v for k, v in to_return.items() if not k.endswith(f".ranknum.{adapter_name}")}
        if config.rank_pattern is not None:
            suffix = f".{adapter_name}"
            config.rank_pattern = {(k[: -len(suffix)] if k.endswith(suffix) else k): v
                                   for k, v in config.rank_pattern.items()}
            to_return = _resize_state_dict(config.rank_pattern, to_return, adapter_name)
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict, model_to_ckpt=None):
        from ... import checkpoint as ckpt

        if config.rank_pattern is not None:
            tuner = getattr(model, "base_model", None)
            root = tuner.model if isinstance(tuner, AdaLoraModel) else (model.model if isinstance(model, AdaLoraModel)
                                                                        else model)
            resize_modules_by_rank_pattern(root, config.rank_pattern, adapter_name, config)
        remapped = ckpt._remap_for_load(model, config, adapter_name, state_dict, model_to_ckpt)
        # ranknum is not in checkpoints: keep the model's own values
        for k, v in model.state_dict().items():
            if k.endswith(f".ranknum.{adapter_name}") and k not in remapped:
                remapped[k] = v
        return remapped


def _resize_state_dict(rank_pattern: dict, state_dict: dict, adapter_name: str) -> dict:
    out = dict(state_dict)
    for name, mask in rank_pattern.items():
        keep = _as_bool_mask(mask)
        rank = int(keep.sum().item())
        prefix = _layer_key(name, adapter_name)
        for part in ("lora_E", "lora_A", "lora_B"):
            candidates = [f"base_model.model.{prefix}.{part}.{adapter_name}", f"{prefix}.{part}.{adapter_name}"]
            key = next((c for c in candidates if c in out), None)
            if key is None:
                continue
            tensor = out[key]
            dim = 1 if part == "lora_B" else 0
            if tensor.shape[dim] == rank:
                continue
            if tensor.shape[dim] != keep.numel():
                raise ValueError(
                    f"rank_pattern[{name!r}] has {keep.numel()} entries but {key} has {tensor.shape[dim]} triplets"
                )
            index = keep.to(tensor.device)
            out[key] = tensor[index] if dim == 0 else tensor[:, index]
    return out
