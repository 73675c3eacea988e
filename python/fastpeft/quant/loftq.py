"""LoftQ: LoRA initialised to cancel the quantisation error of the base weight (arXiv:2310.08659).

Given a full-precision weight ``W`` (as an ``[out, in]`` matrix), LoftQ alternates

    Q     <- dequant(quant(W - s * B @ A))          (the first time: quant(W))
    B, A  <- rank-r SVD of (W - Q) / s, sqrt(singular values) on both sides

``loftq_iter`` times, so that ``Q + s * B @ A ~ W``; the base weight then holds ``Q`` (dequantised,
in the weight's dtype) and the adapter holds ``A``, ``B``. ``s`` is the adapter's LoRA scaling
(``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA). peft (0.21) fits ``B @ A ~ W - Q``
regardless of ``s`` (its issue #1982), which is only right when ``s == 1``; with ``lora_alpha == r``
the two coincide.

Quantisers (``loftq_bits``):

- 4: NF4 with bitsandbytes' bytes, blocksize 64, no double quantisation (peft's
  ``Params4bit(..., compress_statistics=False, quant_type="nf4")``), on the weight's device through
  fastpeft's kernels (:func:`fastpeft.quant.nf4.quantize_nf4`), CPU or CUDA.
- 8: bitsandbytes' ``Int8Params`` (LLM.int8 row-wise absmax): the weight rounded to float16, then
  ``round(w * 127 / absmax_row)``, dequantised as ``q * absmax_row / 127``; pure torch.
- 2 is rejected: peft 0.21 supports 4 and 8 bits only (its former 2-bit NFQuantizer is gone).

Entry points:

- :func:`loftq_init` is what ``LoraConfig(init_lora_weights="loftq", loftq_config=...)`` runs per
  layer (via ``LoraLayer._loftq_init``); inside ``get_peft_model`` one tqdm bar counts the layers
  (:func:`loftq_progress`).
- :func:`loftq_decompose` is the algorithm on a bare matrix.
- :func:`replace_lora_weights_loftq` re-initialises the adapters of a model whose base layers are
  already :class:`~fastpeft.quant.nf4.LinearNF4` from the original full-precision weights
  (safetensors file / directory, or a dict), as peft's function of the same name.

Requantisation (the LoftQ workflow: save the base model holding ``dequant(Q)``, load it later in 4
bits, NF4 blocksize 64):

- float32 weight, no double quantisation: NF4-quantising ``dequant(Q)`` gives back ``Q``'s bytes and
  absmax bit for bit, so the 4-bit model is exactly the one LoftQ fitted (tested).
- double quantisation on load: the same NF4 codes, but the absmax goes through bitsandbytes' 8-bit
  statistics, so the weight differs from ``Q`` by that rounding (~0.2% relative, as for any NF4 model
  with double quantisation). ``loftq_decompose(..., double_quant=True)`` fits against the
  double-quantised ``Q`` instead; requantising it with double quantisation then gives the same codes
  and comes back within ~1e-4 relative (the nested 8-bit statistics are recomputed, not bit-identical).
- float16/bfloat16 weight: the stored ``dequant(Q)`` is rounded to that dtype, so the absmax moves by
  that rounding (codes were unchanged in our tests; ~0.15% relative in bfloat16, ~0.02% in float16).

Loading a saved LoftQ adapter with ``PeftModel.from_pretrained`` re-runs LoftQ on the base model (as
peft does, since the config says ``init_lora_weights="loftq"``); on a float32 base that already holds
``dequant(Q)`` this leaves the base unchanged (the bullet above), and the adapter weights then come
from the file. On an NF4 (``LinearNF4``) base, LoftQ init warns and falls back to LoRA's default init.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..tuners.lora.config import LoftQConfig
from .nf4 import LinearNF4, dequantize_nf4, quantize_nf4

__all__ = [
    "loftq_init",
    "loftq_decompose",
    "loftq_progress",
    "replace_lora_weights_loftq",
    "quantize_roundtrip",
    "low_rank_factors",
]

NF4_BLOCKSIZE = 64
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT8_INV = 7.874015718698502e-3  # bitsandbytes' 1/127 (int8_vectorwise_dequant)


# ---- quantisers -----------------------------------------------------------------------------------


def _nf4_roundtrip(w: Tensor, blocksize: int, double_quant: bool) -> Tensor:
    packed, state = quantize_nf4(w.contiguous(), blocksize, double_quant)
    return dequantize_nf4(packed, state, torch.float32)


def _int8_rowwise_roundtrip(w: Tensor) -> Tensor:
    # bitsandbytes' Int8Params: float16 values, per-row absmax in float32, round(w * 127 / absmax)
    w16 = w.to(torch.float16).float()
    absmax = w16.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # a zero row stays zero (bnb: NaN)
    q = torch.round(w16 * (127.0 / safe).unsqueeze(1)).clamp_(-127, 127)
    return q * absmax.unsqueeze(1) * _INT8_INV


def quantize_roundtrip(w: Tensor, num_bits: int = 4, blocksize: int = NF4_BLOCKSIZE,
                       double_quant: bool = False) -> Tensor:
    """``dequant(quant(w))`` in float32 for LoftQ's ``num_bits`` (4: NF4, 8: int8 row-wise).

    ``w`` is a 2-D ``[out, in]`` float tensor on any device fastpeft has NF4 kernels for (CPU, CUDA).
    ``blocksize`` and ``double_quant`` apply to NF4 only.
    """
    if w.dim() != 2:
        raise ValueError(f"LoftQ quantises 2-D weights, got shape {tuple(w.shape)}")
    w = w.detach().float()
    if num_bits == 4:
        return _nf4_roundtrip(w, blocksize, double_quant)
    if num_bits == 8:
        return _int8_rowwise_roundtrip(w)
    raise ValueError(_bits_message(num_bits))


def _bits_message(num_bits) -> str:
    return (
        f"loftq_bits={num_bits!r} is not supported: fastpeft's LoftQ quantises with 4 bits (NF4) or 8 bits "
        "(int8 row-wise), as peft does"
    )


# ---- the algorithm --------------------------------------------------------------------------------


def low_rank_factors(residual: Tensor, r: int) -> Tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B @ A`` the best rank-``r`` approximation of ``residual`` ``[out, in]``.

    ``B = U_r sqrt(S_r)`` ``[out, r]`` and ``A = sqrt(S_r) Vh_r`` ``[r, in]`` (peft's split). When
    ``r`` exceeds ``min(out, in)`` the extra rows/columns are zero (the fit is then exact).
    """
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    k = min(r, S.shape[0])
    root = S[:k].sqrt()
    B = residual.new_zeros(residual.shape[0], r)
    A = residual.new_zeros(r, residual.shape[1])
    B[:, :k] = U[:, :k] * root
    A[:k] = root.unsqueeze(1) * Vh[:k]
    return B, A


@torch.no_grad()
def loftq_decompose(
    weight: Tensor,
    r: int,
    scaling: float = 1.0,
    num_bits: int = 4,
    num_iter: int = 1,
    blocksize: int = NF4_BLOCKSIZE,
    double_quant: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """LoftQ on one ``[out, in]`` matrix: ``(Q, A, B)`` with ``Q + scaling * B @ A ~ weight``.

    Args:
        weight: the full-precision ``[out, in]`` weight (any float dtype; computed in float32, or
            float64 for a float64 weight; quantised on its device).
        r: the LoRA rank. scaling: the adapter's scaling ``s`` (lora_alpha / r, or / sqrt(r)).
        num_bits: 4 (NF4) or 8 (int8 row-wise). num_iter: alternations (>= 1).
        blocksize, double_quant: the NF4 format of ``Q`` (peft's: 64, no double quantisation).

    Returns float32 (float64) tensors: ``Q`` = dequant(quant(...)) ``[out, in]``, ``A`` ``[r, in]``,
    ``B`` ``[out, r]``.
    """
    if weight.dim() != 2:
        raise ValueError(f"LoftQ needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"the LoRA rank r must be a positive integer, got {r!r}")
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling != 0):
        raise ValueError(f"the LoRA scaling must be a finite non-zero number, got {scaling!r}")
    if num_bits not in (4, 8):
        raise ValueError(_bits_message(num_bits))
    if not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"loftq_iter must be an integer >= 1, got {num_iter!r}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"LoftQ needs a floating-point weight (float32/float16/bfloat16/float64), got {weight.dtype}")
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(work)
    target = W
    for i in range(num_iter):
        Q = quantize_roundtrip(target, num_bits, blocksize, double_quant).to(work)
        B, A = low_rank_factors((W - Q) / scaling, r)
        if i + 1 < num_iter:
            target = W - scaling * (B @ A)
    return Q, A, B


# ---- progress -------------------------------------------------------------------------------------

_BAR = None


@contextlib.contextmanager
def loftq_progress(desc: str = "LoftQ init", disable: bool = False) -> Iterator[None]:
    """One tqdm bar counting the layers :func:`loftq_init` initialises inside the ``with`` block
    (``LoraModel`` opens it around the injection of a LoftQ adapter). Re-entrant: an inner block
    reuses the outer bar."""
    global _BAR
    if _BAR is not None:
        yield
        return
    from tqdm.auto import tqdm

    _BAR = tqdm(desc=desc, unit="layer", disable=disable)
    try:
        yield
    finally:
        bar, _BAR = _BAR, None
        bar.close()


# ---- the LoRA layer hook --------------------------------------------------------------------------


def _loftq_settings(config) -> LoftQConfig:
    """The LoftQConfig of a LoraConfig (its ``loftq_config`` dict, or a LoftQConfig instance)."""
    loftq = config.loftq_config if hasattr(config, "loftq_config") else config
    if isinstance(loftq, LoftQConfig):
        return loftq
    if not loftq:
        raise ValueError(
            "init_lora_weights='loftq' needs LoraConfig.loftq_config, e.g. "
            "loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)"
        )
    return LoftQConfig.from_dict(loftq)


def _adapter_matrix_layout(layer) -> Tuple[Callable[[Tensor], Tensor], str]:
    """How the base weight maps to the ``[out, in]`` matrix M with ``delta(M) = s * B @ A`` (and back:
    the map is a transpose or the identity, its own inverse), and the names of A / B."""
    from ..tuners.base import transpose
    from ..tuners.lora.layer import Embedding, Linear

    if isinstance(layer, Linear):
        fan = bool(getattr(layer, "fan_in_fan_out", False))
        return (lambda t: transpose(t, fan)), "linear"
    if isinstance(layer, Embedding):
        return (lambda t: t.T), "embedding"  # delta = (B @ A).T on the [num_embeddings, dim] weight
    raise ValueError(
        f"init_lora_weights='loftq' supports Linear, transformers Conv1D and Embedding layers, not "
        f"{type(layer.get_base_layer()).__name__}"
    )


@torch.no_grad()
def loftq_init(layer, adapter_name: str, config) -> None:
    """Initialise adapter ``adapter_name`` of LoRA ``layer`` with LoftQ (``LoraLayer._loftq_init``).

    Reads ``config.loftq_config`` (loftq_bits, loftq_iter) and the adapter's rank and scaling from
    the layer; writes ``A``, ``B`` (float32; the layer then casts them to the base dtype) and replaces
    the base weight with the dequantised ``Q`` in its own dtype and layout (fan_in_fan_out handled),
    so the layer's output starts at ``x (Q + s B A)^T ~ x W^T``. A base layer that is already
    quantised (:class:`LinearNF4`) holds no full-precision weight to fit: the adapter gets LoRA's
    default init with a warning (use :func:`replace_lora_weights_loftq` there).
    """
    settings = _loftq_settings(config)
    base = layer.get_base_layer()
    if isinstance(base, LinearNF4):
        warnings.warn(
            "init_lora_weights='loftq' on an NF4-quantised base layer: LoftQ needs the full-precision weight, "
            "so the adapter gets the default LoRA init; call fastpeft.replace_lora_weights_loftq(model, "
            "model_path=...) with the original weights instead"
        )
        layer.reset_lora_parameters(adapter_name, True)
        return
    to_matrix, kind = _adapter_matrix_layout(layer)
    weight = base.weight
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"init_lora_weights='loftq' needs a floating-point base weight, got {weight.dtype} "
            f"({type(base).__name__})"
        )
    if weight.device.type == "meta":
        raise ValueError("init_lora_weights='loftq' cannot run on meta-device weights (low_cpu_mem_usage)")
    Q, A, B = loftq_decompose(
        to_matrix(weight.detach()), layer.r[adapter_name], float(layer.scaling[adapter_name]),
        num_bits=settings.loftq_bits, num_iter=settings.loftq_iter,
    )
    if kind == "linear":
        a_param, b_param = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    else:
        a_param, b_param = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
    a_param.data = A.to(device=a_param.device, dtype=a_param.dtype).contiguous()
    b_param.data = B.to(device=b_param.device, dtype=b_param.dtype).contiguous()
    weight.data = to_matrix(Q.to(weight.dtype)).contiguous()
    if _BAR is not None:
        _BAR.update(1)


# ---- replace_lora_weights_loftq -------------------------------------------------------------------


class _SafetensorsWeights:
    """Full-precision weights read lazily from a safetensors file, a directory holding
    ``model.safetensors``, or a sharded checkpoint (``model.safetensors.index.json``). Never pickle."""

    def __init__(self, model_path: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        path = os.fspath(model_path)
        if os.path.isdir(path):
            single = os.path.join(path, "model.safetensors")
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.isfile(single):
                self.files = {None: single}
            elif os.path.isfile(index):
                from ..checkpoint import read_shard_index

                self.files = {k: os.path.join(path, v) for k, v in read_shard_index(index).items()}
            else:
                raise FileNotFoundError(
                    f"{path!r} holds neither model.safetensors nor model.safetensors.index.json; LoftQ reads the "
                    "original weights from safetensors only (no pickle checkpoints)"
                )
        elif os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise ValueError(f"{path!r} is not a .safetensors file; LoftQ reads safetensors only (no pickle)")
            self.files = {None: path}
        else:
            raise FileNotFoundError(f"no safetensors file or directory at {path!r}")
        self.source = path
        self._keys: Dict[str, set] = {}

    def _file_keys(self, file: str) -> set:
        if file not in self._keys:
            from ..checkpoint import read_safetensors_header

            # validated first: a truncated or corrupted file raises an error naming it (and the tensor)
            self._keys[file] = set(read_safetensors_header(file))
        return self._keys[file]

    def __contains__(self, name: str) -> bool:
        if None in self.files:
            return name in self._file_keys(self.files[None])
        return name in self.files

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import SafetensorError

        from ..checkpoint import CorruptCheckpointError

        file = self.files[None] if None in self.files else self.files[name]
        self._file_keys(file)
        try:
            with self._safe_open(file, framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        except SafetensorError as exc:
            raise CorruptCheckpointError(f"{file}: cannot read tensor {name!r}: {exc}") from exc


def _resolve_model_path(base: nn.Module) -> str:
    name = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(base, "name_or_path", None)
    if not name:
        raise ValueError(
            "replace_lora_weights_loftq needs the original weights: pass model_path (a safetensors file or "
            "directory) or original_weights (a dict name -> tensor); the model does not name its checkpoint"
        )
    if os.path.exists(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True, allow_patterns=["*.safetensors", "*.json"])
    except Exception as exc:  # not in the local cache (nothing is downloaded)
        raise ValueError(
            f"could not find the safetensors checkpoint of {name!r} locally; pass model_path= or original_weights="
        ) from exc


def _lookup(weights, key: str, base_model_prefix: Optional[str], source: str) -> Tensor:
    candidates = [key]
    if base_model_prefix:
        if key.startswith(base_model_prefix + "."):
            candidates.append(key[len(base_model_prefix) + 1:])
        else:
            candidates.append(f"{base_model_prefix}.{key}")
    for cand in candidates:
        if cand in weights:
            return weights[cand]
    tried = f" (also tried {candidates[1:]})" if len(candidates) > 1 else ""
    raise KeyError(f"replace_lora_weights_loftq: the original weight {key!r} is missing from {source}{tried}")


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: Optional[str] = None,
    adapter_name: str = "default",
    callback: Optional[Callable[[nn.Module, str], bool]] = None,
    original_weights: Optional[Mapping[str, Tensor]] = None,
) -> None:
    """LoftQ for a model that is already NF4-quantised: re-initialise its LoRA weights (peft's function).

    For every LoRA layer of ``peft_model`` whose base layer is a :class:`LinearNF4` and that holds
    ``adapter_name``, reads the original full-precision weight ``W`` of that module and sets
    ``(B, A)`` to the rank-r SVD of ``(W - dequant(Q)) / s`` (one LoftQ step against the existing
    quantised weight ``Q``, which is left untouched; ``s`` the adapter's scaling, rsLoRA included).

    Args:
        peft_model: a ``PeftModel`` (or a ``LoraModel`` / the adapted model) over a model quantised with
            :func:`fastpeft.quantize_model`.
        model_path: a ``.safetensors`` file, or a directory with ``model.safetensors`` or a sharded
            ``model.safetensors.index.json`` (safetensors only; pickle checkpoints are refused). When
            None and ``original_weights`` is None: the model's ``config._name_or_path`` (a local
            directory, or the local Hugging Face cache; nothing is downloaded).
        adapter_name: the adapter to re-initialise.
        callback: ``callback(model, module_name) -> bool`` called after each layer is replaced
            (``module_name`` without the ``base_model.model.`` prefix); False rolls that layer back.
        original_weights: instead of a file, a mapping ``"<module name>.weight" -> tensor``.

    Weight keys are ``"<module name>.weight"``, also tried without (or with) the model's
    ``base_model_prefix`` (e.g. ``model.``). Raises KeyError naming a missing key, ValueError on a
    shape mismatch or when no LoRA layer over a LinearNF4 exists.
    """
    from tqdm.auto import tqdm

    from ..tuners.base import BaseTuner, BaseTunerLayer

    base_model = peft_model
    if isinstance(getattr(base_model, "base_model", None), BaseTuner):  # a PeftModel
        base_model = base_model.base_model
    if isinstance(base_model, BaseTuner):  # a LoraModel
        base_model = base_model.model
    if original_weights is not None and model_path is not None:
        raise ValueError("pass either model_path or original_weights, not both")
    if original_weights is not None:
        if not isinstance(original_weights, Mapping):
            raise TypeError(f"original_weights must be a mapping name -> tensor, got {type(original_weights).__name__}")
        weights, source = original_weights, "original_weights"
    else:
        loader = _SafetensorsWeights(model_path if model_path is not None else _resolve_model_path(base_model))
        weights, source = loader, repr(loader.source)

    base_model_prefix = getattr(base_model, "base_model_prefix", None)
    targets = []
    for name, module in base_model.named_modules():  # names relative to the adapted model
        if not isinstance(module, BaseTunerLayer) or not isinstance(module.get_base_layer(), LinearNF4):
            continue
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and adapter_name in module.lora_A:
            targets.append((name, module))
    if not targets:
        raise ValueError(
            f"replace_lora_weights_loftq found no LoRA layer (adapter {adapter_name!r}) over an NF4-quantised "
            "LinearNF4 base; quantise with fastpeft.quantize_model before get_peft_model"
        )

    dora = [name for name, module in targets if adapter_name in getattr(module, "lora_magnitude_vector", {})]
    if dora:
        raise NotImplementedError(
            f"replace_lora_weights_loftq does not support DoRA adapters (use_dora=True), found in {dora[:3]}: "
            "their magnitude vectors would no longer match"
        )
    for name, module in tqdm(targets, desc="LoftQ replace", unit="layer"):
        base = module.get_base_layer()
        key = name + ".weight"
        original = _lookup(weights, key, base_model_prefix, source)
        expected = (base.out_features, base.in_features)
        if tuple(original.shape) != expected:
            raise ValueError(
                f"replace_lora_weights_loftq: the original weight {key!r} has shape {tuple(original.shape)} but "
                f"the quantised layer is {expected} (out_features, in_features)"
            )
        if not original.is_floating_point():
            raise TypeError(f"the original weight {key!r} must be floating point, got {original.dtype}")
        work = torch.float64 if original.dtype == torch.float64 else torch.float32
        W = original.to(device=base.weight.device, dtype=work)
        Q = base.dequantize(torch.float32).to(work)
        B, A = low_rank_factors((W - Q) / float(module.scaling[adapter_name]), module.r[adapter_name])
        a_param, b_param = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        before = (a_param.data, b_param.data)
        a_param.data = A.to(device=a_param.device, dtype=a_param.dtype).contiguous()
        b_param.data = B.to(device=b_param.device, dtype=b_param.dtype).contiguous()
        if callback is not None and not callback(peft_model, name):
            a_param.data, b_param.data = before
