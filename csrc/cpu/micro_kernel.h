// Register-tiled tile products for the CPU kernels, written with at::vec so they compile to the
// build machine's widest SIMD (AVX-512, AVX2 or the scalar fallback).
//
// Every product in the forward and backward has the form C (m×n) (+)= A (m×k) · B (k×n), where
// B's rows are contiguous and padded to whole vectors, and A is read one element at a time (a
// broadcast), so A may be any strided view: Q, P, or Pᵀ/dSᵀ without a transpose copy.
// Calling BLAS per tile was measured slower: its packing and dispatch cost is paid on every
// 64×256 tile, and the library's kernels on some CPUs stop at AVX2.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace block_attn::cpu {

template <typename T>
constexpr int kVecWidth = static_cast<int>(at::vec::Vectorized<T>::size());

// Rounds n up to whole vectors: the padded length of every packed tile row.
template <typename T>
constexpr int padded(int n) {
  return (n + kVecWidth<T> - 1) / kVecWidth<T> * kVecWidth<T>;
}

// Register tile: kRows rows × kVectors vectors of accumulators. With 32 vector registers
// (AVX-512) 6×4 uses 24 for C, 4 for a row of B and 1 for the broadcast; with 16 (AVX2 and
// narrower), the classic 6×2.
template <typename T>
struct RegisterTile {
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr int kVectors = 4;
#else
  static constexpr int kVectors = 2;
#endif
  static constexpr int kRows = 6;
};

// A strided view of A: element (i, l) is data[i * row_stride + l * col_stride].
template <typename T>
struct StridedMatrix {
  const T* data;
  int64_t row_stride;
  int64_t col_stride;
  const T* at(int64_t i, int64_t l) const { return data + i * row_stride + l * col_stride; }
};

// C[rows × vectors·W] (+)= A[rows × k] · B[k × vectors·W] with the accumulators in registers.
template <typename T, int kRows, int kVectors, bool kAccumulate>
inline void register_tile_product(int k, StridedMatrix<T> a, const T* b, int64_t ldb, T* c,
                                  int64_t ldc) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int W = kVecWidth<T>;
  Vec acc[kRows][kVectors];
#pragma GCC unroll 8
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < kVectors; ++j) {
      acc[i][j] = kAccumulate ? Vec::loadu(c + i * ldc + j * W) : Vec(T(0));
    }
  }
  for (int l = 0; l < k; ++l) {
    Vec b_row[kVectors];
#pragma GCC unroll 8
    for (int j = 0; j < kVectors; ++j) b_row[j] = Vec::loadu(b + l * ldb + j * W);
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      const Vec a_value(*a.at(i, l));
#pragma GCC unroll 8
      for (int j = 0; j < kVectors; ++j) acc[i][j] = at::vec::fmadd(a_value, b_row[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < kVectors; ++j) acc[i][j].store(c + i * ldc + j * W);
  }
}

// Picks the instantiation for a remainder of `rows` (< kRows) rows at compile time.
template <typename T, int kVectors, bool kAccumulate, int kRows = RegisterTile<T>::kRows>
inline void register_tile_rows(int rows, int k, StridedMatrix<T> a, const T* b, int64_t ldb, T* c,
                               int64_t ldc) {
  if constexpr (kRows > 0) {
    if (rows == kRows) {
      return register_tile_product<T, kRows, kVectors, kAccumulate>(k, a, b, ldb, c, ldc);
    }
    return register_tile_rows<T, kVectors, kAccumulate, kRows - 1>(rows, k, a, b, ldb, c, ldc);
  }
}

template <typename T, bool kAccumulate, int kVectors = RegisterTile<T>::kVectors>
inline void register_tile_columns(int vectors, int rows, int k, StridedMatrix<T> a, const T* b,
                                  int64_t ldb, T* c, int64_t ldc) {
  if constexpr (kVectors > 0) {
    if (vectors == kVectors) {
      return register_tile_rows<T, kVectors, kAccumulate>(rows, k, a, b, ldb, c, ldc);
    }
    return register_tile_columns<T, kAccumulate, kVectors - 1>(vectors, rows, k, a, b, ldb, c,
                                                                ldc);
  }
}

// C (m×n) = A (m×k) · B (k×n), or C += when `accumulate`. n must be a multiple of the vector
// width (packed tiles are padded); B and C rows are contiguous with leading dims ldb and ldc.
template <typename T>
inline void tile_product(bool accumulate, int m, int n, int k, StridedMatrix<T> a, const T* b,
                         int64_t ldb, T* c, int64_t ldc) {
  constexpr int W = kVecWidth<T>;
  constexpr int kRows = RegisterTile<T>::kRows;
  constexpr int kVectors = RegisterTile<T>::kVectors;
  // Column panels outside, row panels inside: a panel of B (k × kVectors·W) stays in L1 while
  // every row of A streams past it.
  for (int n0 = 0; n0 < n; n0 += kVectors * W) {
    const int vectors = std::min(kVectors, (n - n0) / W);
    for (int m0 = 0; m0 < m; m0 += kRows) {
      const int rows = std::min(kRows, m - m0);
      const StridedMatrix<T> a_rows{a.at(m0, 0), a.row_stride, a.col_stride};
      T* c_block = c + m0 * ldc + n0;
      if (accumulate) {
        register_tile_columns<T, true>(vectors, rows, k, a_rows, b + n0, ldb, c_block, ldc);
      } else {
        register_tile_columns<T, false>(vectors, rows, k, a_rows, b + n0, ldb, c_block, ldc);
      }
    }
  }
}

}  // namespace block_attn::cpu
