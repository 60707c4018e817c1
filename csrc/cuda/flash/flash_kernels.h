// Tensor-core (mma.sync, sm_80+) kernels for float16 and bfloat16.
#pragma once

#include <cuda_runtime.h>

#include "../../attention_params.h"

namespace block_attn::cuda {

// kHeadDim: head_dim rounded up to 64, 128 or 256; the padding is zero-filled in shared memory.
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_fwd_flash(const ForwardParams& params, cudaStream_t stream);

// kHeadDim: head_dim rounded up to 64 or 128 (larger head dims use the simple backward).
// delta: the workspace of launch_backward (float, (batch, heads_q, seqlen_q)). dq_accumulator:
// null for the deterministic dQ kernel, else (batch, heads_q, seqlen_q, head_dim) float32 scratch
// for dQ by atomics (zeroed here). kKeyWarps: warps of a dK/dV CTA, 16 keys each.
template <typename T, int kHeadDim, bool kIsCausal, int kKeyWarps = 4>
cudaError_t run_bwd_flash(const BackwardParams& params, void* delta, float* dq_accumulator,
                          cudaStream_t stream);

}  // namespace block_attn::cuda
