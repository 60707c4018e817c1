// Portable CUDA kernels for every dtype and head_dim <= 256: a warp owns a few rows and splits the
// head dimension across its lanes; key/value (or query) tiles are staged in shared memory. They
// carry float32/float64 and serve as the fallback where no tensor-core kernel applies.
#pragma once

#include <cuda_runtime.h>

#include "../../attention_params.h"

namespace block_attn::cuda {

// kHeadDim: head_dim rounded up to 32, 64, 128 or 256.
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_fwd_simple(const ForwardParams& params, cudaStream_t stream);

// delta: the workspace of launch_backward (accumulator type, (batch, heads_q, seqlen_q)).
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_bwd_simple(const BackwardParams& params, void* delta, cudaStream_t stream);

}  // namespace block_attn::cuda
