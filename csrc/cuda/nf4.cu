// CUDA kernels of the nf4 family with exactly the CPU kernels' semantics (csrc/cpu/nf4.cpp,
// formulas in common/nf4_impl.h): the same bytes as bitsandbytes' CPU quantisers, so a weight
// quantised on either device checkpoints identically.
//   - quantise kernels: one thread block per quantisation block; |x| max as an integer max over
//     float bits (block reduction through warp shuffles), then one thread per output byte (NF4)
//     or element (8-bit);
//   - dequantise kernels: grid-stride, one thread per byte (NF4) or element (8-bit).
// The project compiles CUDA with --use_fast_math, so every rounding that must match the CPU is
// written with the IEEE round-to-nearest intrinsics (__fmul_rn, __fadd_rn, __fdiv_rn): no FMA
// contraction, no approximate division. This file is built with --ftz=false (CMakeLists.txt):
// subnormals matter here (the clamp value 1e-38 itself is subnormal; an all-zero block is scaled
// by 1 / 1e-38), and flush-to-zero would turn that into 0 * inf.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "common/checks.h"
#include "common/nf4_impl.h"

namespace fastpeft {
namespace {

using namespace nf4;

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;

struct Table16 {
  float v[16];
};

inline Table16 code_table() {
  Table16 t{};
  for (int i = 0; i < 16; ++i) t.v[i] = kCode[i];
  return t;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(ceil_div(work, kThreads), 1), kMaxGrid));
}

template <class T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

// max over the thread block of v; every thread gets the result. `smem` holds >= 32 entries.
__device__ __forceinline__ uint32_t block_max_u32(uint32_t v, uint32_t* smem) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  uint32_t r = 0;
  for (int w = 0; w < nwarps; ++w) r = max(r, smem[w]);
  __syncthreads();
  return r;
}

template <class T>
__device__ __forceinline__ uint32_t thread_absmax_bits(const T* __restrict__ x, int64_t start, int64_t len) {
  uint32_t m = 0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) m = max(m, __float_as_uint(to_f(x[start + i])) & kAbsMask);
  return m;
}

__device__ __forceinline__ uint8_t nf4_code_of(float x, float s, bool divide, const Bounds& bnd) {
  float v = divide ? __fdiv_rn(x, s) : __fmul_rn(x, s);
  v = fminf(fmaxf(v, -1.0f), 1.0f);
  int c = 0;
#pragma unroll
  for (int k = 0; k < 15; ++k) c += bnd.v[k] < v ? 1 : 0;
  return static_cast<uint8_t>(c);
}

template <class T>
__global__ void nf4_quantize_kernel(const T* __restrict__ x, int64_t n, int64_t blocksize, Bounds bnd,
                                    uint8_t* __restrict__ packed, float* __restrict__ absmax, int* __restrict__ bad) {
  __shared__ uint32_t smem[32];
  const int64_t b = blockIdx.x;
  const int64_t start = b * blocksize;
  const int64_t len = min(blocksize, n - start);
  const uint32_t bits = block_max_u32(thread_absmax_bits(x, start, len), smem);
  if (bits >= kInfBits) {
    if (threadIdx.x == 0) atomicOr(bad, 1);
    return;
  }
  float am = __uint_as_float(bits);
  const bool partial = len < blocksize;
  float s;
  if (partial) {
    am = fmaxf(am, kTinyAbsmax);
    s = am;
  } else {
    s = __fdiv_rn(1.0f, fmaxf(am, kTinyAbsmax));
  }
  if (threadIdx.x == 0) absmax[b] = am;
  const int64_t nbytes = (len + 1) / 2;
  for (int64_t j = threadIdx.x; j < nbytes; j += blockDim.x) {
    const int64_t e = start + 2 * j;
    const uint8_t c0 = nf4_code_of(to_f(x[e]), s, partial, bnd);
    const uint8_t c1 = 2 * j + 1 < len ? nf4_code_of(to_f(x[e + 1]), s, partial, bnd) : static_cast<uint8_t>(7);
    packed[start / 2 + j] = static_cast<uint8_t>((c0 << 4) | c1);
  }
}

template <class T>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax, int64_t n,
                                      int64_t blocksize, Table16 code, T* __restrict__ out) {
  const int64_t nbytes = (n + 1) / 2;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nbytes;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = 2 * j;
    const float s = absmax[e / blocksize];  // blocksize is even: e and e + 1 share a block
    const uint8_t byte = packed[j];
    out[e] = static_cast<T>(__fmul_rn(code.v[byte >> 4], s));
    if (e + 1 < n) out[e + 1] = static_cast<T>(__fmul_rn(code.v[byte & 0xF], s));
  }
}

template <class T>
__global__ void blockwise8_quantize_kernel(const T* __restrict__ x, int64_t n, int64_t blocksize,
                                           const uint8_t* __restrict__ lut, uint8_t* __restrict__ q,
                                           float* __restrict__ absmax, int* __restrict__ bad) {
  __shared__ uint32_t smem[32];
  const int64_t b = blockIdx.x;
  const int64_t start = b * blocksize;
  const int64_t len = min(blocksize, n - start);
  const uint32_t bits = block_max_u32(thread_absmax_bits(x, start, len), smem);
  if (bits >= kInfBits) {
    if (threadIdx.x == 0) atomicOr(bad, 1);
    return;
  }
  const float am = __uint_as_float(bits);
  if (threadIdx.x == 0) absmax[b] = am;
  if (am == 0.0f) {
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) q[start + i] = 0;
    return;
  }
  const float inv = __fdiv_rn(1.0f, am);
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    float v = __fmul_rn(to_f(x[start + i]), inv);
    v = fminf(fmaxf(v, -1.0f), 1.0f);
    const float t = __fadd_rn(__fmul_rn(__fmul_rn(__fadd_rn(v, 1.0f), 0.5f), static_cast<float>(kLutSize - 1)), 0.5f);
    q[start + i] = lut[__float2int_rz(t)];
  }
}

template <class T>
__global__ void blockwise8_dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                                             const float* __restrict__ code, int64_t n, int64_t blocksize,
                                             T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<T>(__fmul_rn(code[q[i]], absmax[i / blocksize]));
}


void check_flag(const at::Tensor& flag, const char* name) {
  const at::Tensor host = flag.to(at::kCPU);
  TORCH_CHECK(host.const_data_ptr<int>()[0] == 0, "fastpeft: '", name,
              "' contains NaN or infinite values, which blockwise quantisation cannot represent; "
              "fix or clamp them before quantising");
}

// ---- ops ----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& w, int64_t blocksize) {
  check_float_input(w, "w");
  check_blocksize(blocksize);
  c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor x = w.contiguous();
  const int64_t n = x.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  if (nblocks == 0) return {packed, absmax};
  TORCH_CHECK(nblocks <= 0x7FFFFFFF, "fastpeft: 'w' has too many blocks for one launch");
  at::Tensor flag = at::zeros({1}, x.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    nf4_quantize_kernel<T><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), n, blocksize, bounds(), packed.mutable_data_ptr<uint8_t>(),
        absmax.mutable_data_ptr<float>(), flag.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  check_flag(flag, "w");
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t n = check_nf4_dequantize_args(packed, absmax, blocksize, shape, dtype);
  c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    nf4_dequantize_kernel<T><<<grid_for((n + 1) / 2), kThreads, 0, stream>>>(
        p.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(), n, blocksize, code_table(),
        out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> blockwise8_quantize_cuda(const at::Tensor& x_in, const at::Tensor& code,
                                                            int64_t blocksize) {
  check_blockwise8_quantize_args(x_in, code, blocksize);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  if (nblocks == 0) return {q, absmax};
  TORCH_CHECK(nblocks <= 0x7FFFFFFF, "fastpeft: 'x' has too many blocks for one launch");
  // The lookup table is built on the host exactly as on the CPU, then copied to the device.
  const at::Tensor code_host = code.to(at::kCPU).contiguous();
  const std::vector<uint8_t> lut_host = build_lut8(code_host.const_data_ptr<float>());
  at::Tensor lut_cpu = at::empty({kLutSize}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(lut_cpu.mutable_data_ptr<uint8_t>(), lut_host.data(), lut_host.size());
  const at::Tensor lut = lut_cpu.to(x.device());
  at::Tensor flag = at::zeros({1}, x.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    blockwise8_quantize_kernel<T><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), n, blocksize, lut.const_data_ptr<uint8_t>(), q.mutable_data_ptr<uint8_t>(),
        absmax.mutable_data_ptr<float>(), flag.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  check_flag(flag, "x");
  return {q, absmax};
}

at::Tensor blockwise8_dequantize_cuda(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                      int64_t blocksize, at::ScalarType dtype) {
  const int64_t n = check_blockwise8_dequantize_args(q, absmax, code, blocksize, dtype);
  c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous();
  const at::Tensor a = absmax.contiguous();
  const at::Tensor c = code.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    blockwise8_dequantize_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        qc.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(), c.const_data_ptr<float>(), n, blocksize,
        out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("nf4_quantize", &fastpeft::nf4_quantize_cuda);
  m.impl("nf4_dequantize", &fastpeft::nf4_dequantize_cuda);
  m.impl("blockwise8_quantize", &fastpeft::blockwise8_quantize_cuda);
  m.impl("blockwise8_dequantize", &fastpeft::blockwise8_dequantize_cuda);
}
