// CUDA kernels of the cayley family (OFT, BOFT). The drivers (argument checks, formulas, the ATen
// path: batched LU inverse and cuBLAS bmm on torch's current stream) are shared with the CPU in
// common/cayley_impl.h; this file supplies the fused forward kernels for small blocks, one thread
// block per b x b matrix held in shared memory in op-math:
//   - inverse_kernel: out = alpha (I + S)^-1 + beta I by Gauss-Jordan elimination with partial
//     pivoting (alpha = 2, beta = -1 is the exact Cayley transform; alpha = 1, beta = 0 the inverse
//     the exact form's backward needs for bf16/fp16 inputs),
//   - neumann_kernel: peft's Neumann polynomial by Horner steps H = c_j I + S H.
// Larger blocks, and every backward (two or three bmm per Horner step), go through ATen.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cayley_impl.h"
#include "common/cuda_launch.cuh"

namespace fastpeft {
namespace {

using cuda::OpMath;

constexpr int kCayleyThreads = 256;
constexpr int64_t kFusedMaxBlock = 64;
constexpr int kMaxPerThread = static_cast<int>(kFusedMaxBlock * kFusedMaxBlock / kCayleyThreads);
constexpr int64_t kSmemLimit = 48 * 1024;  // the default dynamic shared-memory limit, no opt-in needed
constexpr int64_t kMaxGrid = int64_t{1} << 20;

inline int64_t inverse_smem_bytes(int64_t b, int64_t msize) { return (b * b + b) * msize + 2 * b * 4; }
inline int64_t neumann_smem_bytes(int64_t b, int64_t msize) { return 2 * b * b * msize; }

template <class M>
__device__ __forceinline__ M abs_value(M v) {
  return v < M(0) ? -v : v;
}

template <class T, class M, class O>
__global__ void __launch_bounds__(kCayleyThreads)
    inverse_kernel(const T* __restrict__ skew, int64_t n, int b, M alpha, M beta, O* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  M* a = reinterpret_cast<M*>(smem_raw);
  M* col = a + b * b;
  int* piv = reinterpret_cast<int*>(col + b);
  int* perm = piv + b;
  __shared__ int pivot_row;
  const int tid = threadIdx.x;
  const int bb = b * b;
  for (int64_t mat = blockIdx.x; mat < n; mat += gridDim.x) {
    const T* s = skew + mat * bb;
    for (int e = tid; e < bb; e += blockDim.x) a[e] = static_cast<M>(s[e]) + (e / b == e % b ? M(1) : M(0));
    __syncthreads();
    for (int k = 0; k < b; ++k) {
      if (tid < 32) {  // warp 0: argmax_i>=k |a[i, k]| (ties: the smaller row)
        M best = M(-1);
        int arg = k;
        for (int i = k + tid; i < b; i += 32) {
          const M v = abs_value(a[i * b + k]);
          if (v > best) {
            best = v;
            arg = i;
          }
        }
        for (int off = 16; off > 0; off >>= 1) {
          const M ob = __shfl_down_sync(0xffffffffu, best, off);
          const int oa = __shfl_down_sync(0xffffffffu, arg, off);
          if (ob > best || (ob == best && oa < arg)) {
            best = ob;
            arg = oa;
          }
        }
        if (tid == 0) {
          pivot_row = arg;
          piv[k] = arg;
        }
      }
      __syncthreads();
      const int p = pivot_row;
      if (p != k && tid < b) {
        const M t = a[k * b + tid];
        a[k * b + tid] = a[p * b + tid];
        a[p * b + tid] = t;
      }
      __syncthreads();
      if (tid < b) col[tid] = a[tid * b + k];
      __syncthreads();
      const M inv = M(1) / col[k];
      if (tid < b) a[k * b + tid] = (tid == k ? M(1) : a[k * b + tid]) * inv;
      __syncthreads();
      for (int e = tid; e < bb; e += blockDim.x) {
        const int i = e / b, j = e - i * b;
        if (i != k) a[e] = (j == k ? M(0) : a[e]) - col[i] * a[k * b + j];
      }
      __syncthreads();
    }
    // The row swaps come back as column swaps in reverse order: column j of the inverse is
    // column perm[j] of a.
    if (tid == 0) {
      for (int j = 0; j < b; ++j) perm[j] = j;
      for (int k = b - 1; k >= 0; --k) {
        const int t = perm[k];
        perm[k] = perm[piv[k]];
        perm[piv[k]] = t;
      }
    }
    __syncthreads();
    O* o = out + mat * bb;
    for (int e = tid; e < bb; e += blockDim.x) {
      const int i = e / b, j = e - i * b;
      o[e] = static_cast<O>(alpha * a[i * b + perm[j]] + (i == j ? beta : M(0)));
    }
    __syncthreads();  // a is reloaded for the next matrix
  }
}

// Coefficient of S^j in peft's Neumann polynomial of degree m (top: the coefficient of S^m).
template <class M>
__device__ __forceinline__ M neumann_coef(int j, int m, M top) {
  return j == 0 ? M(1) : (j == m ? top : M(2));
}

template <class T, class M>
__global__ void __launch_bounds__(kCayleyThreads)
    neumann_kernel(const T* __restrict__ skew, int64_t n, int b, int m, M top, T* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  M* s = reinterpret_cast<M*>(smem_raw);
  M* h = s + b * b;
  const int tid = threadIdx.x;
  const int bb = b * b;
  for (int64_t mat = blockIdx.x; mat < n; mat += gridDim.x) {
    const T* src = skew + mat * bb;
    const M cm = neumann_coef(m, m, top), cm1 = m >= 1 ? neumann_coef(m - 1, m, top) : M(1);
    for (int e = tid; e < bb; e += blockDim.x) {
      const M v = static_cast<M>(src[e]);
      s[e] = v;
      h[e] = (m == 0 ? M(0) : cm * v) + (e / b == e % b ? cm1 : M(0));  // m = 0: H = I
    }
    __syncthreads();
    for (int j = m - 2; j >= 0; --j) {
      const M c = neumann_coef(j, m, top);
      M acc[kMaxPerThread];
#pragma unroll
      for (int r = 0; r < kMaxPerThread; ++r) {
        const int e = tid + r * kCayleyThreads;
        if (e < bb) {
          const int i = e / b, col = e - i * b;
          M v = i == col ? c : M(0);
          for (int l = 0; l < b; ++l) v += s[i * b + l] * h[l * b + col];
          acc[r] = v;
        }
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kMaxPerThread; ++r) {
        const int e = tid + r * kCayleyThreads;
        if (e < bb) h[e] = acc[r];
      }
      __syncthreads();
    }
    T* o = out + mat * bb;
    for (int e = tid; e < bb; e += blockDim.x) o[e] = static_cast<T>(h[e]);
    __syncthreads();
  }
}

inline int64_t opmath_size(at::ScalarType t) { return t == at::kDouble ? 8 : 4; }

inline dim3 matrix_grid(int64_t n) { return dim3(static_cast<unsigned>(std::min<int64_t>(n, kMaxGrid))); }

struct CudaCayleyBackend {
  struct Guard {
    explicit Guard(c10::Device d) : guard(d) {}
    c10::cuda::CUDAGuard guard;
  };

  static bool fused_forward(int64_t b, at::ScalarType dtype, int64_t k) {
    const int64_t bytes = k == 0 ? inverse_smem_bytes(b, opmath_size(dtype)) : neumann_smem_bytes(b, opmath_size(dtype));
    return b <= kFusedMaxBlock && bytes <= kSmemLimit;
  }
  static constexpr bool kHasFusedBackward = false;  // the backward is bmm-bound: cuBLAS

  static void forward(const at::Tensor& S, int64_t k, at::Tensor& out) {
    const int64_t n = S.size(0), b = S.size(1);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, S.scalar_type(), "fastpeft_cayley_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      if (k == 0) {
        inverse_kernel<scalar_t, M, scalar_t>
            <<<matrix_grid(n), kCayleyThreads, inverse_smem_bytes(b, sizeof(M)), stream>>>(
                S.const_data_ptr<scalar_t>(), n, static_cast<int>(b), M(2), M(-1), out.mutable_data_ptr<scalar_t>());
      } else {
        const int64_t m = neumann_degree(k);
        neumann_kernel<scalar_t, M><<<matrix_grid(n), kCayleyThreads, neumann_smem_bytes(b, sizeof(M)), stream>>>(
            S.const_data_ptr<scalar_t>(), n, static_cast<int>(b), static_cast<int>(m),
            static_cast<M>(neumann_coefficient(m, k)), out.mutable_data_ptr<scalar_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void inverse(const at::Tensor& S, at::Tensor& out) {
    const int64_t n = S.size(0), b = S.size(1);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, S.scalar_type(), "fastpeft_cayley_inverse_cuda", [&] {
      using M = typename OpMath<scalar_t>::type;
      inverse_kernel<scalar_t, M, M><<<matrix_grid(n), kCayleyThreads, inverse_smem_bytes(b, sizeof(M)), stream>>>(
          S.const_data_ptr<scalar_t>(), n, static_cast<int>(b), M(1), M(0), out.mutable_data_ptr<M>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  using fastpeft::CudaCayleyBackend;
  m.impl("cayley", &fastpeft::cayley_impl<CudaCayleyBackend>);
  m.impl("cayley_backward", &fastpeft::cayley_backward_impl<CudaCayleyBackend>);
}
