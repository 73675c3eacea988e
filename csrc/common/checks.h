// Argument checks shared by the CPU and CUDA kernels. Every message names the argument, so a bad
// call from Python surfaces as a RuntimeError that says what to fix.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastpeft {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "fastpeft: '", name, "' must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble,
              "fastpeft: '", name, "' must be float32, bfloat16, float16 or float64, got ", s);
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastpeft: '", name, "' has dtype ",
              t.scalar_type(), " but '", ref_name, "' has dtype ", ref.scalar_type(),
              "; cast them to one dtype");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "fastpeft: '", name, "' is on ", t.device(), " but '",
              ref_name, "' is on ", ref.device(), "; move them to one device");
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "fastpeft: '", name, "' has size ", t.size(dim),
              " in dim ", dim, " but ", what, " is ", expected, " (shape ", t.sizes(), ")");
}

inline void check_dropout_p(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastpeft: 'dropout_p' must be in [0, 1), got ", p);
}

}  // namespace fastpeft
