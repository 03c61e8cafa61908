// The 3x3, stride 1, padding 1 convolution by Winograd's F(2x2, 3x3): each 2x2 output tile
// comes from a 4x4 input patch as Y = A^T [U . (B^T d B)] A, so the convolution becomes 16
// GEMMs of (out x in) @ (in x tiles), 2.25x fewer multiplications than direct. Float32 on
// AVX-512 CPUs, through `sgemm_avx512`; the weight comes transformed, U = G g G^T, from Python
// (csp_kernels.ops.conv3x3.winograd_weight).
//
// Work goes in blocks of 64 consecutive tiles of one sample, in row-major tile order (a block
// may start and end inside a tile row), so that the block's 16 transformed inputs and outputs
// stay in L2 and every GEMM fills the 64-column panel of `sgemm_avx512`'s micro-kernel (blocks
// of whole tile rows left up to 38% of it idle: 40 tiles of an 80-wide map): input transform
// into scratch laid out as the GEMM's packed panels (read in place), the 16 GEMMs with the U
// matrices packed once, output transform straight into `out`, which may be a channel slice.
// Every transform takes runs of 16 tiles of a tile row at a time, splitting and interleaving
// even and odd pixels in registers.
//
// The weight gradient is the gradient of that computation: per tile, dM = A dY A^T (4x4 from
// the 2x2 output-gradient tile), dU[xi] = sum over tiles of dM[xi] V[xi]^T (16 GEMMs of
// (out x tiles) @ (tiles x in), accumulated per thread over its blocks, which are whole tile
// rows: the tiles are the reduction there), dg = G^T dU G.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <torch/library.h>

#include <algorithm>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <immintrin.h>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "plane_layout.h"
#include "sgemm_avx512.h"

namespace csp_kernels {
namespace {

constexpr int64_t kTilesPerBlock = 64;

// A sample's tiles and their blocks of `block_tiles` consecutive tiles (the last one shorter).
struct Geometry {
  int64_t height, width, tile_rows, tile_cols, tiles, block_tiles, blocks;
};

Geometry geometry_of(int64_t height, int64_t width, int64_t block_tiles) {
  Geometry g{height, width, (height + 1) / 2, (width + 1) / 2, 0, 0, 0};
  g.tiles = g.tile_rows * g.tile_cols;
  g.block_tiles = std::min(block_tiles, g.tiles);
  g.blocks = (g.tiles + g.block_tiles - 1) / g.block_tiles;
  return g;
}

// f(ty, lo, hi, at) for each tile row ty that tiles [t0, t1) of a sample meet: its columns
// [lo, hi), the first of them at position `at` of the block.
template <typename F>
void for_each_tile_row(const Geometry& g, int64_t t0, int64_t t1, F&& f) {
  for (int64_t ty = t0 / g.tile_cols; ty * g.tile_cols < t1; ++ty) {
    const int64_t row0 = ty * g.tile_cols;
    const int64_t lo = std::max(t0, row0) - row0, hi = std::min(t1, row0 + g.tile_cols) - row0;
    f(ty, lo, hi, row0 + lo - t0);
  }
}

// A block's tiles in runs of at most 16 consecutive tiles of one tile row: the run's first tile
// is at position `at` of the block and its patches' first column is x0 = 2 tx - 1 of tile row
// `ty`; `tiles` masks the run's tiles among 16, `load[q]` the image's columns among the 16
// starting at x0 + kLoadAt[q] (the four loads of a run's patch rows), `pixels[h]` the run's
// output pixels among the 16 from x0 + 1 + 16 h (its 2x2 tiles' columns inside the image).
constexpr int64_t kLoadAt[4] = {0, 16, 2, 18};

struct Run {
  int64_t ty, x0, at;
  __mmask16 tiles, load[4], pixels[2];
};

// Bit i set where pred(i), for i in [0, 16).
template <typename P>
__mmask16 mask_of(P&& pred) {
  unsigned bits = 0;
  for (int64_t i = 0; i < 16; ++i) {
    if (pred(i)) bits |= 1u << i;
  }
  return static_cast<__mmask16>(bits);
}

// The runs of each block of a sample, by block index: the same for every channel and sample, so
// computed once per call.
std::vector<std::vector<Run>> block_runs(const Geometry& g) {
  std::vector<std::vector<Run>> blocks(g.blocks);
  for (int64_t block = 0; block < g.blocks; ++block) {
    const int64_t t0 = block * g.block_tiles, t1 = std::min(g.tiles, t0 + g.block_tiles);
    for_each_tile_row(g, t0, t1, [&](int64_t ty, int64_t lo, int64_t hi, int64_t at) {
      for (int64_t tx = lo; tx < hi; tx += 16) {
        const int64_t count = std::min<int64_t>(16, hi - tx), x0 = 2 * tx - 1;
        Run run{ty, x0, at + tx - lo, mask_of([&](int64_t i) { return i < count; }), {}, {}};
        for (int64_t q = 0; q < 4; ++q) {
          run.load[q] = mask_of([&](int64_t i) { return x0 + kLoadAt[q] + i >= 0 && x0 + kLoadAt[q] + i < g.width; });
        }
        for (int64_t h = 0; h < 2; ++h) {
          run.pixels[h] = mask_of([&](int64_t i) { return 16 * h + i < 2 * count && x0 + 1 + 16 * h + i < g.width; });
        }
        blocks[block].push_back(run);
      }
    });
  }
  return blocks;
}

// The even and odd floats of the 32 in (lo, hi): lane i of `even` is float 2i, of `odd` 2i + 1.
__attribute__((target("avx512f"))) inline void split_even_odd(__m512 lo, __m512 hi, __m512& even, __m512& odd) {
  const __m512i index = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  even = _mm512_permutex2var_ps(lo, index, hi);
  odd = _mm512_permutex2var_ps(lo, _mm512_add_epi32(index, _mm512_set1_epi32(1)), hi);
}

// V[xi][c][t] = (B^T d B)[xi] of channel c's patches d, for the block's tiles (`runs`), rows `ldv`
// floats apart (only the block's columns written). Returns false when the patches hold an inf or
// a NaN. Per run and patch row, four masked loads (zero outside the image) and four permutes
// give the run's 16 patches' four columns, even and odd pixels from x0 and from x0 + 2; then
// B^T d B in registers. (Rows split into even and odd columns by scalar loops 28 tiles long took
// as long as the GEMMs of a 128 -> 32 channel convolution on 56x56; gathering the patches, no
// less.)
__attribute__((target("avx512f"))) bool transform_input(const float* plane, const Geometry& g,
                                                        const std::vector<Run>& runs, int64_t c, int64_t channels,
                                                        int64_t ldv, float* v) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 probe = zero;  // the sum of d * 0: NaN where d holds an inf or a NaN
  for (const Run& run : runs) {
    __m512 d[4][4];
    for (int64_t r = 0; r < 4; ++r) {
      const int64_t y = 2 * run.ty - 1 + r;
      if (y < 0 || y >= g.height) {
        for (int64_t s = 0; s < 4; ++s) d[r][s] = zero;
        continue;
      }
      __m512 part[4];
      for (int64_t q = 0; q < 4; ++q) {
        part[q] = _mm512_maskz_loadu_ps(run.load[q], plane + y * g.width + run.x0 + kLoadAt[q]);
        probe = _mm512_add_ps(probe, _mm512_mul_ps(part[q], zero));
      }
      split_even_odd(part[0], part[1], d[r][0], d[r][1]);
      split_even_odd(part[2], part[3], d[r][2], d[r][3]);
    }
    for (int64_t i = 0; i < 4; ++i) {  // row i of B^T d: (d0 - d2, d1 + d2, d2 - d1, d1 - d3)
      __m512 u[4];
      for (int64_t s = 0; s < 4; ++s) {
        u[s] = i == 0 ? _mm512_sub_ps(d[0][s], d[2][s])
             : i == 1 ? _mm512_add_ps(d[1][s], d[2][s])
             : i == 2 ? _mm512_sub_ps(d[2][s], d[1][s])
                      : _mm512_sub_ps(d[1][s], d[3][s]);
      }
      // ... times B: the same combination of its columns.
      const __m512 row[4] = {_mm512_sub_ps(u[0], u[2]), _mm512_add_ps(u[1], u[2]), _mm512_sub_ps(u[2], u[1]),
                             _mm512_sub_ps(u[1], u[3])};
      for (int64_t j = 0; j < 4; ++j) {
        _mm512_mask_storeu_ps(v + ((4 * i + j) * channels + c) * ldv + run.at, run.tiles, row[j]);
      }
    }
  }
  return _mm512_reduce_add_ps(probe) == 0.0f;
}

// out's channel k over the block's tiles (`runs`): Y = A^T M A from M[xi][k][t], rows `tiles`
// floats apart. Per run, M's 16 rows are loaded for its 16 tiles, A^T M A computed in registers
// and each output row's even and odd pixels interleaved by two permutes into masked stores.
__attribute__((target("avx512f"))) void transform_output(const float* m, const Geometry& g,
                                                         const std::vector<Run>& runs, int64_t k, int64_t channels,
                                                         int64_t tiles, float* plane) {
  const __m512i low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
  for (const Run& run : runs) {
    __m512 s[2][4];  // rows of A^T M: (m0 + m1 + m2, m1 - m2 - m3) over M's rows, per column j
    for (int64_t j = 0; j < 4; ++j) {
      __m512 mr[4];
      for (int64_t r = 0; r < 4; ++r) {
        mr[r] = _mm512_maskz_loadu_ps(run.tiles, m + ((4 * r + j) * channels + k) * tiles + run.at);
      }
      s[0][j] = _mm512_add_ps(_mm512_add_ps(mr[0], mr[1]), mr[2]);
      s[1][j] = _mm512_sub_ps(_mm512_sub_ps(mr[1], mr[2]), mr[3]);
    }
    for (int64_t a = 0; a < 2; ++a) {
      const int64_t y = 2 * run.ty + a;
      if (y >= g.height) break;
      const __m512* q = s[a];
      const __m512 even = _mm512_add_ps(_mm512_add_ps(q[0], q[1]), q[2]);
      const __m512 odd = _mm512_sub_ps(_mm512_sub_ps(q[1], q[2]), q[3]);
      float* row = plane + y * g.width + run.x0 + 1;
      _mm512_mask_storeu_ps(row, run.pixels[0], _mm512_permutex2var_ps(even, low, odd));
      _mm512_mask_storeu_ps(row + 16, run.pixels[1], _mm512_permutex2var_ps(even, high, odd));
    }
  }
}

// -v by its sign bit, as C's unary minus (0 - v would turn -0 into +0).
__attribute__((target("avx512f"))) inline __m512 negate(__m512 v) {
  return _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(static_cast<int32_t>(0x80000000u))));
}

// dM[xi][k][t] = (A dY A^T)[xi] of output-gradient channel k's 2x2 tiles, for the block's tiles
// (`runs`), rows `tiles` floats apart (A = [[1, 0], [1, 1], [1, -1], [0, -1]]). Returns false
// when the tiles hold an inf or a NaN. Per run, each of its two pixel rows is two masked loads
// (zero outside the image) split into even and odd pixels by two permutes.
__attribute__((target("avx512f"))) bool transform_grad(const float* plane, const Geometry& g,
                                                       const std::vector<Run>& runs, int64_t k, int64_t channels,
                                                       int64_t tiles, float* dm) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 probe = zero;  // the sum of dY * 0: NaN where dY holds an inf or a NaN
  for (const Run& run : runs) {
    __m512 y[2][2];  // y[a][b]: pixel (2 ty + a, 2 tx + b) of the run's tiles
    for (int64_t a = 0; a < 2; ++a) {
      const int64_t row = 2 * run.ty + a;
      if (row >= g.height) {
        y[a][0] = y[a][1] = zero;
        continue;
      }
      const float* pixels = plane + row * g.width + run.x0 + 1;
      const __m512 lo = _mm512_maskz_loadu_ps(run.pixels[0], pixels);
      const __m512 hi = _mm512_maskz_loadu_ps(run.pixels[1], pixels + 16);
      probe = _mm512_add_ps(probe, _mm512_add_ps(_mm512_mul_ps(lo, zero), _mm512_mul_ps(hi, zero)));
      split_even_odd(lo, hi, y[a][0], y[a][1]);
    }
    // Rows of A dY (a, b), then each row times A^T: (a, a + b, a - b, -b).
    const __m512 r[4][2] = {{y[0][0], y[0][1]},
                            {_mm512_add_ps(y[0][0], y[1][0]), _mm512_add_ps(y[0][1], y[1][1])},
                            {_mm512_sub_ps(y[0][0], y[1][0]), _mm512_sub_ps(y[0][1], y[1][1])},
                            {negate(y[1][0]), negate(y[1][1])}};
    for (int64_t i = 0; i < 4; ++i) {
      const __m512 out[4] = {r[i][0], _mm512_add_ps(r[i][0], r[i][1]), _mm512_sub_ps(r[i][0], r[i][1]),
                             negate(r[i][1])};
      for (int64_t j = 0; j < 4; ++j) {
        _mm512_mask_storeu_ps(dm + ((4 * i + j) * channels + k) * tiles + run.at, run.tiles, out[j]);
      }
    }
  }
  return _mm512_reduce_add_ps(probe) == 0.0f;
}

void conv3x3_winograd_out_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
                              const std::optional<at::Tensor>& conv_weight) {
  const PlaneLayout X = plane_layout(x, "x"), O = plane_layout(out, "out");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                       out.scalar_type() == at::kFloat,
                   "conv3x3_winograd runs float32; got x ", x.scalar_type(), ", weight ", weight.scalar_type(),
                   ", out ", out.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(0) == 16 && weight.size(2) == X.channels && weight.is_contiguous(),
                    "weight must be the contiguous (16, out_channels, ", X.channels,
                    ") Winograd transform of the 3x3 weight; got shape ", weight.sizes());
  TORCH_CHECK_VALUE(out.size(0) == X.batch && out.size(1) == weight.size(1) && out.size(2) == x.size(2) &&
                        out.size(3) == x.size(3),
                    "out must have shape (", X.batch, ", ", weight.size(1), ", ", x.size(2), ", ", x.size(3),
                    "); got ", out.sizes());
  TORCH_CHECK(sgemm_avx512_supported(), "conv3x3_winograd needs a CPU with AVX-512");
  if (O.channels == 0 || X.batch == 0 || X.plane == 0) return;
  if (X.channels == 0) {
    out.zero_();
    return;
  }
  const Geometry g = geometry_of(x.size(2), x.size(3), kTilesPerBlock);
  const int64_t C = X.channels, K = O.channels;
  const float* xp = x.const_data_ptr<float>();
  const float* up = weight.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  // V's rows are one packed GEMM panel (64 floats, 64-byte aligned), which `sgemm_avx512`
  // reads in place.
  const int64_t max_tiles = g.block_tiles, ldv = kTilesPerBlock;
  // The 16 U matrices packed once for all blocks' GEMMs.
  const int64_t packed_size = sgemm_avx512_packed_a_size(K, C);
  std::vector<float> u_packed(16 * packed_size);
  for (int64_t xi = 0; xi < 16; ++xi) {
    sgemm_avx512_pack_a(K, C, up + xi * K * C, C, 1, u_packed.data() + xi * packed_size);
  }
  const std::vector<std::vector<Run>> runs_of_block = block_runs(g);
  std::atomic<bool> finite{true};
  at::parallel_for(0, X.batch * g.blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> v_storage(16 * C * ldv + 16), m(16 * K * max_tiles);
    float* v = v_storage.data() + (64 - reinterpret_cast<uintptr_t>(v_storage.data()) % 64) % 64 / sizeof(float);
    for (int64_t b = b0; b < b1; ++b) {
      if (conv_weight && !finite.load(std::memory_order_relaxed)) return;  // redone below
      const int64_t n = b / g.blocks, t0 = (b % g.blocks) * g.block_tiles;
      const int64_t t1 = std::min(g.tiles, t0 + g.block_tiles), tiles = t1 - t0;
      const std::vector<Run>& runs = runs_of_block[b % g.blocks];
      bool block_finite = true;
      for (int64_t c = 0; c < C; ++c) {
        block_finite &= transform_input(xp + n * X.batch_stride + c * X.channel_stride, g, runs, c, C, ldv, v);
      }
      if (!block_finite) finite.store(false, std::memory_order_relaxed);
      for (int64_t xi = 0; xi < 16; ++xi) {
        sgemm_avx512(K, tiles, C, up + xi * K * C, C, 1, v + xi * C * ldv, ldv, 1, m.data() + xi * K * tiles, tiles,
                     false, u_packed.data() + xi * packed_size);
      }
      for (int64_t k = 0; k < K; ++k) {
        transform_output(m.data(), g, runs, k, K, tiles,
                         op + n * O.batch_stride + k * O.channel_stride);
      }
    }
  });
  if (conv_weight && !finite.load()) out.copy_(at::conv2d(x, *conv_weight, {}, 1, 1));
}

// The weight gradient of conv2d(x, weight, padding=1): (out_channels, in_channels, 3, 3) from
// x (batch, in, h, w) and grad_y (batch, out, h, w). Where either holds an inf or a NaN, ATen's
// (Winograd's transforms would turn one inf into NaNs).
at::Tensor conv3x3_winograd_weight_grad_cpu(const at::Tensor& x, const at::Tensor& grad_y) {
  const PlaneLayout X = plane_layout(x, "x"), GY = plane_layout(grad_y, "grad_y");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && grad_y.scalar_type() == at::kFloat,
                   "conv3x3_winograd_weight_grad runs float32; got x ", x.scalar_type(), ", grad_y ",
                   grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.size(0) == X.batch && grad_y.size(2) == x.size(2) && grad_y.size(3) == x.size(3),
                    "grad_y must have shape (", X.batch, ", out_channels, ", x.size(2), ", ", x.size(3), "); got ",
                    grad_y.sizes());
  TORCH_CHECK(sgemm_avx512_supported(), "conv3x3_winograd_weight_grad needs a CPU with AVX-512");
  const int64_t C = X.channels, K = GY.channels;
  at::Tensor grad_weight = at::zeros({K, C, 3, 3}, x.options());
  if (K == 0 || C == 0 || X.batch == 0 || X.plane == 0) return grad_weight;
  // Blocks of whole tile rows: here the tiles are the GEMMs' reduction, whose length matters
  // less than the two transforms' work on rows that a block would only partly cover (measured
  // 15-25% slower with the forward's blocks of 64 on 52- to 160-wide maps).
  const int64_t tile_cols = (x.size(3) + 1) / 2;
  const Geometry g = geometry_of(x.size(2), x.size(3), std::max<int64_t>(1, kTilesPerBlock / tile_cols) * tile_cols);
  const float* xp = x.const_data_ptr<float>();
  const float* gp = grad_y.const_data_ptr<float>();
  const int64_t max_tiles = g.block_tiles, ldv = std::max(max_tiles, kTilesPerBlock);
  std::vector<float> grad_u(16 * K * C, 0.0f);  // dU summed over the threads' partial sums
  std::mutex merge;
  const std::vector<std::vector<Run>> runs_of_block = block_runs(g);
  std::atomic<bool> finite{true};
  at::parallel_for(0, X.batch * g.blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> v(16 * C * ldv), dm(16 * K * max_tiles), partial(16 * K * C, 0.0f);
    for (int64_t b = b0; b < b1; ++b) {
      if (!finite.load(std::memory_order_relaxed)) return;
      const int64_t n = b / g.blocks, t0 = (b % g.blocks) * g.block_tiles;
      const int64_t t1 = std::min(g.tiles, t0 + g.block_tiles), tiles = t1 - t0;
      const std::vector<Run>& runs = runs_of_block[b % g.blocks];
      bool block_finite = true;
      for (int64_t c = 0; c < C; ++c) {
        block_finite &= transform_input(xp + n * X.batch_stride + c * X.channel_stride, g, runs, c, C, ldv,
                                        v.data());
      }
      for (int64_t k = 0; k < K; ++k) {
        block_finite &= transform_grad(gp + n * GY.batch_stride + k * GY.channel_stride, g, runs, k, K, tiles,
                                       dm.data());
      }
      if (!block_finite) {
        finite.store(false, std::memory_order_relaxed);
        return;
      }
      for (int64_t xi = 0; xi < 16; ++xi) {  // dU[xi] += dM[xi] (K x tiles) @ V[xi]^T (tiles x C)
        sgemm_avx512(K, C, tiles, dm.data() + xi * K * tiles, tiles, 1, v.data() + xi * C * ldv, 1, ldv,
                     partial.data() + xi * K * C, C, true);
      }
    }
    const std::lock_guard<std::mutex> lock(merge);
    for (size_t i = 0; i < partial.size(); ++i) grad_u[i] += partial[i];
  });
  if (!finite.load()) {
    return std::get<1>(at::convolution_backward(grad_y, x, at::empty({K, C, 3, 3}, x.options()), std::nullopt,
                                                {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1, {false, true, false}));
  }
  // dg = G^T dU G, G = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], in double.
  constexpr std::array<std::array<double, 3>, 4> G{{{1, 0, 0}, {.5, .5, .5}, {.5, -.5, .5}, {0, 0, 1}}};
  float* wp = grad_weight.mutable_data_ptr<float>();
  at::parallel_for(0, K * C, 256, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int pr = 0; pr < 3; ++pr) {
        for (int q = 0; q < 3; ++q) {
          double sum = 0;
          for (int i = 0; i < 4; ++i) {
            for (int j = 0; j < 4; ++j) sum += G[i][pr] * G[j][q] * grad_u[(4 * i + j) * K * C + p];
          }
          wp[p * 9 + pr * 3 + q] = static_cast<float>(sum);
        }
      }
    }
  });
  return grad_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CPU, m) {
  m.impl("conv3x3_winograd_out", &conv3x3_winograd_out_cpu);
  m.impl("conv3x3_winograd_weight_grad", &conv3x3_winograd_weight_grad_cpu);
}

}  // namespace csp_kernels
