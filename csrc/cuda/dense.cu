// CUDA kernel of the dense-block backward's BN correction (elementwise, one grid row per (n, c)
// plane); the CPU twin is in cpu/dense.cpp. The accumulating BN1 + act backward is
// cuda/batch_norm_act.cu's reduction.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "batch_norm_act.h"
#include "dense_args.h"
#include "plane_layout.h"

namespace csp_kernels {
namespace {

constexpr int kElementwiseThreads = 256;

// grad_acc of grad_t: scalar_t, or float for 16-bit data (check_grad_acc).
template <typename scalar_t, typename grad_t>
__global__ void bn_grad_correct_kernel(const grad_t* __restrict__ grad_acc, PlaneLayout ACC,
                                       const scalar_t* __restrict__ x, PlaneLayout L, scalar_t* grad_x, PlaneLayout GX,
                                       const stat_of<scalar_t>* mean, const stat_of<scalar_t>* invstd,
                                       const stat_of<scalar_t>* sum_grad, const stat_of<scalar_t>* sum_grad_xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x / L.channels, c = blockIdx.x % L.channels;
  const scalar_t* xp = x + n * L.batch_stride + c * L.channel_stride;
  const grad_t* gp = grad_acc + n * ACC.batch_stride + c * ACC.channel_stride;
  scalar_t* out = grad_x + n * GX.batch_stride + c * GX.channel_stride;
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(L.batch * L.plane);
  const acc_t m = mean[c], inv = invstd[c];
  const acc_t mean_g = sum_grad[c] * inv_count, mean_g_xhat = sum_grad_xhat[c] * inv_count;
  for (int64_t i = blockIdx.y * blockDim.x + threadIdx.x; i < L.plane; i += gridDim.y * blockDim.x) {
    const acc_t xhat = (static_cast<acc_t>(xp[i]) - m) * inv;
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(out[i]) +
                                   bn_grad_input(static_cast<acc_t>(gp[i]), xhat, acc_t(1), inv, mean_g, mean_g_xhat));
  }
}

void bn_grad_correct_cuda(const at::Tensor& grad_acc, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& invstd, const at::Tensor& sum_grad, const at::Tensor& sum_grad_xhat,
                          const at::Tensor& grad_x) {
  const CorrectLayouts layouts = check_correct_args(grad_acc, x, mean, invstd, sum_grad, sum_grad_xhat, grad_x);
  const PlaneLayout &L = layouts.x, &ACC = layouts.grad_acc, &GX = layouts.grad_x;
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t chunks = (L.plane + kElementwiseThreads * 4 - 1) / (kElementwiseThreads * 4);
  const dim3 grid(static_cast<unsigned>(L.batch * L.channels), static_cast<unsigned>(std::min<int64_t>(chunks, 65535)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_grad_correct_cuda", [&] {
    using stat_t = stat_of<scalar_t>;
    with_grad_acc_type<scalar_t>(grad_acc, [&](auto* type) {
      using grad_t = std::remove_pointer_t<decltype(type)>;
      bn_grad_correct_kernel<scalar_t, grad_t><<<grid, kElementwiseThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad_acc.const_data_ptr<grad_t>(), ACC, x.const_data_ptr<scalar_t>(), L,
          grad_x.mutable_data_ptr<scalar_t>(), GX, mean.const_data_ptr<stat_t>(), invstd.const_data_ptr<stat_t>(),
          sum_grad.const_data_ptr<stat_t>(), sum_grad_xhat.const_data_ptr<stat_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CUDA, m) {
  m.impl("bn_grad_correct", &bn_grad_correct_cuda);
}

}  // namespace csp_kernels
