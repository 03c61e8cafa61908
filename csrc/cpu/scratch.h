// Per-thread scratch memory that outlives the call, for the CPU kernels' temporary buffers.
//
// Why: a buffer of a few MiB allocated at every call is fresh pages from the operating system at
// every call (page faults, and the kernel zeroing each page), which on the 2-core VMs this
// project measures on cost as much as the GEMMs they feed (benchmarks/results/design-notes.md).
// A slot keeps the largest size asked of it on that thread until the thread ends; its contents
// are undefined at each call. Slots that one call uses at the same time must differ; a
// parallel_for worker (the calling thread among them) must not use a slot its caller holds.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace csp_kernels {

enum class Scratch : int {
  kTile,            // for_each_tile's per-worker tile
  kSharedWeight,    // SharedB: the weight packed once per call
  kPartials,        // per-thread weight-gradient partial sums
  kWinogradU,       // the packed transformed weight
  kWinogradV,       // transformed input tiles
  kWinogradM,       // GEMM outputs / transformed output gradients
  kWinogradGradU,   // the transformed weight gradient
  kCount,
};

// `count` elements of T, 64-byte aligned, in this thread's buffer `slot`.
template <typename T>
T* scratch(Scratch slot, int64_t count) {
  struct Buffer {
    std::unique_ptr<unsigned char[]> data;
    size_t bytes = 0;
  };
  thread_local std::array<Buffer, static_cast<size_t>(Scratch::kCount)> buffers;
  Buffer& b = buffers[static_cast<size_t>(slot)];
  const size_t bytes = static_cast<size_t>(count < 0 ? 0 : count) * sizeof(T) + 64;
  if (b.bytes < bytes) {
    b.data.reset(new unsigned char[bytes]);  // not value-initialized: no zeroing pass
    b.bytes = bytes;
  }
  const auto address = reinterpret_cast<uintptr_t>(b.data.get());
  return reinterpret_cast<T*>(b.data.get() + (64 - address % 64) % 64);
}

}  // namespace csp_kernels
