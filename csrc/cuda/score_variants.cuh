// The attention variants on the device (block_attn/variants.py): sliding window limits, softcap,
// ALiBi and the dropout factor, computed as the CPU kernels and the reference compute them.
#pragma once

#include <cstdint>

#include "../attention_params.h"
#include "../dropout_philox.h"
#include "../key_window.h"
#include "utils.cuh"

namespace block_attn::cuda {

// Whether a call needs the variant kernels (causal alone does not: its window is the plain one).
__host__ __device__ inline bool has_variants(const ForwardParams& p) {
  return p.window_left >= 0 || (p.window_right >= 0 && !p.is_causal) || p.softcap != 0 ||
         p.alibi_slopes != nullptr || p.dropout_seed_offset != nullptr || p.query_offset >= 0;
}

// The ALiBi slope of (batch, head), 0 without ALiBi.
template <typename A>
__device__ __forceinline__ A alibi_slope(const ForwardParams& p, int batch, int head) {
  if (p.alibi_slopes == nullptr) return A(0);
  return static_cast<A>(p.alibi_slopes[batch * p.alibi_batch_stride + head]);
}

// The scaled score s of local query i and key t of a block with this window (key_window.h) after
// the softcap and ALiBi; `tanh_out` gets the softcap's tanh (0 without one), whose 1 - tanh^2 the
// backward multiplies dS by.
template <typename A>
__device__ __forceinline__ A transformed_score(const ForwardParams& p, A s, A slope, int i, int t,
                                               int len_q, int len_k, const KeyWindow& window,
                                               A& tanh_out) {
  tanh_out = A(0);
  if (p.softcap != 0) {
    const A cap = static_cast<A>(p.softcap);
    tanh_out = tanh(s / cap);
    s = cap * tanh_out;
  }
  if (p.alibi_slopes != nullptr) {
    const int64_t distance = key_distance(i, t, len_q, len_k, window);
    s -= slope * static_cast<A>(distance < 0 ? -distance : distance);
  }
  return s;
}

// 1 / (1 - p) where dropout keeps the probability of (batch_head = b * Hq + h, query row, key
// row) of the call, else 0; 1 without dropout.
template <typename A>
__device__ __forceinline__ A dropout_factor(const ForwardParams& p, int batch_head, int64_t row,
                                            int64_t key) {
  if (p.dropout_seed_offset == nullptr) return A(1);
  const bool keep = dropout_keep(static_cast<uint64_t>(p.dropout_seed_offset[0]),
                                 static_cast<uint64_t>(p.dropout_seed_offset[1]),
                                 static_cast<uint32_t>(batch_head), dropout_query_row(p, row),
                                 dropout_key_row(p, key), p.dropout_threshold);
  return keep ? static_cast<A>(p.dropout_scale) : A(0);
}

// dropout_factor of keys key and key + 1 of one row: one Philox block serves both when key is
// even.
template <typename A>
__device__ __forceinline__ void dropout_factor_pair(const ForwardParams& p, int batch_head,
                                                    int64_t row, int64_t key, A& first, A& second) {
  if (p.dropout_seed_offset == nullptr) {
    first = second = A(1);
    return;
  }
  const int64_t global_key = dropout_key_row(p, key);
  if (global_key % 2 != 0) {
    first = dropout_factor<A>(p, batch_head, row, key);
    second = dropout_factor<A>(p, batch_head, row, key + 1);
    return;
  }
  const PhiloxWords words =
      dropout_words(static_cast<uint64_t>(p.dropout_seed_offset[0]),
                    static_cast<uint64_t>(p.dropout_seed_offset[1]),
                    static_cast<uint32_t>(batch_head), dropout_query_row(p, row), global_key);
  const int lane = static_cast<int>(global_key & 3);
  const A kept = static_cast<A>(p.dropout_scale);
  first = words.word(lane) >= p.dropout_threshold ? kept : A(0);
  second = words.word(lane + 1) >= p.dropout_threshold ? kept : A(0);
}

}  // namespace block_attn::cuda
