// Batch statistics of one channel from contiguous runs of it (planes, tile rows): each run's
// mean and sum of squared deviations by two passes in double (the run is in cache), merged
// across runs by Chan's rule. No E[x^2] - E[x]^2 cancellation, and float rounding only once, in
// the result.
#pragma once

#include <cmath>
#include <cstdint>

namespace csp_kernels {

struct Moments {
  double count = 0, mean = 0, m2 = 0;  // m2: sum of squared deviations from mean

  void add(const Moments& other) {
    if (other.count == 0) return;
    const double total = count + other.count, delta = other.mean - mean;
    // With an infinite mean delta is inf - inf: the weighted sum gives what ATen's sum-based mean
    // does (inf stays inf, inf and -inf give NaN).
    mean = std::isfinite(delta) ? mean + delta * other.count / total : (mean * count + other.mean * other.count) / total;
    m2 += other.m2 + delta * delta * count * other.count / total;
    count = total;
  }

  double biased_variance() const { return count > 0 ? m2 / count : 0.0; }
};

template <typename scalar_t>
Moments moments_of(const scalar_t* x, int64_t n) {
  if (n <= 0) return {};
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]);
  const double mean = sum / static_cast<double>(n);
  double m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - mean;
    m2 += d * d;
  }
  return {static_cast<double>(n), mean, m2};
}

}  // namespace csp_kernels
