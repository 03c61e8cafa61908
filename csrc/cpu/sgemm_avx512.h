// A single-threaded float32 GEMM for AVX-512 CPUs, used for the tile GEMMs of the fused CPU
// 1x1 convolutions in place of the BLAS that torch links. Why: torch's BLAS is MKL, which on
// AMD CPUs takes a code path that on the 2-core AMD EPYC (Zen 5) we measure on reaches 213
// GFLOP/s on a 2048^3 sgemm, while oneDNN's AVX-512 convolution reaches 462 GFLOP/s on the
// same cores (1x1, channels_last, 8x56x56x256).
#pragma once

#include <cstdint>

namespace csp_kernels {

// Whether this CPU runs `sgemm_avx512` (it has AVX-512F).
bool sgemm_avx512_supported();

// Whether csp_kernels' float32 CPU GEMMs use `sgemm_avx512` rather than torch's BLAS: where it
// is supported, on CPUs other than Intel's (MKL, torch's BLAS, is fast on Intel's), unless the
// environment variable CSP_KERNELS_CPU_SGEMM says "blas" (or "avx512"), read once.
bool sgemm_avx512_preferred();

// Row-major C (m x n) = A (m x k) @ B (k x n), plus C's old values if `accumulate`:
//   C[i * ldc + j] (+)= sum_p A[i * a_row + p * a_col] * B[p * b_row + j * b_col].
// A and B through any strides (both are packed into cache-sized panels, except a B that is
// one already: n <= 64, rows of 64 floats (b_row == 64, b_col == 1), 64-byte aligned, whose
// padding columns may hold any values); C's rows contiguous.
// With `a_packed` (from `sgemm_avx512_pack_a` of the same m, k), A is read from it instead:
// for callers that multiply one A with many Bs.
void sgemm_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                  int64_t b_row, int64_t b_col, float* c, int64_t ldc, bool accumulate,
                  const float* a_packed = nullptr);

// A (m x k, any strides) packed as `sgemm_avx512` packs it, into `sgemm_avx512_packed_a_size(m, k)`
// floats.
int64_t sgemm_avx512_packed_a_size(int64_t m, int64_t k);
void sgemm_avx512_pack_a(int64_t m, int64_t k, const float* a, int64_t a_row, int64_t a_col, float* packed);

}  // namespace csp_kernels
