"""LoKr layers on nn.Linear, nn.Conv1d, nn.Conv2d; parameter names, shapes and factorisation are peft's.

With the base weight [out, in(, kernel)], out = out_l * out_k and in = in_m * in_n (`factorization`):
W1 [out_l, in_m] = `lokr_w1` or `lokr_w1_a` [out_l, r] @ `lokr_w1_b` [r, in_m];
W2 = `lokr_w2` [out_k, in_n(, kernel)], or `lokr_w2_a` [out_k, r] @ `lokr_w2_b` [r, in_n * prod(kernel)],
or (use_effective_conv2d, kernel > 1) the Tucker form `lokr_t2` [r, r, k1, k2] (Conv1d [r, r, k, 1]) with
`lokr_w2_a` [r, out_k], `lokr_w2_b` [r, in_n]. ΔW = scaling * W1 ⊗ W2. Linear layers run
`kron_linear` on x (ΔW never formed); conv layers materialise ΔW with torch.kron exactly as peft does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lycoris import LycorisLayer, kron_linear


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n) with m * n == dimension, as LyCORIS / peft do.

    A positive `factor` dividing `dimension` gives (factor, dimension // factor) as is (not sorted). Otherwise
    m is the largest divisor not above `factor` (-1: no bound) among the divisors up to the smallest one
    whose square reaches `dimension`; the pair is returned sorted (m <= n).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m = 1
    for d in range(2, dimension + 1):
        if dimension % d:
            continue
        if d > bound:
            break
        m = d
        if d * d >= dimension:
            break
    n = dimension // m
    return (m, n) if m <= n else (n, m)


def _cp_weight(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """[out_k, in_n, k1, k2] from the Tucker core t [r, r, k1, k2] and w_a [r, out_k], w_b [r, in_n]."""
    return torch.einsum("ijkl,ip,jr->prkl", t, w_a, w_b)


class LoKrLayer(LycorisLayer):
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    _repr_prefix = "lokr"

    def update_layer(self, adapter_name, r, alpha, config, **kwargs) -> None:
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale
        super().update_layer(adapter_name, r, alpha, config, **kwargs)

    def _create_adapter(self, adapter_name, r, config) -> None:
        weight_shape = self.get_base_layer().weight.shape
        out_dim, in_dim, kernel = weight_shape[0], weight_shape[1], self._kernel_size()
        in_m, in_n = factorization(in_dim, config.decompose_factor)
        out_l, out_k = factorization(out_dim, config.decompose_factor)
        use_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        use_w2 = r >= max(out_k, in_n) / 2
        if use_w1:
            self._new_param("lokr_w1", adapter_name, out_l, in_m)
        else:
            self._new_param("lokr_w1_a", adapter_name, out_l, r)
            self._new_param("lokr_w1_b", adapter_name, r, in_m)
        if use_w2:
            self._new_param("lokr_w2", adapter_name, out_k, in_n, *kernel)
        elif self._use_effective_conv(config):
            core = kernel if len(kernel) == 2 else (kernel[0], 1)
            self._new_param("lokr_t2", adapter_name, r, r, *core)
            self._new_param("lokr_w2_a", adapter_name, r, out_k)
            self._new_param("lokr_w2_b", adapter_name, r, in_n)
        else:
            self._new_param("lokr_w2_a", adapter_name, out_k, r)
            self._new_param("lokr_w2_b", adapter_name, r, in_n * math.prod(kernel))
        self._init_adapter(adapter_name, config.init_weights)

    def _init_adapter(self, adapter_name: str, init_weights) -> None:
        """peft's inits, in peft's order (same seed, same weights). He-uniform everywhere except: True (default):
        W1 (or w1_a) zero; "lycoris": W2 (or w2_b) zero; False: nothing zero."""
        zero_w1 = init_weights is True
        zero_w2 = init_weights == "lycoris"
        if adapter_name in self.lokr_w1:
            (nn.init.zeros_ if zero_w1 else self._kaiming)(self.lokr_w1[adapter_name])
        else:
            (nn.init.zeros_ if zero_w1 else self._kaiming)(self.lokr_w1_a[adapter_name])
            self._kaiming(self.lokr_w1_b[adapter_name])
        if adapter_name in self.lokr_w2:
            (nn.init.zeros_ if zero_w2 else self._kaiming)(self.lokr_w2[adapter_name])
        else:
            self._kaiming(self.lokr_w2_a[adapter_name])
            (nn.init.zeros_ if zero_w2 else self._kaiming)(self.lokr_w2_b[adapter_name])
        if adapter_name in self.lokr_t2:
            self._kaiming(self.lokr_t2[adapter_name])

    def _w1(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            return self.lokr_w1[adapter_name]
        return self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]

    def _w2(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w2:
            return self.lokr_w2[adapter_name]
        if adapter_name in self.lokr_t2:
            return _cp_weight(self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name])
        return self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1, w2 = self._w1(adapter_name), self._w2(adapter_name)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # torch.kron as peft: for a Conv1d with a full 3-d lokr_w2, w1 is broadcast from the front, which
        # makes ΔW = W2 ⊗ W1 in that one case; kept so that peft's checkpoints give peft's outputs
        # (contiguous w1 too: torch.kron fails on some rank-1 outer products, where peft raises)
        delta = torch.kron(w1.contiguous(), w2.contiguous()) * self.scaling[adapter_name]
        return delta.reshape(self.get_base_layer().weight.shape)

    def _linear_delta(self, adapter_name, x):
        kwargs = {}
        for i in ("1", "2"):
            full = getattr(self, f"lokr_w{i}")
            if adapter_name in full:
                kwargs[f"w{i}"] = full[adapter_name]
            else:
                kwargs[f"w{i}_a"] = getattr(self, f"lokr_w{i}_a")[adapter_name]
                kwargs[f"w{i}_b"] = getattr(self, f"lokr_w{i}_b")[adapter_name]
        return kron_linear(x, scale=self.scaling[adapter_name], **kwargs)

    def _rank_dropout_rescales(self, adapter_name: str) -> bool:
        return bool(self.rank_dropout_scale[adapter_name])


class Linear(LoKrLayer):
    """LoKr on nn.Linear."""

    _base_types = (nn.Linear,)


class Conv1d(LoKrLayer):
    """LoKr on nn.Conv1d."""

    _base_types = (nn.Conv1d,)
    _conv_fn = staticmethod(F.conv1d)


class Conv2d(LoKrLayer):
    """LoKr on nn.Conv2d."""

    _base_types = (nn.Conv2d,)
    _conv_fn = staticmethod(F.conv2d)
