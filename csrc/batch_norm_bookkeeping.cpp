// A training BatchNorm's per-channel arithmetic around the fused kernels, each one op call in
// place of a handful of tiny tensor ops from Python (each pays the dispatcher and Python's
// argument parsing, several microseconds, at every unit of every training step):
//   bn_scale_shift            (scale, shift) of y = z * scale + shift from batch statistics;
//   bn_track_running_stats_   nn.BatchNorm2d's bookkeeping: num_batches_tracked += 1 and the
//                             running statistics' exponential average with the unbiased variance.
// On the CPU one loop over the channels; elsewhere the same formulas as ATen ops. Registered for
// every backend (CompositeExplicitAutograd); the fakes are in csp_kernels/ops/fakes.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace csp_kernels {
namespace {

void check_channels(const at::Tensor& mean, std::initializer_list<std::pair<const at::Tensor*, const char*>> others) {
  TORCH_CHECK_VALUE(mean.dim() == 1, "mean must be 1-D (channels,); got ", mean.sizes());
  TORCH_CHECK_VALUE(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble,
                    "mean must be float32 or float64; got ", mean.scalar_type());
  for (const auto& [t, name] : others) {
    TORCH_CHECK_VALUE(t->sizes() == mean.sizes(), name, " must have mean's shape ", mean.sizes(), "; got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->device() == mean.device(), name, " must be on mean's device ", mean.device(), "; got ",
                      t->device());
  }
}

// scale = weight / sqrt(var + eps), shift = bias - mean * scale, in mean's dtype (the statistics'
// dtype; weight and bias of any floating dtype and strides), as csp_kernels.ops.batch_norm_act's
// bn_scale_shift writes it in ATen ops.
std::tuple<at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& mean, const at::Tensor& var,
                                                  const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_channels(mean, {{&var, "var"}, {&weight, "weight"}, {&bias, "bias"}});
  TORCH_CHECK_VALUE(var.scalar_type() == mean.scalar_type(), "var must have mean's dtype ", mean.scalar_type(),
                    "; got ", var.scalar_type());
  const at::Tensor w = weight.to(mean.scalar_type()), b = bias.to(mean.scalar_type());
  if (!mean.is_cpu()) {
    at::Tensor scale = w * (var + eps).rsqrt();
    return {scale, b - mean * scale};
  }
  at::Tensor scale = at::empty(mean.sizes(), mean.options()), shift = at::empty(mean.sizes(), mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_scale_shift", [&] {
    const auto m = mean.accessor<scalar_t, 1>(), v = var.accessor<scalar_t, 1>();
    const auto wa = w.accessor<scalar_t, 1>(), ba = b.accessor<scalar_t, 1>();
    scalar_t* s = scale.mutable_data_ptr<scalar_t>();
    scalar_t* sh = shift.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < mean.size(0); ++c) {
      // (1 / sqrt as ATen's rsqrt of var + eps, eps rounded to the dtype as a scalar operand is.)
      s[c] = wa[c] * (scalar_t(1) / std::sqrt(v[c] + static_cast<scalar_t>(eps)));
      sh[c] = ba[c] - m[c] * s[c];
    }
  });
  return {scale, shift};
}

// num_batches_tracked += 1; running = momentum * statistic + (1 - momentum) * running for the
// mean and the unbiased variance var * unbias, computed in double and rounded to the running
// statistics' dtype, as nn.BatchNorm2d's CPU kernel does.
void bn_track_running_stats_(at::Tensor& num_batches_tracked, at::Tensor& running_mean, at::Tensor& running_var,
                             const at::Tensor& mean, const at::Tensor& var, double unbias, double momentum) {
  check_channels(mean, {{&var, "var"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}});
  TORCH_CHECK_VALUE(running_var.scalar_type() == running_mean.scalar_type(),
                    "running_var must have running_mean's dtype ", running_mean.scalar_type(), "; got ",
                    running_var.scalar_type());
  num_batches_tracked.add_(1);
  if (!mean.is_cpu()) {
    const auto dtype = running_mean.scalar_type();
    running_mean.copy_((mean.to(at::kDouble) * momentum + running_mean.to(at::kDouble) * (1 - momentum)).to(dtype));
    running_var.copy_(
        (var.to(at::kDouble) * (unbias * momentum) + running_var.to(at::kDouble) * (1 - momentum)).to(dtype));
    return;
  }
  const at::Tensor m = mean.to(at::kDouble), v = var.to(at::kDouble);
  const auto ma = m.accessor<double, 1>(), va = v.accessor<double, 1>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "bn_track_running_stats_", [&] {
    auto rm = running_mean.accessor<scalar_t, 1>(), rv = running_var.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < mean.size(0); ++c) {
      rm[c] = static_cast<scalar_t>(momentum * ma[c] + (1 - momentum) * static_cast<double>(rm[c]));
      rv[c] = static_cast<scalar_t>(momentum * (va[c] * unbias) + (1 - momentum) * static_cast<double>(rv[c]));
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CompositeExplicitAutograd, m) {
  m.impl("bn_scale_shift", &bn_scale_shift);
  m.impl("bn_track_running_stats_", &bn_track_running_stats_);
}

}  // namespace csp_kernels
