// CUDA backend of the kron family (LoKr). The driver (common/kron_impl.h) is ATen GEMMs (cuBLAS on
// torch's current stream); this file supplies the device guard and runs the whole problem as one block.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/kron_impl.h"

namespace fastpeft {
namespace {
struct CudaKronBackend {
  struct Guard {
    explicit Guard(c10::Device d) : guard(d) {}
    c10::cuda::CUDAGuard guard;
  };
  // One block: cuBLAS wants the whole problem in each call.
  static int64_t kron_block_rows(int64_t n, int64_t, at::ScalarType) { return std::max<int64_t>(n, 1); }
  static int64_t kron_workers() { return 1; }
  template <class F>
  static void for_row_blocks(int64_t n, int64_t, F&& f) {
    f(0, n, 0);
  }
};
}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("kron_forward", &fastpeft::kron_forward_impl<fastpeft::CudaKronBackend>);
  m.impl("kron_backward", &fastpeft::kron_backward_impl<fastpeft::CudaKronBackend>);
}
