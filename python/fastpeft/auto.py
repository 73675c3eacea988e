"""peft's ``AutoPeftModel*`` classes: load the base model named in an adapter's config, then the adapter.

``AutoPeftModelForCausalLM.from_pretrained("my-adapter")`` reads ``my-adapter/adapter_config.json``, loads
``base_model_name_or_path`` with the matching transformers Auto class (``revision`` from the config; keyword
arguments such as ``torch_dtype`` / ``low_cpu_mem_usage`` go to it), grows the input embeddings when the adapter
directory holds a tokenizer with more tokens than the base model has, and returns the adapter loaded into the
matching fastpeft ``PeftModel`` subclass. The ``task_type`` checks and their errors are peft's.

A local directory is read as it is; any other name is taken for a Hugging Face Hub repository and its adapter (and
tokenizer) files are fetched with ``huggingface_hub`` first. Nothing in the adapter directory is imported or run; a
config's ``auto_mapping`` (base model class, for ``AutoPeftModel``) may only name a library in ``import_allowlist``.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .checkpoint import load_adapter_config
from .config import PeftConfig
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    _peft_type_str,
)

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
    "get_default_import_allowlist",
]

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# files fetched from a Hub repository: the adapter (in `subfolder` when given), and the tokenizer that may come
# with it (at the top, where peft looks for it)
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model", "chat_template*",
)


def get_default_import_allowlist() -> list[str]:
    """Libraries an adapter config's ``auto_mapping`` may name (peft's default list)."""
    return ["diffusers", "lerobot", "megatron-core", "transformers"]


def check_import_allowlist(allowlist, parent_name: str) -> bool:
    """Whether ``parent_name`` is in ``allowlist`` or a submodule of an entry (e.g. ``transformers.models``)."""
    return parent_name in allowlist or any(parent_name.startswith(f"{allowed}.") for allowed in allowlist)


def _resolve_adapter_dir(name_or_path, revision: Optional[str], subfolder: Optional[str], kwargs: dict) -> str:
    """A local directory holding the adapter: ``name_or_path`` itself, or a Hub snapshot of it."""
    path = os.fspath(name_or_path)
    if os.path.isdir(os.path.join(path, subfolder or "")):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return path  # the loader's own "no such directory" error follows
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + f for f in _ADAPTER_FILES] + list(_TOKENIZER_PATTERNS)
    token = kwargs.get("token", kwargs.get("use_auth_token"))
    hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "proxies") if k in kwargs}
    try:
        return snapshot_download(
            repo_id=path, revision=revision, repo_type=kwargs.get("repo_type"), allow_patterns=patterns, token=token,
            **hub_kwargs,
        )
    except Exception as exc:  # not a local directory, and not on the Hub (or the Hub not reachable): peft's error
        raise ValueError(
            f"Can't find 'adapter_config.json' at '{path}' (not a local directory; from the Hugging Face Hub: "
            f"{type(exc).__name__}: {exc})"
        ) from exc


class _BaseAutoPeftModel:
    _target_class = None
    _target_peft_class = None

    def __init__(self, *args, **kwargs):
        # as transformers' (and peft's) auto classes
        raise OSError(
            f"{self.__class__.__name__} is designed to be instantiated "
            f"using the `{self.__class__.__name__}.from_pretrained(pretrained_model_name_or_path)` or "
            f"`{self.__class__.__name__}.from_config(config)` methods."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        revision: Optional[str] = None,
        import_allowlist: Optional[list[str]] = None,
        **kwargs,
    ):
        """Load the base model named by the adapter's config and the adapter on top (see the module docstring).

        The arguments are those of ``PeftModel.from_pretrained`` (``kwargs`` also reach the base model's
        ``from_pretrained``). ``import_allowlist``: the libraries a config's ``auto_mapping`` may name
        (default :func:`get_default_import_allowlist`).
        """
        adapter_dir = _resolve_adapter_dir(pretrained_model_name_or_path, revision, kwargs.get("subfolder"), kwargs)
        peft_config = load_adapter_config(adapter_dir, subfolder=kwargs.get("subfolder"))
        base_model_path = peft_config.base_model_name_or_path
        base_model_revision = peft_config.revision
        if import_allowlist is None:
            import_allowlist = get_default_import_allowlist()

        task_type = peft_config.task_type
        task_type = _peft_type_str(task_type) if task_type is not None else None
        if cls._target_class is not None:
            target_class = cls._target_class
        elif task_type is not None:  # plain AutoPeftModel
            raise ValueError(
                "Cannot use `AutoPeftModel` with a task type, please use a specific class for your task type. "
                "(e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)"
            )

        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
            if cls._target_peft_class.__name__ != expected.__name__:
                raise ValueError(
                    f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                    f"{cls._target_peft_class.__name__} make sure that you are loading the correct model for your "
                    "task type."
                )
        elif peft_config.auto_mapping is not None:
            base_model_class = peft_config.auto_mapping["base_model_class"]
            parent_library_name = peft_config.auto_mapping["parent_library"]
            if not check_import_allowlist(import_allowlist, parent_library_name):
                raise ValueError(
                    f"The auto mapping wants to import '{parent_library_name}' which is not in the import allowlist. "
                    "If you are sure that importing this library is safe, specify "
                    f"`import_allowlist=['{parent_library_name}']` in `from_pretrained()`."
                )
            target_class = getattr(importlib.import_module(parent_library_name), base_model_class)
        else:
            raise ValueError(
                "Cannot infer the auto class from the config, please make sure that you are loading the correct model "
                "for your task type."
            )

        if base_model_path is None:
            raise ValueError(
                f"the adapter config in {os.fspath(pretrained_model_name_or_path)!r} has no base_model_name_or_path; "
                "load the base model yourself and use PeftModel.from_pretrained(base_model, adapter_path)"
            )
        base_model = target_class.from_pretrained(base_model_path, revision=base_model_revision, **kwargs)

        # an adapter trained after adding tokens: its directory holds the tokenizer; grow the embeddings to fit
        if os.path.exists(os.path.join(adapter_dir, TOKENIZER_CONFIG_NAME)) and hasattr(
            base_model, "get_input_embeddings"
        ):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                adapter_dir,
                revision=revision,
                token=kwargs.get("token", kwargs.get("use_auth_token")),
                trust_remote_code=kwargs.get("trust_remote_code", False),
            )
            embedding_size = base_model.get_input_embeddings().weight.shape[0]
            if len(tokenizer) > embedding_size:  # only grow, never shrink (as peft)
                base_model.resize_token_embeddings(len(tokenizer))

        return cls._target_peft_class.from_pretrained(
            base_model,
            adapter_dir,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
            revision=revision,
            **kwargs,
        )


class AutoPeftModel(_BaseAutoPeftModel):
    _target_class = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class = AutoModelForCausalLM
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class = AutoModelForSeq2SeqLM
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class = AutoModelForSequenceClassification
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class = AutoModelForTokenClassification
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class = AutoModelForQuestionAnswering
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class = AutoModel
    _target_peft_class = PeftModelForFeatureExtraction
