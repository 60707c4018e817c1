// Tile shapes of the tensor-core backward (bwd_flash.cuh), without device code, so that the
// dispatch can tell which devices have the shared memory they need.
#pragma once

#include <algorithm>

namespace block_attn::cuda {

// kRowWarps warps own consecutive 16-row groups; kColumnSplit warps share each group's rows, each
// accumulating kHeadDim / kColumnSplit columns (the dK/dV kernel at head_dim 256, whose two
// head_dim-wide accumulators would not fit in one warp's registers).
// kBlockStream_: rows of the streamed tiles (0: 64 up to head_dim 64, else 32).
template <int kHeadDim_, int kRowGroups_ = 1, int kRowWarps_ = 4, int kColumnSplit_ = 1,
          int kBlockStream_ = 0>
struct FlashBwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kRowGroups = kRowGroups_;  // 16-row mma groups per warp of owned rows
  static constexpr int kRowWarps = kRowWarps_;
  static constexpr int kColumnSplit = kColumnSplit_;
  static constexpr int kWarpColumns = kHeadDim / kColumnSplit;  // accumulator columns per warp
  static constexpr int kWarps = kRowWarps * kColumnSplit;
  static constexpr int kThreads = kWarps * 32;
  // Rows a CTA owns (16 per group) and rows of the tiles it streams. The streamed tile is 32 rows
  // at head_dim 128 so that two head_dim-wide accumulators plus two score tiles fit in registers.
  static constexpr int kRowsPerWarp = 16 * kRowGroups;
  static constexpr int kBlockOwn = kRowsPerWarp * kRowWarps;
  static constexpr int kBlockStream = kBlockStream_ > 0 ? kBlockStream_ : kHeadDim <= 64 ? 64 : 32;
  static constexpr int kSmemStride = kHeadDim + 8;  // elements; +16 bytes against bank conflicts
  // Two owned tiles plus two double-buffered streamed tiles, and per streamed row lse and Delta.
  static constexpr int kSharedBytes =
      (2 * kBlockOwn + 4 * kBlockStream) * kSmemStride * 2 + 2 * 2 * kBlockStream * 4;
  // Atomic dQ: the tile's dS^T (kBlockOwn keys x kBlockStream queries) for the dQ product, and
  // how the 16-query groups x head_dim columns of dQ_tile split over the warps.
  static constexpr int kDsStride = kBlockStream + 8;  // elements; +16 bytes against conflicts
  static constexpr int kDsBytes = kBlockOwn * kDsStride * 2;
  // Column split: each warp of a key group forms S^T and dP^T for kQueriesPerWarp of the
  // streamed queries and passes P^T and dS^T on through shared memory.
  static constexpr int kQueriesPerWarp = kBlockStream / kColumnSplit;
  // The dK/dV kernel's shared memory: with atomic dQ or a column split dS^T, and with a column
  // split also P^T.
  static constexpr int dkdv_shared_bytes(bool atomic_dq) {
    return kSharedBytes + (kColumnSplit > 1 ? 2 * kDsBytes : atomic_dq ? kDsBytes : 0);
  }
  static constexpr int kDqGroups = kBlockStream / 16;
  static constexpr int kDqColumns = kHeadDim * kDqGroups / kWarps;  // per warp
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 256, "unsupported head dim");
  static_assert(kWarps % kDqGroups == 0 && kDqColumns % 16 == 0, "dQ tile does not split");
  static_assert(kQueriesPerWarp % 8 == 0, "queries per warp: whole mma n-tiles");
};

// Warps that share each 16 rows of the dK/dV kernel: two at head_dim 256, where one warp's dK and
// dV accumulators would take 256 registers per thread.
constexpr int dkdv_column_split(int head_dim) {
  return head_dim > 128 ? 2 : 1;
}

// The dK/dV kernel's tiles: 4 groups of 16 keys.
template <int kHeadDim>
using DkDvTraits = FlashBwdTraits<kHeadDim, 1, 4, dkdv_column_split(kHeadDim)>;

// The dQ kernel's tiles: 64 queries (kRowGroups 16-row groups per warp).
template <int kHeadDim, int kRowGroups = 1>
using DqTraits = FlashBwdTraits<kHeadDim, kRowGroups>;

// Above head_dim 128 on devices whose CTAs get less shared memory than those tiles need (99 KiB
// on sm_86 and sm_89): dK/dV CTAs of 32 keys and dQ CTAs of 32 queries, streaming 16-row tiles.
template <int kHeadDim>
using NarrowDkDvTraits = FlashBwdTraits<kHeadDim, 1, 2, dkdv_column_split(kHeadDim), 16>;
template <int kHeadDim>
using NarrowDqTraits = FlashBwdTraits<kHeadDim, 1, 2, 1, 16>;

// Shared memory per CTA of a backward's largest kernel: its dK/dV kernel with atomic dQ, or its
// dQ kernel.
template <typename DkDv, typename Dq>
constexpr int flash_bwd_shared_bytes() {
  return std::max(DkDv::dkdv_shared_bytes(true), Dq::kSharedBytes);
}

// Shared memory per CTA the tensor-core backward needs at head_dim kHeadDim (with its narrow
// tiles above 128).
template <int kHeadDim>
constexpr int flash_bwd_min_shared_bytes() {
  if constexpr (kHeadDim > 128) {
    return flash_bwd_shared_bytes<NarrowDkDvTraits<kHeadDim>, NarrowDqTraits<kHeadDim>>();
  } else {
    return flash_bwd_shared_bytes<DkDvTraits<kHeadDim>, DqTraits<kHeadDim>>();
  }
}

}  // namespace block_attn::cuda
