// The schemas of every csp_kernels C++ op (one place), and the Python module's functions: the build
// report and the eval fold caches' `same_bits` (same_bits.cpp).
// Kernels register per device in cpu/*.cpp and cuda/*.cu with TORCH_LIBRARY_IMPL; the fake
// (meta) kernels sit in csp_kernels/ops/fakes.py in this file's order.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cpu/sgemm_avx512.h"

namespace csp_kernels {
bool same_bits(const std::vector<at::Tensor>& kept, const std::vector<at::Tensor>& sources);  // same_bits.cpp
}

#ifndef CSP_KERNELS_CUDA_ARCHS
#define CSP_KERNELS_CUDA_ARCHS ""
#define CSP_KERNELS_CUDA_VERSION ""
#endif

TORCH_LIBRARY(csp_kernels, m) {
  // BatchNorm + activation family. x, z, grad_y: (N, C, H, W) with contiguous planes (channel
  // slices of a larger buffer allowed). Per-channel vectors are float32 (float64 for float64).
  m.def("channel_stats(Tensor x) -> (Tensor mean, Tensor var)");  // biased var over N, H, W
  m.def("scale_shift_act(Tensor x, Tensor scale, Tensor shift, str act) -> Tensor");
  m.def("scale_shift_act_out(Tensor x, Tensor scale, Tensor shift, str act, Tensor(a!) out) -> ()");
  m.def("bn_act_backward_reduce(Tensor grad_y, Tensor z, Tensor mean, Tensor invstd, Tensor weight, "
        "Tensor bias, str act) -> (Tensor sum_dpre, Tensor sum_dpre_xhat)");
  m.def("bn_act_backward_apply(Tensor grad_y, Tensor z, Tensor mean, Tensor invstd, Tensor weight, "
        "Tensor bias, Tensor sum_dpre, Tensor sum_dpre_xhat, str act) -> Tensor");
  // A training BatchNorm's per-channel arithmetic (batch_norm_bookkeeping.cpp, every backend): its
  // (scale, shift) from batch statistics, and nn.BatchNorm2d's update of num_batches_tracked and
  // the running statistics (momentum a float; unbias = count / (count - 1)).
  m.def("bn_scale_shift(Tensor mean, Tensor var, Tensor weight, Tensor bias, float eps) -> (Tensor scale, "
        "Tensor shift)");
  m.def("bn_track_running_stats_(Tensor(a!) num_batches_tracked, Tensor(b!) running_mean, Tensor(c!) running_var, "
        "Tensor mean, Tensor var, float unbias, float momentum) -> ()");

  // The transform U = G g G^T of a contiguous float32 (out, in, 3, 3) weight, computed in
  // double: the contiguous (16, out, in) weight conv3x3_winograd_out takes.
  m.def("winograd_weight(Tensor weight) -> Tensor");
  // 3x3, stride 1, padding 1, by Winograd F(2x2, 3x3); weight: the (16, out, in) transform.
  // With conv_weight (the 3x3 weight), an x holding inf or NaN runs as ATen's direct
  // convolution instead: Winograd's transforms would turn one inf into NaNs around it.
  m.def("conv3x3_winograd_out(Tensor x, Tensor weight, Tensor(a!) out, Tensor? conv_weight=None) -> ()");
  // Its weight gradient from x and grad_y (both planes contiguous): (out, in, 3, 3); ATen's
  // where either holds an inf or a NaN.
  m.def("conv3x3_winograd_weight_grad(Tensor x, Tensor grad_y) -> Tensor");
  // 1x1 convolution with fused prologue and epilogue (CPU; the GPU twin is the Triton GEMM):
  // out = act(conv1x1(in_act(x * in_scale + in_shift), weight) + bias), weight (O, C). With
  // stats, returns out's per-channel batch (mean, biased var), else two empty tensors. out may
  // overwrite x when sample n's output covers only sample n's input memory.
  m.def("conv1x1_fused_out(Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, str in_act, "
        "Tensor? bias, str act, bool stats, Tensor(a!) out) -> (Tensor mean, Tensor var)");
  // The backward of act(BN(conv1x1(x, weight))) after bn_act_backward_reduce gave sum_dpre and
  // sum_dpre_xhat: (grad_x, grad_weight (O, C)), an empty tensor for one not asked for (CPU).
  m.def("conv1x1_bn_act_backward(Tensor grad_y, Tensor z, Tensor mean, Tensor invstd, Tensor weight_bn, "
        "Tensor bias_bn, Tensor sum_dpre, Tensor sum_dpre_xhat, str act, Tensor x, Tensor weight, bool input_grad, "
        "bool weight_grad) -> (Tensor grad_x, Tensor grad_weight)");

  // Dense-block family (ops/dense.py): the backward of the dense layers' shared-statistics BN1.
  // x is a channel prefix of the concat buffer; grad_acc, grad_x are views shaped like it, grad_x
  // in x's dtype, grad_acc too or, for float16/bfloat16 x, float32 (the GPU engines' accumulator).
  m.def("bn_act_backward_accumulate(Tensor grad_a, Tensor x, Tensor mean, Tensor invstd, Tensor weight, "
        "Tensor bias, str act, Tensor(a!) grad_acc) -> (Tensor sum_dpre, Tensor sum_dpre_xhat)");
  // A dense layer's conv1 backward in one pass over tiles (CPU): grad_z from BN2 + act backward
  // of grad_b, conv1's weight gradient against BN1 + act of the prefix x, and its input gradient
  // accumulated into grad_acc as bn_act_backward_accumulate does. Returns (grad_weight (O, C),
  // sum_dpre1, sum_dpre_xhat1).
  m.def("dense_conv1_backward(Tensor grad_b, Tensor z, Tensor mean2, Tensor invstd2, Tensor weight2, Tensor bias2, "
        "Tensor sum_dpre2, Tensor sum_dpre_xhat2, Tensor x, Tensor mean1, Tensor invstd1, Tensor weight1, "
        "Tensor bias1, str act, Tensor weight, Tensor(a!) grad_acc) -> (Tensor, Tensor, Tensor)");
  m.def("bn_grad_correct(Tensor grad_acc, Tensor x, Tensor mean, Tensor invstd, Tensor sum_grad, "
        "Tensor sum_grad_xhat, Tensor(a!) grad_x) -> ()");

  // Maxout pyramid family (ops/maxout.py, the Exact Fusion Model). features[i]: (N, C_i, H_i, W_i)
  // with contiguous planes, each resized to (out_h, out_w) by F.interpolate(mode="nearest")
  // indexing, concatenated and Maxout-ed into out_channels (darknet order when interleaved).
  // The backward recomputes the argmax; it returns contiguous gradients shaped like features.
  m.def("maxout_pyramid_forward(Tensor[] features, int out_h, int out_w, int out_channels, "
        "bool interleaved) -> Tensor");
  m.def("maxout_pyramid_backward(Tensor grad_out, Tensor[] features, int out_channels, "
        "bool interleaved) -> Tensor[]");
}

namespace {

pybind11::dict build_config() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef CSP_KERNELS_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_version"] = CSP_KERNELS_CUDA_VERSION;
  info["cuda_archs"] = CSP_KERNELS_CUDA_ARCHS;
  info["cuda_skipped_reason"] = CSP_KERNELS_CUDA_SKIPPED_REASON;
  // The float32 GEMM of the fused CPU 1x1 convolutions on this machine.
  info["cpu_sgemm"] = csp_kernels::sgemm_choice().avx512 ? "avx512" : "blas";
  info["cpu_sgemm_reason"] = csp_kernels::sgemm_choice().reason;
  // Whether the AVX-512 kernels (the GEMM, Winograd 3x3 convolutions) can run on this CPU.
  info["cpu_avx512"] = csp_kernels::sgemm_avx512_supported();
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                          "." + std::to_string(TORCH_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_config", &build_config, "What this build of csp_kernels._C contains.");
  m.def("same_bits", &csp_kernels::same_bits,
        "Whether each source tensor has the dtype, device, shape and bits of its kept contiguous copy.");
}
