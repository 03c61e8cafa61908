// same_bits: the eval fold caches' staleness test (csp_kernels/ops/fold_cache.py) in one call.
// It runs at every eval call of every fused module, so it is a pybind function (no dispatcher)
// comparing all of a cache's source tensors at once, single-threaded on the CPU.
#include <torch/extension.h>

#include <cstring>

namespace csp_kernels {

namespace {

// An integer dtype of `t`'s element size, to compare floating-point tensors bit by bit.
at::ScalarType bits_dtype(const at::Tensor& t) {
  switch (t.element_size()) {
    case 8: return at::kLong;
    case 4: return at::kInt;
    case 2: return at::kShort;
    default: return at::kByte;
  }
}

bool same_tensor_bits(const at::Tensor& kept, const at::Tensor& source) {
  if (kept.scalar_type() != source.scalar_type() || kept.device() != source.device() ||
      kept.sizes() != source.sizes()) {
    return false;
  }
  if (source.device().is_cpu()) {
    // A non-contiguous source (rare for parameters and buffers) is copied first.
    const at::Tensor contiguous = source.contiguous();
    return std::memcmp(kept.data_ptr(), contiguous.data_ptr(), kept.numel() * kept.element_size()) == 0;
  }
  const at::ScalarType bits = bits_dtype(kept);
  return at::equal(kept.view(bits), source.view(bits));
}

}  // namespace

// Whether each of `sources` has the dtype, device, shape and bits of its contiguous copy in
// `kept` (taken when the cache was filled). Bits, not values: a NaN parameter equals its copy.
bool same_bits(const std::vector<at::Tensor>& kept, const std::vector<at::Tensor>& sources) {
  if (kept.size() != sources.size()) {
    return false;
  }
  for (size_t i = 0; i < kept.size(); ++i) {
    if (!same_tensor_bits(kept[i], sources[i])) {
      return false;
    }
  }
  return true;
}

}  // namespace csp_kernels
