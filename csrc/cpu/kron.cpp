// CPU backend of the kron family (LoKr). The driver (common/kron_impl.h) is ATen GEMMs (MKL /
// oneDNN) per row block; this file splits the blocks over threads.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>

#include "common/kron_impl.h"

namespace fastpeft {
namespace {
struct CpuKronBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  // fp32/fp64 (MKL): ~64 KiB of x per block, so the block's X, T and Y stay in L2 between its GEMMs
  // (d=1024, 2048 rows: fwd+bwd ~1.5x faster than whole-problem GEMMs). bf16/fp16 (oneDNN): one
  // block, whose GEMMs run multi-threaded: oneDNN's per-call cost on 16-row blocks made the blocked
  // bf16 op 2x slower.
  static int64_t kron_block_rows(int64_t n, int64_t in, at::ScalarType t) {
    if (t != at::kFloat && t != at::kDouble) return std::max<int64_t>(n, 1);
    return std::clamp<int64_t>((int64_t{1} << 14) / std::max<int64_t>(in, 1), 1, std::max<int64_t>(n, 1));
  }
  static int64_t kron_workers() { return std::max(1, at::get_num_threads()); }
  template <class F>
  static void for_row_blocks(int64_t n, int64_t rows, F&& f) {
    const int64_t blocks = (n + rows - 1) / rows;
    if (blocks <= 1) {  // inline, so the GEMMs inside keep their own multi-threading
      f(0, n, 0);
      return;
    }
    // Worker threads take the caller's dispatcher state (autograd already handled: the ATen calls
    // inside must not see requires_grad inputs), as at::parallel_for does not propagate it.
    const at::ThreadLocalState state;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::ThreadLocalStateGuard tls(state);
      const int64_t w = at::get_thread_num();
      for (int64_t i = b0; i < b1; ++i) f(i * rows, std::min(n, (i + 1) * rows), w);
    });
  }
};
}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("kron_forward", &fastpeft::kron_forward_impl<fastpeft::CpuKronBackend>);
  m.impl("kron_backward", &fastpeft::kron_backward_impl<fastpeft::CpuKronBackend>);
}
