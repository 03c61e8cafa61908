// CUDA kernels of the Maxout pyramid; the CPU twin is cpu/maxout.cpp and the index math is
// shared through maxout_index.h. Forward: one launch, one thread per output element, grid rows
// = output planes (n, group) so writes are coalesced and a block's group is uniform. Backward:
// a deterministic gather, one launch per input: each thread owns one input element, walks the
// rectangle of output pixels that read it (nearest_first_dest, closed form) and sums the
// gradient of those its channel won, recomputing the argmax there. No atomics: the same bits
// every run, summed in the CPU kernel's order (output rows, then columns, ascending).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <utility>
#include <vector>

#include "maxout_index.h"
#include "maxout_pyramid.h"

namespace csp_kernels {
namespace {

constexpr int kThreads = 256;
// Inputs travel by value in the kernel parameters (EFM uses 3).
constexpr size_t kMaxInputs = 8;

template <typename scalar_t>
struct PyramidArgs {
  const scalar_t* data[kMaxInputs];
  PyramidInput inputs[kMaxInputs];
  MaxoutGroups groups;
  int out_h, out_w;
};

template <typename scalar_t>
PyramidArgs<scalar_t> pyramid_args(at::TensorList features, const PyramidShape& s) {
  TORCH_CHECK_VALUE(features.size() <= kMaxInputs, "the CUDA Maxout pyramid takes at most ", kMaxInputs,
                    " features; got ", features.size());
  TORCH_CHECK_VALUE(s.out_h * s.out_w <= INT_MAX, "the output plane must have fewer than 2^31 elements");
  PyramidArgs<scalar_t> a{};
  for (size_t i = 0; i < features.size(); ++i) {
    TORCH_CHECK_VALUE(s.inputs[i].plane_size() <= INT_MAX, "features[", i, "]'s planes must have fewer than 2^31 elements");
    a.data[i] = features[i].const_data_ptr<scalar_t>();
    a.inputs[i] = s.inputs[i];
  }
  a.groups = s.groups;
  a.out_h = static_cast<int>(s.out_h);
  a.out_w = static_cast<int>(s.out_w);
  return a;
}

// Grid rows are planes, columns cover a plane in blocks of kThreads (grid-stride past 65535).
dim3 plane_grid(int64_t planes, int64_t plane_size) {
  TORCH_CHECK_VALUE(planes <= INT_MAX, "too many (batch, channel) planes for one launch: ", planes);
  const int64_t chunks = (plane_size + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(planes), static_cast<unsigned>(std::min<int64_t>(chunks, 65535)));
}

template <typename scalar_t>
struct Winner {
  scalar_t value;
  int64_t member;
};

// The member of `group` that output pixel (oy, ox) of batch n takes, scanning members in
// ascending channel order with a strict `>`: ties keep the lowest channel, a NaN wins only as
// the first member (the reference's torch.where chain).
template <typename scalar_t>
__device__ Winner<scalar_t> group_winner(const PyramidArgs<scalar_t>& a, int64_t n, int64_t group, int oy, int ox) {
  Winner<scalar_t> best{};
  int input = 0;
  for (int64_t j = 0; j < a.groups.group_size; ++j) {
    const int64_t channel = a.groups.channel(group, j);
    input = advance_to_channel(a.inputs, input, channel);
    const PyramidInput& in = a.inputs[input];
    const scalar_t v = a.data[input][in.plane_offset(n, channel) + in.source_offset(oy, ox)];
    if (j == 0 || v > best.value) best = {v, j};
  }
  return best;
}

template <typename scalar_t>
__global__ void maxout_pyramid_forward_kernel(const __grid_constant__ PyramidArgs<scalar_t> a,
                                              scalar_t* __restrict__ out) {
  const int64_t plane = blockIdx.x;
  const int64_t n = plane / a.groups.out_channels, group = plane % a.groups.out_channels;
  const int plane_size = a.out_h * a.out_w;
  scalar_t* out_plane = out + plane * plane_size;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < plane_size; i += gridDim.y * blockDim.x) {
    const int oy = i / a.out_w, ox = i - oy * a.out_w;
    out_plane[i] = group_winner(a, n, group, oy, ox).value;
  }
}

// grad_in: contiguous gradient of input `input`, (N, C_input, H_input, W_input).
template <typename scalar_t>
__global__ void maxout_pyramid_backward_kernel(const __grid_constant__ PyramidArgs<scalar_t> a, int input,
                                               const scalar_t* __restrict__ grad_out, PlaneLayout G,
                                               scalar_t* __restrict__ grad_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const PyramidInput& in = a.inputs[input];
  const int64_t plane = blockIdx.x, n = plane / in.channels;
  const int64_t channel = in.channel_offset + plane % in.channels;
  const int64_t group = a.groups.group_of(channel), member = a.groups.member_of(channel);
  const scalar_t* grad_plane = grad_out + n * G.batch_stride + group * G.channel_stride;
  const int width = static_cast<int>(in.cols.in), plane_size = static_cast<int>(in.plane_size());
  scalar_t* grad_in_plane = grad_in + plane * plane_size;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < plane_size; i += gridDim.y * blockDim.x) {
    const int y = i / width, x = i - y * width;
    const int oy_begin = static_cast<int>(nearest_first_dest(in.rows, y));
    const int oy_end = static_cast<int>(nearest_first_dest(in.rows, y + 1));
    const int ox_begin = static_cast<int>(nearest_first_dest(in.cols, x));
    const int ox_end = static_cast<int>(nearest_first_dest(in.cols, x + 1));
    acc_t sum = 0;
    for (int oy = oy_begin; oy < oy_end; ++oy) {
      for (int ox = ox_begin; ox < ox_end; ++ox) {
        if (group_winner(a, n, group, oy, ox).member == member) {
          sum += static_cast<acc_t>(grad_plane[oy * a.out_w + ox]);
        }
      }
    }
    grad_in_plane[i] = static_cast<scalar_t>(sum);
  }
}

at::Tensor maxout_pyramid_forward_cuda(at::TensorList features, int64_t out_h, int64_t out_w, int64_t out_channels,
                                       bool interleaved) {
  const PyramidShape s = pyramid_shape(features, out_h, out_w, out_channels, interleaved);
  const c10::cuda::CUDAGuard guard(features[0].device());
  at::Tensor out = at::empty({s.batch, out_channels, out_h, out_w}, features[0].options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "maxout_pyramid_forward_cuda",
                                  [&] {
                                    maxout_pyramid_forward_kernel<scalar_t>
                                        <<<plane_grid(s.batch * out_channels, out_h * out_w), kThreads, 0,
                                           at::cuda::getCurrentCUDAStream()>>>(pyramid_args<scalar_t>(features, s),
                                                                              out.mutable_data_ptr<scalar_t>());
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
  return out;
}

std::vector<at::Tensor> maxout_pyramid_backward_cuda(const at::Tensor& grad_out, at::TensorList features,
                                                     int64_t out_channels, bool interleaved) {
  const std::pair<PyramidShape, PlaneLayout> shape = pyramid_backward_shape(grad_out, features, out_channels, interleaved);
  const PyramidShape& s = shape.first;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  std::vector<at::Tensor> grads;
  for (const at::Tensor& x : features) grads.push_back(at::empty(x.sizes(), x.options()));
  if (grad_out.numel() == 0) return grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "maxout_pyramid_backward_cuda",
                                  [&] {
                                    const PyramidArgs<scalar_t> args = pyramid_args<scalar_t>(features, s);
                                    for (size_t i = 0; i < features.size(); ++i) {
                                      if (grads[i].numel() == 0) continue;
                                      maxout_pyramid_backward_kernel<scalar_t>
                                          <<<plane_grid(s.batch * s.inputs[i].channels, s.inputs[i].plane_size()),
                                             kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                                              args, static_cast<int>(i), grad_out.const_data_ptr<scalar_t>(),
                                              shape.second, grads[i].mutable_data_ptr<scalar_t>());
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    }
                                  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CUDA, m) {
  m.impl("maxout_pyramid_forward", &maxout_pyramid_forward_cuda);
  m.impl("maxout_pyramid_backward", &maxout_pyramid_backward_cuda);
}

}  // namespace csp_kernels
