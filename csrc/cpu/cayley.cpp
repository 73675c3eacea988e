// CPU kernels of the cayley family (OFT, BOFT). The drivers (argument checks, the ATen path for
// large blocks, the formulas) live in common/cayley_impl.h; this file supplies the fused per-block
// kernels for b <= kCpuFusedMaxBlock: each block is loaded once into thread-local op-math buffers,
// transformed there (Gauss-Jordan inverse with partial pivoting, or Horner steps of b x b products)
// and stored once in the input dtype. Blocks are split over threads with at::parallel_for; the inner
// loops are compiled for AVX-512, AVX2 and the baseline (cpu_math.h) and vectorise over columns.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cayley_impl.h"
#include "common/cpu_math.h"

namespace fastpeft {
namespace {

using cpu::ld;
using cpu::OpMath;
using cpu::st;

// Above this, the Neumann polynomial and the backward go through ATen's bmm (MKL's blocked GEMM beats
// the per-block loops once a block and its work buffers no longer sit in L2).
constexpr int64_t kCpuFusedMaxBlock = 256;
// The exact form's inverse: Gauss-Jordan per block up to this size (faster than LAPACK there), above it
// LAPACK one block per call. Never a batched LAPACK call: torch 2.14.1's batched CPU LU (getrf inside
// at::parallel_for) returned invalid pivots with 2 threads for b >= 192 on the project's 2-core build
// machine (a single-block call, threaded inside MKL, is fine).
constexpr int64_t kCpuGaussJordanMaxBlock = 512;

// In-place inverse of the row-major b x b matrix a by Gauss-Jordan elimination with partial
// pivoting (row swaps recorded in piv, undone as column swaps at the end). A zero pivot gives inf/nan.
template <class M>
FASTPEFT_INLINE void gauss_jordan_inverse_impl(M* __restrict__ a, int64_t b, int64_t* __restrict__ piv) {
  for (int64_t k = 0; k < b; ++k) {
    int64_t p = k;
    M best = std::abs(a[k * b + k]);
    for (int64_t i = k + 1; i < b; ++i) {
      const M v = std::abs(a[i * b + k]);
      if (v > best) {
        best = v;
        p = i;
      }
    }
    piv[k] = p;
    M* __restrict__ rk = a + k * b;
    if (p != k) {
      M* __restrict__ rp = a + p * b;
      for (int64_t j = 0; j < b; ++j) std::swap(rk[j], rp[j]);
    }
    // Each row's scalar fix-up of column k comes after its vector pass: a scalar store followed by
    // a vector load of the same row would stall on store forwarding.
    const M inv = M(1) / rk[k];
    for (int64_t j = 0; j < b; ++j) rk[j] *= inv;
    rk[k] = inv;
    for (int64_t i = 0; i < b; ++i) {
      if (i == k) continue;
      M* __restrict__ ri = a + i * b;
      const M f = ri[k];
      if (f == M(0)) continue;  // e.g. OFT's identity initialisation: nothing to eliminate
      for (int64_t j = 0; j < b; ++j) ri[j] -= f * rk[j];
      ri[k] = -f * inv;
    }
  }
  for (int64_t k = b - 1; k >= 0; --k) {
    const int64_t p = piv[k];
    if (p == k) continue;
    for (int64_t i = 0; i < b; ++i) std::swap(a[i * b + k], a[i * b + p]);
  }
}

// c[i0:i0+R, j0:j0+C] (+)= x[i0:i0+R, :] y[:, j0:j0+C] + diag I with the R x C tile in registers (a
// fixed-size accumulator the compiler keeps in vector registers); row-major n x n. The identity term
// is added in the tile store: a separate scalar pass over the diagonal would stall the next vector
// loads of those rows on store forwarding.
template <class M, int R, int C>
FASTPEFT_INLINE void matmul_tile(const M* __restrict__ x, const M* __restrict__ y, int64_t n, int64_t i0, int64_t j0,
                                 bool accumulate, M diag, M* __restrict__ c) {
  M acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int cc = 0; cc < C; ++cc) acc[r][cc] = accumulate ? c[(i0 + r) * n + j0 + cc] : M(0);
  }
  for (int64_t l = 0; l < n; ++l) {
    const M* __restrict__ yl = y + l * n + j0;
    for (int r = 0; r < R; ++r) {
      const M xv = x[(i0 + r) * n + l];
      for (int cc = 0; cc < C; ++cc) acc[r][cc] += xv * yl[cc];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int cc = 0; cc < C; ++cc) c[(i0 + r) * n + j0 + cc] = acc[r][cc] + (i0 + r == j0 + cc ? diag : M(0));
  }
}

template <class M, int R>
FASTPEFT_INLINE void matmul_rows(const M* __restrict__ x, const M* __restrict__ y, int64_t n, int64_t i0,
                                 bool accumulate, M diag, M* __restrict__ c) {
  int64_t j0 = 0;
  for (; j0 + 32 <= n; j0 += 32) matmul_tile<M, R, 32>(x, y, n, i0, j0, accumulate, diag, c);
  for (; j0 + 8 <= n; j0 += 8) matmul_tile<M, R, 8>(x, y, n, i0, j0, accumulate, diag, c);
  for (; j0 < n; ++j0) matmul_tile<M, R, 1>(x, y, n, i0, j0, accumulate, diag, c);
}

// c = x y + diag I (accumulate: c += x y + diag I); row-major n x n.
template <class M>
FASTPEFT_INLINE void matmul_impl(const M* __restrict__ x, const M* __restrict__ y, int64_t n, bool accumulate,
                                 M diag, M* __restrict__ c) {
  int64_t i0 = 0;
  for (; i0 + 4 <= n; i0 += 4) matmul_rows<M, 4>(x, y, n, i0, accumulate, diag, c);
  for (; i0 < n; ++i0) matmul_rows<M, 1>(x, y, n, i0, accumulate, diag, c);
}

// dst = src + diag I (op-math), b x b.
template <class T, class M>
FASTPEFT_INLINE void load_block_impl(const T* __restrict__ src, int64_t b, M diag, M* __restrict__ dst) {
  for (int64_t e = 0; e < b * b; ++e) dst[e] = ld(src[e]);
  for (int64_t i = 0; i < b; ++i) dst[i * b + i] += diag;
}

// dst = alpha src + beta I, rounded once to T.
template <class T, class M>
FASTPEFT_INLINE void store_block_impl(const M* __restrict__ src, int64_t b, M alpha, M beta, T* __restrict__ dst) {
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < b; ++j) st(dst[i * b + j], alpha * src[i * b + j] + (i == j ? beta : M(0)));
  }
}

#define FASTPEFT_CAYLEY_STAMP_M(M)                                                          \
  FASTPEFT_CLONES void gauss_jordan_inverse(M* a, int64_t b, int64_t* piv) {                \
    gauss_jordan_inverse_impl<M>(a, b, piv);                                                \
  }                                                                                         \
  FASTPEFT_CLONES void matmul(const M* x, const M* y, int64_t n, bool accumulate, M diag, M* c) { \
    matmul_impl<M>(x, y, n, accumulate, diag, c);                                           \
  }
#define FASTPEFT_CAYLEY_STAMP(T, M)                                                         \
  FASTPEFT_CLONES void load_block(const T* src, int64_t b, M diag, M* dst) {                \
    load_block_impl<T, M>(src, b, diag, dst);                                               \
  }                                                                                         \
  FASTPEFT_CLONES void store_block(const M* src, int64_t b, M alpha, M beta, T* dst) {      \
    store_block_impl<T, M>(src, b, alpha, beta, dst);                                       \
  }

FASTPEFT_CAYLEY_STAMP_M(float)
FASTPEFT_CAYLEY_STAMP_M(double)
FASTPEFT_CAYLEY_STAMP(float, float)
FASTPEFT_CAYLEY_STAMP(double, double)
FASTPEFT_CAYLEY_STAMP(c10::BFloat16, float)
FASTPEFT_CAYLEY_STAMP(c10::Half, float)
#undef FASTPEFT_CAYLEY_STAMP
#undef FASTPEFT_CAYLEY_STAMP_M

// One parallel task's op-math buffers (`slots` b x b matrices, uninitialised) for a block at a time.
template <class M>
struct BlockWork {
  BlockWork(int64_t b, int slots) : bb(b * b), buf(new M[slots * b * b]), piv(b) {}
  M* slot(int i) { return buf.get() + i * bb; }
  int64_t bb;
  std::unique_ptr<M[]> buf;
  std::vector<int64_t> piv;
};

template <class M>
void transpose_block(const M* __restrict__ src, int64_t b, M* __restrict__ dst) {
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < b; ++j) dst[j * b + i] = src[i * b + j];
  }
}

template <class M>
void add_diag(M* a, int64_t b, M v) {
  for (int64_t i = 0; i < b; ++i) a[i * b + i] += v;
}

template <class M>
void set_scaled_identity(M* a, int64_t b, M v) {
  for (int64_t e = 0; e < b * b; ++e) a[e] = M(0);
  add_diag(a, b, v);
}

// R = 2 (I + S)^-1 - I (k == 0) or peft's Neumann polynomial of S (k >= 1), one block.
template <class T, class M>
void forward_block(const T* s, int64_t b, int64_t k, T* out, BlockWork<M>& w) {
  M* a = w.slot(0);
  if (k == 0) {
    load_block(s, b, M(1), a);
    gauss_jordan_inverse(a, b, w.piv.data());
    store_block(a, b, M(2), M(-1), out);
    return;
  }
  const int64_t m = neumann_degree(k);
  M* h = w.slot(1);
  M* tmp = w.slot(2);
  if (m == 0) {
    set_scaled_identity(h, b, M(1));
  } else {
    load_block(s, b, M(0), a);
    const M cm = static_cast<M>(neumann_coefficient(m, k));
    for (int64_t e = 0; e < b * b; ++e) h[e] = cm * a[e];
    add_diag(h, b, static_cast<M>(neumann_coefficient(m - 1, k)));
  }
  for (int64_t j = m - 2; j >= 0; --j) {
    matmul(a, h, b, false, static_cast<M>(neumann_coefficient(j, k)), tmp);
    std::swap(h, tmp);
  }
  store_block(h, b, M(1), M(0), out);
}

// dL/dS for one block (formulas in cayley_impl.h); k >= 2 or k == 0.
template <class T, class M>
void backward_block(const T* g, const T* s, const T* r, int64_t b, int64_t k, T* out, BlockWork<M>& w) {
  M* gm = w.slot(0);
  M* t = w.slot(1);
  M* tmp = w.slot(2);
  M* acc = w.slot(3);
  load_block(g, b, M(0), gm);
  if (k == 0) {
    M* inv = w.slot(4);
    if constexpr (std::is_same_v<T, M>) {  // the saved R holds op-math values: W = (R + I) / 2
      load_block(r, b, M(1), inv);
      for (int64_t e = 0; e < b * b; ++e) inv[e] *= M(0.5);
    } else {
      load_block(s, b, M(1), inv);
      gauss_jordan_inverse(inv, b, w.piv.data());
    }
    transpose_block(inv, b, t);
    matmul(t, gm, b, false, M(0), tmp);
    matmul(tmp, t, b, false, M(0), acc);
    store_block(acc, b, M(-2), M(0), out);
    return;
  }
  const int64_t m = neumann_degree(k);
  const M top = static_cast<M>(neumann_coefficient(m, k));
  M* y = w.slot(4);
  M* c = w.slot(5);
  load_block(s, b, M(0), tmp);
  transpose_block(tmp, b, t);
  for (int64_t e = 0; e < b * b; ++e) {
    y[e] = gm[e];
    c[e] = M(0);
    acc[e] = top * gm[e];
  }
  for (int64_t r = m - 2; r >= 0; --r) {
    for (int64_t e = 0; e < b * b; ++e) c[e] += y[e];
    matmul(t, y, b, false, M(0), tmp);  // Y = T Y
    std::swap(y, tmp);
    for (int64_t e = 0; e < b * b; ++e) tmp[e] = M(2) * c[e] + top * y[e];
    matmul(acc, t, b, true, M(0), tmp);  // acc = Z_r + acc T
    std::swap(acc, tmp);
  }
  store_block(acc, b, M(1), M(0), out);
}

// Blocks per parallel task: ~64K multiply-adds at least.
inline int64_t grain_blocks(int64_t b) { return std::max<int64_t>(1, (int64_t{1} << 16) / (b * b * b)); }

struct CpuCayleyBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  static bool fused_forward(int64_t b, at::ScalarType, int64_t k) { return k == 0 || b <= kCpuFusedMaxBlock; }
  static constexpr bool kHasFusedBackward = true;
  static bool fused_backward(int64_t b, at::ScalarType, int64_t) { return b <= kCpuFusedMaxBlock; }

  static void forward(const at::Tensor& S, int64_t k, at::Tensor& out) {
    const int64_t n = S.size(0), b = S.size(1);
    if (k == 0 && b > kCpuGaussJordanMaxBlock) {
      at::Tensor r = at::empty({n, b, b}, S.options().dtype(cayley_opmath(S.scalar_type())));
      inverse(S, r);
      r.mul_(2.0);
      r.diagonal(0, 1, 2).sub_(1.0);
      out.copy_(r);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, S.scalar_type(), "fastpeft_cayley", [&] {
      using M = typename OpMath<scalar_t>::type;
      const scalar_t* sp = S.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, grain_blocks(b), [&](int64_t lo, int64_t hi) {
        BlockWork<M> w(b, k == 0 ? 1 : 3);
        for (int64_t i = lo; i < hi; ++i) forward_block<scalar_t, M>(sp + i * b * b, b, k, op + i * b * b, w);
      });
    });
  }

  static void inverse(const at::Tensor& S, at::Tensor& out) {
    const int64_t n = S.size(0), b = S.size(1);
    if (b > kCpuGaussJordanMaxBlock) {
      at::Tensor a = S.to(out.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
      a.diagonal(0, 1, 2).add_(1.0);
      for (int64_t i = 0; i < n; ++i) out.select(0, i).copy_(std::get<0>(at::linalg_inv_ex(a.select(0, i))));
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, S.scalar_type(), "fastpeft_cayley_inverse", [&] {
      using M = typename OpMath<scalar_t>::type;
      const scalar_t* sp = S.const_data_ptr<scalar_t>();
      M* op = out.mutable_data_ptr<M>();
      at::parallel_for(0, n, grain_blocks(b), [&](int64_t lo, int64_t hi) {
        std::vector<int64_t> piv(b);
        for (int64_t i = lo; i < hi; ++i) {
          load_block(sp + i * b * b, b, M(1), op + i * b * b);
          gauss_jordan_inverse(op + i * b * b, b, piv.data());
        }
      });
    });
  }

  static void backward(const at::Tensor& G, const at::Tensor& S, const at::Tensor& R, int64_t k, at::Tensor& out) {
    const int64_t n = S.size(0), b = S.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, S.scalar_type(), "fastpeft_cayley_backward", [&] {
      using M = typename OpMath<scalar_t>::type;
      const scalar_t* gp = G.const_data_ptr<scalar_t>();
      const scalar_t* sp = S.const_data_ptr<scalar_t>();
      const scalar_t* rp = R.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, grain_blocks(b), [&](int64_t lo, int64_t hi) {
        BlockWork<M> w(b, 6);
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t e = i * b * b;
          backward_block<scalar_t, M>(gp + e, sp + e, rp + e, b, k, op + e, w);
        }
      });
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  using fastpeft::CpuCayleyBackend;
  m.impl("cayley", &fastpeft::cayley_impl<CpuCayleyBackend>);
  m.impl("cayley_backward", &fastpeft::cayley_backward_impl<CpuCayleyBackend>);
}
