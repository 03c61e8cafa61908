// The GEMM of sgemm_avx512.h: the classic packed design (Goto / BLIS). B is packed into
// k-block x 64-column panels and A into k-block x 6-row panels, zero-padded at the edges, and a
// 6 x 64 register-blocked micro-kernel (24 zmm accumulators, 4 loads of B and 6 broadcasts of
// A per 24 FMAs) runs over them; only C's valid rows and columns are stored (masked).
#include "sgemm_avx512.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "blas.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <cstdint>

namespace csp_kernels {
namespace {

constexpr int kMR = 6;         // rows of C per micro-kernel call
constexpr int kNR = 64;        // columns of C per micro-kernel call: 4 zmm
constexpr int64_t kKC = 256;   // k-block: a B micro-panel of kKC x kNR floats is 64 KiB, in L2
constexpr int64_t kMC = 96;    // rows of A packed at once: 96 KiB
constexpr int64_t kNC = 512;   // columns of B packed at once: 512 KiB, in L2

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// In-register transpose of 16 rows of 16 floats (unpack, then 128-bit lane shuffles).
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// The panel of a B whose k runs contiguously (b_row == 1, e.g. x's planes in the weight
// gradient): 16 x 16 blocks transposed in registers, zero past `width` columns.
__attribute__((target("avx512f"))) void pack_b_transposed(int64_t kc, int64_t width, const float* b, int64_t b_col,
                                                          float* panel) {
  for (int64_t p = 0; p < kc; p += 16) {
    const int64_t rows = std::min<int64_t>(16, kc - p);
    const __mmask16 mask = rows == 16 ? __mmask16(0xFFFF) : __mmask16((1u << rows) - 1);
    for (int64_t jj = 0; jj < kNR; jj += 16) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) {
        r[i] = jj + i < width ? _mm512_maskz_loadu_ps(mask, b + (jj + i) * b_col + p) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int64_t i = 0; i < rows; ++i) _mm512_store_ps(panel + (p + i) * kNR + jj, r[i]);
    }
  }
}

// Bp[panel][p][0..kNR) = B[p][j0 + panel * kNR + jj], zero past n.
void pack_b(int64_t kc, int64_t nc, const float* b, int64_t b_row, int64_t b_col, float* bp) {
  for (int64_t j0 = 0; j0 < nc; j0 += kNR) {
    const int64_t width = std::min<int64_t>(kNR, nc - j0);
    float* panel = bp + j0 * kc;
    if (b_row == 1 && b_col != 1) {
      pack_b_transposed(kc, width, b + j0 * b_col, b_col, panel);
    } else if (b_col == 1) {
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = b + p * b_row + j0;
        float* dst = panel + p * kNR;
        std::copy(src, src + width, dst);
        std::fill(dst + width, dst + kNR, 0.0f);
      }
    } else {
      for (int64_t jj = 0; jj < width; ++jj) {
        const float* src = b + (j0 + jj) * b_col;
        for (int64_t p = 0; p < kc; ++p) panel[p * kNR + jj] = src[p * b_row];
      }
      for (int64_t p = 0; p < kc; ++p) std::fill(panel + p * kNR + width, panel + (p + 1) * kNR, 0.0f);
    }
  }
}

// Ap[panel][p][0..kMR) = A[i0 + panel * kMR + ii][p], zero past m.
void pack_a(int64_t mc, int64_t kc, const float* a, int64_t a_row, int64_t a_col, float* ap) {
  for (int64_t i0 = 0; i0 < mc; i0 += kMR) {
    const int64_t rows = std::min<int64_t>(kMR, mc - i0);
    float* panel = ap + i0 * kc;
    for (int64_t p = 0; p < kc; ++p) {
      for (int64_t ii = 0; ii < kMR; ++ii) panel[p * kMR + ii] = ii < rows ? a[(i0 + ii) * a_row + p * a_col] : 0.0f;
    }
  }
}

__attribute__((target("avx512f"))) inline __mmask16 column_mask(int64_t valid, int v) {
  const int64_t left = valid - 16 * v;
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// C (rows x cols, rows <= kMR, cols <= kNR) (+)= Ap panel (kc x kMR) @ Bp panel (kc x kNR).
__attribute__((target("avx512f"))) void micro_kernel(int64_t kc, const float* ap, const float* bp, float* c,
                                                     int64_t ldc, int64_t rows, int64_t cols, bool accumulate) {
  __m512 acc[kMR][4];
#pragma GCC unroll 6
  for (int i = 0; i < kMR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kc; ++p) {
    const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16), b2 = _mm512_load_ps(bp + 32),
                 b3 = _mm512_load_ps(bp + 48);
#pragma GCC unroll 6
    for (int i = 0; i < kMR; ++i) {
      const __m512 a = _mm512_set1_ps(ap[i]);
      acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(a, b2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(a, b3, acc[i][3]);
    }
    ap += kMR;
    bp += kNR;
  }
  const __mmask16 masks[4] = {column_mask(cols, 0), column_mask(cols, 1), column_mask(cols, 2), column_mask(cols, 3)};
#pragma GCC unroll 6
  for (int i = 0; i < kMR; ++i) {
    if (i >= rows) break;
    float* row = c + i * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      if (masks[v] == 0) break;
      __m512 r = acc[i][v];
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(masks[v], row + 16 * v));
      _mm512_mask_storeu_ps(row + 16 * v, masks[v], r);
    }
  }
}

// Per-thread packing buffers, 64-byte aligned for the kernel's aligned loads of B.
struct PackBuffers {
  std::vector<float> a, b;
  static float* aligned(std::vector<float>& v, int64_t size) {
    if (static_cast<int64_t>(v.size()) < size + 16) v.resize(size + 16);
    const auto address = reinterpret_cast<uintptr_t>(v.data());
    return v.data() + ((64 - address % 64) % 64) / sizeof(float);
  }
};

}  // namespace

bool sgemm_avx512_supported() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
}

bool sgemm_avx512_preferred() { return sgemm_choice().avx512; }

// Packed A: per k-block (kKC), every kMR-row panel of the whole of A; a block of rows i0 and
// k-block p0 starts at p0 * round_up(m, kMR) + i0 * kc.
int64_t sgemm_avx512_packed_a_size(int64_t m, int64_t k) { return round_up(m, kMR) * k; }

void sgemm_avx512_pack_a(int64_t m, int64_t k, const float* a, int64_t a_row, int64_t a_col, float* packed) {
  for (int64_t p0 = 0; p0 < k; p0 += kKC) {
    pack_a(m, std::min(kKC, k - p0), a + p0 * a_col, a_row, a_col, packed + p0 * round_up(m, kMR));
  }
}

void sgemm_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                  int64_t b_row, int64_t b_col, float* c, int64_t ldc, bool accumulate, const float* a_packed) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    }
    return;
  }
  // A B that already is one packed panel (row-major, kNR floats a row, 64-byte aligned, as the
  // Winograd convolution lays out its transformed input) is read in place; its columns past n
  // only feed columns of C that are not stored.
  const bool b_is_panel = b_col == 1 && b_row == kNR && n <= kNR && reinterpret_cast<uintptr_t>(b) % 64 == 0;
  thread_local PackBuffers buffers;
  float* bp = PackBuffers::aligned(buffers.b, kKC * round_up(std::min(n, kNC), kNR));
  float* ap = PackBuffers::aligned(buffers.a, kKC * round_up(std::min(m, kMC), kMR));
  for (int64_t j0 = 0; j0 < n; j0 += kNC) {
    const int64_t nc = std::min(kNC, n - j0);
    for (int64_t p0 = 0; p0 < k; p0 += kKC) {
      const int64_t kc = std::min(kKC, k - p0);
      const bool add = accumulate || p0 > 0;
      const float* panels = b_is_panel ? b + p0 * kNR : bp;
      if (!b_is_panel) pack_b(kc, nc, b + p0 * b_row + j0 * b_col, b_row, b_col, bp);
      for (int64_t i0 = 0; i0 < m; i0 += kMC) {
        const int64_t mc = std::min(kMC, m - i0);
        const float* panels_a = a_packed != nullptr ? a_packed + p0 * round_up(m, kMR) + i0 * kc : ap;
        if (a_packed == nullptr) pack_a(mc, kc, a + i0 * a_row + p0 * a_col, a_row, a_col, ap);
        for (int64_t jr = 0; jr < nc; jr += kNR) {
          for (int64_t ir = 0; ir < mc; ir += kMR) {
            micro_kernel(kc, panels_a + ir * kc, panels + jr * kc, c + (i0 + ir) * ldc + j0 + jr, ldc,
                         std::min<int64_t>(kMR, mc - ir), std::min<int64_t>(kNR, nc - jr), add);
          }
        }
      }
    }
  }
}

}  // namespace csp_kernels

#else  // not x86-64: torch's BLAS runs every GEMM

#include <c10/util/Exception.h>

namespace csp_kernels {

bool sgemm_avx512_supported() { return false; }

void sgemm_avx512(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*,
                  int64_t, bool, const float*) {
  TORCH_CHECK(false, "sgemm_avx512 needs an x86-64 CPU with AVX-512");
}

int64_t sgemm_avx512_packed_a_size(int64_t m, int64_t k) { return m * k; }

void sgemm_avx512_pack_a(int64_t, int64_t, const float*, int64_t, int64_t, float*) {
  TORCH_CHECK(false, "sgemm_avx512 needs an x86-64 CPU with AVX-512");
}

}  // namespace csp_kernels

#endif

namespace csp_kernels {
namespace {

template <typename F>
double seconds(const F& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// GFLOP/s of (ours, the BLAS) on the tile GEMMs of the fused 1x1 convolutions: 256 output
// channels of a 256-pixel tile, with the long reduction of a transition (k = 256) and the short
// one of a dense layer's conv1 (k = 96), each GEMM timed alternately, the fastest of several
// runs kept (a shared machine's other load only slows a run down).
std::pair<double, double> measure_tile_gemms() {
  const int m = 256, n = 256, shapes_k[2] = {256, 96}, reps = 7;
  std::vector<float> a(static_cast<size_t>(m) * 256, 0.5f), b(static_cast<size_t>(256) * n, 0.25f),
      c(static_cast<size_t>(m) * n);
  const SingleThreadedBlas blas_on_this_thread;
  double ours = 0, blas = 0, flops = 0;
  for (const int k : shapes_k) {
    const float one = 1, zero = 0;
    // Column-major C (n x m) = B^T-shaped (n x k) @ A (k x m), the tiles' call (conv1x1_tiles.h's gemm).
    const auto run_blas = [&] { sgemm_("N", "N", &n, &m, &k, &one, b.data(), &n, a.data(), &k, &zero, c.data(), &n); };
    const auto run_ours = [&] { sgemm_avx512(m, n, k, a.data(), k, 1, b.data(), n, 1, c.data(), n, false); };
    run_blas();
    run_ours();
    double best_ours = 1e30, best_blas = 1e30;
    for (int r = 0; r < reps; ++r) {
      best_ours = std::min(best_ours, seconds(run_ours));
      best_blas = std::min(best_blas, seconds(run_blas));
    }
    ours += best_ours;
    blas += best_blas;
    flops += 2.0 * m * n * k;
  }
  return {flops / ours / 1e9, flops / blas / 1e9};
}

SgemmChoice decide_sgemm() {
  const char* env = std::getenv("CSP_KERNELS_CPU_SGEMM");
  const bool asked_blas = env != nullptr && std::strcmp(env, "blas") == 0;
  const bool asked_avx512 = env != nullptr && std::strcmp(env, "avx512") == 0;
  if (asked_blas) return {false, "CSP_KERNELS_CPU_SGEMM=blas"};
  if (!sgemm_avx512_supported()) return {false, "this CPU has no AVX-512"};
  if (asked_avx512) return {true, "CSP_KERNELS_CPU_SGEMM=avx512"};
  const auto [ours, blas] = measure_tile_gemms();
  const auto rate = [](double gflops) { return std::to_string(static_cast<int>(gflops + 0.5)); };
  return {ours > blas, "measured on the tile GEMMs: avx512 " + rate(ours) + " vs blas " + rate(blas) +
                           " GFLOP/s (one thread)"};
}

}  // namespace

const SgemmChoice& sgemm_choice() {
  static const SgemmChoice choice = decide_sgemm();
  return choice;
}

}  // namespace csp_kernels
