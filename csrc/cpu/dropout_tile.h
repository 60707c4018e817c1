// Dropout factors of a transposed probability tile (keys × lanes) on the CPU: 1 / (1 - p) where
// the rule of block_attn/dropout_mask.py keeps the probability, 0 where it drops it. One Philox
// block gives a lane's decisions for four consecutive keys, computed for all lanes at once.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../attention_params.h"
#include "../dropout_philox.h"
#include "score_variants.h"

namespace block_attn::cpu {

// The Philox counter words of a tile's lanes that do not depend on the key: the query's global
// row and b * Hq + h.
struct DropoutLanes {
  alignas(64) uint32_t row[kTileLanes];
  alignas(64) uint32_t batch_head[kTileLanes];
};

// Lane l of a tile is query row `first_row + l / heads` of the call, head `first_head + l % heads`.
inline void fill_dropout_lanes(const ForwardParams& p, int batch, int first_head, int heads,
                               int64_t first_row, int used, DropoutLanes& lanes) {
  for (int l = 0; l < kTileLanes; ++l) {
    const int lane = std::min(l, std::max(used - 1, 0));  // padding lanes repeat the last one
    lanes.row[l] = static_cast<uint32_t>(dropout_query_row(p, first_row + lane / heads));
    lanes.batch_head[l] =
        static_cast<uint32_t>(static_cast<int64_t>(batch) * p.heads_q + first_head + lane % heads);
  }
}

// factors_t[c * kTileLanes + l] for the call's keys [call_key, call_key + cols) and lanes
// [0, lanes).
template <typename acc>
void dropout_factors(const ForwardParams& p, const DropoutLanes& lanes, int64_t call_key, int cols,
                     int lane_count, acc* factors_t) {
  const int64_t first_key = dropout_key_row(p, call_key);
  const PhiloxKey key = philox_key(static_cast<uint64_t>(p.dropout_seed_offset[0]));
  const auto offset = static_cast<uint32_t>(p.dropout_seed_offset[1]);
  const uint32_t threshold = p.dropout_threshold;
  const acc kept = static_cast<acc>(p.dropout_scale);
  alignas(64) uint32_t words[4][kTileLanes];
  const int64_t end_key = first_key + cols;
  for (int64_t quad = first_key >> 2; quad <= (end_key - 1) >> 2; ++quad) {
    philox4x32_10_lanes(static_cast<uint32_t>(quad), lanes.row, lanes.batch_head, offset, key,
                        lane_count, words[0], words[1], words[2], words[3]);
    for (int w = 0; w < 4; ++w) {
      const int64_t key_row = quad * 4 + w;
      if (key_row < first_key || key_row >= end_key) continue;
      acc* factors = factors_t + (key_row - first_key) * kTileLanes;
      for (int l = 0; l < lane_count; ++l) {
        factors[l] = words[w][l] >= threshold ? kept : acc(0);
      }
    }
  }
}

}  // namespace block_attn::cpu
