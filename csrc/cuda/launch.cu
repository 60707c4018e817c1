// Dispatch from runtime dtype / head dim / causal to the instantiated kernels.
#include "launch.h"
#include "simple/simple_kernels.h"
#include "static_switch.h"

namespace block_attn::cuda {

cudaError_t launch_forward(const ForwardParams& params, DType dtype, cudaStream_t stream) {
  if (params.head_dim < 1 || params.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  return DTYPE_SWITCH(dtype, T, [&] {
    return SIMPLE_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      return BOOL_SWITCH(params.is_causal, kIsCausal,
                         [&] { return run_fwd_simple<T, kHeadDim, kIsCausal>(params, stream); });
    });
  });
}

cudaError_t launch_backward(const BackwardParams& params, const BackwardWorkspace& workspace,
                            DType dtype, cudaStream_t stream) {
  if (params.head_dim < 1 || params.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  return DTYPE_SWITCH(dtype, T, [&] {
    return SIMPLE_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      return BOOL_SWITCH(params.is_causal, kIsCausal, [&] {
        return run_bwd_simple<T, kHeadDim, kIsCausal>(params, workspace.delta, stream);
      });
    });
  });
}

}  // namespace block_attn::cuda
