// Device-independent drivers of the multi-adapter LoRA mix (X-LoRA): multi_lora_mix and
// multi_lora_mix_backward. As in lora_impl.h, the large products run as ATen GEMMs (MKL/oneDNN on
// the CPU, cuBLAS on the current CUDA stream) and a backend `BK` (csrc/cpu/multi_lora.cpp,
// csrc/cuda/multi_lora.cu) supplies the small fused elementwise passes between them.
//
// With n adapters of rank r (A_j [r, in], B_j [out, r]) and per-token weights s [T, n]:
//   y = base + sum_j s[:, j] * (x A_j^T) B_j^T
// is computed as ONE shrink over all adapters, u = x A_cat^T ([T, n r], A_cat = lora_A viewed
// [n r, in]); one pass v = u * s scaling each adapter's r-wide column block; ONE expand
// y = base + v B_cat^T (beta = 1 onto base; B_cat [out, n r], B_cat[:, j r + k] = B_j[:, k]).
// No [T, n, out] temporary exists; backward goes through rank-sized [T, n r] intermediates only:
//   gv = g B_cat;  gu = gv * s;  ds[t, j] = sum_k gv[t, j r + k] u[t, j r + k];
//   grad_x = gu A_cat;  grad_A_cat = gu^T x;  grad_B_cat = g^T (u * s).
//
// A backend provides:
//   using Guard;
//   void mix_scale(u, s, r, v);
//        // v[t, j r + k] = u[t, j r + k] * s[t, j]   (u, v contiguous [T, n r]; s op-math [T, n])
//   void mix_scale_backward(gv, u, s, r, gu, v, ds);
//        // gu = gv * s (per block); v = u * s (skipped when v is undefined);
//        // ds[t, j] = sum_k gv[t, j r + k] u[t, j r + k]  (op-math)
//   void drop_rows(x, row0, d, out);      // out[i, c] = x[i, c] * mult(row0 + i, c)   (all rows of x)
//   void drop_bwd(x, row0, d, t, gx);     // gx[i, c] += t[i, c] * mult;  t[i, c] = x[i, c] * mult
// with mult(row, col) = keep(seed, row * in + col) ? 1 / (1 - p) : 0 (dropout_hash.h, as the lora
// family). With dropout, adapter j's input is drop(x) with row0 = j T: the masks of x repeated n times.
// Elementwise math is op-math (float32; float64 for float64), rounded once to x's dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/lora_impl.h"

namespace fastpeft {

inline at::ScalarType multi_lora_opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline DropoutSpec multi_lora_dropout(double p, const std::optional<at::Tensor>& seed) {
  check_dropout_p(p);
  if (p == 0.0) return DropoutSpec{};
  TORCH_CHECK(seed.has_value() && seed->defined(), "fastpeft: 'seed' is required when dropout_p > 0 ",
              "(use fastpeft.ops.new_dropout_seed())");
  return make_dropout(p, *seed);
}

// x [T, in]; lora_A [n, r, in]; lora_B [n, out, r]; scalings [T, n] (x's dtype or float32).
inline void check_multi_lora_args(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                  const at::Tensor& scalings) {
  check_dim(x, 2, "x");
  check_floating(x, "x");
  check_dim(lora_A, 3, "lora_A");
  check_dim(lora_B, 3, "lora_B");
  check_same_dtype(lora_A, x, "lora_A", "x");
  check_same_dtype(lora_B, x, "lora_B", "x");
  check_same_device(lora_A, x, "lora_A", "x");
  check_same_device(lora_B, x, "lora_B", "x");
  check_size(lora_A, 2, x.size(1), "lora_A", "in_features (x.size(1))");
  check_size(lora_B, 0, lora_A.size(0), "lora_B", "the number of adapters (lora_A.size(0))");
  check_size(lora_B, 2, lora_A.size(1), "lora_B", "the rank (lora_A.size(1))");
  check_dim(scalings, 2, "scalings");
  check_floating(scalings, "scalings");
  TORCH_CHECK(scalings.scalar_type() == x.scalar_type() || scalings.scalar_type() == at::kFloat,
              "fastpeft: 'scalings' must have x's dtype (", x.scalar_type(), ") or float32, got ",
              scalings.scalar_type());
  check_same_device(scalings, x, "scalings", "x");
  check_size(scalings, 0, x.size(0), "scalings", "the number of rows of x");
  check_size(scalings, 1, lora_A.size(0), "scalings", "the number of adapters (lora_A.size(0))");
}

template <class BK>
std::tuple<at::Tensor, at::Tensor> multi_lora_mix_impl(const at::Tensor& x, const at::Tensor& lora_A,
                                                       const at::Tensor& lora_B, const at::Tensor& scalings,
                                                       const std::optional<at::Tensor>& base, double dropout_p,
                                                       const std::optional<at::Tensor>& seed) {
  check_multi_lora_args(x, lora_A, lora_B, scalings);
  const DropoutSpec d = multi_lora_dropout(dropout_p, seed);
  const int64_t T = x.size(0), in = x.size(1), n = lora_A.size(0), r = lora_A.size(1), out = lora_B.size(1);
  const bool has_base = base.has_value() && base->defined();
  if (has_base) {
    check_dim(*base, 2, "base");
    check_same_dtype(*base, x, "base", "x");
    check_same_device(*base, x, "base", "x");
    check_size(*base, 0, T, "base", "the number of rows of x");
    check_size(*base, 1, out, "base", "out_features (lora_B.size(1))");
  }
  typename BK::Guard guard(x.device());
  const int64_t nr = n * r;
  at::Tensor u = at::empty({T, nr}, x.options());
  at::Tensor y = at::empty({T, out}, x.options());
  if (T == 0) return {y, u};
  if (nr == 0 || in == 0) {
    u.zero_();
    if (has_base) {
      y.copy_(*base);
    } else {
      y.zero_();
    }
    return {y, u};
  }
  if (!d.active) {
    at::mm_out(u, x, lora_A.reshape({nr, in}).t());                  // the one shrink (a view when contiguous)
  } else {
    at::Tensor xd = at::empty({T, in}, x.options());                 // drop_j(x), one adapter at a time
    for (int64_t j = 0; j < n; ++j) {
      BK::drop_rows(x, j * T, d, xd);
      u.narrow(1, j * r, r).copy_(at::mm(xd, lora_A.select(0, j).t()));
    }
  }
  const at::Tensor s = scalings.to(multi_lora_opmath(x.scalar_type())).contiguous();
  at::Tensor v = at::empty({T, nr}, x.options());
  BK::mix_scale(u, s, r, v);                                          // per-adapter block scaling
  const at::Tensor Bt_cat = lora_B.transpose(1, 2).reshape({nr, out});  // [n r, out] (a small copy)
  if (has_base) {
    at::addmm_out(y, *base, v, Bt_cat);                               // the one expand, onto base
  } else {
    at::mm_out(y, v, Bt_cat);
  }
  return {y, u};
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_mix_backward_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& scalings, const at::Tensor& u, bool need_grad_x, bool need_grad_weights, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  check_multi_lora_args(x, lora_A, lora_B, scalings);
  const DropoutSpec d = multi_lora_dropout(dropout_p, seed);
  const int64_t T = x.size(0), in = x.size(1), n = lora_A.size(0), r = lora_A.size(1), out = lora_B.size(1);
  const int64_t nr = n * r;
  check_dim(grad_y, 2, "grad_y");
  check_same_dtype(grad_y, x, "grad_y", "x");
  check_same_device(grad_y, x, "grad_y", "x");
  check_size(grad_y, 0, T, "grad_y", "the number of rows of x");
  check_size(grad_y, 1, out, "grad_y", "out_features (lora_B.size(1))");
  check_dim(u, 2, "u");
  check_same_dtype(u, x, "u", "x");
  check_same_device(u, x, "u", "x");
  check_size(u, 0, T, "u", "the number of rows of x");
  check_size(u, 1, nr, "u", "adapters * rank (lora_A.size(0) * lora_A.size(1))");
  typename BK::Guard guard(x.device());
  const at::ScalarType op = multi_lora_opmath(x.scalar_type());
  const auto empty0 = [&] { return at::empty({0}, x.options()); };
  if (T == 0 || nr == 0) {
    return {need_grad_x ? at::zeros({T, in}, x.options()) : empty0(),
            need_grad_weights ? at::zeros({n, r, in}, x.options()) : empty0(),
            need_grad_weights ? at::zeros({n, out, r}, x.options()) : empty0(),
            at::zeros({T, n}, scalings.options())};
  }
  const at::Tensor g = grad_y.contiguous();
  const at::Tensor uc = u.contiguous();
  const at::Tensor B_cat = lora_B.permute({1, 0, 2}).reshape({out, nr});  // [out, n r] (a small copy)
  const at::Tensor gv = at::mm(g, B_cat);                                 // [T, n r]
  const at::Tensor s = scalings.to(op).contiguous();
  at::Tensor gu = at::empty({T, nr}, x.options());
  at::Tensor v = need_grad_weights ? at::empty({T, nr}, x.options()) : at::Tensor();
  at::Tensor ds = at::empty({T, n}, x.options().dtype(op));
  BK::mix_scale_backward(gv, uc, s, r, gu, v, ds);
  at::Tensor grad_x = empty0(), grad_A = empty0(), grad_B = empty0();
  if (!d.active) {
    const at::Tensor A_cat = lora_A.reshape({nr, in});
    if (need_grad_x) grad_x = at::mm(gu, A_cat);
    if (need_grad_weights) grad_A = at::mm(gu.t(), x).view({n, r, in});
  } else if (need_grad_x || need_grad_weights) {
    // per adapter: t = gu_j A_j; grad_x += mult_j * t and t <- drop_j(x) (one pass); grad_A_j = gu_j^T t
    if (need_grad_x) grad_x = at::zeros({T, in}, x.options());
    if (need_grad_weights) grad_A = at::empty({n, r, in}, x.options());
    at::Tensor t = at::empty({T, in}, x.options());
    for (int64_t j = 0; j < n; ++j) {
      const at::Tensor gu_j = gu.narrow(1, j * r, r);
      if (need_grad_x) {
        at::mm_out(t, gu_j, lora_A.select(0, j));
        BK::drop_bwd(x, j * T, d, t, grad_x);
      } else {
        BK::drop_rows(x, j * T, d, t);
      }
      if (need_grad_weights) grad_A.select(0, j).copy_(at::mm(gu_j.t(), t));
    }
  }
  if (need_grad_weights) grad_B = at::mm(g.t(), v).view({out, n, r}).permute({1, 0, 2}).contiguous();
  return {grad_x, grad_A, grad_B, ds.to(scalings.scalar_type())};
}

}  // namespace fastpeft
