// CPU kernels of the orthogonal-family rotations (OFT's block_diag_rotate, BOFT's butterfly_rotate)
// and their backward ops; the argument checks live in common/rotate_impl.h.
//
// The butterfly chain x -> U_0 -> V_0 -> U_1 -> ... -> V_(m-1) -> y alternates gathers through
// index maps (dst[q] = src[g[q]]) and block-diagonal products V_i = U_i blockdiag(rot[i]):
//   g_0 = perm_0^-1,  g_i = perm_(i-1) o perm_i^-1 (two consecutive maps composed into one),
//   g_m = perm_(m-1);
// OFT is the chain with m = 1 and identity maps. Identity maps cost nothing (the products read x
// and write y in place); other maps are copied per token tile, as runs of consecutive indices where
// runs are long (peft's butterfly permutations move runs of b/2), else element by element. Backward
// walks the chain back with the inverse maps:
//   gV = gy gathered through g_m^-1;  per factor: grad_rot[i] += U_i^T gV, gU = gV rot[i]^T,
//   then gathered through g_i^-1;
// the factor inputs U_i are recomputed per token tile from x (nothing but x is saved).
//
// Work is split over threads by token tiles (each thread one contiguous range, its own fp32
// grad_rot partial sums, added in a fixed order at the end: deterministic for a thread count). Per
// tile and block the products are small GEMMs with the leading dimension of x or of the tile
// buffer: AVX-512 register-tiled microkernels (products 12 rows x 32 columns of fp32 accumulators;
// grad_rot sums 24 x 16 with embedded-broadcast FMAs), for bf16 with the CPU's bf16 dot products
// (vdpbf16ps on pair-packed blocks and on row-pair-interleaved tiles, fp32 sums) when it has them
// and b is even; portable loops (compiled for AVX-512, AVX2 and the baseline) otherwise and for
// fp64. fp16 (and bf16 without the pair kernels) is computed from fp32 tiles. FASTPEFT_ROTATE_GENERIC=1 forces the
// portable loops (so tests exercise them on this machine too).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu_math.h"
#include "common/rotate_impl.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTPEFT_ROT_X86 1
#define FASTPEFT_ROT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FASTPEFT_ROT_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
#endif

namespace fastpeft {
namespace {

using c10::BFloat16;
using c10::Half;
using cpu::ld;
using cpu::st;

// ---- instruction-set choice ---------------------------------------------------------------------

enum class Isa { kPortable = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

Isa rotate_isa() {
  static const Isa isa = [] {
    const char* generic = std::getenv("FASTPEFT_ROTATE_GENERIC");
    if (generic != nullptr && generic[0] == '1') return Isa::kPortable;
#ifdef FASTPEFT_ROT_X86
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
      return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
    }
#endif
    return Isa::kPortable;
  }();
  return isa;
}

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// ---- index maps ---------------------------------------------------------------------------------

struct Run {
  int64_t src, dst, len;
};

// dst[q] = src[g[q]] for q < d: the index array, and the same as runs of consecutive source indices
// (copied run by run when runs are long enough: peft's butterfly permutations move runs of b / 2).
struct IndexMap {
  bool identity = true;
  bool by_runs = true;
  std::vector<Run> runs;
  std::vector<int64_t> index;
};

IndexMap make_map(const std::vector<int64_t>& g) {
  IndexMap map;
  const int64_t d = static_cast<int64_t>(g.size());
  for (int64_t q = 0; q < d;) {
    int64_t e = q + 1;
    while (e < d && g[e] == g[e - 1] + 1) ++e;
    map.runs.push_back({g[q], q, e - q});
    if (g[q] != q) map.identity = false;
    q = e;
  }
  map.index = g;
  map.by_runs = static_cast<int64_t>(map.runs.size()) * 4 <= d;  // runs of 4+ on average
  return map;
}

IndexMap identity_map(int64_t d) {
  IndexMap map;
  map.runs.push_back({0, 0, d});
  return map;
}

std::vector<int64_t> inverse_of(const std::vector<int64_t>& p) {
  std::vector<int64_t> inv(p.size());
  for (size_t j = 0; j < p.size(); ++j) inv[p[j]] = static_cast<int64_t>(j);
  return inv;
}

struct ChainMaps {
  std::vector<IndexMap> fwd;  // g_0 .. g_m
  std::vector<IndexMap> bwd;  // g_0^-1 .. g_m^-1
};

// The forward and backward gather maps of the chain; checks every perm row is a permutation.
ChainMaps chain_maps(const at::Tensor& perm, int64_t m, int64_t d) {
  ChainMaps maps;
  if (!perm.defined()) {
    maps.fwd.assign(m + 1, identity_map(d));
    maps.bwd = maps.fwd;
    return maps;
  }
  const int64_t* pp = perm.const_data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> p(m), inv(m);
  for (int64_t i = 0; i < m; ++i) {
    p[i].assign(pp + i * d, pp + (i + 1) * d);
    std::vector<char> seen(d, 0);
    for (int64_t j = 0; j < d; ++j) {
      const int64_t v = p[i][j];
      TORCH_CHECK(v >= 0 && v < d, "fastpeft: 'perm' row ", i, " must be a permutation of 0..", d - 1, ", but holds ",
                  v, " at column ", j);
      TORCH_CHECK(!seen[v], "fastpeft: 'perm' row ", i, " must be a permutation of 0..", d - 1, ", but holds ", v,
                  " twice");
      seen[v] = 1;
    }
    inv[i] = inverse_of(p[i]);
  }
  std::vector<std::vector<int64_t>> g(m + 1);
  g[0] = inv[0];
  for (int64_t i = 1; i < m; ++i) {
    g[i].resize(d);
    for (int64_t q = 0; q < d; ++q) g[i][q] = p[i - 1][inv[i][q]];
  }
  g[m] = p[m - 1];
  for (int64_t i = 0; i <= m; ++i) {
    maps.fwd.push_back(make_map(g[i]));
    maps.bwd.push_back(make_map(inverse_of(g[i])));
  }
  return maps;
}

bool all_identity(const ChainMaps& maps) {
  for (const IndexMap& g : maps.fwd)
    if (!g.identity) return false;
  return true;
}

// dst rows (ldd) = src rows (lds) gathered through `map`, converted to D.
template <class S, class D>
void gather_rows(const S* src, int64_t lds, const IndexMap& map, D* dst, int64_t ldd, int64_t rows) {
  const int64_t d = map.by_runs ? 0 : static_cast<int64_t>(map.index.size());
  const int64_t* idx = map.index.data();
  for (int64_t r = 0; r < rows; ++r) {
    const S* __restrict__ s = src + r * lds;
    D* __restrict__ o = dst + r * ldd;
    if (!map.by_runs) {
      if constexpr (std::is_same_v<S, D>) {
        for (int64_t q = 0; q < d; ++q) o[q] = s[idx[q]];
      } else {
        for (int64_t q = 0; q < d; ++q) st(o[q], ld(s[idx[q]]));
      }
      continue;
    }
    for (const Run& run : map.runs) {
      const S* __restrict__ sr = s + run.src;
      D* __restrict__ orr = o + run.dst;
      if constexpr (std::is_same_v<S, D>) {
        // Fixed sizes become single vector moves (peft's runs are b / 2 long).
        switch (run.len) {
          case 4: std::memcpy(orr, sr, 4 * sizeof(D)); break;
          case 8: std::memcpy(orr, sr, 8 * sizeof(D)); break;
          case 16: std::memcpy(orr, sr, 16 * sizeof(D)); break;
          case 32: std::memcpy(orr, sr, 32 * sizeof(D)); break;
          default:
            if (run.len >= 64) {
              std::memcpy(orr, sr, static_cast<size_t>(run.len) * sizeof(D));
            } else {
              for (int64_t e = 0; e < run.len; ++e) orr[e] = sr[e];
            }
        }
      } else {
        for (int64_t e = 0; e < run.len; ++e) st(orr[e], ld(sr[e]));
      }
    }
  }
}

// ---- portable block kernels ---------------------------------------------------------------------
// dst[r, c] = sum_j u[r, j] w[j, c] (w padded to ldw columns, a multiple of 16);
// acc[j, c] += sum_r u[r, j] g[r, c].

template <class CT, class M, class D>
FASTPEFT_INLINE void rot_portable_impl(const CT* __restrict__ u, int64_t ldu, int64_t rows, const M* __restrict__ w,
                                       int64_t ldw, int64_t b, D* __restrict__ dst, int64_t ldd) {
  constexpr int kC = 16;
  for (int64_t c0 = 0; c0 < b; c0 += kC) {
    const int64_t nc = std::min<int64_t>(kC, b - c0);
    for (int64_t r = 0; r < rows; ++r) {
      M acc[kC] = {};
      const CT* ur = u + r * ldu;
      for (int64_t j = 0; j < b; ++j) {
        const M a = ld(ur[j]);
        const M* wr = w + j * ldw + c0;
        for (int c = 0; c < kC; ++c) acc[c] += a * wr[c];
      }
      for (int64_t c = 0; c < nc; ++c) st(dst[r * ldd + c0 + c], acc[c]);
    }
  }
}

template <class M>
FASTPEFT_INLINE void acc_portable_impl(const M* __restrict__ u, int64_t ldu, const M* __restrict__ g, int64_t ldg,
                                       int64_t rows, int64_t b, M* __restrict__ acc, int64_t ldacc) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < b; ++j) {
      const M a = u[r * ldu + j];
      const M* gr = g + r * ldg;
      M* ar = acc + j * ldacc;
      for (int64_t c = 0; c < b; ++c) ar[c] += a * gr[c];
    }
  }
}

#define FASTPEFT_ROT_STAMP(CT, M, D)                                                                      \
  FASTPEFT_CLONES void rot_portable(const CT* u, int64_t ldu, int64_t rows, const M* w, int64_t ldw, int64_t b, \
                                    D* dst, int64_t ldd) {                                                \
    rot_portable_impl<CT, M, D>(u, ldu, rows, w, ldw, b, dst, ldd);                                      \
  }
FASTPEFT_ROT_STAMP(float, float, float)
FASTPEFT_ROT_STAMP(float, float, BFloat16)
FASTPEFT_ROT_STAMP(float, float, Half)
FASTPEFT_ROT_STAMP(double, double, double)
#undef FASTPEFT_ROT_STAMP
FASTPEFT_CLONES void acc_portable(const float* u, int64_t ldu, const float* g, int64_t ldg, int64_t rows, int64_t b,
                                  float* acc, int64_t ldacc) {
  acc_portable_impl<float>(u, ldu, g, ldg, rows, b, acc, ldacc);
}
FASTPEFT_CLONES void acc_portable(const double* u, int64_t ldu, const double* g, int64_t ldg, int64_t rows, int64_t b,
                                  double* acc, int64_t ldacc) {
  acc_portable_impl<double>(u, ldu, g, ldg, rows, b, acc, ldacc);
}

// ---- AVX-512 block kernels ----------------------------------------------------------------------
#ifdef FASTPEFT_ROT_X86
// GCC 12's AVX-512 shift intrinsics trip -Wuninitialized on their own internal placeholder operand.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// stream: the final output (y, grad_x), written once and read only by the next layer: whole aligned
// lines go out with non-temporal stores (no read-for-ownership of lines that are overwritten whole;
// on this machine the rotations are bound by memory bandwidth at 2 threads).
FASTPEFT_ROT_AVX512 inline bool stream_ok(const void* p, __mmask16 k, uintptr_t align, bool stream) {
  return stream && k == 0xFFFF && (reinterpret_cast<uintptr_t>(p) & (align - 1)) == 0;
}
FASTPEFT_ROT_AVX512 inline void store16(float* p, __m512 v, __mmask16 k, bool stream) {
  if (stream_ok(p, k, 64, stream)) {
    _mm512_stream_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, k, v);
  }
}
// Round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's rounding, as cpu_math.h's st()).
FASTPEFT_ROT_AVX512 inline void store16(BFloat16* p, __m512 v, __mmask16 k, bool stream) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  if (stream_ok(p, k, 32, stream)) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  } else {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(r));
  }
}
FASTPEFT_ROT_AVX512 inline void store16(Half* p, __m512 v, __mmask16 k, bool stream) {
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (stream_ok(p, k, 32, stream)) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
  } else {
    _mm256_mask_storeu_epi16(p, k, h);
  }
}

inline __mmask16 lane_mask(int64_t lanes) {
  return lanes >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << lanes) - 1u);
}

// MR rows x NV vectors of 16 columns: D = u[MR, kdim] w[kdim, 16 NV] (fp32), u's element (r, k) at
// u[r rs + k ks] (rs = ld, ks = 1 for a product; rs = 1, ks = ld for a U^T G sum). kAcc: add to
// dst (fp32) instead of storing. kMaskW: w's last vector is read masked (g rows that end at the
// block, b % 16 != 0); the packed blocks are zero padded and read whole.
template <int MR, int NV, bool kAcc, bool kMaskW, class D>
FASTPEFT_ROT_AVX512 void mk_f32(const float* u, int64_t rs, int64_t ks, const float* w, int64_t ldw, int64_t kdim,
                                D* dst, int64_t ldd, __mmask16 last, bool stream) {
  __m512 acc[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kdim; ++k) {
    __m512 wv[NV];
    for (int v = 0; v + 1 < NV; ++v) wv[v] = _mm512_loadu_ps(w + k * ldw + 16 * v);
    // (A masked load here makes GCC 12 spill the accumulators every iteration: only when needed.)
    if constexpr (kMaskW) {
      wv[NV - 1] = _mm512_maskz_loadu_ps(last, w + k * ldw + 16 * (NV - 1));
    } else {
      wv[NV - 1] = _mm512_loadu_ps(w + k * ldw + 16 * (NV - 1));
    }
    const float* uk = u + k * ks;
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(uk[r * rs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, wv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      const __mmask16 kmask = v == NV - 1 ? last : lane_mask(16);
      if constexpr (kAcc) {
        float* p = dst + r * ldd + 16 * v;
        _mm512_mask_storeu_ps(p, kmask, _mm512_add_ps(_mm512_maskz_loadu_ps(kmask, p), acc[r][v]));
      } else {
        store16(dst + r * ldd + 16 * v, acc[r][v], kmask, stream);
      }
    }
}

// The same with bf16 inputs: w pair-packed [kdim / 2][ldw][2], u pairs broadcast as 32-bit words.
template <int MR, int NV, class D>
FASTPEFT_ROT_AVX512BF16 void mk_rot_bf16(const uint16_t* u, int64_t ldu, const uint16_t* w, int64_t ldw,
                                         int64_t kpairs, D* dst, int64_t ldd, __mmask16 last, bool stream) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t jj = 0; jj < kpairs; ++jj) {
    __m512bh wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(w + (jj * ldw + 16 * v) * 2);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, u + r * ldu + 2 * jj, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, wv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      store16(dst + r * ldd + 16 * v, acc[r][v], v == NV - 1 ? last : lane_mask(16), stream);
}

constexpr int rows_per_tile(int nv) { return nv <= 2 ? 12 : 6; }
// Rows of the fp32 kernel: for the U^T G sums one vector of 16 columns x 24 rows, so each broadcast
// (of consecutive elements of one row) has one use and GCC folds it into the FMA as an embedded
// {1to16} operand, leaving the FP pipes to FMAs (1.5x here); products keep 12 x 32 (their 12
// broadcasts come from 12 rows, often a page apart: fewer rows, fewer pages per step).
constexpr int rows_f32(int nv, bool acc) { return acc ? 24 : rows_per_tile(nv); }

// Full row groups of MR, then one tail call with R = rows % MR (R < MR), unrolled by templates.
template <int NV, bool kAcc, bool kMaskW, class D, int R = 1>
FASTPEFT_ROT_AVX512 void tail_f32(int rem, const float* u, int64_t rs, int64_t ks, const float* w, int64_t ldw,
                                  int64_t kdim, D* dst, int64_t ldd, __mmask16 last, bool stream) {
  if constexpr (R < rows_f32(NV, kAcc)) {
    if (rem == R) return mk_f32<R, NV, kAcc, kMaskW, D>(u, rs, ks, w, ldw, kdim, dst, ldd, last, stream);
    tail_f32<NV, kAcc, kMaskW, D, R + 1>(rem, u, rs, ks, w, ldw, kdim, dst, ldd, last, stream);
  }
}

template <int NV, bool kAcc, bool kMaskW, class D>
FASTPEFT_ROT_AVX512 void cols_f32(const float* u, int64_t rs, int64_t ks, int64_t rows, const float* w, int64_t ldw,
                                  int64_t kdim, D* dst, int64_t ldd, __mmask16 last, bool stream) {
  constexpr int MR = rows_f32(NV, kAcc);
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) mk_f32<MR, NV, kAcc, kMaskW, D>(u + r * rs, rs, ks, w, ldw, kdim, dst + r * ldd, ldd, last, stream);
  if (r < rows)
    tail_f32<NV, kAcc, kMaskW, D>(static_cast<int>(rows - r), u + r * rs, rs, ks, w, ldw, kdim, dst + r * ldd, ldd, last,
                                  stream);
}

// dst[rows, ncols] (=, or += when kAcc) u[rows, kdim] w[kdim, ncols], in column groups of 64 (16
// for the sums, see rows_f32).
template <bool kAcc, bool kMaskW, class D>
FASTPEFT_ROT_AVX512 void gemm_f32(const float* u, int64_t rs, int64_t ks, int64_t rows, const float* w, int64_t ldw,
                                  int64_t kdim, int64_t ncols, D* dst, int64_t ldd, bool stream) {
  if constexpr (kAcc) {
    for (int64_t c0 = 0; c0 < ncols; c0 += 16)
      cols_f32<1, kAcc, kMaskW, D>(u, rs, ks, rows, w + c0, ldw, kdim, dst + c0, ldd,
                                   lane_mask(std::min<int64_t>(16, ncols - c0)), false);
    return;
  }
  for (int64_t c0 = 0; c0 < ncols; c0 += 64) {
    const int64_t nc = std::min<int64_t>(64, ncols - c0);
    const int nv = static_cast<int>((nc + 15) / 16);
    const __mmask16 last = lane_mask(nc - 16 * (nv - 1));
    switch (nv) {
      case 1: cols_f32<1, kAcc, kMaskW, D>(u, rs, ks, rows, w + c0, ldw, kdim, dst + c0, ldd, last, stream); break;
      case 2: cols_f32<2, kAcc, kMaskW, D>(u, rs, ks, rows, w + c0, ldw, kdim, dst + c0, ldd, last, stream); break;
      case 3: cols_f32<3, kAcc, kMaskW, D>(u, rs, ks, rows, w + c0, ldw, kdim, dst + c0, ldd, last, stream); break;
      default: cols_f32<4, kAcc, kMaskW, D>(u, rs, ks, rows, w + c0, ldw, kdim, dst + c0, ldd, last, stream); break;
    }
  }
}

template <class D>
FASTPEFT_ROT_AVX512 void rot_avx512(const float* u, int64_t ldu, int64_t rows, const float* w, int64_t ldw, int64_t b,
                                    D* dst, int64_t ldd, bool stream) {
  gemm_f32<false, false, D>(u, ldu, 1, rows, w, ldw, b, b, dst, ldd, stream);
}

template <int NV, class D, int R = 1>
FASTPEFT_ROT_AVX512BF16 void rot_tail_bf16(int rem, const uint16_t* u, int64_t ldu, const uint16_t* w, int64_t ldw,
                                           int64_t kp, D* dst, int64_t ldd, __mmask16 last, bool stream) {
  if constexpr (R < rows_per_tile(NV)) {
    if (rem == R) return mk_rot_bf16<R, NV, D>(u, ldu, w, ldw, kp, dst, ldd, last, stream);
    rot_tail_bf16<NV, D, R + 1>(rem, u, ldu, w, ldw, kp, dst, ldd, last, stream);
  }
}

template <int NV, class D>
FASTPEFT_ROT_AVX512BF16 void rot_cols_bf16(const uint16_t* u, int64_t ldu, int64_t rows, const uint16_t* w,
                                           int64_t ldw, int64_t kp, D* dst, int64_t ldd, __mmask16 last,
                                           bool stream) {
  constexpr int MR = rows_per_tile(NV);
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) mk_rot_bf16<MR, NV, D>(u + r * ldu, ldu, w, ldw, kp, dst + r * ldd, ldd, last, stream);
  if (r < rows)
    rot_tail_bf16<NV, D>(static_cast<int>(rows - r), u + r * ldu, ldu, w, ldw, kp, dst + r * ldd, ldd, last, stream);
}

// b even; w pair-packed [b / 2][ldw][2].
template <class D>
FASTPEFT_ROT_AVX512BF16 void rot_avx512_bf16(const BFloat16* u, int64_t ldu, int64_t rows, const uint16_t* w,
                                             int64_t ldw, int64_t b, D* dst, int64_t ldd, bool stream) {
  const uint16_t* uu = reinterpret_cast<const uint16_t*>(u);
  const int64_t kp = b / 2;
  for (int64_t c0 = 0; c0 < b; c0 += 64) {
    const int64_t nc = std::min<int64_t>(64, b - c0);
    const int nv = static_cast<int>((nc + 15) / 16);
    const __mmask16 last = lane_mask(nc - 16 * (nv - 1));
    const uint16_t* wc = w + 2 * c0;
    switch (nv) {
      case 1: rot_cols_bf16<1, D>(uu, ldu, rows, wc, ldw, kp, dst + c0, ldd, last, stream); break;
      case 2: rot_cols_bf16<2, D>(uu, ldu, rows, wc, ldw, kp, dst + c0, ldd, last, stream); break;
      case 3: rot_cols_bf16<3, D>(uu, ldu, rows, wc, ldw, kp, dst + c0, ldd, last, stream); break;
      default: rot_cols_bf16<4, D>(uu, ldu, rows, wc, ldw, kp, dst + c0, ldd, last, stream); break;
    }
  }
}

// acc[b, ldacc] += u[rows, b]^T g[rows, b]: the product above with u read transposed (the b rows
// are u's columns, the sum runs over the tile's rows).
FASTPEFT_ROT_AVX512 void acc_avx512(const float* u, int64_t ldu, const float* g, int64_t ldg, int64_t rows, int64_t b,
                                    float* acc, int64_t ldacc) {
  if (b % 16 == 0) {
    gemm_f32<true, false, float>(u, 1, ldu, b, g, ldg, rows, b, acc, ldacc, false);
    return;
  }
  // b % 16 != 0: the block's g columns copied to a zero-padded slab when small (whole-vector loads,
  // see mk_f32's kMaskW), else read masked.
  const int64_t ldp = round_up(b, 16);
  if (rows * ldp > 16384) {
    gemm_f32<true, true, float>(u, 1, ldu, b, g, ldg, rows, b, acc, ldacc, false);
    return;
  }
  thread_local std::vector<float> padded;
  if (static_cast<int64_t>(padded.size()) < rows * ldp) padded.resize(static_cast<size_t>(rows * ldp));
  float* gp = padded.data();
  const __mmask16 tail = lane_mask(b % 16);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t c = 0; c + 16 <= b; c += 16) _mm512_storeu_ps(gp + t * ldp + c, _mm512_loadu_ps(g + t * ldg + c));
    _mm512_storeu_ps(gp + t * ldp + b / 16 * 16, _mm512_maskz_loadu_ps(tail, g + t * ldg + b / 16 * 16));
  }
  gemm_f32<true, false, float>(u, 1, ldu, b, gp, ldp, rows, b, acc, ldacc, false);
}

// Row pairs interleaved for the bf16 dot products: out[(tt ldp + c) 2 + e] = src[(2 tt + e) lds + c],
// zero for c >= b and for the missing partner of an odd last row (ldp a multiple of 32).
FASTPEFT_ROT_AVX512 void interleave_rows_bf16(const uint16_t* src, int64_t lds, int64_t rows, int64_t b, uint16_t* out,
                                              int64_t ldp) {
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int i = 0; i < 32; ++i) {
    lo_idx[i] = static_cast<uint16_t>((i % 2 == 0 ? 0 : 32) + i / 2);
    hi_idx[i] = static_cast<uint16_t>(lo_idx[i] + 16);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t tt = 0; 2 * tt < rows; ++tt) {
    const uint16_t* r0 = src + 2 * tt * lds;
    const bool has1 = 2 * tt + 1 < rows;
    for (int64_t c0 = 0; c0 < ldp; c0 += 32) {
      const int64_t nc = std::clamp<int64_t>(b - c0, 0, 32);
      const __mmask32 k = nc >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << nc) - 1u);
      const __m512i a = _mm512_maskz_loadu_epi16(k, r0 + c0);
      const __m512i c = has1 ? _mm512_maskz_loadu_epi16(k, r0 + lds + c0) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + (tt * ldp + c0) * 2, _mm512_permutex2var_epi16(a, lo, c));
      _mm512_storeu_si512(out + (tt * ldp + c0) * 2 + 32, _mm512_permutex2var_epi16(a, hi, c));
    }
  }
}

// acc[JR, 16 NV] += sum over row pairs of u-pairs . g-pairs (both interleaved, leading dim ldp).
template <int JR, int NV>
FASTPEFT_ROT_AVX512BF16 void mk_acc_bf16(const uint16_t* up, const uint16_t* gp, int64_t ldp, int64_t pairs,
                                         float* acc, int64_t ldacc) {
  __m512 a[JR][NV];
  for (int j = 0; j < JR; ++j)
    for (int v = 0; v < NV; ++v) a[j][v] = _mm512_setzero_ps();
  for (int64_t tt = 0; tt < pairs; ++tt) {
    __m512bh gv[NV];
    for (int v = 0; v < NV; ++v) gv[v] = (__m512bh)_mm512_loadu_si512(gp + (tt * ldp + 16 * v) * 2);
    for (int j = 0; j < JR; ++j) {
      int32_t pr;
      std::memcpy(&pr, up + (tt * ldp + j) * 2, sizeof(pr));
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pr);
      for (int v = 0; v < NV; ++v) a[j][v] = _mm512_dpbf16_ps(a[j][v], x, gv[v]);
    }
  }
  for (int j = 0; j < JR; ++j)
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(acc + j * ldacc + 16 * v, _mm512_add_ps(_mm512_loadu_ps(acc + j * ldacc + 16 * v), a[j][v]));
}

template <int NV, int R = 1>
FASTPEFT_ROT_AVX512BF16 void acc_tail_bf16(int jr, const uint16_t* up, const uint16_t* gp, int64_t ldp, int64_t pairs,
                                           float* acc, int64_t ldacc) {
  if constexpr (R < rows_per_tile(NV)) {
    if (jr == R) return mk_acc_bf16<R, NV>(up, gp, ldp, pairs, acc, ldacc);
    acc_tail_bf16<NV, R + 1>(jr, up, gp, ldp, pairs, acc, ldacc);
  }
}

template <int NV>
FASTPEFT_ROT_AVX512BF16 void acc_cols_bf16(const uint16_t* up, const uint16_t* gp, int64_t ldp, int64_t pairs,
                                           int64_t b, float* acc, int64_t ldacc) {
  constexpr int JR = rows_per_tile(NV);
  int64_t j = 0;
  for (; j + JR <= b; j += JR) mk_acc_bf16<JR, NV>(up + 2 * j, gp, ldp, pairs, acc + j * ldacc, ldacc);
  if (j < b) acc_tail_bf16<NV>(static_cast<int>(b - j), up + 2 * j, gp, ldp, pairs, acc + j * ldacc, ldacc);
}

uint16_t* pair_buffer(int64_t elems) {
  thread_local std::vector<uint16_t> buf;
  if (static_cast<int64_t>(buf.size()) < elems) buf.resize(static_cast<size_t>(elems));
  return buf.data();
}

// acc[b, ldacc] += u[rows, b]^T g[rows, b] with bf16 dot products over pairs of rows.
FASTPEFT_ROT_AVX512BF16 void acc_avx512_bf16(const BFloat16* u, int64_t ldu, const BFloat16* g, int64_t ldg,
                                             int64_t rows, int64_t b, float* acc, int64_t ldacc) {
  const int64_t pairs = (rows + 1) / 2, ldp = round_up(b, 32);
  uint16_t* up = pair_buffer(2 * pairs * ldp * 2);
  uint16_t* gp = up + pairs * ldp * 2;
  interleave_rows_bf16(reinterpret_cast<const uint16_t*>(u), ldu, rows, b, up, ldp);
  interleave_rows_bf16(reinterpret_cast<const uint16_t*>(g), ldg, rows, b, gp, ldp);
  for (int64_t c0 = 0; c0 < b; c0 += 64) {
    const int nv = static_cast<int>((std::min<int64_t>(64, b - c0) + 15) / 16);
    switch (nv) {
      case 1: acc_cols_bf16<1>(up, gp + 2 * c0, ldp, pairs, b, acc + c0, ldacc); break;
      case 2: acc_cols_bf16<2>(up, gp + 2 * c0, ldp, pairs, b, acc + c0, ldacc); break;
      case 3: acc_cols_bf16<3>(up, gp + 2 * c0, ldp, pairs, b, acc + c0, ldacc); break;
      default: acc_cols_bf16<4>(up, gp + 2 * c0, ldp, pairs, b, acc + c0, ldacc); break;
    }
  }
}
#pragma GCC diagnostic pop
#endif  // FASTPEFT_ROT_X86

// ---- per-block dispatch (by the tile's compute type CT) -------------------------------------------

template <class D>
void rot_block(const float* u, int64_t ldu, int64_t rows, const float* w, int64_t ldw, int64_t b, D* dst, int64_t ldd,
               Isa isa, bool stream) {
#ifdef FASTPEFT_ROT_X86
  if (isa != Isa::kPortable) return rot_avx512<D>(u, ldu, rows, w, ldw, b, dst, ldd, stream);
#endif
  rot_portable(u, ldu, rows, w, ldw, b, dst, ldd);
}

inline void rot_block(const double* u, int64_t ldu, int64_t rows, const double* w, int64_t ldw, int64_t b, double* dst,
                      int64_t ldd, Isa, bool) {
  rot_portable(u, ldu, rows, w, ldw, b, dst, ldd);
}

inline void rot_block(const BFloat16* u, int64_t ldu, int64_t rows, const uint16_t* w, int64_t ldw, int64_t b,
                      BFloat16* dst, int64_t ldd, Isa, bool stream) {
#ifdef FASTPEFT_ROT_X86
  rot_avx512_bf16<BFloat16>(u, ldu, rows, w, ldw, b, dst, ldd, stream);
#else
  TORCH_INTERNAL_ASSERT(false, "fastpeft: the bf16 pair kernel needs AVX512-BF16");
#endif
}

inline void acc_block(const float* u, int64_t ldu, const float* g, int64_t ldg, int64_t rows, int64_t b, float* acc,
                      int64_t ldacc, Isa isa) {
#ifdef FASTPEFT_ROT_X86
  if (isa != Isa::kPortable) return acc_avx512(u, ldu, g, ldg, rows, b, acc, ldacc);
#endif
  acc_portable(u, ldu, g, ldg, rows, b, acc, ldacc);
}

inline void acc_block(const double* u, int64_t ldu, const double* g, int64_t ldg, int64_t rows, int64_t b, double* acc,
                      int64_t ldacc, Isa) {
  acc_portable(u, ldu, g, ldg, rows, b, acc, ldacc);
}

// bf16 tiles (only chosen where the CPU has bf16 dot products): pairs of rows interleaved.
inline void acc_block(const BFloat16* u, int64_t ldu, const BFloat16* g, int64_t ldg, int64_t rows, int64_t b,
                      float* acc, int64_t ldacc, Isa) {
#ifdef FASTPEFT_ROT_X86
  acc_avx512_bf16(u, ldu, g, ldg, rows, b, acc, ldacc);
#else
  TORCH_INTERNAL_ASSERT(false, "fastpeft: the bf16 pair kernel needs AVX512-BF16");
#endif
}

// ---- packed blocks --------------------------------------------------------------------------------
// Per factor i and block k (k = 0 only when shared) a [b, ldw] matrix (ldw = b rounded up to 16,
// zero padded): rot[i, k] (forward) or rot[i, k]^T (backward). The bf16 pair kernel's blocks are
// [b / 2, ldw, 2]: element (j, c) at ((j / 2) ldw + c) 2 + j % 2. Both are b * ldw elements a block.

template <class P>
struct Pack {
  std::vector<P> data;
  int64_t ldw = 0, n = 0, block = 0;
  bool shared = false;
  const P* at(int64_t i, int64_t k) const { return data.data() + (i * n + (shared ? 0 : k)) * block; }
};

template <class P, class T>
Pack<P> make_pack(const T* rot, int64_t m, int64_t n, int64_t b, bool transpose) {
  Pack<P> pk;
  pk.ldw = round_up(b, 16);
  pk.n = n;
  pk.block = b * pk.ldw;
  pk.shared = n == 1;
  pk.data.assign(static_cast<size_t>(m * n * pk.block), P(0));
  for (int64_t blk = 0; blk < m * n; ++blk) {
    const T* r = rot + blk * b * b;
    P* o = pk.data.data() + blk * pk.block;
    for (int64_t j = 0; j < b; ++j) {
      for (int64_t c = 0; c < b; ++c) {
        const T v = transpose ? r[c * b + j] : r[j * b + c];
        if constexpr (std::is_same_v<P, uint16_t>) {  // bf16 pairs (only chosen for bf16 x)
          if constexpr (std::is_same_v<T, BFloat16>) o[((j / 2) * pk.ldw + c) * 2 + (j % 2)] = v.x;
        } else {
          o[j * pk.ldw + c] = static_cast<P>(ld(v));
        }
      }
    }
  }
  return pk;
}

// ---- the chain engine -----------------------------------------------------------------------------

template <class T, class CT>
struct Engine {
  using P = std::conditional_t<std::is_same_v<CT, BFloat16>, uint16_t, CT>;   // packed block element
  using M = std::conditional_t<std::is_same_v<CT, double>, double, float>;    // op-math
  static constexpr bool kDirect = std::is_same_v<T, CT>;  // products may read x / grad_y in place

  int64_t d, m, n, b, blocks, tile;
  bool buffered;  // false: every product reads x / grad_y and writes y / grad_x in place
  Isa isa;
  const ChainMaps* maps;
  const Pack<P>* fw = nullptr;  // rot blocks
  const Pack<P>* bw = nullptr;  // rot^T blocks

  template <class D>
  // final: dst is the op's output (y or grad_x), streamed out (see store16).
  void rotate(const CT* u, int64_t ldu, int64_t rows, const Pack<P>& pk, int64_t i, D* dst, int64_t ldd,
              bool final = false) const {
    for (int64_t k = 0; k < blocks; ++k)
      rot_block(u + k * b, ldu, rows, pk.at(i, k), pk.ldw, b, dst + k * b, ldd, isa, final);
  }

  // acc_i [n, b, ldw] += U^T G per block (all slices into block 0 when shared).
  void accumulate(const CT* u, int64_t ldu, const CT* g, int64_t ldg, int64_t rows, M* acc_i, int64_t ldw) const {
    for (int64_t k = 0; k < blocks; ++k)
      acc_block(u + k * b, ldu, g + k * b, ldg, rows, b, acc_i + (n == 1 ? 0 : k) * b * ldw, ldw, isa);
  }

  int64_t buffer_elems() const { return buffered ? (m + 3) * tile * d : 0; }

  void forward_tile(const T* x, int64_t ldx, T* y, int64_t ldy, int64_t rows, CT* buf) const {
    const std::vector<IndexMap>& g = maps->fwd;
    CT* bufs[2] = {buf, buf + tile * d};
    const CT* cur;
    int64_t ldc = d;
    if (kDirect && g[0].identity) {
      cur = reinterpret_cast<const CT*>(x);
      ldc = ldx;
    } else {
      gather_rows(x, ldx, g[0], bufs[0], d, rows);
      cur = bufs[0];
    }
    for (int64_t i = 0; i < m; ++i) {
      const bool last = i == m - 1;
      if (last && g[m].identity) {
        rotate(cur, ldc, rows, *fw, i, y, ldy, true);
        return;
      }
      CT* out = cur == bufs[0] ? bufs[1] : bufs[0];
      rotate(cur, ldc, rows, *fw, i, out, d);
      if (last) {
        gather_rows(out, d, g[m], y, ldy, rows);
        return;
      }
      if (g[i + 1].identity) {
        cur = out;
      } else {
        CT* next = out == bufs[0] ? bufs[1] : bufs[0];
        gather_rows(out, d, g[i + 1], next, d, rows);
        cur = next;
      }
      ldc = d;
    }
  }

  // gx == nullptr: grad_x not wanted; acc == nullptr: grad_rot not wanted ([m, n, b, ldw] otherwise).
  void backward_tile(const T* gy, int64_t ldg, const T* x, int64_t ldx, T* gx, int64_t ldgx, int64_t rows, CT* buf,
                     M* acc, int64_t ldw) const {
    const std::vector<IndexMap>& g = maps->fwd;
    const std::vector<IndexMap>& h = maps->bwd;
    std::vector<const CT*> U(m);
    std::vector<int64_t> ldu(m, d);
    CT* tmp = buf + m * tile * d;
    CT* G[2] = {tmp + tile * d, tmp + 2 * tile * d};
    if (acc != nullptr) {  // recompute the factor inputs U_0 .. U_(m-1)
      if (kDirect && g[0].identity) {
        U[0] = reinterpret_cast<const CT*>(x);
        ldu[0] = ldx;
      } else {
        gather_rows(x, ldx, g[0], buf, d, rows);
        U[0] = buf;
      }
      for (int64_t i = 1; i < m; ++i) {
        CT* ui = buf + i * tile * d;
        if (g[i].identity) {
          rotate(U[i - 1], ldu[i - 1], rows, *fw, i - 1, ui, d);
        } else {
          rotate(U[i - 1], ldu[i - 1], rows, *fw, i - 1, tmp, d);
          gather_rows(tmp, d, g[i], ui, d, rows);
        }
        U[i] = ui;
      }
    }
    const CT* gv;
    int64_t ldv = d;
    if (kDirect && h[m].identity) {
      gv = reinterpret_cast<const CT*>(gy);
      ldv = ldg;
    } else {
      gather_rows(gy, ldg, h[m], G[0], d, rows);
      gv = G[0];
    }
    for (int64_t i = m - 1; i >= 0; --i) {
      if (acc != nullptr) accumulate(U[i], ldu[i], gv, ldv, rows, acc + i * n * b * ldw, ldw);
      if (i == 0 && gx == nullptr) return;
      if (i == 0 && h[0].identity) {
        rotate(gv, ldv, rows, *bw, 0, gx, ldgx, true);
        return;
      }
      CT* out = gv == G[0] ? G[1] : G[0];
      rotate(gv, ldv, rows, *bw, i, out, d);
      if (i == 0) {
        gather_rows(out, d, h[0], gx, ldgx, rows);
        return;
      }
      if (h[i].identity) {
        gv = out;
      } else {
        CT* next = out == G[0] ? G[1] : G[0];
        gather_rows(out, d, h[i], next, d, rows);
        gv = next;
      }
      ldv = d;
    }
  }
};

// Rows per token tile: a multiple of the microkernel's 12 rows, with the tile's buffers (m + 3
// [tile, d] slabs; none when the products read x in place) in ~384 KiB of L2.
int64_t tile_rows(int64_t m, int64_t d, int64_t elem, bool buffered) {
  if (!buffered) return 96;
  const int64_t per_row = std::max<int64_t>((m + 3) * d * elem, 1);
  return std::clamp<int64_t>((int64_t{384} << 10) / per_row / 12 * 12, 12, 96);
}

template <class CT>
CT* tile_buffer(int64_t elems, std::vector<CT>& local) {
  constexpr int64_t kMaxCachedBytes = int64_t{16} << 20;
  if (elems * static_cast<int64_t>(sizeof(CT)) > kMaxCachedBytes) {  // rare huge d: not kept
    local.resize(static_cast<size_t>(elems));
    return local.data();
  }
  thread_local std::vector<CT> cached;
  if (static_cast<int64_t>(cached.size()) < elems) cached.resize(static_cast<size_t>(elems));
  return cached.data();
}

// Orders the thread's non-temporal stores (store16's stream) before the caller reads its output.
inline void stream_fence() {
#ifdef FASTPEFT_ROT_X86
  _mm_sfence();
#endif
}

// Calls f(chunk, r0, r1) for `chunks` contiguous ranges of whole tiles, on the intra-op threads.
template <class F>
int64_t for_tile_chunks(int64_t N, int64_t tile, F&& f, bool run) {
  const int64_t tiles = (N + tile - 1) / tile;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  if (!run) return chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = std::min(N, c * tiles / chunks * tile);
      const int64_t r1 = std::min(N, (c + 1) * tiles / chunks * tile);
      f(c, r0, r1);
    }
  });
  return chunks;
}

template <class T, class CT>
void forward_typed(const at::Tensor& x, const at::Tensor& rot, const ChainMaps& maps, at::Tensor& y, Isa isa) {
  using E = Engine<T, CT>;
  const int64_t N = x.size(0), d = x.size(1), m = rot.size(0), n = rot.size(1), b = rot.size(2);
  const Pack<typename E::P> fw =
      make_pack<typename E::P>(rot.const_data_ptr<T>(), m, n, b, false);
  const bool buffered = m > 1 || !(std::is_same_v<T, CT> && all_identity(maps));
  E e{d, m, n, b, d / b, tile_rows(m, d, sizeof(CT), buffered), buffered, isa, &maps, &fw, nullptr};
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  for_tile_chunks(N, e.tile, [&](int64_t, int64_t r0, int64_t r1) {
    std::vector<CT> local;
    CT* buf = tile_buffer<CT>(e.buffer_elems(), local);
    for (int64_t t = r0; t < r1; t += e.tile)
      e.forward_tile(xp + t * ldx, ldx, yp + t * ldy, ldy, std::min(e.tile, r1 - t), buf);
    stream_fence();
  }, true);
}

template <class T, class CT>
void backward_typed(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& rot, const ChainMaps& maps,
                    at::Tensor& gx, at::Tensor& grot, Isa isa) {
  using E = Engine<T, CT>;
  using M = typename E::M;
  const int64_t N = x.size(0), d = x.size(1), m = rot.size(0), n = rot.size(1), b = rot.size(2);
  const bool need_gx = gx.defined(), need_rot = grot.defined();
  const T* rp = rot.const_data_ptr<T>();
  Pack<typename E::P> fw, bw;
  if (need_rot && m > 1) fw = make_pack<typename E::P>(rp, m, n, b, false);
  if (need_gx || m > 1) bw = make_pack<typename E::P>(rp, m, n, b, true);
  const bool buffered = m > 1 || !(std::is_same_v<T, CT> && all_identity(maps));
  E e{d, m, n, b, d / b, tile_rows(m, d, sizeof(CT), buffered), buffered, isa, &maps, &fw, &bw};
  const int64_t ldw = round_up(b, 16);
  const int64_t chunks = for_tile_chunks(N, e.tile, [](int64_t, int64_t, int64_t) {}, false);
  const int64_t acc_elems = m * n * b * ldw;
  std::vector<M> partial(need_rot ? static_cast<size_t>(chunks * acc_elems) : 0, M(0));
  const T* gyp = gy.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  T* gxp = need_gx ? gx.mutable_data_ptr<T>() : nullptr;
  const int64_t ldg = gy.stride(0), ldx = x.stride(0), ldgx = need_gx ? gx.stride(0) : 0;
  for_tile_chunks(N, e.tile, [&](int64_t c, int64_t r0, int64_t r1) {
    std::vector<CT> local;
    CT* buf = tile_buffer<CT>(e.buffer_elems(), local);
    M* acc = need_rot ? partial.data() + c * acc_elems : nullptr;
    for (int64_t t = r0; t < r1; t += e.tile)
      e.backward_tile(gyp + t * ldg, ldg, xp + t * ldx, ldx, need_gx ? gxp + t * ldgx : nullptr, ldgx,
                      std::min(e.tile, r1 - t), buf, acc, ldw);
    stream_fence();
  }, true);
  if (!need_rot) return;
  // Chunk partial sums added in chunk order; the padding columns dropped.
  M* out = grot.mutable_data_ptr<M>();
  for (int64_t blk = 0; blk < m * n; ++blk)
    for (int64_t j = 0; j < b; ++j)
      for (int64_t col = 0; col < b; ++col) {
        M s = M(0);
        for (int64_t c = 0; c < chunks; ++c) s += partial[c * acc_elems + (blk * b + j) * ldw + col];
        out[(blk * b + j) * b + col] = s;
      }
}

// The tile compute type: bf16 pairs where the CPU has bf16 dot products and b is even, fp32 for
// the other bf16 cases and fp16, fp64 for fp64.
template <class F>
void dispatch_rotate(at::ScalarType t, int64_t b, Isa isa, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kHalf: f(Half{}, float{}); break;
    case at::kBFloat16:
      if (isa == Isa::kAvx512Bf16 && b % 2 == 0) {
        f(BFloat16{}, BFloat16{});
      } else {
        f(BFloat16{}, float{});
      }
      break;
    default: TORCH_CHECK(false, "fastpeft: rotation kernels got dtype ", t);
  }
}

struct CpuRotateBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  static void rotate_forward(const at::Tensor& x, const at::Tensor& rot, const at::Tensor& perm, at::Tensor& y) {
    const ChainMaps maps = chain_maps(perm, rot.size(0), x.size(1));
    const Isa isa = rotate_isa();
    dispatch_rotate(x.scalar_type(), rot.size(2), isa, [&](auto t, auto ct) {
      forward_typed<decltype(t), decltype(ct)>(x, rot, maps, y, isa);
    });
  }

  static void rotate_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& rot, const at::Tensor& perm,
                              at::Tensor& gx, at::Tensor& grot) {
    const ChainMaps maps = chain_maps(perm, rot.size(0), x.size(1));
    const Isa isa = rotate_isa();
    dispatch_rotate(x.scalar_type(), rot.size(2), isa, [&](auto t, auto ct) {
      backward_typed<decltype(t), decltype(ct)>(gy, x, rot, maps, gx, grot, isa);
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  using fastpeft::CpuRotateBackend;
  m.impl("block_diag_rotate", &fastpeft::block_diag_rotate_impl<CpuRotateBackend>);
  m.impl("block_diag_rotate_backward", &fastpeft::block_diag_rotate_backward_impl<CpuRotateBackend>);
  m.impl("butterfly_rotate", &fastpeft::butterfly_rotate_impl<CpuRotateBackend>);
  m.impl("butterfly_rotate_backward", &fastpeft::butterfly_rotate_backward_impl<CpuRotateBackend>);
}
