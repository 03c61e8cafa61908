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

#include "conv1x1_tiles.h"

namespace csp_kernels {
namespace {

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
    const SharedB<scalar_t> shared_w("N", static_cast<int>(O.channels), static_cast<int>(X.channels), wp, ldb);
    for_each_tile<scalar_t>(tiling, X.channels * width, [&](int64_t i, const Tile& t, scalar_t* scratch) {
      load_tile(xp, X, t, scale, shift, in_act, scratch);
      // Row-major out_tile (O x w) = W (O x C) @ scratch (C x w), i.e. column-major
      // out_tile^T (w x O) = scratch^T (w x C) @ W^T (C x O).
      gemm("N", "N", static_cast<int>(t.width), static_cast<int>(O.channels), static_cast<int>(X.channels), scratch,
           static_cast<int>(t.width), wp, ldb, scalar_t(0), op + t.sample * O.batch_stride + t.begin, ldc, &shared_w);
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
  at::Tensor grad_weight = at::empty({0, X.channels}, x.options());  // replaced where asked for
  if (X.batch == 0 || X.plane == 0 || Z.channels == 0 || X.channels == 0) {
    if (input_grad) grad_x.zero_();
    return {grad_x, weight_grad ? at::zeros({Z.channels, X.channels}, x.options()) : grad_weight};
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
    const WeightGradPartials<scalar_t> partials(weight_grad ? Z.channels : 0, X.channels);
    const auto bn = bn_backward_of<stat_of<scalar_t>>(mean, invstd, bn_weight, bn_bias, sum_dpre, sum_dpre_xhat);
    const int O = static_cast<int>(Z.channels), C = static_cast<int>(X.channels);
    const SharedB<scalar_t> shared_w("T", C, O, wp, C);
    for_each_tile<scalar_t>(tiling, Z.channels * width, [&](int64_t, const Tile& t, scalar_t* grad_z) {
      const int w = static_cast<int>(t.width);
      bn_act_grad_tile(gyp, G, zp, Z, t, bn, X.batch * X.plane, act, grad_z);
      const scalar_t* x_tile = xp + t.sample * X.batch_stride + t.begin;
      if (input_grad) {
        // Row-major grad_x tile (C x w) = W^T (C x O) @ grad_z (O x w): column-major
        // grad_x^T (w x C) = grad_z^T (w x O) @ W (O x C; row-major W is its column-major
        // transpose, hence "T").
        gemm("N", "T", w, C, O, grad_z, w, wp, C, scalar_t(0), gxp + t.sample * GX.batch_stride + t.begin,
             static_cast<int>(C == 1 ? std::max(GX.channel_stride, width) : GX.channel_stride), &shared_w);
      }
      if (weight_grad) {
        // Row-major partial (O x C) += grad_z (O x w) @ x_tile^T (w x C): column-major
        // partial^T (C x O) += x_tile (C x w; its rows are x's planes, hence "T") @ grad_z^T.
        gemm("T", "N", C, O, w, x_tile, static_cast<int>(C == 1 ? std::max(X.channel_stride, width) : X.channel_stride),
             grad_z, w, scalar_t(1), partials.of_this_thread(), C);
      }
    });
    if (weight_grad) grad_weight = partials.sum(x.options());
  });
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CPU, m) {
  m.impl("conv1x1_bn_act_backward", &conv1x1_bn_act_backward_cpu);
  m.impl("conv1x1_fused_out", &conv1x1_fused_out_cpu);
}

}  // namespace csp_kernels
