// CPU kernels of the multi-adapter LoRA mix (X-LoRA). The drivers (checks, the two ATen GEMMs) are
// in common/multi_lora_impl.h; this file supplies the per-adapter block scaling between them and
// its backward (block scaling of the gradient fused with the d scalings row reductions).
// bf16/fp16 math is fp32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common/cpu_math.h"
#include "common/multi_lora_impl.h"

namespace fastpeft {
namespace {

using cpu::ld;
using cpu::OpMath;
using cpu::st;

inline int64_t mix_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

struct CpuMixBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  static void mix_scale(const at::Tensor& u, const at::Tensor& s, int64_t r, at::Tensor& v) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "fastpeft_mix_scale", [&] {
      using M = typename OpMath<scalar_t>::type;
      const int64_t T = u.size(0), nr = u.size(1), n = s.size(1);
      const scalar_t* up = u.const_data_ptr<scalar_t>();
      const M* sp = s.const_data_ptr<M>();
      scalar_t* vp = v.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, T, mix_grain(nr), [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const scalar_t* ur = up + t * nr;
          scalar_t* vr = vp + t * nr;
          const M* sr = sp + t * n;
          for (int64_t j = 0; j < n; ++j) {
            const M sj = sr[j];
            for (int64_t k = j * r; k < (j + 1) * r; ++k) st(vr[k], ld(ur[k]) * sj);
          }
        }
      });
    });
  }

  static void mix_scale_backward(const at::Tensor& gv, const at::Tensor& u, const at::Tensor& s, int64_t r,
                                 at::Tensor& gu, at::Tensor& v, at::Tensor& ds) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "fastpeft_mix_scale_backward", [&] {
      using M = typename OpMath<scalar_t>::type;
      const int64_t T = u.size(0), nr = u.size(1), n = s.size(1);
      const scalar_t* gvp = gv.const_data_ptr<scalar_t>();
      const scalar_t* up = u.const_data_ptr<scalar_t>();
      const M* sp = s.const_data_ptr<M>();
      scalar_t* gup = gu.mutable_data_ptr<scalar_t>();
      scalar_t* vp = v.defined() ? v.mutable_data_ptr<scalar_t>() : nullptr;
      M* dsp = ds.mutable_data_ptr<M>();
      at::parallel_for(0, T, mix_grain(nr), [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const int64_t o = t * nr;
          for (int64_t j = 0; j < n; ++j) {
            const M sj = sp[t * n + j];
            M acc = M(0);
            for (int64_t k = o + j * r; k < o + (j + 1) * r; ++k) {
              const M g = ld(gvp[k]);
              const M uv = ld(up[k]);
              acc += g * uv;
              st(gup[k], g * sj);
              if (vp != nullptr) st(vp[k], uv * sj);
            }
            dsp[t * n + j] = acc;
          }
        }
      });
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  using fastpeft::CpuMixBackend;
  m.impl("multi_lora_mix", &fastpeft::multi_lora_mix_impl<CpuMixBackend>);
  m.impl("multi_lora_mix_backward", &fastpeft::multi_lora_mix_backward_impl<CpuMixBackend>);
}
