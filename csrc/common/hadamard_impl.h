// Device-independent drivers of the hadamard-family ops (LoHa): hadamard_delta(+_backward) and
// hadamard_linear_forward/backward.
//
// dW = s (A1 B1) * (A2 B2) with A1 [out, r1], B1 [r1, in], A2 [out, r2], B2 [r2, in]. Two ways to
// apply it to x [N, in]:
//   (1) materialise: dW in one fused pass (both rank-r products and the elementwise product per
//       element, no [out, in] temporaries), then y = x dW^T;  O(out in (r1 + r2) + N in out).
//   (2) face-splitting: (A1 B1) * (A2 B2) = (A1 . A2)(B1^T . B2^T)^T with '.' the row-wise
//       Kronecker product, so with KB = B1^T . B2^T [in, R], KA = s A1 . A2 [out, R], R = r1 r2:
//       y = (x KB) KA^T;  O(N R (in + out)), never touching an [out, in] matrix.
// `strategy` 0 picks the cheaper by multiply-add count (separately for forward and backward), 1 and
// 2 force (1) or (2). Backward recomputes dW (1) or U = x KB (2); only x and the factors are saved.
//
// A backend BK provides (A*, B* op-math (float32, or float64 for float64 inputs) contiguous):
//   using Guard;
//   void delta(A1, B1, A2, B2, s, out);            // out [out, in] (x's dtype) = s P1 * P2
//   void delta_grads(G, A1, B1, A2, B2, s, H1, H2); // H1 = s G * P2, H2 = s G * P1 (op-math)
//   void face_split(A [m, r1], B [m, r2], s, out);  // out[i, p r2 + q] = s A[i, p] B[i, q]
// with P1 = A1 B1 and P2 = A2 B2 recomputed per element. Ranks above kFusedMaxRank go through ATen
// GEMMs instead (the fused per-element loops are O(r) per element).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>

#include <tuple>

#include "common/checks.h"

namespace fastpeft {

constexpr int64_t kHadamardFusedMaxRank = 64;  // r1 + r2 above this: the products go through GEMMs

enum HadamardStrategy : int64_t { kHadAuto = 0, kHadMaterialize = 1, kHadFaceSplit = 2 };

struct HadamardShape {
  int64_t out, in, r1, r2;
};

inline HadamardShape check_hadamard_factors(const at::Tensor& w1_a, const at::Tensor& w1_b,
                                            const at::Tensor& w2_a, const at::Tensor& w2_b) {
  check_dim(w1_a, 2, "w1_a");
  check_dim(w1_b, 2, "w1_b");
  check_dim(w2_a, 2, "w2_a");
  check_dim(w2_b, 2, "w2_b");
  check_floating(w1_a, "w1_a");
  check_same_dtype(w1_b, w1_a, "w1_b", "w1_a");
  check_same_dtype(w2_a, w1_a, "w2_a", "w1_a");
  check_same_dtype(w2_b, w1_a, "w2_b", "w1_a");
  check_same_device(w1_b, w1_a, "w1_b", "w1_a");
  check_same_device(w2_a, w1_a, "w2_a", "w1_a");
  check_same_device(w2_b, w1_a, "w2_b", "w1_a");
  HadamardShape s{w1_a.size(0), w1_b.size(1), w1_a.size(1), w2_a.size(1)};
  check_size(w1_b, 0, s.r1, "w1_b", "the rank r1 (w1_a.size(1))");
  check_size(w2_a, 0, s.out, "w2_a", "out_features (w1_a.size(0))");
  check_size(w2_b, 0, s.r2, "w2_b", "the rank r2 (w2_a.size(1))");
  check_size(w2_b, 1, s.in, "w2_b", "in_features (w1_b.size(1))");
  return s;
}

inline at::ScalarType hadamard_opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct HadamardOpmath {
  at::Tensor A1, B1, A2, B2;  // op-math, contiguous
};

inline HadamardOpmath hadamard_opmath_factors(const at::Tensor& w1_a, const at::Tensor& w1_b,
                                              const at::Tensor& w2_a, const at::Tensor& w2_b) {
  const at::ScalarType op = hadamard_opmath(w1_a.scalar_type());
  return {w1_a.to(op).contiguous(), w1_b.to(op).contiguous(), w2_a.to(op).contiguous(),
          w2_b.to(op).contiguous()};
}

// dW in `dtype`.
template <class BK>
at::Tensor hadamard_delta_core(const HadamardShape& sh, const HadamardOpmath& f, double scale, at::ScalarType dtype) {
  at::Tensor out = at::empty({sh.out, sh.in}, f.A1.options().dtype(dtype));
  if (out.numel() == 0) return out;
  if (sh.r1 + sh.r2 > kHadamardFusedMaxRank) {
    at::Tensor p = at::mm(f.A1, f.B1);
    p.mul_(at::mm(f.A2, f.B2)).mul_(scale);
    out.copy_(p);
    return out;
  }
  BK::delta(f.A1, f.B1, f.A2, f.B2, scale, out);
  return out;
}

// Factor gradients from grad_dW [out, in] (any floating dtype); results in `dtype`.
template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hadamard_delta_backward_core(
    const HadamardShape& sh, const HadamardOpmath& f, const at::Tensor& grad, double scale, at::ScalarType dtype) {
  const auto opts = f.A1.options();
  if (sh.out * sh.in == 0) {
    return {at::zeros({sh.out, sh.r1}, opts.dtype(dtype)), at::zeros({sh.r1, sh.in}, opts.dtype(dtype)),
            at::zeros({sh.out, sh.r2}, opts.dtype(dtype)), at::zeros({sh.r2, sh.in}, opts.dtype(dtype))};
  }
  at::Tensor H1, H2;
  if (sh.r1 + sh.r2 > kHadamardFusedMaxRank) {
    const at::Tensor g = grad.to(f.A1.scalar_type()).mul(scale);
    H1 = g.mul(at::mm(f.A2, f.B2));
    H2 = g.mul(at::mm(f.A1, f.B1));
  } else {
    H1 = at::empty({sh.out, sh.in}, opts);
    H2 = at::empty({sh.out, sh.in}, opts);
    BK::delta_grads(grad.contiguous(), f.A1, f.B1, f.A2, f.B2, scale, H1, H2);
  }
  return {at::mm(H1, f.B1.t()).to(dtype), at::mm(f.A1.t(), H1).to(dtype), at::mm(H2, f.B2.t()).to(dtype),
          at::mm(f.A2.t(), H2).to(dtype)};
}

template <class BK>
at::Tensor hadamard_delta_impl(const at::Tensor& w1_a, const at::Tensor& w1_b, const at::Tensor& w2_a,
                               const at::Tensor& w2_b, double scale) {
  const HadamardShape sh = check_hadamard_factors(w1_a, w1_b, w2_a, w2_b);
  typename BK::Guard guard(w1_a.device());
  return hadamard_delta_core<BK>(sh, hadamard_opmath_factors(w1_a, w1_b, w2_a, w2_b), scale, w1_a.scalar_type());
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hadamard_delta_backward_impl(
    const at::Tensor& grad, const at::Tensor& w1_a, const at::Tensor& w1_b, const at::Tensor& w2_a,
    const at::Tensor& w2_b, double scale) {
  const HadamardShape sh = check_hadamard_factors(w1_a, w1_b, w2_a, w2_b);
  check_dim(grad, 2, "grad");
  check_same_dtype(grad, w1_a, "grad", "w1_a");
  check_same_device(grad, w1_a, "grad", "w1_a");
  check_size(grad, 0, sh.out, "grad", "out_features (w1_a.size(0))");
  check_size(grad, 1, sh.in, "grad", "in_features (w1_b.size(1))");
  typename BK::Guard guard(w1_a.device());
  return hadamard_delta_backward_core<BK>(sh, hadamard_opmath_factors(w1_a, w1_b, w2_a, w2_b), grad, scale,
                                          w1_a.scalar_type());
}

inline HadamardShape check_hadamard_linear(const at::Tensor& x, const at::Tensor& w1_a, const at::Tensor& w1_b,
                                           const at::Tensor& w2_a, const at::Tensor& w2_b, int64_t strategy) {
  check_dim(x, 2, "x");
  check_floating(x, "x");
  check_same_dtype(w1_a, x, "w1_a", "x");
  check_same_device(w1_a, x, "w1_a", "x");
  const HadamardShape sh = check_hadamard_factors(w1_a, w1_b, w2_a, w2_b);
  check_size(x, 1, sh.in, "x", "in_features (w1_b.size(1))");
  TORCH_CHECK(strategy >= 0 && strategy <= 2, "fastpeft: 'strategy' must be 0 (auto), 1 (materialise) or ",
              "2 (face-splitting), got ", strategy);
  return sh;
}

// Whether to use face-splitting (multiply-add counts of the two ways).
inline bool hadamard_face_split(const HadamardShape& sh, int64_t n, int64_t strategy, bool backward) {
  if (strategy != kHadAuto) return strategy == kHadFaceSplit;
  const double N = static_cast<double>(n), o = static_cast<double>(sh.out), i = static_cast<double>(sh.in);
  const double R = static_cast<double>(sh.r1) * static_cast<double>(sh.r2), r = static_cast<double>(sh.r1 + sh.r2);
  if (!backward) return N * R * (i + o) + R * (i + o) < o * i * r + N * i * o;
  // (2): U, gU, gKA, gKB, gx;  (1): dW, gx, gdW, H, four factor GEMMs.
  return N * R * (3 * i + 2 * o) + R * (i + o) < 4 * o * i * r + 2 * N * i * o;
}

// KB = B1^T . B2^T [in, R] and KA = s A1 . A2 [out, R] in x's dtype.
template <class BK>
std::pair<at::Tensor, at::Tensor> hadamard_face_split_factors(const HadamardShape& sh, const HadamardOpmath& f,
                                                              double scale, at::ScalarType dtype) {
  const auto opts = f.A1.options().dtype(dtype);
  const int64_t R = sh.r1 * sh.r2;
  at::Tensor KB = at::empty({sh.in, R}, opts);
  at::Tensor KA = at::empty({sh.out, R}, opts);
  if (KB.numel() > 0) BK::face_split(f.B1.t().contiguous(), f.B2.t().contiguous(), 1.0, KB);
  if (KA.numel() > 0) BK::face_split(f.A1, f.A2, scale, KA);
  return {KB, KA};
}

template <class BK>
at::Tensor hadamard_linear_forward_impl(const at::Tensor& x, const at::Tensor& w1_a, const at::Tensor& w1_b,
                                        const at::Tensor& w2_a, const at::Tensor& w2_b, double scale,
                                        int64_t strategy) {
  const HadamardShape sh = check_hadamard_linear(x, w1_a, w1_b, w2_a, w2_b, strategy);
  typename BK::Guard guard(x.device());
  const int64_t n = x.size(0);
  if (n == 0 || sh.out == 0) return at::zeros({n, sh.out}, x.options());
  const HadamardOpmath f = hadamard_opmath_factors(w1_a, w1_b, w2_a, w2_b);
  if (hadamard_face_split(sh, n, strategy, false)) {
    auto [KB, KA] = hadamard_face_split_factors<BK>(sh, f, scale, x.scalar_type());
    return at::mm(at::mm(x, KB), KA.t());
  }
  const at::Tensor dW = hadamard_delta_core<BK>(sh, f, scale, x.scalar_type());
  return at::mm(x, dW.t());
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hadamard_linear_backward_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1_a, const at::Tensor& w1_b,
    const at::Tensor& w2_a, const at::Tensor& w2_b, double scale, int64_t strategy) {
  const HadamardShape sh = check_hadamard_linear(x, w1_a, w1_b, w2_a, w2_b, strategy);
  const int64_t n = x.size(0);
  check_dim(grad_y, 2, "grad_y");
  check_same_dtype(grad_y, x, "grad_y", "x");
  check_same_device(grad_y, x, "grad_y", "x");
  check_size(grad_y, 0, n, "grad_y", "the number of rows of x");
  check_size(grad_y, 1, sh.out, "grad_y", "out_features (w1_a.size(0))");
  typename BK::Guard guard(x.device());
  const auto opts = x.options();
  const at::ScalarType dt = x.scalar_type();
  if (n == 0 || sh.out == 0 || sh.in == 0) {
    return {at::zeros({n, sh.in}, opts), at::zeros({sh.out, sh.r1}, opts), at::zeros({sh.r1, sh.in}, opts),
            at::zeros({sh.out, sh.r2}, opts), at::zeros({sh.r2, sh.in}, opts)};
  }
  const HadamardOpmath f = hadamard_opmath_factors(w1_a, w1_b, w2_a, w2_b);
  if (!hadamard_face_split(sh, n, strategy, true)) {
    const at::Tensor dW = hadamard_delta_core<BK>(sh, f, scale, dt);
    at::Tensor gx = at::mm(grad_y, dW);
    const at::Tensor gdW = at::mm(grad_y.t(), x);  // [out, in]
    auto [g1a, g1b, g2a, g2b] = hadamard_delta_backward_core<BK>(sh, f, gdW, scale, dt);
    return {gx, g1a, g1b, g2a, g2b};
  }
  // y = U KA^T, U = x KB:  gU = G KA;  gKA = G^T U;  gKB = x^T gU;  gx = gU KB^T.
  auto [KB, KA] = hadamard_face_split_factors<BK>(sh, f, scale, dt);
  const at::Tensor U = at::mm(x, KB);
  const at::Tensor gU = at::mm(grad_y, KA);
  at::Tensor gx = at::mm(gU, KB.t());
  const at::ScalarType op = f.A1.scalar_type();
  // KA[o, p r2 + q] = s A1[o, p] A2[o, q];  KB[i, p r2 + q] = B1[p, i] B2[q, i].
  const at::Tensor gKA = at::mm(grad_y.t(), U).to(op).view({sh.out, sh.r1, sh.r2});
  const at::Tensor gKB = at::mm(x.t(), gU).to(op).view({sh.in, sh.r1, sh.r2});
  at::Tensor g1a = at::bmm(gKA, f.A2.unsqueeze(2)).squeeze(2).mul_(scale);
  at::Tensor g2a = at::bmm(gKA.transpose(1, 2), f.A1.unsqueeze(2)).squeeze(2).mul_(scale);
  at::Tensor g1b = at::bmm(gKB, f.B2.t().unsqueeze(2)).squeeze(2).t();
  at::Tensor g2b = at::bmm(gKB.transpose(1, 2), f.B1.t().unsqueeze(2)).squeeze(2).t();
  return {gx, g1a.to(dt), g1b.to(dt).contiguous(), g2a.to(dt), g2b.to(dt).contiguous()};
}

}  // namespace fastpeft
