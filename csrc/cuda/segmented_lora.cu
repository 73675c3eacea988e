// CUDA backend of segmented_lora (mixed-adapter batches; schema in registration.cpp), BGMV style as in
// punica / vLLM: one block per row, the row's adapter read from adapter_index on the device, so the
// grouping needs no host sync. Shrink: each warp takes ranks r, u[r] = x[t] . A_k[r] with a strided
// dot and a warp reduction (op-math), u kept in shared memory; expand: threads over out columns,
// delta[t, j] = s_k sum_r u[r] B_k[j, r], rounded once. Adapters no row uses cost nothing; work is
// O(T r (in + out)). The per-adapter table (A, B pointers, rank, scaling) is one small pinned H2D
// copy on torch's current stream.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cuda_launch.cuh"
#include "common/segmented_lora_impl.h"

namespace fastpeft {
namespace {

constexpr int kBlock = 256;
constexpr int kWarp = 32;

// table layout per adapter: [A pointer, B pointer, rank, scaling bits (double)], all int64.
template <class T, class M>
__global__ void segmented_lora_kernel(const T* __restrict__ x, const int64_t* __restrict__ idx,
                                      const int64_t* __restrict__ table, int64_t n, int64_t in, int64_t out,
                                      T* __restrict__ delta) {
  extern __shared__ unsigned char smem_raw[];
  M* u = reinterpret_cast<M*>(smem_raw);
  const int64_t t = blockIdx.x;
  const int64_t k = idx[t];
  if (k < 0 || k >= n) return;  // base-only row (delta stays zero); the wrapper checks the range
  const T* A = reinterpret_cast<const T*>(table[4 * k]);
  const T* B = reinterpret_cast<const T*>(table[4 * k + 1]);
  const int64_t R = table[4 * k + 2];
  double sd;
  {
    const int64_t bits = table[4 * k + 3];
    memcpy(&sd, &bits, sizeof(sd));
  }
  if (R == 0) return;
  const M s = static_cast<M>(sd);
  const T* xr = x + t * in;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int64_t r = warp; r < R; r += warps) {
    const T* a = A + r * in;
    M acc = M(0);
    for (int64_t c = lane; c < in; c += kWarp) acc += static_cast<M>(xr[c]) * static_cast<M>(a[c]);
    for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) u[r] = acc;
  }
  __syncthreads();
  T* d = delta + t * out;
  for (int64_t j = threadIdx.x; j < out; j += blockDim.x) {
    const T* b = B + j * R;
    M acc = M(0);
    for (int64_t r = 0; r < R; ++r) acc += u[r] * static_cast<M>(b[r]);
    d[j] = static_cast<T>(s * acc);
  }
}

at::Tensor segmented_lora_cuda(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B,
                               c10::ArrayRef<double> scalings, const at::Tensor& adapter_index) {
  const auto [in, out] = check_segmented_lora_args(x, lora_A, lora_B, scalings, adapter_index);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0);
  const int64_t n = static_cast<int64_t>(lora_A.size());
  at::Tensor delta = at::zeros({T, out}, x.options());
  if (T == 0 || out == 0 || in == 0) return delta;
  const at::Tensor xc = x.contiguous();
  const at::Tensor idx = adapter_index.contiguous();
  std::vector<at::Tensor> keep;
  keep.reserve(2 * n);
  at::Tensor table_h = at::empty({4 * n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* tp = table_h.data_ptr<int64_t>();
  int64_t r_max = 0;
  for (int64_t k = 0; k < n; ++k) {
    keep.push_back(lora_A[k].contiguous());
    keep.push_back(lora_B[k].contiguous());
    const int64_t R = lora_A[k].size(0);
    r_max = std::max(r_max, R);
    tp[4 * k] = reinterpret_cast<int64_t>(keep[2 * k].const_data_ptr());
    tp[4 * k + 1] = reinterpret_cast<int64_t>(keep[2 * k + 1].const_data_ptr());
    tp[4 * k + 2] = R;
    const double s = scalings[k];
    std::memcpy(&tp[4 * k + 3], &s, sizeof(s));
  }
  if (r_max == 0) return delta;
  const at::Tensor table = table_h.to(x.device(), /*non_blocking=*/true);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastpeft_segmented_lora_cuda", [&] {
    using M = typename OpMath<scalar_t>::type;
    const size_t smem = static_cast<size_t>(r_max) * sizeof(M);
    TORCH_CHECK(smem <= 48 * 1024, "fastpeft: segmented_lora supports ranks up to ", 48 * 1024 / sizeof(M),
                " on CUDA, got ", r_max);
    segmented_lora_kernel<scalar_t, M><<<static_cast<unsigned>(T), kBlock, smem, stream>>>(
        xc.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), table.const_data_ptr<int64_t>(), n, in, out,
        delta.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return delta;
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) { m.impl("segmented_lora", &fastpeft::segmented_lora_cuda); }
