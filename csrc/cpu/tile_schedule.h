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
#include "../key_window.h"

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

// The window of block e (key_window.h).
inline KeyWindow key_window(const ForwardParams& p, const BlockExtent& e) {
  return block_window(p, e.q_start, e.k_start, e.len_q, e.len_k);
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

}  // namespace block_attn::cpu
