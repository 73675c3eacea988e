"""LoHa layers on nn.Linear, nn.Conv1d, nn.Conv2d; parameter names and shapes are peft's.

Linear: `hada_w{1,2}_a` [out, r], `hada_w{1,2}_b` [r, in]; forward through `hadamard_linear`.
Conv (kernel flattened): `hada_w{1,2}_a` [out, r], `hada_w{1,2}_b` [r, in/groups * prod(kernel)].
Conv with use_effective_conv2d (kernel > 1): `hada_t{1,2}` [r, r, k1, k2] (Conv1d: [r, r, k, 1]),
`hada_w{1,2}_a` [r, out], `hada_w{1,2}_b` [r, in/groups]; W_i = t_i x_0 w_ia^T x_1 w_ib^T.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lycoris import LycorisLayer, hadamard_delta, hadamard_linear


def _cp_weight(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """[out, in, k1, k2] from the Tucker core t [r, r, k1, k2] and the mode factors w_a [r, out], w_b [r, in]."""
    return torch.einsum("ijkl,jr,ip->prkl", t, w_b, w_a)


class LoHaLayer(LycorisLayer):
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    _repr_prefix = "loha"

    def _create_adapter(self, adapter_name, r, config) -> None:
        weight_shape = self.get_base_layer().weight.shape
        out_dim, in_dim, kernel = weight_shape[0], weight_shape[1], self._kernel_size()
        if self._use_effective_conv(config):
            core = kernel if len(kernel) == 2 else (kernel[0], 1)
            for i in ("1", "2"):
                self._new_param(f"hada_t{i}", adapter_name, r, r, *core)
                self._new_param(f"hada_w{i}_a", adapter_name, r, out_dim)
                self._new_param(f"hada_w{i}_b", adapter_name, r, in_dim)
        else:
            flat_in = in_dim * math.prod(kernel)
            for i in ("1", "2"):
                self._new_param(f"hada_w{i}_a", adapter_name, out_dim, r)
                self._new_param(f"hada_w{i}_b", adapter_name, r, flat_in)
        # peft's init, in peft's order (same seed, same weights): He-uniform everywhere; w2_b zero unless
        # init_weights=False (the product then starts at zero)
        self._kaiming(self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name], self.hada_w2_a[adapter_name])
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b[adapter_name])
        else:
            self._kaiming(self.hada_w2_b[adapter_name])
        if adapter_name in self.hada_t1:
            self._kaiming(self.hada_t1[adapter_name], self.hada_t2[adapter_name])

    def _factors(self, adapter_name):
        return (self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name],
                self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1_a, w1_b, w2_a, w2_b = self._factors(adapter_name)
        scale = self.scaling[adapter_name]
        if adapter_name in self.hada_t1:
            delta = _cp_weight(self.hada_t1[adapter_name], w1_a, w1_b) * _cp_weight(self.hada_t2[adapter_name], w2_a, w2_b)
            delta = delta * scale
        else:
            delta = hadamard_delta(w1_a, w1_b, w2_a, w2_b, scale)
        return delta.reshape(self.get_base_layer().weight.shape)

    def _linear_delta(self, adapter_name, x):
        return hadamard_linear(x, *self._factors(adapter_name), scale=self.scaling[adapter_name])

    def _rank_dropout_rescales(self, adapter_name: str) -> bool:
        return True


class Linear(LoHaLayer):
    """LoHa on nn.Linear."""

    _base_types = (nn.Linear,)


class Conv1d(LoHaLayer):
    """LoHa on nn.Conv1d."""

    _base_types = (nn.Conv1d,)
    _conv_fn = staticmethod(F.conv1d)


class Conv2d(LoHaLayer):
    """LoHa on nn.Conv2d."""

    _base_types = (nn.Conv2d,)
    _conv_fn = staticmethod(F.conv2d)
