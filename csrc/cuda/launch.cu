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

// mma.sync, ldmatrix and cp.async need sm_80 or newer.
cudaError_t device_has_tensor_core_kernels(bool& result) {
  int major = 0;
  int minor = 0;
  const cudaError_t err = compute_capability(major, minor);
  result = major >= 8;
  return err;
}

// Warpgroups per CTA of the Hopper kernels: 64 queries each in the forward, 64 keys each in the
// backward. The forward takes run_fwd_wgmma's defaults otherwise: 64-key tiles, each tile's
// softmax beside the previous tile's P V product below head_dim 256.
constexpr int kHopperForwardWarpgroups = 1;
constexpr int kHopperBackwardWarpgroups = 2;

// Whether the Hopper kernels take a problem: bf16 or fp16, head_dim 64 or 128 (or 256 in the
// forward), 16-byte aligned rows, on an sm_90 device, in a build with sm_90a code, unless the
// environment variable BLOCK_ATTN_HOPPER_KERNELS is "0" (read at every call, so a process can
// compare both paths).
cudaError_t uses_hopper_kernels(const ForwardParams& params, bool rows_aligned, DType dtype,
                                bool forward, bool& result) {
  result = false;
#if defined(BLOCK_ATTN_WITH_SM90A) || defined(BLOCK_ATTN_CUDA_EMULATION)
  const bool half_type = dtype == DType::kBFloat16 || dtype == DType::kFloat16;
  const int d = params.head_dim;
  const bool tiled_head_dim = d == 64 || d == 128 || (forward && d == 256);
  if (!half_type || !tiled_head_dim || !rows_aligned) return cudaSuccess;
  const char* setting = std::getenv("BLOCK_ATTN_HOPPER_KERNELS");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) return cudaSuccess;
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
// split so the merge stays small beside the loads.
constexpr int kDecodeMaxQueries = 16;
constexpr int kDecodeCtasPerSm = 4;
constexpr int kDecodeMinTilesPerSplit = 2;
constexpr int kDecodeMaxSplits = 64;

// Sets plan.decode and plan.decode_splits.
cudaError_t plan_decode(const ForwardParams& params, DType dtype, ForwardPlan& plan) {
  const bool half_type = dtype == DType::kBFloat16 || dtype == DType::kFloat16;
  if (!half_type || params.max_seqlen_q > kDecodeMaxQueries ||
      params.max_seqlen_k < 2 * kDecodeKeyTile) {
    return cudaSuccess;
  }
  const char* setting = std::getenv("BLOCK_ATTN_DECODE_KERNEL");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) return cudaSuccess;
  bool tensor_cores = false;
  cudaError_t err = device_has_tensor_core_kernels(tensor_cores);
  if (err != cudaSuccess || !tensor_cores) return err;
  int multiprocessors = 0;
  err = current_device_attribute(cudaDevAttrMultiProcessorCount, multiprocessors);
  if (err != cudaSuccess) return err;
  plan.decode = true;
  // A block with queries has at least one row, so at most seqlen_q blocks do work: the CTAs of
  // the rest exit at once (a padded cache pairs every slot's unused rows with an empty block).
  const int64_t busy_blocks = std::min<int64_t>(params.num_blocks, params.seqlen_q);
  const int64_t ctas = static_cast<int64_t>(decode_lane_tiles(params)) * busy_blocks *
                       params.batch * params.heads_kv;
  const int64_t wanted = (static_cast<int64_t>(kDecodeCtasPerSm) * multiprocessors + ctas - 1) /
                         std::max<int64_t>(ctas, 1);
  const int most = std::min(
      kDecodeMaxSplits, ceil_div(params.max_seqlen_k, kDecodeKeyTile) / kDecodeMinTilesPerSplit);
  plan.decode_splits = static_cast<int>(std::clamp<int64_t>(wanted, 1, std::max(most, 1)));
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
  return FLASH_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
    return BOOL_SWITCH(params.is_causal, kIsCausal, [&] {
      return hopper::run_fwd_wgmma<T, kHeadDim, kIsCausal, kHopperForwardWarpgroups>(params,
                                                                                     stream);
    });
  });
}

template <typename T>
cudaError_t launch_backward_hopper(const BackwardParams& params, const BackwardWorkspace& workspace,
                                   cudaStream_t stream) {
  auto* delta = static_cast<float*>(workspace.delta);
  // Deterministic: dQ from its own kernel, summed in a fixed order, instead of atomics.
  float* dq_accumulator = params.deterministic ? nullptr : workspace.dq_accumulator;
  return BOOL_SWITCH(params.head_dim == 64, kSmallHeadDim, [&] {
    constexpr int kHeadDim = kSmallHeadDim ? 64 : 128;
    return BOOL_SWITCH(params.is_causal, kIsCausal, [&] {
      return hopper::run_bwd_wgmma<T, kHeadDim, kIsCausal, kHopperBackwardWarpgroups>(
          params, delta, dq_accumulator, stream);
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
cudaError_t launch_backward_flash(const BackwardParams& params, const BackwardWorkspace& workspace,
                                  cudaStream_t stream) {
  return FLASH_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
    return BOOL_SWITCH(params.is_causal, kIsCausal, [&] {
      float* dq_accumulator = params.deterministic ? nullptr : workspace.dq_accumulator;
      return run_bwd_flash<T, kHeadDim, kIsCausal>(params, workspace.delta, dq_accumulator, stream);
    });
  });
}

// Whether launch_backward takes the tensor-core kernels: float16/bfloat16 on sm_80+ (above head_dim
// 128, where a CTA may have the shared memory of their narrowest tiles: 70 KiB).
cudaError_t uses_flash_backward(const BackwardParams& params, DType dtype, bool& result) {
  result = false;
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return cudaSuccess;
  cudaError_t err = device_has_tensor_core_kernels(result);
  if (err != cudaSuccess || !result || params.head_dim <= 128) return err;
  int max_shared_bytes = 0;
  err = current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, max_shared_bytes);
  result = err == cudaSuccess && max_shared_bytes >= flash_bwd_min_shared_bytes<256>();
  return err;
}

}  // namespace

cudaError_t plan_forward(const ForwardParams& params, DType dtype, ForwardPlan& plan) {
  plan = ForwardPlan{};
  const cudaError_t err = plan_decode(params, dtype, plan);
  if (err == cudaSuccess && plan.decode && plan.decode_splits > 1) {
    plan.split_partials_elements = static_cast<size_t>(plan.decode_splits) * params.batch *
                                   params.heads_q * params.seqlen_q * (params.head_dim + 1);
  }
  return err;
}

cudaError_t launch_forward(const ForwardParams& params, const ForwardPlan& plan,
                           const ForwardWorkspace& workspace, DType dtype, cudaStream_t stream) {
  if (params.head_dim < 1 || params.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat16 || dtype == DType::kBFloat16) {
    if (plan.decode) {
      const int splits = plan.decode_splits;
      float* partials = workspace.split_partials;
      return dtype == DType::kFloat16
                 ? launch_forward_decode<__half>(params, splits, partials, stream)
                 : launch_forward_decode<__nv_bfloat16>(params, splits, partials, stream);
    }
    bool hopper = false;
    cudaError_t err =
        uses_hopper_kernels(params, rows_are_16_byte_aligned(params), dtype, true, hopper);
    if (err != cudaSuccess) return err;
    if (hopper) {
      return dtype == DType::kFloat16 ? launch_forward_hopper<__half>(params, stream)
                                      : launch_forward_hopper<__nv_bfloat16>(params, stream);
    }
    bool tensor_cores = false;
    err = device_has_tensor_core_kernels(tensor_cores);
    if (err != cudaSuccess) return err;
    if (tensor_cores) {
      return dtype == DType::kFloat16 ? launch_forward_flash<__half>(params, stream)
                                      : launch_forward_flash<__nv_bfloat16>(params, stream);
    }
  }
  return DTYPE_SWITCH(dtype, T, [&] {
    return SIMPLE_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      return BOOL_SWITCH(params.is_causal, kIsCausal,
                         [&] { return run_fwd_simple<T, kHeadDim, kIsCausal>(params, stream); });
    });
  });
}

cudaError_t backward_dq_accumulator_elements(const BackwardParams& params, DType dtype,
                                             size_t& elements) {
  elements = 0;
  bool flash = false;
  const cudaError_t err = uses_flash_backward(params, dtype, flash);
  if (err == cudaSuccess && flash && !params.deterministic) {
    elements =
        static_cast<size_t>(params.batch) * params.heads_q * params.seqlen_q * params.head_dim;
  }
  return err;
}

cudaError_t launch_backward(const BackwardParams& params, const BackwardWorkspace& workspace,
                            DType dtype, cudaStream_t stream) {
  if (params.head_dim < 1 || params.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  bool flash = false;
  cudaError_t err = uses_flash_backward(params, dtype, flash);
  if (err != cudaSuccess) return err;
  bool hopper = false;
  if (flash) {
    err = uses_hopper_kernels(params, rows_are_16_byte_aligned(params), dtype, false, hopper);
    if (err != cudaSuccess) return err;
  }
  if (hopper) {
    return dtype == DType::kFloat16
               ? launch_backward_hopper<__half>(params, workspace, stream)
               : launch_backward_hopper<__nv_bfloat16>(params, workspace, stream);
  }
  if (flash) {
    return dtype == DType::kFloat16
               ? launch_backward_flash<__half>(params, workspace, stream)
               : launch_backward_flash<__nv_bfloat16>(params, workspace, stream);
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
