// Device-independent drivers of the lora-family ops (seeded_dropout, lora_forward/backward,
// dora_weight_norm, dora_forward/backward). Each driver checks its arguments, runs the large GEMMs
// through ATen (MKL/oneDNN on the CPU, cuBLAS on the current CUDA stream) and hands the fused
// elementwise parts to a backend `BK` (csrc/cpu/lora.cpp, csrc/cuda/lora.cu), so the two devices
// share one formulation and differ only in their kernels.
//
// A backend provides (all tensors 2-D; "scratch" tensors are contiguous [rows, cols]):
//   using Guard;                         // device guard constructed from an at::Device
//   int64_t chunk_rows(int64_t cols, ChunkKind kind);
//                                        // rows per chunk of a [rows, cols] scratch buffer
//   FusedPlan fused_plan(int64_t in, int64_t out, at::ScalarType t);
//                                        // row blocking / GEMM order of the dropout-free drivers
//   at::Tensor scratch(int slot, int64_t rows, int64_t cols, const at::TensorOptions& opts);
//                                        // an uninitialised contiguous [rows, cols] work buffer,
//                                        // valid until the next scratch() call with the same slot
//                                        // on this thread (the CPU backend reuses one allocation
//                                        // per slot and thread, up to 8 MiB: a fresh multi-MiB
//                                        // buffer costs ~0.5 ms per MiB in first-touch page faults)
//   void dropout_rows(x, r0, drop, out); // out[i, c] = x[r0 + i, c] * mult(r0 + i, c)
//   void dropout_bwd_fused(x, r0, drop, t, gx);
//                                        // gx[i, c] += t[i, c] * mult;  t[i, c] = x[r0+i, c] * mult
//   void dora_epilogue(z, mn, bias, y);  // y = z * mn + bias            (per column mn, bias)
//   void dora_epilogue_dropout(z, q, mn, s, y);
//                                        // p = z; z = p + s q; y += (mn - 1) p + mn s q
//   void dora_grad_rows(g, z, mn, off, acc, h);
//                                        // h = g * (mn + off); acc[c] += sum_i g[i, c] z[i, c]
// where mult(row, col) = keep(seed, row * cols + col) ? 1 / (1 - p) : 0 (dropout_hash.h).
// mn, acc are the op-math type (float64 for float64 inputs, float32 otherwise).
//
// No driver materialises B A, the dropout mask or drop(x) for all rows: dropout is generated per row
// chunk into a small scratch buffer and regenerated in backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/dropout_hash.h"

namespace fastpeft {

// What a row chunk's scratch feeds: kSmallGemm - only rank-r GEMMs (drop(x) -> u, grad_A), keep it
// cache-sized; kBaseGemm - a base-sized GEMM (drop(x) W^T), large enough for the GEMM to run at
// full rate; kNoDropout - a gradient-sized temporary with no dropout in it (DoRA's g * m/n).
enum class ChunkKind { kSmallGemm, kBaseGemm, kNoDropout };

// How the dropout-free drivers run: in row blocks of `rows` (the base GEMM and every rank-r GEMM
// and epilogue on one block before the next, so the block's rows of x / grad_y / y / grad_x are
// re-read from cache rather than memory), and with `fold` either writing the rank-r term first and
// letting the base GEMM accumulate onto it (beta = 1), or base GEMM first and a beta = 1 rank-r
// GEMM after it.
// With `bias_in_gemm`, LoRA's forward appends the bias to the rank-r GEMM as one more inner-dimension
// term (and then folds) instead of broadcasting it into y. With `transposed_rank`, the [rows, r]
// products x A^T and g B are formed as their [r, rows] transposes A x^T and B^T g^T.
struct FusedPlan {
  int64_t rows;
  bool fold;
  bool bias_in_gemm;
  bool transposed_rank;
};

// What a kernel needs to regenerate the dropout multipliers.
struct DropoutSpec {
  bool active = false;     // p > 0
  uint64_t seed = 0;       // the seed tensor's int64 value, reinterpreted
  uint32_t threshold = 0;  // kept iff hash >= threshold
  double scale = 1.0;      // 1 / (1 - p)
};

inline DropoutSpec make_dropout(double p, const at::Tensor& seed) {
  check_dropout_p(p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "fastpeft: 'seed' must be a one-element int64 tensor, got dtype ", seed.scalar_type(),
              " and shape ", seed.sizes(), " (use fastpeft.ops.new_dropout_seed())");
  TORCH_CHECK(seed.device().is_cpu(), "fastpeft: 'seed' must be a CPU tensor, got one on ",
              seed.device(), " (use fastpeft.ops.new_dropout_seed())");
  DropoutSpec d;
  d.active = p > 0.0;
  d.seed = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  d.threshold = dropout_threshold(p);
  d.scale = 1.0 / (1.0 - p);
  return d;
}

// Rows per block for the LoRA drivers: the plan's, capped with dropout so that the block's drop(x)
// scratch stays about two base-GEMM chunks in size.
inline int64_t block_rows(const FusedPlan& plan, const DropoutSpec& d, int64_t n, int64_t base_chunk) {
  int64_t rows = std::min(n, plan.rows);
  if (d.active) rows = std::min(rows, 2 * base_chunk);
  return std::max<int64_t>(1, rows);
}

inline at::ScalarType opmath_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// lora_A [r, in] and lora_B [out, r]: 2-D, of `ref`'s dtype and device, sized for the layer
// (`in_what` names where in_features comes from, for the message).
inline void check_lora_factors(const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& ref,
                               const char* ref_name, int64_t in, const char* in_what, int64_t out) {
  check_dim(lora_A, 2, "lora_A");
  check_dim(lora_B, 2, "lora_B");
  check_same_dtype(lora_A, ref, "lora_A", ref_name);
  check_same_dtype(lora_B, ref, "lora_B", ref_name);
  check_same_device(lora_A, ref, "lora_A", ref_name);
  check_same_device(lora_B, ref, "lora_B", ref_name);
  check_size(lora_A, 1, in, "lora_A", in_what);
  check_size(lora_B, 1, lora_A.size(0), "lora_B", "the rank (lora_A.size(0))");
  check_size(lora_B, 0, out, "lora_B", "out_features (weight.size(0))");
}

// x [N, in], weight [out, in], bias [out]?, lora_A [r, in], lora_B [out, r]: one dtype, one device.
inline void check_lora_args(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B) {
  check_dim(x, 2, "x");
  check_floating(x, "x");
  check_dim(weight, 2, "weight");
  check_same_dtype(weight, x, "weight", "x");
  check_same_device(weight, x, "weight", "x");
  const int64_t in = x.size(1), out = weight.size(0);
  check_size(weight, 1, in, "weight", "in_features (x.size(1))");
  check_lora_factors(lora_A, lora_B, x, "x", in, "in_features (x.size(1))", out);
  if (bias.has_value() && bias->defined()) {
    check_dim(*bias, 1, "bias");
    check_same_dtype(*bias, x, "bias", "x");
    check_same_device(*bias, x, "bias", "x");
    check_size(*bias, 0, out, "bias", "out_features (weight.size(0))");
  }
}

inline void check_rows(const at::Tensor& t, int64_t n, int64_t cols, const at::Tensor& x,
                       const char* name, const char* cols_what) {
  check_dim(t, 2, name);
  check_same_dtype(t, x, name, "x");
  check_same_device(t, x, name, "x");
  check_size(t, 0, n, name, "the number of rows of x");
  check_size(t, 1, cols, name, cols_what);
}

inline void check_dora_vectors(const at::Tensor& magnitude, const at::Tensor& weight_norm,
                               const at::Tensor& x, int64_t out) {
  check_dim(magnitude, 1, "magnitude");
  check_same_dtype(magnitude, x, "magnitude", "x");
  check_same_device(magnitude, x, "magnitude", "x");
  check_size(magnitude, 0, out, "magnitude", "out_features (weight.size(0))");
  check_dim(weight_norm, 1, "weight_norm");
  check_floating(weight_norm, "weight_norm");
  check_same_device(weight_norm, x, "weight_norm", "x");
  check_size(weight_norm, 0, out, "weight_norm", "out_features (weight.size(0))");
}

// Accumulates mm(a^T, b) ([r, cols]) into acc; for reduced precision the chunk product is formed in
// the input dtype (fp32 accumulation inside the GEMM) and summed across chunks in fp32.
inline void accumulate_tn(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(a.t(), b);
  } else {
    acc.add_(at::mm(a.t(), b));
  }
}

// out = alpha a b, written without reading out (beta = 0: out may be uninitialised).
inline void mm_alpha_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (alpha == 1.0) {
    at::mm_out(out, a, b);
  } else {
    at::addmm_out(out, out, a, b, /*beta=*/0.0, alpha);
  }
}

// One row block of the rank-r shrink: ub = a_b A^T. With `uT` defined ([r, n]; FusedPlan.transposed_rank),
// through its columns r0.. (uT_b = A a_b^T, the layout oneDNN runs faster), then copied into ub.
inline void shrink_block(at::Tensor& ub, const at::Tensor& a_b, const at::Tensor& lora_A, const at::Tensor& uT,
                         int64_t r0, int64_t rows) {
  if (uT.defined()) {
    at::Tensor uTb = uT.narrow(1, r0, rows);
    at::mm_out(uTb, lora_A, a_b.t());
    ub.copy_(uTb.t());
  } else {
    at::mm_out(ub, a_b, lora_A.t());
  }
}

// One row block of the rank-r gradient s g_b B, as a [rows, r] view of `gu`: gu is [r, n] when `Bt` (= B^T,
// contiguous) is defined (FusedPlan.transposed_rank), else [n, r].
inline at::Tensor grad_rank_block(at::Tensor& gu, const at::Tensor& g_b, const at::Tensor& B, const at::Tensor& Bt,
                                  double scaling, int64_t r0, int64_t rows) {
  if (Bt.defined()) {
    at::Tensor guTb = gu.narrow(1, r0, rows);
    mm_alpha_out(guTb, Bt, g_b.t(), scaling);
    return guTb.t();
  }
  at::Tensor gub = gu.narrow(0, r0, rows);
  mm_alpha_out(gub, g_b, B, scaling);
  return gub;
}

// acc += alpha a^T b, acc in the op-math type (see accumulate_tn).
inline void accumulate_tn_alpha(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(a.t(), b, 1.0, alpha);
  } else {
    acc.add_(at::mm(a.t(), b), alpha);
  }
}

// A [rows, cols] tensor an op returns only to be saved for its backward: from the backend's
// `saved(rows, cols, opts)` where it has one (the CPU recycles these buffers), else at::empty.
template <class BK>
at::Tensor saved_rows(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  if constexpr (requires { BK::saved(rows, cols, opts); }) {
    return BK::saved(rows, cols, opts);
  } else {
    return at::empty({rows, cols}, opts);
  }
}

template <class BK>
at::Tensor seeded_dropout_impl(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_dim(x, 2, "x");
  check_floating(x, "x");
  const DropoutSpec d = make_dropout(p, seed);
  typename BK::Guard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  if (!d.active) {
    out.copy_(x);
    return out;
  }
  BK::dropout_rows(x, 0, d, out);
  return out;
}

template <class BK>
std::tuple<at::Tensor, at::Tensor> lora_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, double scaling,
                                                     double dropout_p, const at::Tensor& seed) {
  check_lora_args(x, weight, bias, lora_A, lora_B);
  const DropoutSpec d = make_dropout(dropout_p, seed);
  typename BK::Guard guard(x.device());
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0), r = lora_A.size(0);
  at::Tensor y = at::empty({n, out}, x.options());
  at::Tensor u = at::empty({n, r}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  if (n == 0) return {y, u};
  // B^T as a contiguous [r, out]: the rank-r update GEMM runs ~25% faster than on the B.t() view.
  const at::Tensor Bt = lora_B.t().contiguous();
  // Per row block: u = drop(x) A^T;  y = b + s u B^T (a write);  y += x W^T (the base GEMM, beta = 1).
  // The bias / rank-r terms take the place of the bias broadcast the base addmm does anyway, and
  // the block's x and y are still in cache for the second GEMM that touches them. With dropout the
  // block's drop(x) rows are generated into a reused scratch buffer just before their GEMM.
  const FusedPlan plan = BK::fused_plan(in, out, x.scalar_type());
  const bool bias_k = has_bias && plan.bias_in_gemm;
  const bool fold = plan.fold || bias_k;
  const int64_t ch = block_rows(plan, d, n, BK::chunk_rows(in, ChunkKind::kBaseGemm));
  at::Tensor xdrop = d.active ? BK::scratch(0, ch, in, x.options()) : at::Tensor();
  at::Tensor uT = plan.transposed_rank ? at::empty({r, n}, x.options()) : at::Tensor();
  at::Tensor U1, Bt1;
  if (bias_k) {
    // [u | 1] [n, r + 1] (the u GEMM writes its first r columns) times [s B^T ; b] [r + 1, out]:
    // one GEMM writes b + s u B^T, with no broadcast copy of b (which addmm makes, a full pass).
    U1 = at::empty({n, r + 1}, x.options());
    U1.select(1, r).fill_(1);
    Bt1 = at::empty({r + 1, out}, x.options());
    Bt1.narrow(0, 0, r).copy_(lora_B.t().to(opmath_of(x.scalar_type())).mul(scaling));
    Bt1.select(0, r).copy_(*bias);
  }
  for (int64_t r0 = 0; r0 < n; r0 += ch) {
    const int64_t rows = std::min(ch, n - r0);
    const at::Tensor xb = x.narrow(0, r0, rows);
    at::Tensor xa = xb;  // what lora_A sees: x, or drop(x)
    if (d.active) {
      xa = xdrop.narrow(0, 0, rows);
      BK::dropout_rows(x, r0, d, xa);
    }
    at::Tensor ub = bias_k ? U1.narrow(0, r0, rows).narrow(1, 0, r) : u.narrow(0, r0, rows);
    at::Tensor yb = y.narrow(0, r0, rows);
    shrink_block(ub, xa, lora_A, uT, r0, rows);
    if (fold) {
      if (bias_k) {
        at::mm_out(yb, U1.narrow(0, r0, rows), Bt1);
      } else if (has_bias) {
        at::addmm_out(yb, *bias, ub, Bt, 1.0, scaling);
      } else {
        mm_alpha_out(yb, ub, Bt, scaling);
      }
      yb.addmm_(xb, weight.t());
    } else {
      if (has_bias) {
        at::addmm_out(yb, *bias, xb, weight.t());
      } else {
        at::mm_out(yb, xb, weight.t());
      }
      yb.addmm_(ub, Bt, 1.0, scaling);
    }
  }
  if (bias_k) u.copy_(U1.narrow(1, 0, r));
  return {y, u};
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& u, double scaling,
    double dropout_p, const at::Tensor& seed, bool need_grad_x) {
  check_lora_args(x, weight, std::nullopt, lora_A, lora_B);
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0), r = lora_A.size(0);
  check_rows(grad_y, n, out, x, "grad_y", "out_features (weight.size(0))");
  check_rows(u, n, r, x, "u", "the rank (lora_A.size(0))");
  const DropoutSpec d = make_dropout(dropout_p, seed);
  typename BK::Guard guard(x.device());
  at::Tensor grad_x = need_grad_x ? at::empty({n, in}, x.options()) : at::empty({0}, x.options());
  if (n == 0) return {grad_x, at::zeros({r, in}, x.options()), at::zeros({out, r}, x.options())};

  // Per row block b: gu_b = s g_b B;  grad_B^T += s u_b^T g_b;  grad_x_b = gu_b A (a write);
  // grad_x_b += g_b W (the base GEMM, beta = 1);  grad_A += gu_b^T x_b. Each block's g, x and
  // grad_x rows are re-read from cache. (u^T g)^T: MKL runs this orientation about 2x faster
  // than g^T u for fp32. With dropout: grad_x_b = g_b W first, then one pass adds
  // mult * (gu_b A) and leaves drop(x_b) (regenerated, never stored) in the scratch for grad_A.
  const at::ScalarType op = opmath_of(x.scalar_type());
  const FusedPlan plan = BK::fused_plan(in, out, x.scalar_type());
  at::Tensor gu = plan.transposed_rank ? at::empty({r, n}, x.options()) : at::empty({n, r}, x.options());
  const at::Tensor Bt = plan.transposed_rank ? lora_B.t().contiguous() : at::Tensor();
  at::Tensor accBt = at::zeros({r, out}, x.options().dtype(op));
  at::Tensor accA = at::zeros({r, in}, x.options().dtype(op));
  const int64_t ch = block_rows(plan, d, n, BK::chunk_rows(in, ChunkKind::kBaseGemm));
  at::Tensor scratch = d.active ? BK::scratch(0, ch, in, x.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += ch) {
    const int64_t rows = std::min(ch, n - r0);
    const at::Tensor gb = grad_y.narrow(0, r0, rows);
    const at::Tensor xb = x.narrow(0, r0, rows);
    const at::Tensor gub = grad_rank_block(gu, gb, lora_B, Bt, scaling, r0, rows);
    accumulate_tn_alpha(accBt, u.narrow(0, r0, rows), gb, scaling);
    at::Tensor xa = xb;  // what lora_A saw: x, or drop(x)
    if (d.active) {
      xa = scratch.narrow(0, 0, rows);
      if (need_grad_x) {
        at::Tensor gxb = grad_x.narrow(0, r0, rows);
        at::mm_out(gxb, gb, weight);
        at::mm_out(xa, gub, lora_A);
        BK::dropout_bwd_fused(x, r0, d, xa, gxb);  // grad_x_b += mult * (gu_b A); xa <- drop(x_b)
      } else {
        BK::dropout_rows(x, r0, d, xa);
      }
    } else if (need_grad_x) {
      at::Tensor gxb = grad_x.narrow(0, r0, rows);
      if (plan.fold) {
        at::mm_out(gxb, gub, lora_A);
        gxb.addmm_(gb, weight);
      } else {
        at::mm_out(gxb, gb, weight);
        gxb.addmm_(gub, lora_A);
      }
    }
    accumulate_tn(accA, gub, xa);
  }
  return {grad_x, accA.to(x.scalar_type()), accBt.t().to(x.scalar_type()).contiguous()};
}

// ||W_i + s (B A)_i||_2 = sqrt(||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 <B_i, (B A A^T)_i>), in the
// op-math type, over row chunks of W (so a reduced-precision W is never copied whole).
template <class BK>
at::Tensor dora_weight_norm_impl(const at::Tensor& weight, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, double scaling) {
  check_dim(weight, 2, "weight");
  check_floating(weight, "weight");
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_A.size(0);
  check_lora_factors(lora_A, lora_B, weight, "weight", in, "in_features (weight.size(1))", out);
  typename BK::Guard guard(weight.device());
  const at::ScalarType op = opmath_of(weight.scalar_type());
  at::Tensor norm = at::empty({out}, weight.options().dtype(op));
  if (out == 0) return norm;
  at::Tensor A = lora_A.to(op);
  at::Tensor B = lora_B.to(op);
  at::Tensor AAt = at::mm(A, A.t());  // [r, r]
  // A reduced-precision W is converted chunk by chunk into one scratch buffer (not .to(op) per
  // chunk: a fresh 4 MiB buffer costs more in page faults than the whole norm).
  const bool convert = weight.scalar_type() != op;
  const int64_t ch = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(in, 1));
  at::Tensor wbuf = convert ? BK::scratch(0, std::min(ch, out), in, weight.options().dtype(op)) : at::Tensor();
  for (int64_t o0 = 0; o0 < out; o0 += ch) {
    const int64_t rows = std::min(ch, out - o0);
    at::Tensor W = weight.narrow(0, o0, rows);
    if (convert) W = wbuf.narrow(0, 0, rows).copy_(W);
    at::Tensor Bc = B.narrow(0, o0, rows);
    at::Tensor sq = at::linalg_vector_norm(W, 2, at::IntArrayRef{1}, false, std::nullopt);
    sq.mul_(sq);
    at::Tensor cross = at::mm(W, A.t()).mul_(Bc).sum(1);            // <B_i, (W A^T)_i>
    at::Tensor quad = at::mm(Bc, AAt).mul_(Bc).sum(1);              // <B_i, (B A A^T)_i>
    sq.add_(cross, 2.0 * scaling).add_(quad, scaling * scaling).clamp_min_(0.0).sqrt_();
    norm.narrow(0, o0, rows).copy_(sq);
  }
  return norm;
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_forward_impl(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
    const at::Tensor& weight_norm, double scaling, double dropout_p, const at::Tensor& seed) {
  check_lora_args(x, weight, bias, lora_A, lora_B);
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0), r = lora_A.size(0);
  check_dora_vectors(magnitude, weight_norm, x, out);
  const DropoutSpec d = make_dropout(dropout_p, seed);
  typename BK::Guard guard(x.device());
  const at::ScalarType op = opmath_of(x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor mn = magnitude.to(op).div(weight_norm.to(op)).contiguous();  // m / n
  at::Tensor y = at::empty({n, out}, x.options());
  at::Tensor u = at::empty({n, r}, x.options());
  at::Tensor z = saved_rows<BK>(n, out, x.options());
  if (n == 0) return {y, u, z};
  const at::Tensor Bt = lora_B.t().contiguous();  // [r, out] (see lora_forward_impl)
  if (!d.active) {
    // z = x W^T + s u B^T;  y = (m/n) z + b: one base GEMM. Per row block: u = x A^T;
    // z = s u B^T (a write);  z += x W^T (beta = 1);  y = (m/n) z + b while z's rows are in cache.
    const std::optional<at::Tensor> b = has_bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
    const FusedPlan plan = BK::fused_plan(in, out, x.scalar_type());
    const bool fold = plan.fold;
    const int64_t ch = std::max<int64_t>(1, std::min(n, plan.rows));
    at::Tensor uT = plan.transposed_rank ? at::empty({r, n}, x.options()) : at::Tensor();
    for (int64_t r0 = 0; r0 < n; r0 += ch) {
      const int64_t rows = std::min(ch, n - r0);
      const at::Tensor xb = x.narrow(0, r0, rows);
      at::Tensor ub = u.narrow(0, r0, rows);
      at::Tensor zb = z.narrow(0, r0, rows);
      at::Tensor yb = y.narrow(0, r0, rows);
      shrink_block(ub, xb, lora_A, uT, r0, rows);
      if (fold) {
        mm_alpha_out(zb, ub, Bt, scaling);
        zb.addmm_(xb, weight.t());
      } else {
        at::mm_out(zb, xb, weight.t());
        zb.addmm_(ub, Bt, 1.0, scaling);
      }
      BK::dora_epilogue(zb, mn, b, yb);
    }
    return {y, u, z};
  }
  // y = x W^T + b + (m/n - 1) xd W^T + (m/n) s u B^T with xd = drop(x) (peft's math: two base GEMMs).
  if (has_bias) {
    at::addmm_out(y, *bias, x, weight.t());
  } else {
    at::mm_out(y, x, weight.t());
  }
  const int64_t ch = std::min(n, BK::chunk_rows(std::max(in, out), ChunkKind::kBaseGemm));
  at::Tensor xbuf = BK::scratch(0, ch, in, x.options());
  at::Tensor qbuf = BK::scratch(1, ch, out, x.options());
  for (int64_t r0 = 0; r0 < n; r0 += ch) {
    const int64_t rows = std::min(ch, n - r0);
    at::Tensor xd = xbuf.narrow(0, 0, rows);
    BK::dropout_rows(x, r0, d, xd);
    at::Tensor uc = u.narrow(0, r0, rows);
    at::mm_out(uc, xd, lora_A.t());
    at::Tensor zc = z.narrow(0, r0, rows);
    at::mm_out(zc, xd, weight.t());
    at::Tensor qc = qbuf.narrow(0, 0, rows);
    at::mm_out(qc, uc, Bt);
    at::Tensor yc = y.narrow(0, r0, rows);
    BK::dora_epilogue_dropout(zc, qc, mn, scaling, yc);
  }
  return {y, u, z};
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_backward_impl(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
    const at::Tensor& weight_norm, const at::Tensor& u, const at::Tensor& z_in, double scaling,
    double dropout_p, const at::Tensor& seed, bool need_grad_x) {
  check_lora_args(x, weight, std::nullopt, lora_A, lora_B);
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0), r = lora_A.size(0);
  check_dora_vectors(magnitude, weight_norm, x, out);
  check_rows(grad_y_in, n, out, x, "grad_y", "out_features (weight.size(0))");
  check_rows(u, n, r, x, "u", "the rank (lora_A.size(0))");
  check_rows(z_in, n, out, x, "z", "out_features (weight.size(0))");
  const DropoutSpec d = make_dropout(dropout_p, seed);
  typename BK::Guard guard(x.device());
  const at::ScalarType op = opmath_of(x.scalar_type());
  const at::Tensor g = grad_y_in.contiguous();
  const at::Tensor z = z_in.contiguous();
  at::Tensor nn = weight_norm.to(op);
  at::Tensor mn = magnitude.to(op).div(nn).contiguous();
  at::Tensor mn_col = mn.unsqueeze(1);

  // gz = g (m/n):  gu = s gz B = s g (diag(m/n) B);  grad_B = s gz^T u = s diag(m/n) g^T u.
  at::Tensor Bm = lora_B.to(op).mul(mn_col).to(x.scalar_type());
  at::Tensor acc = at::zeros({out}, x.options().dtype(op));
  at::Tensor grad_x = need_grad_x ? at::empty({n, in}, x.options()) : at::empty({0}, x.options());
  if (n == 0) {
    return {grad_x, at::zeros({r, in}, x.options()), at::zeros({out, r}, x.options()),
            at::zeros({out}, magnitude.options())};
  }
  at::Tensor grad_A, grad_B;
  if (!d.active) {
    // grad_x = gz W + gu A; grad_m = sum g z / n. Per row block b: h = g_b (m/n) with the grad_m
    // column sums; gu_b = s g_b Bm;  (g^T u)^T += u_b^T g_b;  grad_x_b = gu_b A (a write);
    // grad_x_b += h W (beta = 1);  grad_A += gu_b^T x_b, so each block's rows stay in cache.
    const FusedPlan plan = BK::fused_plan(in, out, x.scalar_type());
    const bool fold = plan.fold;
    const int64_t ch = std::max<int64_t>(1, std::min(n, plan.rows));
    at::Tensor hbuf = BK::scratch(0, ch, out, x.options());
    at::Tensor gu = plan.transposed_rank ? at::empty({r, n}, x.options()) : at::empty({n, r}, x.options());
    const at::Tensor Bmt = plan.transposed_rank ? Bm.t().contiguous() : at::Tensor();
    at::Tensor accBt = at::zeros({r, out}, x.options().dtype(op));
    at::Tensor accA = at::zeros({r, in}, x.options().dtype(op));
    for (int64_t r0 = 0; r0 < n; r0 += ch) {
      const int64_t rows = std::min(ch, n - r0);
      const at::Tensor gb = g.narrow(0, r0, rows);
      at::Tensor h = hbuf.narrow(0, 0, rows);
      BK::dora_grad_rows(gb, z.narrow(0, r0, rows), mn, 0.0, acc, h);
      const at::Tensor gub = grad_rank_block(gu, gb, Bm, Bmt, scaling, r0, rows);
      accumulate_tn(accBt, u.narrow(0, r0, rows), gb);
      if (need_grad_x) {
        at::Tensor gxc = grad_x.narrow(0, r0, rows);
        if (fold) {
          at::mm_out(gxc, gub, lora_A);
          gxc.addmm_(h, weight);
        } else {
          at::mm_out(gxc, h, weight);
          gxc.addmm_(gub, lora_A);
        }
      }
      accumulate_tn(accA, gub, x.narrow(0, r0, rows));
    }
    grad_B = accBt.t().mul(mn_col).mul_(scaling).to(x.scalar_type()).contiguous();
    grad_A = accA.to(x.scalar_type());
  } else {
    at::Tensor gu = at::mm(g, Bm);
    gu.mul_(scaling);
    grad_B = at::mm(u.t(), g).t().to(op).mul_(mn_col).mul_(scaling).to(x.scalar_type()).contiguous();
    const int64_t ch = std::min(n, BK::chunk_rows(std::max(in, out), ChunkKind::kBaseGemm));
    at::Tensor hbuf = BK::scratch(0, ch, out, x.options());
    // grad_x = g W + mult ((g (m/n - 1)) W + gu A);  grad_A = gu^T drop(x).
    if (need_grad_x) at::mm_out(grad_x, g, weight);
    at::Tensor tbuf = BK::scratch(1, ch, in, x.options());
    at::Tensor accA = at::zeros({r, in}, x.options().dtype(op));
    for (int64_t r0 = 0; r0 < n; r0 += ch) {
      const int64_t rows = std::min(ch, n - r0);
      at::Tensor h = hbuf.narrow(0, 0, rows);
      BK::dora_grad_rows(g.narrow(0, r0, rows), z.narrow(0, r0, rows), mn, -1.0, acc, h);
      at::Tensor t = tbuf.narrow(0, 0, rows);
      at::Tensor guc = gu.narrow(0, r0, rows);
      if (need_grad_x) {
        at::mm_out(t, h, weight);
        t.addmm_(guc, lora_A);
        at::Tensor gxc = grad_x.narrow(0, r0, rows);
        BK::dropout_bwd_fused(x, r0, d, t, gxc);  // t <- drop(x) rows
      } else {
        BK::dropout_rows(x, r0, d, t);
      }
      accumulate_tn(accA, guc, t);
    }
    grad_A = accA.to(x.scalar_type());
  }
  at::Tensor grad_m = acc.div_(nn).to(magnitude.scalar_type());
  return {grad_x, grad_A, grad_B, grad_m};
}

}  // namespace fastpeft
