// Checks the Hopper warpgroup-product building blocks of csrc/cuda/hopper/wgmma.cuh on the GPU
// against a host reference, before kernels are built on them:
//   1. S = Q K^T: both operands K-major in the 128-byte swizzle layout (the product S = Q K^T of
//      attention, K stored [key][head_dim]).
//   2. O = P V: B N-major (V stored [key][head_dim]), for several leading/stride byte offsets, to
//      show which descriptor field the layout uses.
//   3. dQ = dS K with dS^T stored: A M-major (stored [k][m]) and B N-major, as the backward's dQ
//      product reads them.
// Plain CUDA, no torch:
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a bench/probes/wgmma_probe.cu -o probe
// Exits 0 when product 1 and at least one encoding of product 2 match; prints every result.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../csrc/cuda/hopper/wgmma.cuh"
#include "gpu_probe.h"

namespace {

using block_attn::cuda::hopper::fence_operands;
using block_attn::cuda::hopper::fence_shared_for_async_reads;
using block_attn::cuda::hopper::k_major_descriptor;
using block_attn::cuda::hopper::smem_descriptor;
using block_attn::cuda::hopper::swizzle128_offset;
using block_attn::cuda::hopper::wgmma_commit;
using block_attn::cuda::hopper::wgmma_fence;
using block_attn::cuda::hopper::wgmma_m64n64k16;
using block_attn::cuda::hopper::wgmma_wait;

constexpr int kDim = 64;  // M = N = K = 64: one swizzle atom wide, four k16 steps

// Writes the warpgroup's 64 x 64 accumulators to a row-major matrix.
__device__ void store_accumulators(const float (&d)[32], float* out) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int j = 0; j < 8; ++j) {
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * warp + lane / 4 + 8 * (e / 2);
      const int col = 8 * j + 2 * (lane % 4) + e % 2;
      out[row * kDim + col] = d[4 * j + e];
    }
  }
}

// Copies a row-major 64 x 64 matrix into a swizzled shared tile.
__device__ void stage(unsigned char* tile, const __nv_bfloat16* src) {
  for (int i = threadIdx.x; i < kDim * kDim; i += blockDim.x) {
    *reinterpret_cast<__nv_bfloat16*>(tile + swizzle128_offset(i / kDim, i % kDim)) = src[i];
  }
}

// a and b row-major 64 x 64 bf16. kNMajorB false: out = a b^T, b's rows being the output columns
// (K-major). true: out = a b, b's rows being its k rows (N-major), its 16-row k steps 2048 bytes
// apart and described with the given byte offsets. kMMajorA: a's rows are its k rows (out =
// a^T b), described like an N-major B.
template <bool kNMajorB, bool kMMajorA = false>
__global__ void product(const __nv_bfloat16* a, const __nv_bfloat16* b, float* out,
                        uint32_t leading_bytes, uint32_t stride_bytes) {
  __shared__ __align__(1024) unsigned char tile_a[kDim * kDim * 2];
  __shared__ __align__(1024) unsigned char tile_b[kDim * kDim * 2];
  stage(tile_a, a);
  stage(tile_b, b);
  fence_shared_for_async_reads();
  __syncthreads();
  float d[32] = {};
  wgmma_fence();
  for (int k0 = 0; k0 < kDim; k0 += 16) {
    const uint64_t desc_b = kNMajorB
                                ? smem_descriptor(tile_b + k0 * 128, leading_bytes, stride_bytes)
                                : k_major_descriptor(tile_b, k0);
    const uint64_t desc_a = kMMajorA
                                ? smem_descriptor(tile_a + k0 * 128, leading_bytes, stride_bytes)
                                : k_major_descriptor(tile_a, k0);
    wgmma_m64n64k16<__nv_bfloat16, kNMajorB, kMMajorA>(d, desc_a, desc_b, k0 > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(d);
  store_accumulators(d, out);
}

using gpu_probe::check;

// Largest |got - want| over the matrix.
double max_error(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::fmax(worst, std::fabs(got[i] - want[i]));
  return worst;
}

}  // namespace

int main() {
  int device = 0;
  cudaDeviceProp prop{};
  if (!check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties")) return 2;
  std::printf("device %s, sm_%d%d\n", prop.name, prop.major, prop.minor);
  if (prop.major != 9) {
    std::printf("wgmma needs sm_90; nothing to check\n");
    return 2;
  }

  const int n = kDim * kDim;
  std::vector<__nv_bfloat16> host_a(n), host_b(n);
  std::vector<float> a(n), b(n);
  std::srand(1);
  for (int i = 0; i < n; ++i) {
    host_a[i] = __float2bfloat16(static_cast<float>(std::rand()) / RAND_MAX * 2.f - 1.f);
    host_b[i] = __float2bfloat16(static_cast<float>(std::rand()) / RAND_MAX * 2.f - 1.f);
    a[i] = __bfloat162float(host_a[i]);
    b[i] = __bfloat162float(host_b[i]);
  }
  std::vector<double> want_abt(n, 0.0), want_ab(n, 0.0), want_atb(n, 0.0);
  for (int r = 0; r < kDim; ++r) {
    for (int c = 0; c < kDim; ++c) {
      for (int k = 0; k < kDim; ++k) {
        want_abt[r * kDim + c] += static_cast<double>(a[r * kDim + k]) * b[c * kDim + k];
        want_ab[r * kDim + c] += static_cast<double>(a[r * kDim + k]) * b[k * kDim + c];
        want_atb[r * kDim + c] += static_cast<double>(a[k * kDim + r]) * b[k * kDim + c];
      }
    }
  }

  __nv_bfloat16 *dev_a = nullptr, *dev_b = nullptr;
  float* dev_out = nullptr;
  bool ok = check(cudaMalloc(&dev_a, n * sizeof(__nv_bfloat16)), "cudaMalloc") &&
            check(cudaMalloc(&dev_b, n * sizeof(__nv_bfloat16)), "cudaMalloc") &&
            check(cudaMalloc(&dev_out, n * sizeof(float)), "cudaMalloc") &&
            check(cudaMemcpy(dev_a, host_a.data(), n * 2, cudaMemcpyHostToDevice), "copy a") &&
            check(cudaMemcpy(dev_b, host_b.data(), n * 2, cudaMemcpyHostToDevice), "copy b");
  if (!ok) return 2;

  constexpr double kTolerance = 1e-3;  // fp32 sums of 64 products of magnitude <= 1
  std::vector<float> got(n);
  product<false><<<1, 128>>>(dev_a, dev_b, dev_out, 0, 0);
  ok = check(cudaDeviceSynchronize(), "a b^T") &&
       check(cudaMemcpy(got.data(), dev_out, n * 4, cudaMemcpyDeviceToHost), "copy out");
  const double abt_error = ok ? max_error(got, want_abt) : INFINITY;
  const bool abt_ok = abt_error <= kTolerance;
  std::printf("S = Q K^T, K-major x K-major: max error %.3g -> %s\n", abt_error,
              abt_ok ? "match" : "MISMATCH");

  product<true, true><<<1, 128>>>(dev_a, dev_b, dev_out, 1024, 1024);
  ok = check(cudaDeviceSynchronize(), "a^T b") &&
       check(cudaMemcpy(got.data(), dev_out, n * 4, cudaMemcpyDeviceToHost), "copy out");
  const double atb_error = ok ? max_error(got, want_atb) : INFINITY;
  const bool atb_ok = atb_error <= kTolerance;
  std::printf("dQ = dS K, M-major A x N-major B (1024 B, 1024 B): max error %.3g -> %s\n",
              atb_error, atb_ok ? "match" : "MISMATCH");
  // Some encodings below read outside the tile, and an illegal address leaves the context
  // unusable: they run last, after the products the kernels depend on.
  const uint32_t offsets[][2] = {{1024, 1024}, {16, 1024}, {1024, 16}, {2048, 1024}, {16, 2048}};
  bool any_ab_ok = false;
  for (const auto& o : offsets) {
    product<true><<<1, 128>>>(dev_a, dev_b, dev_out, o[0], o[1]);
    const bool ran = check(cudaDeviceSynchronize(), "a b") &&
                     check(cudaMemcpy(got.data(), dev_out, n * 4, cudaMemcpyDeviceToHost), "copy");
    const double error = ran ? max_error(got, want_ab) : INFINITY;
    any_ab_ok = any_ab_ok || error <= kTolerance;
    std::printf("O = P V, N-major B, leading %u B, stride %u B: max error %.3g -> %s\n", o[0], o[1],
                error, error <= kTolerance ? "match" : "mismatch");
    if (!ran) break;  // a launch error leaves the context unusable
  }
  const bool pass = abt_ok && any_ab_ok && atb_ok;
  std::printf("%s\n", pass ? "wgmma probe: PASS" : "wgmma probe: FAIL");
  return pass ? 0 : 1;
}
