// Work items of the CPU kernels: tiles of one block, listed once so that blocks of very
// different lengths still balance across threads.
#pragma once

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../attention_params.h"

namespace block_attn::cpu {

// The thread count that work splitting plans for. Under torch.use_deterministic_algorithms(True)
// it is fixed, so that the split (and with it the rounding of merged partials) does not depend on
// torch.set_num_threads.
constexpr int64_t kDeterministicPlanThreads = 16;
inline int64_t planning_threads() {
  return at::globalContext().deterministicAlgorithms() ? kDeterministicPlanThreads
                                                       : at::get_num_threads();
}

// Rows [begin, end) of block `block`, local to the block.
struct Tile {
  int block;
  int begin;
  int end;
};

struct BlockExtent {
  int64_t q_start;
  int64_t k_start;
  int len_q;
  int len_k;
};

inline BlockExtent block_extent(const ForwardParams& p, int block) {
  const int64_t q0 = p.cu_seqlens_q[block], q1 = p.cu_seqlens_q[block + 1];
  const int64_t k0 = p.cu_seqlens_k[block], k1 = p.cu_seqlens_k[block + 1];
  return {q0, k0, static_cast<int>(q1 - q0), static_cast<int>(k1 - k0)};
}

// The offsets live in host memory for CPU kernels, so they are checked here once: an invalid
// list would otherwise index out of bounds.
inline void check_host_offsets(const int32_t* offsets, int num_blocks, int seqlen,
                               const char* name) {
  TORCH_CHECK(offsets[0] == 0, name, " must start at 0, got ", offsets[0]);
  for (int j = 0; j < num_blocks; ++j) {
    TORCH_CHECK(offsets[j + 1] >= offsets[j], name, " must be non-decreasing, but offset ", j + 1,
                " (", offsets[j + 1], ") < offset ", j, " (", offsets[j], ")");
  }
  TORCH_CHECK(offsets[num_blocks] <= seqlen, name, " must end at most at the sequence length ",
              seqlen, ", got ", offsets[num_blocks]);
}

// The end of the tile of `tile` positions that starts at `begin`, or `end` if sooner. Tile loops
// step with it rather than `+= tile`: it never passes `end`, so a block of up to INT32_MAX
// positions cannot overflow its int counter.
inline int tile_end(int begin, int end, int tile) {
  return end - begin > tile ? begin + tile : end;
}

// Splits every block's rows (queries when `by_query`, else keys) into tiles of `tile` rows.
inline std::vector<Tile> make_tiles(const ForwardParams& p, int tile, bool by_query) {
  std::vector<Tile> tiles;
  for (int j = 0; j < p.num_blocks; ++j) {
    const BlockExtent e = block_extent(p, j);
    const int len = by_query ? e.len_q : e.len_k;
    for (int r = 0; r < len; r = tile_end(r, len, tile)) {
      tiles.push_back({j, r, tile_end(r, len, tile)});
    }
  }
  return tiles;
}

// Which keys each query of a block sees: local query i stands at i' = i + len_k - len_q and sees
// local key t iff -right <= i' - t <= left (a side of -1 is unbounded; causal makes right 0). The
// keys a query sees, and the queries that see a key, are one interval each; all arithmetic is in
// int64, as i' + left passes INT32_MAX near the int32 edge.
struct KeyWindow {
  int64_t left = -1;
  int64_t right = -1;

  bool masks() const { return left >= 0 || right >= 0; }
};

inline KeyWindow key_window(const ForwardParams& p) {
  return {p.window_left, p.is_causal ? 0 : p.window_right};
}

inline int clamp_to(int64_t value, int hi) {
  return static_cast<int>(std::clamp<int64_t>(value, 0, hi));
}

// Local query `query` sees keys [window_key_begin, window_key_end).
inline int window_key_begin(int query, const BlockExtent& e, const KeyWindow& w) {
  if (w.left < 0) return 0;
  return clamp_to(static_cast<int64_t>(query) + e.len_k - e.len_q - w.left, e.len_k);
}
inline int window_key_end(int query, const BlockExtent& e, const KeyWindow& w) {
  if (w.right < 0) return e.len_k;
  return clamp_to(static_cast<int64_t>(query) + e.len_k - e.len_q + w.right + 1, e.len_k);
}

// Local key `key` is seen by queries [window_query_begin, window_query_end).
inline int window_query_begin(int key, const BlockExtent& e, const KeyWindow& w) {
  if (w.right < 0) return 0;
  return clamp_to(static_cast<int64_t>(key) - w.right - (e.len_k - e.len_q), e.len_q);
}
inline int window_query_end(int key, const BlockExtent& e, const KeyWindow& w) {
  if (w.left < 0) return e.len_q;
  return clamp_to(static_cast<int64_t>(key) + w.left + 1 - (e.len_k - e.len_q), e.len_q);
}

}  // namespace block_attn::cpu
