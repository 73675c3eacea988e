// CUDA registration of the kron family (LoKr). The driver (common/kron_impl.h) is all ATen GEMMs
// (cuBLAS on torch's current stream); this file only supplies the device guard.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/kron_impl.h"

namespace fastpeft {
namespace {
struct CudaKronBackend {
  struct Guard {
    explicit Guard(c10::Device d) : guard(d) {}
    c10::cuda::CUDAGuard guard;
  };
};
}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("kron_forward", &fastpeft::kron_forward_impl<fastpeft::CudaKronBackend>);
  m.impl("kron_backward", &fastpeft::kron_backward_impl<fastpeft::CudaKronBackend>);
}
