// Splitting the keys of the forward's query tiles over threads when there are too few tiles to
// keep every thread busy (decoding one sequence, MQA, a few long cross-attention blocks). Each
// key range keeps its unnormalised output, row maxima and row sums in its own slot; the slots
// are merged afterwards by their log-sum-exp, in range order, so results are bitwise repeatable
// for a given planned thread count (see planning_threads).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace block_attn::cpu {

// Tiles are split until no item exceeds 1/kForwardItemsPerThread of a thread's share of the
// work, into at most kMaxKeyRanges ranges of whole key tiles each.
constexpr int64_t kForwardItemsPerThread = 4;
constexpr int kMaxKeyRanges = 16;

// The largest cost an item may keep, or 0 when no item is split: one thread, or items already
// small against a thread's share of the total.
inline int64_t forward_split_cost(const std::vector<int64_t>& costs, int64_t threads) {
  if (threads <= 1 || costs.empty()) return 0;
  int64_t total = 0;
  int64_t largest = 0;
  for (const int64_t c : costs) {
    total += c;
    largest = std::max(largest, c);
  }
  const int64_t limit = std::max<int64_t>(1, total / (threads * kForwardItemsPerThread));
  return largest > limit ? limit : 0;
}

// Key ranges of whole `tile`-key tiles (counted from keys.begin) that split `keys` into pieces of
// about `limit` / `cost_per_key` keys each (one range: not split).
struct KeyRange {
  int begin;
  int end;
};
inline std::vector<KeyRange> split_keys(KeyRange keys, int tile, int64_t cost, int64_t limit) {
  // In int64: rounding the length up to whole tiles passes INT32_MAX near the int32 edge.
  const int64_t length = static_cast<int64_t>(keys.end) - keys.begin;
  const int64_t tiles = (length + tile - 1) / tile;
  if (tiles <= 1 || limit <= 0) return {keys};
  const int64_t wanted = (cost + limit - 1) / limit;
  const int64_t ranges = std::clamp<int64_t>(wanted, 1, std::min<int64_t>(tiles, kMaxKeyRanges));
  const int64_t tiles_per_range = (tiles + ranges - 1) / ranges;
  std::vector<KeyRange> out;
  for (int64_t t = 0; t < tiles; t += tiles_per_range) {
    const int64_t end = std::min<int64_t>(length, (t + tiles_per_range) * tile);
    out.push_back({static_cast<int>(keys.begin + t * tile), static_cast<int>(keys.begin + end)});
  }
  return out;
}

// One range's results for a tile's `lanes` (row, head) pairs: lanes × dim unnormalised outputs,
// then the lanes' row maxima (of the scaled scores) and row sums.
inline int64_t key_range_slot_size(int lanes, int dim) {
  return static_cast<int64_t>(lanes) * (dim + 2);
}

// T: acc to write a slot, const acc to read one.
template <typename T>
struct KeyRangeSlot {
  T* out;
  T* max;
  T* sum;
  KeyRangeSlot(T* base, int lanes, int dim)
      : out(base), max(base + static_cast<int64_t>(lanes) * dim), sum(max + lanes) {}
};

// Merges lane `lane` of `ranges` consecutive slots: merged_out (dim values) is normalised; returns
// the lse (-inf for a lane that saw no key: merged_out is then 0). A NaN sum stays visible.
template <typename acc>
acc merge_key_ranges(const acc* first_slot, int64_t slot_size, int ranges, int lanes, int dim,
                     int lane, acc* merged_out) {
  acc top = -std::numeric_limits<acc>::infinity();
  bool nan = false;
  for (int r = 0; r < ranges; ++r) {
    const KeyRangeSlot<const acc> slot(first_slot + r * slot_size, lanes, dim);
    top = std::max(top, slot.max[lane]);
    nan |= std::isnan(slot.sum[lane]);
  }
  if (nan) {
    std::fill(merged_out, merged_out + dim, std::numeric_limits<acc>::quiet_NaN());
    return std::numeric_limits<acc>::quiet_NaN();
  }
  std::fill(merged_out, merged_out + dim, acc(0));
  if (top == -std::numeric_limits<acc>::infinity()) return top;
  acc total = 0;
  for (int r = 0; r < ranges; ++r) {
    const KeyRangeSlot<const acc> slot(first_slot + r * slot_size, lanes, dim);
    if (slot.max[lane] == -std::numeric_limits<acc>::infinity()) continue;  // no key in range
    const acc weight = std::exp(slot.max[lane] - top);
    total += weight * slot.sum[lane];
    const acc* out = slot.out + static_cast<int64_t>(lane) * dim;
    for (int d = 0; d < dim; ++d) merged_out[d] += weight * out[d];
  }
  const acc inverse = total != acc(0) ? acc(1) / total : acc(0);
  for (int d = 0; d < dim; ++d) merged_out[d] *= inverse;
  return total != acc(0) ? top + std::log(total) : -std::numeric_limits<acc>::infinity();
}

}  // namespace block_attn::cpu
