// Device-independent drivers of the cayley-family ops (OFT, BOFT): cayley and cayley_backward.
//
// cayley(S [n, b, b], k) -> R [n, b, b] in S's dtype, computed in op-math (float32, float64 for
// float64) and rounded once:
//   k == 0: R = (I - S)(I + S)^-1 = 2 (I + S)^-1 - I (peft's exact form); the inverse by
//           Gauss-Jordan elimination with partial pivoting, so any nonsingular I + S works (with S
//           skew-symmetric it always is; a singular one gives inf/nan, it is not detected).
//   k >= 1: R = p(S) = sum_{j<=m} c_j S^j, peft OFT's truncated Neumann series (see
//           neumann_degree / neumann_coefficient), evaluated by Horner: H = c_m I, H = c_j I + S H.
// cayley_backward(G = dL/dR, S, R, k) -> dL/dS (the plain matrix derivative; S need not be skew):
//   k == 0: with W = (I + S)^-1, dS = -2 W^T G W^T. W = (R + I) / 2 from the saved output when R
//           holds op-math values (float32/float64 inputs), else recomputed from S in op-math (R in
//           bf16/fp16 carries only ~3 digits).
//   k == 1: R = I, dS = 0.
//   k >= 2: with T = S^T, dS = sum_{j<=m} c_j sum_{a+r=j-1} T^a G T^r = sum_r Z_r T^r where
//           Z_r = sum_{a<=m-1-r} c_(a+r+1) Y_a, Y_a = T^a G; as c_j = 2 below the top power,
//           Z_r = 2 C + c_m Y_(m-1-r) with C = Y_0 + ... + Y_(m-2-r). Horner on the right runs r down
//           while Y and C run up, so one pass, two b x b products a step, no powers stored:
//           Y = G, C = 0, acc = c_m G; for r = m-2 .. 0: C += Y, Y = T Y, acc = 2 C + c_m Y + acc T.
//
// A backend BK provides (tensors contiguous; T the input dtype, M its op-math type):
//   using Guard;
//   static bool fused_forward(int64_t b, at::ScalarType dtype, int64_t k);
//   static void forward(S (T), k, out (T));                      // when fused_forward
//   static void inverse(S (T), out (M));                         // (I + S)^-1, when fused_forward(b, dtype, 0)
// (the CPU backend takes every exact-form block itself: Gauss-Jordan, or LAPACK one block per call).
//   static constexpr bool kHasFusedBackward; and if true:
//   static bool fused_backward(int64_t b, at::ScalarType dtype, int64_t k);
//   static void backward(G (T), S (T), R (T), k, out (T));        // when fused_backward
// Blocks the fused kernels do not take go through ATen (batched LU inverse, bmm) in op-math.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/linalg_inv_ex.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "common/checks.h"

namespace fastpeft {

// Degree m of peft's Neumann polynomial with k terms: k = 1 -> 0 (R = I), k = 2 -> 1 (I + 2S),
// k >= 3 -> max(k - 1, 3) (peft's loop gives k = 3 and k = 4 the same polynomial).
inline int64_t neumann_degree(int64_t k) { return k <= 2 ? k - 1 : std::max<int64_t>(k - 1, 3); }

// Coefficient of S^j: 1 for j = 0 and for the top power when k >= 3, else 2.
inline double neumann_coefficient(int64_t j, int64_t k) {
  if (j == 0) return 1.0;
  return (k >= 3 && j == neumann_degree(k)) ? 1.0 : 2.0;
}

inline at::ScalarType cayley_opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_cayley_skew(const at::Tensor& t, const char* name) {
  check_dim(t, 3, name);
  check_floating(t, name);
  TORCH_CHECK(t.size(1) == t.size(2), "fastpeft: '", name, "' must be a batch of square blocks [n, b, b], got shape ",
              t.sizes());
}

inline void check_neumann_terms(int64_t k) {
  TORCH_CHECK(k >= 0, "fastpeft: 'num_neumann_terms' must be >= 0 (0 = the exact Cayley transform), got ", k);
}

// An [n, b, b] view of the op-math identity.
inline at::Tensor batched_eye(int64_t n, int64_t b, const at::TensorOptions& opts) {
  return at::eye(b, opts).expand({n, b, b});
}

// (I + S)^-1 in op-math; S any floating dtype.
template <class BK>
at::Tensor cayley_inverse(const at::Tensor& skew) {
  const int64_t n = skew.size(0), b = skew.size(1);
  const at::ScalarType op = cayley_opmath(skew.scalar_type());
  if (BK::fused_forward(b, skew.scalar_type(), 0)) {
    at::Tensor inv = at::empty({n, b, b}, skew.options().dtype(op));
    BK::inverse(skew.contiguous(), inv);
    return inv;
  }
  const at::Tensor a = skew.to(op).add(batched_eye(n, b, skew.options().dtype(op)));
  return std::get<0>(at::linalg_inv_ex(a));
}

template <class BK>
at::Tensor cayley_impl(const at::Tensor& skew, int64_t k) {
  check_cayley_skew(skew, "skew");
  check_neumann_terms(k);
  typename BK::Guard guard(skew.device());
  const int64_t n = skew.size(0), b = skew.size(1);
  at::Tensor out = at::empty({n, b, b}, skew.options());
  if (out.numel() == 0) return out;
  if (BK::fused_forward(b, skew.scalar_type(), k)) {
    BK::forward(skew.contiguous(), k, out);
    return out;
  }
  const auto opts = skew.options().dtype(cayley_opmath(skew.scalar_type()));
  at::Tensor r;
  if (k == 0) {
    r = cayley_inverse<BK>(skew).mul_(2.0);
    r.diagonal(0, 1, 2).sub_(1.0);
  } else {
    const int64_t m = neumann_degree(k);
    const at::Tensor s = skew.to(opts.dtype()).contiguous();
    r = at::zeros({n, b, b}, opts);
    if (m == 0) {
      r.diagonal(0, 1, 2).fill_(1.0);
    } else {
      r.add_(s, neumann_coefficient(m, k));
      r.diagonal(0, 1, 2).add_(neumann_coefficient(m - 1, k));
    }
    for (int64_t j = m - 2; j >= 0; --j) {
      r = at::bmm(s, r);
      r.diagonal(0, 1, 2).add_(neumann_coefficient(j, k));
    }
  }
  out.copy_(r);
  return out;
}

template <class BK>
at::Tensor cayley_backward_impl(const at::Tensor& grad_r, const at::Tensor& skew, const at::Tensor& r, int64_t k) {
  check_cayley_skew(skew, "skew");
  check_neumann_terms(k);
  for (auto [t, name] : {std::pair{&grad_r, "grad_r"}, std::pair{&r, "r"}}) {
    check_dim(*t, 3, name);
    check_same_dtype(*t, skew, name, "skew");
    check_same_device(*t, skew, name, "skew");
    for (int64_t d = 0; d < 3; ++d) check_size(*t, d, skew.size(d), name, "the same dim of 'skew'");
  }
  typename BK::Guard guard(skew.device());
  const int64_t n = skew.size(0), b = skew.size(1);
  const at::ScalarType dt = skew.scalar_type(), op = cayley_opmath(dt);
  if (n * b == 0 || k == 1) return at::zeros({n, b, b}, skew.options());  // k = 1: R = I
  if constexpr (BK::kHasFusedBackward) {
    if (BK::fused_backward(b, dt, k)) {
      at::Tensor out = at::empty({n, b, b}, skew.options());
      BK::backward(grad_r.contiguous(), skew.contiguous(), r.contiguous(), k, out);
      return out;
    }
  }
  const auto opts = skew.options().dtype(op);
  const at::Tensor g = grad_r.to(op);
  at::Tensor ds;
  if (k == 0) {
    at::Tensor w;
    if (dt == op) {
      w = r.add(batched_eye(n, b, opts));
      w.mul_(0.5);
    } else {
      w = cayley_inverse<BK>(skew);
    }
    const at::Tensor wt = w.transpose(1, 2);
    ds = at::bmm(at::bmm(wt, g), wt).mul_(-2.0);
  } else {
    const int64_t m = neumann_degree(k);
    const double top = neumann_coefficient(m, k);
    const at::Tensor st = skew.to(op).transpose(1, 2);
    at::Tensor y = g;
    at::Tensor c = at::zeros({n, b, b}, opts);
    ds = g.mul(top);
    for (int64_t r = m - 2; r >= 0; --r) {
      c.add_(y);
      y = at::bmm(st, y);
      ds = at::baddbmm(c.mul(2.0).add_(y, top), ds, st);
    }
  }
  return ds.to(dt);
}

}  // namespace fastpeft
