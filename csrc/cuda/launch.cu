// Dispatch from runtime dtype / head dim / causal to the instantiated kernels.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "flash/bwd_traits.h"
#include "flash/flash_kernels.h"
#include "flash/tile_io.cuh"
#include "hopper/hopper_kernels.h"
#include "kernel_launch.cuh"
#include "launch.h"
#include "score_variants.cuh"
#include "simple/simple_kernels.h"
#include "static_switch.h"
#include "utils.cuh"

namespace block_attn::cuda {
namespace {

// The current device's compute capability.
cudaError_t compute_capability(int& major, int& minor) {
  minor = 0;
  const cudaError_t err = current_device_attribute(cudaDevAttrComputeCapabilityMajor, major);
  if (err != cudaSuccess) return err;
  return current_device_attribute(cudaDevAttrComputeCapabilityMinor, minor);
}

bool is_half_type(DType dtype) {
  return dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

bool head_dim_supported(int head_dim) {
  return head_dim >= 1 && head_dim <= kMaxHeadDim;
}

// Whether the environment variable `name` is "0": a kernel path switched off. Read at every
// plan, so a process can compare both paths.
bool switched_off(const char* name) {
  const char* setting = std::getenv(name);
  return setting != nullptr && std::strcmp(setting, "0") == 0;
}

// mma.sync, ldmatrix and cp.async need sm_80 or newer.
cudaError_t device_has_tensor_core_kernels(bool& result) {
  int major = 0;
  int minor = 0;
  const cudaError_t err = compute_capability(major, minor);
  result = major >= 8;
  return err;
}

// Whether the Hopper kernels take a problem: bf16 or fp16 with 16-byte aligned rows at a head dim
// of hopper_shapes.h's lists (the forward only over key blocks longer than its shape's
// kMinKeys), on an sm_90 device, in a build with sm_90a code, unless the environment variable
// BLOCK_ATTN_HOPPER_KERNELS is "0" (read at every call, so a process can compare both paths).
cudaError_t uses_hopper_kernels(const ForwardParams& params, bool rows_aligned, DType dtype,
                                bool forward, bool& result) {
  result = false;
#if defined(BLOCK_ATTN_WITH_SM90A) || defined(BLOCK_ATTN_CUDA_EMULATION)
  const bool shape_taken = forward ? hopper::forward_takes(params.head_dim, params.max_seqlen_k)
                                   : hopper::BackwardHeadDims::contains(params.head_dim);
  if (!is_half_type(dtype) || !shape_taken || !rows_aligned) return cudaSuccess;
  if (switched_off("BLOCK_ATTN_HOPPER_KERNELS")) return cudaSuccess;
  int major = 0;
  int minor = 0;
  const cudaError_t err = compute_capability(major, minor);
  result = err == cudaSuccess && major == 9 && minor == 0;
  return err;
#else
  (void)params;
  (void)rows_aligned;
  (void)dtype;
  (void)forward;
  return cudaSuccess;
#endif
}

// The decoding forward (run_fwd_decode) takes float16/bfloat16 problems whose query blocks are
// all short (at most kDecodeMaxQueries) and whose longest key block spans at least two key
// tiles, on sm_80+, unless the environment variable BLOCK_ATTN_DECODE_KERNEL is "0" (read at every
// call, so a process can compare both paths). It splits each block's keys over enough CTAs to
// start about kDecodeCtasPerSm per SM, keeping at least kDecodeMinTilesPerSplit 64-key tiles per
// split so the merge stays small beside the loads, and always enough splits that no CTA sums more
// than kMaxKeysPerAccumulator keys (a float sum of more would stall).
constexpr int kDecodeMaxQueries = 16;
constexpr int kDecodeCtasPerSm = 4;
constexpr int kDecodeMinTilesPerSplit = 2;
constexpr int kDecodeMaxSplits = 64;

// Sets plan.path to kDecode, and plan.decode_splits, where the decoding forward takes the problem.
cudaError_t plan_decode(const ForwardParams& params, DType dtype, ForwardPlan& plan) {
  if (!is_half_type(dtype) || params.max_seqlen_q > kDecodeMaxQueries ||
      params.max_seqlen_k < 2 * kDecodeKeyTile) {
    return cudaSuccess;
  }
  if (switched_off("BLOCK_ATTN_DECODE_KERNEL")) return cudaSuccess;
  bool tensor_cores = false;
  cudaError_t err = device_has_tensor_core_kernels(tensor_cores);
  if (err != cudaSuccess || !tensor_cores) return err;
  int multiprocessors = 0;
  err = current_device_attribute(cudaDevAttrMultiProcessorCount, multiprocessors);
  if (err != cudaSuccess) return err;
  plan.path = KernelPath::kDecode;
  // A block with queries has at least one row, so at most seqlen_q blocks do work: the CTAs of
  // the rest exit at once (a padded cache pairs every slot's unused rows with an empty block).
  const int64_t busy_blocks = std::min<int64_t>(params.num_blocks, params.seqlen_q);
  const int64_t ctas = static_cast<int64_t>(decode_lane_tiles(params)) * busy_blocks *
                       params.batch * params.heads_kv;
  const int64_t wanted = (static_cast<int64_t>(kDecodeCtasPerSm) * multiprocessors + ctas - 1) /
                         std::max<int64_t>(ctas, 1);
  const int tiles = ceil_div(params.max_seqlen_k, kDecodeKeyTile);
  const int most = std::min(kDecodeMaxSplits, tiles / kDecodeMinTilesPerSplit);
  const int fewest = ceil_div(tiles, tiles_per_accumulator(kDecodeKeyTile));
  plan.decode_splits =
      std::max(fewest, static_cast<int>(std::clamp<int64_t>(wanted, 1, std::max(most, 1))));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_forward_decode(const ForwardParams& params, int splits, float* split_partials,
                                  cudaStream_t stream) {
  return FLASH_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
    return BOOL_SWITCH(params.is_causal, kIsCausal, [&] {
      return run_fwd_decode<T, kHeadDim, kIsCausal>(params, splits, split_partials, stream);
    });
  });
}

template <typename T>
cudaError_t launch_forward_hopper(const ForwardParams& params, cudaStream_t stream) {
  return hopper::ForwardHeadDims::dispatch(params.head_dim, cudaErrorInvalidValue, [&](auto dim) {
    return BOOL_SWITCH(params.is_causal, kIsCausal, [&] {
      return hopper::run_fwd_wgmma<T, decltype(dim)::value, kIsCausal>(params, stream);
    });
  });
}

template <typename T>
cudaError_t launch_backward_hopper(const BackwardParams& params, float* dq_accumulator,
                                   const BackwardWorkspace& workspace, cudaStream_t stream) {
  auto* delta = static_cast<float*>(workspace.delta);
  return hopper::BackwardHeadDims::dispatch(params.head_dim, cudaErrorInvalidValue, [&](auto dim) {
    return BOOL_SWITCH(params.is_causal, kIsCausal, [&] {
      return hopper::run_bwd_wgmma<T, decltype(dim)::value, kIsCausal>(params, delta,
                                                                       dq_accumulator, stream);
    });
  });
}

template <typename T>
cudaError_t launch_forward_flash(const ForwardParams& params, cudaStream_t stream) {
  return FLASH_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
    return BOOL_SWITCH(params.is_causal, kIsCausal,
                       [&] { return run_fwd_flash<T, kHeadDim, kIsCausal>(params, stream); });
  });
}

template <typename T>
cudaError_t launch_backward_flash(const BackwardParams& params, int max_shared_bytes,
                                  float* dq_accumulator, const BackwardWorkspace& workspace,
                                  cudaStream_t stream) {
  return FLASH_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
    return BOOL_SWITCH(params.is_causal, kIsCausal, [&] {
      return run_bwd_flash<T, kHeadDim, kIsCausal>(params, workspace.delta, dq_accumulator,
                                                   max_shared_bytes, stream);
    });
  });
}

}  // namespace

cudaError_t plan_forward(const ForwardParams& params, DType dtype, ForwardPlan& plan) {
  plan = ForwardPlan{};
  if (!head_dim_supported(params.head_dim)) return cudaErrorInvalidValue;
  cudaError_t err = plan_decode(params, dtype, plan);
  if (err != cudaSuccess) return err;
  if (plan.path == KernelPath::kDecode) {
    if (plan.decode_splits > 1) {
      plan.split_partials_elements = static_cast<size_t>(plan.decode_splits) * params.batch *
                                     params.heads_q * params.seqlen_q * (params.head_dim + 1);
    }
    return cudaSuccess;
  }
  if (!is_half_type(dtype)) return cudaSuccess;
  bool hopper = false;
  err = uses_hopper_kernels(params, rows_are_16_byte_aligned(params), dtype, true, hopper);
  if (err != cudaSuccess) return err;
  if (hopper) {
    plan.path = KernelPath::kHopper;
    return cudaSuccess;
  }
  bool tensor_cores = false;
  err = device_has_tensor_core_kernels(tensor_cores);
  if (tensor_cores) plan.path = KernelPath::kTensorCore;
  return err;
}

cudaError_t launch_forward(const ForwardParams& params, const ForwardPlan& plan,
                           const ForwardWorkspace& workspace, DType dtype, cudaStream_t stream) {
  if (!head_dim_supported(params.head_dim)) return cudaErrorInvalidValue;
  // The three tensor-core paths are built for float16 and bfloat16 only.
  if (plan.path != KernelPath::kSimple && !is_half_type(dtype)) return cudaErrorInvalidValue;
  const bool fp16 = dtype == DType::kFloat16;
  switch (plan.path) {
    case KernelPath::kDecode: {
      const int splits = plan.decode_splits;
      float* partials = workspace.split_partials;
      return fp16 ? launch_forward_decode<__half>(params, splits, partials, stream)
                  : launch_forward_decode<__nv_bfloat16>(params, splits, partials, stream);
    }
    case KernelPath::kHopper:
      return fp16 ? launch_forward_hopper<__half>(params, stream)
                  : launch_forward_hopper<__nv_bfloat16>(params, stream);
    case KernelPath::kTensorCore:
      return fp16 ? launch_forward_flash<__half>(params, stream)
                  : launch_forward_flash<__nv_bfloat16>(params, stream);
    case KernelPath::kSimple:
      break;
  }
  return DTYPE_SWITCH(dtype, T, [&] {
    return SIMPLE_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      return BOOL_SWITCH(params.is_causal, kIsCausal,
                         [&] { return run_fwd_simple<T, kHeadDim, kIsCausal>(params, stream); });
    });
  });
}

cudaError_t plan_backward(const BackwardParams& params, DType dtype, BackwardPlan& plan) {
  plan = BackwardPlan{};
  if (!head_dim_supported(params.head_dim)) return cudaErrorInvalidValue;
  if (!is_half_type(dtype)) return cudaSuccess;
  bool tensor_cores = false;
  cudaError_t err = device_has_tensor_core_kernels(tensor_cores);
  if (err != cudaSuccess || !tensor_cores) return err;
  int max_shared_bytes = 0;
  err = current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, max_shared_bytes);
  if (err != cudaSuccess) return err;
  // Above head_dim 128 a CTA needs the shared memory of the narrowest tiles (70 KiB).
  if (params.head_dim > 128 && max_shared_bytes < flash_bwd_min_shared_bytes<256>()) {
    return cudaSuccess;
  }
  bool hopper = false;
  err = uses_hopper_kernels(params, rows_are_16_byte_aligned(params), dtype, false, hopper);
  if (err != cudaSuccess) return err;
  plan.path = hopper ? KernelPath::kHopper : KernelPath::kTensorCore;
  plan.max_shared_bytes = max_shared_bytes;
  // dQ by atomics sums one float per key tile; over key blocks longer than
  // kMaxKeysPerAccumulator the dQ kernel's chunked sums take it instead.
  if (!params.deterministic && params.max_seqlen_k <= kMaxKeysPerAccumulator) {
    plan.dq_accumulator_elements =
        static_cast<size_t>(params.batch) * params.heads_q * params.seqlen_q * params.head_dim;
  }
  return cudaSuccess;
}

cudaError_t launch_backward(const BackwardParams& params, const BackwardPlan& plan,
                            const BackwardWorkspace& workspace, DType dtype, cudaStream_t stream) {
  if (!head_dim_supported(params.head_dim)) return cudaErrorInvalidValue;
  if (plan.path != KernelPath::kSimple && !is_half_type(dtype)) return cudaErrorInvalidValue;
  // The scratch the plan asks for is not optional: without it the kernels would take the
  // deterministic dQ path, which the plan did not choose.
  if (plan.dq_accumulator_elements > 0 && workspace.dq_accumulator == nullptr) {
    return cudaErrorInvalidValue;
  }
  // Null: dQ from its own kernel, summed in a fixed order, instead of atomics.
  float* dq_accumulator = plan.dq_accumulator_elements > 0 ? workspace.dq_accumulator : nullptr;
  const bool fp16 = dtype == DType::kFloat16;
  switch (plan.path) {
    case KernelPath::kHopper:
      return fp16
                 ? launch_backward_hopper<__half>(params, dq_accumulator, workspace, stream)
                 : launch_backward_hopper<__nv_bfloat16>(params, dq_accumulator, workspace, stream);
    case KernelPath::kTensorCore: {
      const int shared = plan.max_shared_bytes;
      return fp16 ? launch_backward_flash<__half>(params, shared, dq_accumulator, workspace, stream)
                  : launch_backward_flash<__nv_bfloat16>(params, shared, dq_accumulator, workspace,
                                                         stream);
    }
    case KernelPath::kDecode:
      return cudaErrorInvalidValue;  // forward only
    case KernelPath::kSimple:
      break;
  }
  return DTYPE_SWITCH(dtype, T, [&] {
    return SIMPLE_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      return BOOL_SWITCH(params.is_causal, kIsCausal, [&] {
        return run_bwd_simple<T, kHeadDim, kIsCausal>(params, workspace.delta, stream);
      });
    });
  });
}

}  // namespace block_attn::cuda
