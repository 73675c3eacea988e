"""The build contract: what fastpeft.build_info() reports, the torch-version guard, and that a
CUDA-capable build environment really compiled the CUDA kernels."""
import os
import shutil

import pytest
import torch

import fastpeft
from fastpeft import _loader

OPS = [
    "seeded_dropout", "lora_forward", "lora_backward", "dora_weight_norm", "dora_forward", "dora_backward",
    "nf4_quantize", "nf4_dequantize", "blockwise8_quantize", "blockwise8_dequantize",
    "nf4_linear", "nf4_linear_grad_input", "qlora_forward", "qlora_backward",
    "kron_forward", "kron_backward", "ia3_forward", "ia3_backward", "hadamard_delta", "hadamard_delta_backward",
    "hadamard_linear_forward", "hadamard_linear_backward",
    "cayley", "cayley_backward",
    "block_diag_rotate", "block_diag_rotate_backward", "butterfly_rotate", "butterfly_rotate_backward",
    "multi_lora_mix", "multi_lora_mix_backward",
    "segmented_lora",
]


def test_build_info_reports_build_and_runtime():
    info = fastpeft.build_info()
    assert info["fastpeft_torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    assert info["cuda_available"] == torch.cuda.is_available()
    if info["cuda_compiled"]:
        assert info["cuda_archs"], "a CUDA build must name its architectures"
    else:
        assert info["cuda_archs"] == []


@pytest.mark.skipif(
    os.environ.get("FASTPEFT_CUDA") == "0" or not torch.version.cuda or shutil.which("nvcc") is None,
    reason="CUDA kernels are only expected when torch is a CUDA build and nvcc is on PATH",
)
def test_cuda_kernels_compiled_when_toolchain_present():
    assert fastpeft.build_info()["cuda_compiled"], "torch is a CUDA build and nvcc exists, yet no CUDA kernels"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastpeft::{op}", "CUDA"), op


def test_every_op_has_a_cpu_kernel():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastpeft::{op}", "CPU"), op


def test_torch_version_mismatch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_loader._build_config, "TORCH_VERSION", "1.0.0+cpu")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0\+cpu .* rebuild"):
        _loader._load()


def test_local_version_tag_is_not_a_mismatch(monkeypatch):
    base = torch.__version__.split("+")[0]
    monkeypatch.setattr(_loader._build_config, "TORCH_VERSION", base + "+somethingelse")
    module, _ = _loader._load()
    assert module is _loader._C
