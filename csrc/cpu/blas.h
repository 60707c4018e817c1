// Column-major GEMM through the Fortran BLAS that libtorch_cpu carries (MKL on x86-64 builds,
// OpenBLAS elsewhere). ATen's own cpublas::gemm overloads are not exported to extensions.
// The symbols are weak so a torch without them still loads; then a plain loop is used.
#pragma once

#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace block_attn::cpu {

// C (m×n) = alpha · op(A) · op(B) + beta · C, column-major, op = transpose when t* is true.
template <typename T>
inline void fallback_gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda,
                          const T* b, int ldb, T beta, T* c, int ldc) {
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      T sum = 0;
      for (int l = 0; l < k; ++l) {
        const T av =
            ta ? a[l + static_cast<int64_t>(i) * lda] : a[i + static_cast<int64_t>(l) * lda];
        const T bv =
            tb ? b[j + static_cast<int64_t>(l) * ldb] : b[l + static_cast<int64_t>(j) * ldb];
        sum += av * bv;
      }
      T& out = c[i + static_cast<int64_t>(j) * ldc];
      out = alpha * sum + (beta == T(0) ? T(0) : beta * out);
    }
  }
}

inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  if (sgemm_ == nullptr) return fallback_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const char transa = ta ? 'T' : 'N', transb = tb ? 'T' : 'N';
  sgemm_(&transa, &transb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc) {
  if (dgemm_ == nullptr) return fallback_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const char transa = ta ? 'T' : 'N', transb = tb ? 'T' : 'N';
  dgemm_(&transa, &transb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

}  // namespace block_attn::cpu
