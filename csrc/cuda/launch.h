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

// The forward's choices that need scratch memory, made once per call (plan_forward) so that the
// caller's allocation and the launch agree.
struct ForwardPlan {
  // Whether the decoding kernel runs: float16/bfloat16 blocks of at most 16 queries against longer
  // key blocks, on sm_80+, unless the environment variable BLOCK_ATTN_DECODE_KERNEL is "0".
  bool decode = false;
  // CTAs over which the decoding kernel splits every block's keys.
  int decode_splits = 1;
  // Floats of ForwardWorkspace::split_partials the launch needs: with more than one split, every
  // split's partial rows and log-sum-exps; else 0.
  size_t split_partials_elements = 0;
};

cudaError_t plan_forward(const ForwardParams& params, DType dtype, ForwardPlan& plan);

// Scratch memory of the forward, allocated by the caller.
struct ForwardWorkspace {
  // ForwardPlan::split_partials_elements floats (uninitialised), or null where it says 0.
  float* split_partials = nullptr;
};

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

// Writes params.out and params.lse, as plan_forward(params, dtype) planned. Returns the first
// launch error, or cudaSuccess.
cudaError_t launch_forward(const ForwardParams& params, const ForwardPlan& plan,
                           const ForwardWorkspace& workspace, DType dtype, cudaStream_t stream);

// Writes params.grad_q, grad_k and grad_v (fully overwritten). Without a dq_accumulator every
// output element is reduced by one thread in a fixed order: bitwise reproducible.
cudaError_t launch_backward(const BackwardParams& params, const BackwardWorkspace& workspace,
                            DType dtype, cudaStream_t stream);

}  // namespace block_attn::cuda
