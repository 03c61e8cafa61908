// A single-threaded float32 GEMM for AVX-512 CPUs, used for the tile GEMMs of the fused CPU
// 1x1 convolutions in place of the BLAS that torch links where it is faster: torch's BLAS is
// MKL, whose speed depends on the CPU's vendor and generation (on AMD CPUs it takes a slow code
// path), so the choice is made by measuring both on the machine.
#pragma once

#include <cstdint>
#include <string>

namespace csp_kernels {

// Whether this CPU runs `sgemm_avx512` (it has AVX-512F).
bool sgemm_avx512_supported();

// Which float32 GEMM csp_kernels' CPU kernels use, decided once per process: the environment
// variable CSP_KERNELS_CPU_SGEMM ("avx512" or "blas") if set, else whichever of `sgemm_avx512`
// and torch's BLAS (single-threaded, as the tiles run it) multiplies the tile GEMMs of a 1x1
// convolution faster here. `reason` says how it was decided (with the measured rates).
struct SgemmChoice {
  bool avx512;
  std::string reason;
};
const SgemmChoice& sgemm_choice();

// sgemm_choice().avx512.
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
