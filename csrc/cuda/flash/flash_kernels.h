// Tensor-core (mma.sync, sm_80+) kernels for float16 and bfloat16.
#pragma once

#include <cuda_runtime.h>

#include "../../attention_params.h"

namespace block_attn::cuda {

// kHeadDim: head_dim rounded up to 64, 128 or 256; the padding is zero-filled in shared memory.
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_fwd_flash(const ForwardParams& params, cudaStream_t stream);

// (row, head) pairs per query tile of the decoding forward (one 16-row mma group), and keys per
// tile (16 for each of its four warps).
constexpr int kDecodeLanes = 16;
constexpr int kDecodeKeyTile = 64;

// Query tiles of the decoding forward per (block, kv head): the longest block's rows times the
// query heads that share a kv head, 16 to a tile; at least one, whose CTAs of the last block
// write the rows after it even where every block is empty.
inline int decode_lane_tiles(const ForwardParams& params) {
  const int groups = params.heads_q / params.heads_kv;
  const int rows = params.max_seqlen_q > 0 ? params.max_seqlen_q : 1;
  return (rows * groups + kDecodeLanes - 1) / kDecodeLanes;
}

// The forward for blocks of few queries against long key blocks (decoding against per-sequence
// caches): the query heads that share a kv head share 16-row tiles, and every block's keys are
// split over `splits` CTAs. With splits > 1, split_partials is scratch for their partial results:
// splits * batch * heads_q * seqlen_q * (head_dim + 1) floats. kHeadDim: as run_fwd_flash.
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_fwd_decode(const ForwardParams& params, int splits, float* split_partials,
                           cudaStream_t stream);

// kHeadDim: head_dim rounded up to 64, 128 or 256 (256 needs flash_bwd_min_shared_bytes<256>()
// of shared memory per CTA; bwd_traits.h).
// delta: the workspace of launch_backward (float, (batch, heads_q, seqlen_q)). dq_accumulator:
// null for the deterministic dQ kernel, else (batch, heads_q, seqlen_q, head_dim) float32 scratch
// for dQ by atomics (zeroed here). max_shared_bytes: the device's opt-in shared memory per CTA
// (cudaDevAttrMaxSharedMemoryPerBlockOptin), which picks the tiles.
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_bwd_flash(const BackwardParams& params, void* delta, float* dq_accumulator,
                          int max_shared_bytes, cudaStream_t stream);

}  // namespace block_attn::cuda
