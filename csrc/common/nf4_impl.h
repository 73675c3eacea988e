// Shared by the nf4-family kernels (csrc/cpu/nf4.cpp, csrc/cuda/nf4.cu): the NF4 codebook, the
// decision bounds, argument checks and the host-side 8-bit lookup table. The formats are
// bitsandbytes 0.50.2's, byte for byte (see python/fastpeft/reference.py for the spec):
//
//   nf4_quantize: x = w.flatten() in fp32; per block of `blocksize` elements
//     full block:    absmax = max|x|;           s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)
//     partial block: absmax = max(max|x|, 1e-38); s = clamp(x / absmax, -1, 1)
//     code = #{ i : bound[i] < s } with bound[i] = (NF4[i] + NF4[i+1]) / 2 in fp32, so an exact
//     tie goes to the lower code; two codes per byte, even element in the HIGH nibble; an odd
//     element count is padded with the code of 0.0 (7).
//   blockwise8_quantize (bitsandbytes' CPU quantizer, used for the double-quant statistics):
//     absmax = max|x| per block (no clamp); a block with absmax 0 is all code 0; otherwise
//     v = clamp(x * (1 / absmax), -1, 1), t = ((v + 1) * 0.5) * 65535 + 0.5 (fp32, no FMA),
//     q = lut[trunc(t)] with lut[i] = #{leading midpoints m_j = 0.5 * (c_j + c_{j+1}) < -1 + 2i/65535}.
//   Dequantisation: code[q] * absmax in fp32, then one rounding to the output dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/checks.h"

namespace fastpeft {
namespace nf4 {

// Calls f(T{}) for the float32 / bfloat16 / float16 element type (dtypes are checked before).
template <class F>
void dispatch_float(at::ScalarType s, F&& f) {
  switch (s) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "fastpeft: unsupported dtype ", s);
  }
}

// bitsandbytes' get_4bit_type("nf4") (already normalised; the values are exact fp32 constants).
constexpr float kCode[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// (kCode[i] + kCode[i + 1]) / 2 rounded to fp32, as torch computes the bucketize bounds.
struct Bounds {
  float v[15];
};
inline const Bounds& bounds() {
  static const Bounds b = [] {
    Bounds r{};
    for (int i = 0; i < 15; ++i) {
      volatile float s = kCode[i] + kCode[i + 1];  // one fp32 rounding, then an exact halving
      r.v[i] = s / 2.0f;
    }
    return r;
  }();
  return b;
}

constexpr float kTinyAbsmax = 1e-38f;  // bitsandbytes' clamp(min=1e-38)
constexpr int kLutSize = 65536;
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kInfBits = 0x7F800000u;  // |x| bits >= this: inf or NaN

inline void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "fastpeft: 'blocksize' must be a power of two in [32, 4096], got ", blocksize);
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "fastpeft: '", name,
              "' must be float32, bfloat16 or float16, got ", s);
}

inline void check_out_dtype(at::ScalarType s) {
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf,
              "fastpeft: 'dtype' must be float32, bfloat16 or float16, got ", s);
}

inline void check_code8(const at::Tensor& code, const char* name = "code") {
  TORCH_CHECK(code.scalar_type() == at::kFloat, "fastpeft: '", name, "' must be float32, got ", code.scalar_type());
  TORCH_CHECK(code.dim() == 1 && code.numel() == 256, "fastpeft: '", name,
              "' must have 256 elements (shape [256]), got shape ", code.sizes());
}

inline void check_uint8(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kByte, "fastpeft: '", name, "' must be uint8, got ", t.scalar_type());
}

inline void check_absmax(const at::Tensor& absmax, int64_t n, int64_t blocksize) {
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "fastpeft: 'absmax' must be float32, got ", absmax.scalar_type());
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == blocks, "fastpeft: 'absmax' has ", absmax.numel(), " elements but ", n,
              " values in blocks of ", blocksize, " need ", blocks);
}

inline int64_t shape_numel(at::IntArrayRef shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK(d >= 0, "fastpeft: 'shape' must not have negative sizes, got ", shape);
  }
  for (int64_t d : shape) {
    if (d == 0) return 0;  // empty, whatever the other sizes
  }
  for (int64_t d : shape) {
    // (an overflowing product would wrap to a small count that a small 'packed' matches)
    TORCH_CHECK(!c10::mul_overflows(n, d, &n) && n < INT64_MAX, "fastpeft: 'shape' ", shape,
                " has more elements than int64 holds");
  }
  return n;
}

// Argument checks shared by the CPU and CUDA drivers; each returns the element count.
inline int64_t check_nf4_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                         at::IntArrayRef shape, at::ScalarType dtype) {
  check_uint8(packed, "packed");
  check_blocksize(blocksize);
  check_out_dtype(dtype);
  check_same_device(absmax, packed, "absmax", "packed");
  const int64_t n = shape_numel(shape);
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "fastpeft: 'packed' has ", packed.numel(), " bytes but 'shape' ",
              shape, " needs ", (n + 1) / 2, " (two 4-bit codes per byte)");
  check_absmax(absmax, n, blocksize);
  return n;
}

inline void check_blockwise8_quantize_args(const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
  check_float_input(x, "x");
  check_code8(code);
  check_blocksize(blocksize);
  check_same_device(code, x, "code", "x");
}

inline int64_t check_blockwise8_dequantize_args(const at::Tensor& q, const at::Tensor& absmax,
                                                const at::Tensor& code, int64_t blocksize, at::ScalarType dtype) {
  check_uint8(q, "q");
  check_code8(code);
  check_blocksize(blocksize);
  check_out_dtype(dtype);
  check_same_device(absmax, q, "absmax", "q");
  check_same_device(code, q, "code", "q");
  const int64_t n = q.numel();
  check_absmax(absmax, n, blocksize);
  return n;
}

// ---- the fused NF4 matmul (nf4_linear, nf4_linear_grad_input, qlora_*) -------------------------

// An NF4 weight W [out, in] as the matmul kernels read it (see registration.cpp for the format).
// `nested` tensors are defined only for a double-quantised state.
struct NF4Weight {
  at::Tensor packed;         // uint8, (out * in + 1) / 2 bytes, contiguous
  at::Tensor absmax;         // float32 [blocks], or uint8 [blocks] when nested
  at::Tensor nested_absmax;  // float32 [ceil(blocks / 256)]
  at::Tensor nested_code;    // float32 [256]
  at::Tensor offset;         // float32, one element
  int64_t blocksize = 64;
  int64_t out = 0;
  int64_t in = 0;
  bool nested() const { return nested_absmax.defined(); }
};

// Checks the quant state against W's shape [out, in] and the device of `ref` (the activation);
// returns the weight with every tensor made contiguous.
inline NF4Weight make_nf4_weight(const at::Tensor& packed, const at::Tensor& absmax,
                                 const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                 int64_t blocksize, int64_t out, int64_t in, const at::Tensor& ref,
                                 const char* ref_name) {
  check_uint8(packed, "packed");
  check_blocksize(blocksize);
  TORCH_CHECK(out >= 0 && in >= 0, "fastpeft: the NF4 weight's shape must be non-negative, got [", out, ", ", in, "]");
  check_same_device(packed, ref, "packed", ref_name);
  check_same_device(absmax, ref, "absmax", ref_name);
  int64_t n = 0;
  TORCH_CHECK(!c10::mul_overflows(out, in, &n) && n < INT64_MAX, "fastpeft: an NF4 weight of shape [", out, ", ", in,
              "] has more elements than int64 holds ('out_features' / 'in_features' from '", ref_name, "')");
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "fastpeft: 'packed' has ", packed.numel(), " bytes but an NF4 weight of shape [",
              out, ", ", in, "] needs ", (n + 1) / 2, " (two 4-bit codes per byte)");
  const bool has_na = nested_absmax.has_value() && nested_absmax->defined();
  const bool has_nc = nested_code.has_value() && nested_code->defined();
  const bool has_off = offset.has_value() && offset->defined();
  TORCH_CHECK(has_na == has_nc && has_nc == has_off,
              "fastpeft: 'nested_absmax', 'nested_code' and 'offset' describe double quantisation: give all three or "
              "none (got ", has_na ? "" : "no ", "nested_absmax, ", has_nc ? "" : "no ", "nested_code, ",
              has_off ? "" : "no ", "offset)");
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  NF4Weight w;
  if (has_na) {
    check_uint8(absmax, "absmax");
    TORCH_CHECK(absmax.numel() == blocks, "fastpeft: 'absmax' has ", absmax.numel(), " codes but ", n,
                " values in blocks of ", blocksize, " need ", blocks);
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat, "fastpeft: 'nested_absmax' must be float32, got ",
                nested_absmax->scalar_type());
    const int64_t nested_blocks = (blocks + 255) / 256;
    TORCH_CHECK(nested_absmax->numel() == nested_blocks, "fastpeft: 'nested_absmax' has ", nested_absmax->numel(),
                " elements but ", blocks, " absmax codes in blocks of 256 need ", nested_blocks);
    check_code8(*nested_code, "nested_code");
    TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == 1,
                "fastpeft: 'offset' must be a one-element float32 tensor, got dtype ", offset->scalar_type(),
                " and shape ", offset->sizes());
    check_same_device(*nested_absmax, ref, "nested_absmax", ref_name);
    check_same_device(*nested_code, ref, "nested_code", ref_name);
    check_same_device(*offset, ref, "offset", ref_name);
    w.nested_absmax = nested_absmax->contiguous();
    w.nested_code = nested_code->contiguous();
    w.offset = offset->contiguous();
  } else {
    check_absmax(absmax, n, blocksize);
  }
  w.packed = packed.contiguous();
  w.absmax = absmax.contiguous();
  w.blocksize = blocksize;
  w.out = out;
  w.in = in;
  return w;
}

// bitsandbytes' build_quantize_lut: lut[i] = index of the first midpoint >= val_i, scanning the
// midpoints in order (the codebook is assumed sorted, as bitsandbytes does).
inline std::vector<uint8_t> build_lut8(const float* code) {
  float mid[255];
  for (int i = 0; i < 255; ++i) {
    volatile float s = code[i] + code[i + 1];
    mid[i] = 0.5f * s;
  }
  std::vector<uint8_t> lut(kLutSize);
  int idx = 0;
  for (int i = 0; i < kLutSize; ++i) {
    volatile float q = (2.0f * static_cast<float>(i)) / static_cast<float>(kLutSize - 1);
    const float val = -1.0f + q;
    while (idx < 255 && mid[idx] < val) ++idx;
    lut[i] = static_cast<uint8_t>(idx);
  }
  return lut;
}

}  // namespace nf4
}  // namespace fastpeft
