// Offsets that break the raw operators' contract reach the CUDA kernels unread by the host, and
// block_range clamps them to [0, seqlen]. Every buffer here sits between guard rows of NaN: a
// kernel that wrote outside its tensor changes a guard, and one that read outside it puts NaN
// into the rows of a clamped block, whose outputs and gradients must come out finite.
#include "emulated_offset_clamp.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_params.h"
#include "cuda/launch.h"
#include "emulated_elements.h"

namespace block_attn::emulated_test {
namespace {

constexpr int kSeqlen = 130;
constexpr int kGuardRows = 512;  // more than any offset here reaches past the tensors

// `rows` rows of `width` elements between kGuardRows rows of NaN on each side; the rows start as
// random values (`random`) or NaN.
template <typename T>
struct Guarded {
  int rows, width;
  std::vector<T> data;
  T nan = Element<T>::nan();

  Guarded(int rows_, int width_, bool random, std::mt19937& rng)
      : rows(rows_), width(width_), data(static_cast<size_t>(rows_ + 2 * kGuardRows) * width_) {
    std::fill(data.begin(), data.end(), nan);
    std::normal_distribution<float> normal;
    if (random) {
      for (int i = 0; i < rows * width; ++i) body()[i] = Element<T>::from(normal(rng));
    }
  }
  T* body() { return data.data() + static_cast<size_t>(kGuardRows) * width; }
  bool guards_intact() const {
    const size_t guard = static_cast<size_t>(kGuardRows) * width;
    for (size_t i = 0; i < data.size(); ++i) {
      const bool in_guard = i < guard || i >= guard + static_cast<size_t>(rows) * width;
      if (in_guard && std::memcmp(&data[i], &nan, sizeof(T)) != 0) return false;
    }
    return true;
  }
  bool rows_finite(int begin, int end) const {
    const T* first = data.data() + static_cast<size_t>(kGuardRows + begin) * width;
    return std::all_of(first, first + static_cast<size_t>(end - begin) * width,
                       [](T x) { return std::isfinite(Element<T>::to(x)); });
  }
};

struct OffsetCase {
  const char* name;
  std::vector<int32_t> offsets;
  int max_seqlen;
  // Key blocks of their own (empty: the query offsets) and the longest of them (0: max_seqlen).
  // Short query blocks against long key blocks take the decoding forward.
  std::vector<int32_t> key_offsets = {};
  int max_seqlen_k = 0;
};

template <typename T>
int run(const OffsetCase& c, int head_dim, bool causal, const char* label) {
  std::mt19937 rng(5);
  Guarded<T> q(kSeqlen, head_dim, true, rng), k(kSeqlen, head_dim, true, rng),
      v(kSeqlen, head_dim, true, rng), grad_out(kSeqlen, head_dim, true, rng),
      out(kSeqlen, head_dim, false, rng), grad_q(kSeqlen, head_dim, false, rng),
      grad_k(kSeqlen, head_dim, false, rng), grad_v(kSeqlen, head_dim, false, rng);
  Guarded<float> lse(kSeqlen, 1, false, rng), delta(kSeqlen, 1, false, rng);

  BackwardParams p{};
  p.q = q.body();
  p.k = k.body();
  p.v = v.body();
  p.out = out.body();
  p.lse = lse.body();
  p.grad_out = grad_out.body();
  p.grad_q = grad_q.body();
  p.grad_k = grad_k.body();
  p.grad_v = grad_v.body();
  const int64_t tensor = static_cast<int64_t>(kSeqlen) * head_dim;
  auto set = [&](int64_t& batch, int64_t& head, int64_t& row) {
    batch = head = tensor;
    row = head_dim;
  };
  set(p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  set(p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  set(p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  set(p.out_batch_stride, p.out_head_stride, p.out_row_stride);
  set(p.grad_out_batch_stride, p.grad_out_head_stride, p.grad_out_row_stride);
  set(p.grad_q_batch_stride, p.grad_q_head_stride, p.grad_q_row_stride);
  set(p.grad_k_batch_stride, p.grad_k_head_stride, p.grad_k_row_stride);
  set(p.grad_v_batch_stride, p.grad_v_head_stride, p.grad_v_row_stride);
  p.cu_seqlens_q = c.offsets.data();
  p.cu_seqlens_k = c.key_offsets.empty() ? c.offsets.data() : c.key_offsets.data();
  p.num_blocks = static_cast<int>(c.offsets.size()) - 1;
  p.max_seqlen_q = c.max_seqlen;
  p.max_seqlen_k = c.max_seqlen_k > 0 ? c.max_seqlen_k : c.max_seqlen;
  p.batch = p.heads_q = p.heads_kv = 1;
  p.seqlen_q = p.seqlen_k = kSeqlen;
  p.head_dim = head_dim;
  p.scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  p.is_causal = causal;
  const cuda::DType dtype = Element<T>::kDType;

  std::string problem;
  cuda::ForwardPlan plan;
  bool ok = cuda::plan_forward(p, dtype, plan) == cudaSuccess;
  const size_t partial_elements = plan.split_partials_elements;
  // Rows of head_dim + 1 floats where the decoding forward splits the keys.
  Guarded<float> split_partials(static_cast<int>(partial_elements / (head_dim + 1)), head_dim + 1,
                                false, rng);
  // The scratch the plan asks for is not optional: without it the launch fails, before any
  // kernel runs.
  if (ok && partial_elements > 0 &&
      cuda::launch_forward(p, plan, cuda::ForwardWorkspace{}, dtype, nullptr) !=
          cudaErrorInvalidValue) {
    problem = "a split decoding forward without its scratch did not fail";
  }
  cuda::ForwardWorkspace forward_workspace;
  forward_workspace.split_partials = partial_elements ? split_partials.body() : nullptr;
  ok = ok && cuda::launch_forward(p, plan, forward_workspace, dtype, nullptr) == cudaSuccess;
  if (!ok) problem = "forward launch failed";
  if (ok && !split_partials.guards_intact()) problem = "split partials' guard written";
  for (const bool deterministic : {true, false}) {
    if (!ok) break;
    p.deterministic = deterministic;
    cuda::BackwardPlan backward_plan;
    ok = cuda::plan_backward(p, dtype, backward_plan) == cudaSuccess;
    const size_t elements = backward_plan.dq_accumulator_elements;
    // (seqlen, head_dim) floats where dQ is summed with atomics.
    Guarded<float> dq_accumulator(static_cast<int>(elements / head_dim), head_dim, false, rng);
    cuda::BackwardWorkspace workspace;
    workspace.delta = delta.body();
    // As in the forward, the accumulator the plan asks for is not optional.
    if (ok && elements > 0 &&
        cuda::launch_backward(p, backward_plan, workspace, dtype, nullptr) !=
            cudaErrorInvalidValue) {
      problem = "a backward without its dQ accumulator did not fail";
    }
    workspace.dq_accumulator = elements ? dq_accumulator.body() : nullptr;
    ok = ok && cuda::launch_backward(p, backward_plan, workspace, dtype, nullptr) == cudaSuccess;
    if (!ok) problem = "backward launch failed";
    if (ok && !dq_accumulator.guards_intact()) problem = "dQ accumulator's guard written";
  }
  for (auto* t : {&out, &grad_q, &grad_k, &grad_v}) {
    if (problem.empty() && !t->guards_intact()) problem = "a guard row of a tensor was written";
  }
  if (problem.empty() && !(lse.guards_intact() && delta.guards_intact())) {
    problem = "a guard of lse or Delta was written";
  }
  // Rows of the clamped blocks that the grid covers (no longer than max_seqlen).
  for (size_t j = 0; problem.empty() && j + 1 < c.offsets.size(); ++j) {
    const int start = std::clamp(c.offsets[j], 0, kSeqlen);
    const int end = std::clamp(c.offsets[j + 1], start, kSeqlen);
    if (end - start > c.max_seqlen) continue;
    for (auto* t : {&out, &grad_q, &grad_k, &grad_v}) {
      if (!t->rows_finite(start, end)) problem = "a row read past its tensor (not finite)";
    }
  }
  std::printf("  %-4s %-34s %s%s%s\n", problem.empty() ? "ok" : "FAIL", c.name, label,
              partial_elements > 0 ? ", split keys" : "",
              problem.empty() ? "" : (", " + problem).c_str());
  return problem.empty() ? 0 : 1;
}

}  // namespace

int check_offsets_outside_contract() {
  const std::vector<OffsetCase> cases = {
      {"past the end", {0, 40, kSeqlen + 100}, 190},
      {"negative", {-5, 40, kSeqlen}, kSeqlen + 5},
      {"decreasing", {0, 90, 40, kSeqlen}, kSeqlen},
      {"longer than max_seqlen", {0, kSeqlen}, 16},
      {"decoding, keys past the end", {0, 1, 2, 3}, 1, {0, 100, 200, 300}, 200},
      {"decoding, keys negative, decreasing", {0, 1, 2, 3}, 1, {-20, 110, 60, kSeqlen}, 130},
  };
  int failures = 0;
  for (const auto& [arch, device] :
       {std::pair{"sm_90", cuda_emulator::DeviceProperties{}},
        std::pair{"sm_86", cuda_emulator::DeviceProperties{8, 6, 99 * 1024}}}) {
    cuda_emulator::set_device_properties(device);
    std::printf("=== emulated %s: offsets outside the contract, clamped by the kernels\n", arch);
    for (const OffsetCase& c : cases) {
      for (const bool causal : {false, true}) {
        const char* mask = causal ? "causal" : "full";
        failures += run<__nv_bfloat16>(c, 64, causal, (std::string("bf16 d64 ") + mask).c_str());
        failures += run<__nv_bfloat16>(c, 128, causal, (std::string("bf16 d128 ") + mask).c_str());
        failures += run<float>(c, 64, causal, (std::string("fp32 d64 ") + mask).c_str());
      }
    }
  }
  return failures;
}

}  // namespace block_attn::emulated_test
