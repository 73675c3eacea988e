"""Bottleneck adapter layers: a module wrapped with small MLP branches, one per adapter.

An adapter `a(x) = s * up(drop(act(down(LN?(x)))))` is added to the wrapped module's output `h` (the first element
when the module returns a tuple):

- `SequentialAdapterLayer` (Houlsby): the branch reads `h` itself: `y = h + a(h)`.
- `ParallelAdapterLayer` (He et al.): the branch reads the module's input `x`: `y = h + a(x)`. A module whose
  `forward` takes `(hidden_states, input_tensor)` (BERT's `BertSelfOutput` / `BertOutput`: dense, dropout, then
  LayerNorm(... + input_tensor)) is treated as the tail of a post-LN sublayer whose input is `input_tensor`: the
  branch reads `input_tensor` and its output is added to the sublayer's output before the residual LayerNorm,
  which is the same as calling the module with `input_tensor + a(input_tensor)`.

Several active adapters each add their branch (all read the same input). Full-size tensors stay in the
activation dtype (no float32 copies of bf16 activations); the small adapter weights are cast to it for the
matmuls, so float32 adapters on a bf16 base keep float32 master weights and gradients. The residual add and the
up-projection are one `torch.addmm`.

Not mergeable: `merge` raises (the non-linearity sits between the projections).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..base import BaseTunerLayer, _conv1d_class

__all__ = ["BottleneckLayer", "SequentialAdapterLayer", "ParallelAdapterLayer", "NOT_MERGEABLE", "module_features",
           "sublayer_features", "bottleneck_width"]

NOT_MERGEABLE = (
    "Bottleneck adapters cannot be merged into the base weights: an adapter computes "
    "h + s * up(act(down(x))) with a non-linearity between its two projections, which no weight matrix can "
    "express. Use unload() to get the base model back without the adapters, or keep the model wrapped "
    "(the adapters add only two small matmuls per wrapped module)."
)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "relu": F.relu, "gelu": F.gelu, "gelu_new": _gelu_tanh, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "leaky_relu": F.leaky_relu,
}


def _linear_features(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in, out) features of a Linear-like module (nn.Linear, transformers' Conv1D, a layer with integer
    in_features / out_features), else None."""
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return tuple(module.weight.shape)  # [in, out]
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int):
        return fin, fout
    return None


def module_features(module: nn.Module) -> tuple[int, int]:
    """(width of the input, width of the output) of `module`: its own in / out features if Linear-like, else the
    input features of its first Linear-like submodule and the output features of its last one."""
    own = _linear_features(module)
    if own is not None:
        return own
    found = [f for f in (_linear_features(m) for m in module.modules()) if f is not None]
    if not found:
        raise ValueError(
            f"cannot tell the width of {type(module).__name__}: it is not a Linear / Conv1D and holds none; wrap "
            "a module that does (name it in attention_modules / feedforward_modules)"
        )
    return found[0][0], found[-1][1]


def bottleneck_width(config, width: int) -> int:
    """The bottleneck width `config` gives a module of output width `width` (`r`, else width // reduction_factor)."""
    if config.r is not None:
        return config.r
    r = int(width // config.reduction_factor)
    if r < 1:
        raise ValueError(
            f"BottleneckConfig.reduction_factor={config.reduction_factor} leaves no bottleneck for a module of width "
            f"{width}; lower reduction_factor or set r"
        )
    return r


def sublayer_features(module: nn.Module, hidden_size: Optional[int] = None) -> tuple[int, int]:
    """(input, output) width of a whole sublayer (attention, MLP) that a parallel adapter spans: `hidden_size` (the
    model's residual width) for both when given and the module has a Linear-like part producing it, else
    `module_features`. (Submodule order alone can mislead: Phi-3's attention registers o_proj before qkv_proj.)"""
    if hidden_size and _linear_features(module) is None and any(
        f is not None and f[1] == hidden_size for f in (_linear_features(m) for m in module.modules())
    ):
        return hidden_size, hidden_size
    return module_features(module)


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """A module with bottleneck adapters. Per adapter: `bottleneck_down` (d_in -> r), `bottleneck_up` (r -> d_out),
    optionally `bottleneck_ln` (LayerNorm(d_in)) and `bottleneck_scale` (the learned scalar), plus the plain
    settings `bottleneck_r`, `bottleneck_scaling`, `bottleneck_non_linearity`, `bottleneck_dropout`,
    `bottleneck_location`. `adapter_in_features` / `adapter_out_features` are the branch's widths; attributes of
    the wrapped module (a Linear's `in_features`, an attention's `layer_idx`, ...) stay reachable on the layer."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up", "bottleneck_ln", "bottleneck_scale")
    other_param_names = ("bottleneck_r", "bottleneck_scaling", "bottleneck_non_linearity", "bottleneck_dropout",
                         "bottleneck_location")
    placement = ""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, location: str = "attention",
                 **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_ln = nn.ModuleDict({})
        self.bottleneck_scale = nn.ParameterDict({})
        self.bottleneck_dropout = nn.ModuleDict({})
        self.bottleneck_r: dict[str, int] = {}
        self.bottleneck_scaling: dict[str, Any] = {}
        self.bottleneck_non_linearity: dict[str, str] = {}
        self.bottleneck_location: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.kwargs = kwargs
        self.adapter_in_features, self.adapter_out_features = self._branch_features()
        self.update_layer(adapter_name, config, location=location)

    def __getattr__(self, name: str):
        """Attributes the wrapped module has (e.g. an attention's `layer_idx`) stay reachable."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "base_layer" or "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    def _branch_features(self) -> tuple[int, int]:
        """(input width, output width) of the adapter branch."""
        raise NotImplementedError

    # ---- adapters ----

    def update_layer(self, adapter_name: str, config, location: str = "attention", **kwargs) -> None:
        """Add (or replace) adapter `adapter_name` as `config` describes."""
        d_in, d_out = self.adapter_in_features, self.adapter_out_features
        r = bottleneck_width(config, d_out)
        self.bottleneck_r[adapter_name] = r
        self.bottleneck_down[adapter_name] = nn.Linear(d_in, r)
        self.bottleneck_up[adapter_name] = nn.Linear(r, d_out)
        if config.use_layer_norm:
            self.bottleneck_ln[adapter_name] = nn.LayerNorm(d_in)
        elif adapter_name in self.bottleneck_ln:
            del self.bottleneck_ln[adapter_name]
        if config.scaling == "learned":
            self.bottleneck_scale[adapter_name] = nn.Parameter(torch.ones(1))
        elif adapter_name in self.bottleneck_scale:
            del self.bottleneck_scale[adapter_name]
        self.bottleneck_scaling[adapter_name] = config.scaling if config.scaling == "learned" else float(config.scaling)
        self.bottleneck_non_linearity[adapter_name] = config.non_linearity
        self.bottleneck_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.bottleneck_location[adapter_name] = location
        self.reset_bottleneck_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_bottleneck_parameters(self, adapter_name: str, init_weights) -> None:
        """Near-identity (True / "near-identity"): down as nn.Linear's default (kaiming-uniform, a=sqrt(5)) with a
        zero bias, up all zeros: the branch is zero and the module's output unchanged. False: nn.Linear's defaults
        for both (the adapter changes the output from the start)."""
        down, up = self.bottleneck_down[adapter_name], self.bottleneck_up[adapter_name]
        with torch.no_grad():
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            if init_weights:
                down.bias.zero_()
                up.weight.zero_()
                up.bias.zero_()
            else:
                bound = 1.0 / math.sqrt(down.in_features)
                down.bias.uniform_(-bound, bound)
                up.reset_parameters()

    def _base_device_dtype(self):
        device, dtype = super()._base_device_dtype()
        if device is None:  # a whole sublayer (attention, MLP): its first floating parameter
            for p in self.get_base_layer().parameters():
                if p.is_floating_point():
                    return p.device, p.dtype
        return device, dtype

    def _active_names(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.bottleneck_down]

    def _add_branches(self, h: torch.Tensor, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """h + sum over `names` of s * up(drop(act(down(LN?(x))))), in h's dtype; h [..., d_out], x [..., d_in]."""
        if h.shape[-1] != self.adapter_out_features or x.shape[-1] != self.adapter_in_features:
            raise ValueError(
                f"bottleneck adapter on {type(self.get_base_layer()).__name__}: expected features last, input "
                f"[..., {self.adapter_in_features}] and output [..., {self.adapter_out_features}], got input "
                f"{tuple(x.shape)} and output {tuple(h.shape)}; wrap a module that keeps features in the last dimension"
            )
        dtype = h.dtype
        out = h.reshape(-1, self.adapter_out_features)
        x2 = x.reshape(-1, self.adapter_in_features).to(dtype)
        fresh = False  # whether `out` is our own tensor (then later adapters accumulate into it in place)
        for name in names:
            xi = x2
            if name in self.bottleneck_ln:
                ln = self.bottleneck_ln[name]
                xi = F.layer_norm(xi, ln.normalized_shape, ln.weight.to(dtype), ln.bias.to(dtype), ln.eps)
            down, up = self.bottleneck_down[name], self.bottleneck_up[name]
            z = F.linear(xi, down.weight.to(dtype), down.bias.to(dtype))
            z = self.bottleneck_dropout[name](ACTIVATIONS[self.bottleneck_non_linearity[name]](z))
            weight, bias = up.weight.to(dtype).t(), up.bias.to(dtype)
            if name in self.bottleneck_scale:  # learned: fold s into the (small) bottleneck activations
                s = self.bottleneck_scale[name].to(dtype)
                z, bias, alpha = z * s, bias * s, 1.0
            else:
                alpha = self.bottleneck_scaling[name]
            # residual + up-projection in one addmm; the first one allocates the output, later adapters add into it
            out = out.addmm_(z, weight, alpha=alpha) if fresh else torch.addmm(out, z, weight, alpha=alpha)
            out = out.add_(bias, alpha=alpha)
            fresh = True
        return out.view(h.shape)

    # ---- not mergeable ----

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        raise ValueError(NOT_MERGEABLE)

    def _unmerge_adapter(self, adapter_name: str) -> None:  # nothing is ever merged
        pass

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


def _first(output):
    """(the tensor the adapter adds to, a function putting a new one back)."""
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda t: (t,) + tuple(output[1:])
    if isinstance(output, list) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda t: [t] + list(output[1:])
    raise TypeError(
        f"a bottleneck adapter adds to a module's output tensor (or the first element of a tuple), got "
        f"{type(output).__name__}"
    )


class SequentialAdapterLayer(BottleneckLayer):
    """Houlsby: `y = h + s * up(act(down(LN?(h))))` with `h` the wrapped module's output (typically a sublayer's
    output projection: nn.Linear or transformers' Conv1D)."""

    placement = "sequential"

    def _branch_features(self):
        width = module_features(self.get_base_layer())[1]
        return width, width

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        output = self.base_layer(x, *args, **kwargs)
        if self._runs_base_only():
            return output
        names = self._active_names()
        if not names:
            return output
        h, put_back = _first(output)
        return put_back(self._add_branches(h, h, names))


class ParallelAdapterLayer(BottleneckLayer):
    """He et al.: `y = f(x) + s * up(act(down(LN?(x))))` with `f` the wrapped sublayer and `x` its input (the first
    positional argument or `hidden_states=`). A BERT-style output block (`forward(hidden_states, input_tensor)`)
    reads `input_tensor` and adds the branch before its residual LayerNorm (see the module docstring)."""

    placement = "parallel"

    _residual_input = False
    _residual_pos: Optional[int] = None

    @property
    def residual_input(self) -> bool:
        """Whether the branch reads the module's `input_tensor` (BERT-style post-LN output block)."""
        return self._residual_input

    def _branch_features(self):
        base = self.get_base_layer()
        try:
            params = list(inspect.signature(base.forward).parameters)
        except (TypeError, ValueError):
            params = []
        if "input_tensor" in params:
            self._residual_input, self._residual_pos = True, params.index("input_tensor")
        d_in, d_out = sublayer_features(base, self.kwargs.get("hidden_size"))
        return (d_out, d_out) if self._residual_input else (d_in, d_out)

    def forward(self, *args: Any, **kwargs: Any):
        if self._runs_base_only():
            return self.base_layer(*args, **kwargs)
        names = self._active_names()
        if not names:
            return self.base_layer(*args, **kwargs)
        if self._residual_input:
            args = list(args)
            if len(args) > self._residual_pos:
                args[self._residual_pos] = self._add_branches(args[self._residual_pos], args[self._residual_pos], names)
            elif "input_tensor" in kwargs:
                kwargs["input_tensor"] = self._add_branches(kwargs["input_tensor"], kwargs["input_tensor"], names)
            else:
                raise TypeError(f"{type(self.get_base_layer()).__name__} was called without its input_tensor")
            return self.base_layer(*args, **kwargs)
        if args:
            x = args[0]
        elif "hidden_states" in kwargs:
            x = kwargs["hidden_states"]
        else:
            raise TypeError(
                f"a parallel adapter reads the sublayer's input: {type(self.get_base_layer()).__name__} was called "
                f"without positional arguments or hidden_states= (got keywords {sorted(kwargs)})"
            )
        h, put_back = _first(self.base_layer(*args, **kwargs))
        return put_back(self._add_branches(h, x, names))
