// Register-tiled tile products for the CPU kernels, written with at::vec so they compile to the
// build machine's widest SIMD (AVX-512, AVX2, NEON on aarch64, or the scalar fallback).
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

#if defined(__aarch64__)
// Every aarch64 CPU has NEON, so the scalar fallback there means vector_isa.h is out of date.
static_assert(at::vec::is_vec_specialized_for_v<float>, "at::vec has no NEON or SVE here");
#endif

// Rounds n up to whole vectors: the padded length of every packed tile row.
template <typename T>
constexpr int padded(int n) {
  return (n + kVecWidth<T> - 1) / kVecWidth<T> * kVecWidth<T>;
}

// Vector registers of the build's SIMD flavour.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// Register tile: kRows rows × kVectors vectors of accumulators. With 32 vector registers
// (AVX-512) 6×4 uses 24 for C, 4 for a row of B and 1 for the broadcast; with 16 (AVX2 and
// narrower), the classic 6×2.
template <typename T>
struct RegisterTile {
  static constexpr int kVectors = kVectorRegisters == 32 ? 4 : 2;
  static constexpr int kRows = 6;
};

// A strided view of A: element (i, l) is data[i * row_stride + l * col_stride].
template <typename T>
struct StridedMatrix {
  const T* data;
  int64_t row_stride;
  int64_t col_stride;
  const T* at(int64_t i, int64_t l) const { return data + i * row_stride + l * col_stride; }
  StridedMatrix from_row(int64_t i) const { return {at(i, 0), row_stride, col_stride}; }
};

// C[rows × vectors·W] (+)= A[rows × k] · B[k × vectors·W] with the accumulators in registers.
template <typename T>
struct FloatProduct {
  using AMatrix = StridedMatrix<T>;
  using BElement = T;
  using CElement = T;
  static constexpr int kLanes = kVecWidth<T>;
  static constexpr int kRows = RegisterTile<T>::kRows;
  static constexpr int kVectors = RegisterTile<T>::kVectors;

  template <int kTileRows, int kTileVectors, bool kAccumulate>
  static void run(int k, AMatrix a, const T* b, int64_t ldb, T* c, int64_t ldc) {
    using Vec = at::vec::Vectorized<T>;
    constexpr int W = kLanes;
    Vec acc[kTileRows][kTileVectors];
#pragma GCC unroll 8
    for (int i = 0; i < kTileRows; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < kTileVectors; ++j) {
        acc[i][j] = kAccumulate ? Vec::loadu(c + i * ldc + j * W) : Vec(T(0));
      }
    }
    for (int l = 0; l < k; ++l) {
      Vec b_row[kTileVectors];
#pragma GCC unroll 8
      for (int j = 0; j < kTileVectors; ++j) b_row[j] = Vec::loadu(b + l * ldb + j * W);
#pragma GCC unroll 8
      for (int i = 0; i < kTileRows; ++i) {
        const Vec a_value(*a.at(i, l));
#pragma GCC unroll 8
        for (int j = 0; j < kTileVectors; ++j) {
          acc[i][j] = at::vec::fmadd(a_value, b_row[j], acc[i][j]);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < kTileRows; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < kTileVectors; ++j) acc[i][j].store(c + i * ldc + j * W);
    }
  }
};

// Calls Product::run with the register tile's row and vector counts as compile-time constants:
// full tiles take the first branch, edge tiles one of the smaller instantiations.
template <typename Product, bool kAccumulate, int kVectors, int kRows = Product::kRows,
          typename... Args>
inline void run_rows(int rows, Args... args) {
  if constexpr (kRows > 0) {
    if (rows == kRows) return Product::template run<kRows, kVectors, kAccumulate>(args...);
    return run_rows<Product, kAccumulate, kVectors, kRows - 1>(rows, args...);
  }
}

template <typename Product, bool kAccumulate, int kVectors = Product::kVectors, typename... Args>
inline void run_vectors(int vectors, int rows, Args... args) {
  if constexpr (kVectors > 0) {
    if (vectors == kVectors) return run_rows<Product, kAccumulate, kVectors>(rows, args...);
    return run_vectors<Product, kAccumulate, kVectors - 1>(vectors, rows, args...);
  }
}

// C (m×n) = A (m×k) · B (k×n), or C += when `accumulate`. n must be a multiple of the vector
// width (packed tiles are padded); B and C rows are contiguous with leading dims ldb and ldc,
// counted in B and C elements.
template <typename Product>
inline void tiled_product(bool accumulate, int m, int n, int k, typename Product::AMatrix a,
                          const typename Product::BElement* b, int64_t ldb,
                          typename Product::CElement* c, int64_t ldc) {
  constexpr int W = Product::kLanes;
  constexpr int kRows = Product::kRows;
  constexpr int kVectors = Product::kVectors;
  // Column panels outside, row panels inside: a panel of B (k × kVectors·W) stays in L1 while
  // every row of A streams past it.
  for (int n0 = 0; n0 < n; n0 += kVectors * W) {
    const int vectors = std::min(kVectors, (n - n0) / W);
    for (int m0 = 0; m0 < m; m0 += kRows) {
      const int rows = std::min(kRows, m - m0);
      const typename Product::AMatrix a_rows = a.from_row(m0);
      auto* c_block = c + m0 * ldc + n0;
      if (accumulate) {
        run_vectors<Product, true>(vectors, rows, k, a_rows, b + n0, ldb, c_block, ldc);
      } else {
        run_vectors<Product, false>(vectors, rows, k, a_rows, b + n0, ldb, c_block, ldc);
      }
    }
  }
}

template <typename T>
inline void tile_product(bool accumulate, int m, int n, int k, StridedMatrix<T> a, const T* b,
                         int64_t ldb, T* c, int64_t ldc) {
  tiled_product<FloatProduct<T>>(accumulate, m, n, k, a, b, ldb, c, ldc);
}

}  // namespace block_attn::cpu
