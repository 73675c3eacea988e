// CUDA kernels of the fused NF4 dequant-matmul (nf4_linear, nf4_linear_grad_input; schemas and the
// weight format in registration.cpp, argument checks in common/nf4_impl.h).
//
// The NF4 weight W [out, in] is bitsandbytes' row-major flat array: element e = o * in + i sits in
// byte e / 2 (even e in the HIGH nibble) and block e / blocksize. A row may start mid-byte (odd in)
// and anywhere inside a block. Every kernel here reads W in "groups": 8 consecutive columns
// [c, c + 8) of one row with c a multiple of 8. A group's 8 nibbles span at most two aligned
// 32-bit words (word e / 8 and the next one); the words are byte-swapped so that element order is
// MSB first, then a funnel shift by 4 * (e % 8) bits lines the group up. The group spans at most
// two quantisation blocks (blocksize >= 32 > 8). A weight is code * absmax in fp32; products
// accumulate in fp32. Where a kernel feeds W to cuBLAS or the tensor cores, the decoded weight is
// rounded once to the compute dtype T (x's dtype), as the schema says; the CUDA-core gemv instead
// accumulates absmax * sum_j code_j x_j in fp32 (the weight is not rounded to T: within T's
// rounding of the reference, and no instruction spent on it).
//
// Paths:
//   nf4_linear, N <= kGemvMaxRows (16) rows:
//     - 2-byte T and N > kMmaMinRows (4): tensor-core gemv (nf4_gemv_mma_kernel, mma.sync m16n8k16,
//       16 rows of W per warp decoded straight into A fragments, x from shared memory as B);
//       FASTPEFT_NF4_MMA=0 in the environment turns it off;
//     - otherwise the CUDA-core gemv (nf4_gemv_kernel). Grid (k-splits, row tiles); a block stages
//       the x tile [NR, KT] (T, zero padded) in shared memory, each warp takes RPW rows at a time and
//       each lane one group per row per step (8 weights, FMAs against NR rows of x), then a
//       warp-shuffle sum. For 1-2 rows of x (memory-bound) a lane first issues the loads of U groups
//       (packed words, absmax) and only then decodes them, to keep several loads in flight.
//     Both: with one k-split the epilogue (bias, cast) is in the kernel; otherwise fp32 partials
//     [splits, N, out] and a deterministic reduction kernel (fixed split order) finish y.
//   nf4_linear, more rows:  bands of W's rows dequantised into a T scratch (<= kBandBytes) and
//     cuBLAS (at::addmm_out / at::mm_out) writes y[:, band] on the current stream.
//   nf4_linear_grad_input, N <= kGemvMaxRows:  gemv^T kernel, at most 8 rows of grad_y per launch.
//     Grid (column tiles of 256, splits of out). Each lane owns a group of 8 columns; the 8 warps of a
//     block take interleaved rows of the block's out-range, accumulate fp32 [NR][8] in registers,
//     and sum across warps in shared memory; fp32 partials [splits, N, in] reduced as above.
//   nf4_linear_grad_input, more rows:  bands of W's COLUMNS dequantised into a T scratch
//     [out, band] and grad_x[:, band] = grad_y . scratch (at::mm_out): no accumulation across bands.
// Everything runs on torch's current stream with no host synchronisation (CUDA-graph capturable).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <optional>

#include "common/checks.h"
#include "common/nf4_impl.h"

namespace fastpeft {
namespace {

using namespace nf4;

constexpr int kThreads = 256;  // 8 warps; every kernel here assumes it
constexpr int kWarps = kThreads / 32;
constexpr int64_t kGemvMaxRows = 16;             // rows of x (grad_y) handled by the gemv kernels
constexpr int kGemvTMaxRows = 8;                 // rows per gemv^T launch
constexpr int64_t kMmaMinRows = 4;               // 2-byte dtypes: the tensor-core gemv above this
constexpr int64_t kGemvSmemBytes = 32 * 1024;    // x tile budget (static limit is 48 KiB)
constexpr int64_t kBandBytes = 32LL * 1024 * 1024;  // dequantised scratch per band
constexpr int64_t kMaxGridY = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The NF4 codebook for the device; each block copies it to a 16-entry shared table.
__constant__ float kCodeDev[16] = {kCode[0],  kCode[1],  kCode[2],  kCode[3],  kCode[4],  kCode[5],
                                   kCode[6],  kCode[7],  kCode[8],  kCode[9],  kCode[10], kCode[11],
                                   kCode[12], kCode[13], kCode[14], kCode[15]};

int sm_count(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  n = std::max(n, 1);
  if (device >= 0 && device < 64) cache[device] = n;
  return n;
}

// ---- device helpers -------------------------------------------------------------------------------

// What a kernel needs to read W: the packed bytes and the per-block absmax (plain or double quant).
struct WeightView {
  const uint8_t* packed;     // 4-byte aligned (the host copies it otherwise)
  int64_t nbytes;            // (out * in + 1) / 2
  const float* absmax;       // plain absmax, or nullptr when nested
  const uint8_t* absmax_q;   // double quant: 8-bit codes
  const float* nested_code;  // [256]
  const float* nested_absmax;  // [ceil(blocks / 256)]
  const float* offset;       // one element, read on the device
  int64_t nblocks;
  int log2_bs;
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_f(c10::Half v) { return static_cast<float>(v); }

// One rounding to T and back (the compute dtype's value of a decoded weight).
template <class T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}
template <>
__device__ __forceinline__ float round_to<float>(float v) {
  return v;
}

// 32-bit word `wi` of the packed bytes (little endian); bytes past the end read as 0.
__device__ __forceinline__ uint32_t load_word(const WeightView& w, int64_t wi) {
  if ((wi + 1) * 4 <= w.nbytes) return __ldg(reinterpret_cast<const uint32_t*>(w.packed) + wi);
  uint32_t v = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t b = wi * 4 + i;
    if (b < w.nbytes) v |= static_cast<uint32_t>(w.packed[b]) << (8 * i);
  }
  return v;
}

// Codebook value of nibble j (0 = MSB) of v, read from the 16-entry shared table: the nibble is
// extracted already scaled by 4 (a byte offset), so the lookup is one shared load.
__device__ __forceinline__ float lut_at(const float* lut, uint32_t v, int j) {
  const uint32_t off = j < 7 ? (v >> (26 - 4 * j)) & 0x3Cu : (v << 2) & 0x3Cu;
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(lut) + off);
}

// A group's raw loads (phase 1 of a decode): the two packed words, the block's absmax (or, double
// quantised, its 8-bit code and nested absmax), and those of the next block when the group straddles
// one. Every condition here depends on indices only, so a caller can issue the loads of several
// groups back to back before using any of them.
struct GroupRaw {
  uint32_t w0, w1;  // packed words e / 8 and e / 8 + 1 (w1 only when ph != 0)
  float m0, m1;     // absmax, or nested absmax when double quantised (m1: next block)
  uint32_t q0, q1;  // 8-bit absmax codes when double quantised
  int ph;           // e % 8
  int split;        // elements of the group before the next block (8: none)
  bool has1;        // the next block's values were loaded
};

__device__ __forceinline__ void load_raw(const WeightView& w, int64_t e, GroupRaw& r) {
  const int64_t wi = e >> 3;
  r.ph = static_cast<int>(e & 7);
  r.w0 = load_word(w, wi);
  r.w1 = r.ph != 0 ? load_word(w, wi + 1) : 0u;
  const int64_t b = e >> w.log2_bs;
  r.split = static_cast<int>(std::min<int64_t>(8, ((b + 1) << w.log2_bs) - e));
  r.has1 = r.split < 8 && b + 1 < w.nblocks;
  r.m1 = 0.0f;
  r.q0 = r.q1 = 0u;
  if (w.absmax != nullptr) {
    r.m0 = __ldg(w.absmax + b);
    if (r.has1) r.m1 = __ldg(w.absmax + b + 1);
  } else {
    r.q0 = __ldg(w.absmax_q + b);
    r.m0 = __ldg(w.nested_absmax + (b >> 8));
    if (r.has1) {
      r.q1 = __ldg(w.absmax_q + b + 1);
      r.m1 = __ldg(w.nested_absmax + ((b + 1) >> 8));
    }
  }
}

// Phase 2: elements [e, e + 8) as c[j] * scale (the return value): c[j] the codebook values and
// scale the block's absmax; when the group straddles two blocks, c[j] already holds code * absmax
// (rounded in fp32, as the plain decode) and scale = 1. Elements j >= valid give c[j] = 0.
// `tab` is the shared table: [0, 16) the NF4 codebook, [16, 272) the nested 8-bit codebook.
// Double quant: absmax = nested_code[q] * nested_absmax + offset (blockwise8_dequantize, then the
// offset, each rounded in fp32 as float_absmax() does).
__device__ __forceinline__ float finish_raw(const GroupRaw& r, const float* __restrict__ tab, bool nested, float off,
                                            int valid, float (&c)[8]) {
  const uint32_t b0 = __byte_perm(r.w0, 0u, 0x0123);  // MSB nibble = first element
  uint32_t v = b0;
  if (r.ph != 0) v = __funnelshift_l(__byte_perm(r.w1, 0u, 0x0123), b0, 4 * r.ph);  // top 32 bits of (b0:b1) << 4 ph
  const float a0 = nested ? __fadd_rn(__fmul_rn(tab[16 + r.q0], r.m0), off) : r.m0;
#pragma unroll
  for (int j = 0; j < 8; ++j) c[j] = j < valid ? lut_at(tab, v, j) : 0.0f;
  if (r.split >= 8) return a0;
  const float a1 = !r.has1 ? a0 : nested ? __fadd_rn(__fmul_rn(tab[16 + r.q1], r.m1), off) : r.m1;
#pragma unroll
  for (int j = 0; j < 8; ++j) c[j] = __fmul_rn(c[j], j < r.split ? a0 : a1);
  return 1.0f;
}

// Both phases for one group.
__device__ __forceinline__ float decode_codes(const WeightView& w, const float* __restrict__ tab, int64_t e, int valid,
                                              float off, float (&c)[8]) {
  GroupRaw r;
  load_raw(w, e, r);
  return finish_raw(r, tab, w.absmax == nullptr, off, valid, c);
}

// Every kernel's shared table: the NF4 codebook, then the nested codebook when double quantised.
constexpr int kTableSize = 16 + 256;
__device__ __forceinline__ void stage_tables(float* tab, const WeightView& w) {
  for (int i = threadIdx.x; i < kTableSize; i += blockDim.x)
    tab[i] = i < 16 ? kCodeDev[i] : (w.nested_code != nullptr ? __ldg(w.nested_code + (i - 16)) : 0.0f);
}

// The 8 decoded weights code * absmax (fp32, one rounding) rounded to T; elements j >= valid are 0.
template <class T>
__device__ __forceinline__ void decode_group(const WeightView& w, const float* __restrict__ lut, int64_t e,
                                             int valid, float off, float (&out)[8]) {
  float c[8];
  const float s = decode_codes(w, lut, e, valid, off, c);
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = round_to<T>(__fmul_rn(c[j], s));
}

// 8 consecutive T from shared memory (16-byte aligned for 2-byte T, 32-byte for float) as float.
template <class T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t r[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      v[2 * i] = __uint_as_float(r[i] << 16);
      v[2 * i + 1] = __uint_as_float(r[i] & 0xFFFF0000u);
    } else {
      v[2 * i] = to_f(c10::Half(static_cast<unsigned short>(r[i] & 0xFFFFu), c10::Half::from_bits()));
      v[2 * i + 1] = to_f(c10::Half(static_cast<unsigned short>(r[i] >> 16), c10::Half::from_bits()));
    }
  }
}
template <>
__device__ __forceinline__ void load8<float>(const float* p, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// Stages rows [0, NROWS) x columns [k0, k0 + KT) of x (contiguous [N, in]) into shared memory
// (row stride `stride` elements), zeros past N rows or klen columns. With x_vec (x 16-byte aligned
// and in a multiple of 16 / sizeof(T) elements) in 16-byte loads, else element by element.
template <class T, int NROWS>
__device__ __forceinline__ void stage_x(T* xs, int stride, const T* __restrict__ x, int64_t N, int64_t in, int64_t k0,
                                        int KT, int klen, bool x_vec) {
  if (x_vec) {
    constexpr int V = 16 / sizeof(T);
    const int per_row = KT / V;  // KT is a multiple of 64
#pragma unroll 4
    for (int i = threadIdx.x; i < NROWS * per_row; i += kThreads) {
      const int n = i / per_row;
      const int k = (i - n * per_row) * V;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (n < N && k < klen) v = __ldg(reinterpret_cast<const uint4*>(x + n * in + k0 + k));
      *reinterpret_cast<uint4*>(xs + n * stride + k) = v;
    }
  } else {
#pragma unroll 4
    for (int i = threadIdx.x; i < NROWS * KT; i += kThreads) {
      const int n = i / KT;
      const int k = i - n * KT;
      xs[n * stride + k] = (n < N && k < klen) ? x[n * in + k0 + k] : T(0.0f);
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- kernels ----------------------------------------------------------------------------------------

// acc[r][n] += a[r] * sum_j c[r][j] x[n][j] for one group: x from shared memory (xs: the group's
// first column of row 0, rows `stride` apart).
template <class T, int NR, int RPW>
__device__ __forceinline__ void group_fma(const T* xs, int stride, const float (&c)[RPW][8], const float (&a)[RPW],
                                          float (&acc)[RPW][NR]) {
#pragma unroll
  for (int n = 0; n < NR; ++n) {
    float xv[8];
    load8<T>(xs + n * stride, xv);
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      float s = c[r][0] * xv[0];
#pragma unroll
      for (int j = 1; j < 8; ++j) s = fmaf(c[r][j], xv[j], s);
      acc[r][n] = fmaf(a[r], s, acc[r][n]);
    }
  }
}

// y = x W^T (+ bias): see the file comment. NR >= N rows of x; KT (multiple of 256) columns per
// k-split; each warp owns RPW consecutive rows of W per row tile (tile = kWarps * RPW rows) and reads
// a column group of x from shared memory once for all RPW rows. The weights are accumulated as
// absmax * sum_j code_j x_j (fp32), i.e. not rounded to T first.
template <class T, int NR, int RPW>
__global__ void __launch_bounds__(kThreads, 2) nf4_gemv_kernel(const T* __restrict__ x, int64_t N, int64_t out,
                                                            int64_t in, int KT, bool x_vec, WeightView w,
                                                            const T* __restrict__ bias, T* __restrict__ y,
                                                            float* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float lut[kTableSize];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * KT;
  const int klen = static_cast<int>(std::min<int64_t>(KT, in - k0));
  stage_tables(lut, w);
  stage_x<T, NR>(xs, KT, x, N, in, k0, KT, klen, x_vec);
  __syncthreads();
  const float off = w.offset != nullptr ? __ldg(w.offset) : 0.0f;
  const bool nested = w.absmax == nullptr;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int ngroups = (klen + 7) >> 3;
  const bool direct = gridDim.x == 1;
  constexpr int64_t kTileRows = static_cast<int64_t>(kWarps) * RPW;
  for (int64_t tile = blockIdx.y; tile * kTileRows < out; tile += gridDim.y) {
    const int64_t o0 = tile * kTileRows + static_cast<int64_t>(warp) * RPW;
    if (o0 >= out) continue;  // warp-uniform; no barrier below
    const int nrows = static_cast<int>(std::min<int64_t>(RPW, out - o0));
    float acc[RPW][NR];
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
      for (int n = 0; n < NR; ++n) acc[r][n] = 0.0f;
    // U groups per lane per step: all their loads first (phase 1), then decode and FMAs, so that
    // few-row (memory-bound) calls keep several loads in flight per lane.
    // (More rows of x: compute-bound, one group at a time keeps the registers for the FMAs.)
    constexpr int U = NR == 1 ? 4 : (NR == 2 ? 2 : 1);
    if constexpr (U == 1) {
      for (int g = lane; g < ngroups; g += 32) {
        const int col = g << 3;
        float c[RPW][8] = {};  // rows past `out` stay 0
        float a[RPW] = {};
#pragma unroll
        for (int r = 0; r < RPW; ++r)
          if (r < nrows) a[r] = decode_codes(w, lut, (o0 + r) * in + k0 + col, klen - col, off, c[r]);
        group_fma<T, NR, RPW>(xs + col, KT, c, a, acc);
      }
    } else {
      for (int g0 = lane; g0 < ngroups; g0 += 32 * U) {
        GroupRaw raw[U][RPW];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int g = g0 + 32 * u;
#pragma unroll
          for (int r = 0; r < RPW; ++r)
            if (g < ngroups && r < nrows) load_raw(w, (o0 + r) * in + k0 + (g << 3), raw[u][r]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int g = g0 + 32 * u;
          if (g >= ngroups) break;
          const int col = g << 3;
          float c[RPW][8] = {};
          float a[RPW] = {};
#pragma unroll
          for (int r = 0; r < RPW; ++r)
            if (r < nrows) a[r] = finish_raw(raw[u][r], lut, nested, off, klen - col, c[r]);
          group_fma<T, NR, RPW>(xs + col, KT, c, a, acc);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
#pragma unroll
      for (int n = 0; n < NR; ++n) acc[r][n] = warp_sum(acc[r][n]);
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int64_t o = o0 + r;
#pragma unroll
      for (int n = 0; n < NR; ++n) {
        if (lane == (r * NR + n) % 32 && n < N && r < nrows) {
          if (direct) {
            const float b = bias != nullptr ? to_f(bias[o]) : 0.0f;
            y[n * out + o] = static_cast<T>(acc[r][n] + b);
          } else {
            partial[(static_cast<int64_t>(blockIdx.x) * N + n) * out + o] = acc[r][n];
          }
        }
      }
    }
  }
}

// Tensor-core variant of the gemv for 2-byte T and 5..16 rows of x: mma.sync m16n8k16 (fp32
// accumulators) with A = 16 rows of W decoded in registers and B = NB blocks of 8 rows of x from
// shared memory. Block: 8 warps = 4 row groups of 16 rows x 2 k-halves (interleaved 64-column steps,
// summed through shared memory at the end). Within a step, lane (g = lane / 4, t = lane % 4) decodes
// columns [16 t, 16 t + 16) of rows g and g + 8; the k-th mma of the step takes that lane's columns
// 16 t + 4 k .. + 3 as its logical k = {2t, 2t+1, 2t+8, 2t+9} for A and B alike (a permutation of
// the 16 columns within the mma, which leaves the dot products unchanged). Decoded weights are
// rounded to T (the tensor cores' input), products accumulate in fp32.
constexpr int kMmaTileRows = 64;
constexpr int kMmaStep = 64;

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(static_cast<T>(lo).x) | (static_cast<uint32_t>(static_cast<T>(hi).x) << 16);
}

template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 16 weights of row o, tile-local columns [col, col + 16), as 8 packed pairs of T (zeros past the
// tile's valid columns or past the last row).
template <class T>
__device__ __forceinline__ void decode16_packed(const WeightView& w, const float* lut, int64_t o, int64_t out,
                                                int64_t row_base, int col, int klen, float off, uint32_t (&p)[8]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int c = col + 8 * h;
    float v[8];
    if (o < out && c < klen) {
      float cv[8];
      const float s = decode_codes(w, lut, row_base + c, klen - c, off, cv);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = __fmul_rn(cv[j], s);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) p[4 * h + j] = pack2<T>(v[2 * j], v[2 * j + 1]);
  }
}

template <class T, int NB>
__global__ void __launch_bounds__(kThreads) nf4_gemv_mma_kernel(const T* __restrict__ x, int64_t N, int64_t out,
                                                                int64_t in, int KT, bool x_vec, WeightView w,
                                                                const T* __restrict__ bias, T* __restrict__ y,
                                                                float* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float lut[kTableSize];
  __shared__ float red[4][NB * 4][32];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int KTP = KT + 8;  // padded row: conflict-free 16-byte fragment loads
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * KT;
  const int klen = static_cast<int>(std::min<int64_t>(KT, in - k0));
  stage_tables(lut, w);
  stage_x<T, NB * 8>(xs, KTP, x, N, in, k0, KT, klen, x_vec);
  __syncthreads();
  const float off = w.offset != nullptr ? __ldg(w.offset) : 0.0f;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int rg = warp & 3;   // row group
  const int kh = warp >> 2;  // k-half
  const int g = lane >> 2;
  const int t = lane & 3;
  const int steps = (klen + kMmaStep - 1) / kMmaStep;
  const bool direct = gridDim.x == 1;
  for (int64_t tile = blockIdx.y; tile * kMmaTileRows < out; tile += gridDim.y) {
    const int64_t o0 = tile * kMmaTileRows + rg * 16;
    float acc[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nb][i] = 0.0f;
    if (o0 < out) {
      const int64_t ra = o0 + g, rb = o0 + g + 8;
      for (int s = kh; s < steps; s += 2) {
        const int col = s * kMmaStep + 16 * t;
        uint32_t wa[8], wb[8];
        decode16_packed<T>(w, lut, ra, out, ra * in + k0, col, klen, off, wa);
        decode16_packed<T>(w, lut, rb, out, rb * in + k0, col, klen, off, wb);
        uint32_t xw[NB][8];
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          const uint4* src = reinterpret_cast<const uint4*>(xs + (nb * 8 + g) * KTP + col);
          const uint4 u0 = src[0], u1 = src[1];
          xw[nb][0] = u0.x, xw[nb][1] = u0.y, xw[nb][2] = u0.z, xw[nb][3] = u0.w;
          xw[nb][4] = u1.x, xw[nb][5] = u1.y, xw[nb][6] = u1.z, xw[nb][7] = u1.w;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const uint32_t a[4] = {wa[2 * q], wb[2 * q], wa[2 * q + 1], wb[2 * q + 1]};
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) mma16816<T>(acc[nb], a, xw[nb][2 * q], xw[nb][2 * q + 1]);
        }
      }
    }
    if (kh == 1) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[rg][nb * 4 + i][lane] = acc[nb][i];
    }
    __syncthreads();
    if (kh == 0 && o0 < out) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float v = acc[nb][i] + red[rg][nb * 4 + i][lane];
          const int64_t o = o0 + g + (i >= 2 ? 8 : 0);
          const int n = nb * 8 + 2 * t + (i & 1);
          if (o < out && n < N) {
            if (direct) {
              const float b = bias != nullptr ? to_f(bias[o]) : 0.0f;
              y[n * out + o] = static_cast<T>(v + b);
            } else {
              partial[(static_cast<int64_t>(blockIdx.x) * N + n) * out + o] = v;
            }
          }
        }
      }
    }
    __syncthreads();
  }
}

// out[n, m] = sum_s partial[s, n, m] (+ bias[m]), summed in split order (deterministic).
template <class T>
__global__ void splitk_reduce_kernel(const float* __restrict__ partial, int splits, int64_t N, int64_t M,
                                     const T* __restrict__ bias, T* __restrict__ out) {
  const int64_t total = N * M;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int k = 0; k < splits; ++k) s += partial[k * total + i];
    if (bias != nullptr) s += to_f(bias[i % M]);
    out[i] = static_cast<T>(s);
  }
}

// grad_x = grad_y W for NR >= N rows: see the file comment. Block (column tile of 256 columns,
// out-range [blockIdx.y * rows_per_split, ...)).
template <class T, int NR>
__global__ void __launch_bounds__(kThreads, 2) nf4_gemv_t_kernel(const T* __restrict__ gy, int64_t N, int64_t out,
                                                              int64_t in, int64_t rows_per_split, WeightView w,
                                                              T* __restrict__ gx,
                                                              float* __restrict__ partial) {
  __shared__ float lut[kTableSize];
  __shared__ float red[kWarps][kThreads];
  stage_tables(lut, w);
  __syncthreads();
  const float off = w.offset != nullptr ? __ldg(w.offset) : 0.0f;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t c_tile = static_cast<int64_t>(blockIdx.x) * kThreads;
  const int64_t c = c_tile + lane * 8;
  const int64_t o_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t o_end = std::min<int64_t>(out, o_begin + rows_per_split);
  float acc[NR][8];
#pragma unroll
  for (int n = 0; n < NR; ++n)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[n][j] = 0.0f;
  if (c < in) {
    const int valid = static_cast<int>(std::min<int64_t>(8, in - c));
#pragma unroll 2
    for (int64_t o = o_begin + warp; o < o_end; o += kWarps) {
      float cv[8];
      const float a = decode_codes(w, lut, o * in + c, valid, off, cv);
#pragma unroll
      for (int n = 0; n < NR; ++n) {
        const float g = n < N ? to_f(gy[n * out + o]) * a : 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[n][j] = fmaf(g, cv[j], acc[n][j]);
      }
    }
  }
  const bool direct = gridDim.y == 1;
#pragma unroll
  for (int n = 0; n < NR; ++n) {
    if (n >= N) break;  // block-uniform
#pragma unroll
    for (int j = 0; j < 8; ++j) red[warp][lane * 8 + j] = acc[n][j];
    __syncthreads();
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) s += red[k][threadIdx.x];
    const int64_t col = c_tile + threadIdx.x;
    if (col < in) {
      if (direct)
        gx[n * in + col] = static_cast<T>(s);
      else
        partial[(static_cast<int64_t>(blockIdx.y) * N + n) * in + col] = s;
    }
    __syncthreads();
  }
}

// scratch[r, j] = W[r0 + r, c0 + j] rounded to T, for r < rows, j < cols (scratch contiguous, ld = cols).
// Grid: x over the row's groups of 8 columns, y over rows (grid-stride beyond 65535).
template <class T>
__global__ void nf4_dequant_tile_kernel(WeightView w, int64_t in, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                                        bool vec_store, T* __restrict__ scratch) {
  __shared__ float lut[kTableSize];
  stage_tables(lut, w);
  __syncthreads();
  const float off = w.offset != nullptr ? __ldg(w.offset) : 0.0f;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) << 3;
  if (j0 >= cols) return;  // no barrier below
  const int valid = static_cast<int>(std::min<int64_t>(8, cols - j0));
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float wv[8];
    decode_group<T>(w, lut, (r0 + r) * in + c0 + j0, valid, off, wv);
    T* dst = scratch + r * cols + j0;
    if (vec_store && valid == 8) {
      if constexpr (sizeof(T) == 2) {
        uint32_t u[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const T lo = static_cast<T>(wv[2 * k]), hi = static_cast<T>(wv[2 * k + 1]);
          u[k] = static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(u[0], u[1], u[2], u[3]);
      } else {
        reinterpret_cast<float4*>(dst)[0] = make_float4(wv[0], wv[1], wv[2], wv[3]);
        reinterpret_cast<float4*>(dst)[1] = make_float4(wv[4], wv[5], wv[6], wv[7]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < valid) dst[j] = static_cast<T>(wv[j]);
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------------

struct PreparedWeight {
  NF4Weight w;
  at::Tensor packed;  // 4-byte aligned copy when needed
  WeightView view;
};

PreparedWeight prepare(NF4Weight w) {
  PreparedWeight p;
  p.packed = w.packed;
  if ((reinterpret_cast<uintptr_t>(p.packed.const_data_ptr()) & 3u) != 0) p.packed = p.packed.clone();
  WeightView v{};
  v.packed = p.packed.const_data_ptr<uint8_t>();
  v.nbytes = p.packed.numel();
  if (w.nested()) {
    v.absmax = nullptr;
    v.absmax_q = w.absmax.const_data_ptr<uint8_t>();
    v.nested_code = w.nested_code.const_data_ptr<float>();
    v.nested_absmax = w.nested_absmax.const_data_ptr<float>();
    v.offset = w.offset.const_data_ptr<float>();
  } else {
    v.absmax = w.absmax.const_data_ptr<float>();
  }
  v.nblocks = w.absmax.numel();
  int lb = 0;
  while ((int64_t{1} << lb) < w.blocksize) ++lb;
  v.log2_bs = lb;
  p.view = v;
  p.w = std::move(w);
  return p;
}

inline int next_pow2_rows(int64_t n) {
  int r = 1;
  while (r < n) r <<= 1;
  return r;
}

template <class T>
void launch_reduce(const at::Tensor& partial, int splits, int64_t N, int64_t M, const T* bias, T* out,
                   cudaStream_t stream) {
  const int64_t total = N * M;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(ceil_div(total, kThreads), 1), 65535));
  splitk_reduce_kernel<T><<<grid, kThreads, 0, stream>>>(partial.const_data_ptr<float>(), splits, N, M, bias, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x (contiguous [N, in]) can be staged in 16-byte loads.
inline bool x_vec_ok(const at::Tensor& x) {
  const int64_t v = 16 / x.element_size();
  return x.size(1) % v == 0 && (reinterpret_cast<uintptr_t>(x.const_data_ptr()) & 15u) == 0;
}

template <class T, int NR>
void launch_gemv(const at::Tensor& x, const PreparedWeight& pw, const at::Tensor& bias, at::Tensor& y,
                 cudaStream_t stream) {
  constexpr int RPW = NR <= 2 ? 2 : 4;
  constexpr int64_t kTileRows = static_cast<int64_t>(kWarps) * RPW;
  const int64_t N = x.size(0), in = pw.w.in, out = pw.w.out;
  const int64_t tiles = ceil_div(out, kTileRows);
  // KT: a multiple of 256 within the shared-memory budget, halved while the grid is too small to
  // fill the device (k-splits then add blocks at the price of an fp32 partial pass).
  const int64_t kt_max = std::max<int64_t>(256, (kGemvSmemBytes / (NR * static_cast<int64_t>(sizeof(T)))) / 256 * 256);
  int64_t KT = std::min<int64_t>(kt_max, ceil_div(in, 256) * 256);
  const int64_t want_blocks = 3LL * sm_count(x.get_device()) / 2;
  while (KT > 256 && ceil_div(in, KT) * tiles < want_blocks) KT = ceil_div(KT / 2, 256) * 256;
  const int64_t splits = ceil_div(in, KT);
  TORCH_CHECK(splits <= 0x7FFFFFFF, "fastpeft: nf4_linear: 'x' has too many columns");
  const unsigned grid_y = static_cast<unsigned>(std::min<int64_t>(tiles, kMaxGridY));
  const size_t smem = static_cast<size_t>(NR) * KT * sizeof(T);
  const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, N, out}, x.options().dtype(at::kFloat));
  nf4_gemv_kernel<T, NR, RPW><<<dim3(static_cast<unsigned>(splits), grid_y), kThreads, smem, stream>>>(
      x.const_data_ptr<T>(), N, out, in, static_cast<int>(KT), x_vec_ok(x), pw.view, b, y.mutable_data_ptr<T>(),
      splits > 1 ? partial.mutable_data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) launch_reduce<T>(partial, static_cast<int>(splits), N, out, b, y.mutable_data_ptr<T>(), stream);
}

template <class T, int NB>
void launch_gemv_mma(const at::Tensor& x, const PreparedWeight& pw, const at::Tensor& bias, at::Tensor& y,
                     cudaStream_t stream) {
  const int64_t N = x.size(0), in = pw.w.in, out = pw.w.out;
  const int64_t tiles = ceil_div(out, kMmaTileRows);
  const int64_t kt_max = NB == 1 ? 2048 : 1024;  // x tile NB * 8 * (KT + 8) * 2 bytes, about 33 KiB
  int64_t KT = std::min<int64_t>(kt_max, ceil_div(in, kMmaStep) * kMmaStep);
  const int64_t want_blocks = 3LL * sm_count(x.get_device()) / 2;
  while (KT > 256 && ceil_div(in, KT) * tiles < want_blocks) KT = ceil_div(KT / 2, kMmaStep) * kMmaStep;
  const int64_t splits = ceil_div(in, KT);
  TORCH_CHECK(splits <= 0x7FFFFFFF, "fastpeft: nf4_linear: 'x' has too many columns");
  const unsigned grid_y = static_cast<unsigned>(std::min<int64_t>(tiles, kMaxGridY));
  const size_t smem = static_cast<size_t>(NB) * 8 * (KT + 8) * sizeof(T);
  const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, N, out}, x.options().dtype(at::kFloat));
  nf4_gemv_mma_kernel<T, NB><<<dim3(static_cast<unsigned>(splits), grid_y), kThreads, smem, stream>>>(
      x.const_data_ptr<T>(), N, out, in, static_cast<int>(KT), x_vec_ok(x), pw.view, b, y.mutable_data_ptr<T>(),
      splits > 1 ? partial.mutable_data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) launch_reduce<T>(partial, static_cast<int>(splits), N, out, b, y.mutable_data_ptr<T>(), stream);
}

// FASTPEFT_NF4_MMA=0 turns the tensor-core gemv off (the CUDA-core gemv then takes every row count).
bool mma_enabled() {
  const char* e = std::getenv("FASTPEFT_NF4_MMA");
  return e == nullptr || e[0] != '0';
}

template <class T, int NR>
void launch_gemv_t(const at::Tensor& gy, const PreparedWeight& pw, at::Tensor& gx, cudaStream_t stream) {
  const int64_t N = gy.size(0), in = pw.w.in, out = pw.w.out;
  const int64_t col_tiles = ceil_div(in, kThreads);
  TORCH_CHECK(col_tiles <= 0x7FFFFFFF, "fastpeft: nf4_linear_grad_input: 'in_features' is too large");
  const int64_t target = 4LL * sm_count(gy.get_device());
  int64_t splits = std::max<int64_t>(1, ceil_div(target, col_tiles));
  splits = std::min<int64_t>({splits, ceil_div(out, 4 * kWarps), kMaxGridY});
  const int64_t rows_per_split = ceil_div(out, splits);
  splits = ceil_div(out, rows_per_split);
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, N, in}, gy.options().dtype(at::kFloat));
  nf4_gemv_t_kernel<T, NR><<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits)), kThreads, 0,
                             stream>>>(gy.const_data_ptr<T>(), N, out, in, rows_per_split, pw.view,
                                       gx.mutable_data_ptr<T>(), splits > 1 ? partial.mutable_data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1)
    launch_reduce<T>(partial, static_cast<int>(splits), N, in, static_cast<const T*>(nullptr), gx.mutable_data_ptr<T>(),
                     stream);
}

template <class T>
void launch_dequant_tile(const PreparedWeight& pw, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                         at::Tensor& scratch, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const int64_t gx = ceil_div(ceil_div(cols, 8), kThreads);
  TORCH_CHECK(gx <= 0x7FFFFFFF, "fastpeft: the NF4 weight has too many columns");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(std::min<int64_t>(rows, kMaxGridY)));
  const bool vec = (cols * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                   (reinterpret_cast<uintptr_t>(scratch.const_data_ptr()) & 15u) == 0;
  nf4_dequant_tile_kernel<T><<<grid, kThreads, 0, stream>>>(pw.view, pw.w.in, r0, rows, c0, cols, vec,
                                                             scratch.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
void gemv_dispatch(int nr, const at::Tensor& x, const PreparedWeight& pw, const at::Tensor& bias, at::Tensor& y,
                   cudaStream_t s) {
  switch (nr) {
    case 1: launch_gemv<T, 1>(x, pw, bias, y, s); break;
    case 2: launch_gemv<T, 2>(x, pw, bias, y, s); break;
    case 4: launch_gemv<T, 4>(x, pw, bias, y, s); break;
    case 8: launch_gemv<T, 8>(x, pw, bias, y, s); break;
    default: launch_gemv<T, 16>(x, pw, bias, y, s); break;
  }
}

template <class T>
void gemv_t_dispatch(int nr, const at::Tensor& gy, const PreparedWeight& pw, at::Tensor& gx, cudaStream_t s) {
  switch (nr) {
    case 1: launch_gemv_t<T, 1>(gy, pw, gx, s); break;
    case 2: launch_gemv_t<T, 2>(gy, pw, gx, s); break;
    case 4: launch_gemv_t<T, 4>(gy, pw, gx, s); break;
    default: launch_gemv_t<T, 8>(gy, pw, gx, s); break;
  }
}

// ---- ops -----------------------------------------------------------------------------------------------

at::Tensor nf4_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                           const std::optional<at::Tensor>& bias_opt) {
  check_dim(x, 2, "x");
  check_float_input(x, "x");
  const int64_t in = x.size(1);
  TORCH_CHECK(out_features >= 0, "fastpeft: 'out_features' must be non-negative, got ", out_features);
  NF4Weight w = make_nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in, x, "x");
  at::Tensor bias;
  if (bias_opt.has_value() && bias_opt->defined()) {
    bias = *bias_opt;
    check_dim(bias, 1, "bias");
    check_same_device(bias, x, "bias", "x");
    check_same_dtype(bias, x, "bias", "x");
    check_size(bias, 0, out_features, "bias", "out_features");
    bias = bias.contiguous();
  }
  TORCH_CHECK(x.is_cuda(), "fastpeft: nf4_linear's CUDA kernel got 'x' on ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t N = xc.size(0);
  const int64_t out = out_features;
  at::Tensor y = at::empty({N, out}, xc.options());
  if (N == 0 || out == 0) return y;
  if (in == 0) {
    y.zero_();
    if (bias.defined()) y.add_(bias);
    return y;
  }
  const PreparedWeight pw = prepare(std::move(w));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(xc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (N <= kGemvMaxRows) {
      if constexpr (sizeof(T) == 2) {
        if (N > kMmaMinRows && mma_enabled()) {
          if (N <= 8)
            launch_gemv_mma<T, 1>(xc, pw, bias, y, stream);
          else
            launch_gemv_mma<T, 2>(xc, pw, bias, y, stream);
          return;
        }
      }
      gemv_dispatch<T>(next_pow2_rows(N), xc, pw, bias, y, stream);
      return;
    }
    const int64_t band = std::clamp<int64_t>(kBandBytes / (in * static_cast<int64_t>(sizeof(T))), 1, out);
    at::Tensor scratch = at::empty({band, in}, xc.options());
    for (int64_t r0 = 0; r0 < out; r0 += band) {
      const int64_t rows = std::min(band, out - r0);
      at::Tensor sc = rows == band ? scratch : scratch.narrow(0, 0, rows);
      launch_dequant_tile<T>(pw, r0, rows, 0, in, sc, stream);
      at::Tensor yb = rows == out ? y : y.narrow(1, r0, rows);
      if (bias.defined())
        at::addmm_out(yb, bias.narrow(0, r0, rows), xc, sc.t());
      else
        at::mm_out(yb, xc, sc.t());
    }
  });
  return y;
}

at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code,
                                      const std::optional<at::Tensor>& offset, int64_t blocksize,
                                      int64_t in_features) {
  check_dim(grad_y, 2, "grad_y");
  check_float_input(grad_y, "grad_y");
  const int64_t out = grad_y.size(1);
  TORCH_CHECK(in_features >= 0, "fastpeft: 'in_features' must be non-negative, got ", in_features);
  NF4Weight w =
      make_nf4_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, out, in_features, grad_y, "grad_y");
  TORCH_CHECK(grad_y.is_cuda(), "fastpeft: nf4_linear_grad_input's CUDA kernel got 'grad_y' on ", grad_y.device());
  c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor gy = grad_y.contiguous();
  const int64_t N = gy.size(0);
  const int64_t in = in_features;
  at::Tensor gx = at::empty({N, in}, gy.options());
  if (N == 0 || in == 0) return gx;
  if (out == 0) return gx.zero_();
  const PreparedWeight pw = prepare(std::move(w));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(gy.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (N <= kGemvMaxRows) {
      for (int64_t n0 = 0; n0 < N; n0 += kGemvTMaxRows) {
        const int64_t nc = std::min<int64_t>(kGemvTMaxRows, N - n0);
        const at::Tensor g = nc == N ? gy : gy.narrow(0, n0, nc);  // row slices stay contiguous
        at::Tensor o = nc == N ? gx : gx.narrow(0, n0, nc);
        gemv_t_dispatch<T>(next_pow2_rows(nc), g, pw, o, stream);
      }
      return;
    }
    // Column bands (multiples of 8 columns so groups never straddle two bands).
    int64_t band = kBandBytes / (out * static_cast<int64_t>(sizeof(T)));
    band = std::max<int64_t>(256, band / 256 * 256);
    band = std::min<int64_t>(band, in);
    at::Tensor scratch = at::empty({out, band}, gy.options());
    for (int64_t c0 = 0; c0 < in; c0 += band) {
      const int64_t cols = std::min(band, in - c0);
      at::Tensor sc = cols == band ? scratch : at::empty({out, cols}, gy.options());
      launch_dequant_tile<T>(pw, 0, out, c0, cols, sc, stream);
      at::Tensor gb = cols == in ? gx : gx.narrow(1, c0, cols);
      at::mm_out(gb, gy, sc);
    }
  });
  return gx;
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("nf4_linear", &fastpeft::nf4_linear_cuda);
  m.impl("nf4_linear_grad_input", &fastpeft::nf4_linear_grad_input_cuda);
}
