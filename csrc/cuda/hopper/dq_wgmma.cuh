// dQ of the deterministic backward on Hopper warpgroup products (wgmma), bf16 or fp16, head_dim
// 64 or 128: every element of dQ is summed by one thread, in key order, so runs agree bitwise.
//
// Same grid as the forward: (query tiles of the longest block, blocks, batch * heads_q), query
// tiles costliest first. A CTA is one warpgroup owning 64 queries; it streams the key tiles those
// queries see, K and V double-buffered by cp.async, all in the 128-byte swizzle layout. Per tile:
//   S = Q K^T and dP = dO V^T      both operands from shared memory (K-major);
//   P = exp(S - lse), dS = P (dP - Delta)   in the accumulators' registers;
//   dQ += dS K                     dS from registers (already in the A-fragment layout), K N-major.
// Requires 16-byte aligned rows (rows_are_16_byte_aligned). kVariants: as dq_flash_kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../../attention_params.h"
#include "../flash/bwd_flash.cuh"
#include "../flash/mma_utils.cuh"
#include "../kernel_launch.cuh"
#include "../score_variants.cuh"
#include "../shared_memory.cuh"
#include "../tensor_rows.cuh"
#include "../utils.cuh"
#include "swizzled_tiles.cuh"
#include "warpgroup_gemm.cuh"
#include "wgmma.cuh"

namespace block_attn::cuda::hopper {

template <int kHeadDim_>
struct WgmmaDqTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kColumnBlocks = kHeadDim / 64;
  static constexpr int kThreads = 128;
  static constexpr int kBlockM = 64;  // queries of a CTA
  static constexpr int kBlockN = 64;  // keys per streamed tile
  static constexpr int kTileBytes = 64 * kHeadDim * 2;
  // Q and dO; K and V double-buffered; plus 1 KiB to align the buffer to the swizzle's 1024 bytes.
  static constexpr int kSharedBytes = 6 * kTileBytes + 1024;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head_dim 64 or 128");
};

// kLongRows: blocks may have more than kMaxKeysPerAccumulator keys; dQ sums chunks of at most
// that many apart and adds them up.
template <typename Traits, typename T, bool kIsCausal, bool kLongRows, bool kVariants>
__global__ void __launch_bounds__(Traits::kThreads)
    dq_wgmma_kernel(const BackwardParams params, const float* delta) {
#ifdef BLOCK_ATTN_WGMMA
  constexpr int kThreads = Traits::kThreads;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kColumnBlocks = Traits::kColumnBlocks;
  constexpr int kTileBytes = Traits::kTileBytes;

  const QueryTile tile = query_tile(params, kBlockM);
  // This CTA's share of the rows after the last block (tail_begin): at once where it has no
  // rows of its own, else after them.
  auto write_tail = [&] {
    zero_grad_q_tail<T>(params, tail_begin(params, tile.block, tile.qr, params.seqlen_q),
                        tile.batch, tile.head, tile.tile, gridDim.x);
  };
  if (tile.m0 >= tile.qr.length) {
    write_tail();
    return;
  }
  const BlockRange qr = tile.qr, kr = tile.kr;
  const int m0 = tile.m0, batch = tile.batch, head = tile.head, head_kv = tile.head_kv;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row0 = m0 + warp * 16;  // the warp's first query
  const int group_row = lane / 4;
  const int quad_col = lane % 4;

  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  unsigned char* sQ = smem;
  unsigned char* sdO = sQ + kTileBytes;
  // Double buffers: buffer b of a tile starts b * kTileBytes after its first buffer.
  unsigned char* sK = sdO + kTileBytes;
  unsigned char* sV = sK + 2 * kTileBytes;

  const T* q = q_rows<T>(params, batch, head, qr.start);
  const T* grad_out = grad_out_rows<T>(params, batch, head, qr.start);
  const T* k = k_rows<T>(params, batch, head_kv, kr.start);
  const T* v = v_rows<T>(params, batch, head_kv, kr.start);

  // Key tiles some row sees, [j_begin, j_end), and tiles every row sees whole (no mask),
  // [j_unmasked_begin, j_unmasked_end), as in the wgmma forward.
  [[maybe_unused]] const KeyWindow window =
      block_window(params, qr.start, kr.start, qr.length, kr.length);
  [[maybe_unused]] const float slope = alibi_slope<float>(params, batch, head);
  const KeyTiles tiles = key_tiles_of_rows<kIsCausal, kVariants>(
      window, m0, tile_last_row(m0, kBlockM, qr.length), qr, kr, kBlockN);
  const int j_begin = tiles.begin, j_end = tiles.end, n_end = tiles.key_end;
  const int j_unmasked_begin = tiles.unmasked_begin, j_unmasked_end = tiles.unmasked_end;

  load_tile_swizzled<kBlockM, kHeadDim, kThreads>(sQ, q, params.q_row_stride, m0, qr.length);
  load_tile_swizzled<kBlockM, kHeadDim, kThreads>(sdO, grad_out, params.grad_out_row_stride, m0,
                                                  qr.length);
  if (j_end > j_begin) {
    load_tile_swizzled<kBlockN, kHeadDim, kThreads>(sK, k, params.k_row_stride, j_begin * kBlockN,
                                                    n_end);
    load_tile_swizzled<kBlockN, kHeadDim, kThreads>(sV, v, params.v_row_stride, j_begin * kBlockN,
                                                    n_end);
  }
  cp_async_commit();

  // lse and Delta of the thread's two rows.
  const float scale_log2 = params.scale * 1.4426950408889634f;
  const float scale = params.scale;
  const int64_t row_base = lse_index(params, batch, head, qr.start);
  float lse_log2[2];
  float row_delta[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    row_statistics(params, delta, row_base, row0 + group_row + 8 * rr, qr.length, lse_log2[rr],
                   row_delta[rr]);
  }
  float dq[kColumnBlocks][32];  // 64-column blocks of dQ, wgmma accumulator layout
#pragma unroll
  for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
    for (int i = 0; i < 32; ++i) dq[h][i] = 0.f;
  }
  [[maybe_unused]] float total_dq[kColumnBlocks][32];
  // Adds dQ to its total and restarts it, where no wgmma is in flight.
  auto fold = [&] {
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        total_dq[h][i] += dq[h][i];
        dq[h][i] = 0.f;
      }
    }
  };
  if constexpr (kLongRows) {
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) total_dq[h][i] = 0.f;
    }
  }

  auto process_key_tile = [&](const int j, auto mask_tag) {
    constexpr bool kMask = decltype(mask_tag)::value;
    const int n0 = j * kBlockN;
    const int buf = (j - j_begin) % 2;
    wait_tiles_for_wgmma();  // K_j and V_j are in; every thread is done with the other buffer
    if (j + 1 < j_end) {
      load_tile_swizzled<kBlockN, kHeadDim, kThreads>(sK + (buf ^ 1) * kTileBytes, k,
                                                      params.k_row_stride, n0 + kBlockN, n_end);
      load_tile_swizzled<kBlockN, kHeadDim, kThreads>(sV + (buf ^ 1) * kTileBytes, v,
                                                      params.v_row_stride, n0 + kBlockN, n_end);
    }
    cp_async_commit();
    const unsigned char* k_tile = sK + buf * kTileBytes;
    const unsigned char* v_tile = sV + buf * kTileBytes;

    // S = Q K^T and dP = dO V^T. s[4 n + e]: row group_row + 8 (e / 2) of the warp's 16, key
    // n0 + 8 n + 2 quad_col + e % 2.
    float s[32];
    float dp[32];
    wgmma_fence();
    warpgroup_gemm_abt<T, kHeadDim>(s, sQ, kBlockM * 128, k_tile, kBlockN * 128);
    warpgroup_gemm_abt<T, kHeadDim>(dp, sdO, kBlockM * 128, v_tile, kBlockN * 128);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(s);
    fence_operands(dp);

    // dS in place of dP, then packed as A fragments.
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int rr = (i % 4) / 2;
      const int row = row0 + group_row + 8 * rr;
      const int key = n0 + 8 * (i / 4) + 2 * quad_col + i % 2;
      if constexpr (kVariants) {
        float th;
        const float x = transformed_score<float>(params, s[i] * scale, slope, row, key, qr.length,
                                                 kr.length, window, th);
        float p = fast_exp2(x * 1.4426950408889634f - lse_log2[rr]);
        if (kMask && (key < window_key_begin(row, qr.length, kr.length, window) ||
                      key >= window_key_end(row, qr.length, kr.length, window))) {
          p = 0.f;
        }
        const float z = dropout_factor<float>(params, batch * params.heads_q + head,
                                              static_cast<int64_t>(qr.start) + row,
                                              static_cast<int64_t>(kr.start) + key);
        dp[i] = p * (z * dp[i] - row_delta[rr]) * (1.f - th * th);
      } else {
        float p = fast_exp2(s[i] * scale_log2 - lse_log2[rr]);
        if (kMask) {
          const int key_end = kIsCausal ? causal_key_end(row, qr.length, kr.length) : kr.length;
          if (key >= key_end) p = 0.f;
        }
        dp[i] = p * (dp[i] - row_delta[rr]);
      }
    }
    uint32_t ds_frag[kBlockN / 16][4];
    to_a_fragments<T>(dp, ds_frag);

    // dQ += dS K.
    wgmma_fence();
    warpgroup_gemm_pb<T>(dq, ds_frag, k_tile, kBlockN * 128);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(dq);
    fence_operands(ds_frag);
    if constexpr (kLongRows) {
      if ((j + 1) % tiles_per_accumulator(kBlockN) == 0) fold();
    }
  };

  int j = j_begin;
  for (; j < j_unmasked_begin; ++j) process_key_tile(j, std::true_type{});
  for (; j < j_unmasked_end; ++j) process_key_tile(j, std::false_type{});
  for (; j < j_end; ++j) process_key_tile(j, std::true_type{});
  cp_async_wait_all();
  if constexpr (kLongRows) {
    fold();
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) dq[h][i] = total_dq[h][i];
    }
  }

  T* grad_q = grad_q_rows<T>(params, batch, head, qr.start);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int i = row0 + group_row + 8 * rr;
    if (i >= qr.length) continue;
    T* grad_q_row = grad_q + static_cast<int64_t>(i) * params.grad_q_row_stride;
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int at = 4 * n + 2 * rr;
        *reinterpret_cast<uint32_t*>(grad_q_row + h * 64 + n * 8 + quad_col * 2) =
            pack2<T>(dq[h][at] * scale, dq[h][at + 1] * scale);
      }
    }
  }
  write_tail();
#endif
}

// grad_q of the deterministic backward; delta from launch_backward_prologue.
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_dq_wgmma(const BackwardParams& params, const float* delta, cudaStream_t stream) {
  using Traits = WgmmaDqTraits<kHeadDim>;
  const dim3 grid(tiles_with_tail(params.max_seqlen_q, params.seqlen_q, Traits::kBlockM),
                  params.num_blocks, params.batch * params.heads_q);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  const bool long_rows = params.max_seqlen_k > kMaxKeysPerAccumulator;
  auto kernel = has_variants(params)
                    ? (long_rows ? dq_wgmma_kernel<Traits, T, kIsCausal, true, true>
                                 : dq_wgmma_kernel<Traits, T, kIsCausal, false, true>)
                    : (long_rows ? dq_wgmma_kernel<Traits, T, kIsCausal, true, false>
                                 : dq_wgmma_kernel<Traits, T, kIsCausal, false, false>);
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               Traits::kSharedBytes);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, Traits::kThreads, Traits::kSharedBytes, stream, params, delta);
}

}  // namespace block_attn::cuda::hopper
