// Device-independent drivers of the kron-family ops (kron_forward / kron_backward, LoKr).
//
// y = s x (W1 kron W2)^T with W1 [a, c], W2 [b, d], x [N, c d], y [N, a b]. kron(W1, W2)[i b + j,
// k d + l] = W1[i, k] W2[j, l], so with x viewed as X [N, c, d] and y as Y [N, a, b]:
//     T = X W2^T  (one GEMM over all N c rows: [N c, d] x [d, b]),
//     Y = (s W1) T (a batched GEMM, W1 broadcast over N: [a, c] x [c, b] per row).
// A low-rank W2 = w2_a w2_b [b, r] [r, d] is applied as P = X w2_b^T, T = P w2_a^T when that costs
// fewer multiply-adds than forming W2 (r (b + d) < b d). W1 (a c elements) is always formed; it is
// tiny next to N. The Kronecker product is never built. Backward recomputes T (and P), never saves
// them:
//     gT = (s W1)^T G (batched),   grad_W1 = s sum_n G_n T_n^T (one GEMM over the N b contraction),
//     grad_W2 = gT^T X, grad_X = gT W2   (or through P: grad_w2_a = gT^T P, gP = gT w2_a,
//     grad_w2_b = gP^T X, grad_X = gP w2_b).
// Everything is ATen GEMMs on the current stream (MKL/oneDNN on the CPU, cuBLAS on CUDA), run per
// row block: the backend BK supplies
//   using Guard;                              // device guard from an at::Device
//   int64_t kron_block_rows(n, in, dtype);    // rows of x per block
//   int64_t kron_workers();                   // how many blocks may run at once
//   void for_row_blocks(n, rows, f);          // f(r0, r1, worker) for every block, worker < kron_workers()
// The CPU runs small fp32/fp64 blocks on separate threads (each block's T and gT stay in L2; the
// whole-problem GEMMs' skinny [N c, 32] operands run at memory speed); bf16/fp16 and CUDA run one
// block. All tensors share x's dtype (the compute dtype); factor-gradient sums are op-math.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>

#include <optional>
#include <tuple>

#include "common/checks.h"

namespace fastpeft {

// One Kronecker factor: full `w` [rows, cols], or `w_a` [rows, r] @ `w_b` [r, cols].
struct KronFactor {
  at::Tensor full, a, b;  // `full` defined, or both `a` and `b`
  int64_t rows = 0, cols = 0, rank = 0;
  bool low_rank() const { return !full.defined(); }
  // The dense [rows, cols] matrix (formed when low rank).
  at::Tensor dense() const { return low_rank() ? at::mm(a, b) : full; }
};

inline bool kron_given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline KronFactor kron_factor(const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& wa,
                              const std::optional<at::Tensor>& wb, const at::Tensor& x, const char* wn,
                              const char* wan, const char* wbn) {
  const bool has_w = kron_given(w), has_a = kron_given(wa), has_b = kron_given(wb);
  TORCH_CHECK(has_a == has_b, "fastpeft: give both '", wan, "' and '", wbn, "' or neither (got only '",
              has_a ? wan : wbn, "')");
  TORCH_CHECK(has_w != has_a, "fastpeft: give exactly one of '", wn, "' or ('", wan, "', '", wbn, "'), got ",
              has_w ? "both" : "neither");
  KronFactor f;
  if (has_w) {
    check_dim(*w, 2, wn);
    check_same_dtype(*w, x, wn, "x");
    check_same_device(*w, x, wn, "x");
    f.full = *w;
    f.rows = w->size(0);
    f.cols = w->size(1);
  } else {
    check_dim(*wa, 2, wan);
    check_dim(*wb, 2, wbn);
    check_same_dtype(*wa, x, wan, "x");
    check_same_dtype(*wb, x, wbn, "x");
    check_same_device(*wa, x, wan, "x");
    check_same_device(*wb, x, wbn, "x");
    TORCH_CHECK(wa->size(1) == wb->size(0), "fastpeft: '", wan, "' has rank ", wa->size(1), " (shape ",
                wa->sizes(), ") but '", wbn, "' has rank ", wb->size(0), " (shape ", wb->sizes(), ")");
    f.a = *wa;
    f.b = *wb;
    f.rows = wa->size(0);
    f.cols = wb->size(1);
    f.rank = wa->size(1);
  }
  return f;
}

struct KronArgs {
  KronFactor w1, w2;  // W1 [a, c], W2 [b, d]
  int64_t n = 0;
  // Whether T is formed through P = X w2_b^T (low-rank W2, cheaper than forming W2).
  bool through_p = false;
};

inline KronArgs check_kron_args(const at::Tensor& x, const std::optional<at::Tensor>& w1,
                                const std::optional<at::Tensor>& w1_a, const std::optional<at::Tensor>& w1_b,
                                const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& w2_a,
                                const std::optional<at::Tensor>& w2_b) {
  check_dim(x, 2, "x");
  check_floating(x, "x");
  KronArgs k;
  k.w1 = kron_factor(w1, w1_a, w1_b, x, "w1", "w1_a", "w1_b");
  k.w2 = kron_factor(w2, w2_a, w2_b, x, "w2", "w2_a", "w2_b");
  const int64_t c = k.w1.cols, d = k.w2.cols;
  TORCH_CHECK(x.size(1) == c * d, "fastpeft: 'x' has ", x.size(1), " features but W1 has ", c,
              " columns and W2 has ", d, " (in_features must be W1.size(1) * W2.size(1) = ", c * d, ")");
  k.n = x.size(0);
  const int64_t b = k.w2.rows, r = k.w2.rank;
  k.through_p = k.w2.low_rank() && r * (b + d) < b * d;
  return k;
}

// X [N c, d] as a view when x is contiguous (a copy otherwise).
inline at::Tensor kron_rows(const at::Tensor& x, const KronArgs& k) {
  return x.reshape({k.n * k.w1.cols, k.w2.cols});
}

// T [N c, b] (and P [N c, r] when through_p).
inline at::Tensor kron_t(const at::Tensor& X, const KronArgs& k, at::Tensor* P) {
  if (k.through_p) {
    *P = at::mm(X, k.w2.b.t());
    return at::mm(*P, k.w2.a.t());
  }
  return at::mm(X, k.w2.dense().t());
}

template <class BK>
at::Tensor kron_forward_impl(const at::Tensor& x, const std::optional<at::Tensor>& w1,
                             const std::optional<at::Tensor>& w1_a, const std::optional<at::Tensor>& w1_b,
                             const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& w2_a,
                             const std::optional<at::Tensor>& w2_b, double scale) {
  const KronArgs k = check_kron_args(x, w1, w1_a, w1_b, w2, w2_a, w2_b);
  typename BK::Guard guard(x.device());
  const int64_t n = k.n, a = k.w1.rows, c = k.w1.cols, b = k.w2.rows;
  if (n == 0 || a * b == 0) return at::zeros({n, a * b}, x.options());
  if (c * k.w2.cols == 0) return at::zeros({n, a * b}, x.options());
  const at::Tensor X = kron_rows(x, k).contiguous();
  const at::Tensor W1s = k.w1.dense().mul(scale);
  at::Tensor y = at::empty({n, a, b}, x.options());
  // Per row block (the CPU runs blocks on separate threads so each block's T stays in cache):
  // T_b = X_b W2^T, Y_b = W1s T_b.
  BK::for_row_blocks(n, BK::kron_block_rows(n, c * k.w2.cols, x.scalar_type()), [&](int64_t r0, int64_t r1, int64_t) {
    const int64_t m = r1 - r0;
    at::Tensor P;
    const at::Tensor T = kron_t(X.narrow(0, r0 * c, m * c), k, &P).view({m, c, b});
    at::Tensor yb = y.narrow(0, r0, m);
    at::bmm_out(yb, W1s.unsqueeze(0).expand({m, a, c}), T);
  });
  return y.view({n, a * b});
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kron_backward_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& w1,
    const std::optional<at::Tensor>& w1_a, const std::optional<at::Tensor>& w1_b,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& w2_a,
    const std::optional<at::Tensor>& w2_b, double scale) {
  const KronArgs k = check_kron_args(x, w1, w1_a, w1_b, w2, w2_a, w2_b);
  const int64_t n = k.n, a = k.w1.rows, c = k.w1.cols, b = k.w2.rows, d = k.w2.cols;
  check_dim(grad_y, 2, "grad_y");
  check_same_dtype(grad_y, x, "grad_y", "x");
  check_same_device(grad_y, x, "grad_y", "x");
  check_size(grad_y, 0, n, "grad_y", "the number of rows of x");
  check_size(grad_y, 1, a * b, "grad_y", "out_features (W1.size(0) * W2.size(0))");
  typename BK::Guard guard(x.device());
  const auto opts = x.options();
  // A fresh [0] tensor per absent factor: outputs of one op must not alias each other.
  auto empty0 = [&] { return at::empty({0}, opts); };
  auto zeros_like_factor = [&](const KronFactor& f) -> std::pair<at::Tensor, at::Tensor> {
    if (f.low_rank()) return {at::zeros(f.a.sizes(), opts), at::zeros(f.b.sizes(), opts)};
    return {at::zeros(f.full.sizes(), opts), empty0()};
  };
  if (n == 0 || a * b == 0 || c * d == 0) {
    auto [g1, g1b] = zeros_like_factor(k.w1);
    auto [g2, g2b] = zeros_like_factor(k.w2);
    return {at::zeros({n, c * d}, opts), g1, g1b, g2, g2b};
  }
  const at::Tensor X = kron_rows(x, k).contiguous();
  const at::Tensor W1 = k.w1.dense();
  const at::Tensor W1sT = W1.t().mul(scale).contiguous();
  const at::Tensor G = grad_y.reshape({n, a, b}).contiguous();
  const at::Tensor W2 = k.through_p ? at::Tensor() : k.w2.dense();
  const int64_t r = k.w2.rank;
  // Factor gradients accumulate per worker (in the op-math type) and are summed at the end.
  const at::ScalarType op = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t workers = BK::kron_workers();
  at::Tensor accW1 = at::zeros({workers, a, c}, opts.dtype(op));
  at::Tensor acc2 = k.through_p ? at::zeros({workers, b, r}, opts.dtype(op)) : at::zeros({workers, b, d}, opts.dtype(op));
  at::Tensor acc2b = k.through_p ? at::zeros({workers, r, d}, opts.dtype(op)) : at::Tensor();
  at::Tensor gX = at::empty({n * c, d}, opts);
  auto acc_mm = [](at::Tensor acc, const at::Tensor& l, const at::Tensor& rt) {
    if (acc.scalar_type() == l.scalar_type()) {
      acc.addmm_(l, rt);
    } else {
      acc.add_(at::mm(l, rt));
    }
  };
  // Per row block (on the CPU, blocks on separate threads, so T_b and gT_b stay in cache):
  //   T_b = X_b W2^T;  gT_b = (s W1)^T G_b;  grad_W1 += G_b (n, j) . T_b (n, j);
  //   grad_W2 += gT_b^T X_b;  gX_b = gT_b W2   (or through P, see the file comment).
  BK::for_row_blocks(n, BK::kron_block_rows(n, c * d, x.scalar_type()), [&](int64_t r0, int64_t r1, int64_t w) {
    const int64_t m = r1 - r0;
    const at::Tensor Xb = X.narrow(0, r0 * c, m * c);
    const at::Tensor Gb = G.narrow(0, r0, m);
    at::Tensor P;
    const at::Tensor T = kron_t(Xb, k, &P);  // [m c, b]
    at::Tensor gT = at::empty({m, c, b}, opts);
    at::bmm_out(gT, W1sT.unsqueeze(0).expand({m, c, a}), Gb);
    acc_mm(accW1.select(0, w), Gb.permute({1, 0, 2}).reshape({a, m * b}),
           T.view({m, c, b}).permute({1, 0, 2}).reshape({c, m * b}).t());
    const at::Tensor gT2 = gT.view({m * c, b});
    at::Tensor gXb = gX.narrow(0, r0 * c, m * c);
    if (k.through_p) {
      acc_mm(acc2.select(0, w), gT2.t(), P);            // grad_w2_a [b, r]
      const at::Tensor gP = at::mm(gT2, k.w2.a);        // [m c, r]
      acc_mm(acc2b.select(0, w), gP.t(), Xb);           // grad_w2_b [r, d]
      at::mm_out(gXb, gP, k.w2.b);
    } else {
      acc_mm(acc2.select(0, w), gT2.t(), Xb);           // grad_W2 [b, d]
      at::mm_out(gXb, gT2, W2);
    }
  });
  const at::Tensor gW1 = accW1.sum(0).mul_(scale).to(x.scalar_type());
  at::Tensor g1, g1b;
  if (k.w1.low_rank()) {
    g1 = at::mm(gW1, k.w1.b.t());
    g1b = at::mm(k.w1.a.t(), gW1);
  } else {
    g1 = gW1;
    g1b = empty0();
  }
  at::Tensor g2, g2b;
  if (k.through_p) {
    g2 = acc2.sum(0).to(x.scalar_type());
    g2b = acc2b.sum(0).to(x.scalar_type());
  } else {
    const at::Tensor gW2 = acc2.sum(0).to(x.scalar_type());
    if (k.w2.low_rank()) {
      g2 = at::mm(gW2, k.w2.b.t());
      g2b = at::mm(k.w2.a.t(), gW2);
    } else {
      g2 = gW2;
      g2b = empty0();
    }
  }
  return {gX.view({n, c * d}), g1.contiguous(), g1b.contiguous(), g2.contiguous(), g2b.contiguous()};
}

}  // namespace fastpeft
