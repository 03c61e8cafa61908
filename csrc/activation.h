// Per-element activation math shared by the CPU and CUDA kernels.
//
// Every function takes the pre-activation value u in the compute type (float or double) and
// is a compile-time specialization, so the kernels' inner loops carry no branch on the kind.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace csp_kernels {

enum class Act : int { Identity = 0, Relu, LeakyRelu, Silu, Mish, Hardswish };

// darknet's slope; DESIGN.md fixes it for every "leaky_relu" in the library.
constexpr double kLeakySlope = 0.1;

// e^u. On the host, float goes through a branch-free Cephes-style polynomial (within 2 ulp of
// expf) that GCC vectorizes; libm's expf would keep silu and mish loops scalar (~20x slower).
template <typename T>
C10_HOST_DEVICE inline T exp_(T u) {
#if defined(__CUDA_ARCH__)
  return std::exp(u);
#else
  if constexpr (std::is_same_v<T, float>) {
    const float x = u < -87.3f ? -87.3f : (u > 88.7f ? 88.7f : u);
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2, ln2 split in two
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
  } else {
    return std::exp(u);
  }
#endif
}

// tanh(softplus(u)) = n / (n + 2) with n = e^u (e^u + 2): exp only, no log1p or tanh, and no
// cancellation for negative u. Valid below PyTorch's softplus threshold (20).
template <typename T>
C10_HOST_DEVICE inline T tanh_softplus(T u) {
  const T e = exp_(u);
  const T n = e * (e + T(2));
  return n / (n + T(2));
}

template <Act A, typename T>
C10_HOST_DEVICE inline T act_forward(T u) {
  if constexpr (A == Act::Identity) {
    return u;
  } else if constexpr (A == Act::Relu) {
    return u > T(0) ? u : T(0);
  } else if constexpr (A == Act::LeakyRelu) {
    return u > T(0) ? u : T(kLeakySlope) * u;
  } else if constexpr (A == Act::Silu) {
    return u / (T(1) + exp_(-u));
  } else if constexpr (A == Act::Mish) {
    // Past PyTorch's softplus threshold 20, softplus(u) = u and tanh(u) = 1 in float.
    return u > T(20) ? u : u * tanh_softplus(u);
  } else {  // Hardswish
    const T r6 = u + T(3) < T(0) ? T(0) : (u + T(3) > T(6) ? T(6) : u + T(3));
    return u * r6 / T(6);
  }
}

// d act(u) / du, with PyTorch's conventions at the kinks (relu'(0) = 0, leaky'(0) = slope,
// hardswish'(-3) = 0, hardswish'(3) = 1).
template <Act A, typename T>
C10_HOST_DEVICE inline T act_derivative(T u) {
  if constexpr (A == Act::Identity) {
    return T(1);
  } else if constexpr (A == Act::Relu) {
    return u > T(0) ? T(1) : T(0);
  } else if constexpr (A == Act::LeakyRelu) {
    return u > T(0) ? T(1) : T(kLeakySlope);
  } else if constexpr (A == Act::Silu) {
    const T s = T(1) / (T(1) + exp_(-u));
    return s * (T(1) + u * (T(1) - s));
  } else if constexpr (A == Act::Mish) {
    const T t = tanh_softplus(u);
    const T sigmoid = T(1) / (T(1) + exp_(-u));
    return u > T(20) ? T(1) : t + u * sigmoid * (T(1) - t * t);
  } else {  // Hardswish
    return u <= T(-3) ? T(0) : (u < T(3) ? u / T(3) + T(0.5) : T(1));
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
