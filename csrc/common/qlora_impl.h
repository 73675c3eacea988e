// Device-independent drivers of qlora_forward / qlora_backward: lora_forward / lora_backward's math,
// outputs and saved tensors with the base weight in NF4. The base products go through the
// nf4_linear / nf4_linear_grad_input ops (looked up once in the dispatcher), so one driver serves
// every device that registers those; the rank-r GEMMs run through ATen and dropout through the lora
// backend `BK` (see lora_impl.h for what a backend provides).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/lora_impl.h"
#include "common/nf4_impl.h"

namespace fastpeft {

using OptTensor = std::optional<at::Tensor>;

// y = x W^T + bias through the dispatcher (below autograd: the caller's op is the one differentiated).
inline at::Tensor call_nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                  const OptTensor& nested_absmax, const OptTensor& nested_code,
                                  const OptTensor& offset, int64_t blocksize, int64_t out_features,
                                  const OptTensor& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastpeft::nf4_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                                               int64_t, const OptTensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias);
}

// grad_x = grad_y W through the dispatcher.
inline at::Tensor call_nf4_linear_grad_input(const at::Tensor& grad_y, const at::Tensor& packed,
                                             const at::Tensor& absmax, const OptTensor& nested_absmax,
                                             const OptTensor& nested_code, const OptTensor& offset,
                                             int64_t blocksize, int64_t in_features) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastpeft::nf4_linear_grad_input", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                                               int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad_y, packed, absmax, nested_absmax, nested_code, offset, blocksize, in_features);
}

// x [N, in] of an NF4 dtype; lora_A [r, in], lora_B [out, r] of x's dtype and device.
inline void check_qlora_args(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  check_dim(x, 2, "x");
  nf4::check_float_input(x, "x");
  check_dim(lora_B, 2, "lora_B");
  check_lora_factors(lora_A, lora_B, x, "x", x.size(1), "in_features (x.size(1))", lora_B.size(0));
}

template <class BK>
std::tuple<at::Tensor, at::Tensor> qlora_forward_impl(const at::Tensor& x, const at::Tensor& packed,
                                                      const at::Tensor& absmax, const OptTensor& nested_absmax,
                                                      const OptTensor& nested_code, const OptTensor& offset,
                                                      int64_t blocksize, const OptTensor& bias,
                                                      const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                      double scaling, double dropout_p, const at::Tensor& seed) {
  check_qlora_args(x, lora_A, lora_B);
  const DropoutSpec d = make_dropout(dropout_p, seed);
  typename BK::Guard guard(x.device());
  const int64_t n = x.size(0), in = x.size(1), out = lora_B.size(0), r = lora_A.size(0);
  // Checks the weight and bias too (with out = lora_B.size(0)).
  at::Tensor y = call_nf4_linear(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out, bias);
  at::Tensor u = at::empty({n, r}, x.options());
  if (n == 0) return {y, u};
  if (!d.active) {
    at::mm_out(u, x, lora_A.t());
  } else {
    const int64_t ch = std::min(n, BK::chunk_rows(in, ChunkKind::kSmallGemm));
    at::Tensor xdrop = BK::scratch(0, ch, in, x.options());
    for (int64_t r0 = 0; r0 < n; r0 += ch) {
      const int64_t rows = std::min(ch, n - r0);
      at::Tensor xa = xdrop.narrow(0, 0, rows);
      BK::dropout_rows(x, r0, d, xa);
      at::Tensor ub = u.narrow(0, r0, rows);
      at::mm_out(ub, xa, lora_A.t());
    }
  }
  y.addmm_(u, lora_B.t(), 1.0, scaling);
  return {y, u};
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor> qlora_backward_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset, int64_t blocksize,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& u, double scaling, double dropout_p,
    const at::Tensor& seed, bool need_grad_x) {
  check_qlora_args(x, lora_A, lora_B);
  const int64_t n = x.size(0), in = x.size(1), out = lora_B.size(0), r = lora_A.size(0);
  check_rows(grad_y, n, out, x, "grad_y", "out_features (lora_B.size(0))");
  check_rows(u, n, r, x, "u", "the rank (lora_A.size(0))");
  const DropoutSpec d = make_dropout(dropout_p, seed);
  typename BK::Guard guard(x.device());
  // The weight is checked by nf4_linear_grad_input (also when grad_x is not needed: a zero-row call).
  at::Tensor grad_x = call_nf4_linear_grad_input(need_grad_x ? grad_y : grad_y.narrow(0, 0, 0), packed, absmax,
                                                 nested_absmax, nested_code, offset, blocksize, in);
  if (!need_grad_x) grad_x = at::empty({0}, x.options());
  if (n == 0) return {grad_x, at::zeros({r, in}, x.options()), at::zeros({out, r}, x.options())};

  // gu = s g B;  grad_B = s g^T u;  grad_x += mult * (gu A);  grad_A = gu^T drop(x) (in fp32 for
  // reduced precision, as lora_backward).
  const at::ScalarType op = opmath_of(x.scalar_type());
  at::Tensor gu = at::empty({n, r}, x.options());
  mm_alpha_out(gu, grad_y, lora_B, scaling);
  at::Tensor accBt = at::zeros({r, out}, x.options().dtype(op));
  accumulate_tn_alpha(accBt, u, grad_y, scaling);
  at::Tensor accA = at::zeros({r, in}, x.options().dtype(op));
  if (!d.active) {
    if (need_grad_x) grad_x.addmm_(gu, lora_A);
    accumulate_tn(accA, gu, x);
  } else {
    const int64_t ch = std::min(n, BK::chunk_rows(in, ChunkKind::kSmallGemm));
    at::Tensor scratch = BK::scratch(0, ch, in, x.options());
    for (int64_t r0 = 0; r0 < n; r0 += ch) {
      const int64_t rows = std::min(ch, n - r0);
      at::Tensor xa = scratch.narrow(0, 0, rows);
      const at::Tensor gub = gu.narrow(0, r0, rows);
      if (need_grad_x) {
        at::mm_out(xa, gub, lora_A);
        at::Tensor gxb = grad_x.narrow(0, r0, rows);
        BK::dropout_bwd_fused(x, r0, d, xa, gxb);  // grad_x_b += mult * (gu_b A); xa <- drop(x_b)
      } else {
        BK::dropout_rows(x, r0, d, xa);
      }
      accumulate_tn(accA, gub, xa);
    }
  }
  return {grad_x, accA.to(x.scalar_type()), accBt.t().to(x.scalar_type()).contiguous()};
}

}  // namespace fastpeft
