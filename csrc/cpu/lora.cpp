// CPU kernels of the lora family. The op drivers (argument checks, chunking, ATen GEMMs) live in
// common/lora_impl.h; this file supplies the fused elementwise loops: dropout generation with the
// cast and 1/(1-p) scale, the backward dropout pass (grad_x update + drop(x) regeneration in one
// sweep), the DoRA epilogues and the grad_magnitude column reduction. bf16/fp16 math is fp32.
//
// The hash loop is the only compute-heavy elementwise part; on x86-64 GCC builds it is compiled
// for AVX-512, AVX2 and the baseline and picked at load time (target_clones), so the wheel runs on
// any x86-64 CPU without -march=native.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <limits>

#include "common/cpu_math.h"
#include "common/cpu_scratch.h"
#include "common/lora_impl.h"
#include "common/qlora_impl.h"

namespace fastpeft {
namespace {

constexpr int64_t kBlock = 256;  // columns per multiplier block (strided inputs only)

using cpu::OpMath;
using cpu::ld;
using cpu::st;

template <class M>
FASTPEFT_INLINE M keep_value(DropoutKey k, uint32_t lo, uint32_t thr, M scale) {
  return dropout_hash(k, lo) >= thr ? scale : M(0);
}

// ---- contiguous row-segment kernels (the hot loops), one instantiation per dtype --------------

// out[j] = x[j] * mult(lo + j).
template <class T, class M>
FASTPEFT_INLINE void drop_seg_impl(DropoutKey k, uint32_t lo, int64_t n, uint32_t thr, M scale,
                                   const T* __restrict__ x, T* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j)
    st(out[j], ld(x[j]) * keep_value<M>(k, lo + static_cast<uint32_t>(j), thr, scale));
}

// gx[j] += t[j] * mult;  t[j] = x[j] * mult.
template <class T, class M>
FASTPEFT_INLINE void drop_bwd_seg_impl(DropoutKey k, uint32_t lo, int64_t n, uint32_t thr, M scale,
                                       const T* __restrict__ x, T* __restrict__ t,
                                       T* __restrict__ gx) {
  for (int64_t j = 0; j < n; ++j) {
    const M m = keep_value<M>(k, lo + static_cast<uint32_t>(j), thr, scale);
    st(gx[j], ld(gx[j]) + ld(t[j]) * m);
    st(t[j], ld(x[j]) * m);
  }
}

// out[j] = mult(lo + j) for strided inputs.
template <class M>
FASTPEFT_INLINE void mult_seg_impl(DropoutKey k, uint32_t lo, int64_t n, uint32_t thr, M scale,
                                   M* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = keep_value<M>(k, lo + static_cast<uint32_t>(j), thr, scale);
}

// y = z * mn + b (b may be null).
template <class T, class M>
FASTPEFT_INLINE void epi_row_impl(const T* __restrict__ z, const M* __restrict__ mn,
                                  const T* __restrict__ b, int64_t n, T* __restrict__ y) {
  if (b != nullptr) {
    for (int64_t c = 0; c < n; ++c) st(y[c], ld(z[c]) * mn[c] + ld(b[c]));
  } else {
    for (int64_t c = 0; c < n; ++c) st(y[c], ld(z[c]) * mn[c]);
  }
}

// p = z; z = p + s q; y += (mn - 1) p + mn s q.
template <class T, class M>
FASTPEFT_INLINE void epi_drop_row_impl(T* __restrict__ z, const T* __restrict__ q,
                                       const M* __restrict__ mn, M s, int64_t n, T* __restrict__ y) {
  for (int64_t c = 0; c < n; ++c) {
    const M p = ld(z[c]);
    const M sq = s * ld(q[c]);
    st(z[c], p + sq);
    st(y[c], ld(y[c]) + (mn[c] - M(1)) * p + mn[c] * sq);
  }
}

// h = g (mn + off); acc += g z.
template <class T, class M>
FASTPEFT_INLINE void grad_row_impl(const T* __restrict__ g, const T* __restrict__ z,
                                   const M* __restrict__ mn, M off, int64_t n, M* __restrict__ acc,
                                   T* __restrict__ h) {
  for (int64_t c = 0; c < n; ++c) {
    const M gv = ld(g[c]);
    st(h[c], gv * (mn[c] + off));
    acc[c] += gv * ld(z[c]);
  }
}

// Non-template, ISA-cloned entry points (overloaded by dtype).
#define FASTPEFT_STAMP(T, M)                                                                        \
  FASTPEFT_CLONES void drop_seg(DropoutKey k, uint32_t lo, int64_t n, uint32_t thr, M scale,       \
                                const T* x, T* out) {                                              \
    drop_seg_impl<T, M>(k, lo, n, thr, scale, x, out);                                             \
  }                                                                                                \
  FASTPEFT_CLONES void drop_bwd_seg(DropoutKey k, uint32_t lo, int64_t n, uint32_t thr, M scale,   \
                                    const T* x, T* t, T* gx) {                                     \
    drop_bwd_seg_impl<T, M>(k, lo, n, thr, scale, x, t, gx);                                       \
  }                                                                                                \
  FASTPEFT_CLONES void epi_row(const T* z, const M* mn, const T* b, int64_t n, T* y) {             \
    epi_row_impl<T, M>(z, mn, b, n, y);                                                            \
  }                                                                                                \
  FASTPEFT_CLONES void epi_drop_row(T* z, const T* q, const M* mn, M s, int64_t n, T* y) {         \
    epi_drop_row_impl<T, M>(z, q, mn, s, n, y);                                                    \
  }                                                                                                \
  FASTPEFT_CLONES void grad_row(const T* g, const T* z, const M* mn, M off, int64_t n, M* acc,     \
                                T* h) {                                                            \
    grad_row_impl<T, M>(g, z, mn, off, n, acc, h);                                                 \
  }

FASTPEFT_STAMP(float, float)
FASTPEFT_STAMP(double, double)
FASTPEFT_STAMP(c10::BFloat16, float)
FASTPEFT_STAMP(c10::Half, float)
#undef FASTPEFT_STAMP

FASTPEFT_CLONES void mult_seg(DropoutKey k, uint32_t lo, int64_t n, uint32_t thr, float scale, float* out) {
  mult_seg_impl<float>(k, lo, n, thr, scale, out);
}
FASTPEFT_CLONES void mult_seg(DropoutKey k, uint32_t lo, int64_t n, uint32_t thr, double scale, double* out) {
  mult_seg_impl<double>(k, lo, n, thr, scale, out);
}

// Calls f(key, lo, offset, len) for the pieces of the logical index range [idx0, idx0 + n) that
// share one high index word (almost always a single piece).
template <class F>
FASTPEFT_INLINE void for_each_key_segment(const DropoutSpec& d, uint64_t idx0, int64_t n, F&& f) {
  int64_t off = 0;
  while (off < n) {
    const uint64_t idx = idx0 + static_cast<uint64_t>(off);
    const uint32_t hi = static_cast<uint32_t>(idx >> 32);
    const uint32_t lo = static_cast<uint32_t>(idx);
    const int64_t room = static_cast<int64_t>((uint64_t{1} << 32) - lo);
    const int64_t len = std::min(n - off, room);
    f(dropout_key(d.seed, hi), lo, off, len);
    off += len;
  }
}

// Multipliers for a strided row block.
template <class M>
void keep_mult(const DropoutSpec& d, uint64_t idx0, int64_t n, M* out) {
  for_each_key_segment(d, idx0, n, [&](DropoutKey k, uint32_t lo, int64_t off, int64_t len) {
    mult_seg(k, lo, len, d.threshold, static_cast<M>(d.scale), out + off);
  });
}

inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

struct CpuBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  static int64_t chunk_rows(int64_t cols, ChunkKind kind) {
    const int64_t c = std::max<int64_t>(cols, 1);
    switch (kind) {
      case ChunkKind::kSmallGemm:  // ~1 MiB fp32: stays in L2 between generation and the GEMM
        return std::clamp<int64_t>((int64_t{1} << 18) / c, 64, 512);
      case ChunkKind::kBaseGemm:  // ~2 MiB: MKL's fp32 GEMM loses ~7% at 256 rows, ~3% at 512
        return std::clamp<int64_t>((int64_t{1} << 19) / c, 128, 1024);
      case ChunkKind::kNoDropout:  // <= 16 MiB fp32: usually one piece, one full-rate GEMM
        return std::clamp<int64_t>((int64_t{1} << 22) / c, 256, 8192);
    }
    return 256;
  }

  // fp32/fp64 (MKL): blocks of ~2 MiB of x rows (512 rows at d=1024: 2048 rows unblocked re-read
  // x / g / y / grad_x from memory and cost ~8% over the base, 512-row blocks ~2%; 256 and 1024 are
  // both worse), folded, since sgemm/dgemm accumulate onto C (beta = 1) at no measurable cost.
  // bf16/fp16 (oneDNN): one block, base GEMM first: oneDNN's bf16 GEMM pays ~1 ms (of ~21) for
  // beta = 1 at d=1024, 2048 rows, more than the rank-r GEMM's read-modify-write, and row blocks
  // measured no faster. With a bias the forward folds anyway: the base addmm's own bias broadcast
  // (~1.5 ms for bf16) is replaced by the bias row of the rank-r GEMM, and it runs beta = 1 already.
  // oneDNN forms bf16 x A^T and g B ([2048, 16]) in ~0.70 ms but A x^T and B^T g^T in ~0.42 ms
  // (for fp32 MKL it is the other way round).
  static FusedPlan fused_plan(int64_t in, int64_t out, at::ScalarType t) {
    if (t == at::kFloat || t == at::kDouble) {
      // ~2 MiB of rows per thread: each multi-threaded GEMM call then hands every thread a
      // 1-thread-sized block (fixed 2 MiB blocks at 2 threads measured 12% over base, not ~3%).
      const int64_t bytes = std::max<int64_t>(std::max(in, out), 1) * (t == at::kDouble ? 8 : 4);
      const int64_t per_thread = std::max<int64_t>((int64_t{1} << 21) / bytes, 128);
      return {per_thread * std::max(1, at::get_num_threads()), true, true, false};
    }
    return {std::numeric_limits<int64_t>::max(), false, true, t == at::kBFloat16};
  }

  static at::Tensor scratch(int slot, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
    return cpu::scratch(slot, rows, cols, opts);
  }

  static void dropout_rows(const at::Tensor& x, int64_t r0, const DropoutSpec& d, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastpeft_dropout_rows", [&] {
      using M = typename OpMath<scalar_t>::type;
      const int64_t rows = out.size(0), cols = x.size(1);
      const int64_t s0 = x.stride(0), s1 = x.stride(1);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const M scale = static_cast<M>(d.scale);
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
        alignas(64) M m[kBlock];
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* xr = xp + (r0 + i) * s0;
          scalar_t* orow = op + i * cols;
          const uint64_t base = static_cast<uint64_t>(r0 + i) * static_cast<uint64_t>(cols);
          if (s1 == 1) {
            for_each_key_segment(d, base, cols, [&](DropoutKey k, uint32_t lo, int64_t off, int64_t len) {
              drop_seg(k, lo, len, d.threshold, scale, xr + off, orow + off);
            });
            continue;
          }
          for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
            const int64_t nb = std::min(kBlock, cols - c0);
            keep_mult(d, base + c0, nb, m);
            for (int64_t j = 0; j < nb; ++j) st(orow[c0 + j], ld(xr[(c0 + j) * s1]) * m[j]);
          }
        }
      });
    });
  }

  static void dropout_bwd_fused(const at::Tensor& x, int64_t r0, const DropoutSpec& d, at::Tensor& t,
                                at::Tensor& gx) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastpeft_dropout_bwd", [&] {
      using M = typename OpMath<scalar_t>::type;
      const int64_t rows = t.size(0), cols = x.size(1);
      const int64_t s0 = x.stride(0), s1 = x.stride(1);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* tp = t.mutable_data_ptr<scalar_t>();
      scalar_t* gp = gx.mutable_data_ptr<scalar_t>();
      const M scale = static_cast<M>(d.scale);
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
        alignas(64) M m[kBlock];
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* xr = xp + (r0 + i) * s0;
          scalar_t* tr = tp + i * cols;
          scalar_t* gr = gp + i * cols;
          const uint64_t base = static_cast<uint64_t>(r0 + i) * static_cast<uint64_t>(cols);
          if (s1 == 1) {
            for_each_key_segment(d, base, cols, [&](DropoutKey k, uint32_t lo, int64_t off, int64_t len) {
              drop_bwd_seg(k, lo, len, d.threshold, scale, xr + off, tr + off, gr + off);
            });
            continue;
          }
          for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
            const int64_t nb = std::min(kBlock, cols - c0);
            keep_mult(d, base + c0, nb, m);
            for (int64_t j = 0; j < nb; ++j) {
              st(gr[c0 + j], ld(gr[c0 + j]) + ld(tr[c0 + j]) * m[j]);
              st(tr[c0 + j], ld(xr[(c0 + j) * s1]) * m[j]);
            }
          }
        }
      });
    });
  }

  static void dora_epilogue(const at::Tensor& z, const at::Tensor& mn, const std::optional<at::Tensor>& bias,
                            at::Tensor& y) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "fastpeft_dora_epilogue", [&] {
      using M = typename OpMath<scalar_t>::type;
      const int64_t rows = z.size(0), cols = z.size(1);
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const M* mp = mn.const_data_ptr<M>();
      const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) epi_row(zp + i * cols, mp, bp, cols, yp + i * cols);
      });
    });
  }

  static void dora_epilogue_dropout(at::Tensor& z, const at::Tensor& q, const at::Tensor& mn, double s,
                                    at::Tensor& y) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "fastpeft_dora_epilogue_dropout", [&] {
      using M = typename OpMath<scalar_t>::type;
      const int64_t rows = z.size(0), cols = z.size(1);
      scalar_t* zp = z.mutable_data_ptr<scalar_t>();
      const scalar_t* qp = q.const_data_ptr<scalar_t>();
      const M* mp = mn.const_data_ptr<M>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      const M sc = static_cast<M>(s);
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) epi_drop_row(zp + i * cols, qp + i * cols, mp, sc, cols, yp + i * cols);
      });
    });
  }

  static void dora_grad_rows(const at::Tensor& g, const at::Tensor& z, const at::Tensor& mn, double off,
                             at::Tensor& acc, at::Tensor& h) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "fastpeft_dora_grad_rows", [&] {
      using M = typename OpMath<scalar_t>::type;
      const int64_t rows = g.size(0), cols = g.size(1);
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const M* mp = mn.const_data_ptr<M>();
      M* ap = acc.mutable_data_ptr<M>();
      scalar_t* hp = h.mutable_data_ptr<scalar_t>();
      const M o = static_cast<M>(off);
      // Threads own column ranges, so the per-column sums need no reduction across threads.
      const int64_t grain = std::max<int64_t>(64, cols / std::max(1, at::get_num_threads()));
      at::parallel_for(0, cols, grain, [&](int64_t cb, int64_t ce) {
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t e = i * cols + cb;
          grad_row(gp + e, zp + e, mp + cb, o, ce - cb, ap + cb, hp + e);
        }
      });
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  using fastpeft::CpuBackend;
  m.impl("seeded_dropout", &fastpeft::seeded_dropout_impl<CpuBackend>);
  m.impl("lora_forward", &fastpeft::lora_forward_impl<CpuBackend>);
  m.impl("lora_backward", &fastpeft::lora_backward_impl<CpuBackend>);
  m.impl("dora_weight_norm", &fastpeft::dora_weight_norm_impl<CpuBackend>);
  m.impl("dora_forward", &fastpeft::dora_forward_impl<CpuBackend>);
  m.impl("dora_backward", &fastpeft::dora_backward_impl<CpuBackend>);
  m.impl("qlora_forward", &fastpeft::qlora_forward_impl<CpuBackend>);
  m.impl("qlora_backward", &fastpeft::qlora_backward_impl<CpuBackend>);
}
