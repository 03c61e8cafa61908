// The schemas of every csp_kernels C++ op (one place), and the Python module's build report.
// Kernels register per device in cpu/*.cpp and cuda/*.cu with TORCH_LIBRARY_IMPL.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

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
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                          "." + std::to_string(TORCH_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_config", &build_config, "What this build of csp_kernels._C contains.");
}
