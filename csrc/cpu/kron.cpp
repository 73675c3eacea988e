// CPU registration of the kron family (LoKr). The driver (common/kron_impl.h) is all ATen GEMMs
// (MKL / oneDNN): the input-centric formulation leaves no elementwise pass worth fusing.
#include <torch/library.h>

#include "common/kron_impl.h"

namespace fastpeft {
namespace {
struct CpuKronBackend {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
};
}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("kron_forward", &fastpeft::kron_forward_impl<fastpeft::CpuKronBackend>);
  m.impl("kron_backward", &fastpeft::kron_backward_impl<fastpeft::CpuKronBackend>);
}
