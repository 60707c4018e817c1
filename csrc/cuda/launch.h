// Launch interface of the CUDA kernels. Plain CUDA: no ATen here, so the kernel files compile
// without torch headers; the torch glue (register_cuda.cpp) maps tensors to these calls.
#pragma once

#include <cuda_runtime.h>

#include "../attention_params.h"

namespace block_attn::cuda {

// Element types the kernels are built for; float16 and bfloat16 accumulate in float32,
// float64 in double.
enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Largest head_dim the kernels support.
constexpr int kMaxHeadDim = 256;

// Scratch memory of the forward, allocated by the caller.
struct ForwardWorkspace {
  // forward_split_partials_elements floats (uninitialised), or null where it says 0.
  float* split_partials = nullptr;
};

// Floats of ForwardWorkspace::split_partials that launch_forward needs: where the decoding kernel
// (blocks of at most 16 queries against longer key blocks, float16/bfloat16) splits every block's
// keys over several CTAs, their partial rows and log-sum-exps, else 0.
cudaError_t forward_split_partials_elements(const ForwardParams& params, DType dtype,
                                            size_t& elements);

// Scratch memory of the backward, allocated by the caller.
struct BackwardWorkspace {
  // (batch, heads_q, seqlen_q) contiguous: rowsum(grad_out * out) - grad_lse, in the accumulator
  // type (double for float64 inputs, float otherwise).
  void* delta = nullptr;
  // backward_dq_accumulator_elements floats (uninitialised), or null where it says 0.
  float* dq_accumulator = nullptr;
};

// Floats of BackwardWorkspace::dq_accumulator that launch_backward needs: batch * heads_q *
// seqlen_q * head_dim where the tensor-core backward runs and params.deterministic is false
// (dQ is then summed with atomics, in an order that varies from run to run), else 0.
cudaError_t backward_dq_accumulator_elements(const BackwardParams& params, DType dtype,
                                             size_t& elements);

// Writes params.out and params.lse. Returns the first launch error, or cudaSuccess.
cudaError_t launch_forward(const ForwardParams& params, const ForwardWorkspace& workspace,
                           DType dtype, cudaStream_t stream);

// Writes params.grad_q, grad_k and grad_v (fully overwritten). Without a dq_accumulator every
// output element is reduced by one thread in a fixed order: bitwise reproducible.
cudaError_t launch_backward(const BackwardParams& params, const BackwardWorkspace& workspace,
                            DType dtype, cudaStream_t stream);

}  // namespace block_attn::cuda
