// Counter-based dropout mask shared by CPU and CUDA kernels (and mirrored bit-for-bit by
// python/fastpeft/reference.py): element (seed, index) is kept iff hash >= threshold(p). Nothing is
// stored; backward regenerates the same bits.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTPEFT_HD __host__ __device__ __forceinline__
#else
#define FASTPEFT_HD inline
#endif

namespace fastpeft {

// A 32-bit integer finaliser with low bias (two multiply-xorshift rounds).
FASTPEFT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Per-(seed, high index word) keys; callers hoist this out of inner loops.
struct DropoutKey {
  uint32_t k1, k2;
};

FASTPEFT_HD DropoutKey dropout_key(uint64_t seed, uint32_t index_hi) {
  DropoutKey k;
  k.k1 = mix32(static_cast<uint32_t>(seed) ^ 0x85ebca6bU);
  k.k2 = mix32(static_cast<uint32_t>(seed >> 32) + index_hi * 0x9e3779b9U + 0x27d4eb2fU);
  return k;
}

FASTPEFT_HD uint32_t dropout_hash(DropoutKey k, uint32_t index_lo) {
  return mix32(mix32(index_lo + k.k1) ^ k.k2);
}

// Kept iff hash >= threshold; threshold = floor(p * 2^32) clamped to 2^32 - 1.
FASTPEFT_HD uint32_t dropout_threshold(double p) {
  double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xffffffffU : static_cast<uint32_t>(t);
}

}  // namespace fastpeft
