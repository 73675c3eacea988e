"""Training helpers: peft's ``prepare_model_for_kbit_training``, and ``PeftTrainer`` / ``SaveAdapterCallback``
so that transformers' ``Trainer`` saves (and resumes from) fastpeft adapters in peft's layout."""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Optional

import torch
from torch import nn

__all__ = ["prepare_model_for_kbit_training", "is_quantized_model", "PeftTrainer", "SaveAdapterCallback"]

# parameter classes of quantised weights that must keep their storage dtype
_QUANT_PARAM_CLASSES = {"Params4bit", "Int8Params"}


def _fastpeft_nf4_classes() -> tuple:
    try:
        from .quant import nf4
    except Exception:  # quant not built / not importable: nothing of ours can be quantised
        return ()
    return tuple(c for c in (getattr(nf4, "LinearNF4", None),) if isinstance(c, type))


def is_quantized_model(model: nn.Module) -> bool:
    """Whether ``model`` holds k-bit weights: a transformers quantised model or fastpeft ``LinearNF4`` layers."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    if getattr(model, "quantization_method", None) in ("gptq", "aqlm", "eetq", "torchao", "hqq"):
        return True
    if getattr(model, "hqq_quantized", False):
        return True
    nf4 = _fastpeft_nf4_classes()
    for module in model.modules():
        if nf4 and isinstance(module, nf4):
            return True
        if type(module).__name__ in ("LinearNF4", "Linear4bit", "Linear8bitLt"):
            return True
    return False


def _quantised_param_ids(model: nn.Module) -> set[int]:
    """Parameters of k-bit layers other than their bias (packed weights, absmax, ...): never cast."""
    nf4 = _fastpeft_nf4_classes()
    ids: set[int] = set()
    for module in model.modules():
        if (nf4 and isinstance(module, nf4)) or type(module).__name__ in ("LinearNF4", "Linear4bit", "Linear8bitLt"):
            for name, p in module.named_parameters():
                if name != "bias" and not name.endswith(".bias"):
                    ids.add(id(p))
    return ids


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict] = None,
    auto_clear_cache: bool = True,
):
    """Prepare a (k-bit quantised) model for adapter training, as peft does.

    * freezes every parameter of the base model;
    * casts every non-quantised fp16/bf16 parameter to fp32 (layer norms, embeddings, head) for stable
      training (skipped for gptq/aqlm/eetq/hqq/torchao models, whose params must stay as they are; the
      packed weights and quantisation statistics of k-bit layers are never cast, their biases are);
      ``auto_clear_cache`` then empties the CUDA caching allocator;
    * for quantised models with ``use_gradient_checkpointing``: makes the input embeddings' outputs require
      grad (needed by reentrant checkpointing; skipped when ``use_reentrant=False`` is passed) and enables
      gradient checkpointing with ``gradient_checkpointing_kwargs`` passed through unchanged (peft passes
      ``{}``, leaving ``use_reentrant`` at the model's default).

    Returns the model (modified in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if gradient_checkpointing_kwargs is None:
        gradient_checkpointing_kwargs = {}
    elif not isinstance(gradient_checkpointing_kwargs, dict):
        raise TypeError(
            f"gradient_checkpointing_kwargs must be a dict, got {type(gradient_checkpointing_kwargs).__name__}"
        )

    method = getattr(model, "quantization_method", None)
    keeps_param_dtypes = method in ("gptq", "aqlm", "eetq", "torchao", "hqq") or getattr(model, "hqq_quantized", False)
    loaded_in_kbit = is_quantized_model(model)

    for param in model.parameters():
        param.requires_grad = False

    if not keeps_param_dtypes:
        keep = _quantised_param_ids(model)
        for param in model.parameters():
            if (
                param.dtype in (torch.float16, torch.bfloat16)
                and param.__class__.__name__ not in _QUANT_PARAM_CLASSES
                and id(param) not in keep
            ):
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()

    if loaded_in_kbit and use_gradient_checkpointing:
        # checkpointing first: transformers >= 5 registers the require-grad hook itself there (unconditionally,
        # forgetting any it registered before); ours is then not added a second time
        _enable_gradient_checkpointing(model, gradient_checkpointing_kwargs)
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            _enable_input_require_grads(model)
    return model


def _enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, so that (reentrant) gradient checkpointing over frozen
    embeddings still back-propagates: the model's ``enable_input_require_grads`` or, lacking it, a forward hook.
    Idempotent: transformers' ``gradient_checkpointing_enable`` already registers the hook, and every adapter model
    built on the same base calls this again; a second hook would only be one more call per forward, never removed
    (``enable_input_require_grads`` forgets the handles of the hooks it registered before)."""
    if hasattr(model, "enable_input_require_grads"):
        if not getattr(model, "_require_grads_hooks", None):
            model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        embeddings = model.get_input_embeddings()
        if getattr(embeddings, "_fastpeft_require_grads_hook", None) is not None:
            return

        def make_inputs_require_grad(module, input, output):
            output.requires_grad_(True)

        embeddings._fastpeft_require_grads_hook = embeddings.register_forward_hook(make_inputs_require_grad)


def _enable_gradient_checkpointing(model: nn.Module, kwargs: dict) -> None:
    # transformers >= 5.x renamed gradient_checkpointing_enable to activation_checkpointing_enable (same behaviour)
    fn = getattr(model, "activation_checkpointing_enable", None)
    if fn is not None:
        fn(activation_checkpointing_kwargs=kwargs)
        return
    fn = getattr(model, "gradient_checkpointing_enable", None)
    if fn is None:
        raise ValueError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); pass use_gradient_checkpointing=False "
            "or use a transformers model"
        )
    if "gradient_checkpointing_kwargs" in inspect.signature(fn).parameters:
        fn(gradient_checkpointing_kwargs=kwargs)
    else:
        if kwargs:
            warnings.warn("gradient_checkpointing_kwargs is not supported by this model and is ignored.")
        fn()


# ---- gradient checkpointing with one extra input ------------------------------------------------------------------
#
# Some methods hand the checkpointed layers a tensor through a side channel instead of as an argument (X-LoRA's
# scalings, read from the X-LoRA model; prefix tuning's key/value prefixes, inside a cache among the keyword
# arguments). Under transformers' gradient checkpointing that tensor is lost twice: reentrant checkpointing links
# its output into the autograd graph through its inputs only (a tensor reached another way is back-propagated in
# each recomputation's own backward pass, which frees its graph for the next layer that shares it), and the
# recomputation in backward runs after the forward, when the side channel may hold something else. So the tensor
# goes in as the checkpoint's last input, and the recomputation is handed that input.


class _ExtraInputCheckpoint:
    """A checkpointing function (``checkpoint(function, *args, **kwargs)``, transformers'
    ``_gradient_checkpointing_func``) wrapping ``checkpoint`` so that ``function`` runs, in the forward and in the
    recomputation, with the value ``capture(function)`` captured when it was called (see
    :func:`add_extra_checkpoint_input`)."""

    def __init__(self, checkpoint, capture) -> None:
        self.checkpoint = checkpoint
        self.capture = capture

    def __call__(self, function, *args, **kwargs):
        captured = self.capture(function)
        if captured is None:
            return self.checkpoint(function, *args, **kwargs)
        value, run_with = captured
        if not isinstance(value, torch.Tensor):  # nothing to differentiate: only the recomputation needs it
            return self.checkpoint(lambda *a, **k: run_with(value, *a, **k), *args, **kwargs)

        def run(*inputs, **kw):
            *inputs, value_input = inputs  # under reentrant checkpointing, the copy whose gradient flows back
            return run_with(value_input, *inputs, **kw)

        return self.checkpoint(run, *args, value, **kwargs)


def _wraps_with(checkpoint, capture) -> bool:
    while isinstance(checkpoint, _ExtraInputCheckpoint):
        if checkpoint.capture == capture:  # ==: a bound method is a new object at every access
            return True
        checkpoint = checkpoint.checkpoint
    return False


def add_extra_checkpoint_input(model: nn.Module, capture) -> None:
    """Wrap every checkpointing function of ``model`` (transformers' ``_gradient_checkpointing_func``, which every
    ``gradient_checkpointing_enable`` sets afresh) so that each checkpointed call takes one extra input.

    ``capture(function)``, called when a checkpointed ``function`` starts, returns None (checkpoint it unchanged) or
    ``(value, run_with)``: ``run_with(value, *args, **kwargs)`` runs ``function(*args, **kwargs)`` with ``value`` put
    back in its side channel. A tensor ``value`` is passed as the checkpoint's last input, so that its gradient
    flows back under reentrant checkpointing too; any other value is only kept for the recomputation. Idempotent
    per ``capture`` (a function, or a method of one object): a checkpointing function already wrapped with it is
    left as it is, so that this may be called before every forward.
    """
    for module in model.modules():
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is None or _wraps_with(checkpoint, capture):
            continue
        module._gradient_checkpointing_func = _ExtraInputCheckpoint(checkpoint, capture)


def _is_fastpeft_model(model) -> bool:
    from .peft_model import PeftModel

    return isinstance(model, PeftModel)


def _load_fastpeft_adapters(model, checkpoint_dir: str) -> bool:
    """Load every adapter of ``model`` found in ``checkpoint_dir`` (peft's layout); False if none is there."""
    from .checkpoint import SAFETENSORS_WEIGHTS_NAME

    active = list(model.active_adapters)
    found = False
    for name in list(model.peft_config):
        path = checkpoint_dir if name == "default" else os.path.join(checkpoint_dir, name)
        if os.path.isfile(os.path.join(path, SAFETENSORS_WEIGHTS_NAME)):
            model.load_adapter(path, name, is_trainable=name in active)
            found = True
    if found and active:
        model.set_adapter(active[0])
    return found


def _make_callback_class():
    from transformers import TrainerCallback

    class SaveAdapterCallback(TrainerCallback):
        """Write the adapter (peft's layout) into every checkpoint directory ``Trainer`` saves.

        transformers' ``Trainer`` only recognises peft's own ``PeftModel`` when saving; with a fastpeft model it
        saves the full state dict (which fails for models with tied embeddings, e.g. GPT-2). Prefer
        :class:`PeftTrainer`; with a plain ``Trainer`` add this callback
        (``Trainer(..., callbacks=[SaveAdapterCallback()])``) to also get ``adapter_config.json`` +
        ``adapter_model.safetensors`` in ``checkpoint-<step>/``, loadable with ``PeftModel.from_pretrained``.
        """

        def on_save(self, args, state, control, model=None, **kwargs):
            if model is None or not _is_fastpeft_model(model):
                return control
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            model.save_pretrained(ckpt, is_main_process=state.is_world_process_zero)
            return control

    return SaveAdapterCallback


def _make_trainer_class():
    import transformers
    from transformers.trainer import TRAINING_ARGS_NAME

    class PeftTrainer(transformers.Trainer):
        """``transformers.Trainer`` that treats a fastpeft ``PeftModel`` as it treats peft's.

        Checkpoints (``checkpoint-<step>/``) and ``save_model()`` hold the adapters in peft's layout
        (``adapter_config.json`` + ``adapter_model.safetensors``, non-default adapters in sub-folders) instead
        of the full model, and ``resume_from_checkpoint`` / ``load_best_model_at_end`` load them back.
        Any other model is handled exactly as by ``transformers.Trainer``.
        """

        def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if not _is_fastpeft_model(model):
                return super()._save(output_dir, state_dict=state_dict)
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            target = model if model is not None else self.model
            target = self.accelerator.unwrap_model(target, keep_torch_compile=False)
            if not _is_fastpeft_model(target):
                return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            if not _load_fastpeft_adapters(target, resume_from_checkpoint):
                raise ValueError(f"Can't find a valid adapter checkpoint at {resume_from_checkpoint}")

        def _load_best_model(self) -> None:
            target = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if not _is_fastpeft_model(target):
                return super()._load_best_model()
            best = self.state.best_model_checkpoint
            if best is None or not _load_fastpeft_adapters(target, best):
                warnings.warn(f"Could not load the best adapter from {best}; keeping the current weights.")

    return PeftTrainer


_LAZY_CLASSES = {"SaveAdapterCallback": _make_callback_class, "PeftTrainer": _make_trainer_class}


def __getattr__(name: str):
    if name in _LAZY_CLASSES:
        cls = _LAZY_CLASSES[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'fastpeft.training' has no attribute {name!r}")
