// Per-element activation math shared by the CPU and CUDA kernels.
//
// Every function takes the pre-activation value u in the compute type (float or double) and
// is a compile-time specialization, so the kernels' inner loops carry no branch on the kind.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace csp_kernels {

enum class Act : int { Identity = 0, Relu, LeakyRelu, Silu, Mish, Hardswish };

// darknet's slope; DESIGN.md fixes it for every "leaky_relu" in the library.
constexpr double kLeakySlope = 0.1;

template <Act A, typename T>
C10_HOST_DEVICE inline T act_forward(T u) {
  if constexpr (A == Act::Identity) {
    return u;
  } else if constexpr (A == Act::Relu) {
    return u > T(0) ? u : T(0);
  } else if constexpr (A == Act::LeakyRelu) {
    return u > T(0) ? u : T(kLeakySlope) * u;
  } else if constexpr (A == Act::Silu) {
    return u / (T(1) + std::exp(-u));
  } else if constexpr (A == Act::Mish) {
    // softplus with PyTorch's threshold 20, past which log1p(exp(u)) == u in float.
    const T softplus = u > T(20) ? u : std::log1p(std::exp(u));
    return u * std::tanh(softplus);
  } else {  // Hardswish
    const T r6 = u + T(3) < T(0) ? T(0) : (u + T(3) > T(6) ? T(6) : u + T(3));
    return u * r6 / T(6);
  }
}

// d act(u) / du, with the same conventions as PyTorch's backward kernels at the kinks
// (relu'(0) = 0, leaky'(0) = slope, hardswish'(-3) = -0.5, hardswish'(3) = 1.5).
template <Act A, typename T>
C10_HOST_DEVICE inline T act_derivative(T u) {
  if constexpr (A == Act::Identity) {
    return T(1);
  } else if constexpr (A == Act::Relu) {
    return u > T(0) ? T(1) : T(0);
  } else if constexpr (A == Act::LeakyRelu) {
    return u > T(0) ? T(1) : T(kLeakySlope);
  } else if constexpr (A == Act::Silu) {
    const T s = T(1) / (T(1) + std::exp(-u));
    return s * (T(1) + u * (T(1) - s));
  } else if constexpr (A == Act::Mish) {
    const T softplus = u > T(20) ? u : std::log1p(std::exp(u));
    const T t = std::tanh(softplus);
    const T sigmoid = T(1) / (T(1) + std::exp(-u));
    return t + u * sigmoid * (T(1) - t * t);
  } else {  // Hardswish
    return u < T(-3) ? T(0) : (u <= T(3) ? u / T(3) + T(0.5) : T(1));
  }
}

inline Act parse_act(const std::string& name) {
  if (name == "identity") return Act::Identity;
  if (name == "relu") return Act::Relu;
  if (name == "leaky_relu") return Act::LeakyRelu;
  if (name == "silu") return Act::Silu;
  if (name == "mish") return Act::Mish;
  if (name == "hardswish") return Act::Hardswish;
  TORCH_CHECK_VALUE(false, "act must be one of identity, relu, leaky_relu, silu, mish, hardswish; got '", name, "'");
}

// Runs `body` with `kAct` bound to the compile-time Act for `act`.
#define CSP_DISPATCH_ACT(act, ...)                                                          \
  [&] {                                                                                     \
    switch (act) {                                                                          \
      case ::csp_kernels::Act::Identity: { constexpr auto kAct = ::csp_kernels::Act::Identity; return __VA_ARGS__(); } \
      case ::csp_kernels::Act::Relu: { constexpr auto kAct = ::csp_kernels::Act::Relu; return __VA_ARGS__(); }         \
      case ::csp_kernels::Act::LeakyRelu: { constexpr auto kAct = ::csp_kernels::Act::LeakyRelu; return __VA_ARGS__(); } \
      case ::csp_kernels::Act::Silu: { constexpr auto kAct = ::csp_kernels::Act::Silu; return __VA_ARGS__(); }         \
      case ::csp_kernels::Act::Mish: { constexpr auto kAct = ::csp_kernels::Act::Mish; return __VA_ARGS__(); }         \
      default: { constexpr auto kAct = ::csp_kernels::Act::Hardswish; return __VA_ARGS__(); }                          \
    }                                                                                       \
  }()

}  // namespace csp_kernels
