// Block-wide sums for the per-channel reduction kernels (one block reduces one channel).
#pragma once

namespace csp_kernels {

constexpr int kReduceThreads = 512;

__device__ inline double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  return v;
}

// Sums a and b over the block; the totals are valid in thread 0. blockDim.x == kReduceThreads.
__device__ inline void block_sum2(double& a, double& b) {
  __shared__ double shared_a[kReduceThreads / 32], shared_b[kReduceThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    shared_a[warp] = a;
    shared_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kReduceThreads / 32 ? shared_a[lane] : 0.0;
    b = lane < kReduceThreads / 32 ? shared_b[lane] : 0.0;
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

}  // namespace csp_kernels
