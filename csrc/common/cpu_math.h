// Helpers shared by the CPU kernel files: run-time ISA dispatch for the hot loops and loads/stores
// in op-math precision. bf16 is converted with plain integer ops (round to nearest even,
// NaN -> 0x7FC0, exactly c10::BFloat16's rounding) so the loops vectorise.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "common/opmath.h"

// Compiled for AVX-512, AVX2 and the baseline and picked at load time, so the wheel runs on any
// x86-64 CPU without -march=native.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
#define FASTPEFT_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), noinline))
#else
#define FASTPEFT_CLONES
#endif
#define FASTPEFT_INLINE __attribute__((always_inline)) inline

namespace fastpeft::cpu {

using fastpeft::OpMath;

FASTPEFT_INLINE float ld(float v) { return v; }
FASTPEFT_INLINE double ld(double v) { return v; }
FASTPEFT_INLINE float ld(c10::Half v) { return static_cast<float>(v); }
FASTPEFT_INLINE float ld(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
FASTPEFT_INLINE void st(float& o, float f) { o = f; }
FASTPEFT_INLINE void st(double& o, double f) { o = f; }
FASTPEFT_INLINE void st(c10::Half& o, float f) { o = static_cast<c10::Half>(f); }
FASTPEFT_INLINE void st(c10::BFloat16& o, float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  o.x = f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}

}  // namespace fastpeft::cpu
