// Rows longer than kMaxKeysPerAccumulator: this test's build sets it to 256, so every kernel family
// sums its rows in folded chunks on problems small enough to emulate; each must still match
// float64. With all scores equal and V = 1 every chunk's sum is exact, so out must be 1 to the
// last bit of the element type (a float sum of more than 2^24 such terms would stall instead).
// Also the causal bounds and tile counts of utils.cuh at the int32 edge, where the plain int forms
// overflow.
#include "emulated_long_rows.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_params.h"
#include "cuda/hopper/fwd_wgmma.cuh"
#include "cuda/launch.h"
#include "cuda/utils.cuh"
#include "emulated_elements.h"

namespace block_attn::emulated_test {
namespace {

using cuda::KernelPath;

int check_int32_edge() {
  constexpr int kMax = INT32_MAX;
  struct Check {
    const char* what;
    int64_t got;
    int64_t want;
  };
  const Check checks[] = {
      {"causal_key_end(0, 1, INT32_MAX)", cuda::causal_key_end(0, 1, kMax), kMax},
      {"causal_key_end(INT32_MAX - 1, INT32_MAX, INT32_MAX)",
       cuda::causal_key_end(kMax - 1, kMax, kMax), kMax},
      {"causal_key_end(0, INT32_MAX, INT32_MAX)", cuda::causal_key_end(0, kMax, kMax), 1},
      {"causal_key_end(0, INT32_MAX, 1)", cuda::causal_key_end(0, kMax, 1), 0},
      {"causal_key_end(INT32_MAX - 1, INT32_MAX, 1)", cuda::causal_key_end(kMax - 1, kMax, 1), 1},
      {"causal_key_end(INT32_MAX - 1, INT32_MAX, 0)", cuda::causal_key_end(kMax - 1, kMax, 0), 0},
      {"causal_query_begin(INT32_MAX - 1, 1, INT32_MAX)",
       cuda::causal_query_begin(kMax - 1, 1, kMax), 0},
      {"causal_query_begin(0, 1, INT32_MAX)", cuda::causal_query_begin(0, 1, kMax), 0},
      {"causal_query_begin(0, INT32_MAX, 1)", cuda::causal_query_begin(0, kMax, 1), kMax - 1},
      {"causal_query_begin(INT32_MAX - 1, INT32_MAX, 0)",
       cuda::causal_query_begin(kMax - 1, kMax, 0), kMax},
      {"tile_last_row(INT32_MAX - 63, 128, INT32_MAX)", cuda::tile_last_row(kMax - 63, 128, kMax),
       kMax - 1},
      {"tile_last_row(0, 64, 100)", cuda::tile_last_row(0, 64, 100), 63},
      {"tile_last_row(64, 64, 100)", cuda::tile_last_row(64, 64, 100), 99},
      {"ceil_div(INT32_MAX, 64)", cuda::ceil_div(kMax, 64), 1 << 25},
      {"ceil_div(INT32_MAX, 1)", cuda::ceil_div(kMax, 1), kMax},
      {"ceil_div(65, 64)", cuda::ceil_div(65, 64), 2},
      {"ceil_div(64, 64)", cuda::ceil_div(64, 64), 1},
      {"ceil_div(0, 64)", cuda::ceil_div(0, 64), 0},
  };
  std::printf("=== int32 edge of the kernels' bounds\n");
  int failures = 0;
  for (const Check& c : checks) {
    const bool ok = c.got == c.want;
    std::printf("  %-4s %s = %lld%s\n", ok ? "ok" : "FAIL", c.what, static_cast<long long>(c.got),
                ok ? "" : (", expected " + std::to_string(c.want)).c_str());
    failures += ok ? 0 : 1;
  }
  return failures;
}

struct LongCase {
  const char* name;
  std::vector<int> lengths_q;
  std::vector<int> lengths_k;
  int heads_q;
  int heads_kv;
  int head_dim;
  bool causal;
  bool deterministic;
  KernelPath forward;  // the paths the plans must pick, so that each family is the one tested
  KernelPath backward;
  bool equal_scores = false;   // q = 0, v = 1, grad_out = 1
  bool wgmma_forward = false;  // the Hopper forward called directly (plans take it past 4096 keys)
};

// Largest |got - want| over the largest |want|, per output.
struct Error {
  double max_error = 0.0;
  double max_reference = 0.0;
  void add(double got, double want) {
    const double e = std::abs(got - want);
    max_error = std::isnan(got) ? INFINITY : std::max(max_error, e);
    max_reference = std::max(max_reference, std::abs(want));
  }
  double relative() const { return max_error / std::max(max_reference, 1e-6); }
};

// (heads, rows, head_dim) contiguous, one batch.
template <typename T>
int run(const LongCase& c) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int hq = c.heads_q, hkv = c.heads_kv, dim = c.head_dim, group = hq / hkv;
  std::vector<int32_t> cu_q = {0}, cu_k = {0};
  int max_q = 0, max_k = 0;
  for (size_t j = 0; j < c.lengths_q.size(); ++j) {
    cu_q.push_back(cu_q.back() + c.lengths_q[j]);
    cu_k.push_back(cu_k.back() + c.lengths_k[j]);
    max_q = std::max(max_q, c.lengths_q[j]);
    max_k = std::max(max_k, c.lengths_k[j]);
  }
  const int seqlen_q = cu_q.back(), seqlen_k = cu_k.back();
  std::mt19937 rng(77);
  std::normal_distribution<double> normal;
  auto tensor = [&](int heads, int rows, double fixed) {
    std::vector<T> t(static_cast<size_t>(heads) * rows * dim);
    for (T& x : t) x = Element<T>::from(std::isnan(fixed) ? normal(rng) : fixed);
    return t;
  };
  const bool equal = c.equal_scores;
  std::vector<T> q = tensor(hq, seqlen_q, equal ? 0.0 : NAN), k = tensor(hkv, seqlen_k, NAN),
                 v = tensor(hkv, seqlen_k, equal ? 1.0 : NAN),
                 grad_out = tensor(hq, seqlen_q, equal ? 1.0 : NAN);
  std::vector<T> out(q.size(), Element<T>::nan()), grad_q(q.size(), Element<T>::nan()),
      grad_k(k.size(), Element<T>::nan()), grad_v(v.size(), Element<T>::nan());
  std::vector<A> lse(static_cast<size_t>(hq) * seqlen_q, NAN), delta(lse.size(), NAN);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));

  BackwardParams p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = lse.data();
  p.grad_out = grad_out.data();
  p.grad_q = grad_q.data();
  p.grad_k = grad_k.data();
  p.grad_v = grad_v.data();
  auto strides = [&](int64_t& batch, int64_t& head, int64_t& row, int heads, int rows) {
    row = dim;
    head = static_cast<int64_t>(rows) * dim;
    batch = heads * head;
  };
  strides(p.q_batch_stride, p.q_head_stride, p.q_row_stride, hq, seqlen_q);
  strides(p.k_batch_stride, p.k_head_stride, p.k_row_stride, hkv, seqlen_k);
  strides(p.v_batch_stride, p.v_head_stride, p.v_row_stride, hkv, seqlen_k);
  strides(p.out_batch_stride, p.out_head_stride, p.out_row_stride, hq, seqlen_q);
  strides(p.grad_out_batch_stride, p.grad_out_head_stride, p.grad_out_row_stride, hq, seqlen_q);
  strides(p.grad_q_batch_stride, p.grad_q_head_stride, p.grad_q_row_stride, hq, seqlen_q);
  strides(p.grad_k_batch_stride, p.grad_k_head_stride, p.grad_k_row_stride, hkv, seqlen_k);
  strides(p.grad_v_batch_stride, p.grad_v_head_stride, p.grad_v_row_stride, hkv, seqlen_k);
  p.cu_seqlens_q = cu_q.data();
  p.cu_seqlens_k = cu_k.data();
  p.num_blocks = static_cast<int>(c.lengths_q.size());
  p.max_seqlen_q = max_q;
  p.max_seqlen_k = max_k;
  p.batch = 1;
  p.heads_q = hq;
  p.heads_kv = hkv;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.head_dim = dim;
  p.scale = scale;
  p.is_causal = c.causal;
  p.deterministic = c.deterministic;
  const cuda::DType dtype = Element<T>::kDType;

  std::string problem;
  cuda::ForwardPlan forward_plan;
  cuda::BackwardPlan backward_plan;
  if (cuda::plan_forward(p, dtype, forward_plan) != cudaSuccess ||
      cuda::plan_backward(p, dtype, backward_plan) != cudaSuccess) {
    problem = "a plan failed";
  }
  const KernelPath forward_path = c.wgmma_forward ? KernelPath::kHopper : forward_plan.path;
  if (problem.empty() && (forward_path != c.forward || backward_plan.path != c.backward)) {
    problem = std::string("paths ") + kernel_path_name(forward_path) + " / " +
              kernel_path_name(backward_plan.path) + ", expected " + kernel_path_name(c.forward) +
              " / " + kernel_path_name(c.backward);
  }
  // The decoding forward's splits keep every CTA to kMaxKeysPerAccumulator keys.
  if (problem.empty() && forward_plan.path == KernelPath::kDecode &&
      static_cast<int64_t>(forward_plan.decode_splits) * cuda::kMaxKeysPerAccumulator < max_k) {
    problem = "decoding splits " + std::to_string(forward_plan.decode_splits) + " too few";
  }
  // Over long key blocks dQ never takes the atomic sums.
  if (problem.empty() && backward_plan.dq_accumulator_elements != 0) {
    problem = "a dQ accumulator planned over long key blocks";
  }
  bool ran = problem.empty();
  if (ran) {
    cudaError_t err = cudaErrorInvalidValue;
    if (c.wgmma_forward) {
      if constexpr (sizeof(T) == 2) {
        err = c.causal ? cuda::hopper::run_fwd_wgmma<T, 128, true>(p, nullptr)
                       : cuda::hopper::run_fwd_wgmma<T, 128, false>(p, nullptr);
      }
    } else {
      std::vector<float> partials(forward_plan.split_partials_elements, NAN);
      cuda::ForwardWorkspace workspace;
      workspace.split_partials = partials.empty() ? nullptr : partials.data();
      err = cuda::launch_forward(p, forward_plan, workspace, dtype, nullptr);
    }
    cuda::BackwardWorkspace workspace;
    workspace.delta = delta.data();
    if (err == cudaSuccess)
      err = cuda::launch_backward(p, backward_plan, workspace, dtype, nullptr);
    if (err != cudaSuccess) problem = "launch failed";
    ran = err == cudaSuccess;
  }

  // float64 reference over the inputs as rounded to T.
  auto at = [&](const std::vector<T>& t, int h, int row, int rows, int d) {
    return Element<T>::to(t[(static_cast<size_t>(h) * rows + row) * dim + d]);
  };
  Error e_out, e_lse, e_dq, e_dk, e_dv;
  std::vector<double> dk_ref(k.size(), 0.0), dv_ref(v.size(), 0.0);
  for (int h = 0; ran && h < hq; ++h) {
    const int hk = h / group;
    for (size_t j = 0; j + 1 < cu_q.size(); ++j) {
      const int len_q = cu_q[j + 1] - cu_q[j], len_k = cu_k[j + 1] - cu_k[j];
      for (int i = 0; i < len_q; ++i) {
        const int row = cu_q[j] + i;
        const int keys = c.causal ? cuda::causal_key_end(i, len_q, len_k) : len_k;
        std::vector<double> s(keys);
        double m = -INFINITY;
        for (int t = 0; t < keys; ++t) {
          double dot = 0.0;
          for (int d = 0; d < dim; ++d) {
            dot += at(q, h, row, seqlen_q, d) * at(k, hk, cu_k[j] + t, seqlen_k, d);
          }
          s[t] = dot * scale;
          m = std::max(m, s[t]);
        }
        double sum = 0.0;
        for (int t = 0; t < keys; ++t) sum += std::exp(s[t] - m);
        const double row_lse = keys > 0 ? m + std::log(sum) : -INFINITY;
        std::vector<double> o(dim, 0.0);
        for (int t = 0; t < keys; ++t) {
          s[t] = std::exp(s[t] - row_lse);  // P
          for (int d = 0; d < dim; ++d) o[d] += s[t] * at(v, hk, cu_k[j] + t, seqlen_k, d);
        }
        const size_t lse_at = static_cast<size_t>(h) * seqlen_q + row;
        if (keys > 0) e_lse.add(lse[lse_at], row_lse);
        double row_delta = 0.0;
        for (int d = 0; d < dim; ++d) {
          e_out.add(at(out, h, row, seqlen_q, d), o[d]);
          row_delta += at(grad_out, h, row, seqlen_q, d) * o[d];
        }
        std::vector<double> dq(dim, 0.0);
        for (int t = 0; t < keys; ++t) {
          const int key = cu_k[j] + t;
          double dp = 0.0;
          for (int d = 0; d < dim; ++d)
            dp += at(grad_out, h, row, seqlen_q, d) * at(v, hk, key, seqlen_k, d);
          const double ds = s[t] * (dp - row_delta);
          for (int d = 0; d < dim; ++d) {
            const size_t kv_at = (static_cast<size_t>(hk) * seqlen_k + key) * dim + d;
            dq[d] += scale * ds * at(k, hk, key, seqlen_k, d);
            dk_ref[kv_at] += scale * ds * at(q, h, row, seqlen_q, d);
            dv_ref[kv_at] += s[t] * at(grad_out, h, row, seqlen_q, d);
          }
        }
        for (int d = 0; d < dim; ++d) e_dq.add(at(grad_q, h, row, seqlen_q, d), dq[d]);
      }
    }
  }
  for (size_t x = 0; ran && x < dk_ref.size(); ++x) {
    e_dk.add(Element<T>::to(grad_k[x]), dk_ref[x]);
    e_dv.add(Element<T>::to(grad_v[x]), dv_ref[x]);
  }

  // Relative to each output's largest reference value: the element type's rounding of P and of
  // the outputs, with room for the fp32 reductions.
  const double tol_fwd = sizeof(T) == 2 ? 2e-2 : sizeof(T) == 4 ? 1e-4 : 1e-10;
  const double tol_grad = sizeof(T) == 2 ? 5e-2 : sizeof(T) == 4 ? 1e-3 : 1e-9;
  std::string errors;
  auto judge = [&](const char* what, const Error& e, double tol) {
    char text[96];
    std::snprintf(text, sizeof text, "%s %.1e", what, e.relative());
    errors += (errors.empty() ? "" : ", ") + std::string(text);
    if (problem.empty() && !(e.relative() <= tol)) problem = std::string(what) + " off";
  };
  if (ran) {
    judge("out", e_out, equal ? 2.5e-7 : tol_fwd);
    judge("lse", e_lse, sizeof(T) == 8 ? 1e-10 : 1e-5);
    if (equal) {
      // dS = P (dP - Delta) = 0 where out = 1 (to the last bit): dQ and dK vanish.
      if (problem.empty() && (e_dq.max_error > 1e-4 || e_dk.max_error > 1e-4)) {
        problem = "dQ or dK not 0";
      }
    } else {
      judge("dq", e_dq, tol_grad);
      judge("dk", e_dk, tol_grad);
    }
    judge("dv", e_dv, tol_grad);
  }
  std::printf("  %-4s %s [%s, head_dim %d%s] %s / %s%s: %s%s\n", problem.empty() ? "ok" : "FAIL",
              c.name, Element<T>::kName, dim, c.causal ? ", causal" : "",
              kernel_path_name(forward_path), kernel_path_name(backward_plan.path),
              forward_plan.path == KernelPath::kDecode
                  ? (", " + std::to_string(forward_plan.decode_splits) + " splits").c_str()
                  : "",
              errors.c_str(), problem.empty() ? "" : (", " + problem).c_str());
  return problem.empty() ? 0 : 1;
}

}  // namespace

int check_long_rows() {
  int failures = check_int32_edge();
  const auto simple = KernelPath::kSimple;
  const auto tensor_core = KernelPath::kTensorCore;
  const auto hopper = KernelPath::kHopper;
  const auto decode = KernelPath::kDecode;
  std::printf("=== rows longer than kMaxKeysPerAccumulator (%d here)\n",
              cuda::kMaxKeysPerAccumulator);

  cuda_emulator::set_device_properties(cuda_emulator::DeviceProperties{8, 6, 99 * 1024});
  std::printf("emulated sm_86:\n");
  // dK/dV sum group * queries = 2 * 300 terms, the forward and dQ 520 keys.
  failures += run<__nv_bfloat16>({"GQA 2:1, 300 queries x 520 keys",
                                  {300, 20},
                                  {520, 20},
                                  2,
                                  1,
                                  64,
                                  false,
                                  true,
                                  tensor_core,
                                  tensor_core});
  failures += run<__half>({"GQA 2:1, 300 queries x 520 keys, dQ not atomic",
                           {300, 20},
                           {520, 20},
                           2,
                           1,
                           64,
                           true,
                           false,
                           tensor_core,
                           tensor_core});
  failures += run<__nv_bfloat16>({"equal scores, V = 1",
                                  {270, 3},
                                  {700, 9},
                                  2,
                                  2,
                                  128,
                                  false,
                                  true,
                                  tensor_core,
                                  tensor_core,
                                  true});
  failures += run<__nv_bfloat16>(
      {"head_dim 256", {300, 40}, {300, 40}, 1, 1, 256, true, true, tensor_core, tensor_core});
  failures += run<__nv_bfloat16>({"decoding, 1 and 3 queries",
                                  {1, 3},
                                  {1000, 700},
                                  4,
                                  2,
                                  128,
                                  true,
                                  true,
                                  decode,
                                  tensor_core});
  failures += run<__half>({"decoding, equal scores, V = 1",
                           {1, 2},
                           {1000, 300},
                           2,
                           1,
                           64,
                           false,
                           true,
                           decode,
                           tensor_core,
                           true});
  failures +=
      run<float>({"simple kernels", {300, 33}, {290, 400}, 2, 1, 64, true, true, simple, simple});
  failures += run<float>({"simple kernels, equal scores, V = 1",
                          {300, 33},
                          {290, 400},
                          2,
                          1,
                          32,
                          false,
                          true,
                          simple,
                          simple,
                          true});
  failures +=
      run<double>({"simple kernels", {300, 33}, {290, 400}, 2, 1, 32, true, true, simple, simple});

  cuda_emulator::set_device_properties(cuda_emulator::DeviceProperties{});
  std::printf("emulated sm_90:\n");
  failures += run<__nv_bfloat16>(
      {"Hopper backward, GQA 2:1", {300}, {300}, 2, 1, 128, true, true, tensor_core, hopper});
  failures += run<__half>({"Hopper backward, equal scores, V = 1",
                           {150, 140},
                           {520, 140},
                           2,
                           1,
                           64,
                           false,
                           false,
                           tensor_core,
                           hopper,
                           true});
  failures += run<__nv_bfloat16>(
      {"Hopper forward", {300}, {400}, 2, 2, 256, true, true, hopper, tensor_core});
  failures += run<__nv_bfloat16>({"Hopper forward at head_dim 128",
                                  {300, 64},
                                  {520, 64},
                                  2,
                                  2,
                                  128,
                                  true,
                                  true,
                                  hopper,
                                  hopper,
                                  false,
                                  true});
  failures += run<__half>({"Hopper forward at head_dim 128, equal scores, V = 1",
                           {130},
                           {600},
                           1,
                           1,
                           128,
                           false,
                           true,
                           hopper,
                           hopper,
                           true,
                           true});
  return failures;
}

}  // namespace block_attn::emulated_test
