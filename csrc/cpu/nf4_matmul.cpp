// CPU kernels of the fused NF4 matmul: nf4_linear (y = x W^T + b) and nf4_linear_grad_input
// (grad_x = grad_y W) with W [out, in] in bitsandbytes' NF4 format. W is never dequantised whole.
//
//   few rows (N <= few_rows_limit()): one pass over the packed bytes, threads split the output rows
//     (forward) or the input columns (grad_input, so no cross-thread reduction). With AVX-512 and
//     in % 128 == 0, 64 packed bytes (128 weights) are decoded per step with in-register lookups
//     (vpermw into bf16 codes for bf16 x and vdpbf16ps; vpermps into fp32 codes otherwise); x is
//     re-ordered once per call to match the decoded lanes, and the block absmax is applied once per
//     32 weights to the partial dot products. Other shapes/CPUs: decode a row segment to fp32, then
//     dot/axpy loops.
//   many rows: each thread in turn decodes a band of W (rows for the forward, columns for
//     grad_input, ~1 MiB) into its reused buffer in the compute dtype and runs a one-thread at::mm
//     (oneDNN / MKL) on it, writing that band's columns of the output.
//
// Sums are fp32; bf16 codes (the bf16 gemv) round each NF4 code to bf16 before the product, which
// is the rounding a bf16 matmul of the dequantised weight does anyway. Built with
// -ffp-contract=off so the decoded absmax is exactly the reference's (code * absmax, then + offset).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <vector>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/cpu_scratch.h"
#include "common/nf4_cpu_decode.h"
#include "common/nf4_impl.h"

namespace fastpeft {
namespace {

using namespace nf4;
using cpu::ld;
using cpu::st;

// The float32 absmax of blocks base, base + 1, ...: the state's own, or decoded from a double-
// quantised state (for the whole weight, or per thread for the blocks of its output rows).
struct BlockScale {
  const float* f = nullptr;
  int64_t base = 0;
  FASTPEFT_INLINE float operator()(int64_t b) const { return f[b - base]; }
};

struct View {
  const uint8_t* p;
  BlockScale sc;
  int64_t bs, out, in;
  // double quantisation (nested_code[q[b]] * nested_absmax[b / 256] + offset), else q == nullptr
  const uint8_t* q = nullptr;
  const float* nabs = nullptr;
  const float* ncode = nullptr;
  float off = 0.0f;
};

// out[b - b0] = nested_code[q[b]] * nested_absmax[b / 256] + offset (two fp32 roundings, as the
// reference) for b in [b0, b1).
FASTPEFT_CLONES void decode_absmax_loop(const uint8_t* __restrict__ q, const float* __restrict__ nabs,
                                        const float* __restrict__ ncode, float off, int64_t b0, int64_t b1,
                                        float* __restrict__ out) {
  for (int64_t b = b0; b < b1; ++b) {
    const float v = ncode[q[b]] * nabs[b >> 8];
    out[b - b0] = v + off;
  }
}

#ifdef FASTPEFT_NF4_AVX512
// decode_absmax_loop 16 blocks (one nested block) per step from the first 16-aligned b; returns where
// it stopped (the portable loop does the rest).
FASTPEFT_AVX512 int64_t decode_absmax_avx512(const View& w, int64_t b0, int64_t b1, float* out) {
  int64_t b = std::min(b1, (b0 + 15) & ~int64_t{15});
  decode_absmax_loop(w.q, w.nabs, w.ncode, w.off, b0, b, out);
  // The 256-entry code table lives in 16 registers: eight two-register permutes cover 32 entries
  // each (index bits 0-4), three blend levels pick by bits 5-7 (a gather is ~3x slower on Zen 4).
  __m512 tab[16];
  for (int i = 0; i < 16; ++i) tab[i] = _mm512_loadu_ps(w.ncode + 16 * i);
  const __m512 o = _mm512_set1_ps(w.off);
  for (; b + 16 <= b1; b += 16) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + b)));
    __m512 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm512_permutex2var_ps(tab[2 * i], idx, tab[2 * i + 1]);
    const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    for (int i = 0; i < 4; ++i) r[i] = _mm512_mask_blend_ps(b5, r[2 * i], r[2 * i + 1]);
    for (int i = 0; i < 2; ++i) r[i] = _mm512_mask_blend_ps(b6, r[2 * i], r[2 * i + 1]);
    const __m512 c = _mm512_mask_blend_ps(b7, r[0], r[1]);
    _mm512_storeu_ps(out + (b - b0), _mm512_add_ps(_mm512_mul_ps(c, _mm512_set1_ps(w.nabs[b >> 8])), o));
  }
  return b;
}
#endif

void decode_absmax(const View& w, int64_t b0, int64_t b1, float* out) {
  int64_t b = b0;
#ifdef FASTPEFT_NF4_AVX512
  if (use_avx512()) b = decode_absmax_avx512(w, b0, b1, out);
#endif
  decode_absmax_loop(w.q, w.nabs, w.ncode, w.off, b, b1, out + (b - b0));
}

// f(r0, r1) over [begin, end) in pieces of `step`, handed out one at a time to the intra-op threads:
// on a shared machine a descheduled thread then holds up one piece, not a fixed half of the work.
// The caller's thread-local state (below-autograd dispatch, grad mode) holds on every thread, as
// the pieces may call ATen ops.
template <class F>
void parallel_pieces(int64_t begin, int64_t end, int64_t step, const F& f) {
  const int64_t pieces = (end - begin + step - 1) / step;
  if (pieces <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), pieces);
  const at::ThreadLocalState caller;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard same_state(caller);
    for (int64_t i = next.fetch_add(1); i < pieces; i = next.fetch_add(1)) {
      const int64_t r0 = begin + i * step;
      f(r0, std::min(end, r0 + step));
    }
  });
}

// With `decode_all`, a double-quantised absmax is decoded for every block here (into `absmax_buf`,
// kept alive for the call); otherwise the kernel decodes per thread (View::q is set, sc.f null).
View make_view(const NF4Weight& w, at::Tensor& absmax_buf, bool decode_all) {
  View v{w.packed.const_data_ptr<uint8_t>(), {}, w.blocksize, w.out, w.in};
  if (!w.nested()) {
    v.sc.f = w.absmax.const_data_ptr<float>();
    return v;
  }
  v.q = w.absmax.const_data_ptr<uint8_t>();
  v.nabs = w.nested_absmax.const_data_ptr<float>();
  v.ncode = w.nested_code.const_data_ptr<float>();
  v.off = *w.offset.const_data_ptr<float>();
  if (!decode_all) return v;
  const int64_t blocks = w.absmax.numel();
  absmax_buf = cpu::scratch(3, 1, blocks, w.absmax.options().dtype(at::kFloat));
  float* out = absmax_buf.mutable_data_ptr<float>();
  at::parallel_for(0, blocks, 16384, [&](int64_t b0, int64_t b1) { decode_absmax(v, b0, b1, out + b0); });
  v.sc.f = out;
  return v;
}

// out[i] = W.flat[e0 + i] for i < len, in T (any start parity, any block alignment).
template <class T>
void decode_segment(const View& w, int64_t e0, int64_t len, T* out, bool avx512) {
  alignas(64) float table[16];
  const int64_t end = e0 + len;
  int64_t e = e0;
  while (e < end) {
    const int64_t b = e / w.bs;
    const int64_t piece_end = std::min(end, (b + 1) * w.bs);
    const float s = w.sc(b);
    for (int k = 0; k < 16; ++k) table[k] = kCode[k] * s;
    int64_t i = e;
    if (i & 1) {  // a segment starting mid-byte: its first value is the low nibble
      st(out[i - e0], table[w.p[i >> 1] & 0xF]);
      ++i;
    }
#ifdef FASTPEFT_NF4_AVX512
    if (avx512 && piece_end - i >= 16) {
      const int64_t steps = (piece_end - i) / 16;
      nf4_deq_avx512(w.p + (i >> 1), steps, table, out + (i - e0));
      i += 16 * steps;
    }
#endif
    const int64_t pairs = (piece_end - i) / 2;
    nf4_deq_impl(w.p + (i >> 1), pairs, table, out + (i - e0));
    i += 2 * pairs;
    if (i < piece_end) st(out[i - e0], table[w.p[i >> 1] >> 4]);
    e = piece_end;
  }
}


// ---- portable few-row loops -------------------------------------------------------------------

// Sixteen partial sums so the loop vectorises without reassociation flags.
FASTPEFT_CLONES float dot_f32(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float s[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) s[k] += a[i + k] * b[i + k];
  float r = 0.0f;
  for (; i < n; ++i) r += a[i] * b[i];
  for (int k = 0; k < 16; ++k) r += s[k];
  return r;
}

FASTPEFT_CLONES void axpy_f32(float* __restrict__ acc, float c, const float* __restrict__ w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += c * w[i];
}

// yacc [N, out] = xf [N, in] W^T.
void gemv_generic(const View& w, const float* xf, int64_t N, float* yacc) {
  const bool avx = use_avx512();
  parallel_pieces(0, w.out, 16, [&](int64_t o0, int64_t o1) {
    std::vector<float> row(static_cast<size_t>(w.in));
    for (int64_t o = o0; o < o1; ++o) {
      decode_segment(w, o * w.in, w.in, row.data(), avx);
      for (int64_t n = 0; n < N; ++n) yacc[n * w.out + o] = dot_f32(xf + n * w.in, row.data(), w.in);
    }
  });
}

constexpr int64_t kGradCols = 256;  // grad_input columns per task (portable loop)

// gacc [N, in] = g W with gT [out, N] = g^T in fp32; threads own column ranges.
void grad_input_generic(const View& w, const float* gT, int64_t N, float* gacc) {
  const bool avx = use_avx512();
  const int64_t tasks = (w.in + kGradCols - 1) / kGradCols;
  parallel_pieces(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> seg(kGradCols), acc(static_cast<size_t>(N * kGradCols));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kGradCols, len = std::min(kGradCols, w.in - c0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t o = 0; o < w.out; ++o) {
        decode_segment(w, o * w.in + c0, len, seg.data(), avx);
        for (int64_t n = 0; n < N; ++n) axpy_f32(acc.data() + n * kGradCols, gT[o * N + n], seg.data(), len);
      }
      for (int64_t n = 0; n < N; ++n) std::copy_n(acc.data() + n * kGradCols, len, gacc + n * w.in + c0);
    }
  });
}

// ---- AVX-512 few-row kernels (in % 128 == 0) --------------------------------------------------
//
// One step reads 64 packed bytes = weights e0 .. e0 + 127 of a row. Shifting the bytes right by 4s
// bits (s = 0..7 in 32-bit lanes) and looking up the low 4 bits (vpermps) gives in lane j the
// weight 8j + (s ^ 1); with 16-bit lanes (s = 0..3, vpermw over a 32-entry table that repeats the
// 16 codes, so bit 4 of the index is ignored) lane j holds weight 4j + (s ^ 1). Either way 32-bit
// lane i only ever holds weights of bytes 4i .. 4i + 3, i.e. of the 32-weight quarter i / 4, so
// one vector of per-quarter absmax scales the partial sums of every stream.

constexpr int64_t kChunk = 128;
constexpr int kMaxGradRows = 3;

// x row reordered for the streams above: out[k + s * lanes + j] = x[k + streams * j + (s ^ 1)] for
// every chunk k (lanes = 128 / streams).
template <class O, class I>
void reorder_row(const I* x, int64_t in, int streams, O* out) {
  const int lanes = static_cast<int>(kChunk) / streams;
  for (int64_t k = 0; k < in; k += kChunk)
    for (int s = 0; s < streams; ++s)
      for (int j = 0; j < lanes; ++j) out[k + s * lanes + j] = x[k + streams * j + (s ^ 1)];
}

#ifdef FASTPEFT_NF4_AVX512
#define FASTPEFT_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16,avx512vl")))

bool use_avx512bf16() {
  static const bool yes = use_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// Per-lane absmax of the 128 weights from flat index e0 (e0 % 128 == 0, blocksize >= 32).
FASTPEFT_AVX512 FASTPEFT_INLINE __m512 chunk_scale(const BlockScale& sc, int64_t e0, int64_t bs) {
  const float* f = sc.f + (e0 / bs - sc.base);
  if (bs >= kChunk) return _mm512_set1_ps(*f);
  if (bs == 64) {
    const __m512i half = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(half, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(f)))));
  }
  const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(_mm_loadu_ps(f)));
}

// yacc[n * out + o] = x_n . W_o for NR rows of x reordered (4 streams of bf16), OR output rows at a
// time (each x vector loaded once for all of them).
template <int NR, int OR>
FASTPEFT_AVX512BF16 void gemv_bf16_rows(const View& w, const uint16_t* xs, int64_t o0, int64_t o1, float* yacc) {
  alignas(64) uint16_t codes[32];
  for (int k = 0; k < 32; ++k) codes[k] = c10::BFloat16(kCode[k & 15]).x;
  const __m512i tab = _mm512_load_si512(codes);
  const int64_t in = w.in;
  int64_t o = o0;
  for (; o + OR <= o1; o += OR) {
    __m512 acc[OR][NR];
    for (int r = 0; r < OR; ++r)
      for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += kChunk) {
      __m512bh wv[OR][4];
      __m512 sc[OR];
      for (int r = 0; r < OR; ++r) {
        const __m512i v = _mm512_loadu_si512(w.p + ((o + r) * in + k) / 2);
        wv[r][0] = (__m512bh)_mm512_permutexvar_epi16(v, tab);
        wv[r][1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab);
        wv[r][2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), tab);
        wv[r][3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), tab);
        sc[r] = chunk_scale(w.sc, (o + r) * in + k, w.bs);
      }
      for (int n = 0; n < NR; ++n) {
        const uint16_t* xk = xs + n * in + k;
        __m512 t[OR];
        for (int q = 0; q < 4; ++q) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xk + 32 * q);
          for (int r = 0; r < OR; ++r) t[r] = _mm512_dpbf16_ps(q == 0 ? _mm512_setzero_ps() : t[r], wv[r][q], xv);
        }
        for (int r = 0; r < OR; ++r) acc[r][n] = _mm512_fmadd_ps(t[r], sc[r], acc[r][n]);
      }
    }
    for (int r = 0; r < OR; ++r)
      for (int n = 0; n < NR; ++n) yacc[n * w.out + o + r] = _mm512_reduce_add_ps(acc[r][n]);
  }
  if constexpr (OR > 1) {
    if (o < o1) gemv_bf16_rows<NR, 1>(w, xs, o, o1, yacc);
  }
}

// As gemv_bf16_rows with fp32 x (8 streams of fp32) and exact fp32 codes.
template <int NR>
FASTPEFT_AVX512 void gemv_f32_rows(const View& w, const float* xs, int64_t o0, int64_t o1, float* yacc) {
  const __m512 tab = _mm512_loadu_ps(kCode);
  const int64_t in = w.in;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* p = w.p + o * in / 2;
    __m512 acc[NR];
    for (int n = 0; n < NR; ++n) acc[n] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += kChunk) {
      const __m512i v = _mm512_loadu_si512(p + k / 2);
      __m512 t[NR];
      for (int s = 0; s < 8; ++s) {
        const __m512 ws = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * s), tab);
        for (int n = 0; n < NR; ++n) {
          const __m512 xv = _mm512_loadu_ps(xs + n * in + k + 16 * s);
          t[n] = s == 0 ? _mm512_mul_ps(ws, xv) : _mm512_fmadd_ps(ws, xv, t[n]);
        }
      }
      const __m512 sc = chunk_scale(w.sc, o * in + k, w.bs);
      for (int n = 0; n < NR; ++n) acc[n] = _mm512_fmadd_ps(t[n], sc, acc[n]);
    }
    for (int n = 0; n < NR; ++n) yacc[n * w.out + o] = _mm512_reduce_add_ps(acc[n]);
  }
}

// gacc[n, c : c + 128] = sum_o g[n, o] W[o, c : c + 128] for NR rows (gT [out, N] fp32), the
// 128-column chunk's sums held in registers for the whole pass over o.
template <int NR>
FASTPEFT_AVX512 void grad_chunk_f32(const View& w, const float* gT, int64_t N, int64_t n0, int64_t c, float* gacc) {
  const __m512 tab = _mm512_loadu_ps(kCode);
  const int64_t in = w.in;
  __m512 acc[NR][8];
  for (int n = 0; n < NR; ++n)
    for (int s = 0; s < 8; ++s) acc[n][s] = _mm512_setzero_ps();
  for (int64_t o = 0; o < w.out; ++o) {
    const int64_t e0 = o * in + c;
    const __m512i v = _mm512_loadu_si512(w.p + e0 / 2);
    const __m512 sc = chunk_scale(w.sc, e0, w.bs);
    __m512 coef[NR];
    for (int n = 0; n < NR; ++n) coef[n] = _mm512_mul_ps(sc, _mm512_set1_ps(gT[o * N + n0 + n]));
    for (int s = 0; s < 8; ++s) {
      const __m512 ws = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * s), tab);
      for (int n = 0; n < NR; ++n) acc[n][s] = _mm512_fmadd_ps(ws, coef[n], acc[n][s]);
    }
  }
  alignas(64) float lanes[8][16];
  for (int n = 0; n < NR; ++n) {
    for (int s = 0; s < 8; ++s) _mm512_store_ps(lanes[s], acc[n][s]);
    float* dst = gacc + (n0 + n) * in + c;
    for (int s = 0; s < 8; ++s)
      for (int j = 0; j < 16; ++j) dst[8 * j + (s ^ 1)] = lanes[s][j];
  }
}

// W.flat[e0 : e0 + len] (e0, len multiples of 128) dequantised into out in stream order: out[k +
// 16 s + j] = W.flat[e0 + k + 8 j + (s ^ 1)], i.e. reorder_row(.., 8, ..)'s column order.
template <class T>
FASTPEFT_AVX512 void decode_streams(const View& w, int64_t e0, int64_t len, T* out) {
  const __m512 tab = _mm512_loadu_ps(kCode);
  for (int64_t k = 0; k < len; k += kChunk) {
    const __m512i v = _mm512_loadu_si512(w.p + (e0 + k) / 2);
    const __m512 sc = chunk_scale(w.sc, e0 + k, w.bs);
    for (int s = 0; s < 8; ++s)
      store16(out + k + 16 * s, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * s), tab), sc));
  }
}

// decode_streams for bf16 with the hardware's round-to-nearest-even conversion (two vectors per op).
FASTPEFT_AVX512BF16 void decode_streams_bf16(const View& w, int64_t e0, int64_t len, c10::BFloat16* out) {
  const __m512 tab = _mm512_loadu_ps(kCode);
  for (int64_t k = 0; k < len; k += kChunk) {
    const __m512i v = _mm512_loadu_si512(w.p + (e0 + k) / 2);
    const __m512 sc = chunk_scale(w.sc, e0 + k, w.bs);
    for (int s = 0; s < 8; s += 2) {
      const __m512 a = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * s), tab), sc);
      const __m512 b = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * s + 4), tab), sc);
      _mm512_storeu_si512(out + k + 16 * s, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
  }
}

template <class F>
void dispatch_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}
#endif

bool fast_shape(const View& w) {
  return use_avx512() && w.in % kChunk == 0;
}

// W[o0 : o0 + rows, c0 : c0 + cols] into out [rows, cols], rows split over threads; with
// `streams` (fast_shape, c0 and cols multiples of 128) the columns come in decode_streams' order.
template <class T>
void decode_tile(const View& w, int64_t o0, int64_t rows, int64_t c0, int64_t cols, T* out, bool streams) {
  const bool avx = use_avx512();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  parallel_pieces(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t e0 = (o0 + r) * w.in + c0;
#ifdef FASTPEFT_NF4_AVX512
      if (streams) {
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (use_avx512bf16()) {
            decode_streams_bf16(w, e0, cols, out + r * cols);
            continue;
          }
        }
        decode_streams(w, e0, cols, out + r * cols);
        continue;
      }
#endif
      decode_segment(w, e0, cols, out + r * cols, avx);
    }
  });
}

// out [N, in] = x [N, in] with the columns of every 128-chunk in stream order (or back with `inverse`).
template <class T>
void reorder_columns(const at::Tensor& x, at::Tensor& out, bool inverse) {
  const int64_t N = x.size(0), in = x.size(1);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t os0 = out.stride(0);
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(in, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < in; k += kChunk)
        for (int s = 0; s < 8; ++s)
          for (int j = 0; j < 16; ++j) {
            const int64_t a = k + 16 * s + j, b = k + 8 * j + (s ^ 1);  // stream order <- natural
            if (inverse) {
              op[n * os0 + b] = xp[n * xs0 + a * xs1];
            } else {
              op[n * os0 + a] = xp[n * xs0 + b * xs1];
            }
          }
  });
}


// Rows up to which the one-pass kernels beat decode-a-band + GEMM (measured at d=4096, bf16, one
// thread: forward even at 32 rows, grad_input even at 16); FASTPEFT_NF4_GEMV_ROWS overrides both.
int64_t few_rows_limit(bool grad) {
  static const int64_t env = [] {
    const char* e = std::getenv("FASTPEFT_NF4_GEMV_ROWS");
    return e != nullptr ? std::atoll(e) : int64_t{-1};
  }();
  if (env >= 0) return env;
  return grad ? 16 : 32;
}

// Forward, few rows: yacc [N, out] fp32.
template <class T>
void linear_few_rows(const View& w, const at::Tensor& x, float* yacc) {
  const int64_t N = x.size(0), in = w.in;
  const at::Tensor xc = x.contiguous();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(in, 1));
#ifdef FASTPEFT_NF4_AVX512
  if (fast_shape(w)) {
    // x rows go in groups of up to 4 (bf16; 2 for fp32): more accumulators spill. Each thread runs
    // every group over a few output rows at a time, so those rows' bytes are re-read from L1.
    const bool bf16 = std::is_same_v<T, c10::BFloat16> && use_avx512bf16();
    const int64_t group = bf16 ? 4 : 2;
    std::vector<uint16_t> xs16(bf16 ? static_cast<size_t>(N * in) : 0);
    std::vector<float> xs32(bf16 ? 0 : static_cast<size_t>(N * in));
    if (bf16) {
      const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.const_data_ptr<T>());
      for (int64_t n = 0; n < N; ++n) reorder_row(xp + n * in, in, 4, xs16.data() + n * in);
    } else {
      std::vector<float> xf(static_cast<size_t>(in));
      const T* xp = xc.const_data_ptr<T>();
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t i = 0; i < in; ++i) xf[i] = ld(xp[n * in + i]);
        reorder_row(xf.data(), in, 8, xs32.data() + n * in);
      }
    }
    constexpr int64_t kRowsPerPass = 8;
    parallel_pieces(0, w.out, grain, [&](int64_t o0, int64_t o1) {
      // One parallel region per call: a nested absmax is decoded here, for this thread's rows.
      thread_local std::vector<float> local_absmax;
      View wt = w;
      if (wt.sc.f == nullptr) {
        const int64_t b0 = o0 * in / w.bs, b1 = (o1 * in + w.bs - 1) / w.bs;
        local_absmax.resize(static_cast<size_t>(b1 - b0));
        decode_absmax(w, b0, b1, local_absmax.data());
        wt.sc.f = local_absmax.data();
        wt.sc.base = b0;
      }
      for (int64_t ob = o0; ob < o1; ob += kRowsPerPass) {
        const int64_t oe = std::min(o1, ob + kRowsPerPass);
        for (int64_t n0 = 0; n0 < N; n0 += group) {
          float* yg = yacc + n0 * w.out;
          dispatch_rows(std::min(group, N - n0), [&](auto R) {
            constexpr int nr = decltype(R)::value;
            if (bf16) {
              gemv_bf16_rows<nr, (nr == 1 ? 1 : 2)>(wt, xs16.data() + n0 * in, ob, oe, yg);
            } else if constexpr (nr <= 2) {
              gemv_f32_rows<nr>(wt, xs32.data() + n0 * in, ob, oe, yg);
            }
          });
        }
      }
    });
    return;
  }
#endif
  std::vector<float> xf(static_cast<size_t>(N * in));
  const T* xp = xc.const_data_ptr<T>();
  for (int64_t i = 0; i < N * in; ++i) xf[i] = ld(xp[i]);
  gemv_generic(w, xf.data(), N, yacc);
}

// grad_input, few rows: gacc [N, in] fp32.
template <class T>
void grad_few_rows(const View& w, const at::Tensor& g, float* gacc) {
  const int64_t N = g.size(0), out = w.out;
  const at::Tensor gc = g.contiguous();
  std::vector<float> gT(static_cast<size_t>(out * N));
  const T* gp = gc.const_data_ptr<T>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < out; ++o) gT[o * N + n] = ld(gp[n * out + o]);
#ifdef FASTPEFT_NF4_AVX512
  if (fast_shape(w)) {
    parallel_pieces(0, w.in / kChunk, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t n0 = 0; n0 < N; n0 += kMaxGradRows) {
          switch (std::min<int64_t>(kMaxGradRows, N - n0)) {
            case 1: grad_chunk_f32<1>(w, gT.data(), N, n0, c * kChunk, gacc); break;
            case 2: grad_chunk_f32<2>(w, gT.data(), N, n0, c * kChunk, gacc); break;
            default: grad_chunk_f32<3>(w, gT.data(), N, n0, c * kChunk, gacc); break;
          }
        }
      }
    });
    return;
  }
#endif
  grad_input_generic(w, gT.data(), N, gacc);
}

// Rows (or columns) of W per band of the many-row path, out of `dim`: ~1 MiB of dequantised weights
// (a thread's L2), but small enough that every thread gets at least two bands (a small layer as one
// band would run on one core), and at least 64 so the GEMM keeps a useful width; a multiple of
// `quantum`.
int64_t band_size(int64_t dim, int64_t other_dim, int64_t elem, int64_t quantum) {
  static const int64_t bytes = [] {
    const char* env = std::getenv("FASTPEFT_NF4_BAND_BYTES");
    return env != nullptr ? std::atoll(env) : int64_t{1} << 20;
  }();
  const int64_t by_cache = bytes / std::max<int64_t>(other_dim * elem, 1);
  const int64_t per_thread = (dim + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t b = std::max<int64_t>(64, std::min(by_cache, per_thread));
  return std::min(dim, std::max(quantum, (b + quantum - 1) / quantum * quantum));
}

// ---- ops ----------------------------------------------------------------------------------------

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t out) {
  if (!bias.has_value() || !bias->defined()) return;
  check_dim(*bias, 1, "bias");
  check_same_dtype(*bias, x, "bias", "x");
  check_same_device(*bias, x, "bias", "x");
  check_size(*bias, 0, out, "bias", "out_features");
}

at::Tensor nf4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                          const std::optional<at::Tensor>& bias) {
  check_dim(x, 2, "x");
  check_float_input(x, "x");
  const int64_t N = x.size(0), in = x.size(1);
  const NF4Weight nw =
      make_nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in, x, "x");
  check_bias(bias, x, out_features);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor y = at::empty({N, out_features}, x.options());
  if (N == 0 || out_features == 0) return y;
  if (in == 0) {
    if (has_bias) {
      y.copy_(bias->unsqueeze(0).expand({N, out_features}));
    } else {
      y.zero_();
    }
    return y;
  }
  // The one-pass AVX-512 forward decodes a nested absmax per thread; every other path up front.
  const bool few = N <= few_rows_limit(false);
  at::Tensor absmax_buf;
  const View w = make_view(nw, absmax_buf, !(few && use_avx512() && in % kChunk == 0));
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (few) {
      std::vector<float> yacc(static_cast<size_t>(N * out_features));
      linear_few_rows<T>(w, x, yacc.data());
      T* yp = y.mutable_data_ptr<T>();
      const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
      const T* bp = has_bias ? b.const_data_ptr<T>() : nullptr;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = 0; o < out_features; ++o)
          st(yp[n * out_features + o], yacc[n * out_features + o] + (bp != nullptr ? ld(bp[o]) : 0.0f));
      return;
    }
    // With the fast decode the band's columns (and x's, to match) are in stream order.
    const bool streams = fast_shape(w);
    at::Tensor xs = x;
    if (streams) {
      xs = at::empty({N, in}, x.options());
      reorder_columns<T>(x, xs, false);
    }
    // Each thread takes bands in turn (decode into its own buffer, then a one-thread GEMM into the
    // band's columns of y): one parallel region per call, no barrier per band.
    const int64_t band = band_size(out_features, in, sizeof(T), 16);
    parallel_pieces(0, out_features, band, [&](int64_t o0, int64_t o1) {
      const int64_t rows = o1 - o0;
      at::Tensor tile = cpu::scratch(2, rows, in, x.options());
      decode_tile(w, o0, rows, 0, in, tile.mutable_data_ptr<T>(), streams);
      at::Tensor yb = y.narrow(1, o0, rows);
      if (has_bias) {
        at::addmm_out(yb, bias->narrow(0, o0, rows), xs, tile.t());
      } else {
        at::mm_out(yb, xs, tile.t());
      }
    });
  });
  return y;
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t in_features) {
  check_dim(grad_y, 2, "grad_y");
  check_float_input(grad_y, "grad_y");
  const int64_t N = grad_y.size(0), out = grad_y.size(1);
  const NF4Weight nw = make_nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, out,
                                       in_features, grad_y, "grad_y");
  if (N == 0 || in_features == 0) return at::empty({N, in_features}, grad_y.options());
  if (out == 0) return at::zeros({N, in_features}, grad_y.options());
  at::Tensor gx = at::empty({N, in_features}, grad_y.options());
  at::Tensor absmax_buf;
  const View w = make_view(nw, absmax_buf, true);
  dispatch_float(grad_y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (N <= few_rows_limit(true)) {
      std::vector<float> gacc(static_cast<size_t>(N * in_features));
      grad_few_rows<T>(w, grad_y, gacc.data());
      T* gp = gx.mutable_data_ptr<T>();
      for (int64_t i = 0; i < N * in_features; ++i) st(gp[i], gacc[i]);
      return;
    }
    // Column bands: each GEMM sums over all of out in fp32 (row bands would round grad_x per band).
    // With the fast decode the band's columns come in stream order: the GEMM writes a stream-order
    // grad_x, put back in natural order at the end.
    const bool streams = fast_shape(w);
    at::Tensor gs = streams ? at::empty({N, in_features}, grad_y.options()) : gx;
    const int64_t band = band_size(in_features, out, sizeof(T), streams ? kChunk : 16);
    parallel_pieces(0, in_features, band, [&](int64_t c0, int64_t c1) {  // as in nf4_linear_cpu
      const int64_t cols = c1 - c0;
      at::Tensor tile = cpu::scratch(2, out, cols, grad_y.options());
      decode_tile(w, 0, out, c0, cols, tile.mutable_data_ptr<T>(), streams);
      at::Tensor gb = gs.narrow(1, c0, cols);
      at::mm_out(gb, grad_y, tile);
    });
    if (streams) reorder_columns<T>(gs, gx, true);
  });
  return gx;
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("nf4_linear", &fastpeft::nf4_linear_cpu);
  m.impl("nf4_linear_grad_input", &fastpeft::nf4_linear_grad_input_cpu);
}
