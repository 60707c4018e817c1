// Tile shapes of the simple kernels.
#pragma once

#include "../utils.cuh"

namespace block_attn::cuda {

template <typename T, int kHeadDim_>
struct SimpleTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // Values of a row each lane holds: lane l owns columns l, l + 32, ...
  static constexpr int kPerLane = kHeadDim / 32;
  // Rows a warp owns; fewer at head_dim 256 to bound registers (four row vectors each).
  static constexpr int kRowsPerWarp = kPerLane >= 8 ? 2 : 4;
  static constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
  // Rows of the staged tile: two tensors of kTileRows x kHeadDim in at most 40 KiB of shared
  // memory (below the 48 KiB that needs no opt-in), at most one row per lane so a lane can hold
  // one score of the tile.
  static constexpr int kTileRows =
      floor_pow2(40960 / (2 * kHeadDim * static_cast<int>(sizeof(T)))) < 32
          ? floor_pow2(40960 / (2 * kHeadDim * static_cast<int>(sizeof(T))))
          : 32;
  static constexpr int kSharedBytes = 2 * kTileRows * kHeadDim * static_cast<int>(sizeof(T));
  // The dK/dV pass also stages lse and Delta of the tile's queries.
  static constexpr int kKeySharedBytes =
      kSharedBytes + 2 * kTileRows * static_cast<int>(sizeof(Acc<T>));
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dim must be 32, 64, 128 or 256");
};

// Copies rows [row0, row0 + kTileRows) of a (rows, head_dim) matrix into shared memory, with zeros
// past `rows` and past head_dim, so the padded columns add nothing to dot products.
template <typename Traits, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* base, int64_t row_stride, int row0,
                                          int rows, int head_dim) {
  for (int idx = threadIdx.x; idx < Traits::kTileRows * Traits::kHeadDim; idx += Traits::kThreads) {
    const int r = idx / Traits::kHeadDim;
    const int d = idx % Traits::kHeadDim;
    const int row = row0 + r;
    smem[idx] = (row < rows && d < head_dim) ? base[static_cast<int64_t>(row) * row_stride + d]
                                             : from_acc<T>(Acc<T>(0));
  }
}

// Loads one row into a lane's registers (lane owns columns lane + 32 * e).
template <typename Traits, typename T>
__device__ __forceinline__ void load_row(Acc<T> (&reg)[Traits::kPerLane], const T* row,
                                         int head_dim, int lane) {
#pragma unroll
  for (int e = 0; e < Traits::kPerLane; ++e) {
    const int d = lane + 32 * e;
    reg[e] = d < head_dim ? to_acc(row[d]) : Acc<T>(0);
  }
}

template <typename Traits, typename T>
__device__ __forceinline__ void store_row(T* row, const Acc<T> (&reg)[Traits::kPerLane],
                                          Acc<T> factor, int head_dim, int lane) {
#pragma unroll
  for (int e = 0; e < Traits::kPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < head_dim) row[d] = from_acc<T>(reg[e] * factor);
  }
}

// Dot product of a register row with a shared-memory row, summed over the warp.
template <typename Traits, typename T>
__device__ __forceinline__ Acc<T> dot_row(const Acc<T> (&reg)[Traits::kPerLane], const T* srow,
                                          int lane) {
  Acc<T> s = 0;
#pragma unroll
  for (int e = 0; e < Traits::kPerLane; ++e) s += reg[e] * to_acc(srow[lane + 32 * e]);
  return warp_sum(s);
}

}  // namespace block_attn::cuda
