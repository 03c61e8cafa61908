// Fortran BLAS as exported by libtorch_cpu (MKL, or OpenBLAS on some platforms): column-major,
// 32-bit integers; and a guard that keeps it on the calling thread.
#pragma once

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// MKL's per-thread thread count, Fortran interface (libtorch_cpu exports the C name as an
// alias of it); weak: absent where torch's BLAS is not MKL.
int mkl_set_num_threads_local_(const int* nth) __attribute__((weak));
}

namespace csp_kernels {

// Each at::parallel_for thread runs its own tiles' GEMMs: MKL must not start threads of its own
// inside them (2 threads x 2 MKL threads on 2 cores ran the tiles ~1.4x slower).
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    const int one = 1;
    previous_ = mkl_set_num_threads_local_ ? mkl_set_num_threads_local_(&one) : 0;
  }
  ~SingleThreadedBlas() {
    if (mkl_set_num_threads_local_) mkl_set_num_threads_local_(&previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace csp_kernels
