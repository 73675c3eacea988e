// NF4 decoding loops shared by the CPU kernel files (csrc/cpu/nf4.cpp, csrc/cpu/nf4_matmul.cpp):
// `table` is the block's 16 values code[k] * absmax, so out = table[code] is the dequantised value.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTPEFT_NF4_AVX512 1
#define FASTPEFT_AVX512 __attribute__((target("avx512f,avx512bw")))
#endif

#include "common/cpu_math.h"

namespace fastpeft::nf4 {

// AVX-512 F+BW kernels are used when the CPU has them and FASTPEFT_NF4_GENERIC=1 is not set (the
// portable loops are then exercised on this machine too).
inline bool use_avx512() {
#ifdef FASTPEFT_NF4_AVX512
  static const bool yes = [] {
    const char* generic = std::getenv("FASTPEFT_NF4_GENERIC");
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           !(generic != nullptr && generic[0] == '1');
  }();
  return yes;
#else
  return false;
#endif
}

// out[2j] = table[hi nibble], out[2j + 1] = table[lo nibble] for j < npairs.
template <class T>
FASTPEFT_INLINE void nf4_deq_impl(const uint8_t* __restrict__ p, int64_t npairs, const float* __restrict__ table,
                                  T* __restrict__ out) {
  for (int64_t j = 0; j < npairs; ++j) {
    const uint8_t b = p[j];
    cpu::st(out[2 * j], table[b >> 4]);
    cpu::st(out[2 * j + 1], table[b & 0xF]);
  }
}

#ifdef FASTPEFT_NF4_AVX512
FASTPEFT_AVX512 FASTPEFT_INLINE void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
FASTPEFT_AVX512 FASTPEFT_INLINE void store16(c10::Half* out, __m512 v) {  // round to nearest even
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
FASTPEFT_AVX512 FASTPEFT_INLINE void store16(c10::BFloat16* out, __m512 v) {  // as st(BFloat16&, float)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
}

// 16 outputs per step from 8 packed bytes (high nibble first): out = table[code].
template <class T>
FASTPEFT_AVX512 void nf4_deq_avx512(const uint8_t* __restrict__ p, int64_t nsteps, const float* __restrict__ table,
                                    T* __restrict__ out) {
  const __m512 tab = _mm512_loadu_ps(table);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t k = 0; k < nsteps; ++k) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * k));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    const __m128i lo = _mm_and_si128(raw, mask);
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
    store16(out + 16 * k, _mm512_permutexvar_ps(idx, tab));
  }
}
#endif

}  // namespace fastpeft::nf4
