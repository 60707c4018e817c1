// Kernels on Hopper warpgroup products (wgmma) for bf16 and fp16 (T: __nv_bfloat16 or __half)
// at the head dims of hopper_shapes.h, with 16-byte aligned rows. Their bodies exist only in
// sm_90a code (a build whose TORCH_CUDA_ARCH_LIST has 9.0a).
#pragma once

#include <cuda_runtime.h>

#include "../../attention_params.h"
#include "hopper_shapes.h"

namespace block_attn::cuda::hopper {

// The forward with hopper_shapes.h's shape for kHeadDim (a head dim of ForwardHeadDims).
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_fwd_wgmma(const ForwardParams& params, cudaStream_t stream);

// Delta, dK / dV and dQ: by atomics into dq_accumulator ((batch, heads_q, seqlen_q, head_dim)
// float32 scratch, zeroed here), or with a null dq_accumulator from a dQ kernel that sums every
// element in a fixed order (deterministic). The dK/dV CTAs have hopper_shapes.h's
// BackwardShape<kHeadDim> (a head dim of BackwardHeadDims).
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_bwd_wgmma(const BackwardParams& params, float* delta, float* dq_accumulator,
                          cudaStream_t stream);

}  // namespace block_attn::cuda::hopper
