// CPU kernels of the hadamard family (LoHa). The drivers (argument checks, strategy choice, ATen
// GEMMs) live in common/hadamard_impl.h; this file supplies the fused elementwise loops:
//   - delta: dW[o, i] = s (A1 B1)[o, i] (A2 B2)[o, i], both rank-r products accumulated per row
//     segment in op-math registers/L1 (no [out, in] temporaries), one store in x's dtype,
//   - delta_grads: H1 = s G * P2, H2 = s G * P1 with P1, P2 recomputed the same way,
//   - face_split: the row-wise Kronecker product out[i, p r2 + q] = s A[i, p] B[i, q].
// Rows are split over threads with at::parallel_for; the inner loops are compiled for AVX-512,
// AVX2 and the baseline (cpu_math.h) and vectorise over columns.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_math.h"
#include "common/hadamard_impl.h"

namespace fastpeft {
namespace {

using cpu::ld;
using cpu::st;

constexpr int64_t kSeg = 256;  // columns per segment (two fp32 accumulators = 2 KiB, in L1)

using cpu::OpMath;

// p1[j] = sum_p a1[p] b1[p * ld + j], p2 likewise; j < len.
template <class M>
FASTPEFT_INLINE void products_impl(const M* __restrict__ a1, const M* __restrict__ b1, int64_t r1,
                                   const M* __restrict__ a2, const M* __restrict__ b2, int64_t r2, int64_t ld,
                                   int64_t len, M* __restrict__ p1, M* __restrict__ p2) {
  for (int64_t j = 0; j < len; ++j) p1[j] = M(0);
  for (int64_t j = 0; j < len; ++j) p2[j] = M(0);
  for (int64_t p = 0; p < r1; ++p) {
    const M a = a1[p];
    const M* __restrict__ b = b1 + p * ld;
    for (int64_t j = 0; j < len; ++j) p1[j] += a * b[j];
  }
  for (int64_t q = 0; q < r2; ++q) {
    const M a = a2[q];
    const M* __restrict__ b = b2 + q * ld;
    for (int64_t j = 0; j < len; ++j) p2[j] += a * b[j];
  }
}

// out[j] = s p1[j] p2[j].
template <class T, class M>
FASTPEFT_INLINE void delta_store_impl(const M* __restrict__ p1, const M* __restrict__ p2, M s, int64_t len,
                                      T* __restrict__ out) {
  for (int64_t j = 0; j < len; ++j) st(out[j], s * p1[j] * p2[j]);
}

// h1 = s g p2, h2 = s g p1.
template <class T, class M>
FASTPEFT_INLINE void grads_store_impl(const T* __restrict__ g, const M* __restrict__ p1, const M* __restrict__ p2,
                                      M s, int64_t len, M* __restrict__ h1, M* __restrict__ h2) {
  for (int64_t j = 0; j < len; ++j) {
    const M gs = s * ld(g[j]);
    h1[j] = gs * p2[j];
    h2[j] = gs * p1[j];
  }
}

// out[p * r2 + q] = s a[p] b[q].
template <class T, class M>
FASTPEFT_INLINE void face_row_impl(const M* __restrict__ a, int64_t r1, const M* __restrict__ b, int64_t r2, M s,
                                   T* __restrict__ out) {
  for (int64_t p = 0; p < r1; ++p) {
    const M sa = s * a[p];
    for (int64_t q = 0; q < r2; ++q) st(out[p * r2 + q], sa * b[q]);
  }
}

#define FASTPEFT_HAD_STAMP_M(M)                                                                       \
  FASTPEFT_CLONES void products(const M* a1, const M* b1, int64_t r1, const M* a2, const M* b2, int64_t r2, \
                                int64_t ld, int64_t len, M* p1, M* p2) {                              \
    products_impl<M>(a1, b1, r1, a2, b2, r2, ld, len, p1, p2);                                        \
  }
#define FASTPEFT_HAD_STAMP(T, M)                                                                       \
  FASTPEFT_CLONES void delta_store(const M* p1, const M* p2, M s, int64_t len, T* out) {               \
    delta_store_impl<T, M>(p1, p2, s, len, out);                                                       \
  }                                                                                                    \
  FASTPEFT_CLONES void grads_store(const T* g, const M* p1, const M* p2, M s, int64_t len, M* h1, M* h2) { \
    grads_store_impl<T, M>(g, p1, p2, s, len, h1, h2);                                                 \
  }                                                                                                    \
  FASTPEFT_CLONES void face_row(const M* a, int64_t r1, const M* b, int64_t r2, M s, T* out) {         \
    face_row_impl<T, M>(a, r1, b, r2, s, out);                                                         \
  }

FASTPEFT_HAD_STAMP_M(float)
FASTPEFT_HAD_STAMP_M(double)
FASTPEFT_HAD_STAMP(float, float)
FASTPEFT_HAD_STAMP(double, double)
FASTPEFT_HAD_STAMP(c10::BFloat16, float)
FASTPEFT_HAD_STAMP(c10::Half, float)
#undef FASTPEFT_HAD_STAMP
#undef FASTPEFT_HAD_STAMP_M

// Rows per parallel task: ~16K multiply-adds at least.
inline int64_t grain_rows(int64_t cols, int64_t r) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols * std::max<int64_t>(r, 1), 1));
}

// Calls f(e, len, p1, p2) for every row segment [e, e + len) of the [rows, cols] output, with
// p1 = (A1 B1)[segment] and p2 = (A2 B2)[segment] in op-math; rows split over threads.
template <class M, class F>
void for_each_product_segment(const at::Tensor& A1, const at::Tensor& B1, const at::Tensor& A2,
                              const at::Tensor& B2, int64_t rows, int64_t cols, F&& f) {
  const int64_t r1 = A1.size(1), r2 = A2.size(1);
  const M* a1 = A1.const_data_ptr<M>();
  const M* b1 = B1.const_data_ptr<M>();
  const M* a2 = A2.const_data_ptr<M>();
  const M* b2 = B2.const_data_ptr<M>();
  at::parallel_for(0, rows, grain_rows(cols, r1 + r2), [&](int64_t rb, int64_t re) {
    alignas(64) M p1[kSeg];
    alignas(64) M p2[kSeg];
    for (int64_t o = rb; o < re; ++o) {
      for (int64_t c0 = 0; c0 < cols; c0 += kSeg) {
        const int64_t len = std::min(kSeg, cols - c0);
        products(a1 + o * r1, b1 + c0, r1, a2 + o * r2, b2 + c0, r2, cols, len, p1, p2);
        f(o * cols + c0, len, p1, p2);
      }
    }
  });
}

struct CpuHadamardBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  static void delta(const at::Tensor& A1, const at::Tensor& B1, const at::Tensor& A2, const at::Tensor& B2,
                    double s, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fastpeft_hadamard_delta", [&] {
      using M = typename OpMath<scalar_t>::type;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const M sc = static_cast<M>(s);
      for_each_product_segment<M>(A1, B1, A2, B2, out.size(0), out.size(1),
                                  [&](int64_t e, int64_t len, const M* p1, const M* p2) {
                                    delta_store(p1, p2, sc, len, op + e);
                                  });
    });
  }

  static void delta_grads(const at::Tensor& G, const at::Tensor& A1, const at::Tensor& B1, const at::Tensor& A2,
                          const at::Tensor& B2, double s, at::Tensor& H1, at::Tensor& H2) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, G.scalar_type(), "fastpeft_hadamard_delta_grads", [&] {
      using M = typename OpMath<scalar_t>::type;
      const scalar_t* gp = G.const_data_ptr<scalar_t>();
      M* h1 = H1.mutable_data_ptr<M>();
      M* h2 = H2.mutable_data_ptr<M>();
      const M sc = static_cast<M>(s);
      for_each_product_segment<M>(A1, B1, A2, B2, G.size(0), G.size(1),
                                  [&](int64_t e, int64_t len, const M* p1, const M* p2) {
                                    grads_store(gp + e, p1, p2, sc, len, h1 + e, h2 + e);
                                  });
    });
  }

  static void face_split(const at::Tensor& A, const at::Tensor& B, double s, at::Tensor& out) {
    const int64_t rows = out.size(0), r1 = A.size(1), r2 = B.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fastpeft_hadamard_face_split", [&] {
      using M = typename OpMath<scalar_t>::type;
      const M* ap = A.const_data_ptr<M>();
      const M* bp = B.const_data_ptr<M>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const M sc = static_cast<M>(s);
      at::parallel_for(0, rows, grain_rows(r1 * r2, 1), [&](int64_t rb, int64_t re) {
        for (int64_t i = rb; i < re; ++i) face_row(ap + i * r1, r1, bp + i * r2, r2, sc, op + i * r1 * r2);
      });
    });
  }
};

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  using fastpeft::CpuHadamardBackend;
  m.impl("hadamard_delta", &fastpeft::hadamard_delta_impl<CpuHadamardBackend>);
  m.impl("hadamard_delta_backward", &fastpeft::hadamard_delta_backward_impl<CpuHadamardBackend>);
  m.impl("hadamard_linear_forward", &fastpeft::hadamard_linear_forward_impl<CpuHadamardBackend>);
  m.impl("hadamard_linear_backward", &fastpeft::hadamard_linear_backward_impl<CpuHadamardBackend>);
}
