"""LoRA / DoRA adapter layers: Linear (also transformers' Conv1D), Embedding, Conv1d, Conv2d.

Attribute names are peft's (`base_layer`, `lora_A`, `lora_B`, `lora_embedding_A`, `lora_embedding_B`,
`lora_dropout`, `lora_magnitude_vector`, `scaling`, `r`, `lora_alpha`, `merged_adapters`, ...), so the
state-dict keys are the same as with peft.

Forward of Linear / Conv1D: the first active adapter is computed together with the base layer by the
fused op (`fastpeft.ops.lora_linear` or `fastpeft.ops.dora_linear`, weight passed as [out, in]);
any further active adapters are added on top with the unfused path `B(A(dropout(x))) * scaling`
(DoRA: peft's formula against the bare base output x W^T; peft instead uses the output *including*
the adapters before it, so several active DoRA adapters differ from peft in that order-dependent
detail). The unfused path is also used for what the op cannot express: extra forward arguments or
a base layer that is not a plain nn.Linear / Conv1D (e.g. a quantized one). Dropout in the fused
path is the op's seeded dropout (mask regenerated from a seed), not nn.Dropout's draws.
Conv and Embedding adapters use torch ops (peft's math).
"""
from __future__ import annotations

import math
import re
import sys
import warnings
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BaseTunerLayer, _conv1d_class, linear_kind, transpose
from .config import LoraConfig
from .inits import building_adapter_for_checkpoint

_ops_module = None


def _ops():
    """fastpeft.ops, imported on first use (keeps `import fastpeft.tuners` light)."""
    global _ops_module
    if _ops_module is None:
        from ... import ops

        _ops_module = ops
    return _ops_module


class DoraMagnitude(nn.Module):
    """Holds a DoRA adapter's magnitude vector as `.weight` (the key peft's DoraLinearLayer has)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


def _delta_in_fp32_on_cpu(a: torch.Tensor, b: torch.Tensor):
    """peft's rule: half-precision products on CPU are computed in float32 and cast back."""
    cast = a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
    return (a.float(), b.float(), a.dtype) if cast else (a, b, None)


class LoraLayer(BaseTunerLayer):
    """State and behaviour shared by every LoRA layer kind."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")

    def _init_lora_layer(self, base_layer: nn.Module, adapter_name: str) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.lora_magnitude_vector = nn.ModuleDict({})
        self.use_dora: dict[str, bool] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._caches: dict[str, torch.Tensor] = {}  # DoRA weight norms of merged adapters
        # adapter -> names of its weights that stay frozen in training (peft's attribute; MiCA's lora_B)
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        # adapter -> invocation token ids, for the aLoRA adapters of this layer (see alora.py)
        self.alora_invocation_tokens: dict[str, list[int]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        # import fastpeft.ops now, not in the first forward: torch.compile guards on the module global `_ops()`
        # reads, so a trace that ran the import would see it change and recompile on the next call
        _ops()
        # over another method's layer (mixed models) the shapes are those of the layer at the bottom of the nest
        innermost = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        self.in_features, self.out_features = self._in_out_features(innermost)

    # ---- per-kind hooks ----

    def _in_out_features(self, base_layer: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        raise NotImplementedError

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s * B A of `adapter`, in the base weight's layout."""
        raise NotImplementedError

    def _dora_weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's norm of a combined weight W + dW (base layout), shaped like the magnitude vector."""
        raise NotImplementedError

    def _dora_factor_view(self) -> tuple[int, ...]:
        """How magnitude / norm broadcasts against the base weight."""
        raise NotImplementedError

    # ---- adapters ----

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        """Add (or replace) adapter `adapter_name` with rank `r` and alpha `lora_alpha`, initialised per `config`."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        init = config.init_lora_weights
        if init == "mica" and config.use_dora:
            raise ValueError("init_lora_weights='mica' cannot be combined with use_dora=True (as in peft); drop one")
        if config.lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(
                f"`lora_bias=True` was passed but the targeted layer of type {type(self.get_base_layer()).__name__} "
                "has no bias. This means that merging LoRA weights won't be possible."
            )
        alora_tokens = _alora_tokens_for_layer(self, config)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self._create_adapter_weights(adapter_name, r, config.lora_bias)
        self.lora_bias[adapter_name] = config.lora_bias
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = config.use_dora
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        if alora_tokens is not None:
            self.__dict__.setdefault("alora_invocation_tokens", {})[adapter_name] = alora_tokens
        else:
            getattr(self, "alora_invocation_tokens", {}).pop(adapter_name, None)

        if isinstance(init, str) and init.startswith("pissa"):
            self._pissa_init(adapter_name, init)
        elif init == "olora":
            self._olora_init(adapter_name)
        elif init == "loftq":
            self._loftq_init(adapter_name, config)
        elif init in ("orthogonal", "mica", "eva", "corda", "lora_ga"):
            self._init_peft_method(adapter_name, init, config)
        elif init:
            self.reset_lora_parameters(adapter_name, init)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if init == "mica":  # MiCA trains A only (peft's MiCA variant registers B as frozen)
            self._register_frozen_weight(adapter_name, "lora_embedding_B" if isinstance(self, Embedding) else "lora_B")
        if config.use_dora:
            self._dora_init(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ---- trainability: weights an adapter keeps frozen (peft's frozen_peft_weight_names) ----

    def _register_frozen_weight(self, adapter_name: str, weight_name: str) -> None:
        # getattr: layers of other methods built on LoraLayer may not run _init_lora_layer
        frozen = dict(getattr(self, "frozen_peft_weight_names", {}))
        if weight_name not in frozen.get(adapter_name, ()):
            frozen[adapter_name] = frozen.get(adapter_name, ()) + (weight_name,)
        self.frozen_peft_weight_names = frozen
        self._freeze_non_trainable_peft_weights(adapter_name)

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        """Re-freeze the registered weights (after anything that marks adapter weights trainable)."""
        frozen = getattr(self, "frozen_peft_weight_names", {})
        if adapter_names is None:
            adapter_names = list(frozen)
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for adapter in adapter_names:
            for weight_name in frozen.get(adapter, ()):
                container = getattr(self, weight_name)
                if adapter in container:
                    container[adapter].requires_grad_(False)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._freeze_non_trainable_peft_weights()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        self._freeze_non_trainable_peft_weights()

    # ---- inits ----

    def _init_peft_method(self, adapter_name: str, init: str, config: LoraConfig) -> None:
        """The inits "orthogonal", "mica", "eva", "corda", "lora_ga" (peft's semantics, per layer kind)."""
        if any(p.device.type == "meta" for p in self._adapter_params(adapter_name)):
            return  # created empty (low_cpu_mem_usage): the checkpoint fills the weights; nothing to compute
        if init == "lora_ga" and not isinstance(self, Linear):
            self.reset_lora_parameters(adapter_name, True)  # peft: LoRA-GA covers Linear / Conv1D only
            return
        if isinstance(self, _ConvNd):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported for {type(self.get_base_layer()).__name__} layers (as "
                "in peft); exclude them from target_modules or use init_lora_weights=True"
            )
        if init == "mica":
            self._mica_init(adapter_name)
        elif isinstance(self, Embedding):
            # peft gives embeddings the default init for the other methods
            self.reset_lora_parameters(adapter_name, True)
        elif init == "orthogonal":
            self._orthogonal_init(adapter_name)
        elif init == "eva":
            # A keeps nn.Linear's init and B is zero (peft); initialize_lora_eva_weights then sets A from data
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        elif init == "corda":
            self._corda_init(adapter_name)
        else:
            self._lora_ga_init(adapter_name, config)

    def _adapter_params(self, adapter_name: str) -> list[torch.Tensor]:
        if adapter_name in self.lora_embedding_A:
            return [self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]]
        return [self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        """peft's default inits: A kaiming-uniform(a=sqrt(5)) (or N(0, 1/r) for "gaussian"), B zeros;
        for embeddings A zeros and B N(0, 1)."""
        if init_lora_weights is False:
            return
        if adapter_name in self.lora_A:
            weight_A = self.lora_A[adapter_name].weight
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(weight_A, a=math.sqrt(5))
            elif init_lora_weights == "gaussian":
                nn.init.normal_(weight_A, std=1 / self.r[adapter_name])
            else:
                raise ValueError(f"Unknown initialization {init_lora_weights=}")
            nn.init.zeros_(self.lora_B[adapter_name].weight)
            if self.lora_bias.get(adapter_name, False):
                nn.init.zeros_(self.lora_B[adapter_name].bias)
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _require_linear(self, what: str) -> None:
        if not isinstance(self, Linear):
            raise ValueError(f"init_lora_weights={what!r} is only supported for Linear / Conv1D layers, not {type(self.get_base_layer()).__name__}")

    def _pissa_init(self, adapter_name: str, init: str) -> None:
        """PiSSA: the top-r singular triplets of W go into A, B (scaled by 1/scaling); W keeps the residual."""
        self._require_linear(init)
        base = self.get_base_layer()
        dtype = base.weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError("Please initialize PiSSA under float32, float16, or bfloat16.")
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        weight = transpose(base.weight.detach().to(torch.float32), self.fan_in_fan_out)  # [out, in]
        if init == "pissa":
            V, S, Uh = torch.linalg.svd(weight, full_matrices=False)
            Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
        else:
            niter = re.fullmatch(r"pissa_niter_(\d+)", init)
            if niter is None:
                raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {init}")
            Vr, Sr, Ur = torch.svd_lowrank(weight, r, niter=int(niter.group(1)))
            Sr = Sr / scaling
            Uhr = Ur.t()
        lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
        lora_B = Vr @ torch.diag(torch.sqrt(Sr))
        self.lora_A[adapter_name].weight.data = lora_A.contiguous()
        self.lora_B[adapter_name].weight.data = lora_B.contiguous()
        residual = weight - scaling * lora_B @ lora_A
        base.weight.data = transpose(residual.to(dtype), self.fan_in_fan_out).contiguous()

    def _olora_init(self, adapter_name: str) -> None:
        """OLoRA: QR of W; B = the first r columns of Q, A = the first r rows of R; W -= scaling * B A."""
        self._require_linear("olora")
        base = self.get_base_layer()
        dtype = base.weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"Unsupported data type for the base layer. Got {dtype}.")
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        # peft factorises the stored weight as is (no fan_in_fan_out transpose), so does this
        weight = base.weight.detach().to(torch.float32)
        Q, R = torch.linalg.qr(weight)
        self.lora_A[adapter_name].weight.data = R[:r].contiguous()
        self.lora_B[adapter_name].weight.data = Q[:, :r].contiguous()
        weight = weight - scaling * self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight
        base.weight.data = weight.to(dtype)

    @torch.no_grad()
    def _orthogonal_init(self, adapter_name: str) -> None:
        """Orthogonal init (peft's): the rows of a random r x r orthogonal Q are split, odd ones into A and even ones
        into B, each mixed with Gaussian noise / 10, so B A = 0 at the start (Q's rows are orthogonal) while neither
        factor is zero. The base weight is untouched. Draws from torch's CPU RNG in peft's order (same seed, same A, B)."""
        r = self.r[adapter_name]
        if r % 2 != 0:
            raise ValueError(
                f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead; choose an even r "
                "(and even values in rank_pattern)"
            )
        Q, _ = torch.linalg.qr(torch.randn(r, r))
        dtype = self.get_base_layer().weight.dtype
        lora_A = (torch.randn(self.in_features, r // 2) @ Q[0::2, :]).T / 10.0
        lora_B = torch.randn(r // 2, self.out_features).T @ Q[1::2, :] / 10.0
        self.lora_A[adapter_name].weight.data = lora_A.contiguous().to(dtype)
        self.lora_B[adapter_name].weight.data = lora_B.contiguous().to(dtype)

    @torch.no_grad()
    def _mica_init(self, adapter_name: str) -> None:
        """MiCA: B = the r left singular vectors of W [out, in] with the smallest singular values, A = 0 (so the
        base weight stays as it is); B is frozen in training (registered in update_layer)."""
        base = self.get_base_layer()
        dtype = base.weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError("Please initialize MiCA under float32, float16, or bfloat16.")
        embedding = isinstance(self, Embedding)
        # the adapter's map is [out, in]: for an embedding that is weight.T ([dim, num_embeddings])
        weight = base.weight.detach().to(torch.float32)
        weight = weight.T if embedding else transpose(weight, self.fan_in_fan_out)
        r, max_r = self.r[adapter_name], min(weight.shape)
        if r > max_r:
            raise ValueError(
                f"MiCA requires `r` <= min(in_features, out_features) but got r={r} for a layer with weight shape "
                f"{tuple(weight.shape)} (max usable r is {max_r}); lower r (or its rank_pattern entry)"
            )
        U, _, _ = torch.linalg.svd(weight, full_matrices=False)
        lora_B = U[:, -r:].contiguous().to(dtype)
        lora_A = torch.zeros(r, weight.shape[1], device=weight.device, dtype=dtype)
        if embedding:
            self.lora_embedding_B[adapter_name].data = lora_B
            self.lora_embedding_A[adapter_name].data = lora_A
        else:
            self.lora_B[adapter_name].weight.data = lora_B
            self.lora_A[adapter_name].weight.data = lora_A

    def _corda_init(self, adapter_name: str) -> None:
        """CorDA: A, B from the covariance-aware SVD that `preprocess_corda` left on the base layer (`eigens`), with
        the singular values split as sqrt(S / scaling) on each side; the base weight keeps W - scaling * B A."""
        base = self.get_base_layer()
        if not hasattr(base, "eigens"):
            if building_adapter_for_checkpoint():
                # the checkpoint brings A and B, and the base passed in is the residual model: change nothing
                self.reset_lora_parameters(adapter_name, True)
                return
            raise ValueError(
                "`eigens` attribute not found for layer, please run `preprocess_corda` first "
                "(fastpeft.tuners.lora.preprocess_corda(model, lora_config, run_model=...)) before get_peft_model"
            )
        from .corda import corda_factors

        lora_A, lora_B = corda_factors(base, self.r[adapter_name], self.scaling[adapter_name], self.fan_in_fan_out)
        self.lora_A[adapter_name].weight.data = lora_A
        self.lora_B[adapter_name].weight.data = lora_B
        self._subtract_from_base(adapter_name)
        del base.eigens

    def _lora_ga_init(self, adapter_name: str, config: LoraConfig) -> None:
        """LoRA-GA: A, B from the SVD of the gradient `preprocess_loraga` left on the base layer; without it (a
        checkpoint is being loaded) peft's default init."""
        base = self.get_base_layer()
        if not hasattr(base, "_peft_loraga_grad"):
            if not building_adapter_for_checkpoint():
                warnings.warn(
                    "init_lora_weights='lora_ga' but no gradient was found on the layer (run preprocess_loraga first); "
                    "using the default LoRA init, as peft does"
                )
            self.reset_lora_parameters(adapter_name, True)
            return
        from .loraga import loraga_factors

        lora_A, lora_B = loraga_factors(self, adapter_name, config.init_subconfig("lora_ga_config"))
        self.lora_A[adapter_name].weight.data = lora_A.contiguous()
        self.lora_B[adapter_name].weight.data = lora_B.contiguous()
        self._subtract_from_base(adapter_name)
        del base._peft_loraga_grad

    @torch.no_grad()
    def _subtract_from_base(self, adapter_name: str) -> None:
        """W <- W - scaling * B A (in float32, stored in W's dtype): the adapted layer starts with the base output."""
        base = self.get_base_layer()
        dtype = base.weight.dtype
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        delta = transpose(self.scaling[adapter_name] * b @ a, self.fan_in_fan_out)
        base.weight.data = (base.weight.detach().float() - delta).to(dtype)

    def _loftq_init(self, adapter_name: str, config: LoraConfig) -> None:
        try:
            from ...quant.loftq import loftq_init
        except ImportError:
            raise NotImplementedError(
                "init_lora_weights='loftq' needs fastpeft.quant.loftq, which this build does not have yet"
            ) from None
        loftq_init(self, adapter_name, config)

    def _dora_init(self, adapter_name: str) -> None:
        """DoRA magnitude = the norm of W + s B A (rows of the [out, in] weight; peft's shapes per layer kind)."""
        weight = self.get_base_layer().weight.detach()
        delta = self.get_delta_weight(adapter_name).detach()
        magnitude = self._dora_weight_norm(weight + delta.to(weight.dtype))
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    def _check_forward_args(self, x, *args, **kwargs) -> None:
        mixed = kwargs.get("adapter_names")
        if mixed is None:
            return
        from .mixed import MixedBatch, check_layer_args, supports_mixed

        if not supports_mixed(self):
            raise TypeError(f"lora.{type(self).__name__} does not support mixed adapter batches.")
        check_layer_args(self, x, mixed if isinstance(mixed, MixedBatch) else MixedBatch(mixed))

    # ---- merging ----

    def _unmerged_base_weight(self) -> torch.Tensor:
        """The base weight without the adapters merged into it so far (a copy when some are merged)."""
        weight = self.get_base_layer().weight.detach()
        if not self.merged_adapters:
            return weight
        weight = weight.clone()
        for name in reversed(self.merged_adapters):
            weight = self._unmerged_weight(name, weight)
        return weight

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name).detach().to(weight.dtype)
        if adapter_name in self.lora_magnitude_vector:
            norm = self._caches[f"{adapter_name}-weight_norm"]
            factor = self.lora_magnitude_vector[adapter_name].weight.detach() / norm
            return (weight / factor.view(self._dora_factor_view()) - delta).to(weight.dtype)
        return weight - delta

    def _merged_by_tied_embedding(self, adapter_name: str) -> bool:
        """ensure_weight_tying: this layer (lm_head) shares the input embedding's base weight and, transposed, its
        adapter, so merging the embedding's adapter already merges this layer's; merging here too would add the
        delta twice (peft does)."""
        embedding = self.__dict__.get("_tied_embedding", {}).get(adapter_name)
        return embedding is not None and embedding.get_base_layer().weight is self.get_base_layer().weight

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        if adapter_name in getattr(self, "alora_invocation_tokens", {}):  # peft's refusal (class and message)
            raise NotImplementedError(
                "aLoRA does not support merging: the adapter acts on the tokens after its invocation sequence only "
                f"(adapter {adapter_name!r}); keep it unmerged"
            )
        if self._merged_by_tied_embedding(adapter_name):
            return
        base = self.get_base_layer()
        if getattr(base, "groups", 1) > 1:
            raise NotImplementedError("Merging is not supported for conv layers with groups > 1")
        weight = base.weight
        with torch.no_grad():
            delta = self.get_delta_weight(adapter_name).to(weight.dtype)
            if adapter_name in self.lora_magnitude_vector:
                # the norm is that of the unmerged base weight (as in forward); kept for unmerging
                norm = self._dora_weight_norm(self._unmerged_base_weight() + delta).detach()
                factor = self.lora_magnitude_vector[adapter_name].weight.detach() / norm
                new_weight = (factor.view(self._dora_factor_view()) * (weight + delta)).to(weight.dtype)
            else:
                norm = None
                new_weight = weight + delta
            new_bias = None
            if self.lora_bias.get(adapter_name, False):
                if getattr(base, "bias", None) is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
                new_bias = base.bias + self.lora_B[adapter_name].bias * self.scaling[adapter_name]
            if safe_merge and not (
                torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())
            ):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            if norm is not None:
                self._caches[f"{adapter_name}-weight_norm"] = norm
            weight.data = new_weight
            if new_bias is not None:
                base.bias.data = new_bias.to(base.bias.dtype)

    def _unmerge_adapter(self, adapter_name: str) -> None:
        if self._merged_by_tied_embedding(adapter_name):
            return
        base = self.get_base_layer()
        with torch.no_grad():
            base.weight.data = self._unmerged_weight(adapter_name, base.weight.detach())
            self._caches.pop(f"{adapter_name}-weight_norm", None)
            if self.lora_bias.get(adapter_name, False):
                base.bias.data -= self.lora_B[adapter_name].bias * self.scaling[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._caches.pop(f"{adapter_name}-weight_norm", None)
        getattr(self, "frozen_peft_weight_names", {}).pop(adapter_name, None)
        getattr(self, "alora_invocation_tokens", {}).pop(adapter_name, None)

    # ---- scaling helpers (peft's API) ----

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter not in self.scaling:
            return
        r, alpha = self.r[adapter], self.lora_alpha[adapter]
        self.scaling[adapter] = scale * alpha / (math.sqrt(r) if self.use_rslora.get(adapter) else r)

    def scale_layer(self, scale: float) -> None:
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for adapter in self.active_adapters:
            if adapter not in self.scaling:
                continue
            if scale is None:
                self.set_scale(adapter, 1.0)
            else:
                self.scaling[adapter] /= scale

    def _adapters_to_apply(self, x, args: tuple, kwargs: dict) -> list[str]:
        """The start of every LoRA forward: check the arguments, drop `adapter_names` from `kwargs` (in place), unmerge
        when the adapters are disabled. Returns the active adapters to add to the base layer's output, or [] when
        that output is the answer (adapters disabled or merged, or none active)."""
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        return [] if self._runs_base_only() else self._active_lora_adapters()

    def _active_lora_adapters(self) -> list[str]:
        container = self.lora_embedding_A if isinstance(self, Embedding) else self.lora_A
        return [a for a in self.active_adapters if a in container]

    def _dropout_p(self, adapter_name: str) -> float:
        dropout = self.lora_dropout[adapter_name]
        return dropout.p if (self.training and isinstance(dropout, nn.Dropout)) else 0.0


class Linear(nn.Module, LoraLayer):
    """LoRA on nn.Linear, or on transformers' Conv1D (`fan_in_fan_out=True`: weight stored [in, out])."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: float = 1,
        is_target_conv_1d_layer: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        self._init_lora_layer(base_layer, adapter_name)
        self.fan_in_fan_out = config.fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        # resolved here, not in forward: torch.compile would trace (and warn about) the lru_cache-wrapped lookup
        self._conv1d_cls = _conv1d_class()
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        adapter_name: str = "default",
    ) -> "Linear":
        """Wrap an nn.Linear (or Conv1D) in a LoRA layer without a wrapper model; the base weights are frozen."""
        is_conv1d = cls._is_conv1d_base(linear)
        config = LoraConfig(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora, use_rslora=use_rslora,
            init_lora_weights=init_lora_weights, fan_in_fan_out=is_conv1d,
        )
        linear.requires_grad_(False)
        return cls(linear, adapter_name, config=config, r=r, lora_alpha=lora_alpha, is_target_conv_1d_layer=is_conv1d)

    @classmethod
    def _is_conv1d_base(cls, linear: nn.Module) -> bool:
        """from_linear's check of the layer to wrap: whether it is a transformers Conv1D (else an nn.Linear)."""
        conv1d = _conv1d_class()
        is_conv1d = conv1d is not None and isinstance(linear, conv1d)
        if not (isinstance(linear, nn.Linear) or is_conv1d):
            raise TypeError(f"from_linear expects an nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        return is_conv1d

    def _in_out_features(self, base_layer):
        if isinstance(base_layer, nn.Linear):
            return base_layer.in_features, base_layer.out_features
        weight = base_layer.weight  # Conv1D: [in, out]
        return (weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape)

    def _create_adapter_weights(self, adapter_name, r, lora_bias):
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b, cast_back = _delta_in_fp32_on_cpu(self.lora_A[adapter].weight, self.lora_B[adapter].weight)
        delta = transpose(b @ a, self.fan_in_fan_out) * self.scaling[adapter]
        return delta.to(cast_back) if cast_back is not None else delta

    def _dora_weight_norm(self, weight):
        return torch.linalg.norm(transpose(weight, self.fan_in_fan_out), dim=1).to(weight.dtype)

    def _dora_factor_view(self):
        return (1, -1) if self.fan_in_fan_out else (-1, 1)

    # ---- forward ----

    def _can_fuse(self, args, kwargs) -> bool:
        base = self.get_base_layer()
        conv1d = self._conv1d_cls
        plain = type(base) is nn.Linear or (conv1d is not None and type(base) is conv1d)
        # the fused op takes the scale as a float; tensor scalings (compiled hot-swap) take the unfused path
        tensor_scaling = any(isinstance(v, torch.Tensor) for v in self.scaling.values())
        # a base layer wrapped by another method's layer (mixed models) runs through that layer (unfused)
        return plain and self.base_layer is base and not args and not kwargs and not tensor_scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mixed = kwargs.get("adapter_names")
        alora_offsets = kwargs.pop("alora_offsets", None)  # set by LoraModel's hook for aLoRA layers only
        active = self._adapters_to_apply(x, args, kwargs)
        if mixed is not None and not self.disable_adapters:
            from .mixed import MixedBatch, mixed_linear_forward

            mixed = mixed if isinstance(mixed, MixedBatch) else MixedBatch(mixed)
            return mixed_linear_forward(self, x, mixed, *args, alora_offsets=alora_offsets, **kwargs)
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self.alora_invocation_tokens and any(a in self.alora_invocation_tokens for a in active):
            return self._forward_alora(x, active, alora_offsets, self._adapter_delta, *args, **kwargs)
        if not self._can_fuse(args, kwargs):
            return self._forward_unfused(x, active, *args, **kwargs)

        first, rest = active[0], active[1:]
        base = self.get_base_layer()
        weight = transpose(base.weight, self.fan_in_fan_out)  # [out, in]
        dtype = weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            weight = weight.to(dtype)
        x_c = x.to(dtype)
        bias = base.bias.to(dtype) if base.bias is not None else None
        # adapters kept in float32 next to a half-precision base (autocast_adapter_dtype) run in its dtype
        lora_A = self.lora_A[first].weight.to(dtype)
        lora_B = self.lora_B[first].weight.to(dtype)
        scaling, p = self.scaling[first], self._dropout_p(first)
        if first in self.lora_magnitude_vector:
            magnitude = self.lora_magnitude_vector[first].weight.to(dtype)
            result = _ops().dora_linear(x_c, weight, bias, lora_A, lora_B, magnitude, scaling, p)
        else:
            result = _ops().lora_linear(x_c, weight, bias, lora_A, lora_B, scaling, p)
        if self.lora_bias.get(first, False):
            result = result + self.lora_B[first].bias * scaling
        if rest:
            base_out = None
            for name in rest:
                delta, base_out = self._adapter_delta(name, x, base_out)
                result = result + delta
        return result.to(dtype)

    def _forward_alora(self, x, active, alora_offsets, adapter_delta, *args, **kwargs):
        """Some active adapter is an aLoRA: base output, then each adapter in turn; the aLoRA ones on the tokens
        `alora_offsets` selects only (alora.masked_delta), the others with `adapter_delta` (the layer's unfused
        path: (name, x, base_out) -> (delta, base_out))."""
        from .alora import AloraOffsets, masked_delta

        # the hook hands every layer the same AloraOffsets (its token index is built once per forward and shape)
        offsets = alora_offsets
        if offsets is not None and not isinstance(offsets, AloraOffsets):
            offsets = AloraOffsets(offsets)
        result = base_out = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in active:
            if name in self.alora_invocation_tokens:
                result = masked_delta(self, name, x, result, offsets)
            else:
                delta, base_out = adapter_delta(name, x, base_out)
                result = result + delta
        return result.to(result_dtype)

    def _forward_unfused(self, x, active, *args, **kwargs):
        result = base_out = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in active:
            delta, base_out = self._adapter_delta(name, x, base_out)
            result = result + delta
        return result.to(result_dtype)

    def _adapter_delta(self, name: str, x: torch.Tensor, base_out: Optional[torch.Tensor]):
        """One adapter's contribution, unfused (peft's math). `base_out` is base_layer(x) (computed if None)."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        x = x.to(lora_A.weight.dtype)
        if name not in self.lora_magnitude_vector:
            return lora_B(lora_A(dropout(x))) * scaling, base_out
        base = self.get_base_layer()
        weight = base.weight.to(x.dtype)
        lora_weight = (lora_B.weight @ lora_A.weight).detach()  # [out, in]
        norm = self._dora_weight_norm(weight + transpose(lora_weight, self.fan_in_fan_out) * scaling).detach()
        mag_norm_scale = (self.lora_magnitude_vector[name].weight / norm).view(1, -1)
        if self.training and isinstance(dropout, nn.Dropout):
            x = dropout(x)
            bare = F.linear(x, transpose(weight, self.fan_in_fan_out))
        else:
            if base_out is None:
                base_out = self.base_layer(x)
            bare = base_out if base.bias is None else base_out - base.bias
        delta = (mag_norm_scale - 1) * bare + mag_norm_scale * lora_B(lora_A(x)) * scaling
        return delta, base_out

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Embedding(nn.Module, LoraLayer):
    """LoRA on nn.Embedding: `lora_embedding_A` [r, num_embeddings], `lora_embedding_B` [dim, r]."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs) -> None:
        super().__init__()
        self._init_lora_layer(base_layer, adapter_name)
        self.fan_in_fan_out = config.fan_in_fan_out
        if config.lora_bias:
            raise ValueError(f"lora_bias={config.lora_bias} is not supported for {type(self).__name__}.")
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _in_out_features(self, base_layer):
        return base_layer.num_embeddings, base_layer.embedding_dim

    def _create_adapter_weights(self, adapter_name, r, lora_bias):
        if lora_bias:
            raise ValueError(f"lora_bias={lora_bias} is not supported for {type(self).__name__}.")
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn((r, self.in_features)))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn((self.out_features, r)))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b, cast_back = _delta_in_fp32_on_cpu(self.lora_embedding_A[adapter], self.lora_embedding_B[adapter])
        delta = (b @ a).T * self.scaling[adapter]  # [num_embeddings, dim]
        return delta.to(cast_back) if cast_back is not None else delta

    def _dora_weight_norm(self, weight):
        return torch.linalg.norm(weight.T, dim=1).to(weight.dtype)  # per embedding dimension

    def _dora_factor_view(self):
        return (1, -1)

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(
            x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )

    def _embed_scale(self) -> Optional[torch.Tensor]:
        """The `embed_scale` some embeddings (e.g. Gemma's) apply in forward; applied to the adapter too."""
        base = self.get_base_layer()
        scale = getattr(base, "embed_scale", None)
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mixed = kwargs.get("adapter_names")
        active = self._adapters_to_apply(x, args, kwargs)
        if mixed is not None and not self.disable_adapters:
            from .mixed import MixedBatch, mixed_embedding_forward

            mixed = mixed if isinstance(mixed, MixedBatch) else MixedBatch(mixed)
            return mixed_embedding_forward(self, x, mixed, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not active:
            return result
        result_dtype = result.dtype
        embed_scale = self._embed_scale()
        for name in active:
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            scaling = self.scaling[name]
            adapter_out = (self._embed(x, A.T) @ B.T) * scaling
            if embed_scale is not None:
                adapter_out = adapter_out * embed_scale.to(adapter_out.dtype)
            if name in self.lora_magnitude_vector:
                weight = self.get_base_layer().weight
                norm = self._dora_weight_norm(weight + ((B @ A).T * scaling).detach()).detach()
                mag_norm_scale = self.lora_magnitude_vector[name].weight / norm
                result = mag_norm_scale * result + mag_norm_scale * adapter_out
            else:
                result = result + adapter_out
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class _ConvNd(nn.Module, LoraLayer):
    """LoRA on nn.Conv1d / nn.Conv2d: A is a conv like the base (r out channels), B a 1x1 conv."""

    _kernel_dim: int
    _conv_fn = None

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs) -> None:
        super().__init__()
        conv = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer  # mixed models
        if conv.weight.dim() != self._kernel_dim:
            raise ValueError(f"{type(self).__name__} layer kernel must have {self._kernel_dim} dimensions, "
                             f"not {conv.weight.dim()}")
        if conv.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
        if r % conv.groups != 0:
            raise ValueError(
                f"Targeting a {type(conv).__name__} with groups={conv.groups} and rank {r}: the rank "
                "must be divisible by groups; choose a different rank or do not target this layer"
            )
        self._init_lora_layer(base_layer, adapter_name)
        self.fan_in_fan_out = False
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _in_out_features(self, base_layer):
        return base_layer.in_channels, base_layer.out_channels

    def _create_adapter_weights(self, adapter_name, r, lora_bias):
        base = self.get_base_layer()
        conv = type(base)
        ones = (1,) * (self._kernel_dim - 2)
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b, cast_back = _delta_in_fp32_on_cpu(self.lora_A[adapter].weight, self.lora_B[adapter].weight)
        base = self.get_base_layer()
        scaling = self.scaling[adapter]
        if base.weight.shape[2:] == (1,) * (self._kernel_dim - 2):  # 1x1 conv: a matrix product
            r = a.shape[0]
            delta = (b.reshape(b.shape[0], -1) @ a.reshape(r, -1)).reshape(base.weight.shape) * scaling
        else:
            delta = self._conv_fn(a.transpose(0, 1), b)
            delta = (delta if base.groups > 1 else delta.transpose(0, 1)) * scaling
        return delta.to(cast_back) if cast_back is not None else delta

    def _dora_weight_norm(self, weight):
        dims = tuple(range(1, weight.dim()))
        return weight.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)  # [1, out, 1, ...] (peft's shape)

    def _dora_factor_view(self):
        return (-1,) + (1,) * (self._kernel_dim - 1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._adapters_to_apply(x, args, kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not active:
            return result
        result_dtype = result.dtype
        base = self.get_base_layer()
        for name in active:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dropout, scaling = self.lora_dropout[name], self.scaling[name]
            xa = x.to(lora_A.weight.dtype)
            if name not in self.lora_magnitude_vector:
                result = result + lora_B(lora_A(dropout(xa))) * scaling
                continue
            r = lora_A.weight.shape[0]
            lora_weight = (lora_B.weight.reshape(-1, r) @ lora_A.weight.reshape(r, -1)).reshape(base.weight.shape)
            norm = self._dora_weight_norm(base.weight + scaling * lora_weight.detach()).detach()
            mag_norm_scale = self.lora_magnitude_vector[name].weight / norm
            if self.training and isinstance(dropout, nn.Dropout):
                xa = dropout(xa)
                bare = self._conv_fn(xa, base.weight, None, base.stride, base.padding, base.dilation, base.groups)
            else:
                bare = result if base.bias is None else result - base.bias.view((1, -1) + (1,) * (result.dim() - 2))
            result = result + (mag_norm_scale - 1) * bare + mag_norm_scale * lora_B(lora_A(xa)) * scaling
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Conv1d(_ConvNd):
    _kernel_dim = 3
    _conv_fn = staticmethod(F.conv1d)


class Conv2d(_ConvNd):
    _kernel_dim = 4
    _conv_fn = staticmethod(F.conv2d)


def dispatch_default(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> Optional[nn.Module]:
    """The LoRA layer for `target` (a plain module or an adapter layer of another method), or None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if "fastpeft.quant.nf4" in sys.modules:  # an NF4 layer can only exist once its module is imported
        from .nf4 import dispatch_nf4

        new_module = dispatch_nf4(target, adapter_name, config, **kwargs)
        if new_module is not None:
            return new_module
    if isinstance(base, nn.Embedding):
        return Embedding(target, adapter_name, config=config, **kwargs)
    if isinstance(base, nn.Conv2d):
        return Conv2d(target, adapter_name, config=config, **kwargs)
    if isinstance(base, nn.Conv1d):
        return Conv1d(target, adapter_name, config=config, **kwargs)
    kind = linear_kind(base, config)
    if kind is not None:
        return Linear(target, adapter_name, config=config, is_target_conv_1d_layer=kind == "conv1d", **kwargs)
    return None


def _alora_tokens_for_layer(layer: LoraLayer, config: LoraConfig) -> Optional[list]:
    """The invocation tokens when `config` is an aLoRA config, after peft's checks of what aLoRA combines with:
    Linear / Conv1D layers only (peft has no aLoRA variant for the others), not with DoRA or MiCA."""
    from .alora import invocation_tokens

    tokens = invocation_tokens(config)
    if tokens is None:
        return None
    if not isinstance(layer, Linear):
        raise ValueError(
            f"aLoRA (alora_invocation_tokens) supports Linear / Conv1D layers only, not "
            f"{type(layer.get_base_layer()).__name__} (as in peft); remove this layer from target_modules "
            "(or target_parameters)"
        )
    if config.use_dora:
        raise ValueError(
            "aLoRA (alora_invocation_tokens) cannot be combined with DoRA (as in peft); set use_dora=False"
        )
    if config.init_lora_weights == "mica":
        raise ValueError(
            "aLoRA (alora_invocation_tokens) cannot be combined with init_lora_weights='mica' (as in peft); use "
            "another init"
        )
    return tokens
