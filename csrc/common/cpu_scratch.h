// Reusable per-thread work buffers for the CPU kernels: a fresh multi-MiB buffer costs ~0.5 ms per
// MiB in first-touch page faults, more than many of the passes that fill it.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace fastpeft::cpu {

// Slots used: 0, 1 - the lora drivers' row chunks; 2 - the NF4 matmul's dequantised weight tile;
// 3 - the NF4 matmul's decoded absmax.
constexpr int kScratchSlots = 4;

// An uninitialised contiguous [rows, cols] buffer, valid until the next scratch() call with the
// same slot on this thread. One growing byte buffer per slot and thread, reused across calls;
// requests over 8 MiB get a fresh tensor (then the page faults are small next to the work on it)
// and are not kept.
inline at::Tensor scratch(int slot, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  constexpr int64_t kMaxCached = int64_t{8} << 20;
  TORCH_INTERNAL_ASSERT(slot >= 0 && slot < kScratchSlots);
  const at::ScalarType t = opts.dtype().toScalarType();
  const int64_t bytes = std::max<int64_t>(rows * cols, 1) * static_cast<int64_t>(c10::elementSize(t));
  if (bytes > kMaxCached) return at::empty({rows, cols}, opts);
  thread_local at::Tensor cache[kScratchSlots];
  at::Tensor& c = cache[slot];
  if (!c.defined() || c.numel() < bytes) c = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  return c.narrow(0, 0, bytes).view(t).narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace fastpeft::cpu
