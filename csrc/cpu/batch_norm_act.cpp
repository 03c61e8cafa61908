// CPU kernels of the BatchNorm + activation family: per-channel batch statistics, the
// normalize+activation pass, and the two passes of its training backward. Parallel over
// channels or planes; the inner loops run over one contiguous (H*W) plane so they vectorize.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "batch_norm_act.h"
#include "moments.h"
#include "bn_act_rows.h"
#include "dense_args.h"
#include "plane_layout.h"

namespace csp_kernels {
namespace {

// Enough elements per task that at::parallel_for's overhead stays small.
constexpr int64_t kGrainElements = 32768;

int64_t channel_grain(const PlaneLayout& L) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, L.batch * L.plane));
}

int64_t plane_grain(const PlaneLayout& L) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, L.plane));
}

template <typename scalar_t>
void channel_stats_kernel(const scalar_t* x, const PlaneLayout& L, stat_of<scalar_t>* mean, stat_of<scalar_t>* var) {
  at::parallel_for(0, L.channels, channel_grain(L), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      // Per plane (in cache): its mean, then its squared deviations from that mean, both in
      // double, merged across planes by Chan's rule: no E[x^2] - E[x]^2 cancellation. It was
      // sums shifted by one sample in float per plane: on 144 values of mean 5, std 3, the
      // variance came out with 5.6e-7 relative error; now 1.8e-8, as ATen's var_mean.
      Moments moments;
      for (int64_t n = 0; n < L.batch; ++n) {
        moments.add(moments_of(x + n * L.batch_stride + c * L.channel_stride, L.plane));
      }
      mean[c] = static_cast<stat_of<scalar_t>>(moments.mean);
      var[c] = static_cast<stat_of<scalar_t>>(moments.biased_variance());
    }
  });
}

template <typename scalar_t, Act A>
void scale_shift_act_kernel(const scalar_t* x, const PlaneLayout& L, scalar_t* out, const PlaneLayout& O,
                            const stat_of<scalar_t>* scale, const stat_of<scalar_t>* shift, double slope_) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t slope = static_cast<acc_t>(slope_);
  const bool avx512 = avx512_runs();
  at::parallel_for(0, L.batch * L.channels, plane_grain(L), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / L.channels, c = p % L.channels;
      run_loop<ScaleShiftActRow<scalar_t, A>>(avx512, x + n * L.batch_stride + c * L.channel_stride,
                                                out + n * O.batch_stride + c * O.channel_stride, L.plane,
                                                static_cast<acc_t>(scale[c]), static_cast<acc_t>(shift[c]), slope);
    }
  });
}

// Per-channel pointers of a BN + activation backward.
template <typename stat_t>
struct BnActParams {
  const stat_t *mean, *invstd, *weight, *bias;
  double slope;  // the activation's (ActSpec::slope)
};

// Per channel: dpre = grad_y * act'(weight * xhat + bias); returns sum(dpre) and sum(dpre * xhat)
// (the BN bias and weight gradients). With kAccumulate it also adds weight * dpre into grad_acc:
// the dense block's layers share one BN-input gradient buffer (ops/dense.py), of grad_t: scalar_t,
// or float for 16-bit data (check_grad_acc).
template <typename scalar_t, Act A, bool kAccumulate, typename grad_t = scalar_t>
void bn_act_backward_reduce_kernel(const scalar_t* grad_y, const PlaneLayout& G, const scalar_t* z,
                                   const PlaneLayout& L, BnActParams<stat_of<scalar_t>> bn,
                                   stat_of<scalar_t>* sum_dpre, stat_of<scalar_t>* sum_dpre_xhat,
                                   grad_t* grad_acc = nullptr, const PlaneLayout& ACC = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool avx512 = avx512_runs();
  at::parallel_for(0, L.channels, channel_grain(L), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t m = bn.mean[c], inv = bn.invstd[c], w = bn.weight[c], b = bn.bias[c];
      const acc_t slope = static_cast<acc_t>(bn.slope);
      double total = 0, total_xhat = 0;
      for (int64_t n = 0; n < L.batch; ++n) {
        grad_t* accp = kAccumulate ? grad_acc + n * ACC.batch_stride + c * ACC.channel_stride : nullptr;
        run_loop<BnActReduceRow<scalar_t, A, kAccumulate, grad_t>>(
            avx512, z + n * L.batch_stride + c * L.channel_stride, grad_y + n * G.batch_stride + c * G.channel_stride,
            accp, L.plane, m, inv, w, b, slope, &total, &total_xhat);
      }
      sum_dpre[c] = static_cast<stat_of<scalar_t>>(total);
      sum_dpre_xhat[c] = static_cast<stat_of<scalar_t>>(total_xhat);
    }
  });
}

template <typename scalar_t, Act A>
void bn_act_backward_apply_kernel(const scalar_t* grad_y, const PlaneLayout& G, const scalar_t* z,
                                  const PlaneLayout& L, scalar_t* grad_z, BnActParams<stat_of<scalar_t>> bn,
                                  const stat_of<scalar_t>* sum_dpre, const stat_of<scalar_t>* sum_dpre_xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(L.batch * L.plane);
  const acc_t slope = static_cast<acc_t>(bn.slope);
  const bool avx512 = avx512_runs();
  at::parallel_for(0, L.batch * L.channels, plane_grain(L), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / L.channels, c = p % L.channels;
      const acc_t mean_dpre = sum_dpre[c] * inv_count, mean_dpre_xhat = sum_dpre_xhat[c] * inv_count;
      run_loop<BnActGradRow<scalar_t, A>>(avx512, z + n * L.batch_stride + c * L.channel_stride,
                                             grad_y + n * G.batch_stride + c * G.channel_stride,
                                             grad_z + p * L.plane, L.plane, static_cast<acc_t>(bn.mean[c]),
                                             static_cast<acc_t>(bn.invstd[c]), static_cast<acc_t>(bn.weight[c]),
                                             static_cast<acc_t>(bn.bias[c]), slope, mean_dpre, mean_dpre_xhat);
    }
  });
}

template <typename scalar_t>
BnActParams<stat_of<scalar_t>> bn_act_params(const at::Tensor& mean, const at::Tensor& invstd,
                                             const at::Tensor& weight, const at::Tensor& bias, const ActSpec& act) {
  using stat_t = stat_of<scalar_t>;
  return {mean.const_data_ptr<stat_t>(), invstd.const_data_ptr<stat_t>(), weight.const_data_ptr<stat_t>(),
          bias.const_data_ptr<stat_t>(), act.slope};
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x) {
  const PlaneLayout L = plane_layout(x, "x");
  TORCH_CHECK_VALUE(L.batch * L.plane > 0, "x must have at least one element per channel; got shape ", x.sizes());
  const auto opts = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({L.channels}, opts), var = at::empty({L.channels}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cpu", [&] {
    channel_stats_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), L, mean.mutable_data_ptr<stat_of<scalar_t>>(),
                                   var.mutable_data_ptr<stat_of<scalar_t>>());
  });
  return {mean, var};
}

void scale_shift_act_out_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             c10::string_view act_name, const at::Tensor& out) {
  PlaneLayout L, O;
  std::tie(L, O) = paired_layouts(x, "x", out, "out");
  check_per_channel_args(x, {{scale, "scale"}, {shift, "shift"}});
  const ActSpec act = parse_act(std::string(act_name));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_shift_act_cpu", [&] {
    CSP_DISPATCH_ACT(act, [&] {
      scale_shift_act_kernel<scalar_t, kAct>(x.const_data_ptr<scalar_t>(), L, out.mutable_data_ptr<scalar_t>(), O,
                                             scale.const_data_ptr<stat_of<scalar_t>>(),
                                             shift.const_data_ptr<stat_of<scalar_t>>(), act.slope);
    });
  });
}

at::Tensor scale_shift_act_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                               c10::string_view act) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  scale_shift_act_out_cpu(x, scale, shift, act, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, c10::string_view act_name) {
  PlaneLayout L, G;
  std::tie(L, G) = paired_layouts(z, "z", grad_y, "grad_y");
  check_per_channel_args(z, {{mean, "mean"}, {invstd, "invstd"}, {weight, "weight"}, {bias, "bias"}});
  const ActSpec act = parse_act(std::string(act_name));
  at::Tensor sum_dpre = at::empty_like(mean), sum_dpre_xhat = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_backward_reduce_cpu", [&] {
    CSP_DISPATCH_ACT(act, [&] {
      bn_act_backward_reduce_kernel<scalar_t, kAct, false>(
          grad_y.const_data_ptr<scalar_t>(), G, z.const_data_ptr<scalar_t>(), L,
          bn_act_params<scalar_t>(mean, invstd, weight, bias, act), sum_dpre.mutable_data_ptr<stat_of<scalar_t>>(),
          sum_dpre_xhat.mutable_data_ptr<stat_of<scalar_t>>());
    });
  });
  return {sum_dpre, sum_dpre_xhat};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_accumulate_cpu(
    const at::Tensor& grad_a, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, c10::string_view act_name, const at::Tensor& grad_acc) {
  const AccumulateLayouts layouts = check_accumulate_args(grad_a, x, mean, invstd, weight, bias, grad_acc);
  const PlaneLayout &L = layouts.x, &GA = layouts.grad_a, &ACC = layouts.grad_acc;
  const ActSpec act = parse_act(std::string(act_name));
  at::Tensor sum_dpre = at::empty_like(mean), sum_dpre_xhat = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_accumulate_cpu", [&] {
    with_grad_acc_type<scalar_t>(grad_acc, [&](auto* type) {
      using grad_t = std::remove_pointer_t<decltype(type)>;
      CSP_DISPATCH_ACT(act, [&] {
        bn_act_backward_reduce_kernel<scalar_t, kAct, true, grad_t>(
            grad_a.const_data_ptr<scalar_t>(), GA, x.const_data_ptr<scalar_t>(), L,
            bn_act_params<scalar_t>(mean, invstd, weight, bias, act), sum_dpre.mutable_data_ptr<stat_of<scalar_t>>(),
            sum_dpre_xhat.mutable_data_ptr<stat_of<scalar_t>>(), grad_acc.mutable_data_ptr<grad_t>(), ACC);
      });
    });
  });
  return {sum_dpre, sum_dpre_xhat};
}

at::Tensor bn_act_backward_apply_cpu(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& sum_dpre,
    const at::Tensor& sum_dpre_xhat, c10::string_view act_name) {
  PlaneLayout L, G;
  std::tie(L, G) = paired_layouts(z, "z", grad_y, "grad_y");
  check_per_channel_args(z, {{mean, "mean"}, {invstd, "invstd"}, {weight, "weight"}, {bias, "bias"},
                             {sum_dpre, "sum_dpre"}, {sum_dpre_xhat, "sum_dpre_xhat"}});
  const ActSpec act = parse_act(std::string(act_name));
  at::Tensor grad_z = at::empty(z.sizes(), z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_backward_apply_cpu", [&] {
    CSP_DISPATCH_ACT(act, [&] {
      bn_act_backward_apply_kernel<scalar_t, kAct>(
          grad_y.const_data_ptr<scalar_t>(), G, z.const_data_ptr<scalar_t>(), L, grad_z.mutable_data_ptr<scalar_t>(),
          bn_act_params<scalar_t>(mean, invstd, weight, bias, act), sum_dpre.const_data_ptr<stat_of<scalar_t>>(),
          sum_dpre_xhat.const_data_ptr<stat_of<scalar_t>>());
    });
  });
  return grad_z;
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CPU, m) {
  m.impl("channel_stats", &channel_stats_cpu);
  m.impl("scale_shift_act", &scale_shift_act_cpu);
  m.impl("scale_shift_act_out", &scale_shift_act_out_cpu);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_accumulate", &bn_act_backward_accumulate_cpu);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply_cpu);
}

}  // namespace csp_kernels
