// The CPU 1x1 convolutions' tiling, shared by cpu/conv1x1.cpp (the fused forward and the
// transition backward) and cpu/dense.cpp (the dense layer's conv1 backward): column tiles of a
// sample whose normalized input, GEMM output and gradients stay in a core's L2 cache, the BLAS /
// AVX-512 GEMM entry points, and the per-row prologue / epilogue / BN-backward helpers.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <climits>
#include <vector>

#include "activation.h"
#include "batch_norm_act.h"
#include "blas.h"
#include "bn_act_rows.h"
#include "moments.h"
#include "plane_layout.h"
#include "scratch.h"
#include "sgemm_avx512.h"

namespace csp_kernels {
namespace {

// Input tile: channels x tile-width scratch values of at most this many bytes (tiles are at
// least 64 pixels wide, the AVX-512 GEMM's panel width, for very wide inputs), so that it and
// the output tile stay in a core's L2 cache between the prologue, the GEMM and the epilogue.
constexpr int64_t kScratchBytes = 256 * 1024;

// A `gemm` operand B shared by every tile (the weight), packed once where `sgemm_avx512` runs:
// op(B)^T is its A, which it would otherwise pack again for each tile (a scalar gather of the
// whole weight per tile). Empty for float64 and for the BLAS.
template <typename scalar_t>
struct SharedB {
  float* packed = nullptr;
  SharedB(const char* op_b, int n, int k, const scalar_t* b, int ldb) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (!sgemm_avx512_preferred()) return;
      const bool b_t = *op_b == 'T';
      packed = scratch<float>(Scratch::kSharedWeight, sgemm_avx512_packed_a_size(n, k));
      sgemm_avx512_pack_a(n, k, b, b_t ? 1 : ldb, b_t ? ldb : 1, packed);
    }
  }
  const float* data() const { return packed; }
};

// Column-major C (m x n) = op(A) op(B) + beta C, op = transpose where asked ("N" or "T").
// beta is 0 or 1. float32 runs `sgemm_avx512` where it is preferred (measured faster than the
// BLAS on this CPU, sgemm_avx512.h), reading B from `shared_b` where given (a `SharedB` of the
// same n, k and B).
inline void gemm(const char* op_a, const char* op_b, int m, int n, int k, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc, const SharedB<float>* shared_b = nullptr) {
  if (sgemm_avx512_preferred()) {
    // Column-major C (m x n) is row-major C^T (n x m) = op(B)^T (n x k) @ op(A)^T (k x m).
    const bool a_t = *op_a == 'T', b_t = *op_b == 'T';
    sgemm_avx512(n, m, k, b, b_t ? 1 : ldb, b_t ? ldb : 1, a, a_t ? 1 : lda, a_t ? lda : 1, c, ldc, beta != 0,
                 shared_b == nullptr ? nullptr : shared_b->data());
    return;
  }
  const float one = 1;
  sgemm_(op_a, op_b, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline void gemm(const char* op_a, const char* op_b, int m, int n, int k, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc, const SharedB<double>* = nullptr) {
  const double one = 1;
  dgemm_(op_a, op_b, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

struct Tile {
  int64_t sample, begin, width;  // pixels [begin, begin + width) of one sample's planes
};

// The column tiles of x's planes: `count` tiles of `width` pixels (the last of each plane
// narrower), sized so that x's channels of scratch fit kScratchBytes.
struct Tiling {
  int64_t width = 1, per_sample = 0, count = 0, plane = 0;

  Tiling(const PlaneLayout& X, int64_t element_size, int64_t scratch_bytes = kScratchBytes, int64_t max_width = 1024)
      : plane(X.plane) {
    const int64_t fit = scratch_bytes / (std::max<int64_t>(X.channels, 1) * element_size) / 16 * 16;
    width = std::max<int64_t>(1, std::min(X.plane, std::clamp<int64_t>(fit, 64, max_width)));
    per_sample = (X.plane + width - 1) / width;
    count = X.batch * per_sample;
  }

  Tile operator[](int64_t i) const {
    const int64_t begin = (i % per_sample) * width;
    return {i / per_sample, begin, std::min(width, plane - begin)};
  }
};

// Per-thread partial weight gradients (threads x out x in, zeroed) in scratch, and their sum
// in thread order as a fresh (out, in) tensor.
template <typename scalar_t>
struct WeightGradPartials {
  int64_t out_channels, in_channels;
  int threads;
  int64_t size;
  scalar_t* data;
  WeightGradPartials(int64_t out_channels_, int64_t in_channels_)
      : out_channels(out_channels_), in_channels(in_channels_), threads(at::get_num_threads()),
        size(out_channels * in_channels), data(scratch<scalar_t>(Scratch::kPartials, threads * size)) {
    std::fill(data, data + threads * size, scalar_t(0));
  }
  scalar_t* of_this_thread() const { return data + at::get_thread_num() * size; }
  at::Tensor sum(const at::TensorOptions& options) const {
    at::Tensor total = at::empty({out_channels, in_channels}, options);
    scalar_t* tp = total.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, size, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t sum = data[i];
        for (int t = 1; t < threads; ++t) sum += data[t * size + i];
        tp[i] = sum;
      }
    });
    return total;
  }
};

// f(tile index, tile, scratch of `scratch_size` values) for every tile, in parallel over the
// tiles, each thread with its own scratch and a single-threaded BLAS.
template <typename scalar_t, typename F>
void for_each_tile(const Tiling& tiling, int64_t scratch_size, const F& f) {
  at::parallel_for(0, tiling.count, 1, [&](int64_t t0, int64_t t1) {
    const SingleThreadedBlas blas_in_this_thread;
    scalar_t* tile_scratch = scratch<scalar_t>(Scratch::kTile, scratch_size);  // zeroed, as a fresh vector was
    std::fill(tile_scratch, tile_scratch + scratch_size, scalar_t(0));
    for (int64_t i = t0; i < t1; ++i) f(i, tiling[i], tile_scratch);
  });
}

template <typename scalar_t, Act A>
void scale_shift_act_row(const scalar_t* src, scalar_t* dst, int64_t width, at::opmath_type<scalar_t> a,
                         at::opmath_type<scalar_t> b, at::opmath_type<scalar_t> slope) {
  run_loop<ScaleShiftActRow<scalar_t, A>>(avx512_runs(), src, dst, width, a, b, slope);
}

// scratch[c][i] = in_act(x[c][begin + i] * scale[c] + shift[c]), or a copy without scale.
template <typename scalar_t>
void load_tile(const scalar_t* x, const PlaneLayout& X, const Tile& t, const stat_of<scalar_t>* scale,
               const stat_of<scalar_t>* shift, const ActSpec& in_act, scalar_t* scratch) {
  const scalar_t* base = x + t.sample * X.batch_stride + t.begin;
  for (int64_t c = 0; c < X.channels; ++c) {
    const scalar_t* src = base + c * X.channel_stride;
    scalar_t* dst = scratch + c * t.width;
    if (scale == nullptr) {
      std::copy(src, src + t.width, dst);
    } else {
      CSP_DISPATCH_ACT(in_act, [&] {
        scale_shift_act_row<scalar_t, kAct>(src, dst, t.width, scale[c], shift[c], scalar_t(in_act.slope));
      });
    }
  }
}

// out[o][i] = act(out[o][i] + bias[o]) in place; with `moments`, each channel's moments over
// the cache-resident tile row.
template <typename scalar_t>
void finish_tile(scalar_t* out, const PlaneLayout& O, const Tile& t, const stat_of<scalar_t>* bias, const ActSpec& act,
                 Moments* moments) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* base = out + t.sample * O.batch_stride + t.begin;
  for (int64_t o = 0; o < O.channels; ++o) {
    scalar_t* row = base + o * O.channel_stride;
    if (bias != nullptr || act.kind != Act::Identity) {
      const acc_t b = bias == nullptr ? acc_t(0) : acc_t(bias[o]);
      CSP_DISPATCH_ACT(act, [&] { scale_shift_act_row<scalar_t, kAct>(row, row, t.width, acc_t(1), b, acc_t(act.slope)); });
    }
    if (moments != nullptr) moments[o] = moments_of(row, t.width);
  }
}

inline void check_blas_int(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v <= INT_MAX, "conv1x1_fused: ", what, " = ", v, " exceeds the BLAS integer range");
}

// z = conv1x1(x, weight) in the backward ops: z shaped like x but for its channels, weight the
// contiguous (z's channels, x's channels) matrix.
inline void check_conv_output_and_weight(const at::Tensor& z, const PlaneLayout& Z, const at::Tensor& x, const PlaneLayout& X,
                                  const at::Tensor& weight) {
  TORCH_CHECK_VALUE(z.size(0) == X.batch && z.size(2) == x.size(2) && z.size(3) == x.size(3),
                    "z must be (", X.batch, ", out_channels, ", x.size(2), ", ", x.size(3), "); got ", z.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == Z.channels && weight.size(1) == X.channels &&
                        weight.is_contiguous(),
                    "weight must be a contiguous (", Z.channels, ", ", X.channels, ") matrix; got shape ",
                    weight.sizes());
}

// grad_z[o][i] of a BN + act backward, for one cache-resident row (the apply pass of
// bn_act_backward, given the reduction's per-channel sums).
template <typename scalar_t, Act A>
void bn_act_grad_row(const scalar_t* grad_y, const scalar_t* z, scalar_t* grad_z, int64_t width,
                     at::opmath_type<scalar_t> mean, at::opmath_type<scalar_t> invstd, at::opmath_type<scalar_t> w,
                     at::opmath_type<scalar_t> b, at::opmath_type<scalar_t> mean_dpre,
                     at::opmath_type<scalar_t> mean_dpre_xhat, at::opmath_type<scalar_t> slope) {
  run_loop<BnActGradRow<scalar_t, A>>(avx512_runs(), z, grad_y, grad_z, width, mean, invstd, w, b, slope, mean_dpre,
                                      mean_dpre_xhat);
}

// A BN + act backward's per-channel inputs, after its reduction pass.
template <typename stat_t>
struct BnBackward {
  const stat_t *mean, *invstd, *weight, *bias, *sum_dpre, *sum_dpre_xhat;
};

template <typename stat_t>
BnBackward<stat_t> bn_backward_of(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& sum_dpre, const at::Tensor& sum_dpre_xhat) {
  return {mean.const_data_ptr<stat_t>(),   invstd.const_data_ptr<stat_t>(),   weight.const_data_ptr<stat_t>(),
          bias.const_data_ptr<stat_t>(),   sum_dpre.const_data_ptr<stat_t>(), sum_dpre_xhat.const_data_ptr<stat_t>()};
}

// grad_z (Z's channels x t.width, in cache) of tile t: the BN + act backward of grad_y, given
// z, the BN's parameters and its reduction over `count` values per channel.
template <typename scalar_t>
void bn_act_grad_tile(const scalar_t* grad_y, const PlaneLayout& G, const scalar_t* z, const PlaneLayout& Z,
                      const Tile& t, const BnBackward<stat_of<scalar_t>>& bn, int64_t count, const ActSpec& act,
                      scalar_t* grad_z) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count);
  for (int64_t o = 0; o < Z.channels; ++o) {
    const scalar_t* zp = z + t.sample * Z.batch_stride + o * Z.channel_stride + t.begin;
    const scalar_t* gp = grad_y + t.sample * G.batch_stride + o * G.channel_stride + t.begin;
    CSP_DISPATCH_ACT(act, [&] {
      bn_act_grad_row<scalar_t, kAct>(gp, zp, grad_z + o * t.width, t.width, bn.mean[o], bn.invstd[o], bn.weight[o],
                                      bn.bias[o], bn.sum_dpre[o] * inv_count, bn.sum_dpre_xhat[o] * inv_count,
                                      acc_t(act.slope));
    });
  }
}

}  // namespace
}  // namespace csp_kernels
