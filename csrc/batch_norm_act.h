// Per-element math of training-mode BatchNorm followed by an activation, shared by the CPU and
// CUDA kernels. Per channel: xhat = (z - mean) * invstd, y = act(weight * xhat + bias).
#pragma once

#include "activation.h"

namespace csp_kernels {

// Gradient reaching the BN output (before the activation): dy * act'(weight * xhat + bias).
template <Act A, typename T>
C10_HOST_DEVICE inline T bn_act_grad_pre(T dy, T xhat, T weight, T bias, T slope) {
  return act_grad<A>(dy, weight * xhat + bias, slope);
}

// Gradient w.r.t. the BN input z, given the per-channel means over the M = N*H*W elements of
// the channel: mean_dpre = sum(dpre) / M, mean_dpre_xhat = sum(dpre * xhat) / M.
template <typename T>
C10_HOST_DEVICE inline T bn_grad_input(T dpre, T xhat, T weight, T invstd, T mean_dpre, T mean_dpre_xhat) {
  return weight * invstd * (dpre - mean_dpre - xhat * mean_dpre_xhat);
}

}  // namespace csp_kernels
