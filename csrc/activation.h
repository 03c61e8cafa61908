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
#include <exception>
#include <limits>
#include <string>
#include <type_traits>

namespace csp_kernels {

enum class Act : int { Identity = 0, Relu, LeakyRelu, Silu, Mish, Hardswish };

// darknet's slope: "leaky_relu" alone; "leaky_relu:<slope>" names another (parse_act).
constexpr double kDefaultLeakySlope = 0.1;

// An activation as the ops name it: the kind, which the kernels take as a template argument
// (CSP_DISPATCH_ACT), and LeakyReLU's negative slope, which they take as a value (the other
// kinds ignore it).
struct ActSpec {
  Act kind;
  double slope;
};

// e^u. On the host, float goes through a branch-free Cephes-style polynomial (within 2 ulp of
// expf on [kExpLo, kExpHi)) that GCC vectorizes; libm's expf would keep silu and mish loops
// scalar (~20x slower). Outside that range it returns e^u's limits as expf does at +-inf: 0
// below, +inf above (from 2^127.5 on, within a factor sqrt(2) of FLT_MAX, where 2^n would
// need n = 128), and NaN stays NaN, so silu(-inf) = -inf / inf = NaN as in ATen.
template <typename T>
C10_HOST_DEVICE inline T exp_(T u) {
#if defined(__CUDA_ARCH__)
  return std::exp(u);
#else
  if constexpr (std::is_same_v<T, float>) {
    constexpr float kExpLo = -87.3f, kExpHi = 88.3762626647949f;  // 2^-126 and 127.5 ln 2
    // NaN compares false and lands on kExpLo: the int conversion of n below stays defined.
    const float x = u > kExpLo ? (u < kExpHi ? u : kExpHi) : kExpLo;
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
    // u + inf: +inf above the range, NaN for NaN.
    return u < kExpHi ? (u >= kExpLo ? p * scale : 0.0f) : u + std::numeric_limits<float>::infinity();
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

// NaN and +-inf give what ATen's activations give: every select is written so that NaN takes
// the branch that ATen's CPU kernels give it (relu(NaN) = NaN, relu'(NaN) = 1 as ATen's
// threshold_backward, hardswish'(NaN) = NaN; silu, mish and hardswish of -inf are NaN, inf * 0
// or inf / inf).
// `slope` is LeakyReLU's negative slope (ActSpec::slope); the other kinds ignore it.
template <Act A, typename T>
C10_HOST_DEVICE inline T act_forward(T u, T slope) {
  if constexpr (A == Act::Identity) {
    return u;
  } else if constexpr (A == Act::Relu) {
    return u < T(0) ? T(0) : u;  // ATen's: NaN and -0.0 pass through
  } else if constexpr (A == Act::LeakyRelu) {
    return u > T(0) ? u : slope * u;
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

// The gradient reaching u, dy * act'(u), as ATen's backward computes it: with PyTorch's values
// at the kinks (relu'(0) = 0, leaky'(0) = slope, hardswish'(-3) = 0, hardswish'(3) = 1), and
// where act' is 0 the gradient is selected, not multiplied (ATen's threshold_backward and
// hardswish_backward), so a NaN or inf dy there gives 0, not NaN.
template <Act A, typename T>
C10_HOST_DEVICE inline T act_grad(T dy, T u, T slope) {
  if constexpr (A == Act::Identity) {
    return dy;
  } else if constexpr (A == Act::Relu) {
    return u <= T(0) ? T(0) : dy;
  } else if constexpr (A == Act::LeakyRelu) {
    return u > T(0) ? dy : dy * slope;
  } else if constexpr (A == Act::Silu) {
    const T s = T(1) / (T(1) + exp_(-u));
    return dy * (s * (T(1) + u * (T(1) - s)));
  } else if constexpr (A == Act::Mish) {
    // Past the threshold t = 1 and the formula gives 1, or NaN at +inf as ATen's.
    const T t = u > T(20) ? T(1) : tanh_softplus(u);
    const T sigmoid = T(1) / (T(1) + exp_(-u));
    return dy * (t + u * sigmoid * (T(1) - t * t));
  } else {  // Hardswish; NaN reaches u / 3 + 0.5, as in ATen's vectorized CPU backward
    return u >= T(3) ? dy : (u <= T(-3) ? T(0) : dy * (u / T(3) + T(0.5)));
  }
}

// "identity", "relu", "leaky_relu" (kDefaultLeakySlope) or "leaky_relu:<slope>", "silu",
// "mish", "hardswish": the names csp_kernels.checks.act_spec writes.
inline ActSpec parse_act(const std::string& name) {
  if (name == "identity") return {Act::Identity, 1.0};
  if (name == "relu") return {Act::Relu, 1.0};
  if (name == "leaky_relu") return {Act::LeakyRelu, kDefaultLeakySlope};
  if (name.rfind("leaky_relu:", 0) == 0) {
    const std::string value = name.substr(11);
    size_t used = 0;
    double slope = 0;
    try {
      slope = std::stod(value, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TORCH_CHECK_VALUE(used > 0 && used == value.size() && std::isfinite(slope),
                      "act 'leaky_relu:<slope>' needs a finite number as slope; got '", name, "'");
    return {Act::LeakyRelu, slope};
  }
  if (name == "silu") return {Act::Silu, 1.0};
  if (name == "mish") return {Act::Mish, 1.0};
  if (name == "hardswish") return {Act::Hardswish, 1.0};
  TORCH_CHECK_VALUE(false, "act must be one of identity, relu, leaky_relu, leaky_relu:<slope>, silu, mish, "
                    "hardswish; got '", name, "'");
}

// Runs `body` with `kAct` bound to the compile-time Act of `act` (an ActSpec).
#define CSP_DISPATCH_ACT(act, ...)                                                          \
  [&] {                                                                                     \
    switch ((act).kind) {                                                                   \
      case ::csp_kernels::Act::Identity: { constexpr auto kAct = ::csp_kernels::Act::Identity; return __VA_ARGS__(); } \
      case ::csp_kernels::Act::Relu: { constexpr auto kAct = ::csp_kernels::Act::Relu; return __VA_ARGS__(); }         \
      case ::csp_kernels::Act::LeakyRelu: { constexpr auto kAct = ::csp_kernels::Act::LeakyRelu; return __VA_ARGS__(); } \
      case ::csp_kernels::Act::Silu: { constexpr auto kAct = ::csp_kernels::Act::Silu; return __VA_ARGS__(); }         \
      case ::csp_kernels::Act::Mish: { constexpr auto kAct = ::csp_kernels::Act::Mish; return __VA_ARGS__(); }         \
      default: { constexpr auto kAct = ::csp_kernels::Act::Hardswish; return __VA_ARGS__(); }                          \
    }                                                                                       \
  }()

}  // namespace csp_kernels
