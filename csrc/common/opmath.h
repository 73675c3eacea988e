// The op-math type of the elementwise kernels (CPU and CUDA): float32 for bf16/fp16/fp32 inputs,
// float64 for float64.
#pragma once

namespace fastpeft {

template <class T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};

}  // namespace fastpeft
