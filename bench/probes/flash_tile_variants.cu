// Times the tensor-core kernels' variants side by side on the benchmark's causal-d128 workload
// (causal, one block of 16384 tokens, 16 heads, head_dim 128, bf16): the forward and the dQ
// kernel with one and with two 16-row groups per warp (both dispatched, by block length), the
// backward kernel by kernel, and the backward's two dQ paths (the deterministic dQ kernel, and
// atomics from the dK/dV kernel, whose CTAs own 64 keys in 4 warps as dispatched, or 128 in 8: a
// variant of this probe's own). The row-group variants do the same per-row arithmetic in the
// same order, so their outputs must agree bitwise, and the two paths' dK and dV too; their dQ must
// agree to rounding. The program checks all of that. Plain CUDA, no torch (any sm_80+ GPU):
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//       bench/probes/flash_tile_variants.cu -o variants
// Exits 0 when the variants agree.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "../../csrc/cuda/flash/bwd_flash.cuh"
#include "../../csrc/cuda/flash/fwd_flash.cuh"
#include "gpu_probe.h"

namespace {

using block_attn::BackwardParams;
using bf16 = __nv_bfloat16;
namespace kernels = block_attn::cuda;

constexpr int kTokens = 16384;
constexpr int kHeads = 16;
constexpr int kHeadDim = 128;
constexpr bool kCausal = true;

using gpu_probe::check;
using gpu_probe::median_ms;

// The backward with dK/dV CTAs of 8 warps (128 keys, as FlashAttention-2 takes at head_dim 128),
// for half the atomic dQ traffic and Q / dO tile loads per product; the dispatch runs 4.
using WideKeyTraits = kernels::FlashBwdTraits<kHeadDim, 1, 8>;
cudaError_t run_backward_wide_keys(const BackwardParams& p, float* delta, float* dq_accumulator,
                                   int max_shared_bytes) {
  return kernels::run_bwd_flash_tiles<bf16, kCausal, WideKeyTraits, kernels::DqTraits<kHeadDim>,
                                      kernels::DqTraits<kHeadDim, 2>>(p, delta, dq_accumulator,
                                                                      max_shared_bytes, nullptr);
}

template <typename T>
T* device_array(size_t count) {
  void* p = nullptr;
  return check(cudaMalloc(&p, count * sizeof(T)), "cudaMalloc") ? static_cast<T*>(p) : nullptr;
}

// Useful flops of one causal N x N product over all heads (keys past the diagonal not counted).
double product_flops() {
  return static_cast<double>(kHeads) * kHeadDim * kTokens * (kTokens + 1.0);
}

void report(const char* kernel, const char* variant, double ms, int products) {
  std::printf("%-10s %-22s %8.3f ms", kernel, variant, ms);
  if (products > 0) std::printf(" %7.1f TFLOP/s", products * product_flops() / ms / 1e9);
  std::printf("\n");
}

bool same_bits(const void* a, const void* b, size_t bytes, const char* what) {
  std::vector<unsigned char> x(bytes), y(bytes);
  cudaMemcpy(x.data(), a, bytes, cudaMemcpyDeviceToHost);
  cudaMemcpy(y.data(), b, bytes, cudaMemcpyDeviceToHost);
  const bool same = std::memcmp(x.data(), y.data(), bytes) == 0;
  std::printf("%s: one and two row groups %s\n", what, same ? "agree bitwise" : "DIFFER");
  return same;
}

// dQ of the two paths: float32 sums in different orders, each rounded once to bf16, may land an
// ulp apart (up to 2^-7 of the largest value); allow 4 * 2^-8 of it.
bool close_enough(const bf16* deterministic, const bf16* atomic, size_t count) {
  std::vector<bf16> x(count), y(count);
  cudaMemcpy(x.data(), deterministic, count * sizeof(bf16), cudaMemcpyDeviceToHost);
  cudaMemcpy(y.data(), atomic, count * sizeof(bf16), cudaMemcpyDeviceToHost);
  double largest = 0, worst = 0;
  for (size_t i = 0; i < count; ++i) {
    const double a = __bfloat162float(x[i]), b = __bfloat162float(y[i]);
    largest = std::max(largest, std::abs(a));
    worst = std::max(worst, std::abs(a - b));
  }
  const bool ok = worst <= 4 * 0x1p-8 * largest;
  std::printf("dQ: the two paths differ by at most %.3g (largest value %.3g) %s\n", worst, largest,
              ok ? "ok" : "TOO FAR");
  return ok;
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  if (!check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties")) return 2;
  std::printf("device %s, sm_%d%d; causal N=%d H=%d D=%d bf16\n", prop.name, prop.major, prop.minor,
              kTokens, kHeads, kHeadDim);
  if (prop.major < 8) {
    std::printf("the tensor-core kernels need sm_80; nothing to time\n");
    return 2;
  }
  const size_t elements = static_cast<size_t>(kHeads) * kTokens * kHeadDim;
  const size_t rows = static_cast<size_t>(kHeads) * kTokens;
  bf16 *q = device_array<bf16>(elements), *k = device_array<bf16>(elements),
       *v = device_array<bf16>(elements), *grad_out = device_array<bf16>(elements);
  bf16 *out = device_array<bf16>(elements), *out_one = device_array<bf16>(elements);
  bf16 *grad_q = device_array<bf16>(elements), *grad_q_one = device_array<bf16>(elements);
  bf16 *grad_k = device_array<bf16>(elements), *grad_v = device_array<bf16>(elements);
  bf16 *grad_q_atomic = device_array<bf16>(elements), *grad_k_atomic = device_array<bf16>(elements),
       *grad_v_atomic = device_array<bf16>(elements);
  float* dq_accumulator = device_array<float>(elements);
  bf16 *grad_q_wide = device_array<bf16>(elements), *grad_k_wide = device_array<bf16>(elements),
       *grad_v_wide = device_array<bf16>(elements);
  float *lse = device_array<float>(rows), *lse_one = device_array<float>(rows);
  float* delta = device_array<float>(rows);
  int* offsets = device_array<int>(2);
  if (!q || !k || !v || !grad_out || !out || !out_one || !grad_q || !grad_q_one || !grad_k ||
      !grad_v || !grad_q_atomic || !grad_k_atomic || !grad_v_atomic || !dq_accumulator ||
      !grad_q_wide || !grad_k_wide || !grad_v_wide || !lse || !lse_one || !delta || !offsets) {
    return 2;
  }
  std::vector<bf16> host(elements);
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  for (bf16* dst : {q, k, v, grad_out}) {
    for (auto& x : host) x = __float2bfloat16(normal(rng));
    cudaMemcpy(dst, host.data(), elements * sizeof(bf16), cudaMemcpyHostToDevice);
  }
  const int host_offsets[2] = {0, kTokens};
  cudaMemcpy(offsets, host_offsets, sizeof(host_offsets), cudaMemcpyHostToDevice);

  // (1, heads, tokens, head_dim) contiguous.
  BackwardParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  p.grad_out = grad_out;
  p.grad_q = grad_q;
  p.grad_k = grad_k;
  p.grad_v = grad_v;
  const int64_t head_stride = static_cast<int64_t>(kTokens) * kHeadDim;
  for (int64_t* s : {&p.q_head_stride, &p.k_head_stride, &p.v_head_stride, &p.out_head_stride,
                     &p.grad_out_head_stride, &p.grad_q_head_stride, &p.grad_k_head_stride,
                     &p.grad_v_head_stride, &p.q_batch_stride, &p.k_batch_stride, &p.v_batch_stride,
                     &p.out_batch_stride, &p.grad_out_batch_stride, &p.grad_q_batch_stride,
                     &p.grad_k_batch_stride, &p.grad_v_batch_stride}) {
    *s = head_stride;  // batch 1: the batch stride is never multiplied by a non-zero index
  }
  for (int64_t* s :
       {&p.q_row_stride, &p.k_row_stride, &p.v_row_stride, &p.out_row_stride,
        &p.grad_out_row_stride, &p.grad_q_row_stride, &p.grad_k_row_stride, &p.grad_v_row_stride}) {
    *s = kHeadDim;
  }
  p.cu_seqlens_q = offsets;
  p.cu_seqlens_k = offsets;
  p.num_blocks = 1;
  p.max_seqlen_q = p.max_seqlen_k = kTokens;
  p.batch = 1;
  p.heads_q = p.heads_kv = kHeads;
  p.seqlen_q = p.seqlen_k = kTokens;
  p.head_dim = kHeadDim;
  p.scale = 0.08838834764831845;  // 1 / sqrt(128)
  p.is_causal = kCausal;
  p.deterministic = true;

  BackwardParams one = p;  // the one-row-group variant writes its own outputs
  one.out = out_one;
  one.lse = lse_one;
  one.grad_q = grad_q_one;

  const double fwd_two = median_ms([&] {
    return kernels::launch_fwd_flash_kernel<bf16, kHeadDim, kCausal, 2, false, false>(p, nullptr);
  });
  const double fwd_one = median_ms([&] {
    return kernels::launch_fwd_flash_kernel<bf16, kHeadDim, kCausal, 1, false, false>(one, nullptr);
  });
  const bool vectorized = kernels::rows_are_16_byte_aligned(p);
  int max_shared = 0;
  cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  using Traits = kernels::FlashBwdTraits<kHeadDim>;
  const double delta_ms = median_ms([&] {
    return kernels::launch_kernel(kernels::delta_kernel<bf16>, dim3(kTokens / 4, kHeads), 128, 0,
                                  nullptr, p, delta);
  });
  const double dkdv_ms = median_ms([&] {
    auto kernel = kernels::dkdv_flash_kernel<Traits, bf16, kCausal, false, false, false>;
    const cudaError_t err = kernels::allow_shared_bytes(kernel, Traits::kSharedBytes);
    if (err != cudaSuccess) return err;
    return kernels::launch_kernel(kernel, dim3(kTokens / Traits::kBlockOwn, 1, kHeads),
                                  Traits::kThreads, Traits::kSharedBytes, nullptr, p, delta,
                                  static_cast<float*>(nullptr), vectorized);
  });
  BackwardParams atomic = p;  // the atomic-dQ path writes its own gradients
  atomic.grad_q = grad_q_atomic;
  atomic.grad_k = grad_k_atomic;
  atomic.grad_v = grad_v_atomic;
  const double atomic_ms = median_ms([&] {
    return kernels::run_bwd_flash<bf16, kHeadDim, kCausal>(atomic, delta, dq_accumulator,
                                                           max_shared, nullptr);
  });
  const bool wide_fits = WideKeyTraits::dkdv_shared_bytes(true) <= max_shared;
  BackwardParams wide = atomic;  // 8-warp dK/dV CTAs; same outputs as the 4-warp ones
  wide.grad_q = grad_q_wide;
  wide.grad_k = grad_k_wide;
  wide.grad_v = grad_v_wide;
  const double wide_ms = wide_fits ? median_ms([&] {
    return run_backward_wide_keys(wide, delta, dq_accumulator, max_shared);
  })
                                   : -1;
  const bool two_fit = kernels::FlashBwdTraits<kHeadDim, 2>::kSharedBytes <= max_shared;
  const double dq_two = two_fit ? median_ms([&] {
    return kernels::launch_dq_flash<bf16, kernels::DqTraits<kHeadDim, 2>, kCausal>(
        p, delta, vectorized, nullptr);
  })
                                : -1;
  const double dq_one = median_ms([&] {
    return kernels::launch_dq_flash<bf16, kernels::DqTraits<kHeadDim, 1>, kCausal>(
        one, delta, vectorized, nullptr);
  });
  if (fwd_one < 0 || fwd_two < 0 || delta_ms < 0 || dkdv_ms < 0 || dq_one < 0) return 1;

  report("forward", "2 row groups (128 q)", fwd_two, 2);
  report("forward", "1 row group (64 q)", fwd_one, 2);
  report("delta", "", delta_ms, 0);
  report("dK/dV", "", dkdv_ms, 4);
  if (two_fit) report("dQ", "2 row groups (128 q)", dq_two, 3);
  report("dQ", "1 row group (64 q)", dq_one, 3);
  const double backward = delta_ms + dkdv_ms + (two_fit ? std::min(dq_one, dq_two) : dq_one);
  report("backward", "dQ kernel (determ.)", backward, 5);
  report("backward", "atomic dQ, 64-key CTAs", atomic_ms, 5);
  if (wide_fits) report("backward", "atomic dQ, 128-key CTAs", wide_ms, 5);

  bool agree = same_bits(out, out_one, elements * sizeof(bf16), "forward out");
  agree = same_bits(lse, lse_one, rows * sizeof(float), "forward lse") && agree;
  if (two_fit) agree = same_bits(grad_q, grad_q_one, elements * sizeof(bf16), "dQ") && agree;
  agree = same_bits(grad_k, grad_k_atomic, elements * sizeof(bf16), "dK, two dQ paths") && agree;
  agree = same_bits(grad_v, grad_v_atomic, elements * sizeof(bf16), "dV, two dQ paths") && agree;
  agree = close_enough(grad_q_one, grad_q_atomic, elements) && agree;
  if (wide_fits) {
    agree = same_bits(grad_k, grad_k_wide, elements * sizeof(bf16), "dK, 8-warp CTAs") && agree;
    agree = same_bits(grad_v, grad_v_wide, elements * sizeof(bf16), "dV, 8-warp CTAs") && agree;
    agree = close_enough(grad_q_one, grad_q_wide, elements) && agree;
  }
  std::printf("tile variants: %s\n", agree ? "PASS" : "FAIL");
  return agree ? 0 : 1;
}
