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

// Rows rows[0..m) of x through one adapter (A [R, in], B [out, R]); delta rows written in place.
template <class T, class M>
FASTPEFT_CLONES void segment_rows(const T* x, const T* A, const T* B, M s, const int64_t* rows, int64_t m,
                                  int64_t in, int64_t out, int64_t R, M* u, T* delta) {
  using cpu::ld;
  using cpu::st;
  for (int64_t i = 0; i < m; ++i) {
    const T* xr = x + rows[i] * in;
    for (int64_t r = 0; r < R; ++r) u[r] = dot<T, M>(xr, A + r * in, in);
    T* d = delta + rows[i] * out;
    if (R == kLanes) {
      // Common rank 16: one vector of u against each row of B.
      for (int64_t j = 0; j < out; ++j) {
        const T* b = B + j * kLanes;
        M acc = M(0);
        for (int l = 0; l < kLanes; ++l) acc += u[l] * ld(b[l]);
        st(d[j], s * acc);
      }
    } else {
      for (int64_t j = 0; j < out; ++j) {
        const T* b = B + j * R;
        M acc = M(0);
        for (int64_t r = 0; r < R; ++r) acc += u[r] * ld(b[r]);
        st(d[j], s * acc);
      }
    }
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
    std::vector<M> u(static_cast<size_t>(std::max<int64_t>(r_max, 1)));
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const int64_t k = it.adapter;
      segment_rows<T, M>(xp, A[k].const_data_ptr<T>(), B[k].const_data_ptr<T>(), static_cast<M>(scalings[k]),
                         order.data() + it.begin, it.end - it.begin, in, out, A[k].size(0), u.data(), dp);
    }
  });
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
    B.push_back(used ? lora_B[k].contiguous() : at::Tensor());
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
