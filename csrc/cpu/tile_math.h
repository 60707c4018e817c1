// Tile building blocks of the CPU kernels: packing rows into contiguous accumulation-type
// scratch, tile products through ATen's CPU BLAS, and vectorised softmax pieces.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "blas.h"

namespace block_attn::cpu {

// float16/bfloat16/float32 accumulate in float32; float64 in float64.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Copies `rows` rows of `dim` elements (row stride `stride`) into dense accumulation scratch.
// Packing costs O(rows·dim) against the O(rows·cols·dim) product it feeds, and gives BLAS a
// dense, aligned operand whatever the input layout or dtype.
template <typename scalar_t>
inline void pack_rows(const scalar_t* src, int64_t stride, int rows, int dim,
                      acc_t<scalar_t>* dst) {
  for (int r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * stride;
    acc_t<scalar_t>* out = dst + static_cast<int64_t>(r) * dim;
    for (int d = 0; d < dim; ++d) out[d] = static_cast<acc_t<scalar_t>>(in[d]);
  }
}

template <typename scalar_t>
inline void unpack_rows(const acc_t<scalar_t>* src, int rows, int dim, scalar_t* dst,
                        int64_t stride) {
  for (int r = 0; r < rows; ++r) {
    const acc_t<scalar_t>* in = src + static_cast<int64_t>(r) * dim;
    scalar_t* out = dst + r * stride;
    for (int d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(in[d]);
  }
}

// Row-major C (m×n, ldc) = alpha · A (m×k, row-major) · B^T (B is n×k, row-major) + beta · C.
template <typename T>
inline void matmul_abt(int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
                       T beta, T* c, int ldc) {
  // Column-major view: C^T (n×m) = B (n×k) · A^T, with B stored as a k×n column-major matrix.
  gemm(true, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Row-major C (m×n) = alpha · A (m×k) · B (k×n) + beta · C, all row-major.
template <typename T>
inline void matmul_ab(int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
                      T beta, T* c, int ldc) {
  gemm(false, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Row-major C (m×n) = alpha · A^T (A is k×m, row-major) · B (k×n) + beta · C.
template <typename T>
inline void matmul_atb(int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
                       T beta, T* c, int ldc) {
  gemm(false, true, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

template <typename T>
inline T max_of(const T* x, int n) {
  T m = -std::numeric_limits<T>::infinity();
  // NaN wins so that NaN inputs propagate instead of looking like a fully masked row.
  for (int i = 0; i < n; ++i) m = (x[i] > m || std::isnan(x[i])) ? x[i] : m;
  return m;
}

// x[i] = exp(x[i] - shift) for i < n; returns the sum.
template <typename T>
inline T exp_shifted_sum(T* x, int n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  at::vec::map([shift](Vec v) { return (v - Vec(shift)).exp(); }, x, x, n);
  return at::vec::reduce_all<T>([](Vec a, Vec b) { return a + b; }, x, n);
}

// x[i] = exp(x[i] - shift) for i < n.
template <typename T>
inline void exp_shifted(T* x, int n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  at::vec::map([shift](Vec v) { return (v - Vec(shift)).exp(); }, x, x, n);
}

// x[i] *= factor
template <typename T>
inline void scale_in_place(T* x, int n, T factor) {
  using Vec = at::vec::Vectorized<T>;
  at::vec::map([factor](Vec v) { return v * Vec(factor); }, x, x, n);
}

template <typename T>
inline void fill(T* x, int n, T value) {
  for (int i = 0; i < n; ++i) x[i] = value;
}

}  // namespace block_attn::cpu
