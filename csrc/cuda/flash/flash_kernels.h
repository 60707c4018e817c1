// Tensor-core (mma.sync, sm_80+) kernels for float16 and bfloat16.
#pragma once

#include <cuda_runtime.h>

#include "../../attention_params.h"

namespace block_attn::cuda {

// kHeadDim: head_dim rounded up to 64, 128 or 256; the padding is zero-filled in shared memory.
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_fwd_flash(const ForwardParams& params, cudaStream_t stream);

}  // namespace block_attn::cuda
