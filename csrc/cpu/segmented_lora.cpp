// CPU backend of segmented_lora (mixed-adapter batches; schema and semantics in registration.cpp).
// Rows are grouped by adapter with one counting sort (O(T + n)); the work items are (adapter, block of
// at most kRowBlock of its rows), split over threads. Per row: shrink u = x A^T (r dot products of
// length in) then expand delta = s u B^T (out dot products of length r), op-math sums, rounded once.
// An adapter's A and B stay cache-resident while its rows are processed; adapters no row uses are
// never touched, so the cost is proportional to sum over rows of r (in + out), not to n.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_math.h"
#include "common/segmented_lora_impl.h"

namespace fastpeft {
namespace {

constexpr int64_t kRowBlock = 8;
constexpr int kLanes = 16;

// sum_k a[k] * b[k] in op-math with kLanes independent partial sums (vectorises without -ffast-math).
template <class T, class M>
FASTPEFT_INLINE M dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  using cpu::ld;
  M acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += ld(a[k + l]) * ld(b[k + l]);
  }
  M s = M(0);
  for (; k < n; ++k) s += ld(a[k]) * ld(b[k]);
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// u[r0..r0+4) = x . A[r] for four ranks at once: each load of x feeds four accumulators.
template <class T, class M>
FASTPEFT_INLINE void dot4(const T* __restrict__ x, const T* __restrict__ A, int64_t in, M* u) {
  using cpu::ld;
  const T* a0 = A;
  const T* a1 = A + in;
  const T* a2 = A + 2 * in;
  const T* a3 = A + 3 * in;
  M c0[kLanes] = {}, c1[kLanes] = {}, c2[kLanes] = {}, c3[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= in; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const M xv = ld(x[k + l]);
      c0[l] += xv * ld(a0[k + l]);
      c1[l] += xv * ld(a1[k + l]);
      c2[l] += xv * ld(a2[k + l]);
      c3[l] += xv * ld(a3[k + l]);
    }
  }
  M s0 = M(0), s1 = M(0), s2 = M(0), s3 = M(0);
  for (; k < in; ++k) {
    const M xv = ld(x[k]);
    s0 += xv * ld(a0[k]);
    s1 += xv * ld(a1[k]);
    s2 += xv * ld(a2[k]);
    s3 += xv * ld(a3[k]);
  }
  for (int l = 0; l < kLanes; ++l) {
    s0 += c0[l];
    s1 += c1[l];
    s2 += c2[l];
    s3 += c3[l];
  }
  u[0] = s0;
  u[1] = s1;
  u[2] = s2;
  u[3] = s3;
}

// Rows rows[0..m) of x (m <= kRowBlock) through one adapter (A [R, in], B [out, R]); delta rows written.
// Shrink: four ranks per pass over a row of x. Expand: blocks of kLanes output columns, one independent
// op-math accumulator per column (no serial reduction chain), the B block reused by every row.
template <class T, class M>
FASTPEFT_CLONES void segment_rows(const T* x, const T* A, const T* B, M s, const int64_t* rows, int64_t m,
                                  int64_t in, int64_t out, int64_t R, M* u, M* __restrict__ tile, T* delta) {
  using cpu::ld;
  using cpu::st;
  for (int64_t i = 0; i < m; ++i) {
    const T* xr = x + rows[i] * in;
    M* ui = u + i * R;
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) dot4<T, M>(xr, A + r * in, in, ui + r);
    for (; r < R; ++r) ui[r] = dot<T, M>(xr, A + r * in, in);
  }
  int64_t j0 = 0;
  for (; j0 + kLanes <= out; j0 += kLanes) {
    const T* bb = B + j0 * R;
    // The [kLanes, R] block of B transposed once into op-math [R, kLanes]: the row loop below reads it
    // contiguously (vectorised), for every row of the block.
    for (int l = 0; l < kLanes; ++l)
      for (int64_t r = 0; r < R; ++r) tile[r * kLanes + l] = ld(bb[l * R + r]);
    for (int64_t i = 0; i < m; ++i) {
      const M* ui = u + i * R;
      M acc[kLanes] = {};
      for (int64_t r = 0; r < R; ++r) {
        const M ur = ui[r];
        const M* tr = tile + r * kLanes;
        for (int l = 0; l < kLanes; ++l) acc[l] += ur * tr[l];
      }
      T* d = delta + rows[i] * out + j0;
      for (int l = 0; l < kLanes; ++l) st(d[l], s * acc[l]);
    }
  }
  for (int64_t j = j0; j < out; ++j) {
    const T* b = B + j * R;
    for (int64_t i = 0; i < m; ++i) {
      const M* ui = u + i * R;
      M acc = M(0);
      for (int64_t r = 0; r < R; ++r) acc += ui[r] * ld(b[r]);
      st(delta[rows[i] * out + j], s * acc);
    }
  }
}

// The same with B given transposed (Bt [R, out] contiguous, i.e. lora_B a [out, R] view with strides
// (1, out)): the expand is R axpys over a row of op-math accumulators, contiguous and vectorised.
template <class T, class M>
FASTPEFT_CLONES void segment_rows_bt(const T* x, const T* A, const T* Bt, M s, const int64_t* rows, int64_t m,
                                     int64_t in, int64_t out, int64_t R, M* u, M* __restrict__ acc, T* delta) {
  using cpu::ld;
  using cpu::st;
  for (int64_t i = 0; i < m; ++i) {
    const T* xr = x + rows[i] * in;
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) dot4<T, M>(xr, A + r * in, in, u + r);
    for (; r < R; ++r) u[r] = dot<T, M>(xr, A + r * in, in);
    for (int64_t j = 0; j < out; ++j) acc[j] = M(0);
    for (r = 0; r < R; ++r) {
      const M ur = s * u[r];
      const T* b = Bt + r * out;
      for (int64_t j = 0; j < out; ++j) acc[j] += ur * ld(b[j]);
    }
    T* d = delta + rows[i] * out;
    for (int64_t j = 0; j < out; ++j) st(d[j], acc[j]);
  }
}

struct Item {
  int64_t adapter, begin, end;  // positions in the grouped row order
};

template <class T>
void run_typed(const at::Tensor& x, const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B,
               c10::ArrayRef<double> scalings, const std::vector<int64_t>& order, const std::vector<Item>& items,
               int64_t in, int64_t out, int64_t r_max, at::Tensor& delta) {
  using M = typename OpMath<T>::type;
  const T* xp = x.const_data_ptr<T>();
  T* dp = delta.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<M> u(static_cast<size_t>(std::max<int64_t>(r_max, 1) * kRowBlock));
    std::vector<M> tile(static_cast<size_t>(std::max<int64_t>(r_max, 1) * std::max<int64_t>(kLanes, out)));
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const int64_t k = it.adapter;
      if (B[k].is_contiguous()) {
        segment_rows<T, M>(xp, A[k].const_data_ptr<T>(), B[k].const_data_ptr<T>(), static_cast<M>(scalings[k]),
                           order.data() + it.begin, it.end - it.begin, in, out, A[k].size(0), u.data(), tile.data(),
                           dp);
      } else {  // transposed layout (see b_layout)
        segment_rows_bt<T, M>(xp, A[k].const_data_ptr<T>(), B[k].const_data_ptr<T>(), static_cast<M>(scalings[k]),
                              order.data() + it.begin, it.end - it.begin, in, out, A[k].size(0), u.data(),
                              tile.data(), dp);
      }
    }
  });
}

// lora_B as given when it is contiguous [out, R] or a transposed view of a contiguous [R, out] (callers that
// keep B^T, e.g. the LoRA layers' cache, get the vectorised expand); otherwise a contiguous copy.
at::Tensor b_layout(const at::Tensor& b) {
  if (b.is_contiguous()) return b;
  if (b.size(1) > 1 && b.stride(0) == 1 && b.stride(1) == b.size(0)) return b;
  return b.contiguous();
}

at::Tensor segmented_lora_cpu(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B,
                              c10::ArrayRef<double> scalings, const at::Tensor& adapter_index) {
  const auto [in, out] = check_segmented_lora_args(x, lora_A, lora_B, scalings, adapter_index);
  const int64_t T = x.size(0);
  const int64_t n = static_cast<int64_t>(lora_A.size());
  at::Tensor delta = at::zeros({T, out}, x.options());
  if (T == 0 || out == 0) return delta;
  const at::Tensor idx_t = adapter_index.contiguous();
  const int64_t* idx = idx_t.const_data_ptr<int64_t>();
  // Counting sort of the rows by adapter (base rows, -1, dropped).
  std::vector<int64_t> start(static_cast<size_t>(n + 1), 0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t k = idx[t];
    TORCH_CHECK(k >= -1 && k < n, "fastpeft: 'adapter_index[", t, "]' is ", k, " but must be -1 (base only) or in [0, ",
                n, ") (", n, " adapters given)");
    if (k >= 0) ++start[k + 1];
  }
  for (int64_t k = 0; k < n; ++k) start[k + 1] += start[k];
  std::vector<int64_t> order(static_cast<size_t>(start[n]));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t)
      if (idx[t] >= 0) order[fill[idx[t]]++] = t;
  }
  std::vector<at::Tensor> A, B;
  A.reserve(n);
  B.reserve(n);
  std::vector<Item> items;
  int64_t r_max = 0;
  for (int64_t k = 0; k < n; ++k) {
    const bool used = start[k + 1] > start[k] && lora_A[k].size(0) > 0;
    // Only adapters some row uses are made contiguous (a no-op for nn.Linear weights).
    A.push_back(used ? lora_A[k].contiguous() : at::Tensor());
    B.push_back(used ? b_layout(lora_B[k]) : at::Tensor());
    if (!used) continue;
    r_max = std::max<int64_t>(r_max, lora_A[k].size(0));
    for (int64_t b = start[k]; b < start[k + 1]; b += kRowBlock)
      items.push_back({k, b, std::min<int64_t>(b + kRowBlock, start[k + 1])});
  }
  if (items.empty() || in == 0) return delta;
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastpeft_segmented_lora", [&] {
    run_typed<scalar_t>(xc, A, B, scalings, order, items, in, out, r_max, delta);
  });
  return delta;
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("segmented_lora", &fastpeft::segmented_lora_cpu); }
