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

// Calls f(c, mult) for the columns of row `row` (index row * cols + c), mult = keep ? scale : 0.
template <class M, class F>
inline void for_each_mult(const DropoutSpec& d, int64_t row, int64_t cols, F&& f) {
  const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(cols);
  uint32_t hi = static_cast<uint32_t>(base >> 32);
  DropoutKey k = dropout_key(d.seed, hi);
  const M scale = static_cast<M>(d.scale);
  for (int64_t c = 0; c < cols; ++c) {
    const uint64_t idx = base + static_cast<uint64_t>(c);
    const uint32_t h = static_cast<uint32_t>(idx >> 32);
    if (h != hi) {
      hi = h;
      k = dropout_key(d.seed, hi);
    }
    f(c, dropout_hash(k, static_cast<uint32_t>(idx)) >= d.threshold ? scale : M(0));
  }
}

struct CpuMixBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  static void drop_rows(const at::Tensor& x, int64_t row0, const DropoutSpec& d, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastpeft_mix_drop_rows", [&] {
      using M = typename OpMath<scalar_t>::type;
      const int64_t T = x.size(0), cols = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, T, mix_grain(cols), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* xr = xp + i * s0;
          scalar_t* orow = op + i * cols;
          for_each_mult<M>(d, row0 + i, cols, [&](int64_t c, M m) { st(orow[c], ld(xr[c * s1]) * m); });
        }
      });
    });
  }

  static void drop_bwd(const at::Tensor& x, int64_t row0, const DropoutSpec& d, at::Tensor& t, at::Tensor& gx) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastpeft_mix_drop_bwd", [&] {
      using M = typename OpMath<scalar_t>::type;
      const int64_t T = x.size(0), cols = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* tp = t.mutable_data_ptr<scalar_t>();
      scalar_t* gp = gx.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, T, mix_grain(cols), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* xr = xp + i * s0;
          scalar_t* tr = tp + i * cols;
          scalar_t* gr = gp + i * cols;
          for_each_mult<M>(d, row0 + i, cols, [&](int64_t c, M m) {
            st(gr[c], ld(gr[c]) + ld(tr[c]) * m);
            st(tr[c], ld(xr[c * s1]) * m);
          });
        }
      });
    });
  }

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
