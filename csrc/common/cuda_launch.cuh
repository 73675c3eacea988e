// Launch helpers shared by the elementwise CUDA kernel files (lora.cu, hadamard.cu): the op-math
// type (common/opmath.h) and the [rows, cols] grid shape (x over columns, y over rows with a grid-stride loop past
// 65535), so kernels need no 64-bit division.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/opmath.h"

namespace fastpeft::cuda {

using fastpeft::OpMath;

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline dim3 row_grid(int64_t rows, int64_t cols) {
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, ceil_div(cols, kThreads))),
              static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(rows, 1), kMaxGridY)));
}

}  // namespace fastpeft::cuda
