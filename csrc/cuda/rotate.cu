// CUDA kernels of the orthogonal-family rotations (block_diag_rotate, butterfly_rotate and their
// backward ops); argument checks in common/rotate_impl.h. The chain is the CPU's (see
// csrc/cpu/rotate.cpp): x -> U_0 -> V_0 -> ... -> V_(m-1) -> y with gathers through index maps
// g_0 = perm_0^-1, g_i = perm_(i-1) o perm_i^-1, g_m = perm_(m-1), built on the device (int32) from
// perm each call. Every factor is one launch of
//   rotate_kernel:  dst[t, omap[k b + c]] = sum_j src[t, imap[k b + j]] W_k[j, c]
// (W_k = rot[i, k] forward, rot[i, k]^T for grad_x; the maps fused into the loads and stores):
// a thread block takes a tile of tokens x one block k, with W_k and the gathered input tile in
// shared memory (when they fit; read from global memory otherwise). grad_rot is
//   rot_grad_kernel: acc[k, j, c] += sum_t U[t, k b + j] G[t, k b + c]
// per (block, chunk of pairs (j, c), chunk of tokens), fp32 (fp64) partial sums in registers over
// shared-memory tiles of U and G, added to the accumulator with one atomicAdd per pair and chunk.
// Intermediate factor outputs live in op-math (fp32 / fp64) scratch tensors for the duration of one
// op; backward recomputes V_0 .. V_(m-2) from x. Everything runs on torch's current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cuda_launch.cuh"
#include "common/rotate_impl.h"

namespace fastpeft {
namespace {

using cuda::ceil_div;
using cuda::kThreads;
using cuda::OpMath;

constexpr int64_t kSmemBytes = 48 * 1024;  // the default dynamic shared-memory limit

dim3 grid1(int64_t blocks) { return dim3(static_cast<unsigned>(blocks)); }

__device__ __forceinline__ int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ int64_t mapped(const int* __restrict__ map, int64_t q) { return map ? map[q] : q; }

// ---- index maps -----------------------------------------------------------------------------------
// Values are clamped into [0, d) so that a perm that is not a permutation (the Python wrapper checks
// them; a direct op call may not) never makes a kernel read or write out of bounds.

__global__ void invert_kernel(const int64_t* __restrict__ p, int64_t rows, int64_t d, int* __restrict__ inv) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * d) return;
  const int64_t r = e / d;
  const int64_t v = p[e];
  if (v >= 0 && v < d) inv[r * d + v] = static_cast<int>(e - r * d);
}

__global__ void invert_int_kernel(const int* __restrict__ p, int64_t rows, int64_t d, int* __restrict__ inv) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * d) return;
  const int64_t r = e / d;
  inv[r * d + p[e]] = static_cast<int>(e - r * d);
}

// g[0] = inv[0]; g[i] = perm[i - 1][inv[i]] (0 < i < m); g[m] = perm[m - 1].
__global__ void chain_maps_kernel(const int64_t* __restrict__ perm, const int* __restrict__ inv, int64_t m, int64_t d,
                                  int* __restrict__ g) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= (m + 1) * d) return;
  const int64_t i = e / d, q = e - i * d;
  int64_t v;
  if (i == 0) {
    v = inv[q];
  } else if (i == m) {
    v = perm[(m - 1) * d + q];
  } else {
    v = perm[(i - 1) * d + inv[i * d + q]];
  }
  g[e] = static_cast<int>(v < 0 ? 0 : (v >= d ? d - 1 : v));
}

struct DeviceMaps {
  at::Tensor fwd, bwd;  // [m + 1, d] int32: g_i and g_i^-1; undefined for OFT (all identity)
  int64_t d = 0;
  const int* f(int64_t i) const { return fwd.defined() ? fwd.const_data_ptr<int>() + i * d : nullptr; }
  const int* b(int64_t i) const { return bwd.defined() ? bwd.const_data_ptr<int>() + i * d : nullptr; }
};

DeviceMaps device_maps(const at::Tensor& perm, int64_t m, int64_t d, cudaStream_t stream) {
  DeviceMaps maps;
  maps.d = d;
  if (!perm.defined()) return maps;
  const auto iopts = perm.options().dtype(at::kInt);
  at::Tensor inv = at::empty({m, d}, iopts);
  C10_CUDA_CHECK(cudaMemsetAsync(inv.mutable_data_ptr<int>(), 0, m * d * sizeof(int), stream));
  invert_kernel<<<grid1(ceil_div(m * d, kThreads)), kThreads, 0, stream>>>(perm.const_data_ptr<int64_t>(), m, d,
                                                                   inv.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  maps.fwd = at::empty({m + 1, d}, iopts);
  chain_maps_kernel<<<grid1(ceil_div((m + 1) * d, kThreads)), kThreads, 0, stream>>>(
      perm.const_data_ptr<int64_t>(), inv.const_data_ptr<int>(), m, d, maps.fwd.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  maps.bwd = at::empty({m + 1, d}, iopts);
  C10_CUDA_CHECK(cudaMemsetAsync(maps.bwd.mutable_data_ptr<int>(), 0, (m + 1) * d * sizeof(int), stream));
  invert_int_kernel<<<grid1(ceil_div((m + 1) * d, kThreads)), kThreads, 0, stream>>>(maps.fwd.const_data_ptr<int>(), m + 1,
                                                                            d, maps.bwd.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return maps;
}

// ---- one factor -----------------------------------------------------------------------------------

// Grid: blocks x tiles (flattened). kStage: W_k and the input tile in shared memory.
template <class S, class D, class R, class M, bool kStage>
__global__ void rotate_kernel(const S* __restrict__ src, int64_t lds, const int* __restrict__ imap,
                              const R* __restrict__ rot, bool transpose, bool shared, int64_t rows, int b, int tile,
                              D* __restrict__ dst, int64_t ldd, const int* __restrict__ omap) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  M* ws = reinterpret_cast<M*>(smem_raw);
  M* us = ws + static_cast<int64_t>(b) * b;
  const int64_t tiles = div_up(rows, tile);
  const int64_t k = blockIdx.x / tiles;
  const int64_t t0 = (blockIdx.x - k * tiles) * tile;
  const int nt = static_cast<int>(min(static_cast<int64_t>(tile), rows - t0));
  const R* rk = rot + (shared ? 0 : k * b * b);
  const int64_t kb = k * b;
  if constexpr (kStage) {
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
      const int j = e / b, c = e - j * b;
      ws[e] = static_cast<M>(rk[transpose ? c * b + j : e]);
    }
    for (int e = threadIdx.x; e < nt * b; e += blockDim.x) {
      const int t = e / b, j = e - t * b;
      us[e] = static_cast<M>(src[(t0 + t) * lds + mapped(imap, kb + j)]);
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < nt * b; e += blockDim.x) {
    const int t = e / b, c = e - t * b;
    M acc = M(0);
    if constexpr (kStage) {
      const M* ur = us + t * b;
      for (int j = 0; j < b; ++j) acc += ur[j] * ws[j * b + c];
    } else {
      const S* sr = src + (t0 + t) * lds;
      for (int j = 0; j < b; ++j)
        acc += static_cast<M>(sr[mapped(imap, kb + j)]) * static_cast<M>(rk[transpose ? c * b + j : j * b + c]);
    }
    dst[(t0 + t) * ldd + mapped(omap, kb + c)] = static_cast<D>(acc);
  }
}

// Grid: blocks x pair chunks x row chunks (flattened). Each thread owns kPer pairs (j, c) of its
// chunk; kStage: the rows' U and G slices staged in shared memory `tile` rows at a time.
template <class SU, class SG, class M, bool kStage>
__global__ void rot_grad_kernel(const SU* __restrict__ usrc, int64_t ldu, const int* __restrict__ umap,
                                const SG* __restrict__ gsrc, int64_t ldg, const int* __restrict__ gmap, int64_t rows,
                                int b, int64_t chunk_rows, int tile, bool shared, M* __restrict__ acc) {
  constexpr int kPer = 4;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  M* us = reinterpret_cast<M*>(smem_raw);
  M* gs = us + static_cast<int64_t>(tile) * b;
  const int pairs = b * b;
  const int pair_chunk = blockDim.x * kPer;
  const int64_t pcs = div_up(pairs, pair_chunk), rcs = div_up(rows, chunk_rows);
  int64_t id = blockIdx.x;
  const int64_t rc = id % rcs;
  id /= rcs;
  const int64_t pc = id % pcs;
  const int64_t k = id / pcs;
  const int64_t kb = k * b;
  const int64_t r0 = rc * chunk_rows, r1 = min(rows, r0 + chunk_rows);
  int pj[kPer], pcol[kPer];
  M part[kPer];
  for (int p = 0; p < kPer; ++p) {
    const int pair = static_cast<int>(pc * pair_chunk) + p * blockDim.x + threadIdx.x;
    pj[p] = pair < pairs ? pair / b : -1;
    pcol[p] = pair < pairs ? pair - (pair / b) * b : 0;
    part[p] = M(0);
  }
  for (int64_t t0 = r0; t0 < r1; t0 += (kStage ? tile : 1)) {
    if constexpr (kStage) {
      const int nt = static_cast<int>(min(static_cast<int64_t>(tile), r1 - t0));
      __syncthreads();
      for (int e = threadIdx.x; e < nt * b; e += blockDim.x) {
        const int t = e / b, j = e - t * b;
        us[e] = static_cast<M>(usrc[(t0 + t) * ldu + mapped(umap, kb + j)]);
        gs[e] = static_cast<M>(gsrc[(t0 + t) * ldg + mapped(gmap, kb + j)]);
      }
      __syncthreads();
      for (int p = 0; p < kPer; ++p) {
        if (pj[p] < 0) continue;
        M s = M(0);
        for (int t = 0; t < nt; ++t) s += us[t * b + pj[p]] * gs[t * b + pcol[p]];
        part[p] += s;
      }
    } else {
      for (int p = 0; p < kPer; ++p) {
        if (pj[p] < 0) continue;
        part[p] += static_cast<M>(usrc[t0 * ldu + mapped(umap, kb + pj[p])]) *
                   static_cast<M>(gsrc[t0 * ldg + mapped(gmap, kb + pcol[p])]);
      }
    }
  }
  M* ak = acc + (shared ? 0 : k * b * b);
  for (int p = 0; p < kPer; ++p)
    if (pj[p] >= 0) atomicAdd(ak + pj[p] * b + pcol[p], part[p]);
}

// ---- launchers ----------------------------------------------------------------------------------

// Tokens per rotate_kernel block: ~1024 outputs (4 per thread), at most 64 rows.
int rotate_tile(int b) { return static_cast<int>(std::clamp<int64_t>(1024 / std::max(b, 1), 1, 64)); }

template <class S, class D, class R, class M>
void launch_rotate(const S* src, int64_t lds, const int* imap, const R* rot_i, bool transpose, bool shared,
                   int64_t rows, int64_t d, int b, D* dst, int64_t ldd, const int* omap, cudaStream_t stream) {
  const int tile = rotate_tile(b);
  const int64_t blocks = d / b;
  const int64_t grid = blocks * ceil_div(rows, tile);
  const int64_t smem = (static_cast<int64_t>(b) * b + static_cast<int64_t>(tile) * b) * static_cast<int64_t>(sizeof(M));
  if (smem <= kSmemBytes) {
    rotate_kernel<S, D, R, M, true><<<grid1(grid), kThreads, smem, stream>>>(src, lds, imap, rot_i, transpose, shared, rows, b,
                                                                     tile, dst, ldd, omap);
  } else {
    rotate_kernel<S, D, R, M, false><<<grid1(grid), kThreads, 0, stream>>>(src, lds, imap, rot_i, transpose, shared, rows, b,
                                                                   tile, dst, ldd, omap);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class SU, class SG, class M>
void launch_rot_grad(const SU* usrc, int64_t ldu, const int* umap, const SG* gsrc, int64_t ldg, const int* gmap,
                     int64_t rows, int64_t d, int b, bool shared, M* acc_i, int sms, cudaStream_t stream) {
  const int64_t blocks = d / b;
  const int64_t pcs = ceil_div(static_cast<int64_t>(b) * b, static_cast<int64_t>(kThreads) * 4);
  // Enough thread blocks to fill the GPU a few times over, each summing >= 32 rows.
  const int64_t want = std::max<int64_t>(1, ceil_div(4 * static_cast<int64_t>(sms), blocks * pcs));
  const int64_t rcs = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, ceil_div(rows, 32)));
  const int64_t chunk_rows = ceil_div(rows, rcs);
  const int64_t grid = blocks * pcs * ceil_div(rows, chunk_rows);
  const int tile = static_cast<int>(std::clamp<int64_t>(2048 / std::max(b, 1), 1, 64));
  const int64_t smem = 2 * static_cast<int64_t>(tile) * b * static_cast<int64_t>(sizeof(M));
  if (smem <= kSmemBytes) {
    rot_grad_kernel<SU, SG, M, true><<<grid1(grid), kThreads, smem, stream>>>(usrc, ldu, umap, gsrc, ldg, gmap, rows, b,
                                                                      chunk_rows, tile, shared, acc_i);
  } else {
    rot_grad_kernel<SU, SG, M, false><<<grid1(grid), kThreads, 0, stream>>>(usrc, ldu, umap, gsrc, ldg, gmap, rows, b,
                                                                    chunk_rows, tile, shared, acc_i);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class F>
void dispatch_rotate_cuda(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "fastpeft: rotation kernels got dtype ", t);
  }
}

struct CudaRotateBackend {
  struct Guard {
    explicit Guard(c10::Device dev) : guard(dev) {}
    c10::cuda::CUDAGuard guard;
  };

  static int sm_count() {
    int dev = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return sms;
  }

  // Runs factors 0 .. `count - 1` of the chain on x; returns the last output written (V_(count-1)
  // in `bufs`, or y when it is the whole chain). keep: store each V_i in keep[i] ([N, d] op-math).
  template <class T, class M>
  static void run_chain(const at::Tensor& x, const T* rp, int64_t m, int64_t n, int64_t b, const DeviceMaps& maps,
                        int64_t count, T* y, int64_t ldy, M* const* outs, cudaStream_t stream) {
    const int64_t N = x.size(0), d = x.size(1);
    const bool shared = n == 1;
    const int64_t rot_stride = n * b * b;
    const T* xp = x.const_data_ptr<T>();
    const M* prev = nullptr;
    for (int64_t i = 0; i < count; ++i) {
      const bool to_y = y != nullptr && i == m - 1;
      const int* omap = to_y ? maps.b(m) : nullptr;
      if (i == 0) {
        if (to_y) {
          launch_rotate<T, T, T, M>(xp, x.stride(0), maps.f(0), rp, false, shared, N, d, b, y, ldy, omap, stream);
        } else {
          launch_rotate<T, M, T, M>(xp, x.stride(0), maps.f(0), rp, false, shared, N, d, b, outs[0], d, omap, stream);
        }
      } else if (to_y) {
        launch_rotate<M, T, T, M>(prev, d, maps.f(i), rp + i * rot_stride, false, shared, N, d, b, y, ldy, omap,
                                  stream);
      } else {
        launch_rotate<M, M, T, M>(prev, d, maps.f(i), rp + i * rot_stride, false, shared, N, d, b, outs[i], d, omap,
                                  stream);
      }
      prev = to_y ? nullptr : outs[i];
    }
  }

  static void rotate_forward(const at::Tensor& x, const at::Tensor& rot, const at::Tensor& perm, at::Tensor& y) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t N = x.size(0), d = x.size(1), m = rot.size(0), n = rot.size(1), b = rot.size(2);
    const DeviceMaps maps = device_maps(perm, m, d, stream);
    dispatch_rotate_cuda(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = typename OpMath<T>::type;
      // Two op-math buffers, used in turn by the factors before the last.
      at::Tensor buf = m > 1 ? at::empty({std::min<int64_t>(m - 1, 2), N, d}, x.options().dtype(c10::CppTypeToScalarType<M>::value))
                             : at::Tensor();
      std::vector<M*> outs(m, nullptr);
      for (int64_t i = 0; i + 1 < m; ++i) outs[i] = buf.mutable_data_ptr<M>() + (i % 2) * N * d;
      run_chain<T, M>(x, rot.const_data_ptr<T>(), m, n, b, maps, m, y.mutable_data_ptr<T>(), y.stride(0), outs.data(),
                      stream);
    });
  }

  static void rotate_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& rot, const at::Tensor& perm,
                              at::Tensor& gx, at::Tensor& grot) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t N = x.size(0), d = x.size(1), m = rot.size(0), n = rot.size(1), b = rot.size(2);
    const bool shared = n == 1, need_gx = gx.defined(), need_rot = grot.defined();
    const DeviceMaps maps = device_maps(perm, m, d, stream);
    const int sms = sm_count();
    dispatch_rotate_cuda(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = typename OpMath<T>::type;
      const auto mopts = x.options().dtype(c10::CppTypeToScalarType<M>::value);
      const T* rp = rot.const_data_ptr<T>();
      const int64_t rot_stride = n * b * b;
      // V_0 .. V_(m-2), recomputed (only grad_rot needs the factor inputs).
      at::Tensor vs = need_rot && m > 1 ? at::empty({m - 1, N, d}, mopts) : at::Tensor();
      std::vector<M*> outs(m, nullptr);
      for (int64_t i = 0; i + 1 < m && vs.defined(); ++i) outs[i] = vs.mutable_data_ptr<M>() + i * N * d;
      if (vs.defined()) run_chain<T, M>(x, rp, m, n, b, maps, m - 1, nullptr, 0, outs.data(), stream);
      // grad of the factor outputs, in turn in two op-math buffers
      at::Tensor gbuf = m > 1 ? at::empty({2, N, d}, mopts) : at::Tensor();
      const T* xp = x.const_data_ptr<T>();
      const T* gyp = gy.const_data_ptr<T>();
      const M* gprev = nullptr;  // gU_(i+1) (null: the source is grad_y)
      M* acc = need_rot ? grot.mutable_data_ptr<M>() : nullptr;
      for (int64_t i = m - 1; i >= 0; --i) {
        const int* gmap = maps.b(i + 1);  // gV_i = gather(gU_(i+1) or grad_y, g_(i+1)^-1)
        if (need_rot) {
          M* acc_i = acc + i * rot_stride;
          const int* umap = maps.f(i);  // U_i = gather(V_(i-1) or x, g_i)
          if (i == 0) {
            if (gprev == nullptr) {
              launch_rot_grad<T, T, M>(xp, x.stride(0), umap, gyp, gy.stride(0), gmap, N, d, b, shared, acc_i, sms, stream);
            } else {
              launch_rot_grad<T, M, M>(xp, x.stride(0), umap, gprev, d, gmap, N, d, b, shared, acc_i, sms, stream);
            }
          } else if (gprev == nullptr) {
            launch_rot_grad<M, T, M>(outs[i - 1], d, umap, gyp, gy.stride(0), gmap, N, d, b, shared, acc_i, sms, stream);
          } else {
            launch_rot_grad<M, M, M>(outs[i - 1], d, umap, gprev, d, gmap, N, d, b, shared, acc_i, sms, stream);
          }
        }
        if (i == 0 && !need_gx) break;
        // gU_i = gV_i rot[i]^T: to grad_x through g_0 (i == 0) or to the next buffer.
        const T* rot_i = rp + i * rot_stride;
        if (i == 0) {
          T* gxp = gx.mutable_data_ptr<T>();
          if (gprev == nullptr) {
            launch_rotate<T, T, T, M>(gyp, gy.stride(0), gmap, rot_i, true, shared, N, d, b, gxp, gx.stride(0), maps.f(0), stream);
          } else {
            launch_rotate<M, T, T, M>(gprev, d, gmap, rot_i, true, shared, N, d, b, gxp, gx.stride(0), maps.f(0), stream);
          }
        } else {
          M* out = gbuf.mutable_data_ptr<M>() + ((m - 1 - i) % 2) * N * d;
          if (gprev == nullptr) {
            launch_rotate<T, M, T, M>(gyp, gy.stride(0), gmap, rot_i, true, shared, N, d, b, out, d, nullptr, stream);
          } else {
            launch_rotate<M, M, T, M>(gprev, d, gmap, rot_i, true, shared, N, d, b, out, d, nullptr, stream);
          }
          gprev = out;
        }
      }
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  using fastpeft::CudaRotateBackend;
  m.impl("block_diag_rotate", &fastpeft::block_diag_rotate_impl<CudaRotateBackend>);
  m.impl("block_diag_rotate_backward", &fastpeft::block_diag_rotate_backward_impl<CudaRotateBackend>);
  m.impl("butterfly_rotate", &fastpeft::butterfly_rotate_impl<CudaRotateBackend>);
  m.impl("butterfly_rotate_backward", &fastpeft::butterfly_rotate_backward_impl<CudaRotateBackend>);
}
