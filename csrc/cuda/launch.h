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

// The kernel families. Each call picks one, once (plan_forward / plan_backward), so that the
// caller's scratch allocation and the launch agree.
enum class KernelPath {
  kSimple,      // one thread per query row, every dtype and device (simple/)
  kTensorCore,  // mma.sync, ldmatrix and cp.async: float16/bfloat16 on sm_80+ (flash/)
  kHopper,      // warpgroup products (wgmma): float16/bfloat16 on sm_90 (hopper/)
  kDecode,      // forward only: float16/bfloat16 blocks of few queries (flash/fwd_decode.cuh)
};

// The family's name as plan_forward / plan_backward report it to Python.
inline const char* kernel_path_name(KernelPath path) {
  switch (path) {
    case KernelPath::kTensorCore:
      return "tensor_core";
    case KernelPath::kHopper:
      return "hopper";
    case KernelPath::kDecode:
      return "decode";
    case KernelPath::kSimple:
      break;
  }
  return "simple";
}

struct ForwardPlan {
  // kDecode for float16/bfloat16 blocks of at most 16 queries against longer key blocks, on
  // sm_80+, unless the environment variable BLOCK_ATTN_DECODE_KERNEL is "0". Otherwise kHopper
  // for float16/bfloat16 where hopper/hopper_shapes.h's forward shapes take the head_dim and the
  // longest key block, with 16-byte aligned rows on sm_90 in a build with sm_90a code, unless
  // BLOCK_ATTN_HOPPER_KERNELS is "0"; else kTensorCore for float16/bfloat16 on sm_80+; else
  // kSimple. Both variables are read by every plan, so a process can compare the paths.
  KernelPath path = KernelPath::kSimple;
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

struct BackwardPlan {
  // kTensorCore for float16/bfloat16 on sm_80+ (above head_dim 128, where the device has the
  // shared memory of their narrowest tiles: 70 KiB per CTA), kHopper where those run on sm_90 as
  // in ForwardPlan (at hopper/hopper_shapes.h's backward head dims), else kSimple.
  KernelPath path = KernelPath::kSimple;
  // The device's opt-in shared memory per CTA, from which the tensor-core backward picks its
  // tiles (0 on the simple path).
  int max_shared_bytes = 0;
  // Floats of BackwardWorkspace::dq_accumulator the launch needs: batch * heads_q * seqlen_q *
  // head_dim on the tensor-core and Hopper paths when params.deterministic is false and no key
  // block is longer than kMaxKeysPerAccumulator (utils.cuh) (dQ is then summed with atomics, in
  // an order that varies from run to run), else 0.
  size_t dq_accumulator_elements = 0;
};

cudaError_t plan_backward(const BackwardParams& params, DType dtype, BackwardPlan& plan);

// Scratch memory of the backward, allocated by the caller.
struct BackwardWorkspace {
  // (batch, heads_q, seqlen_q) contiguous: rowsum(grad_out * out) - grad_lse, in the accumulator
  // type (double for float64 inputs, float otherwise).
  void* delta = nullptr;
  // BackwardPlan::dq_accumulator_elements floats (uninitialised), or null where it says 0.
  float* dq_accumulator = nullptr;
};

// Writes params.out and params.lse, as plan_forward(params, dtype) planned. Returns the first
// launch error, or cudaSuccess.
cudaError_t launch_forward(const ForwardParams& params, const ForwardPlan& plan,
                           const ForwardWorkspace& workspace, DType dtype, cudaStream_t stream);

// Writes params.grad_q, grad_k and grad_v (fully overwritten), as plan_backward(params, dtype)
// planned. Where the plan needs no dq_accumulator, every output element is reduced by one thread
// in a fixed order: bitwise reproducible.
cudaError_t launch_backward(const BackwardParams& params, const BackwardPlan& plan,
                            const BackwardWorkspace& workspace, DType dtype, cudaStream_t stream);

}  // namespace block_attn::cuda
