"""NF4 weights in bitsandbytes' format: quantise/dequantise, the quant state, and ``LinearNF4``.

The bytes are bitsandbytes 0.50.2's (``quantize_4bit(w, quant_type="nf4", compress_statistics=...)``
on the CPU), and ``LinearNF4.state_dict()`` has ``bitsandbytes.nn.Linear4bit``'s keys, dtypes,
shapes and bytes, so a QLoRA base model moves between the two::

    weight                                  uint8 [(out*in + 1) // 2, 1]   two NF4 codes per byte
    weight.absmax                           float32 [blocks], or uint8 with double quantisation
    weight.quant_map                        float32 [16]                   the NF4 codebook
    weight.nested_absmax                    float32 [ceil(blocks / 256)]   (double quant only)
    weight.nested_quant_map                 float32 [256]                  (double quant only)
    weight.quant_state.bitsandbytes__nf4    uint8: the JSON of the non-tensor fields
    bias                                    as the original layer's

Double quantisation (bitsandbytes' ``compress_statistics``): ``offset = absmax.mean()`` and
``absmax - offset`` quantised with the 8-bit blockwise quantiser (block 256, bitsandbytes' signed
dynamic map). The kernels are :func:`fastpeft.ops.nf4_quantize` and friends.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .. import reference as _ref

__all__ = ["NF4QuantState", "quantize_nf4", "dequantize_nf4", "LinearNF4", "quantize_model"]

NESTED_BLOCKSIZE = 256
_QS_KEY = "quant_state.bitsandbytes__nf4"
# LinearNF4 keeps the quant state's tensors as non-persistent buffers named "nf4_<field>"
_QS_TENSORS = ("absmax", "code", "offset", "nested_absmax", "nested_code")
_QS_BUFFERS = tuple("nf4_" + name for name in _QS_TENSORS)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_DYNAMIC_MAP: Optional[Tensor] = None


def _dynamic_map(device) -> Tensor:
    global _DYNAMIC_MAP
    if _DYNAMIC_MAP is None:
        _DYNAMIC_MAP = _ref.dynamic_map()
    return _DYNAMIC_MAP.to(device, copy=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).strip("torch.")  # bitsandbytes' spelling, kept character for character


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the NF4 quant state")
    return dtype


@dataclass
class NF4QuantState:
    """What dequantises an NF4 weight (bitsandbytes' ``QuantState`` fields, NF4 only).

    ``absmax`` is float32 ``[blocks]``, or uint8 codes when ``nested`` (double quantisation), with
    ``offset`` (float32 scalar), ``nested_absmax``, ``nested_code`` describing the 8-bit step.
    """

    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: Tensor
    offset: Optional[Tensor] = None
    nested_absmax: Optional[Tensor] = None
    nested_code: Optional[Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    nested_dtype: torch.dtype = torch.float32
    quant_type: str = "nf4"

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def float_absmax(self) -> Tensor:
        """The float32 per-block absmax (de-nested: 8-bit dequantised, plus the offset)."""
        if not self.nested:
            return self.absmax
        a = ops.blockwise8_dequantize(
            self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize, torch.float32
        )
        return a + self.offset

    def kernel_args(self) -> Dict[str, Optional[Tensor]]:
        """The quant-state keyword arguments of :func:`fastpeft.ops.nf4_linear` / ``qlora_linear``:
        ``absmax``, ``nested_absmax``, ``nested_code``, ``offset`` (the last three None without
        double quantisation)."""
        return {
            "absmax": self.absmax,
            "nested_absmax": self.nested_absmax,
            "nested_code": self.nested_code,
            "offset": self.offset,
        }

    def to(self, device) -> "NF4QuantState":
        """Move every tensor to ``device`` (in place); returns self."""
        for name in ("absmax", "code", "offset", "nested_absmax", "nested_code"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def as_dict(self, packed: bool = False) -> Dict[str, Any]:
        """bitsandbytes' ``QuantState.as_dict``: with ``packed=True``, tensors only (the non-tensor
        fields JSON-encoded as uint8 under ``quant_state.bitsandbytes__nf4``), as state dicts hold it."""
        d: Dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested:
            d.update(
                {
                    "nested_absmax": self.nested_absmax,
                    "nested_blocksize": self.nested_blocksize,
                    "nested_quant_map": self.nested_code.clone(),
                    "nested_dtype": _dtype_name(self.nested_dtype),
                    # a meta-device state (structure only) has no value to write
                    "nested_offset": self.offset.item() if self.offset.device.type != "meta" else 0.0,
                }
            )
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, Tensor)}
        rest = {k: v for k, v in d.items() if not isinstance(v, Tensor)}
        tensors[_QS_KEY] = torch.tensor(list(json.dumps(rest).encode("utf-8")), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, d: Dict[str, Any], device=None) -> "NF4QuantState":
        """Inverse of :meth:`as_dict` (packed or not); keys may carry prefixes (``weight.absmax``)."""
        d = dict(d)
        packed_keys = [k for k, v in d.items() if k.endswith("quant_state.bitsandbytes__nf4") and isinstance(v, Tensor)]
        if packed_keys:
            if len(packed_keys) != 1:
                raise ValueError(f"expected one 'quant_state.bitsandbytes__nf4' entry, got {packed_keys}")
            blob = d.pop(packed_keys[0])
            d.update(json.loads(bytes(blob.cpu().tolist()).decode("utf-8")))
        elif any(k.endswith("bitsandbytes__fp4") for k in d):
            raise ValueError("an FP4 quant state was given; fastpeft reads NF4 only")
        d = {k.split(".")[-1]: v for k, v in d.items()}
        if d.get("quant_type") != "nf4":
            raise ValueError(f"expected an NF4 quant state (quant_type 'nf4'), got quant_type {d.get('quant_type')!r}")
        for key in ("absmax", "quant_map", "blocksize", "dtype", "shape"):
            if key not in d:
                raise ValueError(f"the NF4 quant state lacks {key!r}")
        nested = "nested_absmax" in d
        dev = device if device is not None else d["absmax"].device
        return cls(
            absmax=d["absmax"].to(dev),
            shape=torch.Size(d["shape"]),
            dtype=_parse_dtype(d["dtype"]),
            blocksize=int(d["blocksize"]),
            code=d["quant_map"].to(dev),
            offset=torch.tensor(float(d["nested_offset"]), device=dev) if nested else None,
            nested_absmax=d["nested_absmax"].to(dev) if nested else None,
            nested_code=d["nested_quant_map"].to(dev) if nested else None,
            nested_blocksize=int(d.get("nested_blocksize", NESTED_BLOCKSIZE)),
            nested_dtype=_parse_dtype(d.get("nested_dtype", "float32")),
        )


# the quant state's other fields (shape, dtype, blocksizes, ...): LinearNF4 keeps them beside its buffers
_QS_LAYOUT = tuple(f.name for f in fields(NF4QuantState) if f.name not in _QS_TENSORS)


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> Tuple[Tensor, NF4QuantState]:
    """Quantise ``w`` to NF4: ``(packed, state)`` with bitsandbytes' bytes.

    Equals ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    compress_statistics=double_quant, quant_type="nf4")`` (packed weight, absmax, nested absmax,
    offset, codebooks). ``w``: float32/bfloat16/float16; ``blocksize``: power of two in [32, 4096].
    """
    packed, absmax = ops.nf4_quantize(w, blocksize)
    code = _ref.nf4_code(w.device)
    state = NF4QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, code=code)
    if double_quant:
        offset = absmax.mean()
        overflow = ("double quantisation overflowed: the mean of the per-block absmax values is not finite in "
                    "float32 (weights near the float32 limit); quantise with double_quant=False")
        if torch.compiler.is_compiling():  # (re-quantising inside a compiled graph, e.g. an unmerge): no host sync
            torch._assert_async(torch.isfinite(offset), overflow)
        elif offset.device.type != "meta" and not bool(torch.isfinite(offset)):
            raise ValueError(overflow)
        nested_code = _dynamic_map(w.device)
        q, nested_absmax = ops.blockwise8_quantize(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state.absmax, state.offset = q, offset
        state.nested_absmax, state.nested_code = nested_absmax, nested_code
    return packed, state


def dequantize_nf4(packed: Tensor, state: NF4QuantState, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The weight back from NF4: ``code[q] * absmax`` in float32, rounded once to ``dtype``
    (default: the quantised weight's dtype), shaped ``state.shape``."""
    return ops.nf4_dequantize(packed, state.float_absmax(), state.blocksize, state.shape, dtype or state.dtype)


class LinearNF4(nn.Module):
    """A frozen NF4 linear layer: bitsandbytes ``Linear4bit`` (``quant_type="nf4"``) state dicts.

    Build one from an existing layer with :meth:`from_linear`; ``LinearNF4(in, out)`` makes a layer
    with zero weights to ``load_state_dict`` into (e.g. a bitsandbytes ``Linear4bit`` state dict).
    Forward casts the input to the compute dtype and runs :func:`fastpeft.ops.nf4_linear` (the
    fused NF4 matmul: the weight is never dequantised whole, in forward or backward); the output has
    the input's dtype. ``compute_dtype=None`` computes in the input's dtype (bitsandbytes'
    default). Gradients flow to the input and the bias, never to the quantised weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        device=None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        _ref.check_blocksize(blocksize)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.blocksize = blocksize
        self.double_quant = bool(double_quant)
        self.compute_dtype = compute_dtype
        dtype = dtype or torch.float32
        w = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=device)
        packed, self.quant_state = quantize_nf4(w, blocksize, self.double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "LinearNF4":
        """Quantise ``linear`` (an ``nn.Linear``) to NF4; the bias is kept as it is (a copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"'linear' must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        _ref.check_blocksize(blocksize)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.blocksize, layer.double_quant, layer.compute_dtype = blocksize, bool(double_quant), compute_dtype
        packed, layer.quant_state = quantize_nf4(w, blocksize, layer.double_quant)
        layer.weight = nn.Parameter(packed, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            layer.register_parameter("bias", None)
        return layer

    # ---- the quant state: its tensors are buffers --------------------------------------------------
    # The NF4 statistics (absmax, codebooks, double-quant offset and absmax) are non-persistent buffers
    # ``nf4_absmax``, ``nf4_code``, ``nf4_offset``, ``nf4_nested_absmax``, ``nf4_nested_code``: what moves
    # or synchronises a module's buffers sees them (DDP broadcasts rank 0's at start-up, FSDP2's
    # ``fully_shard`` moves them to its mesh's device, accelerate places them), while the state dict keeps
    # bitsandbytes' keys (``weight.absmax``, ...; written by ``_save_to_state_dict``). The buffers are the
    # only storage of those tensors: ``quant_state`` is a new NF4QuantState over them at every read (no
    # copy), so nothing that replaces or overwrites a buffer can leave a stale state behind. Its other
    # fields (shape, dtype, blocksizes, ...) change only when the weight is quantised again, which sets
    # ``quant_state`` as a whole.

    @property
    def quant_state(self) -> NF4QuantState:
        """The :class:`NF4QuantState` that dequantises ``weight`` (its tensors: this layer's buffers).

        Built at each read: assigning to its fields changes nothing in the layer; assign ``quant_state``."""
        layout = self.__dict__.get("_nf4_layout")
        if layout is None:
            raise AttributeError("this LinearNF4 has no quant state yet")
        tensors = {field: self._buffers.get(buffer) for field, buffer in zip(_QS_TENSORS, _QS_BUFFERS)}
        return NF4QuantState(**layout, **tensors)

    @quant_state.setter
    def quant_state(self, state: NF4QuantState) -> None:
        self.__dict__["_nf4_layout"] = {name: getattr(state, name) for name in _QS_LAYOUT}
        for field_name, buffer_name in zip(_QS_TENSORS, _QS_BUFFERS):
            self.register_buffer(buffer_name, getattr(state, field_name), persistent=False)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dequantised ``[out, in]`` weight (default dtype: the original weight's)."""
        return dequantize_nf4(self.weight, self.quant_state, dtype)

    def forward(self, x: Tensor) -> Tensor:
        cdt = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(cdt)
        if cdt not in KERNEL_DTYPES:  # e.g. float64: the NF4 kernels compute in fp32/bf16/fp16 only
            return F.linear(x.to(cdt), self.dequantize().to(cdt), bias).to(x.dtype)
        state = self.quant_state
        y = ops.nf4_linear(x.to(cdt), self.weight, blocksize=state.blocksize, out_features=self.out_features,
                           bias=bias, **state.kernel_args())
        return y.to(x.dtype)

    # ---- state dict: bitsandbytes Linear4bit's keys ---------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        qs_prefix = prefix + "weight."
        qs = {k[len(qs_prefix):]: v for k, v in state_dict.items() if k.startswith(qs_prefix)}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(qs_prefix)}
        if qs:
            try:
                # a meta-device layer (load_state_dict(..., assign=True)) takes the incoming device
                device = None if self.weight.is_meta else self.weight.device
                state = NF4QuantState.from_dict(qs, device=device)
            except (ValueError, KeyError) as exc:
                error_msgs.append(f"while loading the NF4 quant state of '{prefix}weight': {exc}")
                return
            expected = torch.Size((self.out_features, self.in_features))
            if state.shape != expected:
                error_msgs.append(
                    f"'{prefix}weight' quantises a weight of shape {tuple(state.shape)} but this layer is "
                    f"{tuple(expected)} (out_features, in_features)"
                )
                return
            self.quant_state = state
            self.blocksize, self.double_quant = state.blocksize, state.nested
        elif prefix + "weight" in state_dict:
            missing_keys.append(qs_prefix + _QS_KEY)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # Parameters move/cast as usual (the uint8 weight is never cast to a float dtype); the
        # quant-state buffers only follow the device (their dtypes are part of the format), so they are
        # kept out of `fn`'s reach (`.half()` would round the float32 absmax).
        saved = {name: self._buffers.pop(name) for name in _QS_BUFFERS if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, device=self.weight.device, dtype=torch.uint8))
            target = probe.device if isinstance(probe, Tensor) else self.weight.device
            for name, t in saved.items():
                self._buffers[name] = None if t is None else t.to(target)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


def _skipped(name: str, skip_modules: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(name == s or name.endswith("." + s) or s in parts for s in skip_modules)


def quantize_model(
    model: nn.Module,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = torch.bfloat16,
    skip_modules: Iterable[str] = ("lm_head",),
    progress: bool = True,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` with a :class:`LinearNF4` (in place; returns ``model``).

    A layer is left as it is when one of ``skip_modules`` is its qualified name, a suffix of it
    (``"lm_head"``, ``"mlp.down_proj"``) or one of its path components. Each layer is quantised
    on its own device (bitsandbytes' bytes), its bias kept; ``compute_dtype`` is the matmul dtype
    of the new layers (None: the input's). A tqdm bar counts layers unless ``progress=False``.
    """
    from tqdm.auto import tqdm

    _ref.check_blocksize(blocksize)
    skip = tuple(skip_modules or ())
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and not _skipped(name, skip)
    ]
    for name, module in tqdm(targets, desc="NF4 quantize", unit="layer", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LinearNF4.from_linear(module, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
        layer.train(module.training)
        setattr(parent, child, layer)
    return model
