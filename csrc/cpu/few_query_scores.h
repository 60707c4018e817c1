// Scores of a tile that holds only a few queries (decoding: one token per sequence, times the
// query heads of one kv head), as dot products along head_dim.
//
// The register-tiled product puts queries along the vector lanes, so a tile of 1-8 queries
// leaves most of each vector idle and reads K one broadcast element at a time. Here K rows are
// read as whole vectors, each multiplied by every query held in the accumulation type, and each
// (key, query) dot product ends in one horizontal sum.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "micro_kernel.h"
#include "tile_math.h"

namespace block_attn::cpu {

// Tiles with at most this many (query, head) lanes take the dot-product path, which beats the
// register-tiled product there (decoding). Above 8 the accumulators of two keys do not fit in
// AVX-512's 32 vector registers.
constexpr int kFewQueries = 8;

// With so few products per byte the loop waits on memory; K and V rows this many keys ahead are
// prefetched.
constexpr int kPrefetchKeys = 16;

// Rows of K and V read next: the tile's keys, and the value rows P · V will read after it.
template <typename scalar_t>
struct KeyValueRows {
  const scalar_t* k;
  int64_t k_stride;
  const scalar_t* v;
  int64_t v_stride;
};

// scores_t[(c + key) * ld_scores + j] = Σ_d k[(c + key) · stride + d] · queries[j · ld + d] for
// the kKeys keys from c and queries j < kQueries; queries are in the accumulation type,
// zero-padded to whole vectors.
template <int kQueries, int kKeys, typename scalar_t>
inline void dot_keys(const KeyValueRows<scalar_t>& rows, int c, int cols, int dim,
                     const acc_t<scalar_t>* queries, int64_t ld, acc_t<scalar_t>* scores_t,
                     int64_t ld_scores) {
  using Vec = at::vec::Vectorized<acc_t<scalar_t>>;
  constexpr int W = kVecWidth<acc_t<scalar_t>>;
  Vec sums[kKeys][kQueries];
#pragma GCC unroll 8
  for (int key = 0; key < kKeys; ++key) {
#pragma GCC unroll 8
    for (int j = 0; j < kQueries; ++j) sums[key][j] = Vec(0);
  }
  const bool prefetch = c + kPrefetchKeys + kKeys <= cols;
  for (int d = 0; d < dim; d += W) {
    if (prefetch) {
#pragma GCC unroll 8
      for (int key = 0; key < kKeys; ++key) {
        __builtin_prefetch(rows.k + (c + kPrefetchKeys + key) * rows.k_stride + d);
        __builtin_prefetch(rows.v + (c + kPrefetchKeys + key) * rows.v_stride + d);
      }
    }
    Vec key_values[kKeys];
#pragma GCC unroll 8
    for (int key = 0; key < kKeys; ++key) {
      key_values[key] = load_as_acc(rows.k + (c + key) * rows.k_stride + d, std::min(W, dim - d));
    }
#pragma GCC unroll 8
    for (int j = 0; j < kQueries; ++j) {
      const Vec query = Vec::loadu(queries + j * ld + d);
#pragma GCC unroll 8
      for (int key = 0; key < kKeys; ++key) {
        sums[key][j] = at::vec::fmadd(key_values[key], query, sums[key][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int key = 0; key < kKeys; ++key) {
#pragma GCC unroll 8
    for (int j = 0; j < kQueries; ++j) {
      scores_t[(c + key) * ld_scores + j] = horizontal_sum(sums[key][j]);
    }
  }
}

// The scores of keys c < cols against kQueries queries. Two keys at a time give 2·kQueries
// independent accumulator chains, where the registers hold them (accumulators, the keys'
// vectors and one query vector).
template <int kQueries, typename scalar_t>
void few_query_scores_fixed(const KeyValueRows<scalar_t>& rows, int cols, int dim,
                            const acc_t<scalar_t>* queries, int64_t ld, acc_t<scalar_t>* scores_t,
                            int64_t ld_scores) {
  constexpr int kKeys = 2 * kQueries + 2 + 1 <= kVectorRegisters ? 2 : 1;
  int c = 0;
  for (; c + kKeys <= cols; c += kKeys) {
    dot_keys<kQueries, kKeys>(rows, c, cols, dim, queries, ld, scores_t, ld_scores);
  }
  for (; c < cols; ++c) {
    dot_keys<kQueries, 1>(rows, c, cols, dim, queries, ld, scores_t, ld_scores);
  }
}

// The same for 1 ≤ queries ≤ kFewQueries; lanes [queries, lanes) of each key's row are zeroed
// so that the softmax over whole vectors reads no stale values.
template <typename scalar_t, int kQueries = kFewQueries>
void few_query_scores(const KeyValueRows<scalar_t>& rows, int cols, int dim,
                      const acc_t<scalar_t>* queries, int64_t ld, int count, int lanes,
                      acc_t<scalar_t>* scores_t, int64_t ld_scores) {
  if constexpr (kQueries > 1) {
    if (count < kQueries) {
      return few_query_scores<scalar_t, kQueries - 1>(rows, cols, dim, queries, ld, count, lanes,
                                                      scores_t, ld_scores);
    }
  }
  few_query_scores_fixed<kQueries>(rows, cols, dim, queries, ld, scores_t, ld_scores);
  if (lanes > kQueries) {
    for (int c = 0; c < cols; ++c) {
      std::fill(scores_t + c * ld_scores + kQueries, scores_t + c * ld_scores + lanes,
                acc_t<scalar_t>(0));
    }
  }
}

}  // namespace block_attn::cpu
