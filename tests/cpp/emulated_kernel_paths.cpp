// The dispatch of the CUDA launch interface: a dispatch mistake would leave the results right but
// run a slower kernel than intended (or none of the Hopper kernels at all), which no numerical
// test notices. Plans only read the parameters and the device's attributes, so no data is needed.
#include "emulated_kernel_paths.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "attention_params.h"
#include "cuda/launch.h"
#include "cuda/utils.cuh"

namespace block_attn::emulated_test {
namespace {

using cuda::DType;
using cuda::KernelPath;

// One (batch 1, 4 query heads, 2 kv heads) problem of 256 rows in two blocks, contiguous
// (batch, heads, rows, head_dim) rows; `row_stride` other than head_dim misaligns them.
BackwardParams problem(int head_dim, int max_seqlen_q, int max_seqlen_k, bool deterministic,
                       int64_t row_stride = 0) {
  BackwardParams p{};
  const int64_t row = row_stride > 0 ? row_stride : head_dim;
  const int seqlen = 256;
  p.batch = 1;
  p.heads_q = 4;
  p.heads_kv = 2;
  p.seqlen_q = p.seqlen_k = seqlen;
  p.num_blocks = 2;
  p.max_seqlen_q = max_seqlen_q;
  p.max_seqlen_k = max_seqlen_k;
  p.head_dim = head_dim;
  p.scale = 0.125;
  p.is_causal = true;
  p.deterministic = deterministic;
  const int64_t head = seqlen * row;
  auto set = [&](int64_t& batch_stride, int64_t& head_stride, int64_t& row_stride_out, int heads) {
    batch_stride = heads * head;
    head_stride = head;
    row_stride_out = row;
  };
  set(p.q_batch_stride, p.q_head_stride, p.q_row_stride, p.heads_q);
  set(p.k_batch_stride, p.k_head_stride, p.k_row_stride, p.heads_kv);
  set(p.v_batch_stride, p.v_head_stride, p.v_row_stride, p.heads_kv);
  set(p.out_batch_stride, p.out_head_stride, p.out_row_stride, p.heads_q);
  set(p.grad_out_batch_stride, p.grad_out_head_stride, p.grad_out_row_stride, p.heads_q);
  set(p.grad_q_batch_stride, p.grad_q_head_stride, p.grad_q_row_stride, p.heads_q);
  set(p.grad_k_batch_stride, p.grad_k_head_stride, p.grad_k_row_stride, p.heads_kv);
  set(p.grad_v_batch_stride, p.grad_v_head_stride, p.grad_v_row_stride, p.heads_kv);
  return p;
}

struct Expected {
  KernelPath forward;
  KernelPath backward;
};

int check(const char* what, const BackwardParams& p, DType dtype, Expected expected) {
  cuda::ForwardPlan forward;
  cuda::BackwardPlan backward;
  std::string problem;
  if (cuda::plan_forward(p, dtype, forward) != cudaSuccess) problem = "plan_forward failed";
  if (cuda::plan_backward(p, dtype, backward) != cudaSuccess) problem = "plan_backward failed";
  if (problem.empty() && forward.path != expected.forward) {
    problem = std::string("forward path ") + kernel_path_name(forward.path) + ", expected " +
              kernel_path_name(expected.forward);
  }
  if (problem.empty() && backward.path != expected.backward) {
    problem = std::string("backward path ") + kernel_path_name(backward.path) + ", expected " +
              kernel_path_name(expected.backward);
  }
  // Scratch: the split partials only for a split decoding forward, the dQ accumulator only
  // where a tensor-core backward sums dQ with atomics (not over key blocks longer than
  // kMaxKeysPerAccumulator, whose dQ takes the dQ kernel's folded sums).
  const size_t rows = static_cast<size_t>(p.batch) * p.heads_q * p.seqlen_q;
  const size_t partials = forward.path == KernelPath::kDecode && forward.decode_splits > 1
                              ? forward.decode_splits * rows * (p.head_dim + 1)
                              : 0;
  if (problem.empty() && forward.split_partials_elements != partials) {
    problem = "split partials sized " + std::to_string(forward.split_partials_elements) +
              ", expected " + std::to_string(partials);
  }
  const bool atomics = backward.path != KernelPath::kSimple && !p.deterministic &&
                       p.max_seqlen_k <= cuda::kMaxKeysPerAccumulator;
  const size_t accumulator = atomics ? rows * p.head_dim : 0;
  if (problem.empty() && backward.dq_accumulator_elements != accumulator) {
    problem = "dQ accumulator sized " + std::to_string(backward.dq_accumulator_elements) +
              ", expected " + std::to_string(accumulator);
  }
  // A plan for the tensor-core paths is refused for the wrong dtype, before any kernel runs.
  if (problem.empty() && forward.path != KernelPath::kSimple &&
      cuda::launch_forward(p, forward, {}, DType::kFloat32, nullptr) != cudaErrorInvalidValue) {
    problem = "a float32 launch of a tensor-core forward plan was not refused";
  }
  std::printf("  %-4s %-44s %s / %s%s\n", problem.empty() ? "ok" : "FAIL", what,
              kernel_path_name(forward.path), kernel_path_name(backward.path),
              problem.empty() ? "" : (", " + problem).c_str());
  return problem.empty() ? 0 : 1;
}

// Plans of unsupported head dims fail instead of picking a kernel.
int check_refused(int head_dim) {
  const BackwardParams p = problem(head_dim, 128, 128, false, 8);
  cuda::ForwardPlan forward;
  cuda::BackwardPlan backward;
  const bool refused = cuda::plan_forward(p, DType::kBFloat16, forward) == cudaErrorInvalidValue &&
                       cuda::plan_backward(p, DType::kBFloat16, backward) == cudaErrorInvalidValue;
  std::printf("  %-4s head_dim %d refused by both plans\n", refused ? "ok" : "FAIL", head_dim);
  return refused ? 0 : 1;
}

// A dtype outside the enumeration is refused by both launches before any kernel runs (the
// null data pointers would fail any that did), not run as some other type.
int check_unknown_dtype_refused() {
  const BackwardParams p = problem(64, 128, 128, false);
  const auto unknown = static_cast<DType>(99);
  const bool refused =
      cuda::launch_forward(p, cuda::ForwardPlan{}, {}, unknown, nullptr) == cudaErrorInvalidValue &&
      cuda::launch_backward(p, cuda::BackwardPlan{}, {}, unknown, nullptr) == cudaErrorInvalidValue;
  std::printf("  %-4s a dtype outside the enumeration refused by both launches\n",
              refused ? "ok" : "FAIL");
  return refused ? 0 : 1;
}

}  // namespace

int check_kernel_paths() {
  const auto bf16 = DType::kBFloat16;
  const auto fp16 = DType::kFloat16;
  const auto simple = KernelPath::kSimple;
  const auto tensor_core = KernelPath::kTensorCore;
  const auto hopper = KernelPath::kHopper;
  const auto decode = KernelPath::kDecode;
  int failures = 0;

  cuda_emulator::set_device_properties(cuda_emulator::DeviceProperties{});
  std::printf("=== emulated sm_90: kernel paths\n");
  failures += check("bf16 d128", problem(128, 128, 128, false), bf16, {tensor_core, hopper});
  failures +=
      check("bf16 d128, 4096 keys", problem(128, 128, 4096, false), bf16, {tensor_core, hopper});
  failures += check("bf16 d128, 4097 keys", problem(128, 128, 4097, false), bf16, {hopper, hopper});
  failures +=
      check("fp16 d64 deterministic", problem(64, 128, 128, true), fp16, {tensor_core, hopper});
  failures +=
      check("fp16 d64, 16384 keys", problem(64, 128, 16384, false), fp16, {tensor_core, hopper});
  failures += check("bf16 d128 rows not 16-byte aligned", problem(128, 128, 128, false, 132), bf16,
                    {tensor_core, tensor_core});
  failures += check("bf16 d96 (padded to 128)", problem(96, 128, 128, false), bf16,
                    {tensor_core, tensor_core});
  failures += check("bf16 d256", problem(256, 128, 128, false), bf16, {hopper, tensor_core});
  failures += check("fp32 d128", problem(128, 128, 128, false), DType::kFloat32, {simple, simple});
  failures += check("fp64 d64", problem(64, 128, 128, false), DType::kFloat64, {simple, simple});
  failures += check("bf16 decoding: 1 query, 1024 keys", problem(128, 1, 1024, false), bf16,
                    {decode, hopper});
  failures += check("fp16 decoding: 16 queries, 128 keys", problem(64, 16, 128, false), fp16,
                    {decode, hopper});
  failures += check("bf16 1 query against 64 keys: no decoding", problem(128, 1, 64, false), bf16,
                    {tensor_core, hopper});
  failures +=
      check("fp32 decoding shape", problem(64, 1, 1024, false), DType::kFloat32, {simple, simple});
  setenv("BLOCK_ATTN_HOPPER_KERNELS", "0", 1);
  failures += check("bf16 d128, BLOCK_ATTN_HOPPER_KERNELS=0", problem(128, 128, 8192, false), bf16,
                    {tensor_core, tensor_core});
  unsetenv("BLOCK_ATTN_HOPPER_KERNELS");
  setenv("BLOCK_ATTN_DECODE_KERNEL", "0", 1);
  failures += check("bf16 decoding, BLOCK_ATTN_DECODE_KERNEL=0", problem(128, 1, 8192, false), bf16,
                    {hopper, hopper});
  unsetenv("BLOCK_ATTN_DECODE_KERNEL");
  // Calls with variants take the same kernels as without.
  BackwardParams windowed = problem(128, 128, 8192, false);
  windowed.window_left = 256;
  failures += check("bf16 d128 window", windowed, bf16, {hopper, hopper});
  BackwardParams capped_decode = problem(128, 1, 1024, false);
  capped_decode.softcap = 30;
  failures += check("bf16 decoding shape, softcap", capped_decode, bf16, {decode, hopper});
  BackwardParams dropped = problem(64, 128, 128, true);
  dropped.dropout_threshold = 1u << 30;
  int64_t seed_offset[2] = {1, 2};
  dropped.dropout_seed_offset = seed_offset;
  failures += check("fp16 d64 deterministic, dropout", dropped, fp16, {tensor_core, hopper});
  BackwardParams alibi_fp32 = problem(64, 128, 128, false);
  const float slopes[4] = {0.5f, 0.25f, 0.125f, 0.0625f};
  alibi_fp32.alibi_slopes = slopes;
  failures += check("fp32 d64 alibi", alibi_fp32, DType::kFloat32, {simple, simple});
  failures += check_refused(0);
  failures += check_refused(264);
  failures += check_unknown_dtype_refused();

  cuda_emulator::set_device_properties(cuda_emulator::DeviceProperties{8, 6, 99 * 1024});
  std::printf("=== emulated sm_86: kernel paths\n");
  failures += check("bf16 d128", problem(128, 128, 128, false), bf16, {tensor_core, tensor_core});
  failures += check("fp16 d256", problem(256, 128, 128, true), fp16, {tensor_core, tensor_core});
  failures += check("bf16 decoding", problem(128, 1, 1024, false), bf16, {decode, tensor_core});

  // Less opt-in shared memory than the narrowest head_dim 256 backward tiles need (70 KiB).
  cuda_emulator::set_device_properties(cuda_emulator::DeviceProperties{8, 0, 64 * 1024});
  std::printf("=== emulated sm_80 with 64 KiB of shared memory per CTA: kernel paths\n");
  failures += check("bf16 d256", problem(256, 128, 128, false), bf16, {tensor_core, simple});
  failures += check("bf16 d128", problem(128, 128, 128, false), bf16, {tensor_core, tensor_core});

  cuda_emulator::set_device_properties(cuda_emulator::DeviceProperties{7, 5, 64 * 1024});
  std::printf("=== emulated sm_75: kernel paths\n");
  failures += check("bf16 d128", problem(128, 128, 128, false), bf16, {simple, simple});
  failures += check("fp16 decoding", problem(64, 1, 1024, false), fp16, {simple, simple});
  failures += check("bf16 d128 window", windowed, bf16, {simple, simple});

  cuda_emulator::set_device_properties(cuda_emulator::DeviceProperties{});
  return failures;
}

}  // namespace block_attn::emulated_test
