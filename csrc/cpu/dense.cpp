// CPU kernels of the dense-block backward (csp_kernels.ops.dense): a dense layer's whole conv1
// backward, tile by tile in cache (the tiling of cpu/conv1x1_tiles.h), and the BN correction
// applied once per channel. The layers' accumulating BN1 + act backward is cpu/batch_norm_act.cpp's reduction.
// CUDA twins in cuda/dense.cu; per-element math shared through batch_norm_act.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "batch_norm_act.h"
#include "conv1x1_tiles.h"
#include "dense_args.h"
#include "plane_layout.h"

namespace csp_kernels {
namespace {

// Enough elements per task that at::parallel_for's overhead stays small.
constexpr int64_t kGrainElements = 32768;

// grad_x += invstd * (g - mean(g) - xhat * mean(g * xhat)) per channel, g = grad_acc: the BN
// input gradient with weight 1, since grad_acc already carries every layer's weight. grad_acc of
// grad_t: scalar_t, or float for 16-bit data (check_grad_acc).
template <typename scalar_t, typename grad_t>
void bn_grad_correct_kernel(const grad_t* grad_acc, const PlaneLayout& ACC, const scalar_t* x,
                            const PlaneLayout& L, scalar_t* grad_x, const PlaneLayout& GX,
                            const stat_of<scalar_t>* mean, const stat_of<scalar_t>* invstd,
                            const stat_of<scalar_t>* sum_grad, const stat_of<scalar_t>* sum_grad_xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(L.batch * L.plane);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, L.plane));
  at::parallel_for(0, L.batch * L.channels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / L.channels, c = p % L.channels;
      const scalar_t* xp = x + n * L.batch_stride + c * L.channel_stride;
      const grad_t* gp = grad_acc + n * ACC.batch_stride + c * ACC.channel_stride;
      scalar_t* out = grad_x + n * GX.batch_stride + c * GX.channel_stride;
      const acc_t m = mean[c], inv = invstd[c];
      const acc_t mean_g = sum_grad[c] * inv_count, mean_g_xhat = sum_grad_xhat[c] * inv_count;
#pragma omp simd
      for (int64_t i = 0; i < L.plane; ++i) {
        const acc_t xhat = (static_cast<acc_t>(xp[i]) - m) * inv;
        out[i] = static_cast<scalar_t>(static_cast<acc_t>(out[i]) +
                                       bn_grad_input(static_cast<acc_t>(gp[i]), xhat, acc_t(1), inv, mean_g, mean_g_xhat));
      }
    }
  });
}

void bn_grad_correct_cpu(const at::Tensor& grad_acc, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& invstd, const at::Tensor& sum_grad, const at::Tensor& sum_grad_xhat,
                         const at::Tensor& grad_x) {
  const CorrectLayouts layouts = check_correct_args(grad_acc, x, mean, invstd, sum_grad, sum_grad_xhat, grad_x);
  const PlaneLayout &L = layouts.x, &ACC = layouts.grad_acc, &GX = layouts.grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_grad_correct_cpu", [&] {
    using stat_t = stat_of<scalar_t>;
    with_grad_acc_type<scalar_t>(grad_acc, [&](auto* type) {
      using grad_t = std::remove_pointer_t<decltype(type)>;
      bn_grad_correct_kernel<scalar_t, grad_t>(grad_acc.const_data_ptr<grad_t>(), ACC, x.const_data_ptr<scalar_t>(),
                                               L, grad_x.mutable_data_ptr<scalar_t>(), GX,
                                               mean.const_data_ptr<stat_t>(), invstd.const_data_ptr<stat_t>(),
                                               sum_grad.const_data_ptr<stat_t>(), sum_grad_xhat.const_data_ptr<stat_t>());
    });
  });
}

// Epilogue of the dense layer's conv1 input gradient, over one cache-resident row of grad_a:
// dpre = grad_a * act'(weight * xhat + bias), grad_acc += weight * dpre, and the row's sums of
// dpre and dpre * xhat (the BN1 bias and weight gradients).
template <typename scalar_t, Act A>
void accumulate_row(const scalar_t* grad_a, const scalar_t* x, scalar_t* grad_acc, int64_t width,
                    at::opmath_type<scalar_t> mean, at::opmath_type<scalar_t> invstd, at::opmath_type<scalar_t> w,
                    at::opmath_type<scalar_t> b, at::opmath_type<scalar_t> slope, double* sums) {
  sums[0] = sums[1] = 0;
  run_loop<BnActReduceRow<scalar_t, A, true>>(avx512_runs(), x, grad_a, grad_acc, width, mean, invstd, w, b, slope,
                                              &sums[0], &sums[1]);
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
  if (X.batch == 0 || X.plane == 0 || Z.channels == 0 || X.channels == 0) {
    return {at::zeros({Z.channels, X.channels}, x.options()), sum_dpre1, sum_dpre_xhat1};
  }
  // Scratch: grad_z (O rows) then the normalized input, reused as its gradient (C rows); long
  // tiles for the weight gradient's per-tile accumulation.
  const PlaneLayout both{X.batch, X.channels + Z.channels, X.plane, 0, 0};
  const Tiling tiling(both, x.element_size(), 4 * kScratchBytes, 4096);
  const int64_t width = tiling.width;
  std::vector<double> sums(tiling.count * X.channels * 2);

  at::Tensor grad_weight;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dense_conv1_backward_cpu", [&] {
    using stat_t = stat_of<scalar_t>;
    const scalar_t* gbp = grad_b.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* accp = grad_acc.mutable_data_ptr<scalar_t>();
    const WeightGradPartials<scalar_t> partials(Z.channels, X.channels);
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
    const SharedB<scalar_t> shared_w("T", C, O, wp, C);
    for_each_tile<scalar_t>(tiling, (Z.channels + X.channels) * width, [&](int64_t i, const Tile& t,
                                                                           scalar_t* scratch) {
      const int w = static_cast<int>(t.width);
      scalar_t* grad_z = scratch;
      scalar_t* a = scratch + Z.channels * t.width;
      bn_act_grad_tile(gbp, G, zp, Z, t, bn2, X.batch * X.plane, act, grad_z);
      load_tile(xp, X, t, scale1.data(), shift1.data(), act, a);
      // Weight gradient: row-major partial (O x C) += grad_z (O x w) @ a^T (w x C).
      gemm("T", "N", C, O, w, a, w, grad_z, w, scalar_t(1), partials.of_this_thread(), C);
      // Input gradient into `a`'s scratch: row-major grad_a (C x w) = W^T (C x O) @ grad_z.
      gemm("N", "T", w, C, O, grad_z, w, wp, C, scalar_t(0), a, w, &shared_w);
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
    grad_weight = partials.sum(x.options());
  });
  return {grad_weight, sum_dpre1, sum_dpre_xhat1};
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CPU, m) {
  m.impl("bn_grad_correct", &bn_grad_correct_cpu);
  m.impl("dense_conv1_backward", &dense_conv1_backward_cpu);
}

}  // namespace csp_kernels
