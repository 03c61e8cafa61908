// Argument checks of the dense-block backward ops, shared by cpu/dense.cpp and cuda/dense.cu.
#pragma once

#include <initializer_list>
#include <type_traits>

#include "plane_layout.h"

namespace csp_kernels {

// Data tensors that must match x in shape, dtype and device (views of other buffers allowed).
inline void check_same_data(const at::Tensor& x, std::initializer_list<NamedTensor> args) {
  for (const NamedTensor& arg : args) {
    check_same_shape(x, arg.tensor, "x", arg.name);
    TORCH_CHECK_TYPE(arg.tensor.scalar_type() == x.scalar_type(), arg.name, " must have x's dtype ",
                     x.scalar_type(), "; got ", arg.tensor.scalar_type());
    TORCH_CHECK_VALUE(arg.tensor.device() == x.device(), arg.name, " must be on ", x.device(), "; got ",
                      arg.tensor.device());
  }
}

// The BN1 gradient accumulator grad_acc: shaped like x, on x's device, in x's dtype or, for
// float16/bfloat16 x, float32 (what the GPU engines accumulate in: ops.routing.dense_grad_acc_dtype).
inline void check_grad_acc(const at::Tensor& x, const at::Tensor& grad_acc) {
  check_same_shape(x, grad_acc, "x", "grad_acc");
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK_TYPE(grad_acc.scalar_type() == x.scalar_type() || (half && grad_acc.scalar_type() == at::kFloat),
                   "grad_acc must have x's dtype ", x.scalar_type(), half ? " or float32" : "", "; got ",
                   grad_acc.scalar_type());
  TORCH_CHECK_VALUE(grad_acc.device() == x.device(), "grad_acc must be on ", x.device(), "; got ",
                    grad_acc.device());
}

// Calls f with a null pointer of grad_acc's element type for data of type scalar_t: scalar_t, or
// float for the float32 accumulator of float16/bfloat16 data (`check_grad_acc`).
template <typename scalar_t, typename F>
void with_grad_acc_type(const at::Tensor& grad_acc, const F& f) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (grad_acc.scalar_type() == at::kFloat) {
      f(static_cast<float*>(nullptr));
      return;
    }
  }
  f(static_cast<scalar_t*>(nullptr));
}

// bn_act_backward_accumulate: grad_a and grad_acc shaped like x (the BN1-read channel prefix).
struct AccumulateLayouts {
  PlaneLayout x, grad_a, grad_acc;
};

inline AccumulateLayouts check_accumulate_args(const at::Tensor& grad_a, const at::Tensor& x, const at::Tensor& mean,
                                               const at::Tensor& invstd, const at::Tensor& weight,
                                               const at::Tensor& bias, const at::Tensor& grad_acc) {
  AccumulateLayouts layouts{plane_layout(x, "x"), plane_layout(grad_a, "grad_a"), plane_layout(grad_acc, "grad_acc")};
  check_same_data(x, {{grad_a, "grad_a"}});
  check_grad_acc(x, grad_acc);
  check_per_channel_args(x, {{mean, "mean"}, {invstd, "invstd"}, {weight, "weight"}, {bias, "bias"}});
  return layouts;
}

// bn_grad_correct: grad_acc and grad_x shaped like x.
struct CorrectLayouts {
  PlaneLayout x, grad_acc, grad_x;
};

inline CorrectLayouts check_correct_args(const at::Tensor& grad_acc, const at::Tensor& x, const at::Tensor& mean,
                                         const at::Tensor& invstd, const at::Tensor& sum_grad,
                                         const at::Tensor& sum_grad_xhat, const at::Tensor& grad_x) {
  CorrectLayouts layouts{plane_layout(x, "x"), plane_layout(grad_acc, "grad_acc"), plane_layout(grad_x, "grad_x")};
  check_same_data(x, {{grad_x, "grad_x"}});
  check_grad_acc(x, grad_acc);
  check_per_channel_args(x, {{mean, "mean"}, {invstd, "invstd"}, {sum_grad, "sum_grad"},
                             {sum_grad_xhat, "sum_grad_xhat"}});
  return layouts;
}

}  // namespace csp_kernels
