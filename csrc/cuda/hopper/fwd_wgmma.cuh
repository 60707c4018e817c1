// Forward on Hopper warpgroup products (wgmma), bf16 or fp16: what launch_forward runs for the
// problems hopper_shapes.h lists on sm_90 (launch.cu says when); bench/probes/
// wgmma_attention_probe.cu checks it against a host reference and times it.
//
// Same grid and semantics as fwd_flash_kernel: (query tiles of the longest block, blocks,
// batch * heads_q), query tiles costliest first, block offsets read on the device. A CTA is
// kWarpgroups warpgroups of 64 queries each, sharing the K and V tiles. Q, K and V tiles are staged
// by cp.async in the 128-byte swizzle layout (each row as 64-element column blocks)
// and read by the tensor cores directly: S = Q K^T with both operands in shared memory, O += P V
// with P in registers (S's accumulators, rounded to T, are already in the A-fragment layout) and
// V N-major. With kOverlapSoftmax, K and V are double-buffered and iteration j issues
// S_j and then P_{j-1} V_{j-1}, so the softmax of S_j runs on the FP32 and MUFU units while the
// tensor cores form the second product. Requires 16-byte aligned rows (rows_are_16_byte_aligned).
// kVariants (score_variants.cuh), as in the flash forward: a window's key tiles only, masks on the
// tiles crossing its edges, softcap and ALiBi on every score, dropout on P before P V.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../../attention_params.h"
#include "../flash/mma_utils.cuh"
#include "../kernel_launch.cuh"
#include "../score_variants.cuh"
#include "../shared_memory.cuh"
#include "../tensor_rows.cuh"
#include "../utils.cuh"
#include "hopper_kernels.h"
#include "swizzled_tiles.cuh"
#include "warpgroup_gemm.cuh"
#include "wgmma.cuh"

namespace block_attn::cuda::hopper {

// The tiles of hopper_shapes.h's ForwardShape<kHeadDim>.
template <int kHeadDim_>
struct WgmmaFwdTraits {
  using Shape = ForwardShape<kHeadDim_>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kColumnBlocks = kHeadDim / 64;
  static constexpr int kWarpgroups = Shape::kWarpgroups;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBlockM = 64 * kWarpgroups;
  static constexpr int kBlockN = Shape::kBlockN;  // keys per tile: 64 or 128
  // Softmax of tile j while the tensor cores run P_{j-1} V_{j-1}: K and V double-buffered.
  static constexpr bool kOverlapSoftmax = Shape::kOverlapSoftmax;
  static constexpr int kStages = kOverlapSoftmax ? 2 : 1;
  static constexpr int kQueryTileBytes = 64 * kHeadDim * 2;  // each warpgroup's Q
  static constexpr int kKeyTileBytes = kBlockN * kHeadDim * 2;
  // Q, K, V; plus 1 KiB to align the dynamic buffer to the swizzle's 1024 bytes.
  static constexpr int kSharedBytes =
      kWarpgroups * kQueryTileBytes + 2 * kStages * kKeyTileBytes + 1024;
  static_assert(kBlockN == 64 || kBlockN == 128, "key tiles of 64 or 128");
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "head_dim 64, 128 or 256");
};

// One warpgroup's view of a query tile's online softmax: its rows' running maximum and sum.
// s[4 n + e] holds row group_row + 8 (e / 2) of the warp's 16, key 8 n + 2 quad_col + e % 2 of
// the tile.
struct SoftmaxRows {
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float alpha[2] = {1.f, 1.f};  // what the last tile scaled the earlier sums by

  // Turns the scores of keys n0.. into probabilities against the updated row maxima (masked
  // past each row's last key when kMask) and adds them to the sums. Returns whether a row maximum
  // of the warp moved, so that O must be scaled by alpha.
  template <bool kMask, bool kIsCausal, int kScores>
  __device__ __forceinline__ bool update(float (&s)[kScores], float scale_log2, int n0, int row0,
                                         BlockRange qr, BlockRange kr) {
    const int group_row = threadIdx.x % 32 / 4;
    const int quad_col = threadIdx.x % 4;
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
    bool max_moved = false;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = row_max[rr];
#pragma unroll
      for (int n = 0; n < kScores / 4; ++n) {
        mx = fmaxf(mx, fmaxf(s[4 * n + 2 * rr], s[4 * n + 2 * rr + 1]));
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      max_moved |= !(mx == row_max[rr]);
      m_use[rr] = mx == -INFINITY ? 0.f : mx;
      alpha[rr] = fast_exp2(row_max[rr] - m_use[rr]);
      row_max[rr] = mx;
      row_sum[rr] *= alpha[rr];
    }
#pragma unroll
    for (int i = 0; i < kScores; ++i) {
      s[i] = fast_exp2(s[i] - m_use[(i % 4) / 2]);
      row_sum[(i % 4) / 2] += s[i];
    }
    return __any_sync(0xffffffffu, max_moved);
  }

  template <int kColumnBlocks>
  __device__ __forceinline__ void rescale(float (&acc_o)[kColumnBlocks][32]) const {
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) acc_o[h][i] *= alpha[(i % 4) / 2];
    }
  }
};

// kLongRows: rows may see more than kMaxKeysPerAccumulator keys; each chunk of that many is summed
// apart and folded into a second accumulator, so no float sum takes more terms.
template <typename Traits, typename T, bool kIsCausal, bool kLongRows, bool kVariants>
__global__ void __launch_bounds__(Traits::kThreads) fwd_wgmma_kernel(const ForwardParams params) {
#ifdef BLOCK_ATTN_WGMMA
  constexpr int kThreads = Traits::kThreads;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kColumnBlocks = Traits::kColumnBlocks;
  constexpr int kScores = kBlockN / 2;  // registers of the 64 x kBlockN score tile

  const QueryTile tile = query_tile(params, kBlockM);
  // This CTA's share of the rows after the last block (tail_begin): at once where it has no
  // rows of its own, else after them.
  auto write_tail = [&] {
    write_query_tail<T>(params, tail_begin(params, tile.block, tile.qr, params.seqlen_q),
                        tile.batch, tile.head, 1, tile.tile, gridDim.x);
  };
  if (tile.m0 >= tile.qr.length) {
    write_tail();
    return;
  }
  const BlockRange qr = tile.qr, kr = tile.kr;
  const int m0 = tile.m0, batch = tile.batch, head = tile.head, head_kv = tile.head_kv;
  const int warpgroup = threadIdx.x / 128;
  const int warp = (threadIdx.x / 32) % 4;  // within the warpgroup
  const int lane = threadIdx.x % 32;
  const int row0 = m0 + warpgroup * 64 + warp * 16;  // the warp's first query
  const int group_row = lane / 4;
  const int quad_col = lane % 4;

  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  unsigned char* sQ = smem;  // one 64-row tile per warpgroup
  unsigned char* sQ_mine = sQ + warpgroup * Traits::kQueryTileBytes;
  unsigned char* sK = sQ + Traits::kWarpgroups * Traits::kQueryTileBytes;  // kStages tiles
  unsigned char* sV = sK + Traits::kStages * Traits::kKeyTileBytes;        // kStages tiles
  auto k_tile = [&](int j) { return sK + (j % Traits::kStages) * Traits::kKeyTileBytes; };
  auto v_tile = [&](int j) { return sV + (j % Traits::kStages) * Traits::kKeyTileBytes; };

  const T* q = q_rows<T>(params, batch, head, qr.start);
  const T* k = k_rows<T>(params, batch, head_kv, kr.start);
  const T* v = v_rows<T>(params, batch, head_kv, kr.start);

  // Key tiles some row sees, [j_begin, j_end), and tiles every row sees whole (no mask),
  // [j_unmasked_begin, j_unmasked_end).
  [[maybe_unused]] const KeyWindow window =
      block_window(params, qr.start, kr.start, qr.length, kr.length);
  [[maybe_unused]] const float slope = alibi_slope<float>(params, batch, head);
  const KeyTiles tiles = key_tiles_of_rows<kIsCausal, kVariants>(
      window, m0, tile_last_row(m0, kBlockM, qr.length), qr, kr, kBlockN);
  const int j_begin = tiles.begin, j_end = tiles.end, n_end = tiles.key_end;
  const int j_unmasked_begin = tiles.unmasked_begin, j_unmasked_end = tiles.unmasked_end;
  auto load_keys = [&](unsigned char* dst, const T* src, int64_t row_stride, int j) {
    load_tile_swizzled<kBlockN, kHeadDim, kThreads>(dst, src, row_stride, j * kBlockN, n_end);
  };

  const float scale_log2 = params.scale * 1.4426950408889634f;
  [[maybe_unused]] const float scale = static_cast<float>(params.scale);
  float acc_o[kColumnBlocks][32];  // 64-column blocks of O, wgmma accumulator layout
#pragma unroll
  for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
    for (int i = 0; i < 32; ++i) acc_o[h][i] = 0.f;
  }
  SoftmaxRows softmax;

  // The chunks summed so far, relative to their row maxima total_max (long rows only). Folded
  // only where no wgmma is in flight.
  [[maybe_unused]] float total_o[kColumnBlocks][32];
  [[maybe_unused]] float total_max[2] = {-INFINITY, -INFINITY};
  [[maybe_unused]] float total_sum[2] = {0.f, 0.f};
  auto fold = [&] {
    float beta[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const float row_max = softmax.row_max[rr];
      beta[rr] = fast_exp2(total_max[rr] - (row_max == -INFINITY ? 0.f : row_max));
      total_sum[rr] = total_sum[rr] * beta[rr] + softmax.row_sum[rr];
      total_max[rr] = row_max;
      softmax.row_sum[rr] = 0.f;
    }
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        total_o[h][i] = total_o[h][i] * beta[(i % 4) / 2] + acc_o[h][i];
        acc_o[h][i] = 0.f;
      }
    }
  };
  auto fold_after_tile = [&](int j) {
    if constexpr (kLongRows) {
      if ((j + 1) % tiles_per_accumulator(kBlockN) == 0) fold();
    }
  };
  if constexpr (kLongRows) {
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) total_o[h][i] = 0.f;
    }
  }

  for (int g = 0; g < Traits::kWarpgroups; ++g) {
    load_tile_swizzled<64, kHeadDim, kThreads>(sQ + g * Traits::kQueryTileBytes, q,
                                               params.q_row_stride, m0 + 64 * g, qr.length);
  }
  if (j_end > j_begin) load_keys(k_tile(j_begin), k, params.k_row_stride, j_begin);
  cp_async_commit();

  // Softmax of S_j (tiles outside [j_unmasked_begin, j_unmasked_end) test each key); whether O
  // needs rescaling. With variants the scores are transformed and masked here, in the log2
  // domain, and the softmax takes them as they are.
  auto softmax_of_tile = [&](float (&s)[kScores], int j) {
    const bool mask = j < j_unmasked_begin || j >= j_unmasked_end;
    if constexpr (kVariants) {
#pragma unroll
      for (int i = 0; i < kScores; ++i) {
        const int row = row0 + group_row + ((i % 4) / 2) * 8;
        const int key = j * kBlockN + (i / 4) * 8 + quad_col * 2 + i % 2;
        float tanh_unused;
        const float x = transformed_score<float>(params, s[i] * scale, slope, row, key, qr.length,
                                                 kr.length, window, tanh_unused);
        s[i] = x * 1.4426950408889634f;
        if (mask && (key < window_key_begin(row, qr.length, kr.length, window) ||
                     key >= window_key_end(row, qr.length, kr.length, window))) {
          s[i] = -INFINITY;
        }
      }
      return softmax.update<false, kIsCausal>(s, 1.f, j * kBlockN, row0, qr, kr);
    }
    return mask ? softmax.update<true, kIsCausal>(s, scale_log2, j * kBlockN, row0, qr, kr)
                : softmax.update<false, kIsCausal>(s, scale_log2, j * kBlockN, row0, qr, kr);
  };
  // Dropout of P_j, after the row sums took it: s[i] and s[i + 1] are adjacent keys of a row.
  auto drop = [&](float (&s)[kScores], int j) {
    if constexpr (kVariants) {
      if (params.dropout_seed_offset == nullptr) return;
      const int batch_head = batch * params.heads_q + head;
#pragma unroll
      for (int i = 0; i < kScores; i += 2) {
        const int row = row0 + group_row + ((i % 4) / 2) * 8;
        const int key = j * kBlockN + (i / 4) * 8 + quad_col * 2;
        float first, second;
        dropout_factor_pair<float>(params, batch_head, static_cast<int64_t>(qr.start) + row,
                                   static_cast<int64_t>(kr.start) + key, first, second);
        s[i] *= first;
        s[i + 1] *= second;
      }
    }
  };

  if constexpr (Traits::kOverlapSoftmax) {
    // Iteration j issues S_j = Q K_j^T and then O += P_{j-1} V_{j-1}, and computes the softmax
    // of S_j while the second product runs; its loads (K_{j+1}, V_j) have a whole iteration to
    // land.
    uint32_t p_frag[kBlockN / 16][4];  // P_{j-1}
    for (int j = j_begin; j < j_end; ++j) {
      wait_tiles_for_wgmma();  // K_j, V_{j-1} are in; every thread is done with K_{j-1}, V_{j-2}
      load_keys(v_tile(j), v, params.v_row_stride, j);
      if (j + 1 < j_end) load_keys(k_tile(j + 1), k, params.k_row_stride, j + 1);
      cp_async_commit();

      float s[kScores];
      wgmma_fence();
      warpgroup_gemm_abt<T, kHeadDim>(s, sQ_mine, 64 * 128, k_tile(j), kBlockN * 128);
      wgmma_commit();
      if (j > j_begin) {
        wgmma_fence();  // the compiler may pack P_{j-1} after the first fence
        warpgroup_gemm_pb<T>(acc_o, p_frag, v_tile(j - 1), kBlockN * 128);
        wgmma_commit();
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
      }
      fence_operands(s);
      const bool rescale = softmax_of_tile(s, j);
      wgmma_wait<0>();
      fence_operands(acc_o);
      fence_operands(p_frag);
      if (rescale) softmax.rescale(acc_o);
      drop(s, j);
      to_a_fragments<T>(s, p_frag);
      fold_after_tile(j);  // O holds tiles up to j - 1 and the sums up to j: both fold alike
    }
    if (j_end > j_begin) {
      wait_tiles_for_wgmma();  // V_{j_end - 1} is in
      wgmma_fence();
      warpgroup_gemm_pb<T>(acc_o, p_frag, v_tile(j_end - 1), kBlockN * 128);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc_o);
      fence_operands(p_frag);
    }
  } else {
    // Each tile in turn: S_j, its softmax, O += P_j V_j, with V_j loading during S_j and K_{j+1}
    // during P_j V_j.
    for (int j = j_begin; j < j_end; ++j) {
      wait_tiles_for_wgmma();  // K_j is in; every thread is done with V_{j-1}
      load_keys(sV, v, params.v_row_stride, j);
      cp_async_commit();

      float s[kScores];
      wgmma_fence();
      warpgroup_gemm_abt<T, kHeadDim>(s, sQ_mine, 64 * 128, sK, kBlockN * 128);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(s);
      if (softmax_of_tile(s, j)) softmax.rescale(acc_o);

      wait_tiles_for_wgmma();  // V_j is in; every thread is done with K_j
      if (j + 1 < j_end) load_keys(sK, k, params.k_row_stride, j + 1);
      cp_async_commit();

      // O += P V: keys 16 kk .. 16 kk + 15 of P as A fragments (all packed before the fence that
      // orders them for the tensor cores); V's rows for those keys, one 64-column block of
      // head_dim per product.
      uint32_t p_frag[kBlockN / 16][4];
      drop(s, j);
      to_a_fragments<T>(s, p_frag);
      wgmma_fence();
      warpgroup_gemm_pb<T>(acc_o, p_frag, sV, kBlockN * 128);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc_o);
      fence_operands(p_frag);
      fold_after_tile(j);
    }
  }
  cp_async_wait_all();
  if constexpr (kLongRows) {
    fold();
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      softmax.row_max[rr] = total_max[rr];
      softmax.row_sum[rr] = total_sum[rr];
    }
#pragma unroll
    for (int h = 0; h < kColumnBlocks; ++h) {
#pragma unroll
      for (int i = 0; i < 32; ++i) acc_o[h][i] = total_o[h][i];
    }
  }

  float* lse = static_cast<float*>(params.lse) + lse_index(params, batch, head, qr.start);
  T* out = out_rows<T>(params, batch, head, qr.start);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float sum = softmax.row_sum[rr];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = sum != 0.f ? 1.f / sum : 0.f;
    const int i = row0 + group_row + rr * 8;
    if (i >= qr.length) continue;
    if (quad_col == 0) {
      lse[i] = sum != 0.f ? (softmax.row_max[rr] + log2f(sum)) * 0.6931471805599453f : -INFINITY;
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
  write_tail();
#endif
}

template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_fwd_wgmma(const ForwardParams& params, cudaStream_t stream) {
  using Traits = WgmmaFwdTraits<kHeadDim>;
  const dim3 grid(tiles_with_tail(params.max_seqlen_q, params.seqlen_q, Traits::kBlockM),
                  params.num_blocks, params.batch * params.heads_q);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  const bool long_rows = params.max_seqlen_k > kMaxKeysPerAccumulator;
  auto kernel = has_variants(params)
                    ? (long_rows ? fwd_wgmma_kernel<Traits, T, kIsCausal, true, true>
                                 : fwd_wgmma_kernel<Traits, T, kIsCausal, false, true>)
                    : (long_rows ? fwd_wgmma_kernel<Traits, T, kIsCausal, true, false>
                                 : fwd_wgmma_kernel<Traits, T, kIsCausal, false, false>);
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               Traits::kSharedBytes);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, Traits::kThreads, Traits::kSharedBytes, stream, params);
}

}  // namespace block_attn::cuda::hopper
