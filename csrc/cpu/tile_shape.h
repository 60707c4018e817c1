// Tile sizes of the CPU kernels, per head dimension.
#pragma once

namespace block_attn::cpu {

struct TileShape {
  int block_m;  // query rows per tile
  int block_n;  // key rows per tile
};

// Forward: a (block_m x block_n) float score tile plus the k/v tiles should stay in L2
// (512 KiB-2 MiB per core on current x86). Wide key tiles amortise the per-tile softmax
// bookkeeping and give BLAS long inner loops.
inline TileShape forward_tile_shape(int head_dim) {
  if (head_dim <= 128) return {64, 256};
  return {64, 128};
}

// Backward: five products per tile pair and four score-sized tiles (S/P, dP/dS) per thread.
inline TileShape backward_tile_shape(int head_dim) {
  if (head_dim <= 128) return {64, 128};
  return {64, 64};
}

}  // namespace block_attn::cpu
