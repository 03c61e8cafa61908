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

#include <immintrin.h>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "plane_layout.h"
#include "scratch.h"
#include "sgemm_avx512.h"

namespace csp_kernels {
namespace {

constexpr int64_t kTilesPerBlock = 64;

// A sample's tiles and their blocks of `block_tiles` consecutive tiles (the last one shorter).
struct Geometry {
  int64_t height, width, tile_rows, tile_cols, tiles, block_tiles, blocks;
};

// The 2x2 output tiles of one sample's height x width map.
int64_t tiles_per_sample(int64_t height, int64_t width) { return (height + 1) / 2 * ((width + 1) / 2); }

Geometry geometry_of(int64_t height, int64_t width, int64_t block_tiles) {
  Geometry g{height, width, (height + 1) / 2, (width + 1) / 2, tiles_per_sample(height, width), 0, 0};
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

// The batch's tiles in chunks of about `target` tiles for the phased kernels below: whole
// samples grouped when a sample has fewer tiles, else each sample's blocks of whole tile rows.
// Chunk i covers samples [n0, n1) and, of each, block `block` of `g`; sample n's tiles sit at
// column (n - n0) * g.block_tiles of the chunk's rows (`tiles` columns in all).
struct Chunks {
  Geometry g;
  std::vector<std::vector<Run>> runs;  // by block
  int64_t samples_per_chunk, count, batch;

  Chunks(int64_t batch_, int64_t height, int64_t width, int64_t target) : batch(batch_) {
    const int64_t tile_cols = (width + 1) / 2, tiles = tiles_per_sample(height, width);
    g = geometry_of(height, width, tiles <= target ? tiles : std::max<int64_t>(1, target / tile_cols) * tile_cols);
    runs = block_runs(g);
    samples_per_chunk = g.blocks == 1 ? std::max<int64_t>(1, target / g.tiles) : 1;
    count = g.blocks == 1 ? (batch + samples_per_chunk - 1) / samples_per_chunk : batch * g.blocks;
  }
  int64_t n0(int64_t i) const { return g.blocks == 1 ? i * samples_per_chunk : i / g.blocks; }
  int64_t n1(int64_t i) const { return g.blocks == 1 ? std::min(batch, n0(i) + samples_per_chunk) : n0(i) + 1; }
  int64_t block(int64_t i) const { return g.blocks == 1 ? 0 : i % g.blocks; }
  int64_t block_tiles(int64_t i) const {
    return std::min(g.tiles, (block(i) + 1) * g.block_tiles) - block(i) * g.block_tiles;
  }
  int64_t tiles(int64_t i) const { return (n1(i) - n0(i)) * block_tiles(i); }
  int64_t max_tiles() const { return samples_per_chunk * g.block_tiles; }
};

// Chunk tiles such that its transformed tiles, 16 floats per tile and channel of `channels`,
// take about 8 MiB: the GEMMs then read them from the L3 cache; at least one 64-column panel.
int64_t chunk_target(int64_t channels) {
  return std::max<int64_t>(kTilesPerBlock, (int64_t{2} << 20) / (16 * std::max<int64_t>(channels, 1)));
}

// The forward in three parallel phases per chunk (transform every plane's tiles, the 16 GEMMs,
// the output transforms), for maps whose samples have fewer tiles than one GEMM panel: the
// per-block path would multiply with a panel mostly idle and re-read the U matrices per sample.
// Returns false when x holds an inf or a NaN (`check_finite`; it stops there).
bool winograd_forward_phased(const float* xp, const PlaneLayout& X, int64_t height, int64_t width,
                             const float* u_packed, int64_t packed_size, float* op, const PlaneLayout& O,
                             bool check_finite) {
  const int64_t C = X.channels, K = O.channels;
  const Chunks chunks(X.batch, height, width, chunk_target(C + K));
  const int64_t cap = chunks.max_tiles();
  float* v = scratch<float>(Scratch::kWinogradV, 16 * C * cap);
  float* m = scratch<float>(Scratch::kWinogradM, 16 * K * cap);
  for (int64_t i = 0; i < chunks.count; ++i) {
    const int64_t n0 = chunks.n0(i), bt = chunks.block_tiles(i), T = chunks.tiles(i);
    const std::vector<Run>& runs = chunks.runs[chunks.block(i)];
    std::atomic<bool> finite{true};
    at::parallel_for(0, (chunks.n1(i) - n0) * C, 16, [&](int64_t p0, int64_t p1) {
      bool ok = true;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t s = p / C, c = p % C;
        ok &= transform_input(xp + (n0 + s) * X.batch_stride + c * X.channel_stride, chunks.g, runs, c, C, T,
                              v + s * bt);
      }
      if (!ok) finite.store(false, std::memory_order_relaxed);
    });
    if (check_finite && !finite.load()) return false;
    at::parallel_for(0, 16, 1, [&](int64_t xi0, int64_t xi1) {
      for (int64_t xi = xi0; xi < xi1; ++xi) {
        sgemm_avx512(K, T, C, nullptr, C, 1, v + xi * C * T, T, 1, m + xi * K * T, T, false,
                     u_packed + xi * packed_size);
      }
    });
    at::parallel_for(0, (chunks.n1(i) - n0) * K, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t s = p / K, k = p % K;
        transform_output(m + s * bt, chunks.g, runs, k, K, T,
                         op + (n0 + s) * O.batch_stride + k * O.channel_stride);
      }
    });
  }
  return true;
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
  float* u_packed = scratch<float>(Scratch::kWinogradU, 16 * packed_size);
  at::parallel_for(0, 16, 1, [&](int64_t xi0, int64_t xi1) {
    for (int64_t xi = xi0; xi < xi1; ++xi) {
      sgemm_avx512_pack_a(K, C, up + xi * K * C, C, 1, u_packed + xi * packed_size);
    }
  });
  if (g.tiles < kTilesPerBlock) {
    if (!winograd_forward_phased(xp, X, x.size(2), x.size(3), u_packed, packed_size, op, O,
                                 conv_weight.has_value())) {
      out.copy_(at::conv2d(x, *conv_weight, {}, 1, 1));
    }
    return;
  }
  const std::vector<std::vector<Run>> runs_of_block = block_runs(g);
  std::atomic<bool> finite{true};
  at::parallel_for(0, X.batch * g.blocks, 1, [&](int64_t b0, int64_t b1) {
    float* v = scratch<float>(Scratch::kWinogradV, 16 * C * ldv);
    float* m = scratch<float>(Scratch::kWinogradM, 16 * K * max_tiles);
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
        sgemm_avx512(K, tiles, C, up + xi * K * C, C, 1, v + xi * C * ldv, ldv, 1, m + xi * K * tiles, tiles,
                     false, u_packed + xi * packed_size);
      }
      for (int64_t k = 0; k < K; ++k) {
        transform_output(m, g, runs, k, K, tiles,
                         op + n * O.batch_stride + k * O.channel_stride);
      }
    }
  });
  if (conv_weight && !finite.load()) out.copy_(at::conv2d(x, *conv_weight, {}, 1, 1));
}

// U = G g G^T of every filter g of a contiguous (K, C, 3, 3) float32 weight, computed in double
// and rounded once: the (16, K, C) matrices u[xi][k][c] of the 16 tile GEMMs. Sixteen filters at
// a time, their taps gathered, each half of them in eight-lane double vectors. (In float32 the
// sums round twice and cancel: a converted densenet121's input gradient came out 200x less
// accurate.)
__attribute__((target("avx512f"))) inline void transform_filters(const __m512d g[3][3], __m512d u[16]) {
  const __m512d half = _mm512_set1_pd(0.5);
  __m512d t[4][3];  // G g: rows (g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2)
  for (int j = 0; j < 3; ++j) {
    const __m512d outer = _mm512_add_pd(g[0][j], g[2][j]);
    t[0][j] = g[0][j];
    t[1][j] = _mm512_mul_pd(half, _mm512_add_pd(outer, g[1][j]));
    t[2][j] = _mm512_mul_pd(half, _mm512_sub_pd(outer, g[1][j]));
    t[3][j] = g[2][j];
  }
  for (int a = 0; a < 4; ++a) {  // (G g) G^T: the same combinations of t's columns
    const __m512d outer = _mm512_add_pd(t[a][0], t[a][2]);
    u[4 * a] = t[a][0];
    u[4 * a + 1] = _mm512_mul_pd(half, _mm512_add_pd(outer, t[a][1]));
    u[4 * a + 2] = _mm512_mul_pd(half, _mm512_sub_pd(outer, t[a][1]));
    u[4 * a + 3] = t[a][2];
  }
}

__attribute__((target("avx512f"))) void transform_weight(const float* w, int64_t K, int64_t C, int64_t k0,
                                                         int64_t k1, float* u) {
  const __m512i taps_apart = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(9));
  const int64_t plane = K * C;
  for (int64_t k = k0; k < k1; ++k) {
    for (int64_t c = 0; c < C; c += 16) {
      const int64_t lanes = std::min<int64_t>(16, C - c);
      const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
      const float* f = w + (k * C + c) * 9;
      __m512d lo[3][3], hi[3][3];
      for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
          const __m512 taps = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, taps_apart, f + 3 * i + j, 4);
          lo[i][j] = _mm512_cvtps_pd(_mm512_castps512_ps256(taps));
          hi[i][j] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(taps), 1)));
        }
      }
      __m512d ulo[16], uhi[16];
      transform_filters(lo, ulo);
      transform_filters(hi, uhi);
      for (int xi = 0; xi < 16; ++xi) {
        const __m512d both = _mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm512_cvtpd_ps(ulo[xi]))),
                                                _mm256_castps_pd(_mm512_cvtpd_ps(uhi[xi])), 1);
        _mm512_mask_storeu_ps(u + xi * plane + k * C + c, mask, _mm512_castpd_ps(both));
      }
    }
  }
}

at::Tensor winograd_weight_cpu(const at::Tensor& weight) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, "winograd_weight runs float32; got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && weight.is_contiguous(),
                    "winograd_weight needs a contiguous (out_channels, in_channels, 3, 3) weight; got shape ",
                    weight.sizes(), ", strides ", weight.strides());
  TORCH_CHECK(sgemm_avx512_supported(), "winograd_weight needs a CPU with AVX-512");
  const int64_t K = weight.size(0), C = weight.size(1);
  at::Tensor u = at::empty({16, K, C}, weight.options());
  const float* wp = weight.const_data_ptr<float>();
  float* up = u.mutable_data_ptr<float>();
  at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t k0, int64_t k1) {
    transform_weight(wp, K, C, k0, k1, up);
  });
  return u;
}

// dg = G^T dU G (G = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]) for the filters
// [p0, p1) of the (out * in) ones: dU[xi] at du[xi * plane + p], dg at w[9 p], in double, as
// dU G and then G^T (dU G). Compiled for AVX-512 and for any x86-64, picked at load time.
__attribute__((target_clones("avx512f", "default"))) void inverse_transform_weight(const float* du, int64_t plane,
                                                                                   int64_t p0, int64_t p1, float* w) {
  for (int64_t p = p0; p < p1; ++p) {
    double t[4][3];  // dU G
    for (int i = 0; i < 4; ++i) {
      const double u1 = du[(4 * i + 1) * plane + p], u2 = du[(4 * i + 2) * plane + p];
      const double half_sum = 0.5 * (u1 + u2);
      t[i][0] = du[4 * i * plane + p] + half_sum;
      t[i][1] = 0.5 * (u1 - u2);
      t[i][2] = half_sum + du[(4 * i + 3) * plane + p];
    }
    for (int q = 0; q < 3; ++q) {
      const double half_sum = 0.5 * (t[1][q] + t[2][q]);
      w[9 * p + q] = static_cast<float>(t[0][q] + half_sum);
      w[9 * p + 3 + q] = static_cast<float>(0.5 * (t[1][q] - t[2][q]));
      w[9 * p + 6 + q] = static_cast<float>(half_sum + t[3][q]);
    }
  }
}

// dU of the weight gradient into grad_u (16 K C floats) for small maps (a sample has at most
// one GEMM panel of tiles): per chunk of samples, three parallel phases: the transforms of x's
// and grad_y's planes, then dU[xi] += dM[xi] (K x tiles) @ V[xi]^T (tiles x C), parallel over xi.
// Per-thread partial dU's (`weight_grad_by_blocks`) cost more than the GEMMs there. Returns
// false where x or grad_y holds an inf or a NaN.
bool weight_grad_phased(const at::Tensor& x, const PlaneLayout& X, const at::Tensor& grad_y, const PlaneLayout& GY,
                        float* grad_u) {
  const int64_t C = X.channels, K = GY.channels;
  const Chunks chunks(X.batch, x.size(2), x.size(3), chunk_target(C + K));
  const float* xp = x.const_data_ptr<float>();
  const float* gp = grad_y.const_data_ptr<float>();
  const int64_t cap = chunks.max_tiles();
  float* v = scratch<float>(Scratch::kWinogradV, 16 * C * cap);
  float* dm = scratch<float>(Scratch::kWinogradM, 16 * K * cap);
  for (int64_t i = 0; i < chunks.count; ++i) {
    const int64_t n0 = chunks.n0(i), samples = chunks.n1(i) - n0, bt = chunks.block_tiles(i), T = chunks.tiles(i);
    const std::vector<Run>& runs = chunks.runs[chunks.block(i)];
    std::atomic<bool> finite{true};
    at::parallel_for(0, samples * (C + K), 16, [&](int64_t p0, int64_t p1) {
      bool ok = true;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t s = p / (C + K), c = p % (C + K);
        if (c < C) {
          ok &= transform_input(xp + (n0 + s) * X.batch_stride + c * X.channel_stride, chunks.g, runs, c, C, T,
                                v + s * bt);
        } else {
          ok &= transform_grad(gp + (n0 + s) * GY.batch_stride + (c - C) * GY.channel_stride, chunks.g, runs, c - C,
                               K, T, dm + s * bt);
        }
      }
      if (!ok) finite.store(false, std::memory_order_relaxed);
    });
    if (!finite.load()) return false;
    at::parallel_for(0, 16, 1, [&](int64_t xi0, int64_t xi1) {
      for (int64_t xi = xi0; xi < xi1; ++xi) {
        sgemm_avx512(K, C, T, dm + xi * K * T, T, 1, v + xi * C * T, 1, T, grad_u + xi * K * C, C, i > 0);
      }
    });
  }
  return true;
}

// dU of the weight gradient into grad_u (16 K C floats) for larger maps: each thread takes blocks
// of whole tile rows, transforms them into scratch that stays in its L2 cache and accumulates
// its own partial dU, merged at the end. Whole tile rows: here the tiles are the GEMMs'
// reduction, whose length matters less than the two transforms' work on rows that a block
// would only partly cover (measured 15-25% slower with the forward's blocks of 64 on 52- to
// 160-wide maps). Returns false where x or grad_y holds an inf or a NaN.
bool weight_grad_by_blocks(const at::Tensor& x, const PlaneLayout& X, const at::Tensor& grad_y,
                           const PlaneLayout& GY, float* grad_u) {
  const int64_t C = X.channels, K = GY.channels;
  const int64_t tile_cols = (x.size(3) + 1) / 2;
  const Geometry g = geometry_of(x.size(2), x.size(3), std::max<int64_t>(1, kTilesPerBlock / tile_cols) * tile_cols);
  const float* xp = x.const_data_ptr<float>();
  const float* gp = grad_y.const_data_ptr<float>();
  const int64_t max_tiles = g.block_tiles, ldv = std::max(max_tiles, kTilesPerBlock);
  std::fill(grad_u, grad_u + 16 * K * C, 0.0f);
  std::mutex merge;
  const std::vector<std::vector<Run>> runs_of_block = block_runs(g);
  std::atomic<bool> finite{true};
  at::parallel_for(0, X.batch * g.blocks, 1, [&](int64_t b0, int64_t b1) {
    float* v = scratch<float>(Scratch::kWinogradV, 16 * C * ldv);
    float* dm = scratch<float>(Scratch::kWinogradM, 16 * K * max_tiles);
    float* partial = scratch<float>(Scratch::kPartials, 16 * K * C);
    std::fill(partial, partial + 16 * K * C, 0.0f);
    for (int64_t b = b0; b < b1; ++b) {
      if (!finite.load(std::memory_order_relaxed)) return;
      const int64_t n = b / g.blocks, t0 = (b % g.blocks) * g.block_tiles;
      const int64_t t1 = std::min(g.tiles, t0 + g.block_tiles), tiles = t1 - t0;
      const std::vector<Run>& runs = runs_of_block[b % g.blocks];
      bool block_finite = true;
      for (int64_t c = 0; c < C; ++c) {
        block_finite &= transform_input(xp + n * X.batch_stride + c * X.channel_stride, g, runs, c, C, ldv, v);
      }
      for (int64_t k = 0; k < K; ++k) {
        block_finite &= transform_grad(gp + n * GY.batch_stride + k * GY.channel_stride, g, runs, k, K, tiles, dm);
      }
      if (!block_finite) {
        finite.store(false, std::memory_order_relaxed);
        return;
      }
      for (int64_t xi = 0; xi < 16; ++xi) {  // dU[xi] += dM[xi] (K x tiles) @ V[xi]^T (tiles x C)
        sgemm_avx512(K, C, tiles, dm + xi * K * tiles, tiles, 1, v + xi * C * ldv, 1, ldv, partial + xi * K * C, C,
                     true);
      }
    }
    const std::lock_guard<std::mutex> lock(merge);
    for (int64_t i = 0; i < 16 * K * C; ++i) grad_u[i] += partial[i];
  });
  return finite.load();
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
  if (K == 0 || C == 0 || X.batch == 0 || X.plane == 0) return at::zeros({K, C, 3, 3}, x.options());
  at::Tensor grad_weight = at::empty({K, C, 3, 3}, x.options());
  float* grad_u = scratch<float>(Scratch::kWinogradGradU, 16 * K * C);
  const bool finite = tiles_per_sample(x.size(2), x.size(3)) <= kTilesPerBlock
                          ? weight_grad_phased(x, X, grad_y, GY, grad_u)
                          : weight_grad_by_blocks(x, X, grad_y, GY, grad_u);
  if (!finite) {
    return std::get<1>(at::convolution_backward(grad_y, x, at::empty({K, C, 3, 3}, x.options()), std::nullopt,
                                                {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1, {false, true, false}));
  }
  float* wp = grad_weight.mutable_data_ptr<float>();
  at::parallel_for(0, K * C, 1024, [&](int64_t p0, int64_t p1) {
    inverse_transform_weight(grad_u, K * C, p0, p1, wp);
  });
  return grad_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CPU, m) {
  m.impl("conv3x3_winograd_out", &conv3x3_winograd_out_cpu);
  m.impl("conv3x3_winograd_weight_grad", &conv3x3_winograd_weight_grad_cpu);
  m.impl("winograd_weight", &winograd_weight_cpu);
}

}  // namespace csp_kernels
