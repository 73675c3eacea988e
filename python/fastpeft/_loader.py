"""Loads the compiled ops (fastpeft._C) after checking it was built against this torch."""
from __future__ import annotations

import importlib

import torch

_REBUILD_HINT = (
    "rebuild fastpeft against the installed torch: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` in the fastpeft source tree "
    "(or `make test`, which does it for you)"
)


def _base_version(version: str) -> str:
    # "2.14.1+cu130" and "2.14.1" share an ABI; the local tag only names the CUDA flavour.
    return version.split("+", 1)[0]


def _load():
    try:
        from . import _build_config
    except ImportError as exc:  # a source checkout that was never built
        raise ImportError(
            "fastpeft's compiled extension is missing (no fastpeft/_build_config.py); "
            "install fastpeft with `pip install --no-build-isolation .` or run `make test`"
        ) from exc
    built, running = _build_config.TORCH_VERSION, torch.__version__
    if _base_version(built) != _base_version(running):
        raise ImportError(
            f"fastpeft was built against torch {built} but torch {running} is installed; {_REBUILD_HINT}"
        )
    try:
        module = importlib.import_module("fastpeft._C")
    except ImportError as exc:
        raise ImportError(f"fastpeft._C failed to load ({exc}); {_REBUILD_HINT}") from exc
    return module, _build_config


_C, _build_config = _load()


def build_info() -> dict:
    """What this fastpeft binary was built with, and what it can run here.

    Returns a dict with the torch version the extension was compiled against, the running torch,
    whether CUDA kernels were compiled and for which architectures, and whether a CUDA device is
    visible now.
    """
    archs = [a for a in _C.cuda_archs.split() if a]
    return {
        "fastpeft_torch_version": _C.torch_version,
        "torch_version": torch.__version__,
        "torch_cuda_version": _build_config.TORCH_CUDA_VERSION or None,
        "cuda_compiled": bool(_C.cuda_compiled),
        "cuda_archs": archs,
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
