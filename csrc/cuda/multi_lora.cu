// CUDA kernels of the multi-adapter LoRA mix (X-LoRA). The drivers (checks, the two cuBLAS GEMMs
// through ATen on torch's current stream) are shared with the CPU in common/multi_lora_impl.h;
// this file supplies the per-adapter block scaling and its backward with the CPU's semantics
// (op-math float32, float64 for float64, rounded once).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common/cuda_launch.cuh"
#include "common/multi_lora_impl.h"

namespace fastpeft {
namespace {

using cuda::ceil_div;
using cuda::kThreads;
using cuda::OpMath;
using cuda::row_grid;

// v[t, c] = u[t, c] * s[t, c / r]; x over the n r columns, y over rows (grid-stride).
template <class T, class M>
__global__ void mix_scale_kernel(const T* __restrict__ u, const M* __restrict__ s, int64_t rows, int64_t nr,
                                 int64_t n, int64_t r, T* __restrict__ v) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= nr) return;
  const int64_t j = c / r;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
    const int64_t e = t * nr + c;
    v[e] = static_cast<T>(static_cast<M>(u[e]) * s[t * n + j]);
  }
}

// One thread per (t, j): gu = gv * s; v = u * s (if v); ds[t, j] = sum_k gv u over the r-block.
template <class T, class M>
__global__ void mix_scale_backward_kernel(const T* __restrict__ gv, const T* __restrict__ u,
                                          const M* __restrict__ s, int64_t rows, int64_t n, int64_t r,
                                          T* __restrict__ gu, T* __restrict__ v, M* __restrict__ ds) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * n) return;
  const M sj = s[idx];
  const int64_t base = idx * r;  // (t * n + j) * r == t * n r + j r
  M acc = M(0);
  for (int64_t k = 0; k < r; ++k) {
    const M g = static_cast<M>(gv[base + k]);
    const M uv = static_cast<M>(u[base + k]);
    acc += g * uv;
    gu[base + k] = static_cast<T>(g * sj);
    if (v != nullptr) v[base + k] = static_cast<T>(uv * sj);
  }
  ds[idx] = acc;
}

template <class M>
__device__ __forceinline__ M mix_keep_mult(uint64_t seed, uint32_t thr, M scale, uint64_t idx) {
  const DropoutKey k = dropout_key(seed, static_cast<uint32_t>(idx >> 32));
  return dropout_hash(k, static_cast<uint32_t>(idx)) >= thr ? scale : M(0);
}

// out[i, c] = x[i, c] * mult(row0 + i, c);  out contiguous [rows, cols].
template <class T, class M>
__global__ void mix_drop_rows_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t row0, int64_t rows,
                                     int64_t cols, uint64_t seed, uint32_t thr, M scale, T* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const M m = mix_keep_mult<M>(seed, thr, scale, static_cast<uint64_t>(row0 + i) * cols + c);
    out[i * cols + c] = static_cast<T>(static_cast<M>(x[i * s0 + c * s1]) * m);
  }
}

// gx[i, c] += t[i, c] * mult;  t[i, c] = x[i, c] * mult.
template <class T, class M>
__global__ void mix_drop_bwd_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t row0, int64_t rows,
                                    int64_t cols, uint64_t seed, uint32_t thr, M scale, T* __restrict__ t,
                                    T* __restrict__ gx) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const M m = mix_keep_mult<M>(seed, thr, scale, static_cast<uint64_t>(row0 + i) * cols + c);
    const int64_t e = i * cols + c;
    gx[e] = static_cast<T>(static_cast<M>(gx[e]) + static_cast<M>(t[e]) * m);
    t[e] = static_cast<T>(static_cast<M>(x[i * s0 + c * s1]) * m);
  }
}

struct CudaMixBackend {
  struct Guard {
    explicit Guard(c10::Device d) : guard(d) {}
    c10::cuda::CUDAGuard guard;
  };

  static void drop_rows(const at::Tensor& x, int64_t row0, const DropoutSpec& d, at::Tensor& out) {
    const int64_t rows = x.size(0), cols = x.size(1);
    if (rows == 0 || cols == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastpeft_mix_drop_rows_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      mix_drop_rows_kernel<scalar_t, M><<<row_grid(rows, cols), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), row0, rows, cols, d.seed, d.threshold,
          static_cast<M>(d.scale), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void drop_bwd(const at::Tensor& x, int64_t row0, const DropoutSpec& d, at::Tensor& t, at::Tensor& gx) {
    const int64_t rows = x.size(0), cols = x.size(1);
    if (rows == 0 || cols == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastpeft_mix_drop_bwd_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      mix_drop_bwd_kernel<scalar_t, M><<<row_grid(rows, cols), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), row0, rows, cols, d.seed, d.threshold,
          static_cast<M>(d.scale), t.mutable_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void mix_scale(const at::Tensor& u, const at::Tensor& s, int64_t r, at::Tensor& v) {
    const int64_t rows = u.size(0), nr = u.size(1), n = s.size(1);
    if (rows == 0 || nr == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "fastpeft_mix_scale_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      mix_scale_kernel<scalar_t, M><<<row_grid(rows, nr), kThreads, 0, stream>>>(
          u.const_data_ptr<scalar_t>(), s.const_data_ptr<M>(), rows, nr, n, r, v.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void mix_scale_backward(const at::Tensor& gv, const at::Tensor& u, const at::Tensor& s, int64_t r,
                                 at::Tensor& gu, at::Tensor& v, at::Tensor& ds) {
    const int64_t rows = u.size(0), n = s.size(1);
    if (rows == 0 || n == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t blocks = ceil_div(rows * n, kThreads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "fastpeft_mix_scale_backward_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      mix_scale_backward_kernel<scalar_t, M><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          gv.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), s.const_data_ptr<M>(), rows, n, r,
          gu.mutable_data_ptr<scalar_t>(), v.defined() ? v.mutable_data_ptr<scalar_t>() : nullptr,
          ds.mutable_data_ptr<M>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  using fastpeft::CudaMixBackend;
  m.impl("multi_lora_mix", &fastpeft::multi_lora_mix_impl<CudaMixBackend>);
  m.impl("multi_lora_mix_backward", &fastpeft::multi_lora_mix_backward_impl<CudaMixBackend>);
}
