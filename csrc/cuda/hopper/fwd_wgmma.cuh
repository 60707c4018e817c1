// Forward on Hopper warpgroup products (wgmma), bf16 or fp16, head_dim 64, 128 or 256: what
// launch_forward runs for such problems on sm_90 (launch.cu says when);
// csrc/tests/wgmma_attention_probe.cu checks it against a host reference and times it.
//
// Same grid and semantics as fwd_flash_kernel: (query tiles of the longest block, blocks,
// batch * heads_q), query tiles costliest first, block offsets read on the device. A CTA is
// kWarpgroups warpgroups of 64 queries each, sharing the K and V tiles. Q, K and V tiles are staged
// by cp.async in the 128-byte swizzle layout (each row as 64-element column blocks)
// and read by the tensor cores directly: S = Q K^T with both operands in shared memory, O += P V
// with P in registers (S's accumulators, rounded to T, are already in the A-fragment layout) and
// V N-major. Requires 16-byte aligned rows (rows_are_16_byte_aligned).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../../attention_params.h"
#include "../flash/mma_utils.cuh"
#include "../kernel_launch.cuh"
#include "../tensor_rows.cuh"
#include "../utils.cuh"
#include "hopper_kernels.h"
#include "swizzled_tiles.cuh"
#include "warpgroup_gemm.cuh"
#include "wgmma.cuh"

namespace block_attn::cuda::hopper {

template <int kHeadDim_, int kWarpgroups_, int kBlockN_>
struct WgmmaFwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kColumnBlocks = kHeadDim / 64;
  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBlockM = 64 * kWarpgroups;
  static constexpr int kBlockN = kBlockN_;                   // keys per tile: 64 or 128
  static constexpr int kQueryTileBytes = 64 * kHeadDim * 2;  // each warpgroup's Q
  static constexpr int kKeyTileBytes = kBlockN * kHeadDim * 2;
  // Q, K, V; plus 1 KiB to align the dynamic buffer to the swizzle's 1024 bytes.
  static constexpr int kSharedBytes = kWarpgroups * kQueryTileBytes + 2 * kKeyTileBytes + 1024;
  static_assert(kBlockN == 64 || kBlockN == 128, "key tiles of 64 or 128");
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "head_dim 64, 128 or 256");
};

template <typename Traits, typename T, bool kIsCausal>
__global__ void __launch_bounds__(Traits::kThreads) fwd_wgmma_kernel(const ForwardParams params) {
#ifdef BLOCK_ATTN_WGMMA
  constexpr int kThreads = Traits::kThreads;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kColumnBlocks = Traits::kColumnBlocks;

  const QueryTile tile = query_tile(params, kBlockM);
  if (tile.m0 >= tile.qr.length) return;
  const BlockRange qr = tile.qr, kr = tile.kr;
  const int m0 = tile.m0, batch = tile.batch, head = tile.head, head_kv = tile.head_kv;
  const int warpgroup = threadIdx.x / 128;
  const int warp = (threadIdx.x / 32) % 4;  // within the warpgroup
  const int lane = threadIdx.x % 32;
  const int row0 = m0 + warpgroup * 64 + warp * 16;  // the warp's first query
  const int group_row = lane / 4;
  const int quad_col = lane % 4;

  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  unsigned char* sQ = smem;  // one 64-row tile per warpgroup
  unsigned char* sQ_mine = sQ + warpgroup * Traits::kQueryTileBytes;
  unsigned char* sK = sQ + Traits::kWarpgroups * Traits::kQueryTileBytes;
  unsigned char* sV = sK + Traits::kKeyTileBytes;

  const T* q = q_rows<T>(params, batch, head, qr.start);
  const T* k = k_rows<T>(params, batch, head_kv, kr.start);
  const T* v = v_rows<T>(params, batch, head_kv, kr.start);

  const int n_end = tile_key_end<kIsCausal>(m0, kBlockM, qr, kr);
  const int unmasked_end = tile_unmasked_key_end<kIsCausal>(m0, qr, kr);
  const int n_tiles = ceil_div(n_end, kBlockN);

  const float scale_log2 = params.scale * 1.4426950408889634f;
  float acc_o[kColumnBlocks][32];  // 64-column blocks of O, wgmma accumulator layout
#pragma unroll
  for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
    for (int i = 0; i < 32; ++i) acc_o[h][i] = 0.f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  for (int g = 0; g < Traits::kWarpgroups; ++g) {
    load_tile_swizzled<64, kHeadDim, kThreads>(sQ + g * Traits::kQueryTileBytes, q,
                                               params.q_row_stride, m0 + 64 * g, qr.length);
  }
  if (n_tiles > 0) {
    load_tile_swizzled<kBlockN, kHeadDim, kThreads>(sK, k, params.k_row_stride, 0, n_end);
  }
  cp_async_commit();

  auto process_key_tile = [&](const int j, auto mask_tag) {
    constexpr bool kMask = decltype(mask_tag)::value;
    const int n0 = j * kBlockN;
    wait_tiles_for_wgmma();  // K_j is in; every thread is done with V_{j-1}
    load_tile_swizzled<kBlockN, kHeadDim, kThreads>(sV, v, params.v_row_stride, n0, n_end);
    cp_async_commit();

    // S = Q K^T.
    constexpr int kScores = kBlockN / 2;  // registers of the 64 x kBlockN score tile
    float s[kScores];
    wgmma_fence();
    warpgroup_gemm_abt<T, kHeadDim>(s, sQ_mine, 64 * 128, sK, kBlockN * 128);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(s);

    // s[4 n + e]: row group_row + 8 (e / 2) of the warp's 16, key n0 + 8 n + 2 quad_col + e % 2.
#pragma unroll
    for (int i = 0; i < kScores; ++i) {
      s[i] *= scale_log2;
      if (kMask) {
        const int row = row0 + group_row + ((i % 4) / 2) * 8;
        const int key = n0 + (i / 4) * 8 + quad_col * 2 + i % 2;
        const int key_end = kIsCausal ? causal_key_end(row, qr.length, kr.length) : kr.length;
        if (key >= key_end) s[i] = -INFINITY;
      }
    }
    float m_use[2];
    float alpha[2];
    bool max_moved = false;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = row_max[rr];
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
        mx = fmaxf(mx, fmaxf(s[4 * n + 2 * rr], s[4 * n + 2 * rr + 1]));
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      max_moved |= !(mx == row_max[rr]);
      m_use[rr] = mx == -INFINITY ? 0.f : mx;
      alpha[rr] = fast_exp2(row_max[rr] - m_use[rr]);
      row_max[rr] = mx;
    }
    if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) row_sum[rr] *= alpha[rr];
#pragma unroll
      for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
        for (int i = 0; i < 32; ++i) acc_o[h][i] *= alpha[(i % 4) / 2];
      }
    }
#pragma unroll
    for (int i = 0; i < kScores; ++i) {
      s[i] = fast_exp2(s[i] - m_use[(i % 4) / 2]);
      row_sum[(i % 4) / 2] += s[i];
    }

    wait_tiles_for_wgmma();  // V_j is in; every thread is done with K_j
    if (j + 1 < n_tiles) {
      load_tile_swizzled<kBlockN, kHeadDim, kThreads>(sK, k, params.k_row_stride, n0 + kBlockN,
                                                      n_end);
    }
    cp_async_commit();

    // O += P V: keys 16 kk .. 16 kk + 15 of P as A fragments (all packed before the fence that
    // orders them for the tensor cores); V's rows for those keys, one 64-column block of
    // head_dim per product.
    uint32_t p_frag[kBlockN / 16][4];
    to_a_fragments<T>(s, p_frag);
    wgmma_fence();
    warpgroup_gemm_pb<T>(acc_o, p_frag, sV, kBlockN * 128);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc_o);
    fence_operands(p_frag);
  };

  const int unmasked_tiles = unmasked_end / kBlockN;
  int j = 0;
  for (; j < unmasked_tiles; ++j) process_key_tile(j, std::false_type{});
  for (; j < n_tiles; ++j) process_key_tile(j, std::true_type{});
  cp_async_wait_all();

  float* lse = static_cast<float*>(params.lse) + lse_index(params, batch, head, qr.start);
  T* out = out_rows<T>(params, batch, head, qr.start);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float sum = row_sum[rr];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = sum != 0.f ? 1.f / sum : 0.f;
    const int i = row0 + group_row + rr * 8;
    if (i >= qr.length) continue;
    if (quad_col == 0) {
      lse[i] = sum != 0.f ? (row_max[rr] + log2f(sum)) * 0.6931471805599453f : -INFINITY;
    }
    T* out_row = out + static_cast<int64_t>(i) * params.out_row_stride;
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int col = h * 64 + n * 8 + quad_col * 2;
        *reinterpret_cast<uint32_t*>(out_row + col) =
            pack2<T>(acc_o[h][4 * n + 2 * rr] * inv, acc_o[h][4 * n + 2 * rr + 1] * inv);
      }
    }
  }
#endif
}

template <typename T, int kHeadDim, bool kIsCausal, int kWarpgroups, int kBlockN>
cudaError_t run_fwd_wgmma(const ForwardParams& params, cudaStream_t stream) {
  using Traits = WgmmaFwdTraits<kHeadDim, kWarpgroups, kBlockN>;
  const dim3 grid(ceil_div(params.max_seqlen_q, Traits::kBlockM), params.num_blocks,
                  params.batch * params.heads_q);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  auto kernel = fwd_wgmma_kernel<Traits, T, kIsCausal>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               Traits::kSharedBytes);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, Traits::kThreads, Traits::kSharedBytes, stream, params);
}

}  // namespace block_attn::cuda::hopper
