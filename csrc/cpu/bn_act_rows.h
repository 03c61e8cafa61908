// The per-element rows of the BatchNorm + activation family, shared by the whole-tensor passes
// (batch_norm_act.cpp), the 1x1 GEMMs' tile prologues and epilogues (conv1x1_tiles.h) and the
// dense layer's backward (dense.cpp). Each is a struct whose always-inline `run` is the loop, for
// `run_loop` to compile for the baseline target and for AVX-512 (isa.h); a row is one contiguous
// run of a (height, width) plane, read and written with unit stride.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "activation.h"
#include "batch_norm_act.h"
#include "isa.h"

namespace csp_kernels {

// dst = act(src * a + b) (dst may be src).
template <typename scalar_t, Act A>
struct ScaleShiftActRow {
  using acc_t = at::opmath_type<scalar_t>;
  static CSP_ALWAYS_INLINE void run(const scalar_t* src, scalar_t* dst, int64_t width, acc_t a, acc_t b,
                                    acc_t slope) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      dst[i] = static_cast<scalar_t>(act_forward<A>(static_cast<acc_t>(src[i]) * a + b, slope));
    }
  }
};

// dpre = dy * act'(w * xhat + b), xhat = (z - m) * inv: adds sum(dpre) and sum(dpre * xhat) into
// *s_out and *sx_out (in double, as ATen's BatchNorm backward: the weight gradient's sum can
// cancel); with kAccumulate also acc += w * dpre.
template <typename scalar_t, Act A, bool kAccumulate, typename grad_t = scalar_t>
struct BnActReduceRow {
  using acc_t = at::opmath_type<scalar_t>;
  static CSP_ALWAYS_INLINE void run(const scalar_t* z, const scalar_t* dy, grad_t* acc, int64_t width, acc_t m,
                                    acc_t inv, acc_t w, acc_t b, acc_t slope, double* s_out, double* sx_out) {
    double s = 0, sx = 0;
#pragma omp simd reduction(+ : s, sx)
    for (int64_t i = 0; i < width; ++i) {
      const acc_t xhat = (static_cast<acc_t>(z[i]) - m) * inv;
      const acc_t dpre = bn_act_grad_pre<A>(static_cast<acc_t>(dy[i]), xhat, w, b, slope);
      if constexpr (kAccumulate) acc[i] = static_cast<grad_t>(static_cast<acc_t>(acc[i]) + w * dpre);
      s += dpre;
      sx += static_cast<double>(dpre) * xhat;
    }
    *s_out += s;
    *sx_out += sx;
  }
};

// grad_z of the BN + activation backward, given the per-channel means of dpre and dpre * xhat.
template <typename scalar_t, Act A>
struct BnActGradRow {
  using acc_t = at::opmath_type<scalar_t>;
  static CSP_ALWAYS_INLINE void run(const scalar_t* z, const scalar_t* dy, scalar_t* grad_z, int64_t width, acc_t m,
                                    acc_t inv, acc_t w, acc_t b, acc_t slope, acc_t mean_dpre,
                                    acc_t mean_dpre_xhat) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const acc_t xhat = (static_cast<acc_t>(z[i]) - m) * inv;
      const acc_t dpre = bn_act_grad_pre<A>(static_cast<acc_t>(dy[i]), xhat, w, b, slope);
      grad_z[i] = static_cast<scalar_t>(bn_grad_input(dpre, xhat, w, inv, mean_dpre, mean_dpre_xhat));
    }
  }
};

}  // namespace csp_kernels
