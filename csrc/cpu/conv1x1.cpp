// The CPU 1x1 convolution with its prologue and epilogue fused: a GEMM over column tiles of
// each sample, where every tile's input is normalized into a cache-resident scratch (BN + act
// on load), multiplied by the weight with BLAS, and finished in cache (bias + act, per-channel
// statistics). Memory sees x read once and out written once; the normalized input and the
// pre-epilogue output never travel to DRAM. Because an output tile depends only on the same
// pixels of its input, and each tile stages its input before writing, `out` may overwrite `x`
// in place when sample n's output covers only sample n's input memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <tuple>
#include <vector>

#include "activation.h"
#include "batch_norm_act.h"
#include "blas.h"
#include "moments.h"
#include "plane_layout.h"
#include "sgemm_avx512.h"

namespace csp_kernels {
namespace {

// Input tile: channels x tile-width scratch values of at most this many bytes (tiles are at
// least 64 pixels wide, the AVX-512 GEMM's panel width, for very wide inputs), so that it and
// the output tile stay in a core's L2 cache between the prologue, the GEMM and the epilogue.
constexpr int64_t kScratchBytes = 256 * 1024;

// Column-major C (m x n) = op(A) op(B) + beta C, op = transpose where asked ("N" or "T").
// beta is 0 or 1. float32 runs `sgemm_avx512` where it is preferred (measured faster than the
// BLAS on this CPU, sgemm_avx512.h).
inline void gemm(const char* op_a, const char* op_b, int m, int n, int k, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  if (sgemm_avx512_preferred()) {
    // Column-major C (m x n) is row-major C^T (n x m) = op(B)^T (n x k) @ op(A)^T (k x m).
    const bool a_t = *op_a == 'T', b_t = *op_b == 'T';
    sgemm_avx512(n, m, k, b, b_t ? 1 : ldb, b_t ? ldb : 1, a, a_t ? 1 : lda, a_t ? lda : 1, c, ldc, beta != 0);
    return;
  }
  const float one = 1;
  sgemm_(op_a, op_b, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline void gemm(const char* op_a, const char* op_b, int m, int n, int k, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
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

// f(tile index, tile, scratch of `scratch_size` values) for every tile, in parallel over the
// tiles, each thread with its own scratch and a single-threaded BLAS.
template <typename scalar_t, typename F>
void for_each_tile(const Tiling& tiling, int64_t scratch_size, const F& f) {
  at::parallel_for(0, tiling.count, 1, [&](int64_t t0, int64_t t1) {
    const SingleThreadedBlas blas_in_this_thread;
    std::vector<scalar_t> scratch(scratch_size);
    for (int64_t i = t0; i < t1; ++i) f(i, tiling[i], scratch.data());
  });
}

template <typename scalar_t, Act A>
void scale_shift_act_row(const scalar_t* src, scalar_t* dst, int64_t width, at::opmath_type<scalar_t> a,
                         at::opmath_type<scalar_t> b, at::opmath_type<scalar_t> slope) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) dst[i] = static_cast<scalar_t>(act_forward<A>(src[i] * a + b, slope));
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

void check_blas_int(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v <= INT_MAX, "conv1x1_fused: ", what, " = ", v, " exceeds the BLAS integer range");
}

std::tuple<at::Tensor, at::Tensor> conv1x1_fused_out_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, c10::string_view in_act_name, const std::optional<at::Tensor>& bias,
    c10::string_view act_name, bool stats, const at::Tensor& out) {
  const PlaneLayout X = plane_layout(x, "x"), O = plane_layout(out, "out");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "conv1x1_fused runs float32 and float64 on the CPU; got ", x.scalar_type());
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
                   "weight and out must have x's dtype ", x.scalar_type(), "; got ", weight.scalar_type(), " and ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == X.channels && weight.is_contiguous(),
                    "weight must be a contiguous (out_channels, ", X.channels, ") matrix; got shape ", weight.sizes());
  TORCH_CHECK_VALUE(out.size(0) == X.batch && out.size(1) == weight.size(0) && out.size(2) == x.size(2) &&
                        out.size(3) == x.size(3),
                    "out must have shape (", X.batch, ", ", weight.size(0), ", ", x.size(2), ", ", x.size(3),
                    "); got ", out.sizes());
  TORCH_CHECK_VALUE(in_scale.has_value() == in_shift.has_value(), "in_scale and in_shift come together");
  if (in_scale) check_per_channel_args(x, {{*in_scale, "in_scale"}, {*in_shift, "in_shift"}});
  if (bias) check_per_channel_args(out, {{*bias, "bias"}});
  const ActSpec in_act = parse_act(std::string(in_act_name)), act = parse_act(std::string(act_name));
  TORCH_CHECK_VALUE(in_scale || in_act.kind == Act::Identity, "in_act needs in_scale and in_shift");
  check_blas_int(X.channels, "in_channels");
  check_blas_int(O.channels, "out_channels");
  check_blas_int(O.channel_stride, "out's channel stride");
  const at::ScalarType sdtype = stats_dtype(x.scalar_type());
  if (O.channels == 0) return {at::empty({0}, x.options().dtype(sdtype)), at::empty({0}, x.options().dtype(sdtype))};

  const Tiling tiling(X, x.element_size());
  const int64_t tiles = tiling.count, width = tiling.width;
  at::Tensor mean = at::empty({stats ? O.channels : 0}, x.options().dtype(sdtype));
  at::Tensor var = at::empty({stats ? O.channels : 0}, x.options().dtype(sdtype));
  std::vector<Moments> moments(stats ? tiles * O.channels : 0);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1x1_fused_out_cpu", [&] {
    using stat_t = stat_of<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const stat_t* scale = in_scale ? in_scale->const_data_ptr<stat_t>() : nullptr;
    const stat_t* shift = in_shift ? in_shift->const_data_ptr<stat_t>() : nullptr;
    const stat_t* bp = bias ? bias->const_data_ptr<stat_t>() : nullptr;
    // BLAS wants ldc >= m and ldb >= max(1, k) even where a size-1 or size-0 dim never uses them.
    const int ldc = static_cast<int>(O.channels == 1 ? std::max(O.channel_stride, width) : O.channel_stride);
    const int ldb = static_cast<int>(std::max<int64_t>(X.channels, 1));
    for_each_tile<scalar_t>(tiling, X.channels * width, [&](int64_t i, const Tile& t, scalar_t* scratch) {
      load_tile(xp, X, t, scale, shift, in_act, scratch);
      // Row-major out_tile (O x w) = W (O x C) @ scratch (C x w), i.e. column-major
      // out_tile^T (w x O) = scratch^T (w x C) @ W^T (C x O).
      gemm("N", "N", static_cast<int>(t.width), static_cast<int>(O.channels), static_cast<int>(X.channels), scratch,
           static_cast<int>(t.width), wp, ldb, scalar_t(0), op + t.sample * O.batch_stride + t.begin, ldc);
      finish_tile(op, O, t, bp, act, stats ? moments.data() + i * O.channels : nullptr);
    });
    if (!stats) return;
    // The tiles' moments merged in tile order: deterministic.
    stat_t* mean_p = mean.mutable_data_ptr<stat_t>();
    stat_t* var_p = var.mutable_data_ptr<stat_t>();
    at::parallel_for(0, O.channels, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        Moments total;
        for (int64_t i = 0; i < tiles; ++i) total.add(moments[i * O.channels + o]);
        mean_p[o] = static_cast<stat_t>(total.mean);
        var_p[o] = static_cast<stat_t>(total.biased_variance());
      }
    });
  });
  return {mean, var};
}

// Epilogue of the dense layer's conv1 input gradient, over one cache-resident row of grad_a:
// dpre = grad_a * act'(weight * xhat + bias), grad_acc += weight * dpre, and the row's sums of
// dpre and dpre * xhat (the BN1 bias and weight gradients).
template <typename scalar_t, Act A>
void accumulate_row(const scalar_t* grad_a, const scalar_t* x, scalar_t* grad_acc, int64_t width,
                    at::opmath_type<scalar_t> mean, at::opmath_type<scalar_t> invstd, at::opmath_type<scalar_t> w,
                    at::opmath_type<scalar_t> b, at::opmath_type<scalar_t> slope, double* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  double s = 0, sx = 0;  // in double: the weight gradient's sum can cancel
#pragma omp simd reduction(+ : s, sx)
  for (int64_t i = 0; i < width; ++i) {
    const acc_t xhat = (static_cast<acc_t>(x[i]) - mean) * invstd;
    const acc_t dpre = bn_act_grad_pre<A>(static_cast<acc_t>(grad_a[i]), xhat, w, b, slope);
    grad_acc[i] = static_cast<scalar_t>(static_cast<acc_t>(grad_acc[i]) + w * dpre);
    s += dpre;
    sx += static_cast<double>(dpre) * xhat;
  }
  sums[0] = s;
  sums[1] = sx;
}

// z = conv1x1(x, weight) in the backward ops: z shaped like x but for its channels, weight the
// contiguous (z's channels, x's channels) matrix.
void check_conv_output_and_weight(const at::Tensor& z, const PlaneLayout& Z, const at::Tensor& x, const PlaneLayout& X,
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
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const acc_t xhat = (static_cast<acc_t>(z[i]) - mean) * invstd;
    const acc_t dpre = bn_act_grad_pre<A>(static_cast<acc_t>(grad_y[i]), xhat, w, b, slope);
    grad_z[i] = static_cast<scalar_t>(bn_grad_input(dpre, xhat, w, invstd, mean_dpre, mean_dpre_xhat));
  }
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

// The backward of out = act(BN(conv1x1(x, weight))) after the BN reduction: per tile, grad_z is
// computed into cache from grad_y and z, then both GEMMs read it there (the input gradient,
// written out, and the weight gradient, accumulated into a per-thread (O, C) partial whose
// per-tile re-read long tiles amortize; the partials are summed in thread order).
std::tuple<at::Tensor, at::Tensor> conv1x1_bn_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& sum_dpre,
    const at::Tensor& sum_dpre_xhat, c10::string_view act_name, const at::Tensor& x, const at::Tensor& weight,
    bool input_grad, bool weight_grad) {
  PlaneLayout Z, G;
  std::tie(Z, G) = paired_layouts(z, "z", grad_y, "grad_y");
  const PlaneLayout X = plane_layout(x, "x");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "conv1x1_bn_act_backward runs float32 and float64 on the CPU; got ", x.scalar_type());
  TORCH_CHECK_TYPE(z.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
                   "z and weight must have x's dtype ", x.scalar_type(), "; got ", z.scalar_type(), " and ",
                   weight.scalar_type());
  check_conv_output_and_weight(z, Z, x, X, weight);
  check_per_channel_args(z, {{mean, "mean"}, {invstd, "invstd"}, {bn_weight, "weight"}, {bn_bias, "bias"},
                             {sum_dpre, "sum_dpre"}, {sum_dpre_xhat, "sum_dpre_xhat"}});
  const ActSpec act = parse_act(std::string(act_name));
  check_blas_int(X.channels, "in_channels");
  check_blas_int(Z.channels, "out_channels");
  check_blas_int(X.channel_stride, "x's channel stride");

  at::Tensor grad_x = input_grad ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const int threads = at::get_num_threads();
  at::Tensor partials = at::zeros({weight_grad ? threads : 0, Z.channels, X.channels}, x.options());
  if (X.batch == 0 || X.plane == 0 || Z.channels == 0 || X.channels == 0) {
    if (input_grad) grad_x.zero_();
    return {grad_x, weight_grad ? at::zeros({Z.channels, X.channels}, x.options()) : partials};
  }
  const PlaneLayout GX = input_grad ? plane_layout(grad_x, "grad_x") : PlaneLayout{};
  // Long tiles, for the weight gradient's per-tile accumulation.
  const Tiling tiling(Z, x.element_size(), 4 * kScratchBytes, 4096);
  const int64_t width = tiling.width;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1x1_bn_act_backward_cpu", [&] {
    const scalar_t* gyp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* gxp = input_grad ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pp = weight_grad ? partials.mutable_data_ptr<scalar_t>() : nullptr;
    const auto bn = bn_backward_of<stat_of<scalar_t>>(mean, invstd, bn_weight, bn_bias, sum_dpre, sum_dpre_xhat);
    const int O = static_cast<int>(Z.channels), C = static_cast<int>(X.channels);
    for_each_tile<scalar_t>(tiling, Z.channels * width, [&](int64_t, const Tile& t, scalar_t* grad_z) {
      const int w = static_cast<int>(t.width);
      bn_act_grad_tile(gyp, G, zp, Z, t, bn, X.batch * X.plane, act, grad_z);
      const scalar_t* x_tile = xp + t.sample * X.batch_stride + t.begin;
      if (input_grad) {
        // Row-major grad_x tile (C x w) = W^T (C x O) @ grad_z (O x w): column-major
        // grad_x^T (w x C) = grad_z^T (w x O) @ W (O x C; row-major W is its column-major
        // transpose, hence "T").
        gemm("N", "T", w, C, O, grad_z, w, wp, C, scalar_t(0), gxp + t.sample * GX.batch_stride + t.begin,
             static_cast<int>(C == 1 ? std::max(GX.channel_stride, width) : GX.channel_stride));
      }
      if (weight_grad) {
        // Row-major partial (O x C) += grad_z (O x w) @ x_tile^T (w x C): column-major
        // partial^T (C x O) += x_tile (C x w; its rows are x's planes, hence "T") @ grad_z^T.
        gemm("T", "N", C, O, w, x_tile, static_cast<int>(C == 1 ? std::max(X.channel_stride, width) : X.channel_stride),
             grad_z, w, scalar_t(1), pp + at::get_thread_num() * Z.channels * X.channels, C);
      }
    });
  });
  return {grad_x, weight_grad ? partials.sum(0) : partials};
}

// The dense layer's whole conv1 backward, one tile at a time in cache: grad_z = BN2 + ReLU
// backward of grad_b (given BN2's reduction), the weight gradient against the BN1 + ReLU of the
// prefix x (normalized on load), and conv1's input gradient fed into the BN1 backward
// accumulation. Only grad_acc and the (O, C) weight gradient are written.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_conv1_backward_cpu(
    const at::Tensor& grad_b, const at::Tensor& z, const at::Tensor& mean2, const at::Tensor& invstd2,
    const at::Tensor& weight2, const at::Tensor& bias2, const at::Tensor& sum_dpre2, const at::Tensor& sum_dpre_xhat2,
    const at::Tensor& x, const at::Tensor& mean1, const at::Tensor& invstd1, const at::Tensor& weight1,
    const at::Tensor& bias1, c10::string_view act_name, const at::Tensor& weight, const at::Tensor& grad_acc) {
  PlaneLayout Z, G;
  std::tie(Z, G) = paired_layouts(z, "z", grad_b, "grad_b");
  const PlaneLayout X = plane_layout(x, "x"), ACC = plane_layout(grad_acc, "grad_acc");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "dense_conv1_backward runs float32 and float64 on the CPU; got ", x.scalar_type());
  TORCH_CHECK_TYPE(z.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type() &&
                       grad_acc.scalar_type() == x.scalar_type(),
                   "z, weight and grad_acc must have x's dtype ", x.scalar_type());
  check_same_shape(x, grad_acc, "x", "grad_acc");
  check_conv_output_and_weight(z, Z, x, X, weight);
  check_per_channel_args(z, {{mean2, "mean2"}, {invstd2, "invstd2"}, {weight2, "weight2"}, {bias2, "bias2"},
                             {sum_dpre2, "sum_dpre2"}, {sum_dpre_xhat2, "sum_dpre_xhat2"}});
  check_per_channel_args(x, {{mean1, "mean1"}, {invstd1, "invstd1"}, {weight1, "weight1"}, {bias1, "bias1"}});
  const ActSpec act = parse_act(std::string(act_name));
  check_blas_int(X.channels, "in_channels");
  check_blas_int(Z.channels, "out_channels");

  const at::ScalarType sdtype = stats_dtype(x.scalar_type());
  at::Tensor sum_dpre1 = at::zeros({X.channels}, x.options().dtype(sdtype));
  at::Tensor sum_dpre_xhat1 = at::zeros({X.channels}, x.options().dtype(sdtype));
  const int threads = at::get_num_threads();
  at::Tensor partials = at::zeros({threads, Z.channels, X.channels}, x.options());
  if (X.batch == 0 || X.plane == 0 || Z.channels == 0 || X.channels == 0) {
    return {partials.sum(0), sum_dpre1, sum_dpre_xhat1};
  }
  // Scratch: grad_z (O rows) then the normalized input, reused as its gradient (C rows); long
  // tiles for the weight gradient's per-tile accumulation.
  const PlaneLayout both{X.batch, X.channels + Z.channels, X.plane, 0, 0};
  const Tiling tiling(both, x.element_size(), 4 * kScratchBytes, 4096);
  const int64_t width = tiling.width;
  std::vector<double> sums(tiling.count * X.channels * 2);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dense_conv1_backward_cpu", [&] {
    using stat_t = stat_of<scalar_t>;
    const scalar_t* gbp = grad_b.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* accp = grad_acc.mutable_data_ptr<scalar_t>();
    scalar_t* pp = partials.mutable_data_ptr<scalar_t>();
    const auto bn2 = bn_backward_of<stat_t>(mean2, invstd2, weight2, bias2, sum_dpre2, sum_dpre_xhat2);
    const stat_t *m1 = mean1.const_data_ptr<stat_t>(), *i1 = invstd1.const_data_ptr<stat_t>();
    const stat_t *w1 = weight1.const_data_ptr<stat_t>(), *b1 = bias1.const_data_ptr<stat_t>();
    // BN1 + act as the per-channel (scale, shift) that load_tile applies.
    std::vector<stat_t> scale1(X.channels), shift1(X.channels);
    for (int64_t c = 0; c < X.channels; ++c) {
      scale1[c] = w1[c] * i1[c];
      shift1[c] = b1[c] - m1[c] * scale1[c];
    }
    const int O = static_cast<int>(Z.channels), C = static_cast<int>(X.channels);
    for_each_tile<scalar_t>(tiling, (Z.channels + X.channels) * width, [&](int64_t i, const Tile& t,
                                                                           scalar_t* scratch) {
      const int w = static_cast<int>(t.width);
      scalar_t* grad_z = scratch;
      scalar_t* a = scratch + Z.channels * t.width;
      bn_act_grad_tile(gbp, G, zp, Z, t, bn2, X.batch * X.plane, act, grad_z);
      load_tile(xp, X, t, scale1.data(), shift1.data(), act, a);
      // Weight gradient: row-major partial (O x C) += grad_z (O x w) @ a^T (w x C).
      gemm("T", "N", C, O, w, a, w, grad_z, w, scalar_t(1), pp + at::get_thread_num() * Z.channels * X.channels, C);
      // Input gradient into `a`'s scratch: row-major grad_a (C x w) = W^T (C x O) @ grad_z.
      gemm("N", "T", w, C, O, grad_z, w, wp, C, scalar_t(0), a, w);
      for (int64_t c = 0; c < X.channels; ++c) {
        const int64_t at_x = t.sample * X.batch_stride + c * X.channel_stride + t.begin;
        const int64_t at_acc = t.sample * ACC.batch_stride + c * ACC.channel_stride + t.begin;
        CSP_DISPATCH_ACT(act, [&] {
          accumulate_row<scalar_t, kAct>(a + c * t.width, xp + at_x, accp + at_acc, t.width, m1[c], i1[c], w1[c],
                                         b1[c], scalar_t(act.slope), sums.data() + (i * X.channels + c) * 2);
        });
      }
    });
    stat_t* s = sum_dpre1.mutable_data_ptr<stat_t>();
    stat_t* sx = sum_dpre_xhat1.mutable_data_ptr<stat_t>();
    for (int64_t c = 0; c < X.channels; ++c) {
      double total = 0, total_xhat = 0;
      for (int64_t k = 0; k < tiling.count; ++k) {  // tile order: deterministic
        total += sums[(k * X.channels + c) * 2];
        total_xhat += sums[(k * X.channels + c) * 2 + 1];
      }
      s[c] = static_cast<stat_t>(total);
      sx[c] = static_cast<stat_t>(total_xhat);
    }
  });
  return {partials.sum(0), sum_dpre1, sum_dpre_xhat1};
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CPU, m) {
  m.impl("dense_conv1_backward", &dense_conv1_backward_cpu);
  m.impl("conv1x1_bn_act_backward", &conv1x1_bn_act_backward_cpu);
  m.impl("conv1x1_fused_out", &conv1x1_fused_out_cpu);
}

}  // namespace csp_kernels
