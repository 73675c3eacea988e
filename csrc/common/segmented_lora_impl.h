// Argument checks of segmented_lora (mixed-adapter batches), shared by the CPU and CUDA kernels.
//   x [T, in]; lora_A[k] [r_k, in]; lora_B[k] [out, r_k]; scalings [n]; adapter_index int64 [T]
//   (-1 = base only) on x's device. delta[t] = s_k (x[t] A_k^T) B_k^T, op-math sums, rounded once.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <utility>

#include "common/checks.h"

namespace fastpeft {

// Returns (in_features, out_features). out is taken from the first lora_B; every adapter must agree.
inline std::pair<int64_t, int64_t> check_segmented_lora_args(const at::Tensor& x, at::TensorList lora_A,
                                                             at::TensorList lora_B, c10::ArrayRef<double> scalings,
                                                             const at::Tensor& adapter_index) {
  check_dim(x, 2, "x");
  check_floating(x, "x");
  const int64_t n = static_cast<int64_t>(lora_A.size());
  TORCH_CHECK(n >= 1, "fastpeft: segmented_lora needs at least one adapter in 'lora_A'");
  TORCH_CHECK(static_cast<int64_t>(lora_B.size()) == n && static_cast<int64_t>(scalings.size()) == n,
              "fastpeft: 'lora_A', 'lora_B' and 'scalings' must have one entry per adapter, got ", n, ", ",
              lora_B.size(), " and ", scalings.size());
  const int64_t in = x.size(1);
  check_dim(lora_B[0], 2, "lora_B[0]");
  const int64_t out = lora_B[0].size(0);
  for (int64_t k = 0; k < n; ++k) {
    const at::Tensor& a = lora_A[k];
    const at::Tensor& b = lora_B[k];
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "fastpeft: 'lora_A[", k, "]' and 'lora_B[", k,
                "]' must be 2-D, got shapes ", a.sizes(), " and ", b.sizes());
    TORCH_CHECK(a.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type(), "fastpeft: 'lora_A[", k,
                "]' and 'lora_B[", k, "]' have dtypes ", a.scalar_type(), " and ", b.scalar_type(), " but 'x' has dtype ",
                x.scalar_type(), "; cast them to one dtype");
    TORCH_CHECK(a.device() == x.device() && b.device() == x.device(), "fastpeft: 'lora_A[", k, "]' and 'lora_B[", k,
                "]' are on ", a.device(), " and ", b.device(), " but 'x' is on ", x.device(),
                "; move them to one device");
    TORCH_CHECK(a.size(1) == in, "fastpeft: 'lora_A[", k, "]' has shape ", a.sizes(), " but 'x' has in_features ",
                in, " (lora_A is [r, in])");
    TORCH_CHECK(b.size(0) == out && b.size(1) == a.size(0), "fastpeft: 'lora_B[", k, "]' has shape ", b.sizes(),
                " but must be [out=", out, ", r=", a.size(0), "] (lora_B is [out, r], r from lora_A[", k, "])");
  }
  check_dim(adapter_index, 1, "adapter_index");
  TORCH_CHECK(adapter_index.scalar_type() == at::kLong, "fastpeft: 'adapter_index' must be int64, got ",
              adapter_index.scalar_type());
  check_same_device(adapter_index, x, "adapter_index", "x");
  check_size(adapter_index, 0, x.size(0), "adapter_index", "the number of rows of x");
  return {in, out};
}

}  // namespace fastpeft
