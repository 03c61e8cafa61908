// CPU kernel of the dense-block backward (csp_kernels.ops.dense): the BN correction applied once
// per channel. The layers' accumulating BN1 + act backward is cpu/batch_norm_act.cpp's reduction.
// CUDA twins in cuda/dense.cu; per-element math shared through batch_norm_act.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "batch_norm_act.h"
#include "dense_args.h"
#include "plane_layout.h"

namespace csp_kernels {
namespace {

// Enough elements per task that at::parallel_for's overhead stays small.
constexpr int64_t kGrainElements = 32768;

// grad_x += invstd * (g - mean(g) - xhat * mean(g * xhat)) per channel, g = grad_acc: the BN
// input gradient with weight 1, since grad_acc already carries every layer's weight.
template <typename scalar_t>
void bn_grad_correct_kernel(const scalar_t* grad_acc, const PlaneLayout& ACC, const scalar_t* x,
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
      const scalar_t* gp = grad_acc + n * ACC.batch_stride + c * ACC.channel_stride;
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
    bn_grad_correct_kernel<scalar_t>(grad_acc.const_data_ptr<scalar_t>(), ACC, x.const_data_ptr<scalar_t>(), L,
                                     grad_x.mutable_data_ptr<scalar_t>(), GX, mean.const_data_ptr<stat_t>(),
                                     invstd.const_data_ptr<stat_t>(), sum_grad.const_data_ptr<stat_t>(),
                                     sum_grad_xhat.const_data_ptr<stat_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CPU, m) {
  m.impl("bn_grad_correct", &bn_grad_correct_cpu);
}

}  // namespace csp_kernels
