// Index math of the Maxout pyramid, shared by the CPU and CUDA kernels: which source pixel of a
// resized input an output pixel reads, which output pixels read a given source pixel, and where
// a concatenated channel sits in its Maxout group.
#pragma once

#include <c10/macros/Macros.h>

#include <math.h>
#include <cstdint>

namespace csp_kernels {

// One axis of a nearest-neighbour resize: `in` source positions spread over `out` destinations.
struct NearestAxis {
  int64_t in, out;
  float scale;  // in / out in float32, as ATen's compute_scales_value<float> (no scale_factor)
};

inline NearestAxis nearest_axis(int64_t in, int64_t out) {
  return {in, out, static_cast<float>(in) / out};
}

// The source position destination `dst` reads: ATen's nearest_idx (F.interpolate(mode="nearest")
// with `size=`), its float32 rounding and its identity / exact-2x shortcuts included, so the
// result is bit-identical to PyTorch's for every ratio.
C10_HOST_DEVICE inline int64_t nearest_source(const NearestAxis& axis, int64_t dst) {
  if (axis.out == axis.in) return dst;
  if (axis.out == 2 * axis.in) return dst >> 1;
  const int64_t src = static_cast<int64_t>(floorf(dst * axis.scale));
  return src < axis.in - 1 ? src : axis.in - 1;
}

// The first destination whose source is >= src (axis.out if none). nearest_source never
// decreases with dst (a rounded product of a growing integer by a fixed float), so the
// destinations reading source `src` are exactly [nearest_first_dest(src), nearest_first_dest(src + 1)).
C10_HOST_DEVICE inline int64_t nearest_first_dest(const NearestAxis& axis, int64_t src) {
  if (src <= 0) return 0;
  if (src >= axis.in) return axis.out;
  // ceil(src * out / in) with exact integers; float rounding moves the truth by a step at most.
  int64_t dst = (src * axis.out + axis.in - 1) / axis.in;
  while (dst > 0 && nearest_source(axis, dst - 1) >= src) --dst;
  while (dst < axis.out && nearest_source(axis, dst) < src) ++dst;
  return dst;
}

// Channel Maxout over the concatenation of the inputs: out_channels groups of group_size members.
// interleaved (darknet): member j of group g is concatenated channel g + j * out_channels;
// contiguous: g * group_size + j. Either way members of a group ascend in channel with j.
struct MaxoutGroups {
  int64_t out_channels, group_size;
  bool interleaved;

  C10_HOST_DEVICE int64_t channel(int64_t group, int64_t member) const {
    return interleaved ? group + member * out_channels : group * group_size + member;
  }
  C10_HOST_DEVICE int64_t group_of(int64_t channel) const {
    return interleaved ? channel % out_channels : channel / group_size;
  }
  C10_HOST_DEVICE int64_t member_of(int64_t channel) const {
    return interleaved ? channel / out_channels : channel % group_size;
  }
};

// One input of the pyramid: a (batch, channels, height, width) map with contiguous planes,
// holding concatenated channels [channel_offset, channel_offset + channels).
struct PyramidInput {
  int64_t channel_offset, channels;
  int64_t batch_stride, channel_stride;
  NearestAxis rows, cols;  // rows.in = height, cols.in = width (also the row stride)

  C10_HOST_DEVICE int64_t plane_offset(int64_t n, int64_t channel) const {
    return n * batch_stride + (channel - channel_offset) * channel_stride;
  }
  C10_HOST_DEVICE int64_t plane_size() const { return rows.in * cols.in; }
  // Element of the plane read by output pixel (oy, ox).
  C10_HOST_DEVICE int64_t source_offset(int64_t oy, int64_t ox) const {
    return nearest_source(rows, oy) * cols.in + nearest_source(cols, ox);
  }
  C10_HOST_DEVICE bool same_size() const { return rows.in == rows.out && cols.in == cols.out; }
};

// Advances `input` (an index into `inputs`) to the input holding concatenated channel
// `channel`; callers visit channels in ascending order, so the scan is amortized over a group.
C10_HOST_DEVICE inline int advance_to_channel(const PyramidInput* inputs, int input, int64_t channel) {
  while (channel >= inputs[input].channel_offset + inputs[input].channels) ++input;
  return input;
}

}  // namespace csp_kernels
