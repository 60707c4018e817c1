// Checks the Hopper forward (csrc/cuda/hopper/fwd_wgmma.cuh), with one and with two warpgroups
// per CTA, against a float64 host reference on small ragged / causal / GQA cases, then times
// both on causal attention over 16384 tokens, 16 heads, head_dim 128, bf16 (the benchmark's
// causal-d128 workload).
// Plain CUDA, no torch:
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//       csrc/tests/wgmma_attention_probe.cu -o probe
// Exits 0 when every case matches.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../cuda/hopper/fwd_wgmma.cuh"
#include "gpu_probe.h"

namespace {

using block_attn::ForwardParams;
using block_attn::cuda::hopper::run_fwd_wgmma;

constexpr int kHeadDim = 128;

struct Case {
  const char* name;
  int heads_q;
  int heads_kv;
  std::vector<int> offsets_q;
  std::vector<int> offsets_k;
  bool causal;
};

using gpu_probe::check;

// Device buffers of one case; (1, heads, seqlen, 128) contiguous tensors.
struct Buffers {
  __nv_bfloat16 *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr;
  float* lse = nullptr;
  int *cu_q = nullptr, *cu_k = nullptr;
  ~Buffers() {
    for (void* p : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v),
                    static_cast<void*>(out), static_cast<void*>(lse), static_cast<void*>(cu_q),
                    static_cast<void*>(cu_k)}) {
      cudaFree(p);
    }
  }
};

ForwardParams make_params(const Buffers& b, const Case& c, int max_q, int max_k) {
  const int nq = c.offsets_q.back();
  const int nk = c.offsets_k.back();
  ForwardParams p{};
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
  return p;
}

// kWarpgroups: warpgroups of 64 queries per CTA (1 or 2), sharing the K and V tiles.
template <int kWarpgroups>
cudaError_t run(const ForwardParams& p) {
  return p.is_causal ? run_fwd_wgmma<true, kWarpgroups>(p, nullptr)
                     : run_fwd_wgmma<false, kWarpgroups>(p, nullptr);
}

// Runs one case; returns whether out and lse match the float64 reference of the same
// bf16-rounded inputs within bf16 rounding of P and of the output.
template <int kWarpgroups>
bool check_case(const Case& c, std::mt19937& rng) {
  const int nq = c.offsets_q.back();
  const int nk = c.offsets_k.back();
  const size_t size_q = static_cast<size_t>(c.heads_q) * nq * kHeadDim;
  const size_t size_k = static_cast<size_t>(c.heads_kv) * nk * kHeadDim;
  std::normal_distribution<float> normal;
  std::vector<__nv_bfloat16> hq(size_q), hk(size_k), hv(size_k);
  for (auto* vec : {&hq, &hk, &hv}) {
    for (auto& x : *vec) x = __float2bfloat16(normal(rng));
  }
  Buffers b;
  bool ok = check(cudaMalloc(&b.q, size_q * 2), "malloc") &&
            check(cudaMalloc(&b.k, size_k * 2), "malloc") &&
            check(cudaMalloc(&b.v, size_k * 2), "malloc") &&
            check(cudaMalloc(&b.out, size_q * 2), "malloc") &&
            check(cudaMalloc(&b.lse, static_cast<size_t>(c.heads_q) * nq * 4), "malloc") &&
            check(cudaMalloc(&b.cu_q, c.offsets_q.size() * 4), "malloc") &&
            check(cudaMalloc(&b.cu_k, c.offsets_k.size() * 4), "malloc");
  ok = ok && check(cudaMemcpy(b.q, hq.data(), size_q * 2, cudaMemcpyHostToDevice), "copy") &&
       check(cudaMemcpy(b.k, hk.data(), size_k * 2, cudaMemcpyHostToDevice), "copy") &&
       check(cudaMemcpy(b.v, hv.data(), size_k * 2, cudaMemcpyHostToDevice), "copy") &&
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
  const ForwardParams p = make_params(b, c, max_q, max_k);
  if (!check(run<kWarpgroups>(p), "launch") || !check(cudaDeviceSynchronize(), "kernel"))
    return false;
  std::vector<__nv_bfloat16> out(size_q);
  std::vector<float> lse(static_cast<size_t>(c.heads_q) * nq);
  if (!check(cudaMemcpy(out.data(), b.out, size_q * 2, cudaMemcpyDeviceToHost), "copy") ||
      !check(cudaMemcpy(lse.data(), b.lse, lse.size() * 4, cudaMemcpyDeviceToHost), "copy")) {
    return false;
  }

  double out_error = 0, lse_error = 0;
  bool rows_without_keys_ok = true;
  const int group = c.heads_q / c.heads_kv;
  std::vector<double> scores;
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
        scores.assign(keys, 0.0);
        double mx = -INFINITY;
        for (int t = 0; t < keys; ++t) {
          double dot = 0;
          for (int d = 0; d < kHeadDim; ++d) {
            dot +=
                static_cast<double>(__bfloat162float(hq[row * kHeadDim + d])) *
                __bfloat162float(hk[(static_cast<size_t>(hk_index) * nk + k0 + t) * kHeadDim + d]);
          }
          scores[t] = dot * p.scale;
          mx = std::max(mx, scores[t]);
        }
        double sum = 0;
        for (double& s : scores) sum += (s = std::exp(s - mx));
        lse_error = std::max(lse_error, std::fabs(lse[row] - (mx + std::log(sum))));
        for (int d = 0; d < kHeadDim; ++d) {
          double o = 0;
          for (int t = 0; t < keys; ++t) {
            o += scores[t] *
                 __bfloat162float(hv[(static_cast<size_t>(hk_index) * nk + k0 + t) * kHeadDim + d]);
          }
          out_error =
              std::max(out_error, std::fabs(__bfloat162float(out[row * kHeadDim + d]) - o / sum));
        }
      }
    }
  }
  // P and the output are rounded to bf16 (8 bits of mantissa): errors of a few 1e-3 on outputs
  // of magnitude below 1; a wrong layout or mask gives errors of order 1.
  const bool match = out_error < 2e-2 && lse_error < 1e-3 && rows_without_keys_ok;
  std::printf("%d warpgroup(s), %-28s max |out err| %.3g, max |lse err| %.3g%s -> %s\n",
              kWarpgroups, c.name, out_error, lse_error,
              rows_without_keys_ok ? "" : ", rows without keys WRONG",
              match ? "match" : "MISMATCH");
  return match;
}

// Median time of causal attention over `tokens` tokens and `heads` heads; TFLOP/s counts the
// useful 2 H D N (N + 1) flops.
template <int kWarpgroups>
void time_causal(int tokens, int heads) {
  const Case c{"timing", heads, heads, {0, tokens}, {0, tokens}, true};
  const size_t size = static_cast<size_t>(heads) * tokens * kHeadDim;
  Buffers b;
  if (!check(cudaMalloc(&b.q, size * 2), "malloc") || !check(cudaMalloc(&b.k, size * 2), "m") ||
      !check(cudaMalloc(&b.v, size * 2), "malloc") || !check(cudaMalloc(&b.out, size * 2), "m") ||
      !check(cudaMalloc(&b.lse, static_cast<size_t>(heads) * tokens * 4), "malloc") ||
      !check(cudaMalloc(&b.cu_q, 8), "malloc") || !check(cudaMalloc(&b.cu_k, 8), "malloc")) {
    return;
  }
  std::vector<__nv_bfloat16> host(size);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (auto& x : host) x = __float2bfloat16(normal(rng));
  const int offsets[2] = {0, tokens};
  for (auto* dst : {b.q, b.k, b.v}) cudaMemcpy(dst, host.data(), size * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(b.cu_q, offsets, 8, cudaMemcpyHostToDevice);
  cudaMemcpy(b.cu_k, offsets, 8, cudaMemcpyHostToDevice);
  const ForwardParams p = make_params(b, c, tokens, tokens);
  const double ms = gpu_probe::median_ms([&] { return run<kWarpgroups>(p); });
  if (ms < 0) return;
  const double flops = 2.0 * heads * kHeadDim * static_cast<double>(tokens) * (tokens + 1);
  std::printf(
      "%d warpgroup(s): causal N=%d H=%d D=128 bf16 forward: %.3f ms, %.1f TFLOP/s (median of "
      "%d)\n",
      kWarpgroups, tokens, heads, ms, flops / ms / 1e9, gpu_probe::kTimedRuns);
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  if (!check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties")) return 2;
  std::printf("device %s, sm_%d%d\n", prop.name, prop.major, prop.minor);
  if (prop.major != 9) {
    std::printf("the wgmma forward needs sm_90; nothing to check\n");
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
    all = check_case<1>(c, rng) && all;
    all = check_case<2>(c, rng) && all;
  }
  if (all) {
    time_causal<1>(16384, 16);
    time_causal<2>(16384, 16);
  }
  std::printf("%s\n", all ? "wgmma attention probe: PASS" : "wgmma attention probe: FAIL");
  return all ? 0 : 1;
}
