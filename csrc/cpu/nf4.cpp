// CPU kernels of the nf4 family: NF4 quantise/dequantise and the 8-bit blockwise quantiser used for
// the double-quant statistics, with bitsandbytes 0.50.2's bytes (formulas in common/nf4_impl.h).
//
// Work is split over quantisation blocks with at::parallel_for (blocks never share an output
// byte: every block starts at an even element). The per-block loops are plain C++ written to
// vectorise (absmax as an integer max over |x| bits, the NF4 code as a sum of 15 comparisons) and
// are compiled for AVX-512, AVX2 and the baseline and picked at load time (target_clones), so the
// wheel runs on any x86-64 CPU without -march=native. This file is built with -ffp-contract=off:
// every product and sum is rounded exactly where the reference rounds it (no FMA contraction).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/nf4_cpu_decode.h"
#include "common/nf4_impl.h"

namespace fastpeft {
namespace {

using namespace nf4;

using cpu::ld;
using cpu::st;
FASTPEFT_INLINE uint32_t abs_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u & kAbsMask;
}
FASTPEFT_INLINE float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// ---- per-block loops (contiguous data), one instantiation per dtype ----------------------------

// max |x| as float bits (finite floats order like their bits; >= kInfBits flags inf/NaN).
template <class T>
FASTPEFT_INLINE uint32_t absmax_bits_impl(const T* __restrict__ x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = abs_bits(ld(x[i]));
    m = u > m ? u : m;
  }
  return m;
}

// NF4 codes of n values scaled by `s` (multiply) or `1/s` (divide, the partial block).
template <class T>
FASTPEFT_INLINE void nf4_codes_impl(const T* __restrict__ x, int64_t n, float s, bool divide,
                                    const float* __restrict__ bnd, uint8_t* __restrict__ codes) {
  if (divide) {
    for (int64_t i = 0; i < n; ++i) {
      float v = ld(x[i]) / s;
      v = std::min(std::max(v, -1.0f), 1.0f);
      int c = 0;
      for (int k = 0; k < 15; ++k) c += bnd[k] < v ? 1 : 0;
      codes[i] = static_cast<uint8_t>(c);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      float v = ld(x[i]) * s;
      v = std::min(std::max(v, -1.0f), 1.0f);
      int c = 0;
      for (int k = 0; k < 15; ++k) c += bnd[k] < v ? 1 : 0;
      codes[i] = static_cast<uint8_t>(c);
    }
  }
}

// 8-bit codes: bitsandbytes' LUT quantiser.
template <class T>
FASTPEFT_INLINE void q8_impl(const T* __restrict__ x, int64_t n, float inv, const uint8_t* __restrict__ lut,
                             uint8_t* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {
    float v = ld(x[i]) * inv;
    v = std::min(std::max(v, -1.0f), 1.0f);
    const float t = ((v + 1.0f) * 0.5f) * static_cast<float>(kLutSize - 1) + 0.5f;
    out[i] = lut[static_cast<int32_t>(t)];
  }
}

template <class T>
FASTPEFT_INLINE void deq8_impl(const uint8_t* __restrict__ q, int64_t n, const float* __restrict__ code, float s,
                               T* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) st(out[i], code[q[i]] * s);
}

#define FASTPEFT_STAMP(T)                                                                            \
  FASTPEFT_CLONES uint32_t absmax_bits(const T* x, int64_t n) { return absmax_bits_impl<T>(x, n); } \
  FASTPEFT_CLONES void nf4_codes(const T* x, int64_t n, float s, bool divide, const float* bnd,      \
                                 uint8_t* codes) {                                                   \
    nf4_codes_impl<T>(x, n, s, divide, bnd, codes);                                                  \
  }                                                                                                  \
  FASTPEFT_CLONES void nf4_deq(const uint8_t* p, int64_t npairs, const float* table, T* out) {       \
    nf4_deq_impl<T>(p, npairs, table, out);                                                          \
  }                                                                                                  \
  FASTPEFT_CLONES void q8(const T* x, int64_t n, float inv, const uint8_t* lut, uint8_t* out) {      \
    q8_impl<T>(x, n, inv, lut, out);                                                                 \
  }                                                                                                  \
  FASTPEFT_CLONES void deq8(const uint8_t* q, int64_t n, const float* code, float s, T* out) {       \
    deq8_impl<T>(q, n, code, s, out);                                                                \
  }

FASTPEFT_STAMP(float)
FASTPEFT_STAMP(c10::BFloat16)
FASTPEFT_STAMP(c10::Half)
#undef FASTPEFT_STAMP

FASTPEFT_CLONES void pack_nibbles(const uint8_t* __restrict__ codes, int64_t npairs, uint8_t* __restrict__ out) {
  for (int64_t j = 0; j < npairs; ++j) out[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
}

inline int64_t block_grain(int64_t blocksize) { return std::max<int64_t>(1, 32768 / blocksize); }


void check_finite_flag(const std::atomic<bool>& bad, const char* name) {
  TORCH_CHECK(!bad.load(), "fastpeft: '", name,
              "' contains NaN or infinite values, which blockwise quantisation cannot represent; "
              "fix or clamp them before quantising");
}

// ---- ops ----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& w, int64_t blocksize) {
  check_float_input(w, "w");
  check_blocksize(blocksize);
  const at::Tensor x = w.contiguous();
  const int64_t n = x.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  std::atomic<bool> bad{false};
  const float* bnd = bounds().v;
  uint8_t* pp = packed.mutable_data_ptr<uint8_t>();
  float* ap = absmax.mutable_data_ptr<float>();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      at::parallel_for(0, nblocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
        alignas(64) uint8_t codes[4096 + 1];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t start = b * blocksize;
          const int64_t len = std::min(blocksize, n - start);
          const uint32_t bits = absmax_bits(xp + start, len);
          if (bits >= kInfBits) {
            bad.store(true, std::memory_order_relaxed);
            continue;
          }
          float am = from_bits(bits);
          const bool partial = len < blocksize;
          if (partial) {
            am = std::max(am, kTinyAbsmax);  // stored clamped, values divided (as bitsandbytes)
            nf4_codes(xp + start, len, am, true, bnd, codes);
          } else {
            const float r = 1.0f / std::max(am, kTinyAbsmax);
            nf4_codes(xp + start, len, r, false, bnd, codes);
          }
          ap[b] = am;
          if (len & 1) codes[len] = 7;  // the pad element is 0.0, code 7
          pack_nibbles(codes, (len + 1) / 2, pp + start / 2);
        }
      });
    }
  });
  check_finite_flag(bad, "w");
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t n = check_nf4_dequantize_args(packed, absmax, blocksize, shape, dtype);
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const int64_t nblocks = a.numel();
  const uint8_t* pp = p.const_data_ptr<uint8_t>();
  const float* ap = a.const_data_ptr<float>();
  dispatch_float(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    {
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const bool avx512 = use_avx512();
      at::parallel_for(0, nblocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
        alignas(64) float table[16];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t start = b * blocksize;
          const int64_t len = std::min(blocksize, n - start);
          const float s = ap[b];
          for (int k = 0; k < 16; ++k) table[k] = kCode[k] * s;  // = code[q] * absmax, exactly
#ifdef FASTPEFT_NF4_AVX512
          if (avx512 && len % 16 == 0) {
            nf4_deq_avx512(pp + start / 2, len / 16, table, op + start);
            continue;
          }
#endif
          nf4_deq(pp + start / 2, len / 2, table, op + start);
          if (len & 1) st(op[start + len - 1], table[pp[(start + len - 1) / 2] >> 4]);
        }
      });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_cpu(const at::Tensor& x_in, const at::Tensor& code,
                                                           int64_t blocksize) {
  check_blockwise8_quantize_args(x_in, code, blocksize);
  const at::Tensor x = x_in.contiguous();
  const std::vector<uint8_t> lut = build_lut8(code.contiguous().const_data_ptr<float>());
  const int64_t n = x.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  std::atomic<bool> bad{false};
  uint8_t* qp = q.mutable_data_ptr<uint8_t>();
  float* ap = absmax.mutable_data_ptr<float>();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      at::parallel_for(0, nblocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t start = b * blocksize;
          const int64_t len = std::min(blocksize, n - start);
          const uint32_t bits = absmax_bits(xp + start, len);
          if (bits >= kInfBits) {
            bad.store(true, std::memory_order_relaxed);
            continue;
          }
          const float am = from_bits(bits);
          ap[b] = am;
          if (am == 0.0f) {
            std::memset(qp + start, 0, static_cast<size_t>(len));
            continue;
          }
          q8(xp + start, len, 1.0f / am, lut.data(), qp + start);
        }
      });
    }
  });
  check_finite_flag(bad, "x");
  return {q, absmax};
}

at::Tensor blockwise8_dequantize_cpu(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize, at::ScalarType dtype) {
  const int64_t n = check_blockwise8_dequantize_args(q, absmax, code, blocksize, dtype);
  const at::Tensor qc = q.contiguous();
  const at::Tensor a = absmax.contiguous();
  const at::Tensor c = code.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  const int64_t nblocks = a.numel();
  const uint8_t* qp = qc.const_data_ptr<uint8_t>();
  const float* ap = a.const_data_ptr<float>();
  const float* cp = c.const_data_ptr<float>();
  dispatch_float(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    {
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, nblocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t start = b * blocksize;
          deq8(qp + start, std::min(blocksize, n - start), cp, ap[b], op + start);
        }
      });
    }
  });
  return out;
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("nf4_quantize", &fastpeft::nf4_quantize_cpu);
  m.impl("nf4_dequantize", &fastpeft::nf4_dequantize_cpu);
  m.impl("blockwise8_quantize", &fastpeft::blockwise8_quantize_cpu);
  m.impl("blockwise8_dequantize", &fastpeft::blockwise8_dequantize_cpu);
}
