// Kernels on Hopper warpgroup products (wgmma) for bf16 and fp16 (T: __nv_bfloat16 or __half)
// with head_dim 64 or 128 (forward: also 256) and 16-byte aligned rows. Their bodies exist only in
// sm_90a code (a build whose TORCH_CUDA_ARCH_LIST has 9.0a).
#pragma once

#include <cuda_runtime.h>

#include "../../attention_params.h"

namespace block_attn::cuda::hopper {

// kWarpgroups: warpgroups of 64 queries per CTA, sharing the K and V tiles (1 or 2). kBlockN:
// keys per tile (64, or 128 with 64 x 128 score products). kOverlapSoftmax: each tile's softmax
// runs while the tensor cores form the previous tile's P V (K and V double-buffered); otherwise
// the products and the softmax take turns. The default overlaps below head_dim 256, where double
// buffers (161 KiB of shared memory) would leave one warpgroup per SM.
template <typename T, int kHeadDim, bool kIsCausal, int kWarpgroups, int kBlockN = 64,
          bool kOverlapSoftmax = (kHeadDim < 256)>
cudaError_t run_fwd_wgmma(const ForwardParams& params, cudaStream_t stream);

// Delta, dK / dV and dQ: by atomics into dq_accumulator ((batch, heads_q, seqlen_q, head_dim)
// float32 scratch, zeroed here), or with a null dq_accumulator from a dQ kernel that sums every
// element in a fixed order (deterministic). kWarpgroups: warpgroups of 64 keys per dK/dV CTA
// (1 or 2).
template <typename T, int kHeadDim, bool kIsCausal, int kWarpgroups>
cudaError_t run_bwd_wgmma(const BackwardParams& params, float* delta, float* dq_accumulator,
                          cudaStream_t stream);

}  // namespace block_attn::cuda::hopper
