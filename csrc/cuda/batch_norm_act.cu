// CUDA kernels of the BatchNorm + activation family; the CPU twins are in cpu/batch_norm_act.cpp
// and the per-element math is shared through batch_norm_act.h. Reductions: a 2-D grid over
// (channel, chunk of samples), so that a layer of a few dozen channels still fills every SM, each
// block writing its partial sums, then a finish kernel that adds each channel's partials in a fixed
// order (deterministic). Elementwise passes: one grid row per (n, c) plane, so index math stays
// per plane, with 16-byte loads and stores where the planes allow (`vectorizable`).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <utility>

#include "batch_norm_act.h"
#include "block_reduce.cuh"
#include "dense_args.h"
#include "plane_layout.h"

namespace csp_kernels {
namespace {

constexpr int kElementwiseThreads = 256;

dim3 plane_grid(const PlaneLayout& L) {
  const int64_t chunks = (L.plane + kElementwiseThreads * 4 - 1) / (kElementwiseThreads * 4);
  return dim3(static_cast<unsigned>(L.batch * L.channels), static_cast<unsigned>(std::min<int64_t>(chunks, 65535)));
}

// The elementwise passes move 16 bytes per load and store where every plane of every tensor they
// touch starts 16-byte aligned and holds a whole number of 16-byte vectors (NCHW with H*W a
// multiple of 4 floats or 8 halves: nearly every CNN map); else one element at a time.
template <typename scalar_t>
constexpr int kVector = 16 / sizeof(scalar_t);

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Vector {
  scalar_t v[N];
};

template <typename scalar_t>
bool vectorizable(std::initializer_list<std::pair<const void*, PlaneLayout>> tensors) {
  constexpr int64_t n = kVector<scalar_t>;
  for (const auto& [data, layout] : tensors) {
    if (reinterpret_cast<uintptr_t>(data) % 16 != 0 || layout.plane % n != 0 || layout.batch_stride % n != 0 ||
        layout.channel_stride % n != 0) {
      return false;
    }
  }
  return true;
}

// How a per-channel reduction is split: `chunks` blocks per channel, chunk k covering samples
// [k * samples_per_chunk, ...). Enough blocks to fill the GPU a few times over, no more chunks
// than samples.
struct ReduceSplit {
  int64_t chunks, samples_per_chunk;
};

ReduceSplit reduce_split(const PlaneLayout& L) {
  const int64_t target_blocks = 4 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = std::max<int64_t>(1, (target_blocks + L.channels - 1) / std::max<int64_t>(L.channels, 1));
  const int64_t chunks = std::min<int64_t>(std::max<int64_t>(L.batch, 1), wanted);
  const int64_t per = (L.batch + chunks - 1) / chunks;
  return {(L.batch + per - 1) / per, per};
}

// Which sample of its chunk the chunk's i-th value is in: a 32-bit division when the chunk has
// fewer than 2^32 values (almost always), since a 64-bit one costs several times more.
__device__ inline int64_t chunk_sample(int64_t i, int64_t plane, bool small) {
  return small ? static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(plane)) : i / plane;
}

template <typename scalar_t>
__global__ void channel_stats_partial_kernel(const scalar_t* __restrict__ x, PlaneLayout L, ReduceSplit split,
                                             double* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x, k = blockIdx.y;
  const int64_t n0 = k * split.samples_per_chunk, n1 = std::min(L.batch, n0 + split.samples_per_chunk);
  const int64_t count = (n1 - n0) * L.plane;
  const bool small = count < (int64_t(1) << 32);
  const scalar_t* base = x + c * L.channel_stride;
  // Shifted sums (see the CPU twin), one pivot per channel shared by all its chunks: exact
  // enough in acc_t per thread, totals in double.
  const acc_t pivot = static_cast<acc_t>(base[0]);
  acc_t s = 0, ss = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const int64_t n = chunk_sample(i, L.plane, small);
    const acc_t d = static_cast<acc_t>(base[(n0 + n) * L.batch_stride + (i - n * L.plane)]) - pivot;
    s += d;
    ss += d * d;
  }
  double sum = s, sum_sq = ss;
  block_sum2(sum, sum_sq);
  if (threadIdx.x == 0) {
    partial[2 * (c * split.chunks + k)] = sum;
    partial[2 * (c * split.chunks + k) + 1] = sum_sq;
  }
}

template <typename scalar_t>
__global__ void channel_stats_finish_kernel(const scalar_t* __restrict__ x, PlaneLayout L, ReduceSplit split,
                                            const double* partial, stat_of<scalar_t>* mean,
                                            stat_of<scalar_t>* var) {
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= L.channels) return;
  double sum = 0, sum_sq = 0;
  for (int64_t k = 0; k < split.chunks; ++k) {
    sum += partial[2 * (c * split.chunks + k)];
    sum_sq += partial[2 * (c * split.chunks + k) + 1];
  }
  const double count = static_cast<double>(L.batch * L.plane);
  const double pivot = static_cast<double>(static_cast<at::opmath_type<scalar_t>>(x[c * L.channel_stride]));
  const double shifted_mean = sum / count;
  mean[c] = static_cast<stat_of<scalar_t>>(pivot + shifted_mean);
  var[c] = static_cast<stat_of<scalar_t>>(fmax(sum_sq / count - shifted_mean * shifted_mean, 0.0));
}

template <typename scalar_t, Act A, int N>
__global__ void scale_shift_act_kernel(const scalar_t* __restrict__ x, PlaneLayout L, scalar_t* out, PlaneLayout O,
                                       const stat_of<scalar_t>* __restrict__ scale,
                                       const stat_of<scalar_t>* __restrict__ shift, double slope_) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vector<scalar_t, N>;
  const acc_t slope = static_cast<acc_t>(slope_);
  const int64_t n = blockIdx.x / L.channels, c = blockIdx.x % L.channels;
  const vec_t* src = reinterpret_cast<const vec_t*>(x + n * L.batch_stride + c * L.channel_stride);
  vec_t* dst = reinterpret_cast<vec_t*>(out + n * O.batch_stride + c * O.channel_stride);
  const acc_t a = scale[c], b = shift[c];
  for (int64_t i = blockIdx.y * blockDim.x + threadIdx.x; i < L.plane / N; i += gridDim.y * blockDim.x) {
    vec_t v = src[i];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v.v[k] = static_cast<scalar_t>(act_forward<A>(static_cast<acc_t>(v.v[k]) * a + b, slope));
    }
    dst[i] = v;
  }
}

// See the CPU twin: partial sums of dpre and dpre * xhat per (channel, chunk); with kAccumulate
// also grad_acc += weight * dpre (the dense block's shared BN-input gradient buffer, of grad_t:
// scalar_t, or float for 16-bit data).
template <typename scalar_t, Act A, bool kAccumulate, typename grad_t>
__global__ void bn_act_backward_partial_kernel(const scalar_t* __restrict__ grad_y, PlaneLayout G,
                                               const scalar_t* __restrict__ z, PlaneLayout L, ReduceSplit split,
                                               const stat_of<scalar_t>* mean, const stat_of<scalar_t>* invstd,
                                               const stat_of<scalar_t>* weight, const stat_of<scalar_t>* bias,
                                               double* partial, grad_t* grad_acc, PlaneLayout ACC, double slope_) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x, k = blockIdx.y;
  const int64_t n0 = k * split.samples_per_chunk, n1 = std::min(L.batch, n0 + split.samples_per_chunk);
  const int64_t count = (n1 - n0) * L.plane;
  const bool small = count < (int64_t(1) << 32);
  const acc_t m = mean[c], inv = invstd[c], w = weight[c], b = bias[c], slope = static_cast<acc_t>(slope_);
  const scalar_t* zc = z + c * L.channel_stride;
  const scalar_t* gc = grad_y + c * G.channel_stride;
  acc_t s = 0, sx = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const int64_t n = chunk_sample(i, L.plane, small);
    const int64_t p = i - n * L.plane;
    const acc_t xhat = (static_cast<acc_t>(zc[(n0 + n) * L.batch_stride + p]) - m) * inv;
    const acc_t dpre = bn_act_grad_pre<A>(static_cast<acc_t>(gc[(n0 + n) * G.batch_stride + p]), xhat, w, b, slope);
    if constexpr (kAccumulate) {
      grad_t* acc = grad_acc + (n0 + n) * ACC.batch_stride + c * ACC.channel_stride + p;
      *acc = static_cast<grad_t>(static_cast<acc_t>(*acc) + w * dpre);
    }
    s += dpre;
    sx += dpre * xhat;
  }
  double total = s, total_xhat = sx;
  block_sum2(total, total_xhat);
  if (threadIdx.x == 0) {
    partial[2 * (c * split.chunks + k)] = total;
    partial[2 * (c * split.chunks + k) + 1] = total_xhat;
  }
}

template <typename stat_t>
__global__ void sum_partials_kernel(const double* partial, int64_t channels, ReduceSplit split, stat_t* first,
                                    stat_t* second) {
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double a = 0, b = 0;
  for (int64_t k = 0; k < split.chunks; ++k) {
    a += partial[2 * (c * split.chunks + k)];
    b += partial[2 * (c * split.chunks + k) + 1];
  }
  first[c] = static_cast<stat_t>(a);
  second[c] = static_cast<stat_t>(b);
}

constexpr int kFinishThreads = 128;

unsigned finish_blocks(int64_t channels) {
  return static_cast<unsigned>((channels + kFinishThreads - 1) / kFinishThreads);
}

// (2 * channels * chunks) doubles for the partial sums of a reduction split as `split`.
at::Tensor partial_sums(const at::Tensor& like, int64_t channels, const ReduceSplit& split) {
  return at::empty({2 * channels * split.chunks}, like.options().dtype(at::kDouble));
}

// dpre and dpre * xhat summed per channel (and, with grad_acc, accumulated into it): the partial
// kernel over (channel, chunk), then the finish.
template <typename scalar_t, Act A, bool kAccumulate, typename grad_t = scalar_t>
void bn_act_backward_sums(const at::Tensor& grad_y, const PlaneLayout& G, const at::Tensor& z, const PlaneLayout& L,
                          const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& sum_dpre, const at::Tensor& sum_dpre_xhat,
                          grad_t* grad_acc, const PlaneLayout& ACC, double slope) {
  using stat_t = stat_of<scalar_t>;
  const ReduceSplit split = reduce_split(L);
  at::Tensor partial = partial_sums(z, L.channels, split);
  const auto stream = at::cuda::getCurrentCUDAStream();
  bn_act_backward_partial_kernel<scalar_t, A, kAccumulate, grad_t>
      <<<dim3(static_cast<unsigned>(L.channels), static_cast<unsigned>(split.chunks)), kReduceThreads, 0, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), G, z.const_data_ptr<scalar_t>(), L, split,
          mean.const_data_ptr<stat_t>(), invstd.const_data_ptr<stat_t>(), weight.const_data_ptr<stat_t>(),
          bias.const_data_ptr<stat_t>(), partial.mutable_data_ptr<double>(), grad_acc, ACC, slope);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_partials_kernel<stat_t><<<finish_blocks(L.channels), kFinishThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), L.channels, split, sum_dpre.mutable_data_ptr<stat_t>(),
      sum_dpre_xhat.mutable_data_ptr<stat_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, Act A, int N>
__global__ void bn_act_backward_apply_kernel(const scalar_t* __restrict__ grad_y, PlaneLayout G,
                                             const scalar_t* __restrict__ z, PlaneLayout L, scalar_t* grad_z,
                                             const stat_of<scalar_t>* mean, const stat_of<scalar_t>* invstd,
                                             const stat_of<scalar_t>* weight, const stat_of<scalar_t>* bias,
                                             const stat_of<scalar_t>* sum_dpre,
                                             const stat_of<scalar_t>* sum_dpre_xhat, double slope_) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vector<scalar_t, N>;
  const acc_t slope = static_cast<acc_t>(slope_);
  const int64_t n = blockIdx.x / L.channels, c = blockIdx.x % L.channels;
  const vec_t* zp = reinterpret_cast<const vec_t*>(z + n * L.batch_stride + c * L.channel_stride);
  const vec_t* gp = reinterpret_cast<const vec_t*>(grad_y + n * G.batch_stride + c * G.channel_stride);
  vec_t* out = reinterpret_cast<vec_t*>(grad_z + blockIdx.x * L.plane);
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(L.batch * L.plane);
  const acc_t m = mean[c], inv = invstd[c], w = weight[c], b = bias[c];
  const acc_t mean_dpre = sum_dpre[c] * inv_count, mean_dpre_xhat = sum_dpre_xhat[c] * inv_count;
  for (int64_t i = blockIdx.y * blockDim.x + threadIdx.x; i < L.plane / N; i += gridDim.y * blockDim.x) {
    const vec_t zv = zp[i], gv = gp[i];
    vec_t r;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t xhat = (static_cast<acc_t>(zv.v[k]) - m) * inv;
      const acc_t dpre = bn_act_grad_pre<A>(static_cast<acc_t>(gv.v[k]), xhat, w, b, slope);
      r.v[k] = static_cast<scalar_t>(bn_grad_input(dpre, xhat, w, inv, mean_dpre, mean_dpre_xhat));
    }
    out[i] = r;
  }
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& x) {
  const PlaneLayout L = plane_layout(x, "x");
  TORCH_CHECK_VALUE(L.batch * L.plane > 0, "x must have at least one element per channel; got shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({L.channels}, opts), var = at::empty({L.channels}, opts);
  if (L.channels == 0) return {mean, var};
  const ReduceSplit split = reduce_split(L);
  at::Tensor partial = partial_sums(x, L.channels, split);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cuda", [&] {
    channel_stats_partial_kernel<scalar_t>
        <<<dim3(static_cast<unsigned>(L.channels), static_cast<unsigned>(split.chunks)), kReduceThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), L, split, partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_stats_finish_kernel<scalar_t><<<finish_blocks(L.channels), kFinishThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), L, split, partial.const_data_ptr<double>(),
        mean.mutable_data_ptr<stat_of<scalar_t>>(), var.mutable_data_ptr<stat_of<scalar_t>>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

void scale_shift_act_out_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                              c10::string_view act_name, const at::Tensor& out) {
  PlaneLayout L, O;
  std::tie(L, O) = paired_layouts(x, "x", out, "out");
  check_per_channel_args(x, {{scale, "scale"}, {shift, "shift"}});
  const ActSpec act = parse_act(std::string(act_name));
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_shift_act_cuda", [&] {
    const bool wide = vectorizable<scalar_t>({{x.const_data_ptr(), L}, {out.const_data_ptr(), O}});
    CSP_DISPATCH_ACT(act, [&] {
      const auto launch = [&](auto kernel) {
        kernel<<<plane_grid(L), kElementwiseThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), L, out.mutable_data_ptr<scalar_t>(), O,
            scale.const_data_ptr<stat_of<scalar_t>>(), shift.const_data_ptr<stat_of<scalar_t>>(), act.slope);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (wide) {
        launch(scale_shift_act_kernel<scalar_t, kAct, kVector<scalar_t>>);
      } else {
        launch(scale_shift_act_kernel<scalar_t, kAct, 1>);
      }
    });
  });
}

at::Tensor scale_shift_act_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                c10::string_view act) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  scale_shift_act_out_cuda(x, scale, shift, act, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, c10::string_view act_name) {
  PlaneLayout L, G;
  std::tie(L, G) = paired_layouts(z, "z", grad_y, "grad_y");
  check_per_channel_args(z, {{mean, "mean"}, {invstd, "invstd"}, {weight, "weight"}, {bias, "bias"}});
  const ActSpec act = parse_act(std::string(act_name));
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor sum_dpre = at::empty_like(mean), sum_dpre_xhat = at::empty_like(mean);
  if (L.channels == 0) return {sum_dpre, sum_dpre_xhat};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_backward_reduce_cuda", [&] {
    CSP_DISPATCH_ACT(act, [&] {
      bn_act_backward_sums<scalar_t, kAct, false>(grad_y, G, z, L, mean, invstd, weight, bias, sum_dpre,
                                                  sum_dpre_xhat, static_cast<scalar_t*>(nullptr), PlaneLayout{},
                                                  act.slope);
    });
  });
  return {sum_dpre, sum_dpre_xhat};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_accumulate_cuda(
    const at::Tensor& grad_a, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, c10::string_view act_name, const at::Tensor& grad_acc) {
  const AccumulateLayouts layouts = check_accumulate_args(grad_a, x, mean, invstd, weight, bias, grad_acc);
  const PlaneLayout &L = layouts.x, &GA = layouts.grad_a, &ACC = layouts.grad_acc;
  const ActSpec act = parse_act(std::string(act_name));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor sum_dpre = at::empty_like(mean), sum_dpre_xhat = at::empty_like(mean);
  if (L.channels == 0) return {sum_dpre, sum_dpre_xhat};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_accumulate_cuda", [&] {
    with_grad_acc_type<scalar_t>(grad_acc, [&](auto* type) {
      using grad_t = std::remove_pointer_t<decltype(type)>;
      CSP_DISPATCH_ACT(act, [&] {
        bn_act_backward_sums<scalar_t, kAct, true, grad_t>(grad_a, GA, x, L, mean, invstd, weight, bias, sum_dpre,
                                                           sum_dpre_xhat, grad_acc.mutable_data_ptr<grad_t>(), ACC,
                                                           act.slope);
      });
    });
  });
  return {sum_dpre, sum_dpre_xhat};
}

at::Tensor bn_act_backward_apply_cuda(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& sum_dpre,
    const at::Tensor& sum_dpre_xhat, c10::string_view act_name) {
  PlaneLayout L, G;
  std::tie(L, G) = paired_layouts(z, "z", grad_y, "grad_y");
  check_per_channel_args(z, {{mean, "mean"}, {invstd, "invstd"}, {weight, "weight"}, {bias, "bias"},
                             {sum_dpre, "sum_dpre"}, {sum_dpre_xhat, "sum_dpre_xhat"}});
  const ActSpec act = parse_act(std::string(act_name));
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor grad_z = at::empty(z.sizes(), z.options());
  if (z.numel() == 0) return grad_z;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_act_backward_apply_cuda", [&] {
    using stat_t = stat_of<scalar_t>;
    const PlaneLayout out_layout{L.batch, L.channels, L.plane, L.channels * L.plane, L.plane};
    const bool wide = vectorizable<scalar_t>(
        {{grad_y.const_data_ptr(), G}, {z.const_data_ptr(), L}, {grad_z.const_data_ptr(), out_layout}});
    CSP_DISPATCH_ACT(act, [&] {
      const auto launch = [&](auto kernel) {
        kernel<<<plane_grid(L), kElementwiseThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            grad_y.const_data_ptr<scalar_t>(), G, z.const_data_ptr<scalar_t>(), L,
            grad_z.mutable_data_ptr<scalar_t>(), mean.const_data_ptr<stat_t>(), invstd.const_data_ptr<stat_t>(),
            weight.const_data_ptr<stat_t>(), bias.const_data_ptr<stat_t>(), sum_dpre.const_data_ptr<stat_t>(),
            sum_dpre_xhat.const_data_ptr<stat_t>(), act.slope);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (wide) {
        launch(bn_act_backward_apply_kernel<scalar_t, kAct, kVector<scalar_t>>);
      } else {
        launch(bn_act_backward_apply_kernel<scalar_t, kAct, 1>);
      }
    });
  });
  return grad_z;
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CUDA, m) {
  m.impl("channel_stats", &channel_stats_cuda);
  m.impl("scale_shift_act", &scale_shift_act_cuda);
  m.impl("scale_shift_act_out", &scale_shift_act_out_cuda);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cuda);
  m.impl("bn_act_backward_accumulate", &bn_act_backward_accumulate_cuda);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply_cuda);
}

}  // namespace csp_kernels
