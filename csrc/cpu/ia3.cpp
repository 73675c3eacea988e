// CPU backend of the ia3 family (IA3 Linear). The driver (common/ia3_impl.h) runs the base GEMM
// through ATen (MKL / oneDNN); this file is the one fused elementwise pass around it: rows split over
// threads, the scale held in op-math once, column sums in per-thread op-math partials (one [C] row
// per thread, L1-resident) added together at the end.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_math.h"
#include "common/ia3_impl.h"
#include "common/opmath.h"

namespace fastpeft {
namespace {

// One row range of the pass; compiled per ISA (cpu_math.h), the bf16 conversions are integer ops
// so the loops vectorise.
template <class T, class M>
FASTPEFT_CLONES void scale_rows(const T* src, const M* __restrict__ s, T* dst, int64_t r0, int64_t r1, int64_t C) {
  using cpu::ld;
  using cpu::st;
  for (int64_t r = r0; r < r1; ++r) {
    const T* a = src + r * C;
    T* d = dst + r * C;
    for (int64_t j = 0; j < C; ++j) st(d[j], ld(a[j]) * s[j]);
  }
}

template <class T, class M>
FASTPEFT_CLONES void scale_rows_acc(const T* src, const M* __restrict__ s, T* dst, const T* __restrict__ acc,
                                    M* __restrict__ part, int64_t r0, int64_t r1, int64_t C) {
  using cpu::ld;
  using cpu::st;
  for (int64_t r = r0; r < r1; ++r) {
    const T* a = src + r * C;
    const T* b = acc + r * C;
    T* d = dst + r * C;
    for (int64_t j = 0; j < C; ++j) {
      const M v = ld(a[j]);
      part[j] += v * ld(b[j]);
      st(d[j], v * s[j]);
    }
  }
}

template <class T>
void scale_cols_typed(const at::Tensor& src, const at::Tensor& scale, at::Tensor& dst, const at::Tensor* acc,
                      at::Tensor* gsum) {
  using M = typename OpMath<T>::type;
  const int64_t N = src.size(0), C = src.size(1);
  // The scale in op-math, converted once.
  std::vector<M> sm(C);
  if (scale.scalar_type() == at::kFloat) {
    const float* sp = scale.const_data_ptr<float>();
    for (int64_t j = 0; j < C; ++j) sm[j] = static_cast<M>(sp[j]);
  } else {
    const T* sp = scale.const_data_ptr<T>();
    for (int64_t j = 0; j < C; ++j) sm[j] = static_cast<M>(sp[j]);
  }
  const T* sp = src.const_data_ptr<T>();
  T* dp = dst.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(C, 1));
  if (acc == nullptr) {
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) { scale_rows<T, M>(sp, sm.data(), dp, r0, r1, C); });
    return;
  }
  const T* ap = acc->const_data_ptr<T>();
  const int64_t workers = std::max(1, at::get_num_threads());
  std::vector<M> parts(static_cast<size_t>(workers * C), M(0));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    const int64_t w = std::min<int64_t>(at::get_thread_num(), workers - 1);
    scale_rows_acc<T, M>(sp, sm.data(), dp, ap, parts.data() + w * C, r0, r1, C);
  });
  M* g = gsum->data_ptr<M>();
  for (int64_t w = 0; w < workers; ++w) {
    const M* p = parts.data() + w * C;
    for (int64_t j = 0; j < C; ++j) g[j] += p[j];
  }
}

struct CpuIa3Backend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void scale_cols(const at::Tensor& src, const at::Tensor& scale, at::Tensor& dst, const at::Tensor* acc,
                         at::Tensor* gsum) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "fastpeft_ia3_scale_cols",
                                    [&] { scale_cols_typed<scalar_t>(src, scale, dst, acc, gsum); });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("ia3_forward", &fastpeft::ia3_forward_impl<fastpeft::CpuIa3Backend>);
  m.impl("ia3_backward", &fastpeft::ia3_backward_impl<fastpeft::CpuIa3Backend>);
}
