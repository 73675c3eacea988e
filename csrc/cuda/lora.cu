// CUDA kernels of the lora family. The op drivers (argument checks, row chunking, cuBLAS GEMMs
// through ATen on torch's current stream) are shared with the CPU in common/lora_impl.h; this file
// supplies the fused elementwise kernels with exactly the CPU's semantics:
//   - dropout generation fused with the cast and the 1/(1-p) scale (mask bits from dropout_hash.h,
//     identical to the CPU's and to reference.py),
//   - the backward dropout pass (grad_x += mult * t and t <- drop(x), one sweep),
//   - the DoRA epilogues (rescale + bias; the dropout variant that also finishes z),
//   - the grad_magnitude column reduction fused with forming g * (m/n + off).
// Elementwise math is in float32 for bf16/fp16/fp32 (float64 for float64), as on the CPU: a value
// is x * mult with mult in {0, 1/(1-p)} rounded to the op-math type.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_launch.cuh"
#include "common/lora_impl.h"
#include "common/qlora_impl.h"

namespace fastpeft {
namespace {

using cuda::ceil_div;
using cuda::kMaxGridY;
using cuda::kThreads;
using cuda::OpMath;
using cuda::row_grid;

template <class M>
__device__ __forceinline__ M keep_mult(uint64_t seed, uint32_t thr, M scale, uint64_t idx) {
  const DropoutKey k = dropout_key(seed, static_cast<uint32_t>(idx >> 32));
  return dropout_hash(k, static_cast<uint32_t>(idx)) >= thr ? scale : M(0);
}

// out[i, c] = x[r0 + i, c] * mult(r0 + i, c);  out contiguous [rows, cols].
template <class T, class M>
__global__ void dropout_rows_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t r0,
                                    int64_t rows, int64_t cols, uint64_t seed, uint32_t thr,
                                    M scale, T* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const int64_t row = r0 + i;
    const M m = keep_mult<M>(seed, thr, scale, static_cast<uint64_t>(row) * cols + c);
    out[i * cols + c] = static_cast<T>(static_cast<M>(x[row * s0 + c * s1]) * m);
  }
}

// gx[i, c] += t[i, c] * mult;  t[i, c] = x[r0 + i, c] * mult.
template <class T, class M>
__global__ void dropout_bwd_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t r0,
                                   int64_t rows, int64_t cols, uint64_t seed, uint32_t thr, M scale,
                                   T* __restrict__ t, T* __restrict__ gx) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const int64_t row = r0 + i;
    const M m = keep_mult<M>(seed, thr, scale, static_cast<uint64_t>(row) * cols + c);
    const int64_t e = i * cols + c;
    gx[e] = static_cast<T>(static_cast<M>(gx[e]) + static_cast<M>(t[e]) * m);
    t[e] = static_cast<T>(static_cast<M>(x[row * s0 + c * s1]) * m);
  }
}

// y = z * mn + bias.
template <class T, class M>
__global__ void dora_epilogue_kernel(const T* __restrict__ z, const M* __restrict__ mn,
                                     const T* __restrict__ bias, int64_t rows, int64_t cols,
                                     T* __restrict__ y) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const M f = mn[c];
  const M b = bias != nullptr ? static_cast<M>(bias[c]) : M(0);
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const int64_t e = i * cols + c;
    y[e] = bias != nullptr ? static_cast<T>(static_cast<M>(z[e]) * f + b)
                           : static_cast<T>(static_cast<M>(z[e]) * f);
  }
}

// p = z; z = p + s q; y += (mn - 1) p + mn s q.
template <class T, class M>
__global__ void dora_epilogue_dropout_kernel(T* __restrict__ z, const T* __restrict__ q,
                                             const M* __restrict__ mn, M s, int64_t rows,
                                             int64_t cols, T* __restrict__ y) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const M f = mn[c];
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const int64_t e = i * cols + c;
    const M p = static_cast<M>(z[e]);
    const M sq = s * static_cast<M>(q[e]);
    z[e] = static_cast<T>(p + sq);
    y[e] = static_cast<T>(static_cast<M>(y[e]) + (f - M(1)) * p + f * sq);
  }
}

// h = g * (mn + off); acc[c] += sum_i g[i, c] z[i, c]. Block (32, 8): a warp spans 32 columns,
// the 8 warps and gridDim.y blocks split the rows; partial sums meet in shared memory, then one
// atomicAdd per column per block.
constexpr int kRedX = 32;
constexpr int kRedY = 8;

template <class T, class M>
__global__ void dora_grad_rows_kernel(const T* __restrict__ g, const T* __restrict__ z,
                                      const M* __restrict__ mn, M off, int64_t rows, int64_t cols,
                                      M* __restrict__ acc, T* __restrict__ h) {
  __shared__ M part[kRedY][kRedX + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRedX + threadIdx.x;
  M sum = M(0);
  if (c < cols) {
    const M f = mn[c] + off;
    for (int64_t i = static_cast<int64_t>(blockIdx.y) * kRedY + threadIdx.y; i < rows;
         i += static_cast<int64_t>(gridDim.y) * kRedY) {
      const int64_t e = i * cols + c;
      const M gv = static_cast<M>(g[e]);
      h[e] = static_cast<T>(gv * f);
      sum += gv * static_cast<M>(z[e]);
    }
  }
  part[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    M total = M(0);
#pragma unroll
    for (int k = 0; k < kRedY; ++k) total += part[k][threadIdx.x];
    atomicAdd(acc + c, total);
  }
}

struct CudaBackend {
  struct Guard {
    explicit Guard(c10::Device d) : guard(d) {}
    c10::cuda::CUDAGuard guard;
  };

  static int64_t chunk_rows(int64_t cols, ChunkKind kind) {
    // ~8M elements of scratch (16M without dropout): big enough for cuBLAS to run at full rate
    // and for the elementwise kernels to fill the GPU, bounded memory.
    const int64_t budget = kind == ChunkKind::kNoDropout ? (int64_t{1} << 24) : (int64_t{1} << 23);
    return std::clamp<int64_t>(budget / std::max<int64_t>(cols, 1), 128, 32768);
  }

  // Blocks as large as kNoDropout's chunks (they bound DoRA's [rows, out] scratch), folded: cuBLAS
  // applies beta = 1 in the GEMM epilogue, so the rank-r term is written first and the base GEMM
  // accumulates onto it; the bias goes through addmm (a memory-bound pass is cheap on the GPU).
  static FusedPlan fused_plan(int64_t in, int64_t out, at::ScalarType) {
    return {chunk_rows(std::max(in, out), ChunkKind::kNoDropout), true, false, false};
  }

  // The CUDA caching allocator already reuses blocks.
  static at::Tensor scratch(int, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
    return at::empty({rows, cols}, opts);
  }

  static void dropout_rows(const at::Tensor& x, int64_t r0, const DropoutSpec& d, at::Tensor& out) {
    const int64_t rows = out.size(0), cols = x.size(1);
    if (rows == 0 || cols == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastpeft_dropout_rows_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      dropout_rows_kernel<scalar_t, M><<<row_grid(rows, cols), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), r0, rows, cols, d.seed, d.threshold,
          static_cast<M>(d.scale), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void dropout_bwd_fused(const at::Tensor& x, int64_t r0, const DropoutSpec& d, at::Tensor& t,
                                at::Tensor& gx) {
    const int64_t rows = t.size(0), cols = x.size(1);
    if (rows == 0 || cols == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastpeft_dropout_bwd_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      dropout_bwd_kernel<scalar_t, M><<<row_grid(rows, cols), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), r0, rows, cols, d.seed, d.threshold,
          static_cast<M>(d.scale), t.mutable_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void dora_epilogue(const at::Tensor& z, const at::Tensor& mn, const std::optional<at::Tensor>& bias,
                            at::Tensor& y) {
    const int64_t rows = z.size(0), cols = z.size(1);
    if (rows == 0 || cols == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "fastpeft_dora_epilogue_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      dora_epilogue_kernel<scalar_t, M><<<row_grid(rows, cols), kThreads, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), mn.const_data_ptr<M>(),
          bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, rows, cols,
          y.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void dora_epilogue_dropout(at::Tensor& z, const at::Tensor& q, const at::Tensor& mn, double s,
                                    at::Tensor& y) {
    const int64_t rows = z.size(0), cols = z.size(1);
    if (rows == 0 || cols == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "fastpeft_dora_epilogue_dropout_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      dora_epilogue_dropout_kernel<scalar_t, M><<<row_grid(rows, cols), kThreads, 0, stream>>>(
          z.mutable_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), mn.const_data_ptr<M>(),
          static_cast<M>(s), rows, cols, y.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void dora_grad_rows(const at::Tensor& g, const at::Tensor& z, const at::Tensor& mn, double off,
                             at::Tensor& acc, at::Tensor& h) {
    const int64_t rows = g.size(0), cols = g.size(1);
    if (rows == 0 || cols == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t gx = ceil_div(cols, kRedX);
    // Enough blocks to fill the GPU; each block still reduces many rows before its atomics.
    const int64_t gy = std::clamp<int64_t>(ceil_div(rows, kRedY * 16), 1,
                                           std::max<int64_t>(1, 2048 / std::max<int64_t>(gx, 1)));
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(std::min(gy, kMaxGridY)));
    const dim3 block(kRedX, kRedY);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "fastpeft_dora_grad_rows_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      dora_grad_rows_kernel<scalar_t, M><<<grid, block, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), mn.const_data_ptr<M>(),
          static_cast<M>(off), rows, cols, acc.mutable_data_ptr<M>(), h.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  using fastpeft::CudaBackend;
  m.impl("seeded_dropout", &fastpeft::seeded_dropout_impl<CudaBackend>);
  m.impl("lora_forward", &fastpeft::lora_forward_impl<CudaBackend>);
  m.impl("lora_backward", &fastpeft::lora_backward_impl<CudaBackend>);
  m.impl("dora_weight_norm", &fastpeft::dora_weight_norm_impl<CudaBackend>);
  m.impl("dora_forward", &fastpeft::dora_forward_impl<CudaBackend>);
  m.impl("dora_backward", &fastpeft::dora_backward_impl<CudaBackend>);
  m.impl("qlora_forward", &fastpeft::qlora_forward_impl<CudaBackend>);
  m.impl("qlora_backward", &fastpeft::qlora_backward_impl<CudaBackend>);
}
