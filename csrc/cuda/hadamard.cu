// CUDA kernels of the hadamard family (LoHa). The drivers (argument checks, strategy choice, cuBLAS
// GEMMs through ATen on torch's current stream) are shared with the CPU in common/hadamard_impl.h;
// this file supplies the elementwise kernels with the CPU's semantics:
//   - delta: dW[o, i] = s (A1 B1)[o, i] (A2 B2)[o, i], one thread per element, both rank-r dot
//     products in op-math registers (A rows are warp-uniform loads, B columns coalesced),
//   - delta_grads: H1 = s G * P2, H2 = s G * P1, P1 and P2 recomputed the same way,
//   - face_split: out[i, p r2 + q] = s A[i, p] B[i, q].
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_launch.cuh"
#include "common/hadamard_impl.h"

namespace fastpeft {
namespace {

using cuda::kThreads;
using cuda::OpMath;
using cuda::row_grid;

template <class M>
__device__ __forceinline__ void products(const M* __restrict__ a1, const M* __restrict__ b1, int r1,
                                         const M* __restrict__ a2, const M* __restrict__ b2, int r2,
                                         int64_t o, int64_t c, int64_t cols, M& p1, M& p2) {
  p1 = M(0);
  p2 = M(0);
  for (int p = 0; p < r1; ++p) p1 += a1[o * r1 + p] * b1[p * cols + c];
  for (int q = 0; q < r2; ++q) p2 += a2[o * r2 + q] * b2[q * cols + c];
}

template <class T, class M>
__global__ void delta_kernel(const M* __restrict__ a1, const M* __restrict__ b1, int r1, const M* __restrict__ a2,
                             const M* __restrict__ b2, int r2, int64_t rows, int64_t cols, M s, T* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int64_t o = blockIdx.y; o < rows; o += gridDim.y) {
    M p1, p2;
    products(a1, b1, r1, a2, b2, r2, o, c, cols, p1, p2);
    out[o * cols + c] = static_cast<T>(s * p1 * p2);
  }
}

template <class T, class M>
__global__ void delta_grads_kernel(const T* __restrict__ g, const M* __restrict__ a1, const M* __restrict__ b1,
                                   int r1, const M* __restrict__ a2, const M* __restrict__ b2, int r2, int64_t rows,
                                   int64_t cols, M s, M* __restrict__ h1, M* __restrict__ h2) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int64_t o = blockIdx.y; o < rows; o += gridDim.y) {
    M p1, p2;
    products(a1, b1, r1, a2, b2, r2, o, c, cols, p1, p2);
    const int64_t e = o * cols + c;
    const M gs = s * static_cast<M>(g[e]);
    h1[e] = gs * p2;
    h2[e] = gs * p1;
  }
}

// Row i of out ([rows, r1 r2]) is handled by the threads of grid row blockIdx.y, column k = p r2 + q.
template <class T, class M>
__global__ void face_split_kernel(const M* __restrict__ a, int r1, const M* __restrict__ b, int r2, int64_t rows,
                                  M s, T* __restrict__ out) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t R = static_cast<int64_t>(r1) * r2;
  if (k >= R) return;
  const int p = static_cast<int>(k / r2), q = static_cast<int>(k % r2);
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    out[i * R + k] = static_cast<T>(s * a[i * r1 + p] * b[i * r2 + q]);
  }
}

struct CudaHadamardBackend {
  struct Guard {
    explicit Guard(c10::Device d) : guard(d) {}
    c10::cuda::CUDAGuard guard;
  };

  static void delta(const at::Tensor& A1, const at::Tensor& B1, const at::Tensor& A2, const at::Tensor& B2,
                    double s, at::Tensor& out) {
    const int64_t rows = out.size(0), cols = out.size(1);
    const int r1 = static_cast<int>(A1.size(1)), r2 = static_cast<int>(A2.size(1));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fastpeft_hadamard_delta_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      delta_kernel<scalar_t, M><<<row_grid(rows, cols), kThreads, 0, stream>>>(
          A1.const_data_ptr<M>(), B1.const_data_ptr<M>(), r1, A2.const_data_ptr<M>(), B2.const_data_ptr<M>(), r2,
          rows, cols, static_cast<M>(s), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void delta_grads(const at::Tensor& G, const at::Tensor& A1, const at::Tensor& B1, const at::Tensor& A2,
                          const at::Tensor& B2, double s, at::Tensor& H1, at::Tensor& H2) {
    const int64_t rows = G.size(0), cols = G.size(1);
    const int r1 = static_cast<int>(A1.size(1)), r2 = static_cast<int>(A2.size(1));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, G.scalar_type(), "fastpeft_hadamard_delta_grads_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      delta_grads_kernel<scalar_t, M><<<row_grid(rows, cols), kThreads, 0, stream>>>(
          G.const_data_ptr<scalar_t>(), A1.const_data_ptr<M>(), B1.const_data_ptr<M>(), r1, A2.const_data_ptr<M>(),
          B2.const_data_ptr<M>(), r2, rows, cols, static_cast<M>(s), H1.mutable_data_ptr<M>(),
          H2.mutable_data_ptr<M>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void face_split(const at::Tensor& A, const at::Tensor& B, double s, at::Tensor& out) {
    const int64_t rows = out.size(0);
    const int r1 = static_cast<int>(A.size(1)), r2 = static_cast<int>(B.size(1));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fastpeft_hadamard_face_split_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      face_split_kernel<scalar_t, M><<<row_grid(rows, static_cast<int64_t>(r1) * r2), kThreads, 0, stream>>>(
          A.const_data_ptr<M>(), r1, B.const_data_ptr<M>(), r2, rows, static_cast<M>(s),
          out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  using fastpeft::CudaHadamardBackend;
  m.impl("hadamard_delta", &fastpeft::hadamard_delta_impl<CudaHadamardBackend>);
  m.impl("hadamard_delta_backward", &fastpeft::hadamard_delta_backward_impl<CudaHadamardBackend>);
  m.impl("hadamard_linear_forward", &fastpeft::hadamard_linear_forward_impl<CudaHadamardBackend>);
  m.impl("hadamard_linear_backward", &fastpeft::hadamard_linear_backward_impl<CudaHadamardBackend>);
}
