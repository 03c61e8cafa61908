"""Activation math for Triton kernels, the twin of csrc/activation.h.

`ACT_CODES` maps an activation name to the constexpr code the kernels take; the codes are the
values of `enum class Act` in csrc/activation.h. Compute in float32 (float64 for float64 data).
"""
import triton
import triton.language as tl

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "mish": 4, "hardswish": 5}
LEAKY_SLOPE = tl.constexpr(0.1)  # darknet's slope, csrc/activation.h kLeakySlope
# Past this, PyTorch's softplus returns its input, so mish(u) = u * tanh(u) = u in float.
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


def act_code(act: str) -> int:
    """The kernels' constexpr code of activation `act`."""
    return ACT_CODES[act]


@triton.jit
def _tanh_softplus(u):
    # tanh(log1p(e^u)) = n / (n + 2) with n = e^u (e^u + 2): no log1p (Triton has none) and
    # no cancellation for negative u. Clamped so e^u never overflows; callers pick u itself
    # past the threshold, as csrc/activation.h does.
    e = tl.exp(tl.minimum(u, SOFTPLUS_THRESHOLD))
    n = e * (e + 2.0)
    return n / (n + 2.0)


@triton.jit
def act_forward(u, ACT: tl.constexpr):
    """act(u) for the activation with code ACT."""
    if ACT == 1:
        y = tl.where(u > 0, u, 0.0)
    elif ACT == 2:
        y = tl.where(u > 0, u, u * LEAKY_SLOPE)
    elif ACT == 3:
        y = u / (1.0 + tl.exp(-u))
    elif ACT == 4:
        y = tl.where(u > SOFTPLUS_THRESHOLD, u, u * _tanh_softplus(u))
    elif ACT == 5:
        y = u * tl.minimum(tl.maximum(u + 3.0, 0.0), 6.0) / 6.0
    else:
        y = u
    return y


@triton.jit
def act_derivative(u, ACT: tl.constexpr):
    """d act(u) / du, with PyTorch's values at the kinks: relu'(0) = 0, leaky_relu'(0) = slope,
    hardswish'(-3) = 0, hardswish'(3) = 1."""
    one = tl.full(u.shape, 1.0, u.dtype)
    if ACT == 1:
        d = tl.where(u > 0, one, 0.0)
    elif ACT == 2:
        # A full tensor, not a literal: a float32 0.1 would be off by 1.5e-9 for float64 data.
        d = tl.where(u > 0, one, tl.full(u.shape, LEAKY_SLOPE, u.dtype))
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-u))
        d = s * (1.0 + u * (1.0 - s))
    elif ACT == 4:
        t = tl.where(u > SOFTPLUS_THRESHOLD, one, _tanh_softplus(u))
        s = 1.0 / (1.0 + tl.exp(-u))
        d = t + u * s * (1.0 - t * t)
    elif ACT == 5:
        d = tl.where(u <= -3.0, 0.0, tl.where(u < 3.0, u / 3.0 + 0.5, one))
    else:
        d = one
    return d
