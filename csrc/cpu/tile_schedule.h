// Work lists for the CPU kernels: which tiles of which blocks to visit, and how threads share them.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace block_attn::cpu {

// One tile of rows [start, start + rows) local to block `block`.
struct BlockTile {
  int32_t block;
  int32_t start;
  int32_t rows;
};

// Every tile of tile_size rows inside every block of `offsets` (num_blocks + 1 entries), in
// block order. Under a causal mask the last query tiles and the first key tiles of a block do the
// most work; listing those first (last_first for query tiles) keeps the dynamic schedule's tail
// short.
inline std::vector<BlockTile> tiles_of_blocks(const int32_t* offsets, int num_blocks, int tile_size,
                                              bool last_first) {
  std::vector<BlockTile> tiles;
  for (int32_t j = 0; j < num_blocks; ++j) {
    const int32_t length = offsets[j + 1] - offsets[j];
    const int32_t count = (length + tile_size - 1) / tile_size;
    for (int32_t i = 0; i < count; ++i) {
      const int32_t start = (last_first ? count - 1 - i : i) * tile_size;
      tiles.push_back({j, start, std::min(tile_size, length - start)});
    }
  }
  return tiles;
}

// Runs body(scratch, item) for item in [0, num_items) on ATen's intra-op threads. Each thread
// makes one Scratch with make_scratch() and claims items one at a time from a shared counter, so
// small and large blocks balance. Every item writes its own outputs, so results do not depend on
// which thread ran it: the counter only hands out work.
template <typename MakeScratch, typename Body>
void parallel_for_items(int64_t num_items, const MakeScratch& make_scratch, const Body& body) {
  if (num_items <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    auto scratch = make_scratch();
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t item = next.fetch_add(1); item < num_items; item = next.fetch_add(1)) {
        body(scratch, item);
      }
    }
  });
}

}  // namespace block_attn::cpu
