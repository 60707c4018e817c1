// Backward on Hopper warpgroup products (wgmma), bf16 or fp16, dQ summed with atomics: what
// launch_backward runs for the problems hopper_shapes.h lists on sm_90 outside deterministic mode
// (launch.cu says when); bench/probes/wgmma_attention_probe.cu checks it against a host reference
// and times it beside the mma.sync backward.
//
// Same grid and semantics as dkdv_flash_kernel with atomic dQ: a CTA owns kBlockN keys of a block
// and kv head (64 per warpgroup) and loops over the group's query heads and the 64-query tiles
// that see its keys, double-buffering Q / dO tiles (and their lse and Delta) with cp.async. Per
// tile and warpgroup, with every operand in the 128-byte swizzle layout (swizzled_tiles.cuh):
//   S^T = K Q^T and dP^T = V dO^T   both operands from shared memory (K-major);
//   P^T = exp(S^T - lse), dS^T = P^T (dP^T - Delta)   in the accumulators' registers;
//   dV += P^T dO and dK += dS^T Q   P^T and dS^T from registers (they lie in the A-fragment
//                                   layout already), dO and Q N-major;
//   dQ_tile = dS K                  dS^T stored to shared memory and read M-major, K N-major;
//                                   each warpgroup takes 64-column blocks of dQ (over all the
//                                   CTA's keys where they go round) and adds them to the float32
//                                   accumulator with atomics.
// Requires 16-byte aligned rows (rows_are_16_byte_aligned).
// kVariants (score_variants.cuh), as in dkdv_flash_kernel: a window's query tiles only, masks on
// the tiles crossing its edges; P from the softcapped score with ALiBi; dV takes the dropped P and
// dS = P (Z dP - Delta) (1 - tanh^2).
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
#include "../static_switch.h"
#include "../tensor_rows.cuh"
#include "../utils.cuh"
#include "dq_wgmma.cuh"
#include "hopper_kernels.h"
#include "swizzled_tiles.cuh"
#include "warpgroup_gemm.cuh"
#include "wgmma.cuh"

namespace block_attn::cuda::hopper {

// The tiles of hopper_shapes.h's BackwardShape<kHeadDim>.
template <int kHeadDim_>
struct WgmmaBwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kColumnBlocks = kHeadDim / 64;
  static constexpr int kWarpgroups = BackwardShape<kHeadDim>::kWarpgroups;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBlockN = 64 * kWarpgroups;  // keys of a CTA
  static constexpr int kBlockM = 64;                // queries per streamed tile
  static constexpr int kKeyTileBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQueryTileBytes = kBlockM * kHeadDim * 2;
  static constexpr int kDsBytes = kBlockN * kBlockM * 2;  // dS^T: a row of 64 queries per key
  // dQ's work per warpgroup: with a column block of dQ for each, the warpgroups split them and
  // sum over all the CTA's keys; else (head_dim 64, two warpgroups) each forms every column block
  // over its own 64 keys, and dQ takes twice the atomics.
  static constexpr bool kDqSplitsColumns = kColumnBlocks % kWarpgroups == 0;
  static constexpr int kDqColumnBlocks =
      kDqSplitsColumns ? kColumnBlocks / kWarpgroups : kColumnBlocks;
  static constexpr int kDqKeys = kDqSplitsColumns ? kBlockN : 64;
  // K and V; Q and dO double-buffered; dS^T; lse and Delta of each streamed row,
  // double-buffered; plus 1 KiB to align the dynamic buffer to the swizzle's 1024 bytes.
  static constexpr int kSharedBytes =
      2 * kKeyTileBytes + 4 * kQueryTileBytes + kDsBytes + 2 * 2 * kBlockM * 4 + 1024;
  static_assert(kWarpgroups == 1 || kWarpgroups == 2, "one or two warpgroups per CTA");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head_dim 64 or 128");
};

// kAtomicDq: also adds each tile's dS K into dq_accumulator ((batch, heads_q, seqlen_q, head_dim)
// float32, zeroed) with atomics; without it dQ is left to dq_wgmma_kernel. kLongRows: more than
// kMaxKeysPerAccumulator queries of the group's heads may see a key; dK and dV sum chunks of at
// most that many apart and add them up.
template <typename Traits, typename T, bool kIsCausal, bool kAtomicDq, bool kLongRows,
          bool kVariants>
__global__ void __launch_bounds__(Traits::kThreads)
    dkdv_wgmma_kernel(const BackwardParams params, const float* delta, float* dq_accumulator) {
#ifdef BLOCK_ATTN_WGMMA
  constexpr int kThreads = Traits::kThreads;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kQueryTileBytes = Traits::kQueryTileBytes;

  const KeyTile tile = key_tile(params, kBlockN);
  // This CTA's share of the rows after the last block (tail_begin): at once where it has no
  // rows of its own, else after them.
  auto write_tail = [&] {
    zero_grad_kv_tail<T>(params, tail_begin(params, tile.block, tile.kr, params.seqlen_k),
                         tile.batch, tile.head_kv, tile.tile, gridDim.x);
  };
  const BlockRange qr = tile.qr, kr = tile.kr;
  const int n0 = tile.n0;
  if (n0 >= kr.length) {
    write_tail();
    return;
  }
  const int batch = tile.batch;
  const int head_kv = tile.head_kv;
  const int group = params.heads_q / params.heads_kv;
  constexpr int kColumnBlocks = Traits::kColumnBlocks;
  const int warpgroup = threadIdx.x / 128;
  const int warp = (threadIdx.x / 32) % 4;  // within the warpgroup
  const int lane = threadIdx.x % 32;
  const int group_row = lane / 4;
  const int quad_col = lane % 4;
  const int key_row0 = warpgroup * 64 + warp * 16;  // the warp's first key within the CTA

  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  unsigned char* sK = smem;
  unsigned char* sV = sK + Traits::kKeyTileBytes;
  // Double buffers: buffer b of a tile starts b * kQueryTileBytes after its first buffer.
  unsigned char* sQ = sV + Traits::kKeyTileBytes;
  unsigned char* sdO = sQ + 2 * kQueryTileBytes;
  unsigned char* sdS = sdO + 2 * kQueryTileBytes;
  float* s_lse = reinterpret_cast<float*>(sdS + Traits::kDsBytes);
  float* s_delta = s_lse + 2 * kBlockM;

  const T* k = k_rows<T>(params, batch, head_kv, kr.start);
  const T* v = v_rows<T>(params, batch, head_kv, kr.start);
  load_tile_swizzled<kBlockN, kHeadDim, kThreads>(sK, k, params.k_row_stride, n0, kr.length);
  load_tile_swizzled<kBlockN, kHeadDim, kThreads>(sV, v, params.v_row_stride, n0, kr.length);

  [[maybe_unused]] const KeyWindow window =
      block_window(params, qr.start, kr.start, qr.length, kr.length);
  // Query rows that may see a key of this CTA, [m_begin, m_end) for each query head of the
  // group, from a multiple of kBlockM.
  const QueryRows query_rows =
      query_rows_of_keys<kIsCausal, kVariants>(window, n0, kBlockN, qr, kr, kBlockM);
  const int m_begin = query_rows.begin, m_end = query_rows.end;
  const int m_tiles = ceil_div(m_end - m_begin, kBlockM);
  constexpr float kLog2e = 1.4426950408889634f;

  auto load_query_tile = [&](int head, int m0, int buf) {
    const T* q = q_rows<T>(params, batch, head, qr.start);
    const T* grad_out = grad_out_rows<T>(params, batch, head, qr.start);
    load_tile_swizzled<kBlockM, kHeadDim, kThreads>(sQ + buf * kQueryTileBytes, q,
                                                    params.q_row_stride, m0, qr.length);
    load_tile_swizzled<kBlockM, kHeadDim, kThreads>(sdO + buf * kQueryTileBytes, grad_out,
                                                    params.grad_out_row_stride, m0, qr.length);
    stage_row_statistics<kBlockM, kThreads>(params, delta, lse_index(params, batch, head, qr.start),
                                            m0, qr.length, s_lse + buf * kBlockM,
                                            s_delta + buf * kBlockM);
  };

  // Tiles run head by head, m_tiles per head; (tile_head, tile_m0) is the one computed next.
  int tile_head = head_kv * group;
  int tile_m0 = m_begin;
  // Past the group's last head: done (no count of group * m_tiles tiles, which may pass
  // INT32_MAX).
  const int head_end = m_tiles > 0 ? tile_head + group : tile_head;
  if (tile_head < head_end) load_query_tile(tile_head, tile_m0, 0);
  cp_async_commit();

  const float scale_log2 = params.scale * kLog2e;
  const float scale = params.scale;
  // dK and dV of the warpgroup's 64 keys: 64-column blocks of head_dim, accumulator layout
  // (register 4 n + e: key row group_row + 8 (e / 2) of the warp's 16, column 8 n + 2 quad_col
  // + e % 2 of the block).
  float dk[kColumnBlocks][32];
  float dv[kColumnBlocks][32];
#pragma unroll
  for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
    for (int i = 0; i < 32; ++i) dk[h][i] = dv[h][i] = 0.f;
  }
  // This warpgroup's 64 rows of each column block of K and V.
  const int own_rows = warpgroup * 64 * 128;

  [[maybe_unused]] float total_dk[kColumnBlocks][32];
  [[maybe_unused]] float total_dv[kColumnBlocks][32];
  // Adds dK and dV to their totals and restarts them, where no wgmma is in flight.
  auto fold = [&] {
    fence_operands(dk);
    fence_operands(dv);
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        total_dk[h][i] += dk[h][i];
        total_dv[h][i] += dv[h][i];
        dk[h][i] = dv[h][i] = 0.f;
      }
    }
  };
  if constexpr (kLongRows) {
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) total_dk[h][i] = total_dv[h][i] = 0.f;
    }
  }

  [[maybe_unused]] int tiles_summed = 0;  // since the last fold (long rows)
  for (int buf = 0; tile_head < head_end; buf ^= 1) {
    wait_tiles_for_wgmma();  // this tile is in; every thread is done with the other buffer and dS^T
    const int m0 = tile_m0;
    [[maybe_unused]] const int head = tile_head;  // for the atomic dQ rows and the variants
    // The next tile, without a division per iteration (nor tile_m0 + kBlockM past INT32_MAX).
    if (tile_m0 >= m_end - kBlockM) {
      tile_m0 = m_begin;
      ++tile_head;
    } else {
      tile_m0 += kBlockM;
    }
    if (tile_head < head_end) load_query_tile(tile_head, tile_m0, buf ^ 1);
    cp_async_commit();
    const unsigned char* q_tile = sQ + buf * kQueryTileBytes;
    const unsigned char* grad_out_tile = sdO + buf * kQueryTileBytes;
    const float* lse_tile = s_lse + buf * kBlockM;
    const float* delta_tile = s_delta + buf * kBlockM;

    // S^T = K Q^T and dP^T = V dO^T over head_dim / 16 k steps; step ks lies in column block
    // ks / 4. s[4 n + e]: key row group_row + 8 (e / 2) of the warp's 16, query 8 n +
    // 2 quad_col + e % 2 of the tile.
    float s[32];
    float dp[32];
    wgmma_fence();
    warpgroup_gemm_abt<T, kHeadDim>(s, sK + own_rows, kBlockN * 128, q_tile, kBlockM * 128);
    warpgroup_gemm_abt<T, kHeadDim>(dp, sV + own_rows, kBlockN * 128, grad_out_tile, kBlockM * 128);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(s);
    fence_operands(dp);

    // P^T and dS^T in place of S^T and dP^T. Only tiles crossing the causal diagonal or the end
    // of the query block test indices (separate copies: predicated tests would run on every tile).
    const bool needs_mask =
        tile_pair_needs_mask<kIsCausal, kVariants>(window, m0, kBlockM, n0, kBlockN, qr, kr);
    [[maybe_unused]] const float slope = alibi_slope<float>(params, batch, head);
    auto softmax_gradient = [&](auto mask_tag) {
      constexpr bool kMask = decltype(mask_tag)::value;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int col = 8 * (i / 4) + 2 * quad_col + i % 2;
        const int key = n0 + key_row0 + group_row + 8 * ((i % 4) / 2);
        const int query = m0 + col;
        if constexpr (kVariants) {
          float th;
          const float x = transformed_score<float>(params, s[i] * scale, slope, query, key,
                                                   qr.length, kr.length, window, th);
          float p = fast_exp2(x * kLog2e - lse_tile[col]);
          if (kMask &&
              !(query < qr.length && key >= window_key_begin(query, qr.length, kr.length, window) &&
                key < window_key_end(query, qr.length, kr.length, window))) {
            p = 0.f;
          }
          const float z = dropout_factor<float>(params, batch * params.heads_q + head,
                                                static_cast<int64_t>(qr.start) + query,
                                                static_cast<int64_t>(kr.start) + key);
          s[i] = p * z;
          dp[i] = p * (z * dp[i] - delta_tile[col]) * (1.f - th * th);
        } else {
          float p = fast_exp2(s[i] * scale_log2 - lse_tile[col]);
          if (kMask) {
            const bool allowed = query < qr.length &&
                                 (!kIsCausal || key < causal_key_end(query, qr.length, kr.length));
            if (!allowed) p = 0.f;
          }
          s[i] = p;
          dp[i] = p * (dp[i] - delta_tile[col]);
        }
      }
    };
    if (needs_mask) {
      softmax_gradient(std::true_type{});
    } else {
      softmax_gradient(std::false_type{});
    }

    // P^T and dS^T as A fragments (queries 16 kk .. 16 kk + 15 in fragment kk); with atomic dQ,
    // dS^T also to shared memory (row = the CTA's key, 64 queries per row) for the dQ product.
    uint32_t p_frag[kBlockM / 16][4];
    uint32_t ds_frag[kBlockM / 16][4];
    to_a_fragments<T>(s, p_frag);
    to_a_fragments<T>(dp, ds_frag);
    if constexpr (kAtomicDq) {
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int row = key_row0 + group_row + 8 * (j % 2);
          const int col = 8 * (2 * kk + j / 2) + 2 * quad_col;
          store_shared(sdS + swizzle128_offset(row, col), ds_frag[kk][j]);
        }
      }
      fence_shared_for_async_reads();  // for the dQ product's reads
    }

    // dV += P^T dO and dK += dS^T Q.
    auto issue_dv_dk = [&] {
      wgmma_fence();
      warpgroup_gemm_pb<T>(dv, p_frag, grad_out_tile, kBlockM * 128);
      warpgroup_gemm_pb<T>(dk, ds_frag, q_tile, kBlockM * 128);
      wgmma_commit();
    };
    if constexpr (kAtomicDq) {
      __syncthreads();  // every warpgroup's dS^T is in

      // dQ_tile = dS K, 64 columns at a time: A = dS^T read M-major, B = the keys' rows of K's
      // column block N-major. Keys past the block have zero rows in sK, so their dS adds nothing.
      // The first block's products go ahead of dV and dK's, so that its atomics run while the
      // tensor cores form dV and dK.
      float* dq_rows = dq_accumulator + lse_index(params, batch, head, qr.start) * kHeadDim;
      const int dq_key0 = Traits::kDqSplitsColumns ? 0 : warpgroup * 64;  // of sdS and sK
#pragma unroll
      for (int c = 0; c < Traits::kDqColumnBlocks; ++c) {
        const int h = Traits::kDqSplitsColumns ? warpgroup * Traits::kDqColumnBlocks + c : c;
        float dq[32];
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < Traits::kDqKeys / 16; ++ks) {
          const int key = dq_key0 + ks * 16;
          wgmma_m64n64k16<T, true, true>(dq, mn_major_descriptor(sdS, key),
                                         mn_major_descriptor(sK + h * kBlockN * 128, key), ks > 0);
        }
        wgmma_commit();
        if (c == 0) {
          issue_dv_dk();
          wgmma_wait<1>();  // this block's dQ; dV and dK may still run
        } else {
          wgmma_wait<0>();
        }
        fence_operands(dq);
        // dq[4 n + e]: query row 16 warp + group_row + 8 (e / 2) of the tile, column 8 n +
        // 2 quad_col + e % 2 of the block.
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int i = m0 + 16 * warp + group_row + 8 * rr;
          if (i >= qr.length) continue;
          float* sums = dq_rows + static_cast<int64_t>(i) * kHeadDim + h * 64 + 2 * quad_col;
#pragma unroll
          for (int n = 0; n < 8; ++n)
            atomic_add_pair(sums + 8 * n, dq[4 * n + 2 * rr], dq[4 * n + 2 * rr + 1]);
        }
      }
    } else {
      issue_dv_dk();
    }
    wgmma_wait<0>();  // dV and dK, before the next tile's loads overwrite their operands
    fence_operands(p_frag);
    fence_operands(ds_frag);
    if constexpr (kLongRows) {
      if (++tiles_summed == tiles_per_accumulator(kBlockM)) {
        fold();
        tiles_summed = 0;
      }
    }
  }
  cp_async_wait_all();
  wgmma_wait<0>();
  fence_operands(dk);
  fence_operands(dv);
  if constexpr (kLongRows) {
    fold();
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        dk[h][i] = total_dk[h][i];
        dv[h][i] = total_dv[h][i];
      }
    }
  }

  // dK (scaled) and dV straight from the accumulators; rows past the block are dropped.
  T* grad_k = grad_k_rows<T>(params, batch, head_kv, kr.start);
  T* grad_v = grad_v_rows<T>(params, batch, head_kv, kr.start);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int t = n0 + key_row0 + group_row + 8 * rr;
    if (t >= kr.length) continue;
    T* grad_k_row = grad_k + static_cast<int64_t>(t) * params.grad_k_row_stride;
    T* grad_v_row = grad_v + static_cast<int64_t>(t) * params.grad_v_row_stride;
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int col = h * 64 + n * 8 + quad_col * 2;
        const int at = 4 * n + 2 * rr;
        *reinterpret_cast<uint32_t*>(grad_k_row + col) =
            pack2<T>(dk[h][at] * scale, dk[h][at + 1] * scale);
        *reinterpret_cast<uint32_t*>(grad_v_row + col) = pack2<T>(dv[h][at], dv[h][at + 1]);
      }
    }
  }
  write_tail();
#endif
}

// The whole backward: Delta (and the zeroed dQ accumulator), dK / dV, and dQ: with a
// dq_accumulator ((batch, heads_q, seqlen_q, head_dim) float32) from the dK/dV kernel's atomic
// sums, else (deterministic) from dq_wgmma_kernel.
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_bwd_wgmma(const BackwardParams& params, float* delta, float* dq_accumulator,
                          cudaStream_t stream) {
  using Traits = WgmmaBwdTraits<kHeadDim>;
  const bool atomic_dq = dq_accumulator != nullptr;
  cudaError_t err = launch_backward_prologue<T>(params, delta, dq_accumulator, stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(tiles_with_tail(params.max_seqlen_k, params.seqlen_k, Traits::kBlockN),
                  params.num_blocks, params.batch * params.heads_kv);
  if (grid.x > 0 && grid.y > 0 && grid.z > 0) {
    const bool long_rows = long_query_rows(params);
    auto kernel = BOOL_SWITCH(has_variants(params), kVariants, [&] {
      return atomic_dq
                 ? (long_rows ? dkdv_wgmma_kernel<Traits, T, kIsCausal, true, true, kVariants>
                              : dkdv_wgmma_kernel<Traits, T, kIsCausal, true, false, kVariants>)
                 : (long_rows ? dkdv_wgmma_kernel<Traits, T, kIsCausal, false, true, kVariants>
                              : dkdv_wgmma_kernel<Traits, T, kIsCausal, false, false, kVariants>);
    });
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               Traits::kSharedBytes);
    if (err != cudaSuccess) return err;
    err = launch_kernel(kernel, grid, Traits::kThreads, Traits::kSharedBytes, stream, params,
                        static_cast<const float*>(delta), dq_accumulator);
    if (err != cudaSuccess) return err;
  }
  if (atomic_dq) return launch_dq_convert<T>(params, dq_accumulator, stream);
  return run_dq_wgmma<T, kHeadDim, kIsCausal>(params, delta, stream);
}

}  // namespace block_attn::cuda::hopper
