// Tile-level building blocks shared by the CPU forward and backward: loading rows of q/k/v into
// the accumulation type and writing rows back.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "blas_gemm.h"

namespace block_attn::cpu {

// Half and bfloat16 are computed in float; float in float; double in double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A read-only row-major tile: rows of head_dim elements, `ld` elements apart.
template <typename acc_t>
struct TileView {
  const acc_t* data;
  int64_t ld;
};

// Converts n elements to acc_t (vectorised for half and bfloat16).
template <typename scalar_t, typename acc_t>
inline void convert_row(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, dst);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> ||
                       std::is_same_v<scalar_t, c10::Half>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    using FloatVec = at::vec::Vectorized<float>;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [low, high] = at::vec::convert_to_float<scalar_t>(Vec::loadu(src + i));
      low.store(dst + i);
      high.store(dst + i + FloatVec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  }
}

// Writes n acc_t elements, multiplied by `factor`, as scalar_t.
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, acc_t factor, scalar_t* dst, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    at::vec::map([factor](Vec x) { return x * Vec(factor); }, dst, src, n);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> ||
                       std::is_same_v<scalar_t, c10::Half>) {
    using LowVec = at::vec::Vectorized<scalar_t>;
    const Vec f(factor);
    int64_t i = 0;
    for (; i + LowVec::size() <= n; i += LowVec::size()) {
      const Vec low = Vec::loadu(src + i) * f;
      const Vec high = Vec::loadu(src + i + Vec::size()) * f;
      at::vec::convert_from_float<scalar_t>(low, high).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * factor);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * factor);
  }
}

template <typename scalar_t>
inline void zero_rows(scalar_t* dst, int64_t row_stride, int64_t rows, int64_t head_dim) {
  for (int64_t r = 0; r < rows; ++r) std::fill_n(dst + r * row_stride, head_dim, scalar_t(0));
}

// `rows` rows of head_dim elements starting at src, as acc_t. Float and double rows whose stride
// BLAS accepts (>= head_dim, fits in int) are used in place; anything else is copied (converted)
// into scratch.
template <typename scalar_t, typename acc_t>
inline TileView<acc_t> load_tile(const scalar_t* src, int64_t row_stride, int64_t rows,
                                 int64_t head_dim, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (row_stride >= head_dim && fits_blas_int(row_stride)) return {src, row_stride};
  }
  for (int64_t r = 0; r < rows; ++r) {
    convert_row(src + r * row_stride, scratch + r * head_dim, head_dim);
  }
  return {scratch, head_dim};
}

}  // namespace block_attn::cpu
