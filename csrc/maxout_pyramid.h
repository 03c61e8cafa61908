// Host-side argument checks of the Maxout pyramid ops and the per-input descriptors the CPU and
// CUDA kernels index with (csrc/maxout_index.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "maxout_index.h"
#include "plane_layout.h"

namespace csp_kernels {

struct PyramidShape {
  std::vector<PyramidInput> inputs;
  MaxoutGroups groups;
  int64_t batch, out_h, out_w;
};

// Checks `features` (each (N, C_i, H_i, W_i), contiguous planes, one batch size, dtype and
// device) against an (N, out_channels, out_h, out_w) output and describes each input.
inline PyramidShape pyramid_shape(at::TensorList features, int64_t out_h, int64_t out_w, int64_t out_channels,
                                  bool interleaved) {
  TORCH_CHECK_VALUE(!features.empty(), "features must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(out_h > 0 && out_w > 0, "the output size must be positive; got (", out_h, ", ", out_w, ")");
  TORCH_CHECK_VALUE(out_channels > 0, "out_channels must be positive; got ", out_channels);
  const at::Tensor& first = features[0];
  PyramidShape shape{{}, {}, first.dim() == 4 ? first.size(0) : 0, out_h, out_w};
  int64_t total_channels = 0;
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& x = features[i];
    const std::string name = "features[" + std::to_string(i) + "]";
    const PlaneLayout L = plane_layout(x, name.c_str());
    TORCH_CHECK_VALUE(L.batch == shape.batch, "features must all have the same batch size (dim 0); ", name,
                      " has ", L.batch, ", features[0] has ", shape.batch);
    TORCH_CHECK_TYPE(x.scalar_type() == first.scalar_type(), name, " must have dtype ", first.scalar_type(),
                     " like features[0]; got ", x.scalar_type());
    TORCH_CHECK_VALUE(x.device() == first.device(), name, " must be on ", first.device(),
                      " like features[0]; got ", x.device());
    TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, name, " must have a positive height and width; got shape ",
                      x.sizes());
    shape.inputs.push_back({total_channels, L.channels, L.batch_stride, L.channel_stride,
                            nearest_axis(x.size(2), out_h), nearest_axis(x.size(3), out_w)});
    total_channels += L.channels;
  }
  TORCH_CHECK_VALUE(total_channels > 0 && total_channels % out_channels == 0, "the features' total channels (",
                    total_channels, ") must be a positive multiple of out_channels; got out_channels=", out_channels);
  shape.groups = {out_channels, total_channels / out_channels, interleaved};
  return shape;
}

// The shape of a backward call (its output size is grad_out's) and the layout of grad_out,
// the gradient of the pyramid output.
inline std::pair<PyramidShape, PlaneLayout> pyramid_backward_shape(const at::Tensor& grad_out,
                                                                    at::TensorList features, int64_t out_channels,
                                                                    bool interleaved) {
  const PlaneLayout G = plane_layout(grad_out, "grad_out");
  PyramidShape shape = pyramid_shape(features, grad_out.size(2), grad_out.size(3), out_channels, interleaved);
  TORCH_CHECK_VALUE(G.batch == shape.batch && G.channels == out_channels, "grad_out must have shape (",
                    shape.batch, ", ", out_channels, ", height, width); got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == features[0].scalar_type(), "grad_out must have the features' dtype ",
                   features[0].scalar_type(), "; got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == features[0].device(), "grad_out must be on ", features[0].device(),
                    "; got ", grad_out.device());
  return {std::move(shape), G};
}

}  // namespace csp_kernels
