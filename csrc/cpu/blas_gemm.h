// Row-major GEMM on float/double tiles through the BLAS that libtorch links (MKL in x86 wheels).
// ATen's at::native::cpublas::gemm wraps the same routines but is not exported from libtorch,
// so the Fortran BLAS entry points are declared here, weakly: if a libtorch build exports no
// sgemm_/dgemm_, the tile products fall back to at::addmm_out on views of the tiles.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace block_attn::cpu {

// Leading dimensions BLAS can take (LP64 interface: 32-bit ints).
inline bool fits_blas_int(int64_t x) {
  return x <= std::numeric_limits<int>::max();
}

template <typename acc_t>
void gemm_with_aten(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha,
                    const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c,
                    int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  auto view = [&](const acc_t* data, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
    at::Tensor t =
        at::from_blob(const_cast<acc_t*>(data),
                      {transposed ? cols : rows, transposed ? rows : cols}, {ld, 1}, options);
    return transposed ? t.t() : t;
  };
  at::Tensor c_view = view(c, m, n, ldc, false);
  at::addmm_out(c_view, c_view, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta,
                alpha);
}

// Row-major C (m x n) = alpha * op(A) * op(B) + beta * C, where op(A) is m x k and op(B) k x n;
// trans_a / trans_b mean A / B are stored transposed. BLAS is column-major, and a row-major
// matrix is its transpose in column-major, so this computes C^T = op(B)^T op(A)^T. beta = 0
// ignores C's old contents (NaN included), as BLAS specifies.
template <typename acc_t>
inline void gemm_row_major(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha,
                           const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t beta,
                           acc_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr bool kIsFloat = std::is_same_v<acc_t, float>;
  const bool have_blas = kIsFloat ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (!have_blas || k == 0 || !fits_blas_int(m) || !fits_blas_int(n) || !fits_blas_int(k) ||
      !fits_blas_int(lda) || !fits_blas_int(ldb) || !fits_blas_int(ldc)) {
    gemm_with_aten(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char op_b = trans_b ? 'T' : 'N', op_a = trans_a ? 'T' : 'N';
  const int rows = static_cast<int>(n), cols = static_cast<int>(m), inner = static_cast<int>(k);
  const int ld_b = static_cast<int>(ldb), ld_a = static_cast<int>(lda),
            ld_c = static_cast<int>(ldc);
  if constexpr (kIsFloat) {
    sgemm_(&op_b, &op_a, &rows, &cols, &inner, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
  } else {
    dgemm_(&op_b, &op_a, &rows, &cols, &inner, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
  }
}

}  // namespace block_attn::cpu
