"""Load a transformers checkpoint saved in bitsandbytes 4-bit (NF4) form into fastpeft ``LinearNF4`` layers.

Such a directory is what ``model.save_pretrained(path)`` writes after ``AutoModel*.from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...))``:
``config.json`` with a ``quantization_config`` (``quant_method: "bitsandbytes"``) and safetensors files
holding, per quantised linear layer, ``<name>.weight`` (packed uint8) with ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax`` / ``weight.nested_quant_map`` (double quantisation) and
``weight.quant_state.bitsandbytes__nf4``. These are exactly :class:`~fastpeft.quant.nf4.LinearNF4`'s state
dict keys, so :func:`load_nf4_model` rebuilds the model from its config, puts a ``LinearNF4`` wherever the
checkpoint holds an NF4 quant state and loads every tensor as stored (safetensors only, never pickle),
without bitsandbytes.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

__all__ = ["load_nf4_model"]

_NF4_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"
_FP4_SUFFIX = ".weight.quant_state.bitsandbytes__fp4"
_SAFE_SINGLE = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"


def _read_config(path: str) -> Dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json: pass the directory written by save_pretrained")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError / UnicodeDecodeError
        raise ValueError(f"{cfg_path} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_quantization_config(qc: Optional[Dict[str, Any]], path: str) -> Dict[str, Any]:
    """Accept bitsandbytes 4-bit NF4 only; the error says what the checkpoint is instead."""
    if not qc:
        raise ValueError(
            f"{path}/config.json has no quantization_config: this is not a bitsandbytes 4-bit checkpoint. Load it "
            "with transformers and quantise it with fastpeft.quantize_model(model) instead"
        )
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(
            f"{path}: quantization_config.quant_method is {method!r}; fastpeft.load_nf4_model reads bitsandbytes "
            "4-bit NF4 checkpoints only"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(
            f"{path}: this is a bitsandbytes 8-bit (LLM.int8) checkpoint; fastpeft reads 4-bit NF4 only "
            "(save the model with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'))"
        )
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError(f"{path}: quantization_config does not say load_in_4bit; fastpeft reads 4-bit NF4 only")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' / transformers' default is fp4
    if quant_type != "nf4":
        raise ValueError(
            f"{path}: bnb_4bit_quant_type is {quant_type!r}; fastpeft reads NF4 only (re-quantise the model "
            "with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'))"
        )
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage not in (None, "uint8"):
        raise ValueError(f"{path}: bnb_4bit_quant_storage is {storage!r}; fastpeft reads uint8 storage only")
    return qc


def _safetensors_files(path: str) -> list[str]:
    single = os.path.join(path, _SAFE_SINGLE)
    index = os.path.join(path, _SAFE_INDEX)
    if os.path.isfile(index):
        from ..checkpoint import read_shard_index

        files = sorted(set(read_shard_index(index).values()))
        return [os.path.join(path, f) for f in files]
    if os.path.isfile(single):
        return [single]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
        raise ValueError(
            f"{path} holds pickle weights only; fastpeft loads safetensors (save with safe_serialization=True)"
        )
    raise FileNotFoundError(f"{path} holds no {_SAFE_SINGLE} or {_SAFE_INDEX}")


def _parse_dtype(value, what: str) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what}: unknown dtype {value!r}")
    return dtype


def _empty_init():
    """Build the model without running weight initialisers (its tensors are all overwritten)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def load_nf4_model(
    path: Union[str, os.PathLike],
    model_class: Any = None,
    compute_dtype: Union[str, torch.dtype, None] = "auto",
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a transformers model saved in bitsandbytes 4-bit NF4 form, with fastpeft ``LinearNF4`` layers.

    Args:
        path: the directory ``save_pretrained`` wrote (``config.json`` with a bitsandbytes 4-bit
            ``quantization_config`` + ``model.safetensors`` or a sharded ``model.safetensors.index.json``).
        model_class: the transformers class to build, e.g. ``transformers.AutoModelForCausalLM`` (the
            default) or a concrete class such as ``LlamaForCausalLM``; anything with ``from_config``.
        compute_dtype: the ``LinearNF4`` matmul dtype: ``"auto"`` (the checkpoint's
            ``bnb_4bit_compute_dtype``), a torch dtype, or None (the input's dtype).
        dtype: cast the non-quantised floating-point tensors (embeddings, norms, head) to this dtype
            (default: keep the stored dtypes). The NF4 tensors are never cast.
        device: where the model's tensors go.
        trust_remote_code: passed to ``AutoConfig`` / ``from_config`` for custom architectures.

    A linear layer is quantised exactly when the checkpoint holds an NF4 quant state for it
    (``<name>.weight.quant_state.bitsandbytes__nf4``); others (``lm_head``, ``llm_int8_skip_modules``)
    load as stored. Raises ValueError for fp4 / 8-bit / non-bitsandbytes checkpoints and for any key that
    does not fit the model (naming the key), FileNotFoundError for a directory without config/safetensors.
    Returns the model in eval mode, with ``is_loaded_in_4bit = True`` and ``quantization_method =
    "bitsandbytes"`` as transformers sets them, ready for ``prepare_model_for_kbit_training`` and
    ``get_peft_model``.
    """
    import transformers

    from ..checkpoint import load_safetensors_file
    from .nf4 import LinearNF4, _skipped

    path = os.fspath(path)
    raw = _read_config(path)
    qc = _check_quantization_config(raw.get("quantization_config"), path)
    if compute_dtype == "auto":
        compute_dtype = _parse_dtype(qc.get("bnb_4bit_compute_dtype", "float32"), "bnb_4bit_compute_dtype")
    else:
        compute_dtype = _parse_dtype(compute_dtype, "compute_dtype")
    skip = tuple(qc.get("llm_int8_skip_modules") or ())

    state: Dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        state.update(load_safetensors_file(file, device=str(device)))  # validated; errors name the file
    fp4 = [k for k in state if k.endswith(_FP4_SUFFIX)]
    if fp4:
        raise ValueError(f"{path}: {fp4[0]!r} is an FP4 quant state; fastpeft reads NF4 only")
    quantized = sorted(k[: -len(_NF4_SUFFIX)] for k in state if k.endswith(_NF4_SUFFIX))
    if not quantized:
        raise ValueError(f"{path}: no '*{_NF4_SUFFIX}' tensors found; the checkpoint holds no NF4 layers")
    for name in quantized:
        if skip and _skipped(name, skip):
            raise ValueError(
                f"{path}: '{name}{_NF4_SUFFIX}' quantises a module listed in llm_int8_skip_modules {list(skip)}; "
                "the checkpoint and its config disagree"
            )

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # build plain modules; fastpeft does the quantised ones
    model_class = model_class or transformers.AutoModelForCausalLM
    # the tensors are all replaced (load_state_dict(assign=True) keeps the stored dtypes), so the build
    # dtype does not matter; nothing is initialised and the empty float32 storage is never touched
    with _empty_init():
        if hasattr(model_class, "from_config"):
            kwargs = {"trust_remote_code": True} if trust_remote_code else {}
            model = model_class.from_config(config, **kwargs)
        else:
            model = model_class(config)

    modules = dict(model.named_modules())
    state = _match_prefix(state, quantized[0], modules, getattr(model, "base_model_prefix", "") or "")
    quantized = sorted(k[: -len(_NF4_SUFFIX)] for k in state if k.endswith(_NF4_SUFFIX))
    for name in quantized:
        target = modules.get(name)
        if target is None:
            raise ValueError(
                f"{path}: '{name}{_NF4_SUFFIX}' names no module of {type(model).__name__}; is model_class right?"
            )
        if not isinstance(target, nn.Linear):
            raise ValueError(
                f"{path}: '{name}.weight' is NF4-quantised but {name} is a {type(target).__name__}, not an nn.Linear"
            )
        double_quant = f"{name}.weight.nested_absmax" in state
        layer = LinearNF4(target.in_features, target.out_features, bias=target.bias is not None,
                          double_quant=double_quant, compute_dtype=compute_dtype, device="meta")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)

    if dtype is not None:  # the NF4 tensors (weight, absmax, codebooks, ...) keep their dtypes
        nf4_prefixes = tuple(f"{q}.weight" for q in quantized)
        state = {k: v.to(dtype) if v.is_floating_point() and not k.startswith(nf4_prefixes) else v
                 for k, v in state.items()}
    expected = set(model.state_dict().keys())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(
            f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all) for {type(model).__name__}; "
            "is model_class right?"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: the checkpoint does not fit {type(model).__name__}: {exc}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [k for k in sorted(expected - set(state)) if not _tied_to_loaded(model, k, state)]
    if missing:
        raise ValueError(
            f"{path}: the checkpoint lacks {missing[0]!r} ({len(missing)} in all) needed by {type(model).__name__}"
        )
    model.to(device)
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"
    return model.eval()


def _match_prefix(state: Dict[str, torch.Tensor], probe: str, modules: Dict[str, nn.Module],
                  prefix: str) -> Dict[str, torch.Tensor]:
    """Checkpoint keys as the model names them: a head model's checkpoint (``model.layers...``) loaded into
    the bare model drops ``model.`` (and the head's keys, as transformers does); a bare model's checkpoint
    loaded into a head model gains it. ``probe`` is one quantised module's key prefix."""
    if probe in modules or not prefix:
        return state
    if probe.startswith(prefix + ".") and probe[len(prefix) + 1:] in modules:
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if f"{prefix}.{probe}" in modules:
        return {f"{prefix}.{k}": v for k, v in state.items()}
    return state


def _tied_to_loaded(model: nn.Module, key: str, state: Dict[str, torch.Tensor]) -> bool:
    """Whether the parameter ``key`` (absent from the checkpoint) now shares storage with a loaded tensor."""
    try:
        t = model.get_parameter(key)
    except AttributeError:
        return False
    if t.is_meta:
        return False
    ptr = t.data_ptr()
    return any(v.data_ptr() == ptr for v in state.values())
