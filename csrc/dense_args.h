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

}  // namespace csp_kernels
