// Argument checks of the dense-block backward ops, shared by cpu/dense.cpp and cuda/dense.cu.
#pragma once

#include <initializer_list>

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

// bn_act_backward_accumulate: grad_a and grad_acc shaped like x (the BN1-read channel prefix).
struct AccumulateLayouts {
  PlaneLayout x, grad_a, grad_acc;
};

inline AccumulateLayouts check_accumulate_args(const at::Tensor& grad_a, const at::Tensor& x, const at::Tensor& mean,
                                               const at::Tensor& invstd, const at::Tensor& weight,
                                               const at::Tensor& bias, const at::Tensor& grad_acc) {
  AccumulateLayouts layouts{plane_layout(x, "x"), plane_layout(grad_a, "grad_a"), plane_layout(grad_acc, "grad_acc")};
  check_same_data(x, {{grad_a, "grad_a"}, {grad_acc, "grad_acc"}});
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
  check_same_data(x, {{grad_acc, "grad_acc"}, {grad_x, "grad_x"}});
  check_per_channel_args(x, {{mean, "mean"}, {invstd, "invstd"}, {sum_grad, "sum_grad"},
                             {sum_grad_xhat, "sum_grad_xhat"}});
  return layouts;
}

}  // namespace csp_kernels
