// The memory layout the elementwise and reduction kernels accept: a 4-D (N, C, H, W) tensor,
// possibly a channel slice of a larger buffer, whose every (n, c) plane is H*W contiguous
// elements, the planes of one sample at least H*W apart (the GEMMs' leading dimension; an expand
// over channels, stride 0, is refused). Batch strides are free, which with the channel stride is
// what lets the dense block read and write channel ranges of its concat buffer in place. The
// Python side (csp_kernels.ops.batch_norm_act.planes_contiguous) makes the same judgement and
// copies what fails it; a written tensor's samples must not overlap either, which it checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

namespace csp_kernels {

struct PlaneLayout {
  int64_t batch, channels, plane;    // N, C, H*W
  int64_t batch_stride, channel_stride;
};

inline PlaneLayout plane_layout(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must be 4-D (batch, channels, height, width); got ", x.dim(), "-D");
  const int64_t H = x.size(2), W = x.size(3);
  const bool planes_contiguous = (W == 1 || x.stride(3) == 1) && (H == 1 || x.stride(2) == W) &&
                                 (x.size(1) <= 1 || x.stride(1) >= H * W);
  TORCH_CHECK_VALUE(planes_contiguous, name, " must have contiguous (height, width) planes, each channel's "
                    "apart (NCHW or a channel slice of an NCHW tensor); got strides ", x.strides());
  return {x.size(0), x.size(1), H * W, x.stride(0), x.stride(1)};
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), name_a, " and ", name_b, " must have the same shape; got ",
                    a.sizes(), " and ", b.sizes());
}

// Two tensors read or written together (z and grad_y, x and out): same shape, same dtype.
inline std::pair<PlaneLayout, PlaneLayout> paired_layouts(const at::Tensor& a, const char* name_a,
                                                          const at::Tensor& b, const char* name_b) {
  const PlaneLayout la = plane_layout(a, name_a), lb = plane_layout(b, name_b);
  check_same_shape(a, b, name_a, name_b);
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), name_b, " must have ", name_a, "'s dtype ", a.scalar_type(),
                   "; got ", b.scalar_type());
  return {la, lb};
}

// Per-channel statistics and BN parameters are float32, or float64 for float64 data.
inline at::ScalarType stats_dtype(at::ScalarType data) {
  return data == at::kDouble ? at::kDouble : at::kFloat;
}

// The C++ type of those per-channel vectors for data of type scalar_t.
template <typename scalar_t>
using stat_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct NamedTensor {
  const at::Tensor& tensor;
  const char* name;
};

// Per-channel vectors (statistics, BN affine parameters) of the data tensor x.
inline void check_per_channel_args(const at::Tensor& x, std::initializer_list<NamedTensor> args) {
  const at::ScalarType dtype = stats_dtype(x.scalar_type());
  for (const NamedTensor& arg : args) {
    const at::Tensor& v = arg.tensor;
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == x.size(1) && v.is_contiguous(), arg.name,
                      " must be a contiguous 1-D tensor of ", x.size(1), " per-channel values; got shape ", v.sizes());
    TORCH_CHECK_TYPE(v.scalar_type() == dtype, arg.name, " must be ", dtype, " for ", x.scalar_type(),
                     " data; got ", v.scalar_type());
    TORCH_CHECK_VALUE(v.device() == x.device(), arg.name, " must be on ", x.device(), "; got ", v.device());
  }
}

}  // namespace csp_kernels
