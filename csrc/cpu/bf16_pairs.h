// bfloat16 tile products on AVX512-BF16's vdpbf16ps, and the packing into its operand layout.
//
// A 32-bit lane holds a pair of bf16 values adjacent along the reduction dimension; one
// instruction multiplies 16 pairs by 16 pairs and adds both products into 16 float32 sums: twice
// the multiply-adds of a float32 FMA. A is read one pair at a time (a broadcast); B is a row of
// pairs per two reduction steps ("VNNI" layout). Products accumulate in float32.
#pragma once

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define BLOCK_ATTN_BF16_PAIRS 1
#endif

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "micro_kernel.h"

#ifdef BLOCK_ATTN_BF16_PAIRS
#include <immintrin.h>
#endif

namespace block_attn::cpu {

// Whether scalar_t's products run on bf16 pairs on this build.
template <typename scalar_t>
constexpr bool kUsesBf16Pairs =
#ifdef BLOCK_ATTN_BF16_PAIRS
    std::is_same_v<scalar_t, c10::BFloat16>;
#else
    false;
#endif

// Two bf16 values: the even index in the low half, the odd one in the high half.
using Bf16Pair = uint32_t;

inline uint32_t bf16_bits(c10::BFloat16 x) {
  return x.x;
}
inline uint32_t bf16_bits(float x) {
  return c10::BFloat16(x).x;
}  // round to nearest even

// A in pairs: element (i, p) covers reduction indices 2p and 2p + 1 of row i.
using PairMatrix = StridedMatrix<Bf16Pair>;

// dst[p * ld + r] = (src[r][2p], src[r][2p + 1]): rows become lanes, pairs run along dim (zero
// high half when dim is odd). Q and dO as the B operand of products reduced over head_dim.
// bf16 rows of even length and stride are rows of pairs already: a transpose of 32-bit words,
// which at::vec's register transpose does (bit for bit: it only moves them).
template <typename scalar_t>
inline void pack_pairs_transposed(const scalar_t* src, int64_t stride, int rows, int dim,
                                  Bf16Pair* dst, int64_t ld) {
#ifdef BLOCK_ATTN_BF16_PAIRS
  if (std::is_same_v<scalar_t, c10::BFloat16> && dim % 2 == 0 && stride % 2 == 0 &&
      reinterpret_cast<uintptr_t>(src) % 4 == 0) {
    at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(src), stride / 2,
                                  reinterpret_cast<float*>(dst), ld, rows, dim / 2);
    return;
  }
#endif
  for (int r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * stride;
    for (int p = 0; 2 * p < dim; ++p) {
      const uint32_t high = 2 * p + 1 < dim ? bf16_bits(in[2 * p + 1]) : 0;
      dst[p * ld + r] = bf16_bits(in[2 * p]) | (high << 16);
    }
  }
}

// dst[r * ld + p] = (src[r][2p], src[r][2p + 1]): rows kept, pairs along dim. K or V rows as
// the A operand when they cannot be read in place.
template <typename scalar_t>
inline void pack_pairs(const scalar_t* src, int64_t stride, int rows, int dim, Bf16Pair* dst,
                       int64_t ld) {
  for (int r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * stride;
    for (int p = 0; 2 * p < dim; ++p) {
      const uint32_t high = 2 * p + 1 < dim ? bf16_bits(in[2 * p + 1]) : 0;
      dst[r * ld + p] = bf16_bits(in[2 * p]) | (high << 16);
    }
  }
}

#ifdef BLOCK_ATTN_BF16_PAIRS

// 16 lanes of row pairs: (a[i], b[i]) as bf16, rounded to nearest even from float32.
inline __m512i interleave16(const float* a, const float* b) {
  const __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a)));
  const __m512i high = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(b)));
  return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}
inline __m512i interleave16(const c10::BFloat16* a, const c10::BFloat16* b) {
  const __m512i low =
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  const __m512i high =
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}

// dst[(r / 2) * ld + d] = (src[r][d], src[r + 1][d]) for d < dim, zero for dim <= d < ld (ld a
// multiple of 16): pairs run down the rows. The B operand of products reduced over rows (V, K,
// Q, dO), and P or dS as the A operand of products reduced over keys.
template <typename T>
inline void pack_row_pairs(const T* src, int64_t stride, int rows, int dim, Bf16Pair* dst,
                           int64_t ld) {
  alignas(64) T zeros[16] = {};
  alignas(64) T edge[2][16];
  for (int64_t r = 0; r < rows; r += 2) {  // int64: r + 2 passes INT32_MAX for odd rows
    const T* first = src + r * stride;
    const T* second = r + 1 < rows ? src + (r + 1) * stride : nullptr;
    Bf16Pair* out = dst + (r / 2) * ld;
    int d = 0;
    for (; d + 16 <= dim; d += 16) {
      _mm512_storeu_si512(out + d, interleave16(first + d, second ? second + d : zeros));
    }
    if (d < ld) {  // the partial vector and the zero padding
      std::memset(edge, 0, sizeof(edge));
      for (int e = d; e < dim; ++e) {
        edge[0][e - d] = first[e];
        if (second) edge[1][e - d] = second[e];
      }
      _mm512_storeu_si512(out + d, interleave16(edge[0], edge[1]));
      for (d += 16; d < ld; d += 16) _mm512_storeu_si512(out + d, _mm512_setzero_si512());
    }
  }
}

// dst[r * ld + c] = bf16(src[r * ld_src + c]) for c < cols (a multiple of 16): P or dS rows as
// the A operand of products reduced over their columns, pairs being adjacent columns.
inline void convert_rows_to_bf16(const float* src, int64_t ld_src, int rows, int cols,
                                 c10::BFloat16* dst, int64_t ld) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; c += 16) {
      const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + r * ld_src + c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * ld + c), (__m256i)packed);
    }
  }
}

// C[rows × vectors·16] (+)= A · B over `pairs` pairs of the reduction dimension, float32 sums.
struct Bf16PairProduct {
  using AMatrix = PairMatrix;
  using BElement = Bf16Pair;
  using CElement = float;
  static constexpr int kLanes = 16;
  static constexpr int kRows = 6;
  static constexpr int kVectors = 4;

  template <int kTileRows, int kTileVectors, bool kAccumulate>
  static void run(int pairs, AMatrix a, const Bf16Pair* b, int64_t ldb, float* c, int64_t ldc) {
    __m512 acc[kTileRows][kTileVectors];
#pragma GCC unroll 8
    for (int i = 0; i < kTileRows; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < kTileVectors; ++j) {
        acc[i][j] = kAccumulate ? _mm512_loadu_ps(c + i * ldc + j * 16) : _mm512_setzero_ps();
      }
    }
    for (int p = 0; p < pairs; ++p) {
      __m512bh b_row[kTileVectors];
#pragma GCC unroll 8
      for (int j = 0; j < kTileVectors; ++j) {
        b_row[j] = (__m512bh)_mm512_loadu_si512(b + p * ldb + j * 16);
      }
#pragma GCC unroll 8
      for (int i = 0; i < kTileRows; ++i) {
        const __m512bh a_pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(*a.at(i, p)));
#pragma GCC unroll 8
        for (int j = 0; j < kTileVectors; ++j) {
          acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a_pair, b_row[j]);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < kTileRows; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < kTileVectors; ++j) _mm512_storeu_ps(c + i * ldc + j * 16, acc[i][j]);
    }
  }
};

#endif  // BLOCK_ATTN_BF16_PAIRS

}  // namespace block_attn::cpu
