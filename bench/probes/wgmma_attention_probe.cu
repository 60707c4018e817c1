// Checks the Hopper forward and backward (csrc/cuda/hopper/fwd_wgmma.cuh, bwd_wgmma.cuh) at
// head_dim 128, with the tile shapes the dispatch runs (csrc/cuda/hopper/hopper_shapes.h), against
// a float64 host reference on small ragged / causal / GQA cases (bf16, and fp16 for the causal
// ones), then times them on causal attention over 16384 tokens, 16 heads, bf16 (the benchmark's
// causal-d128 workload), the backward beside the mma.sync one. Plain CUDA, no torch:
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//       bench/probes/wgmma_attention_probe.cu -o probe
// Exits 0 when every case matches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include "../../csrc/cuda/flash/bwd_flash.cuh"
#include "../../csrc/cuda/hopper/bwd_wgmma.cuh"
#include "../../csrc/cuda/hopper/fwd_wgmma.cuh"
#include "gpu_probe.h"

namespace {

using block_attn::BackwardParams;
using block_attn::cuda::run_bwd_flash;
using block_attn::cuda::hopper::run_bwd_wgmma;
using block_attn::cuda::hopper::run_fwd_wgmma;

constexpr int kHeadDim = 128;
using ForwardShape = block_attn::cuda::hopper::ForwardShape<kHeadDim>;

struct Case {
  const char* name;
  int heads_q;
  int heads_kv;
  std::vector<int> offsets_q;
  std::vector<int> offsets_k;
  bool causal;
};

using gpu_probe::check;

// Device buffers of one case: (1, heads, seqlen, 128) contiguous tensors, the backward's Delta
// and float32 dQ sums.
struct Buffers {
  // 16-bit elements of the case's type.
  uint16_t *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr;
  uint16_t *grad_out = nullptr, *grad_q = nullptr, *grad_k = nullptr, *grad_v = nullptr;
  float *lse = nullptr, *delta = nullptr, *dq_sums = nullptr;
  int *cu_q = nullptr, *cu_k = nullptr;

  // Allocates every buffer for heads_q x nq query rows and heads_kv x nk key rows.
  bool allocate(int heads_q, int nq, int heads_kv, int nk, size_t offsets) {
    const size_t rows_q = static_cast<size_t>(heads_q) * nq,
                 rows_k = static_cast<size_t>(heads_kv) * nk;
    bool ok = true;
    for (auto* p : {&q, &out, &grad_out, &grad_q}) {
      ok = ok && check(cudaMalloc(p, rows_q * kHeadDim * 2), "malloc");
    }
    for (auto* p : {&k, &v, &grad_k, &grad_v}) {
      ok = ok && check(cudaMalloc(p, rows_k * kHeadDim * 2), "malloc");
    }
    ok = ok && check(cudaMalloc(&lse, rows_q * 4), "malloc") &&
         check(cudaMalloc(&delta, rows_q * 4), "malloc") &&
         check(cudaMalloc(&dq_sums, rows_q * kHeadDim * 4), "malloc") &&
         check(cudaMalloc(&cu_q, offsets * 4), "malloc") &&
         check(cudaMalloc(&cu_k, offsets * 4), "malloc");
    return ok;
  }
  ~Buffers() {
    for (void* p :
         {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v),
          static_cast<void*>(out), static_cast<void*>(grad_out), static_cast<void*>(grad_q),
          static_cast<void*>(grad_k), static_cast<void*>(grad_v), static_cast<void*>(lse),
          static_cast<void*>(delta), static_cast<void*>(dq_sums), static_cast<void*>(cu_q),
          static_cast<void*>(cu_k)}) {
      cudaFree(p);
    }
  }
};

BackwardParams make_params(const Buffers& b, const Case& c, int max_q, int max_k) {
  const int nq = c.offsets_q.back();
  const int nk = c.offsets_k.back();
  BackwardParams p{};
  p.q = b.q;
  p.k = b.k;
  p.v = b.v;
  p.out = b.out;
  p.lse = b.lse;
  p.q_row_stride = p.out_row_stride = kHeadDim;
  p.k_row_stride = p.v_row_stride = kHeadDim;
  p.q_head_stride = p.out_head_stride = static_cast<int64_t>(nq) * kHeadDim;
  p.k_head_stride = p.v_head_stride = static_cast<int64_t>(nk) * kHeadDim;
  p.q_batch_stride = p.out_batch_stride = p.q_head_stride * c.heads_q;
  p.k_batch_stride = p.v_batch_stride = p.k_head_stride * c.heads_kv;
  p.cu_seqlens_q = b.cu_q;
  p.cu_seqlens_k = b.cu_k;
  p.num_blocks = static_cast<int>(c.offsets_q.size()) - 1;
  p.max_seqlen_q = max_q;
  p.max_seqlen_k = max_k;
  p.batch = 1;
  p.heads_q = c.heads_q;
  p.heads_kv = c.heads_kv;
  p.seqlen_q = nq;
  p.seqlen_k = nk;
  p.head_dim = kHeadDim;
  p.scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  p.is_causal = c.causal;
  p.grad_out = b.grad_out;
  p.grad_q = b.grad_q;
  p.grad_k = b.grad_k;
  p.grad_v = b.grad_v;
  p.grad_out_row_stride = p.grad_q_row_stride = p.q_row_stride;
  p.grad_out_head_stride = p.grad_q_head_stride = p.q_head_stride;
  p.grad_out_batch_stride = p.grad_q_batch_stride = p.q_batch_stride;
  p.grad_k_row_stride = p.grad_v_row_stride = p.k_row_stride;
  p.grad_k_head_stride = p.grad_v_head_stride = p.k_head_stride;
  p.grad_k_batch_stride = p.grad_v_batch_stride = p.k_batch_stride;
  return p;
}

// Conversions of the two element types through float.
template <typename T>
T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}
template <typename T>
double to_double(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}
template <typename T>
const char* type_name() {
  return std::is_same_v<T, __half> ? "fp16" : "bf16";
}

template <typename T>
cudaError_t run(const BackwardParams& p) {
  return p.is_causal ? run_fwd_wgmma<T, kHeadDim, true>(p, nullptr)
                     : run_fwd_wgmma<T, kHeadDim, false>(p, nullptr);
}
template <typename T>
cudaError_t run_backward(const BackwardParams& p, const Buffers& b, bool deterministic = false) {
  float* sums = deterministic ? nullptr : b.dq_sums;  // no sums: the deterministic dQ kernel
  return p.is_causal ? run_bwd_wgmma<T, kHeadDim, true>(p, b.delta, sums, nullptr)
                     : run_bwd_wgmma<T, kHeadDim, false>(p, b.delta, sums, nullptr);
}

// Largest |got - want| of a gradient, and whether it is within 3 units of bf16 rounding (the
// coarser type) of its largest reference value (P and dS are rounded before their products).
struct GradientError {
  double error = 0, largest = 0;
  void add(double got, double want) {
    error = std::max(error, std::fabs(got - want));
    largest = std::max(largest, std::fabs(want));
  }
  bool ok() const { return error <= 3 * 0x1p-8 * std::max(largest, 1.0); }
};

// Runs one case forward and backward; returns whether out and lse match the float64 reference of
// the same bf16-rounded inputs within bf16 rounding of P and of the output, and the gradients
// within GradientError's bound.
template <typename T>
bool check_case(const Case& c, std::mt19937& rng) {
  const int nq = c.offsets_q.back();
  const int nk = c.offsets_k.back();
  const size_t size_q = static_cast<size_t>(c.heads_q) * nq * kHeadDim;
  const size_t size_k = static_cast<size_t>(c.heads_kv) * nk * kHeadDim;
  std::normal_distribution<float> normal;
  std::vector<T> hq(size_q), hk(size_k), hv(size_k), hdo(size_q);
  for (auto* vec : {&hq, &hk, &hv, &hdo}) {
    for (auto& x : *vec) x = from_float<T>(normal(rng));
  }
  Buffers b;
  bool ok = b.allocate(c.heads_q, nq, c.heads_kv, nk, c.offsets_q.size());
  ok = ok && check(cudaMemcpy(b.q, hq.data(), size_q * 2, cudaMemcpyHostToDevice), "copy") &&
       check(cudaMemcpy(b.k, hk.data(), size_k * 2, cudaMemcpyHostToDevice), "copy") &&
       check(cudaMemcpy(b.v, hv.data(), size_k * 2, cudaMemcpyHostToDevice), "copy") &&
       check(cudaMemcpy(b.grad_out, hdo.data(), size_q * 2, cudaMemcpyHostToDevice), "copy") &&
       check(cudaMemcpy(b.cu_q, c.offsets_q.data(), c.offsets_q.size() * 4, cudaMemcpyHostToDevice),
             "copy") &&
       check(cudaMemcpy(b.cu_k, c.offsets_k.data(), c.offsets_k.size() * 4, cudaMemcpyHostToDevice),
             "copy");
  if (!ok) return false;
  int max_q = 0, max_k = 0;
  for (size_t j = 0; j + 1 < c.offsets_q.size(); ++j) {
    max_q = std::max(max_q, c.offsets_q[j + 1] - c.offsets_q[j]);
    max_k = std::max(max_k, c.offsets_k[j + 1] - c.offsets_k[j]);
  }
  const BackwardParams p = make_params(b, c, max_q, max_k);
  if (!check(run<T>(p), "forward launch") || !check(cudaDeviceSynchronize(), "forward")) {
    return false;
  }
  std::vector<T> out(size_q), dq(size_q), dk(size_k), dv(size_k);
  std::vector<float> lse(static_cast<size_t>(c.heads_q) * nq);
  if (!check(cudaMemcpy(out.data(), b.out, size_q * 2, cudaMemcpyDeviceToHost), "copy") ||
      !check(cudaMemcpy(lse.data(), b.lse, lse.size() * 4, cudaMemcpyDeviceToHost), "copy")) {
    return false;
  }

  auto at = [](const std::vector<T>& x, size_t row, int d) {
    return to_double(x[row * kHeadDim + d]);
  };
  double out_error = 0, lse_error = 0;
  bool rows_without_keys_ok = true;
  std::vector<double> dq_ref(size_q, 0.0), dk_ref(size_k, 0.0), dv_ref(size_k, 0.0);
  const int group = c.heads_q / c.heads_kv;
  std::vector<double> probs, row_out(kHeadDim);
  for (int h = 0; h < c.heads_q; ++h) {
    const int hk_index = h / group;
    for (size_t blk = 0; blk + 1 < c.offsets_q.size(); ++blk) {
      const int q0 = c.offsets_q[blk], lq = c.offsets_q[blk + 1] - q0;
      const int k0 = c.offsets_k[blk], lk = c.offsets_k[blk + 1] - k0;
      for (int i = 0; i < lq; ++i) {
        const int keys = c.causal ? std::min(lk, std::max(0, i + 1 + lk - lq)) : lk;
        const size_t row = (static_cast<size_t>(h) * nq + q0 + i);
        if (keys == 0) {
          rows_without_keys_ok = rows_without_keys_ok && std::isinf(lse[row]) && lse[row] < 0;
          continue;
        }
        const size_t key_row0 = static_cast<size_t>(hk_index) * nk + k0;
        probs.assign(keys, 0.0);
        double mx = -INFINITY;
        for (int t = 0; t < keys; ++t) {
          double dot = 0;
          for (int d = 0; d < kHeadDim; ++d) dot += at(hq, row, d) * at(hk, key_row0 + t, d);
          probs[t] = dot * p.scale;
          mx = std::max(mx, probs[t]);
        }
        double sum = 0;
        for (double& s : probs) sum += (s = std::exp(s - mx));
        lse_error = std::max(lse_error, std::fabs(lse[row] - (mx + std::log(sum))));
        for (double& s : probs) s /= sum;
        double row_delta = 0;  // dO . O
        for (int d = 0; d < kHeadDim; ++d) {
          double o = 0;
          for (int t = 0; t < keys; ++t) o += probs[t] * at(hv, key_row0 + t, d);
          out_error = std::max(out_error, std::fabs(at(out, row, d) - o));
          row_delta += at(hdo, row, d) * o;
        }
        // dS = P (dP - Delta); dQ += scale dS K, dK += scale dS^T Q, dV += P^T dO.
        for (int t = 0; t < keys; ++t) {
          double dp = 0;
          for (int d = 0; d < kHeadDim; ++d) dp += at(hdo, row, d) * at(hv, key_row0 + t, d);
          const double ds = probs[t] * (dp - row_delta) * p.scale;
          for (int d = 0; d < kHeadDim; ++d) {
            dq_ref[row * kHeadDim + d] += ds * at(hk, key_row0 + t, d);
            dk_ref[(key_row0 + t) * kHeadDim + d] += ds * at(hq, row, d);
            dv_ref[(key_row0 + t) * kHeadDim + d] += probs[t] * at(hdo, row, d);
          }
        }
      }
    }
  }
  // P and the output are rounded to T (bf16: 8 bits of mantissa): errors of a few 1e-3 on
  // outputs of magnitude below 1; a wrong layout or mask gives errors of order 1.
  bool match = out_error < 2e-2 && lse_error < 1e-3 && rows_without_keys_ok;
  std::printf("%s, %-28s max |err| out %.3g, lse %.3g%s -> %s\n", type_name<T>(), c.name, out_error,
              lse_error, rows_without_keys_ok ? "" : ", rows without keys WRONG",
              match ? "match" : "MISMATCH");
  for (const bool deterministic : {false, true}) {
    if (!check(run_backward<T>(p, b, deterministic), "backward launch") ||
        !check(cudaDeviceSynchronize(), "backward") ||
        !check(cudaMemcpy(dq.data(), b.grad_q, size_q * 2, cudaMemcpyDeviceToHost), "copy") ||
        !check(cudaMemcpy(dk.data(), b.grad_k, size_k * 2, cudaMemcpyDeviceToHost), "copy") ||
        !check(cudaMemcpy(dv.data(), b.grad_v, size_k * 2, cudaMemcpyDeviceToHost), "copy")) {
      return false;
    }
    GradientError dq_error, dk_error, dv_error;
    for (size_t i = 0; i < size_q; ++i) dq_error.add(to_double(dq[i]), dq_ref[i]);
    for (size_t i = 0; i < size_k; ++i) {
      dk_error.add(to_double(dk[i]), dk_ref[i]);
      dv_error.add(to_double(dv[i]), dv_ref[i]);
    }
    const bool ok = dq_error.ok() && dk_error.ok() && dv_error.ok();
    std::printf(
        "    backward, %-13s max |err| dq %.3g (of %.3g), dk %.3g (of %.3g), dv %.3g (of "
        "%.3g) -> %s\n",
        deterministic ? "deterministic" : "atomic dQ", dq_error.error, dq_error.largest,
        dk_error.error, dk_error.largest, dv_error.error, dv_error.largest,
        ok ? "match" : "MISMATCH");
    match = match && ok;
  }
  return match;
}

// Causal attention over `tokens` tokens and `heads` heads for timing: random inputs, lse from one
// forward.
struct TimingProblem {
  Case c;
  Buffers b;
  BackwardParams p{};
  int max_shared_bytes = 0;  // what the mma.sync backward picks its tiles by
  bool ready = false;
  TimingProblem(int tokens, int heads) : c{"timing", heads, heads, {0, tokens}, {0, tokens}, true} {
    cudaDeviceGetAttribute(&max_shared_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
    const size_t size = static_cast<size_t>(heads) * tokens * kHeadDim;
    if (!b.allocate(heads, tokens, heads, tokens, 2)) return;
    std::vector<__nv_bfloat16> host(size);
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    for (auto& x : host) x = from_float<__nv_bfloat16>(normal(rng));
    for (auto* dst : {b.q, b.k, b.v, b.grad_out}) {
      cudaMemcpy(dst, host.data(), size * 2, cudaMemcpyHostToDevice);
    }
    const int offsets[2] = {0, tokens};
    cudaMemcpy(b.cu_q, offsets, 8, cudaMemcpyHostToDevice);
    cudaMemcpy(b.cu_k, offsets, 8, cudaMemcpyHostToDevice);
    p = make_params(b, c, tokens, tokens);
    ready = check(run<__nv_bfloat16>(p), "forward") && check(cudaDeviceSynchronize(), "forward");
  }
  // Useful flops of the forward, 2 H D N (N + 1); the backward's are 2.5 times as many.
  double forward_flops() const {
    const double n = c.offsets_q.back();
    return 2.0 * c.heads_q * kHeadDim * n * (n + 1);
  }
};

void report_time(const char* what, double ms, double flops) {
  if (ms < 0) return;
  std::printf("%-44s %8.3f ms  %6.1f TFLOP/s (median of %d)\n", what, ms, flops / ms / 1e9,
              gpu_probe::kTimedRuns);
}

// Times the forward and backward on causal-d128, the backward beside the mma.sync one (dQ by
// atomics, as the extension runs it by default, and deterministic).
void time_causal(int tokens, int heads) {
  TimingProblem t(tokens, heads);
  if (!t.ready) return;
  std::printf("causal N=%d H=%d D=128 bf16; forward: %d warpgroup(s), %d-key tiles%s\n", tokens,
              heads, ForwardShape::kWarpgroups, ForwardShape::kBlockN,
              ForwardShape::kOverlapSoftmax ? ", softmax beside P V" : ", softmax in turn");
  const double fwd = t.forward_flops(), bwd = 2.5 * fwd;
  report_time("forward, wgmma", gpu_probe::median_ms([&] { return run<__nv_bfloat16>(t.p); }), fwd);
  report_time("backward, mma.sync, atomic dQ", gpu_probe::median_ms([&] {
                return run_bwd_flash<__nv_bfloat16, kHeadDim, true>(t.p, t.b.delta, t.b.dq_sums,
                                                                    t.max_shared_bytes, nullptr);
              }),
              bwd);
  report_time("backward, wgmma, atomic dQ",
              gpu_probe::median_ms([&] { return run_backward<__nv_bfloat16>(t.p, t.b); }), bwd);
  report_time("backward, mma.sync, deterministic", gpu_probe::median_ms([&] {
                return run_bwd_flash<__nv_bfloat16, kHeadDim, true>(t.p, t.b.delta, nullptr,
                                                                    t.max_shared_bytes, nullptr);
              }),
              bwd);
  report_time("backward, wgmma, deterministic (dQ kernel)",
              gpu_probe::median_ms([&] { return run_backward<__nv_bfloat16>(t.p, t.b, true); }),
              bwd);
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  if (!check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties")) return 2;
  std::printf("device %s, sm_%d%d\n", prop.name, prop.major, prop.minor);
  if (prop.major != 9) {
    std::printf("the wgmma kernels need sm_90; nothing to check\n");
    return 2;
  }
  const std::vector<Case> cases = {
      {"full, one block of 200", 2, 2, {0, 200}, {0, 200}, false},
      {"causal, one block of 200", 2, 2, {0, 200}, {0, 200}, true},
      {"ragged blocks, GQA 4/2", 4, 2, {0, 70, 71, 300}, {0, 70, 71, 300}, false},
      {"ragged causal, Lq != Lk", 2, 1, {0, 64, 193, 193}, {0, 130, 150, 155}, true},
  };
  std::mt19937 rng(1);
  bool all = true;
  for (const Case& c : cases) {
    all = check_case<__nv_bfloat16>(c, rng) && all;
    if (c.causal) all = check_case<__half>(c, rng) && all;
  }
  if (all) time_causal(16384, 16);
  std::printf("%s\n", all ? "wgmma attention probe: PASS" : "wgmma attention probe: FAIL");
  return all ? 0 : 1;
}
