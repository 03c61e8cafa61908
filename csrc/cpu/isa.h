// Per-element loops compiled twice: for the build's baseline (AVX2 + FMA on x86-64) and, where
// the CPU has it, AVX-512, chosen at run time. The loops whose activation needs e^u (silu, mish)
// are compute-bound, and twice the lanes run them about twice as fast; the others are
// memory-bound and no slower. The library's wheel must run on CPUs without AVX-512, so the
// build flags cannot ask for it.
//
// CSP_KERNELS_CPU_ROWS=baseline pins the baseline loops (so that tests on AVX-512 machines also
// check them); unset or "avx512", AVX-512 wherever the CPU has it. csp_kernels/extension.py warns
// about any other value, which is ignored.
//
// A loop is written once, as a struct's always-inline `run`; `run_loop` calls it through a
// function compiled for the baseline or one compiled for AVX-512 (GCC and Clang vectorize the
// inlined loop for the caller's target), as `avx512_runs()` says.
#pragma once

#include <cstdlib>
#include <cstring>

#define CSP_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(_M_X64)
#define CSP_AVX512_TARGET __attribute__((target("avx512f")))
#define CSP_HAS_AVX512_CLONES 1
#else
#define CSP_HAS_AVX512_CLONES 0
#endif

namespace csp_kernels {

// Whether the per-element loops run their AVX-512 copies (decided once).
inline bool avx512_runs() {
#if CSP_HAS_AVX512_CLONES
  static const bool runs = [] {
    const char* pin = std::getenv("CSP_KERNELS_CPU_ROWS");
    return __builtin_cpu_supports("avx512f") && !(pin != nullptr && std::strcmp(pin, "baseline") == 0);
  }();
  return runs;
#else
  return false;
#endif
}


// Loop::run(args...) compiled for the baseline target or for AVX-512. Loop is a struct whose
// static `run` is CSP_ALWAYS_INLINE, so each caller below gets its own copy, vectorized for its
// target.
template <typename Loop, typename... Args>
void run_baseline(Args... args) {
  Loop::run(args...);
}

#if CSP_HAS_AVX512_CLONES
template <typename Loop, typename... Args>
CSP_AVX512_TARGET void run_avx512(Args... args) {
  Loop::run(args...);
}
#endif

// Runs Loop::run(args...) with AVX-512 when `avx512` (from avx512_runs(), read once per kernel).
template <typename Loop, typename... Args>
inline void run_loop(bool avx512, Args... args) {
#if CSP_HAS_AVX512_CLONES
  if (avx512) return run_avx512<Loop>(args...);
#endif
  run_baseline<Loop>(args...);
}

}  // namespace csp_kernels
