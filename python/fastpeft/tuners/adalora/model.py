"""`AdaLoraModel` and its `RankAllocator` (peft's AdaLoRA interface, algorithm and checkpoint format).

Training loop (as in peft)::

    loss = model(**batch).loss          # with labels: + orth_reg_weight * orthogonality regulariser
    loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(step)   # importance EMA, budget, masking of pruned triplets
    optimizer.zero_grad()

The rank allocator keeps peft's per-parameter state (`ipt`, `exp_avg_ipt`, `exp_avg_unc`, keyed by parameter
name: views of flat buffers) and makes the same decisions step for step, to the bit; its update runs as a few
whole-buffer ops (plus one cat per group of same-shaped tensors to gather the weights and gradients), its scoring
as one batched mean per group, with one host sync per allocation (the rank_pattern). The orthogonality
regulariser is one autograd function (`_OrthReg`): a batched Gram product per group, its gradient written out.
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


class _ViewDict(dict):
    """A dict that notes any change made to it (the allocator's dicts hold views of its flat buffers; once
    someone changes an entry, the flat state is rebuilt from the dict's values)."""

    dirty = False

    def _touch(name):
        def method(self, *args, **kwargs):
            self.dirty = True
            return getattr(dict, name)(self, *args, **kwargs)
        method.__name__ = name
        return method

    for _name in ("__setitem__", "__delitem__", "pop", "popitem", "setdefault", "update", "clear", "__ior__"):
        locals()[_name] = _touch(_name)
    del _name, _touch


# ATen runs an elementwise op or reduction on the OpenMP pool only from this many elements on (GRAIN_SIZE)
_CPU_SERIAL_ELEMS = 32767


class _FlatIpt:
    """The allocator's importance state (peft's `ipt`, `exp_avg_ipt`, `exp_avg_unc`) in flat buffers, one
    element per adapter weight, ordered by segments of same-shaped tensors (all A of one shape, ...), with
    peft's per-name dicts holding views into them. The EMA update is a handful of whole-buffer ops (peft's
    formulas op for op, so the same values to the bit) instead of ~10 ops per parameter, and the triplet scores
    a batched mean per segment.

    On CPU every op is issued on pieces below ATen's parallel grain, so that none wakes the OpenMP pool: the
    allocator runs after the optimizer's many small serial ops, when the pool's threads are asleep, and waking
    them costs more than the work (milliseconds per op when the machine is loaded). On other devices one op
    covers the whole buffer."""

    def __init__(self, names: list, params: list, sig: list, layer_sizes: list, old: tuple):
        first = params[0]
        self.params, self.sig, self.names, self.layer_sizes = params, sig, names, layer_sizes
        device, dtype = first.device, first.dtype
        piece = _CPU_SERIAL_ELEMS if device.type == "cpu" else None
        # segments: (kind, shape) -> [param index]; kind 0 = A (mean over rows), 1 = B (over columns), 2 = E
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((i % 3, tuple(p.shape)), []).append(i)
        total = sum(p.numel() for p in params)
        self.P = torch.empty(total, device=device, dtype=dtype)
        self.G = torch.empty(total, device=device, dtype=dtype)  # gradients, then a workspace, then the scores
        self.ipt, self.avg, self.unc = (torch.zeros(total, device=device, dtype=dtype) for _ in range(3))
        n_trip = sum(layer_sizes)
        self.n_trip = n_trip
        self.score_ab = torch.empty(2 * n_trip, device=device, dtype=dtype)
        views = [{}, {}, {}]
        self.cats = []       # (param indices, P view, G view): the gather, one cat per segment
        self.means = []      # (G view [n, rows, cols], dim, score_ab view [n, r]): the A / B scores
        e_views = []         # G views of the E segments, in segment order
        offset, tri = 0, [0, 0, 0]
        order = [[], [], []]  # per kind: module-order triplet index of each segment-order position
        layer_start = [0]
        for s in layer_sizes:
            layer_start.append(layer_start[-1] + s)
        for (kind, shape), idx in groups.items():
            each = params[idx[0]].numel()
            numel = len(idx) * each
            rows = (len(idx) * shape[0],) + shape[1:]
            flat = slice(offset, offset + numel)
            self.cats.append((idx, self.P[flat].view(rows), self.G[flat].view(rows)))
            r = shape[1] if kind == 1 else shape[0]
            if kind == 2:
                e_views.append(self.G[offset : offset + numel])
            elif r > 0 and each > 0:
                step = len(idx) if piece is None else max(1, piece // each)
                for j in range(0, len(idx), step):
                    nb = min(step, len(idx) - j)
                    src = self.G[offset + j * each : offset + (j + nb) * each].view(nb, shape[0], shape[1])
                    t0 = kind * n_trip + tri[kind] + j * r
                    self.means.append((src, 2 if kind == 0 else 1, self.score_ab[t0 : t0 + nb * r].view(nb, r)))
            tri[kind] += len(idx) * r
            o = offset
            for i in idx:
                name, p = names[i], params[i]
                keep_old = all(isinstance(s_.get(name), torch.Tensor) and s_[name].shape == p.shape for s_ in old)
                for d, buf, src in zip(views, (self.ipt, self.avg, self.unc), old):
                    v = buf[o : o + each].view(p.shape)
                    if keep_old:
                        v.copy_(src[name])
                    d[name] = v
                o += each
                layer = i // 3
                order[kind].extend(range(layer_start[layer], layer_start[layer] + r))
            offset += numel
        if tri[0] != n_trip or tri[1] != n_trip or tri[2] != n_trip:
            raise RuntimeError("AdaLoRA layer shapes are inconsistent (A rows, B columns and E must match)")
        self.views = views
        # the elementwise passes: whole buffers, or pieces below the parallel grain on CPU
        bufs = (self.P, self.G, self.ipt, self.avg, self.unc)
        step = total if piece is None else piece
        self.pieces = [tuple(b[s : s + step] for b in bufs) for s in range(0, total, step)]
        self.e_scores = e_views[0] if len(e_views) == 1 else None
        self.e_views = e_views
        # segment order -> module order of the triplets: scores[t] = buffer[inverse[t]]
        inv = [torch.empty(n_trip, dtype=torch.long) for _ in range(3)]
        for kind in range(3):
            inv[kind][torch.tensor(order[kind], dtype=torch.long)] = torch.arange(n_trip)
        ident = torch.arange(n_trip)
        self.perm_ab = self.perm_e = None
        if not (torch.equal(inv[0], ident) and torch.equal(inv[1], ident)):
            self.perm_ab = torch.cat([inv[0], inv[1] + n_trip]).to(device)
        if not torch.equal(inv[2], ident):
            self.perm_e = inv[2].to(device)
        self._scored = None  # (avg, unc versions) when G holds avg * unc

    def update(self, grads: list, beta1: float, beta2: float) -> None:
        """peft's update_ipt on the flat buffers (then G = avg * unc, the element scores)."""
        params = self.params
        for idx, p_out, g_out in self.cats:
            torch.cat([params[i] for i in idx], out=p_out)  # (under no_grad)
            torch.cat([grads[i] for i in idx], out=g_out)
        c1, c2 = 1 - beta1, 1 - beta2
        for P, G, ipt, avg, unc in self.pieces:
            torch.mul(P, G, out=ipt).abs_()                  # ipt = |p * grad|
            torch.mul(ipt, c1, out=G)
            avg.mul_(beta1).add_(G)                          # b1 * avg + (1 - b1) * ipt
            torch.sub(ipt, avg, out=G).abs_().mul_(c2)
            unc.mul_(beta2).add_(G)                          # b2 * unc + (1 - b2) * |ipt - avg|
            torch.mul(avg, unc, out=G)                       # peft's _element_score
        self._scored = (self.avg._version, self.unc._version)

    def triplet_scores(self) -> torch.Tensor:
        """peft's per-triplet score, in module order: s_E + (mean_row(s_A) + mean_col(s_B)), s = avg * unc."""
        if self._scored != (self.avg._version, self.unc._version):
            for _, G, _, avg, unc in self.pieces:
                torch.mul(avg, unc, out=G)
            self._scored = (self.avg._version, self.unc._version)
        for src, dim, out in self.means:
            torch.mean(src, dim=dim, out=out)
        n = self.n_trip
        s_e = self.e_scores if self.e_scores is not None else torch.cat(self.e_views)
        if self.perm_e is not None:
            s_e = s_e.index_select(0, self.perm_e)
        ab = self.score_ab
        pair = (ab if self.perm_ab is None else ab.index_select(0, self.perm_ab)).view(2, n)
        return torch.add(pair[0], pair[1]).add_(s_e)


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
        self._names_cache: Optional[tuple] = None
        self._flat: Optional[_FlatIpt] = None
        self.reset_ipt()
        self._set_budget_scheduler(model)

    def set_total_step(self, total_step: int) -> None:
        self.peft_config.total_step = total_step

    def reset_ipt(self) -> None:
        self._flat = None
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

    def _adapter_params(self, model: nn.Module):
        """(names, [A, B, E of each layer in module order]) of the adapter (the layers' ParameterDicts are
        cached with the layer list: no module attribute lookups per step)."""
        a = self.adapter_name
        layers = _adalora_layers(model, a)
        cache = self._names_cache
        if cache is None or cache[0] is not layers:
            names, dicts, slots = [], [], []
            for name, layer in layers:
                names += [f"{name}.lora_A.{a}", f"{name}.lora_B.{a}", f"{name}.lora_E.{a}"]
                for kind in ("lora_A", "lora_B", "lora_E"):
                    dicts.append(getattr(layer, kind))
                    slots.append((layer._modules, kind))
            cache = self._names_cache = (layers, names, dicts, [d._parameters for d in dicts], slots)
        params = [d.get(a) for d in cache[3]]
        if any(p is None for p in params) or not all(mods.get(k) is d for (mods, k), d in zip(cache[4], cache[2])):
            params = [t for _, A, B, E in self._triplets(model) for t in (A, B, E)]
        return cache[1], params

    def _flat_state(self, model: nn.Module, create: bool) -> Optional[_FlatIpt]:
        """The flat importance state if it matches the adapter's parameters and peft's dicts still hold its views
        (created, from the dicts' values, when `create`); None where the generic path must run (no layers,
        parameters on several devices / dtypes, or state the dicts no longer mirror)."""
        names, params = self._adapter_params(model)
        if not params:
            return None
        sig = [(p.dtype, p.device, p.shape) for p in params]
        st = self._flat
        if (st is not None and len(st.params) == len(params) and all(map(operator.is_, st.params, params))
                and st.sig == sig and st.names == names):
            dicts = (self.ipt, self.exp_avg_ipt, self.exp_avg_unc)
            if all(d is v and not d.dirty for d, v in zip(dicts, st.dicts)):
                return st
        if not create:
            return None
        if len({(d, t) for t, d, _ in sig}) != 1:
            return None
        sizes = [params[i].shape[0] for i in range(0, len(params), 3)]
        try:
            st = _FlatIpt(names, params, sig, sizes, (self.ipt, self.exp_avg_ipt, self.exp_avg_unc))
        except RuntimeError:
            return None
        st.dicts = tuple(_ViewDict({**old, **new}) for old, new in
                         zip((self.ipt, self.exp_avg_ipt, self.exp_avg_unc), st.views))
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = st.dicts
        self._flat = st
        return st

    @staticmethod
    def _missing_grads(names: list, missing: list) -> RuntimeError:
        return RuntimeError(
            f"update_and_allocate needs the gradients of the AdaLoRA weights, but {len(missing)} have none "
            f"(e.g. {missing[0]!r}): call it after loss.backward() (and optimizer.step()) and before "
            "optimizer.zero_grad()"
        )

    def update_ipt(self, model: nn.Module) -> None:
        """Update the sensitivity (|p * grad|), its EMA and the EMA of its uncertainty for every A, B, E
        (peft's formulas, op for op: the same values to the bit)."""
        st = self._flat_state(model, create=True)
        if st is None:
            return self._update_ipt_generic(model)
        grads = [p.grad for p in st.params]
        if any(g is None for g in grads):
            raise self._missing_grads(st.names, [n for n, g in zip(st.names, grads) if g is None])
        with torch.no_grad():
            st.update(grads, self.beta1, self.beta2)

    def _update_ipt_generic(self, model: nn.Module) -> None:
        named = self._named_params(model)
        missing = [n for n, p in named if p.grad is None]
        if missing:
            raise self._missing_grads([n for n, _ in named], missing)
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
        (`<module>.lora_E.<adapter>` -> kept flags). One host sync (the rank_pattern's lists)."""
        st = self._flat_state(model, create=False)
        if st is None:
            return self._mask_to_budget_generic(model, budget)
        with torch.no_grad():
            scores = st.triplet_scores()
            k = self.init_bgt - budget
            if k <= 0 or scores.numel() == 0:  # nothing to prune (peft's kthvalue would fail on k=0)
                kept = [True] * scores.numel()
                masked = None
            else:
                threshold = torch.kthvalue(scores, k=min(k, scores.numel()))[0]
                masked = scores <= threshold
                kept = (~masked).tolist()
            rank_pattern, start = {}, 0
            parts = masked.view(-1, 1).split(st.layer_sizes) if masked is not None else None
            for i, size in enumerate(st.layer_sizes):
                keep = kept[start : start + size]
                rank_pattern[st.names[3 * i + 2]] = keep
                if parts is not None and not all(keep):
                    st.params[3 * i + 2].masked_fill_(parts[i], 0.0)
                start += size
        return rank_pattern

    def _mask_to_budget_generic(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
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
                if isinstance(value, (list, tuple)) and all(value):
                    continue  # nothing pruned in this layer
                masks.append((layer, pruned.view(-1, 1)))
            cache = self._mask_cache = (rank_pattern, model, masks, _LAYER_GENERATION[0])
        with torch.no_grad():
            for layer, pruned in cache[2]:
                layer.lora_E[a].masked_fill_(pruned, 0.0)


class _OrthRegPlan:
    """The regulariser's groups for one list of A / B matrices: (kind, indices, workspace) per (kind, shape,
    dtype, device); the workspace holds the stacked matrices between forward and backward (`token` tells
    whether a later forward overwrote it)."""

    def __init__(self, mats: list):
        groups: dict[tuple, list[int]] = {}
        for i, m in enumerate(mats):
            groups.setdefault((i % 2, tuple(m.shape), m.dtype, m.device), []).append(i)
        self.sig = [(m.dtype, m.device, m.shape) for m in mats]
        self.count = len(mats)
        self.groups = []
        for (kind, shape, dtype, device), idx in groups.items():
            if shape[1 - kind] == 0:  # r == 0: no matrix, no term (peft's empty norm is 0)
                continue
            ws = torch.empty((len(idx),) + shape, dtype=dtype, device=device)
            self.groups.append([kind, idx, ws, None])


def _orth_reg_plan(mats: list, cache: dict) -> Optional[_OrthRegPlan]:
    plan = cache.get("plan")
    if plan is None or len(plan.sig) != len(mats) or plan.sig != [(m.dtype, m.device, m.shape) for m in mats]:
        plan = cache["plan"] = _OrthRegPlan(mats)
    return plan if plan.groups or plan.count else None


class _OrthReg(torch.autograd.Function):
    """sum_i ||P_i - I||_F / n over n matrices, P = A A^T (lora_A, even positions) or B^T B (lora_B, odd).

    Forward per group of same-shaped matrices: stack, one bmm for the Gram matrices, the identity subtracted on
    their diagonals, one batched norm. Backward: d/dX ||X X^T - I|| = 2 (X X^T - I) X / ||.|| (a zero norm gives
    a zero gradient, as torch.norm's backward), one bmm per group; the gradients are slices of it."""

    @staticmethod
    def forward(ctx, plan: _OrthRegPlan, *mats):
        norms, grams, tokens = [], [], []
        for group in plan.groups:
            kind, idx, ws, _ = group
            x = torch.stack([mats[i] for i in idx], out=ws)
            gram = torch.bmm(x, x.transpose(1, 2)) if kind == 0 else torch.bmm(x.transpose(1, 2), x)
            gram.diagonal(dim1=1, dim2=2).sub_(1)
            norms.append(torch.linalg.vector_norm(gram.flatten(1), dim=1))
            grams.append(gram)
            token = group[3] = object()
            tokens.append(token)
        ctx.plan, ctx.tokens = plan, tokens
        if not norms:
            ctx.save_for_backward(*mats)
            return mats[0].new_zeros(())
        norms = norms[0] if len(norms) == 1 else torch.cat(norms)
        ctx.save_for_backward(*mats, *grams, norms)
        return norms.sum() / plan.count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        plan = ctx.plan
        saved = ctx.saved_tensors
        n_groups = len(plan.groups)
        n_mats = len(saved) - (n_groups + 1 if n_groups else 0)
        mats = saved[:n_mats]
        grads = [None] * n_mats
        if not n_groups:
            return (None, *grads)
        grams, norms = saved[n_mats : n_mats + n_groups], saved[-1]
        # d/dP ||P - I||_F = (P - I) / ||P - I||_F, zero where the norm is 0 (torch.norm's backward)
        coef = torch.where(norms == 0, 0.0, (grad_out * (2.0 / plan.count)) / norms)
        start = 0
        for group, token, gram in zip(plan.groups, ctx.tokens, grams):
            kind, idx, ws, current = group
            x = ws if current is token else torch.stack([mats[i] for i in idx])
            # (under autocast the forward's Gram matrices may be in a lower precision than x)
            w = gram.to(x.dtype) * coef[start : start + len(idx)].view(-1, 1, 1).to(x.dtype)
            start += len(idx)
            g = torch.bmm(w, x) if kind == 0 else torch.bmm(x, w)
            for i, gi in zip(idx, g.unbind(0)):
                grads[i] = gi
        return (None, *grads)


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
        """mean over the adapter's A and B of ||A A^T - I||_F / ||B^T B - I||_F (peft's regulariser), with its
        gradient written out (`_OrthReg`): a few batched ops per group of same-shaped matrices."""
        layers = _adalora_layers(self.model, adapter_name)
        cache = self.__dict__.get("_orth_reg_cache")
        if cache is None or cache[0] is not layers or cache[1] != adapter_name:
            slots = []
            for _, layer in layers:
                slots += [layer.lora_A._parameters, layer.lora_B._parameters]
            cache = (layers, adapter_name, slots, {})
            self.__dict__["_orth_reg_cache"] = cache
        mats = [d.get(adapter_name) for d in cache[2]]
        if any(m is None for m in mats):  # not a plain ParameterDict entry
            mats = [t for _, layer in layers for t in (layer.lora_A[adapter_name], layer.lora_B[adapter_name])]
        if not mats:
            return None
        plan = _orth_reg_plan(mats, cache[3])
        if plan is None:
            return None
        return _OrthReg.apply(plan, *mats)

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
