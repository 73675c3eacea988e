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
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

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

// acc += g z (per column).
template <class T, class M>
FASTPEFT_INLINE void col_dot_impl(const T* __restrict__ g, const T* __restrict__ z, int64_t n,
                                  M* __restrict__ acc) {
  for (int64_t c = 0; c < n; ++c) acc[c] += ld(g[c]) * ld(z[c]);
}

// Columns [c0, in) of one row of the folded weight W' = W + B_s A (B_s = s B, A and B_s in op
// math): out[c] = scale * W'[c] (when out is not null); returns sum_c W'[c]^2 over those columns.
// (The AVX-512 kernel below does the bulk of the columns for fp32/bf16/fp16; this is its tail and
// the other ISAs' / float64's loop.)
template <class T, class M>
FASTPEFT_INLINE M fold_row_impl(const T* __restrict__ w, const M* __restrict__ A, const M* __restrict__ b,
                                int64_t r, int64_t in, int64_t c0, M scale, T* __restrict__ out) {
  constexpr int64_t kC = 64;
  M part[kC] = {};
  for (; c0 < in; c0 += kC) {
    const int64_t nc = std::min(kC, in - c0);
    M acc[kC];
    for (int64_t j = 0; j < nc; ++j) acc[j] = ld(w[c0 + j]);
    for (int64_t k = 0; k < r; ++k) {
      const M bk = b[k];
      const M* __restrict__ a = A + k * in + c0;
      for (int64_t j = 0; j < nc; ++j) acc[j] += bk * a[j];
    }
    for (int64_t j = 0; j < nc; ++j) part[j] += acc[j] * acc[j];
    if (out != nullptr) {
      for (int64_t j = 0; j < nc; ++j) st(out[c0 + j], acc[j] * scale);
    }
  }
  M t = 0;
  for (int64_t j = 0; j < kC; ++j) t += part[j];
  return t;
}

// y += b.
template <class T>
FASTPEFT_INLINE void bias_row_impl(T* __restrict__ y, const T* __restrict__ b, int64_t n) {
  for (int64_t c = 0; c < n; ++c) st(y[c], ld(y[c]) + ld(b[c]));
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
  }                                                                                                \
  FASTPEFT_CLONES void bias_row(T* y, const T* b, int64_t n) { bias_row_impl<T>(y, b, n); }        \
  FASTPEFT_CLONES void col_dot(const T* g, const T* z, int64_t n, M* acc) {                        \
    col_dot_impl<T, M>(g, z, n, acc);                                                              \
  }                                                                                                \
  FASTPEFT_CLONES M fold_row(const T* w, const M* A, const M* b, int64_t r, int64_t in, int64_t c0,   \
                             M scale, T* out) {                                                    \
    return fold_row_impl<T, M>(w, A, b, r, in, c0, scale, out);                                    \
  }

FASTPEFT_STAMP(float, float)
FASTPEFT_STAMP(double, double)
FASTPEFT_STAMP(c10::BFloat16, float)
FASTPEFT_STAMP(c10::Half, float)
#undef FASTPEFT_STAMP

// The folded weight, AVX-512: 4 rows x 64 columns per step (16 accumulators; each A load feeds 4
// rows), for fp32/bf16/fp16 weights. Rows [i0, i0 + 4), columns [0, in / 64 * 64); adds each row's
// sum of squares to sq[]. bf16 is rounded to nearest even (NaN -> 0x7FC0) exactly like st().
#if defined(__GNUC__) && defined(__x86_64__)
#define FASTPEFT_HAVE_FOLD_AVX512 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own _mm512_undefined_* in its headers
#define FASTPEFT_AVX512 __attribute__((target("avx512f,avx512bw")))

FASTPEFT_AVX512 inline __m512 fold_ld(const float* p) { return _mm512_loadu_ps(p); }
FASTPEFT_AVX512 inline __m512 fold_ld(const c10::BFloat16* p) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
FASTPEFT_AVX512 inline __m512 fold_ld(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FASTPEFT_AVX512 inline void fold_st(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
FASTPEFT_AVX512 inline void fold_st(c10::BFloat16* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rnd = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rnd = _mm512_mask_mov_epi32(rnd, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rnd));
}
FASTPEFT_AVX512 inline void fold_st(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <class T>
FASTPEFT_AVX512 void fold_rows4_avx512(const T* w, int64_t ws, const float* A, const float* b, int64_t r,
                                       int64_t in, const float* scale, T* out, float* sq) {
  __m512 ss[4];
  for (int q = 0; q < 4; ++q) ss[q] = _mm512_setzero_ps();
  const int64_t cend = in / 64 * 64;
  for (int64_t c0 = 0; c0 < cend; c0 += 64) {
    __m512 acc[4][4];
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < 4; ++j) acc[q][j] = fold_ld(w + q * ws + c0 + 16 * j);
    for (int64_t k = 0; k < r; ++k) {
      const float* a = A + k * in + c0;
      const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16);
      const __m512 a2 = _mm512_loadu_ps(a + 32), a3 = _mm512_loadu_ps(a + 48);
      for (int q = 0; q < 4; ++q) {
        const __m512 bk = _mm512_set1_ps(b[q * r + k]);
        acc[q][0] = _mm512_fmadd_ps(bk, a0, acc[q][0]);
        acc[q][1] = _mm512_fmadd_ps(bk, a1, acc[q][1]);
        acc[q][2] = _mm512_fmadd_ps(bk, a2, acc[q][2]);
        acc[q][3] = _mm512_fmadd_ps(bk, a3, acc[q][3]);
      }
    }
    for (int q = 0; q < 4; ++q) {
      for (int j = 0; j < 4; ++j) ss[q] = _mm512_fmadd_ps(acc[q][j], acc[q][j], ss[q]);
      if (out != nullptr) {
        const __m512 sc = _mm512_set1_ps(scale[q]);
        for (int j = 0; j < 4; ++j) fold_st(out + q * in + c0 + 16 * j, _mm512_mul_ps(acc[q][j], sc));
      }
    }
  }
  for (int q = 0; q < 4; ++q) sq[q] += _mm512_reduce_add_ps(ss[q]);
}
#undef FASTPEFT_AVX512
#pragma GCC diagnostic pop
#endif

// acc[k0 + k, j] += sum_i p[i, k0 + k] q[i, j] for k < 8 and the columns [j0, j0 + 16 NT) of q,
// with AVX512-BF16 dot products over row pairs: pp[(i / 2) * ps + k] holds the bf16 bits of
// p[i, k] (low half) and p[i + 1, k] (high half; 0 past the last row), and q's rows i, i + 1 are
// interleaved into the matching pairs. An 8 x 16 NT block of fp32 accumulators stays in registers
// (each broadcast of p feeds NT products, each q vector 8). acc has row stride accs.
#if defined(__GNUC__) && defined(__x86_64__)
#define FASTPEFT_HAVE_TN_BF16 1
#define FASTPEFT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

alignas(64) constexpr uint16_t kPairIdx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};

template <int NT>
FASTPEFT_BF16_TARGET void tn_bf16_block(const uint32_t* pp, int64_t ps, int64_t k0, int64_t i0, int64_t i1,
                                        const c10::BFloat16* q, int64_t qs, int64_t j0, float* acc, int64_t accs) {
  const __m512i idx = _mm512_load_si512(reinterpret_cast<const void*>(kPairIdx));
  __m512 a[8][NT];
  for (int k = 0; k < 8; ++k)
    for (int t = 0; t < NT; ++t) a[k][t] = _mm512_loadu_ps(acc + (k0 + k) * accs + j0 + 16 * t);
  for (int64_t i = i0; i < i1; i += 2) {
    const bool pair = i + 1 < i1;
    __m512bh v[NT];
    for (int t = 0; t < NT; ++t) {
      const __m512i lo =
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * qs + j0 + 16 * t)));
      const __m512i hi = pair ? _mm512_castsi256_si512(_mm256_loadu_si256(
                                    reinterpret_cast<const __m256i*>(q + (i + 1) * qs + j0 + 16 * t)))
                              : _mm512_setzero_si512();
      v[t] = (__m512bh)_mm512_permutex2var_epi16(lo, idx, hi);
    }
    const uint32_t* pr = pp + (i / 2) * ps + k0;
    for (int k = 0; k < 8; ++k) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(pr[k]));
      for (int t = 0; t < NT; ++t) a[k][t] = _mm512_dpbf16_ps(a[k][t], v[t], b);
    }
  }
  for (int k = 0; k < 8; ++k)
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(acc + (k0 + k) * accs + j0 + 16 * t, a[k][t]);
}
// The folded weight for bf16 W, A, B: 4 rows x 64 columns per step like fold_rows4_avx512, but
// B A by bf16 dot products over pairs of the rank (A2[(k / 2) * in + c] = A[k, c] | A[k + 1, c] << 16,
// B2[i * rp + k / 2] likewise from B[i, k], B[i, k + 1]; zero past r): half the instructions of the
// fp32 multiply-adds. W' = W + s (B A), the products exact, the sums in fp32.
FASTPEFT_BF16_TARGET void fold_rows4_bf16dp(const c10::BFloat16* w, int64_t ws, const uint32_t* A2,
                                            const uint32_t* B2, int64_t rp, int64_t in, float s, const float* scale,
                                            c10::BFloat16* out, float* sq) {
  __m512 ss[4];
  for (int q = 0; q < 4; ++q) ss[q] = _mm512_setzero_ps();
  const __m512 sv = _mm512_set1_ps(s);
  const int64_t cend = in / 64 * 64;
  for (int64_t c0 = 0; c0 < cend; c0 += 64) {
    __m512 acc[4][4];
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < 4; ++j) acc[q][j] = _mm512_setzero_ps();
    for (int64_t kp = 0; kp < rp; ++kp) {
      const uint32_t* a = A2 + kp * in + c0;
      __m512bh av[4];
      for (int j = 0; j < 4; ++j) av[j] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(a + 16 * j));
      for (int q = 0; q < 4; ++q) {
        const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(B2[q * rp + kp]));
        for (int j = 0; j < 4; ++j) acc[q][j] = _mm512_dpbf16_ps(acc[q][j], av[j], b);
      }
    }
    for (int q = 0; q < 4; ++q) {
      const __m512 sc = _mm512_set1_ps(scale[q]);
      for (int j = 0; j < 4; ++j) {
        const __m512 v = _mm512_fmadd_ps(sv, acc[q][j], fold_ld(w + q * ws + c0 + 16 * j));
        ss[q] = _mm512_fmadd_ps(v, v, ss[q]);
        if (out != nullptr) fold_st(out + q * in + c0 + 16 * j, _mm512_mul_ps(v, sc));
      }
    }
  }
  for (int q = 0; q < 4; ++q) sq[q] += _mm512_reduce_add_ps(ss[q]);
}
#undef FASTPEFT_BF16_TARGET
#endif

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

  // fp32/fp64 (MKL): the whole batch as one block while a [rows, max(in, out)] matrix is at most ~6 MiB (it
  // stays in the L3 between the GEMMs that share it, and MKL loses up to ~20% on a [1024, 512] x [512, 1376]
  // product cut into 381-row blocks), else blocks of ~2 MiB of rows per thread (512 rows at d=1024: 2048 rows
  // unblocked re-read x / g / y / grad_x from memory and cost ~8% over the base; each multi-threaded GEMM call
  // then hands every thread a 1-thread-sized block), folded, since sgemm/dgemm accumulate onto C (beta = 1) at
  // no measurable cost. The rank-r products stay [rows, r] (x A^T, g B): MKL forms A x^T, B^T g^T ~2x faster
  // in isolation at r = 12 (1 thread), but in the layer benchmarks at 2 threads the transposed form measured
  // no faster for LoRA / AdaLoRA and slower with dropout and DoRA.
  // bf16/fp16 (oneDNN): one block, base GEMM first: oneDNN's bf16 GEMM pays ~1 ms (of ~21) for
  // beta = 1 at d=1024, 2048 rows, more than the rank-r GEMM's read-modify-write, and row blocks
  // measured no faster. With a bias the forward folds anyway: the base addmm's own bias broadcast
  // (~1.5 ms for bf16) is replaced by the bias row of the rank-r GEMM, and it runs beta = 1 already.
  // oneDNN forms bf16 x A^T and g B ([2048, 16]) in ~0.70 ms but A x^T and B^T g^T in ~0.42 ms.
  static FusedPlan fused_plan(int64_t in, int64_t out, at::ScalarType t) {
    if (t == at::kFloat || t == at::kDouble) {
      const int64_t bytes = std::max<int64_t>(std::max(in, out), 1) * (t == at::kDouble ? 8 : 4);
      const int64_t per_thread = std::max<int64_t>((int64_t{1} << 21) / bytes, 128);
      const int64_t whole = (int64_t{6} << 20) / bytes;
      return {std::max(per_thread * std::max(1, at::get_num_threads()), whole), true, true, false};
    }
    return {std::numeric_limits<int64_t>::max(), false, true, t == at::kBFloat16};
  }

  static at::Tensor scratch(int slot, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
    return cpu::scratch(slot, rows, cols, opts);
  }

  static at::Tensor saved(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
    return cpu::SavedPool::empty({rows, cols}, opts);
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

// ---- dropout-free LoRA / DoRA with the adapter folded into the weight (CPU) --------------------
//
// Without dropout the rank-r path and the base GEMM see the same input, so x W^T + s (x A^T) B^T is
// x W'^T with W' = W + s B A, and the input gradient g W + s (g B) A is g W'. Forming W' costs
// out * in * r multiply-adds (half a rank-r GEMM over N = 2 out rows) in one pass over W, and
// replaces the rank-r update GEMM of the forward and the rank-r input-gradient GEMM of the backward
// (each N * out * r, plus a read-modify-write of a [N, out] output). DoRA's weight norm is the row
// norm of the same W', and its m/n row scale folds into the backward's W'' = (m/n) W' (so no
// [N, out] g (m/n) is formed). u = x A^T is still computed (grad_B needs it); grad_A, grad_B use
// the same rank-r GEMMs as before. W' is rounded to the input dtype once (bf16/fp16: like a merged
// adapter), the products accumulate in fp32 as before.

inline bool cpu_has_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512_bf16() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// Four rows of the folded weight through the AVX-512 kernel when the CPU and the dtype allow;
// false (nothing done) otherwise.
template <class T, class M>
bool fold_rows4(const T* w, int64_t ws, const M* A, const M* b, int64_t r, int64_t in, const M* scale, T* out,
                M* sq) {
#ifdef FASTPEFT_HAVE_FOLD_AVX512
  if constexpr (std::is_same_v<M, float>) {
    if (!cpu_has_avx512()) return false;
    fold_rows4_avx512(w, ws, A, b, r, in, scale, out, sq);
    return true;
  }
#endif
  return false;
}

// Four bf16 rows of the folded weight through fold_rows4_bf16dp; false (nothing done) for other dtypes.
template <class T, class M>
bool fold_rows4_dp(const T* w, int64_t ws, const uint32_t* A2, const uint32_t* B2, int64_t rp, int64_t in, M s,
                   const M* scale, T* out, M* sq) {
#ifdef FASTPEFT_HAVE_TN_BF16
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    fold_rows4_bf16dp(w, ws, A2, B2, rp, in, s, scale, out, sq);
    return true;
  }
#endif
  return false;
}

// W' = W + s B A, each row times row_scale (when defined), contiguous [out, in] in weight's dtype
// (when want_weight; in scratch slot 1), and ||W'_i||^2 in op math (when sq is not null; before the row scale).
at::Tensor fold_adapter(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                        double scaling, const at::Tensor& row_scale, bool want_weight, at::Tensor* sq) {
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_A.size(0);
  const at::ScalarType op = opmath_of(weight.scalar_type());
  const at::Tensor W = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor A = lora_A.to(op).contiguous();
  const at::Tensor Bs = lora_B.to(op).mul(scaling).contiguous();
  // The folded weight lives in scratch slot 1 (a fresh multi-MiB tensor per call would cost more in
  // page faults than forming it): valid until the caller's next scratch(1) call.
  at::Tensor wout = want_weight ? CpuBackend::scratch(1, out, in, weight.options()) : at::Tensor();
  if (sq != nullptr) *sq = at::empty({out}, weight.options().dtype(op));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "fastpeft_fold_adapter", [&] {
    using M = typename OpMath<scalar_t>::type;
    const scalar_t* wp = W.const_data_ptr<scalar_t>();
    const int64_t ws = W.stride(0);
    const M* ap = A.const_data_ptr<M>();
    const M* bp = Bs.const_data_ptr<M>();
    const M* sp = row_scale.defined() ? row_scale.const_data_ptr<M>() : nullptr;
    scalar_t* op_ = want_weight ? wout.mutable_data_ptr<scalar_t>() : nullptr;
    M* qp = sq != nullptr ? sq->mutable_data_ptr<M>() : nullptr;
    // bf16 with AVX512-BF16: the rank's pairs of A and B as bf16 bits for fold_rows4_bf16dp.
    std::vector<uint32_t> A2, B2;
    const int64_t rp = (r + 1) / 2;
    bool dp = false;
#ifdef FASTPEFT_HAVE_TN_BF16
    if (weight.scalar_type() == at::kBFloat16) {
      dp = in >= 64 && out >= 4 && cpu_has_avx512_bf16();
      if (dp) {
        const at::Tensor Ac = lora_A.contiguous(), Bc = lora_B.contiguous();
        const uint16_t* a16 = reinterpret_cast<const uint16_t*>(Ac.const_data_ptr<c10::BFloat16>());
        const uint16_t* b16 = reinterpret_cast<const uint16_t*>(Bc.const_data_ptr<c10::BFloat16>());
        A2.assign(static_cast<size_t>(rp * in), 0u);
        B2.assign(static_cast<size_t>(out * rp), 0u);
        for (int64_t k = 0; k < r; ++k) {
          const int shift = (k & 1) ? 16 : 0;
          for (int64_t c = 0; c < in; ++c) A2[(k / 2) * in + c] |= static_cast<uint32_t>(a16[k * in + c]) << shift;
          for (int64_t i = 0; i < out; ++i) B2[i * rp + k / 2] |= static_cast<uint32_t>(b16[i * r + k]) << shift;
        }
      }
    }
#endif
    // Rows in groups of 4 (the AVX-512 kernel's step, when the CPU has it), the rest one at a time.
    const int64_t groups = (out + 3) / 4;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(in * std::max<int64_t>(r, 1), 1));
    at::parallel_for(0, groups, grain, [&](int64_t gb, int64_t ge) {
      for (int64_t gi = gb; gi < ge; ++gi) {
        const int64_t i0 = gi * 4, nr = std::min<int64_t>(4, out - i0);
        M sq4[4] = {0, 0, 0, 0};
        M sc4[4];
        for (int64_t q = 0; q < nr; ++q) sc4[q] = sp != nullptr ? sp[i0 + q] : M(1);
        int64_t cdone = 0;
        if (dp && nr == 4 &&
            fold_rows4_dp(wp + i0 * ws, ws, A2.data(), B2.data() + i0 * rp, rp, in, static_cast<M>(scaling), sc4,
                          op_ != nullptr ? op_ + i0 * in : nullptr, sq4)) {
          cdone = in / 64 * 64;
        }
        if (cdone == 0 && nr == 4 && in >= 64 &&
            fold_rows4(wp + i0 * ws, ws, ap, bp + i0 * r, r, in, sc4, op_ != nullptr ? op_ + i0 * in : nullptr, sq4)) {
          cdone = in / 64 * 64;
        }
        for (int64_t q = 0; q < nr; ++q) {
          const int64_t i = i0 + q;
          sq4[q] += fold_row(wp + i * ws, ap, bp + i * r, r, in, cdone, sc4[q], op_ != nullptr ? op_ + i * in : nullptr);
          if (qp != nullptr) qp[i] = sq4[q];
        }
      }
    });
  });
  return wout;
}

// acc[c] += sum_i g[i, c] z[i, c] (contiguous g, z; acc in op math).
void col_dot_rows(const at::Tensor& g, const at::Tensor& z, at::Tensor& acc) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "fastpeft_col_dot", [&] {
    using M = typename OpMath<scalar_t>::type;
    const int64_t rows = g.size(0), cols = g.size(1);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    M* ap = acc.mutable_data_ptr<M>();
    const int64_t grain = std::max<int64_t>(64, cols / std::max(1, at::get_num_threads()));
    at::parallel_for(0, cols, grain, [&](int64_t cb, int64_t ce) {
      for (int64_t i = 0; i < rows; ++i) col_dot(gp + i * cols + cb, zp + i * cols + cb, ce - cb, ap + cb);
    });
  });
}


// acc += a^T b for acc [r, cols] (op math, contiguous), a [rows, r], b [rows, cols]: the AVX512-BF16
// kernel for bf16 with unit column stride in b (~20% faster than oneDNN's bf16 GEMM for these
// [r, rows] x [rows, cols] products at r = 16, and fp32 throughout), else accumulate_tn.
void acc_tn(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
#ifdef FASTPEFT_HAVE_TN_BF16
  const int64_t rows = a.size(0), r = a.size(1), cols = b.size(1);
  if (b.scalar_type() == at::kBFloat16 && b.stride(1) == 1 && acc.is_contiguous() && cols >= 16 && rows > 0 &&
      cpu_has_avx512_bf16()) {
    const int64_t r8 = (r + 7) / 8 * 8, pairs = (rows + 1) / 2;
    std::vector<uint32_t> pp(static_cast<size_t>(pairs * r8), 0u);
    {
      const c10::BFloat16* ap = a.const_data_ptr<c10::BFloat16>();
      const int64_t s0 = a.stride(0), s1 = a.stride(1);
      for (int64_t i = 0; i < rows; ++i) {
        const int shift = (i & 1) ? 16 : 0;
        uint32_t* row = pp.data() + (i / 2) * r8;
        for (int64_t k = 0; k < r; ++k) row[k] |= static_cast<uint32_t>(ap[i * s0 + k * s1].x) << shift;
      }
    }
    at::Tensor pad = r8 == r ? acc : at::zeros({r8, cols}, acc.options());
    float* accp = pad.mutable_data_ptr<float>();
    const c10::BFloat16* qp = b.const_data_ptr<c10::BFloat16>();
    const int64_t qs = b.stride(0);
    const int64_t groups = cols / 48, tiles16 = (cols - groups * 48) / 16;  // 48-column groups, then 16
    const int64_t units = groups + tiles16;
    const int64_t grain = std::max<int64_t>(1, units / std::max(1, at::get_num_threads()));
    at::parallel_for(0, units, grain, [&](int64_t ub, int64_t ue) {
      constexpr int64_t kBlk = 256;  // rows per block (even): 256 x 48 bf16 stay in L1 across the k chunks
      for (int64_t i0 = 0; i0 < rows; i0 += kBlk) {
        const int64_t i1 = std::min(rows, i0 + kBlk);
        for (int64_t u = ub; u < ue; ++u) {
          for (int64_t k0 = 0; k0 < r8; k0 += 8) {
            if (u < groups) {
              tn_bf16_block<3>(pp.data(), r8, k0, i0, i1, qp, qs, u * 48, accp, cols);
            } else {
              tn_bf16_block<1>(pp.data(), r8, k0, i0, i1, qp, qs, groups * 48 + (u - groups) * 16, accp, cols);
            }
          }
        }
      }
    });
    const int64_t c0 = groups * 48 + tiles16 * 16;
    if (c0 < cols) {  // the last cols % 16 columns
      pad.narrow(0, 0, r).narrow(1, c0, cols - c0).add_(
          at::mm(a.t().to(at::kFloat), b.narrow(1, c0, cols - c0).to(at::kFloat)));
    }
    if (r8 != r) acc.add_(pad.narrow(0, 0, r));
    return;
  }
#endif
  accumulate_tn(acc, a, b);
}

// Folding costs out * in * r multiply-adds and saves N * out * r (forward) or N * in * r (backward):
// it pays when the batch has at least as many rows as the dimension the saved GEMM does not share.
// float32 / float64 only: W is exact on the bf16 / fp16 grid, so rounding W + s B A back to it drops every
// delta entry below half an ulp of W (a young adapter vanishes from y and grad_x), while the unfolded path
// adds the adapter's product before the output's single rounding.
inline bool fold_pays(const at::Tensor& x, int64_t other_dim) {
  const at::ScalarType t = x.scalar_type();
  return (t == at::kFloat || t == at::kDouble) && x.size(0) >= other_dim;
}

// y[i, c] += b[c] (contiguous rows).
void add_bias_rows(at::Tensor& y, const at::Tensor& b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "fastpeft_add_bias", [&] {
    const int64_t rows = y.size(0), cols = y.size(1), ys = y.stride(0);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t rb, int64_t re) {
      for (int64_t i = rb; i < re; ++i) bias_row(yp + i * ys, bp, cols);
    });
  });
}

// fp32 / fp64 without dropout: the drivers below (the adapter folded into the weight where that pays, else the
// rank-r update written first and the base GEMM accumulated onto it); bf16 / fp16 and dropout take the shared
// drivers (common/lora_impl.h).
inline bool cpu_lora_path(const at::Tensor& x, double dropout_p) {
  const at::ScalarType t = x.scalar_type();
  return dropout_p == 0.0 && (t == at::kFloat || t == at::kDouble);
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scaling, double dropout_p,
                                                    const at::Tensor& seed) {
  if (!cpu_lora_path(x, dropout_p)) {
    return lora_forward_impl<CpuBackend>(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
  }
  check_lora_args(x, weight, bias, lora_A, lora_B);
  make_dropout(dropout_p, seed);  // checks the seed
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0), r = lora_A.size(0);
  at::Tensor y = at::empty({n, out}, x.options());
  at::Tensor u = at::empty({n, r}, x.options());
  if (n == 0) return {y, u};
  // Per row block: u = x A^T;  folded: y = x W'^T, y += b;  else y = b + s u B^T (a write), y += x W^T (beta = 1).
  const bool fold = fold_pays(x, in);
  const at::Tensor Wf = fold ? fold_adapter(weight, lora_A, lora_B, scaling, at::Tensor(), true, nullptr) : at::Tensor();
  const at::Tensor Bt = fold ? at::Tensor() : lora_B.t().contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const FusedPlan plan = CpuBackend::fused_plan(in, out, x.scalar_type());
  const int64_t ch = std::max<int64_t>(1, std::min(n, plan.rows));
  at::Tensor uT = plan.transposed_rank ? at::empty({r, n}, x.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += ch) {
    const int64_t rows = std::min(ch, n - r0);
    const at::Tensor xb = x.narrow(0, r0, rows);
    at::Tensor ub = u.narrow(0, r0, rows);
    at::Tensor yb = y.narrow(0, r0, rows);
    shrink_block(ub, xb, lora_A, uT, r0, rows);
    if (fold) {
      at::mm_out(yb, xb, Wf.t());
      if (has_bias) add_bias_rows(yb, b);
    } else {
      if (has_bias) {
        at::addmm_out(yb, b, ub, Bt, 1.0, scaling);
      } else {
        mm_alpha_out(yb, ub, Bt, scaling);
      }
      yb.addmm_(xb, weight.t());
    }
  }
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& u, double scaling, double dropout_p, const at::Tensor& seed,
    bool need_grad_x) {
  if (!cpu_lora_path(x, dropout_p)) {
    return lora_backward_impl<CpuBackend>(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed,
                                          need_grad_x);
  }
  check_lora_args(x, weight, std::nullopt, lora_A, lora_B);
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0), r = lora_A.size(0);
  check_rows(grad_y, n, out, x, "grad_y", "out_features (weight.size(0))");
  check_rows(u, n, r, x, "u", "the rank (lora_A.size(0))");
  make_dropout(dropout_p, seed);
  at::Tensor grad_x = need_grad_x ? at::empty({n, in}, x.options()) : at::empty({0}, x.options());
  if (n == 0) return {grad_x, at::zeros({r, in}, x.options()), at::zeros({out, r}, x.options())};
  // Per row block b: gu_b = s g_b B;  grad_B^T += s u_b^T g_b;  folded: grad_x_b = g_b W', else grad_x_b = gu_b A
  // (a write), grad_x_b += g_b W (beta = 1);  grad_A += gu_b^T x_b. (grad_A / grad_B do not depend on the fold.)
  const at::ScalarType op = opmath_of(x.scalar_type());
  const bool fold = need_grad_x && fold_pays(x, out);
  const at::Tensor Wf = fold ? fold_adapter(weight, lora_A, lora_B, scaling, at::Tensor(), true, nullptr) : at::Tensor();
  const FusedPlan plan = CpuBackend::fused_plan(in, out, x.scalar_type());
  at::Tensor gu = plan.transposed_rank ? at::empty({r, n}, x.options()) : at::empty({n, r}, x.options());
  const at::Tensor Bt = plan.transposed_rank ? lora_B.t().contiguous() : at::Tensor();
  at::Tensor accBt = at::zeros({r, out}, x.options().dtype(op));
  at::Tensor accA = at::zeros({r, in}, x.options().dtype(op));
  const int64_t ch = std::max<int64_t>(1, std::min(n, plan.rows));
  for (int64_t r0 = 0; r0 < n; r0 += ch) {
    const int64_t rows = std::min(ch, n - r0);
    const at::Tensor gb = grad_y.narrow(0, r0, rows);
    const at::Tensor xb = x.narrow(0, r0, rows);
    const at::Tensor gub = grad_rank_block(gu, gb, lora_B, Bt, scaling, r0, rows);
    accumulate_tn(accBt, u.narrow(0, r0, rows), gb);  // times s below
    if (need_grad_x) {
      at::Tensor gxb = grad_x.narrow(0, r0, rows);
      if (fold) {
        at::mm_out(gxb, gb, Wf);
      } else {
        at::mm_out(gxb, gub, lora_A);
        gxb.addmm_(gb, weight);
      }
    }
    accumulate_tn(accA, gub, xb);
  }
  return {grad_x, accA.to(x.scalar_type()), accBt.t().mul(scaling).to(x.scalar_type()).contiguous()};
}

at::Tensor dora_weight_norm_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                double scaling) {
  check_dim(weight, 2, "weight");
  check_floating(weight, "weight");
  const int64_t out = weight.size(0), in = weight.size(1);
  check_lora_factors(lora_A, lora_B, weight, "weight", in, "in_features (weight.size(1))", out);
  at::Tensor sq;
  fold_adapter(weight, lora_A, lora_B, scaling, at::Tensor(), false, &sq);
  return sq.clamp_min_(0.0).sqrt_();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
    const at::Tensor& weight_norm, double scaling, double dropout_p, const at::Tensor& seed) {
  if (dropout_p != 0.0 || !fold_pays(x, x.size(1))) {
    return dora_forward_impl<CpuBackend>(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling,
                                         dropout_p, seed);
  }
  check_lora_args(x, weight, bias, lora_A, lora_B);
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0), r = lora_A.size(0);
  check_dora_vectors(magnitude, weight_norm, x, out);
  make_dropout(dropout_p, seed);  // checks the seed
  const at::ScalarType op = opmath_of(x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor mn = magnitude.to(op).div(weight_norm.to(op)).contiguous();  // m / n
  at::Tensor y = at::empty({n, out}, x.options());
  at::Tensor u = at::empty({n, r}, x.options());
  at::Tensor z = saved_rows<CpuBackend>(n, out, x.options());
  if (n == 0) return {y, u, z};
  // Per row block: u = x A^T;  z = x W'^T;  y = (m/n) z + b while z's rows are in cache.
  const at::Tensor Wf = fold_adapter(weight, lora_A, lora_B, scaling, at::Tensor(), true, nullptr);
  const std::optional<at::Tensor> b = has_bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const FusedPlan plan = CpuBackend::fused_plan(in, out, x.scalar_type());
  const int64_t ch = std::max<int64_t>(1, std::min(n, plan.rows));
  at::Tensor uT = plan.transposed_rank ? at::empty({r, n}, x.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += ch) {
    const int64_t rows = std::min(ch, n - r0);
    const at::Tensor xb = x.narrow(0, r0, rows);
    at::Tensor ub = u.narrow(0, r0, rows);
    at::Tensor zb = z.narrow(0, r0, rows);
    at::Tensor yb = y.narrow(0, r0, rows);
    shrink_block(ub, xb, lora_A, uT, r0, rows);
    at::mm_out(zb, xb, Wf.t());
    CpuBackend::dora_epilogue(zb, mn, b, yb);
  }
  return {y, u, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& weight_norm, const at::Tensor& u,
    const at::Tensor& z_in, double scaling, double dropout_p, const at::Tensor& seed, bool need_grad_x) {
  // (The choice does not depend on need_grad_x: grad_A / grad_B must not either.)
  if (dropout_p != 0.0 || !fold_pays(x, weight.size(0))) {
    return dora_backward_impl<CpuBackend>(grad_y_in, x, weight, lora_A, lora_B, magnitude, weight_norm, u, z_in,
                                          scaling, dropout_p, seed, need_grad_x);
  }
  check_lora_args(x, weight, std::nullopt, lora_A, lora_B);
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0), r = lora_A.size(0);
  check_dora_vectors(magnitude, weight_norm, x, out);
  check_rows(grad_y_in, n, out, x, "grad_y", "out_features (weight.size(0))");
  check_rows(u, n, r, x, "u", "the rank (lora_A.size(0))");
  check_rows(z_in, n, out, x, "z", "out_features (weight.size(0))");
  make_dropout(dropout_p, seed);
  const at::ScalarType op = opmath_of(x.scalar_type());
  const at::Tensor g = grad_y_in.contiguous();
  const at::Tensor z = z_in.contiguous();
  at::Tensor nn = weight_norm.to(op);
  at::Tensor mn = magnitude.to(op).div(nn).contiguous();
  at::Tensor mn_col = mn.unsqueeze(1);
  at::Tensor grad_x = need_grad_x ? at::empty({n, in}, x.options()) : at::empty({0}, x.options());
  if (n == 0) {
    return {grad_x, at::zeros({r, in}, x.options()), at::zeros({out, r}, x.options()),
            at::zeros({out}, magnitude.options())};
  }
  // grad_x = g W'' with W'' = (m/n) W';  gu = s g (m/n) B;  grad_B = s (m/n) g^T u;  grad_A = gu^T x;
  // grad_m = sum_i g z / n. Per row block, so each block's g, x and grad_x rows stay in cache.
  at::Tensor Bm = lora_B.to(op).mul(mn_col).to(x.scalar_type());
  const at::Tensor Wf = need_grad_x ? fold_adapter(weight, lora_A, lora_B, scaling, mn, true, nullptr) : at::Tensor();
  at::Tensor acc = at::zeros({out}, x.options().dtype(op));
  const FusedPlan plan = CpuBackend::fused_plan(in, out, x.scalar_type());
  const int64_t ch = std::max<int64_t>(1, std::min(n, plan.rows));
  at::Tensor gu = plan.transposed_rank ? at::empty({r, n}, x.options()) : at::empty({n, r}, x.options());
  const at::Tensor Bmt = plan.transposed_rank ? Bm.t().contiguous() : at::Tensor();
  at::Tensor accBt = at::zeros({r, out}, x.options().dtype(op));
  at::Tensor accA = at::zeros({r, in}, x.options().dtype(op));
  for (int64_t r0 = 0; r0 < n; r0 += ch) {
    const int64_t rows = std::min(ch, n - r0);
    const at::Tensor gb = g.narrow(0, r0, rows);
    col_dot_rows(gb, z.narrow(0, r0, rows), acc);
    const at::Tensor gub = grad_rank_block(gu, gb, Bm, Bmt, scaling, r0, rows);
    acc_tn(accBt, u.narrow(0, r0, rows), gb);
    if (need_grad_x) {
      at::Tensor gxc = grad_x.narrow(0, r0, rows);
      at::mm_out(gxc, gb, Wf);
    }
    acc_tn(accA, gub, x.narrow(0, r0, rows));
  }
  at::Tensor grad_B = accBt.t().mul(mn_col).mul_(scaling).to(x.scalar_type()).contiguous();
  at::Tensor grad_A = accA.to(x.scalar_type());
  at::Tensor grad_m = acc.div_(nn).to(magnitude.scalar_type());
  return {grad_x, grad_A, grad_B, grad_m};
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  using fastpeft::CpuBackend;
  m.impl("seeded_dropout", &fastpeft::seeded_dropout_impl<CpuBackend>);
  m.impl("lora_forward", &fastpeft::lora_forward_cpu);
  m.impl("lora_backward", &fastpeft::lora_backward_cpu);
  m.impl("dora_weight_norm", &fastpeft::dora_weight_norm_cpu);
  m.impl("dora_forward", &fastpeft::dora_forward_cpu);
  m.impl("dora_backward", &fastpeft::dora_backward_cpu);
  m.impl("qlora_forward", &fastpeft::qlora_forward_impl<CpuBackend>);
  m.impl("qlora_backward", &fastpeft::qlora_backward_impl<CpuBackend>);
}
