// Device-independent drivers of the ia3 family (ia3_forward / ia3_backward, IA3 Linear).
//
// peft's IA3 Linear with a frozen base W [out, in], bias b [out] or none, and the IA3 vector s:
//   scale_input = true  (peft "feedforward" modules, s [in]):  y = (x * s) W^T + b
//   scale_input = false (s [out]):                             y = (x W^T + b) * s
// The scaling math is op-math (float32; float64 for float64) and rounded once to x's dtype; s may
// be x's dtype or float32 (peft keeps IA3 vectors in float32 for bf16/fp16 models).
// The base GEMM is ATen (MKL/oneDNN on the CPU, cuBLAS on the current stream); the elementwise work
// around it is ONE fused pass per direction, supplied by the backend BK:
//   using Guard;   // device guard from an at::Device
//   // dst[n, j] = T(M(src[n, j]) * M(scale[j])); when acc is given also
//   // gsum[j] += sum_n M(src[n, j]) * M(acc[n, j]) (gsum op-math [C], zero on entry).
//   // src, dst, acc contiguous [N, C] of x's dtype; dst may be src (in place).
//   static void scale_cols(const at::Tensor& src, const at::Tensor& scale, at::Tensor& dst,
//                          const at::Tensor* acc, at::Tensor* gsum);
// Saved for backward: input scaling saves x only (x * s is a temporary of the forward, freed after
// its GEMM); output scaling saves the pre-scale output y0 = x W^T + b only (x is not needed).
// Backward:
//   input:  g = grad_y W;  one pass: grad_s = sum_n g * x,  grad_x = g * s (in place in g)
//   output: one pass: grad_s = sum_n grad_y * y0,  gl = grad_y * s;  grad_x = gl W
//   grad_b = sum_n grad_y (input) or sum_n gl (output), op-math sums.
// W gets no gradient (the op is for frozen base weights).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>

#include <optional>
#include <tuple>

#include "common/checks.h"

namespace fastpeft {

inline at::ScalarType ia3_opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks x [N, in], weight [out, in], bias [out] or none, scale [in] or [out]; returns (in, out).
inline std::pair<int64_t, int64_t> check_ia3_args(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                                                  bool scale_input) {
  check_dim(x, 2, "x");
  check_floating(x, "x");
  check_dim(weight, 2, "weight");
  check_same_dtype(weight, x, "weight", "x");
  check_same_device(weight, x, "weight", "x");
  const int64_t in = weight.size(1), out = weight.size(0);
  check_size(x, 1, in, "x", "in_features (weight.size(1))");
  if (bias.has_value() && bias->defined()) {
    check_dim(*bias, 1, "bias");
    check_same_dtype(*bias, x, "bias", "x");
    check_same_device(*bias, x, "bias", "x");
    check_size(*bias, 0, out, "bias", "out_features (weight.size(0))");
  }
  check_dim(scale, 1, "scale");
  check_same_device(scale, x, "scale", "x");
  TORCH_CHECK(scale.scalar_type() == x.scalar_type() || scale.scalar_type() == at::kFloat,
              "fastpeft: 'scale' must have x's dtype (", x.scalar_type(), ") or float32, got ",
              scale.scalar_type());
  if (scale_input) {
    check_size(scale, 0, in, "scale", "in_features (weight.size(1); scale_input=True scales the input)");
  } else {
    check_size(scale, 0, out, "scale", "out_features (weight.size(0); scale_input=False scales the output)");
  }
  return {in, out};
}

inline at::Tensor ia3_base(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) return at::addmm(*bias, x, weight.t());
  return at::mm(x, weight.t());
}

// Returns (y, y0): y0 is the pre-scale output x W^T + b for scale_input=false (saved for backward)
// and an empty [0] tensor for scale_input=true.
template <class BK>
std::tuple<at::Tensor, at::Tensor> ia3_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                                                    bool scale_input) {
  const auto [in, out] = check_ia3_args(x, weight, bias, scale, scale_input);
  typename BK::Guard guard(x.device());
  const int64_t n = x.size(0);
  const at::Tensor s = scale.contiguous();
  if (scale_input) {
    const at::Tensor xc = x.contiguous();
    at::Tensor xs = at::empty({n, in}, x.options());
    if (n * in > 0) BK::scale_cols(xc, s, xs, nullptr, nullptr);
    at::Tensor y = ia3_base(xs, weight, bias);
    return {y, at::empty({0}, x.options())};
  }
  const at::Tensor y0 = ia3_base(x, weight, bias).contiguous();
  at::Tensor y = at::empty({n, out}, x.options());
  if (n * out > 0) BK::scale_cols(y0, s, y, nullptr, nullptr);
  return {y, y0};
}

// Returns (grad_x, grad_scale, grad_bias). `saved` is x (scale_input=true) or y0 (false).
// grad_x is an empty [0] tensor when !need_grad_x (the output-scaling GEMM is then skipped),
// grad_bias one when !need_grad_bias; grad_scale has scale's dtype.
template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ia3_backward_impl(const at::Tensor& grad_y, const at::Tensor& saved,
                                                                 const at::Tensor& weight, const at::Tensor& scale,
                                                                 bool scale_input, bool need_grad_x,
                                                                 bool need_grad_bias) {
  check_dim(grad_y, 2, "grad_y");
  check_floating(grad_y, "grad_y");
  check_dim(saved, 2, "saved");
  check_same_dtype(saved, grad_y, "saved", "grad_y");
  check_same_device(saved, grad_y, "saved", "grad_y");
  check_dim(weight, 2, "weight");
  check_same_dtype(weight, grad_y, "weight", "grad_y");
  check_same_device(weight, grad_y, "weight", "grad_y");
  const int64_t in = weight.size(1), out = weight.size(0), n = grad_y.size(0);
  check_size(grad_y, 1, out, "grad_y", "out_features (weight.size(0))");
  check_size(saved, 0, n, "saved", "the number of rows of grad_y");
  check_size(saved, 1, scale_input ? in : out, "saved",
             scale_input ? "in_features (saved is x)" : "out_features (saved is y0)");
  check_dim(scale, 1, "scale");
  check_same_device(scale, grad_y, "scale", "grad_y");
  TORCH_CHECK(scale.scalar_type() == grad_y.scalar_type() || scale.scalar_type() == at::kFloat,
              "fastpeft: 'scale' must have grad_y's dtype (", grad_y.scalar_type(), ") or float32, got ",
              scale.scalar_type());
  check_size(scale, 0, scale_input ? in : out, "scale", scale_input ? "in_features" : "out_features");
  typename BK::Guard guard(grad_y.device());
  const auto opts = grad_y.options();
  const at::ScalarType op = ia3_opmath(grad_y.scalar_type());
  const at::Tensor s = scale.contiguous();
  const at::Tensor gy = grad_y.contiguous();
  const at::Tensor sv = saved.contiguous();
  at::Tensor gsum = at::zeros({scale.size(0)}, opts.dtype(op));
  at::Tensor gx, gb;
  if (scale_input) {
    at::Tensor g = at::mm(gy, weight).contiguous();  // [N, in]
    if (n * in > 0) BK::scale_cols(g, s, g, &sv, &gsum);
    gx = need_grad_x ? g : at::empty({0}, opts);
    gb = need_grad_bias ? at::sum(gy, {0}, false, op).to(grad_y.scalar_type()) : at::empty({0}, opts);
  } else {
    at::Tensor gl = at::empty({n, out}, opts);
    if (n * out > 0) BK::scale_cols(gy, s, gl, &sv, &gsum);
    gx = need_grad_x ? at::mm(gl, weight) : at::empty({0}, opts);
    gb = need_grad_bias ? at::sum(gl, {0}, false, op).to(grad_y.scalar_type()) : at::empty({0}, opts);
  }
  return {gx, gsum.to(scale.scalar_type()), gb};
}

}  // namespace fastpeft
