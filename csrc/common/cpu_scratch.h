// Reusable per-thread work buffers for the CPU kernels: a fresh multi-MiB buffer costs ~0.5 ms per
// MiB in first-touch page faults, more than many of the passes that fill it.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstddef>
#include <map>
#include <mutex>
#include <vector>

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

// A recycled, uninitialised contiguous tensor for large internal values an op saves for its backward
// (DoRA's z): such a tensor lives from one op to another, so scratch() cannot hold it, and a fresh one
// pays first-touch page faults on every step (glibc returns freed multi-MiB blocks to the system when
// several are freed together). Blocks of at least 1 MiB come back here when their tensor dies and are
// handed out again for the same byte size; at most kPoolCap bytes wait in the pool, the rest is freed.
class SavedPool {
 public:
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
    constexpr size_t kMinBytes = size_t{1} << 20;
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(opts.dtype().toScalarType());
    if (bytes < kMinBytes) return at::empty(sizes, opts);
    SavedPool& p = get();
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(p.mu_);
      auto it = p.free_.find(bytes);
      if (it != p.free_.end()) {
        ptr = it->second;
        p.free_.erase(it);
        p.cached_ -= bytes;
      }
    }
    if (ptr == nullptr) ptr = c10::alloc_cpu(bytes);
    return at::from_blob(ptr, sizes, [bytes](void* q) { get().give_back(q, bytes); }, opts.device(c10::kCPU));
  }

 private:
  static constexpr size_t kPoolCap = size_t{256} << 20;

  static SavedPool& get() {
    static SavedPool* p = new SavedPool();  // never destroyed: tensors may die during exit
    return *p;
  }

  void give_back(void* q, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= kPoolCap) {
        free_.emplace(bytes, q);
        cached_ += bytes;
        return;
      }
    }
    c10::free_cpu(q);
  }

  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

}  // namespace fastpeft::cpu
