"""segmented_lora (mixed-adapter batches): CPU (and CUDA) kernels against the pure-PyTorch reference."""
from __future__ import annotations

import pytest
import torch

from _op_testing import DTYPES, close

import fastpeft.ops as ops
import fastpeft.reference as ref

fp = torch.ops.fastpeft


def _adapters(ranks, in_f, out_f, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, in_f, generator=g, dtype=torch.float64).to(dtype).to(device) for r in ranks]
    B = [torch.randn(out_f, r, generator=g, dtype=torch.float64).to(dtype).to(device) for r in ranks]
    return A, B


def _case(T, in_f, out_f, ranks, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(T, in_f, generator=g, dtype=torch.float64).to(dtype).to(device)
    A, B = _adapters(ranks, in_f, out_f, dtype, device, seed)
    idx = torch.randint(-1, len(ranks), (T,), generator=g).to(device)
    scal = [0.5 + k for k in range(len(ranks))]
    return x, A, B, scal, idx


def _ref64(x, A, B, scal, idx):
    return ref.segmented_lora(x.double(), [a.double() for a in A], [b.double() for b in B], scal, idx)


@pytest.mark.parametrize("b_t", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,in_f,out_f,ranks", [
    (0, 8, 5, [2]), (1, 8, 5, [2]), (33, 19, 23, [4, 16, 0, 7]), (64, 64, 48, [16] * 9), (17, 5, 3, [1, 3])])
def test_segmented_lora_vs_reference(dtype, T, in_f, out_f, ranks, b_t):
    x, A, B, scal, idx = _case(T, in_f, out_f, ranks, dtype)
    if b_t:  # lora_B as a transposed view of a contiguous [r, out] (the layers' cached layout)
        B = [b.t().contiguous().t() for b in B]
    y = ops.segmented_lora(x, A, B, scal, idx)
    assert y.dtype == dtype and y.shape == (T, out_f)
    close(y, _ref64(x, A, B, scal, idx), dtype, "delta")
    if T:
        assert torch.all(y[idx == -1] == 0)


def test_segmented_lora_rows_equal_single_adapter_lora():
    x, A, B, scal, idx = _case(40, 32, 24, [4, 8, 16], torch.float32)
    y = ops.segmented_lora(x, A, B, scal, idx)
    for k in range(3):
        rows = idx == k
        torch.testing.assert_close(y[rows], scal[k] * (x[rows] @ A[k].T) @ B[k].T, atol=1e-4, rtol=1e-4)


def test_segmented_lora_leading_dims_and_noncontiguous():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 40, generator=g)[:, :, ::2]  # [3, 5, 20], strided
    A, B = _adapters([4, 6], 20, 11, torch.float32)
    A = [torch.randn(20, 4, generator=g).T, A[1]]  # a transposed (non-contiguous) lora_A
    idx = torch.tensor([0, -1, 1]).view(3, 1).expand(3, 5)
    y = ops.segmented_lora(x, A, B, [1.0, 2.0], idx)
    assert y.shape == (3, 5, 11)
    torch.testing.assert_close(y.reshape(15, 11), ref.segmented_lora(x.reshape(15, 20), A, B, [1.0, 2.0],
                                                                     idx.reshape(15)), atol=1e-5, rtol=1e-5)


def test_segmented_lora_cost_is_per_used_adapter_only():
    # 1000 adapters, two rows: adapters no row uses are never read (poisoned with NaN to prove it).
    A = [torch.full((4, 8), float("nan")) for _ in range(1000)]
    B = [torch.full((6, 4), float("nan")) for _ in range(1000)]
    A[7], B[7] = torch.randn(4, 8), torch.randn(6, 4)
    x = torch.randn(2, 8)
    y = ops.segmented_lora(x, A, B, [1.0] * 1000, torch.tensor([7, -1]))
    assert torch.isfinite(y).all() and torch.all(y[1] == 0)


def test_segmented_lora_gradients_vs_reference():
    x, A, B, scal, idx = _case(21, 9, 7, [3, 5, 0], torch.float32)
    leaves = [t.detach().double().requires_grad_(True) for t in [x, *A, *B]]
    x64, A64, B64 = leaves[0], leaves[1:4], leaves[4:7]
    y = ops.segmented_lora(x64, A64, B64, scal, idx)
    g = torch.randn_like(y)
    y.backward(g)
    refl = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref.segmented_lora(refl[0], refl[1:4], refl[4:7], scal, idx).backward(g)
    for a, b in zip(leaves, refl):
        torch.testing.assert_close(a.grad if a.grad is not None else torch.zeros_like(a),
                                   b.grad if b.grad is not None else torch.zeros_like(b), atol=1e-10, rtol=1e-10)


def test_segmented_lora_gradcheck():
    x, A, B, scal, idx = _case(6, 5, 4, [2, 3], torch.float64)
    args = (x.requires_grad_(True), A[0].requires_grad_(True), A[1].requires_grad_(True),
            B[0].requires_grad_(True), B[1].requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x, a0, a1, b0, b1: ops.segmented_lora(x, [a0, a1], [b0, b1], scal, idx),
                                    args)


def test_segmented_lora_opcheck():
    x, A, B, scal, idx = _case(9, 6, 5, [2, 4, 0], torch.float32)
    torch.library.opcheck(fp.segmented_lora.default, (x, A, B, scal, idx))
    torch.library.opcheck(fp.segmented_lora.default,
                          (x.requires_grad_(True), [a.requires_grad_(True) for a in A], B, scal, idx))


def test_segmented_lora_bad_inputs():
    x, A, B, scal, idx = _case(4, 6, 5, [2, 3], torch.float32)
    with pytest.raises(ValueError, match="one entry per adapter"):
        ops.segmented_lora(x, A, B[:1], scal, idx)
    with pytest.raises(ValueError, match="at least one adapter"):
        ops.segmented_lora(x, [], [], [], idx)
    with pytest.raises(ValueError, match="in_features"):
        ops.segmented_lora(x, [A[0][:, :3], A[1]], B, scal, idx)
    with pytest.raises(ValueError, match="lora_B\\[1\\]"):
        ops.segmented_lora(x, A, [B[0], B[1][:, :2]], scal, idx)
    with pytest.raises(TypeError, match="dtype"):
        ops.segmented_lora(x, [A[0].double(), A[1]], B, scal, idx)
    with pytest.raises(TypeError, match="int64"):
        ops.segmented_lora(x, A, B, scal, idx.int())
    with pytest.raises(ValueError, match="leading dims"):
        ops.segmented_lora(x, A, B, scal, idx[:3])
    with pytest.raises(ValueError, match=r"-1 \(no adapter\) or in \[0, 2\)"):
        ops.segmented_lora(x, A, B, scal, torch.tensor([0, 1, 2, -1]))
    # the kernel's own checks (called without the wrapper)
    with pytest.raises(RuntimeError, match="adapter_index\\[2\\]' is 5"):
        fp.segmented_lora(x, A, B, scal, torch.tensor([0, 1, 5, -1]))
    with pytest.raises(RuntimeError, match="lora_B\\[0\\]"):
        fp.segmented_lora(x, A, [B[0].T.contiguous(), B[1]], scal, idx)


def test_segmented_lora_threads():
    x, A, B, scal, idx = _case(50, 30, 20, [4, 16, 8], torch.float32)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = ops.segmented_lora(x, A, B, scal, idx)
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(ops.segmented_lora(x, A, B, scal, idx), y1, atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_segmented_lora_vs_reference(dtype):
    x, A, B, scal, idx = _case(70, 33, 29, [4, 16, 0, 64], dtype, "cuda")
    y = ops.segmented_lora(x, A, B, scal, idx)
    close(y.cpu(), _ref64(x.cpu(), [a.cpu() for a in A], [b.cpu() for b in B], scal, idx.cpu()), dtype, "cuda")


@pytest.mark.cuda
def test_cuda_segmented_lora_gradcheck_opcheck():
    x, A, B, scal, idx = _case(6, 5, 4, [2, 3], torch.float64, "cuda")
    args = (x.requires_grad_(True), A[0].requires_grad_(True), A[1].requires_grad_(True),
            B[0].requires_grad_(True), B[1].requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x, a0, a1, b0, b1: ops.segmented_lora(x, [a0, a1], [b0, b1], scal, idx),
                                    args)
    torch.library.opcheck(fp.segmented_lora.default, (x.detach().float(), [a.detach().float() for a in A],
                                                      [b.detach().float() for b in B], scal, idx))


@pytest.mark.cuda
def test_cuda_segmented_lora_out_of_range_index_is_an_error():
    """On CUDA an out-of-range adapter index trips a device-side assert (no host sync) rather than giving that row
    the base output; a device assert poisons the CUDA context, so it runs in a child process."""
    import subprocess
    import sys

    code = (
        "import torch, fastpeft.ops as ops\n"
        "x = torch.randn(4, 8, device='cuda'); A = [torch.randn(2, 8, device='cuda')]; "
        "B = [torch.randn(6, 2, device='cuda')]\n"
        "y = ops.segmented_lora(x, A, B, [1.0], torch.tensor([0, 1, -1, 0], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "an out-of-range adapter index ran silently on CUDA"


def test_segmented_lora_torch_compile_fullgraph():
    x, A, B, scal, idx = _case(12, 8, 6, [2, 4], torch.float32)
    x.requires_grad_(True)

    def f(x, a0, a1, b0, b1, idx):
        return ops.segmented_lora(x, [a0, a1], [b0, b1], scal, idx)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y_c, y_e = compiled(x, *A, *B, idx), f(x, *A, *B, idx)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(torch.autograd.grad(y_c.sum(), x)[0], torch.autograd.grad(y_e.sum(), x)[0])
