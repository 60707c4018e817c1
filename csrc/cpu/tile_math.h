// Tile building blocks of the CPU kernels: packing rows into aligned accumulation-type scratch
// (plain or transposed), and the vectorised exponentials of the softmax.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>

#include "micro_kernel.h"

namespace block_attn::cpu {

// float16/bfloat16/float32 accumulate in float32; float64 in float64.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// Zero-filled scratch aligned to a cache line, so every packed row starts on a vector boundary
// (row lengths are padded to whole vectors).
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t size)
      : data_(static_cast<T*>(std::aligned_alloc(64, round_up(size * sizeof(T))))) {
    if (data_ == nullptr) throw std::bad_alloc();
    std::fill(data_.get(), data_.get() + size, T(0));
  }
  T* get() const { return data_.get(); }

 private:
  static size_t round_up(size_t bytes) { return (bytes + 63) / 64 * 64; }
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};

// out[d] = in[d] for d < dim, converted to the accumulation type. float16/bfloat16 convert a
// vector at a time: float16's element loop compiled to one conversion and one store per element,
// a fifth of its forward.
template <typename scalar_t>
inline void convert_row(const scalar_t* in, int dim, acc_t<scalar_t>* out) {
  int d = 0;
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    using Vec = at::vec::Vectorized<float>;
    for (; d + kVecWidth<float> <= dim; d += kVecWidth<float>) {
      Vec values;
      if constexpr (std::is_same_v<scalar_t, c10::Half>) {
        at::vec::load_fp32_from_fp16(in + d, values);
      } else {
        at::vec::load_fp32_from_bf16(in + d, values);
      }
      values.store(out + d);
    }
  }
  for (; d < dim; ++d) out[d] = static_cast<acc_t<scalar_t>>(in[d]);
}

// dst[r * ld + d] = src[r * stride + d] for r < rows, d < dim, converted to the accumulation
// type. Packing is O(rows·dim) against the O(rows·cols·dim) products it feeds.
template <typename scalar_t>
inline void pack_rows(const scalar_t* src, int64_t stride, int rows, int dim, acc_t<scalar_t>* dst,
                      int64_t ld) {
  for (int r = 0; r < rows; ++r) convert_row(src + r * stride, dim, dst + r * ld);
}

// dst[d * ld + r] = src[r * stride + d]: the transposed operand whose rows are the vector
// dimension of a product (queries along the vector lanes). float32 goes through at::vec's
// register transpose (16×16 blocks on AVX-512); float16/bfloat16 convert 16 rows at a time into
// float32 rows first.
template <typename scalar_t>
inline void pack_rows_transposed(const scalar_t* src, int64_t stride, int rows, int dim,
                                 acc_t<scalar_t>* dst, int64_t ld) {
  using acc = acc_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    at::vec::transpose_mxn<acc>(src, stride, dst, ld, rows, dim);
  } else {
    constexpr int kRows = 16;
    constexpr int kColumns = 64;
    alignas(64) acc chunk[kRows * kColumns];
    for (int r0 = 0; r0 < rows; r0 += kRows) {
      const int chunk_rows = std::min(kRows, rows - r0);
      for (int d0 = 0; d0 < dim; d0 += kColumns) {
        const int chunk_columns = std::min(kColumns, dim - d0);
        for (int r = 0; r < chunk_rows; ++r) {
          convert_row(src + (r0 + r) * stride + d0, chunk_columns, chunk + r * kColumns);
        }
        at::vec::transpose_mxn<acc>(chunk, kColumns, dst + d0 * ld + r0, ld, chunk_rows,
                                    chunk_columns);
      }
    }
  }
}

// dst[r * stride + d] = factor[r] · src[r * ld + d], converted back to the input type (factor
// null: 1). float16 rounds 32 elements per step through at::vec::convert instead of one
// vcvtps2ph per element. bfloat16 keeps the element loop: this two-pass form measured slower on
// its backward.
template <typename scalar_t>
inline void unpack_rows(const acc_t<scalar_t>* src, int64_t ld, int rows, int dim,
                        const acc_t<scalar_t>* factor, scalar_t* dst, int64_t stride) {
  using acc = acc_t<scalar_t>;
  for (int r = 0; r < rows; ++r) {
    const acc* in = src + r * ld;
    scalar_t* out = dst + r * stride;
    const acc f = factor ? factor[r] : acc(1);
    if constexpr (!std::is_same_v<scalar_t, c10::Half>) {
      for (int d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(f * in[d]);
    } else {
      using Vec = at::vec::Vectorized<acc>;
      constexpr int kChunk = 64;
      alignas(64) acc scaled[kChunk];
      for (int d0 = 0; d0 < dim; d0 += kChunk) {
        const int n = std::min(kChunk, dim - d0);
        int d = 0;
        for (; d + kVecWidth<acc> <= n; d += kVecWidth<acc>) {
          (Vec::loadu(in + d0 + d) * Vec(f)).store(scaled + d);
        }
        for (; d < n; ++d) scaled[d] = f * in[d0 + d];
        at::vec::convert(scaled, out + d0, n);
      }
    }
  }
}

// Asks for every cache line of `rows` rows of `dim` elements (row stride `stride`), without
// waiting for them.
template <typename T>
inline void prefetch_rows(const T* src, int64_t stride, int rows, int dim) {
  constexpr int kLine = 64 / static_cast<int>(sizeof(T));
  for (int r = 0; r < rows; ++r) {
    for (int d = 0; d < dim; d += kLine) __builtin_prefetch(src + r * stride + d);
  }
}

// exp on a vector. float32 uses ATen's inline polynomial (the one PyTorch's CPU flash kernel
// uses; a few ulp, exact 0 at -inf); float64 keeps the correctly rounded Sleef exp, so float64
// gradients stay exact for gradcheck.
template <typename T>
inline at::vec::Vectorized<T> vec_exp(at::vec::Vectorized<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// `count` (≤ one vector) elements of `src` in the accumulation type, zero past `count`.
template <typename scalar_t>
inline at::vec::Vectorized<acc_t<scalar_t>> load_as_acc(const scalar_t* src, int count) {
  using Vec = at::vec::Vectorized<acc_t<scalar_t>>;
  constexpr int W = kVecWidth<acc_t<scalar_t>>;
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return count == W ? Vec::loadu(src) : Vec::loadu(src, count);
  } else {
    Vec out;
    if (count == W) {
      at::vec::load_to_float(src, out);
    } else {
      scalar_t tail[W] = {};  // a full-width load would read past the row
      std::copy(src, src + count, tail);
      at::vec::load_to_float(tail, out);
    }
    return out;
  }
}

template <typename T>
inline T horizontal_sum(const at::vec::Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>(
      [](const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) { return a + b; }, v);
}

// Σ_d a[d] · b[d] over one row each, in the accumulation type.
template <typename scalar_t>
inline acc_t<scalar_t> dot_row(const scalar_t* a, const scalar_t* b, int dim) {
  using acc = acc_t<scalar_t>;
  constexpr int W = kVecWidth<acc>;
  at::vec::Vectorized<acc> sum(0);
  for (int d = 0; d < dim; d += W) {
    const int count = std::min(W, dim - d);
    sum = at::vec::fmadd(load_as_acc(a + d, count), load_as_acc(b + d, count), sum);
  }
  return horizontal_sum(sum);
}

// x[i] *= factor
template <typename T>
inline void scale_in_place(T* x, int n, T factor) {
  using Vec = at::vec::Vectorized<T>;
  int i = 0;
  for (; i + kVecWidth<T> <= n; i += kVecWidth<T>) (Vec::loadu(x + i) * Vec(factor)).store(x + i);
  for (; i < n; ++i) x[i] *= factor;
}

// x[i] *= factors[i] for i < n.
template <typename T>
inline void multiply_in_place(T* x, const T* factors, int n) {
  using Vec = at::vec::Vectorized<T>;
  int i = 0;
  for (; i + kVecWidth<T> <= n; i += kVecWidth<T>) {
    (Vec::loadu(x + i) * Vec::loadu(factors + i)).store(x + i);
  }
  for (; i < n; ++i) x[i] *= factors[i];
}

// The rounding error of t = s + v (Neumaier): exact whichever of s and v is larger.
template <typename T>
inline at::vec::Vectorized<T> addition_error(const at::vec::Vectorized<T>& s,
                                             const at::vec::Vectorized<T>& v,
                                             const at::vec::Vectorized<T>& t) {
  return at::vec::Vectorized<T>::blendv((v - t) + s, (s - t) + v, s.abs() >= v.abs());
}

// sum[i] += x[i], compensated: each addition's rounding error goes to compensation[i], and
// sum + compensation is the total. Long sums of partial results then keep their precision
// however many partials they add, where a plain sum stops growing once its ulp outgrows them.
template <typename T>
inline void add_compensated(const T* x, int64_t n, T* sum, T* compensation) {
  using Vec = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + kVecWidth<T> <= n; i += kVecWidth<T>) {
    const Vec s = Vec::loadu(sum + i);
    const Vec v = Vec::loadu(x + i);
    const Vec t = s + v;
    (Vec::loadu(compensation + i) + addition_error(s, v, t)).store(compensation + i);
    t.store(sum + i);
  }
  for (; i < n; ++i) {
    const T t = sum[i] + x[i];
    compensation[i] +=
        std::abs(sum[i]) >= std::abs(x[i]) ? (sum[i] - t) + x[i] : (x[i] - t) + sum[i];
    sum[i] = t;
  }
}

template <typename T>
inline void fill(T* x, int64_t n, T value) {
  std::fill(x, x + n, value);
}

// Adds the partial sum `partial` into the compensated sum, and zeroes it for the next partial.
template <typename T>
inline void move_into_compensated(T* partial, int64_t n, T* sum, T* compensation) {
  add_compensated(partial, n, sum, compensation);
  fill(partial, n, T(0));
}

// partial[i] = sum[i] + compensation[i] + partial[i]: the total of a compensated sum and its
// last partial.
template <typename T>
inline void finish_compensated(T* partial, int64_t n, T* sum, T* compensation) {
  add_compensated(partial, n, sum, compensation);
  for (int64_t i = 0; i < n; ++i) partial[i] = sum[i] + compensation[i];
}

}  // namespace block_attn::cpu
