// CUDA backend of the ia3 family (IA3 Linear). The driver (common/ia3_impl.h) runs the base GEMM
// through ATen (cuBLAS on torch's current stream); this file is the one fused elementwise pass:
// threads over columns (coalesced), each block over a slab of rows, the scale read once per thread
// in op-math, column sums in op-math registers and one atomicAdd per thread and slab.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_launch.cuh"
#include "common/ia3_impl.h"

namespace fastpeft {
namespace {

using cuda::ceil_div;
using cuda::kMaxGridY;
using cuda::kThreads;

template <class T, class S, class M>
__global__ void ia3_scale_cols_kernel(const T* src, const S* __restrict__ scale, T* dst, const T* __restrict__ acc,
                                      M* __restrict__ gsum, int64_t N, int64_t C, int64_t rows_per_block) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= C) return;
  const M s = static_cast<M>(scale[j]);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < N ? r0 + rows_per_block : N;
  M part = M(0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r * C + j;
    const M v = static_cast<M>(src[i]);
    if (acc != nullptr) part += v * static_cast<M>(acc[i]);
    dst[i] = static_cast<T>(v * s);
  }
  if (acc != nullptr && r1 > r0) atomicAdd(gsum + j, part);
}

struct CudaIa3Backend {
  struct Guard {
    explicit Guard(c10::Device d) : guard(d) {}
    c10::cuda::CUDAGuard guard;
  };
  static void scale_cols(const at::Tensor& src, const at::Tensor& scale, at::Tensor& dst, const at::Tensor* acc,
                         at::Tensor* gsum) {
    const int64_t N = src.size(0), C = src.size(1);
    const int64_t rows = std::max<int64_t>(32, ceil_div(N, kMaxGridY));
    const dim3 grid(static_cast<unsigned>(ceil_div(C, kThreads)), static_cast<unsigned>(ceil_div(N, rows)));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "fastpeft_ia3_scale_cols_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      const scalar_t* ap = acc != nullptr ? acc->const_data_ptr<scalar_t>() : nullptr;
      M* gp = gsum != nullptr ? gsum->data_ptr<M>() : nullptr;
      if (scale.scalar_type() == at::kFloat) {
        ia3_scale_cols_kernel<scalar_t, float, M><<<grid, kThreads, 0, stream>>>(
            src.const_data_ptr<scalar_t>(), scale.const_data_ptr<float>(), dst.data_ptr<scalar_t>(), ap, gp, N, C, rows);
      } else {
        ia3_scale_cols_kernel<scalar_t, scalar_t, M><<<grid, kThreads, 0, stream>>>(
            src.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), ap, gp, N, C,
            rows);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("ia3_forward", &fastpeft::ia3_forward_impl<fastpeft::CudaIa3Backend>);
  m.impl("ia3_backward", &fastpeft::ia3_backward_impl<fastpeft::CudaIa3Backend>);
}
