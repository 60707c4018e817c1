// Tensor-core backward for float16/bfloat16:
//   1. delta_kernel (shared with the simple backward): Delta_i = rowsum(dO_i * O_i) - grad_lse_i.
//   2. dkdv_flash_kernel: a CTA owns kBlockN keys of a block and kv head (16 per warp) and loops
//      over the group's query heads and the query tiles that see its keys, double-buffering
//      Q / dO tiles with cp.async. Per tile: S^T = K Q^T, dP^T = V dO^T, P^T = exp(S^T - lse),
//      dS^T = P^T (dP^T - Delta), dV += P^T dO, dK += dS^T Q. At head_dim 256 two warps share
//      each 16 keys, one per half of dK's and dV's columns: each forms S^T and dP^T for half the
//      tile's queries, and they exchange P^T and dS^T through shared memory.
//   3. dQ, one of two ways:
//      - deterministic: dq_flash_kernel, a CTA per kBlockM queries looping over the key tiles
//        they see, recomputes S and dP: dQ += dS K (seven products per tile pair in all);
//      - otherwise the dK/dV kernel also forms dQ_tile += dS K from the dS^T it has (passed
//        through shared memory, since its keys span the CTA's warps) and adds it to a float32
//        accumulator with atomics, as FlashAttention-2 does (five products), and
//        dq_convert_kernel scales and rounds the sums into grad_q.
// Causal: query/key tiles that see nothing are skipped; only tiles crossing the diagonal (or the
// block's end) are masked. kVariants (score_variants.cuh): likewise for a sliding window's edges;
// P is recomputed from the softcapped score with ALiBi, dV takes the dropped P, and
// dS = P (Z dP - Delta) (1 - tanh^2) with Z the dropout factors and tanh the softcap's.
#pragma once

#include <type_traits>

#include "../kernel_launch.cuh"
#include "../score_variants.cuh"
#include "../shared_memory.cuh"
#include "../simple/bwd_simple.cuh"
#include "../static_switch.h"
#include "../tensor_rows.cuh"
#include "../utils.cuh"
#include "bwd_traits.h"
#include "flash_kernels.h"
#include "mma_utils.cuh"
#include "tile_io.cuh"
#include "warp_gemm.cuh"

namespace block_attn::cuda {

// dst[0] += x and dst[1] += y with atomics: one 8-byte reduction on sm_90 (dst 8-byte aligned).
__device__ __forceinline__ void atomic_add_pair(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// lse (times log2 e) and Delta of query row i of a block whose first row has lse index row_base:
// +inf and 0 past the block's `length` rows, which makes P = 0 there.
__device__ __forceinline__ void row_statistics(const BackwardParams& params, const float* delta,
                                               int64_t row_base, int i, int length, float& lse_log2,
                                               float& row_delta) {
  constexpr float kLog2e = 1.4426950408889634f;
  lse_log2 = i < length ? static_cast<const float*>(params.lse)[row_base + i] * kLog2e : INFINITY;
  row_delta = i < length ? delta[row_base + i] : 0.f;
}

// row_statistics of rows m0 .. m0 + kRows - 1 into s_lse and s_delta, by the CTA's kThreads.
template <int kRows, int kThreads>
__device__ __forceinline__ void stage_row_statistics(const BackwardParams& params,
                                                     const float* delta, int64_t row_base, int m0,
                                                     int length, float* s_lse, float* s_delta) {
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    row_statistics(params, delta, row_base, m0 + r, length, s_lse[r], s_delta[r]);
  }
}

// kAtomicDq: also adds each tile's dS K into dq_accumulator ((batch, heads_q, seqlen_q, head_dim)
// float32, zeroed), with atomics. kLongRows: more than kMaxKeysPerAccumulator queries of the
// group's heads may see a key; dK and dV sum chunks of at most that many apart and add them up.
template <typename Traits, typename T, bool kIsCausal, bool kAtomicDq, bool kLongRows,
          bool kVariants>
__global__ void __launch_bounds__(Traits::kThreads)
    dkdv_flash_kernel(const BackwardParams params, const float* delta, float* dq_accumulator,
                      const bool vectorized) {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  constexpr int kBlockN = Traits::kBlockOwn;     // keys of this CTA
  constexpr int kBlockM = Traits::kBlockStream;  // queries per streamed tile
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStride = Traits::kSmemStride;
  static_assert(Traits::kWarpColumns <= 128, "dK and dV (128 floats a thread at most)");

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
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group_row = lane / 4;
  const int quad_col = lane % 4;
  const int head_dim = params.head_dim;
  // The warp's 16 keys, and the first of the dK / dV columns it accumulates.
  const int key_group = warp % Traits::kRowWarps;
  const int col0 = (warp / Traits::kRowWarps) * Traits::kWarpColumns;

  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kStride;
  // Double buffers: buffer b of a tile starts b * (one tile) after its first buffer.
  constexpr int kTile = kBlockM * kStride;
  T* sQ = sV + kBlockN * kStride;
  T* sdO = sQ + 2 * kTile;
  float* s_lse = reinterpret_cast<float*>(sdO + 2 * kTile);
  float* s_delta = s_lse + 2 * kBlockM;
  // dS^T for the atomic dQ, and with a column split P^T too (each [key][query], kDsStride apart).
  [[maybe_unused]] T* s_ds = reinterpret_cast<T*>(s_delta + 2 * kBlockM);
  [[maybe_unused]] T* s_p = s_ds + kBlockN * Traits::kDsStride;

  const T* k = k_rows<T>(params, batch, head_kv, kr.start);
  const T* v = v_rows<T>(params, batch, head_kv, kr.start);
  load_tile_async<Traits, kBlockN>(sK, k, params.k_row_stride, n0, kr.length, head_dim, vectorized);
  load_tile_async<Traits, kBlockN>(sV, v, params.v_row_stride, n0, kr.length, head_dim, vectorized);

  [[maybe_unused]] const KeyWindow window =
      block_window(params, qr.start, kr.start, qr.length, kr.length);
  // Query rows that may see a key of this tile, [m_begin, m_end) for each query head of the
  // group, from a multiple of kBlockM.
  const QueryRows query_rows =
      query_rows_of_keys<kIsCausal, kVariants>(window, n0, kBlockN, qr, kr, kBlockM);
  const int m_begin = query_rows.begin, m_end = query_rows.end;
  const int m_tiles = ceil_div(m_end - m_begin, kBlockM);
  constexpr float kLog2e = 1.4426950408889634f;

  auto load_query_tile = [&](int head, int m0, int buf) {
    const T* q = q_rows<T>(params, batch, head, qr.start);
    const T* grad_out = grad_out_rows<T>(params, batch, head, qr.start);
    load_tile_async<Traits, kBlockM>((sQ + buf * kTile), q, params.q_row_stride, m0, qr.length,
                                     head_dim, vectorized);
    load_tile_async<Traits, kBlockM>((sdO + buf * kTile), grad_out, params.grad_out_row_stride, m0,
                                     qr.length, head_dim, vectorized);
    stage_row_statistics<kBlockM, Traits::kThreads>(
        params, delta, lse_index(params, batch, head, qr.start), m0, qr.length,
        s_lse + buf * kBlockM, s_delta + buf * kBlockM);
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
  [[maybe_unused]] const float scale = static_cast<float>(params.scale);
  constexpr int kColumns = Traits::kWarpColumns;
  float dk[kColumns / 8][4];
  float dv[kColumns / 8][4];
  zero_fragments(dk);
  zero_fragments(dv);
  [[maybe_unused]] float total_dk[kColumns / 8][4];
  [[maybe_unused]] float total_dv[kColumns / 8][4];
  if constexpr (kLongRows) {
    zero_fragments(total_dk);
    zero_fragments(total_dv);
  }
  const T* sK_warp = sK + key_group * 16 * kStride;
  const T* sV_warp = sV + key_group * 16 * kStride;

  [[maybe_unused]] int tiles_summed = 0;  // since the last fold (long rows)
  for (int buf = 0; tile_head < head_end; buf ^= 1) {
    cp_async_wait_all();
    __syncthreads();  // this tile is in; every warp is done with the other buffer
    const int m0 = tile_m0;
    [[maybe_unused]] const int head = tile_head;
    // The next tile, without a division per iteration (nor tile_m0 + kBlockM past INT32_MAX).
    if (tile_m0 >= m_end - kBlockM) {
      tile_m0 = m_begin;
      ++tile_head;
    } else {
      tile_m0 += kBlockM;
    }
    if (tile_head < head_end) load_query_tile(tile_head, tile_m0, buf ^ 1);
    cp_async_commit();

    const bool needs_mask =
        tile_pair_needs_mask<kIsCausal, kVariants>(window, m0, kBlockM, n0, kBlockN, qr, kr);
    [[maybe_unused]] const float slope = alibi_slope<float>(params, batch, head);
    // P^T = exp(S^T - lse) into s and dS^T = P^T (dP^T - Delta) into dp, in place, for the
    // warp's 16 keys and the tile's queries q0, q0 + 1, ...; masked pairs get 0.
    auto probabilities = [&](auto mask_tag, auto& s, auto& dp, int q0) {
      constexpr bool kMask = decltype(mask_tag)::value;
      constexpr int kTiles = std::extent_v<std::remove_reference_t<decltype(s)>>;
#pragma unroll
      for (int n = 0; n < kTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = q0 + n * 8 + quad_col * 2 + (e % 2);  // query within the tile
          const int t = n0 + key_group * 16 + group_row + (e / 2) * 8;
          const int i = m0 + col;
          if constexpr (kVariants) {
            float th;
            const float x = transformed_score<float>(params, s[n][e] * scale, slope, i, t,
                                                     qr.length, kr.length, window, th);
            float p = fast_exp2(x * kLog2e - s_lse[buf * kBlockM + col]);
            if (kMask &&
                !(i < qr.length && t >= window_key_begin(i, qr.length, kr.length, window) &&
                  t < window_key_end(i, qr.length, kr.length, window))) {
              p = 0.f;
            }
            const float z = dropout_factor<float>(params, batch * params.heads_q + head,
                                                  static_cast<int64_t>(qr.start) + i,
                                                  static_cast<int64_t>(kr.start) + t);
            s[n][e] = p * z;
            dp[n][e] = p * (z * dp[n][e] - s_delta[buf * kBlockM + col]) * (1.f - th * th);
          } else {
            float p = fast_exp2(s[n][e] * scale_log2 - s_lse[buf * kBlockM + col]);
            if (kMask) {
              const bool allowed =
                  i < qr.length && (!kIsCausal || t < causal_key_end(i, qr.length, kr.length));
              if (!allowed) p = 0.f;
            }
            s[n][e] = p;
            dp[n][e] = p * (dp[n][e] - s_delta[buf * kBlockM + col]);
          }
        }
      }
    };
    // Separate copies for masked and unmasked tiles: the compiler would otherwise predicate the
    // per-element index tests and run them on every tile.
    auto accumulate_tile = [&](auto mask_tag) {
      if constexpr (Traits::kColumnSplit == 1) {
        float s[kBlockM / 8][4];
        float dp[kBlockM / 8][4];
        zero_fragments(s);
        zero_fragments(dp);
        warp_gemm_abt<T, kHeadDim, kBlockM, kStride>(s, sK_warp, (sQ + buf * kTile), lane);
        warp_gemm_abt<T, kHeadDim, kBlockM, kStride>(dp, sV_warp, (sdO + buf * kTile), lane);
        probabilities(mask_tag, s, dp, 0);
        if constexpr (kAtomicDq) {
          warp_store_acc<T, kBlockM, Traits::kDsStride>(s_ds + key_group * 16 * Traits::kDsStride,
                                                        dp, 1.f, lane);
        }
        warp_gemm_pb<T, kBlockM, kColumns, kStride>(dv, s, (sdO + buf * kTile), lane);
        warp_gemm_pb<T, kBlockM, kColumns, kStride>(dk, dp, (sQ + buf * kTile), lane);
      } else {
        // The key group's warps each form S^T and dP^T for their share of the tile's queries
        // and pass P^T and dS^T (rounded to T, as warp_gemm_pb would) to each other through
        // shared memory; then each accumulates its columns of dV and dK over all the queries.
        constexpr int kQueries = Traits::kQueriesPerWarp;
        const int q0 = (warp / Traits::kRowWarps) * kQueries;
        float s[kQueries / 8][4];
        float dp[kQueries / 8][4];
        zero_fragments(s);
        zero_fragments(dp);
        warp_gemm_abt<T, kHeadDim, kQueries, kStride>(s, sK_warp, sQ + buf * kTile + q0 * kStride,
                                                      lane);
        warp_gemm_abt<T, kHeadDim, kQueries, kStride>(dp, sV_warp, sdO + buf * kTile + q0 * kStride,
                                                      lane);
        probabilities(mask_tag, s, dp, q0);
        T* p_rows = s_p + key_group * 16 * Traits::kDsStride;
        T* ds_rows = s_ds + key_group * 16 * Traits::kDsStride;
        warp_store_acc<T, kQueries, Traits::kDsStride>(p_rows + q0, s, 1.f, lane);
        warp_store_acc<T, kQueries, Traits::kDsStride>(ds_rows + q0, dp, 1.f, lane);
        __syncthreads();  // both warps' P^T and dS^T are in
        warp_gemm_ab<T, kBlockM, kColumns, Traits::kDsStride, kStride>(
            dv, p_rows, sdO + buf * kTile + col0, lane);
        warp_gemm_ab<T, kBlockM, kColumns, Traits::kDsStride, kStride>(
            dk, ds_rows, sQ + buf * kTile + col0, lane);
      }
    };
    if (needs_mask) {
      accumulate_tile(std::true_type{});
    } else {
      accumulate_tile(std::false_type{});
    }

    if constexpr (kAtomicDq) {
      // dQ_tile += dS K over the CTA's keys: warp w takes 16 queries and kDqColumns columns.
      // Keys past the block have zero rows in sK, so their dS adds nothing.
      constexpr int kDqColumns = Traits::kDqColumns;
      const int q_group = warp % Traits::kDqGroups;
      const int dq_col0 = (warp / Traits::kDqGroups) * kDqColumns;
      __syncthreads();  // every warp's dS^T is in
      float dq[kDqColumns / 8][4];
      zero_fragments(dq);
      warp_gemm_atb<T, kBlockN, kDqColumns, Traits::kDsStride, kStride>(dq, s_ds + q_group * 16,
                                                                        sK + dq_col0, lane);
      float* dq_rows = dq_accumulator + lse_index(params, batch, head, qr.start) * head_dim;
      // Rows of the accumulator start 8-byte aligned when head_dim is even.
      const bool aligned_pairs = head_dim % 2 == 0;
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int i = m0 + q_group * 16 + group_row + rr * 8;
        if (i >= qr.length) continue;
#pragma unroll
        for (int n = 0; n < kDqColumns / 8; ++n) {
          const int col = dq_col0 + n * 8 + quad_col * 2;
          if (col >= head_dim) continue;
          float* sum = dq_rows + static_cast<int64_t>(i) * head_dim + col;
          if (aligned_pairs) {
            atomic_add_pair(sum, dq[n][2 * rr], dq[n][2 * rr + 1]);
          } else {
            atomicAdd(sum, dq[n][2 * rr]);
            if (col + 1 < head_dim) atomicAdd(sum + 1, dq[n][2 * rr + 1]);
          }
        }
      }
    }
    if constexpr (kLongRows) {
      if (++tiles_summed == tiles_per_accumulator(kBlockM)) {
        add_fragments(total_dk, dk);
        add_fragments(total_dv, dv);
        tiles_summed = 0;
      }
    }
  }
  if constexpr (kLongRows) {
    add_fragments(total_dk, dk);
    add_fragments(total_dv, dv);
    add_fragments(dk, total_dk);
    add_fragments(dv, total_dv);
  }

  cp_async_wait_all();
  __syncthreads();  // with atomic dQ, every warp has read all of sK
  // Each warp overwrites its own rows and columns of sK / sV with dK / dV.
  warp_store_acc<T, kColumns, kStride>(sK + key_group * 16 * kStride + col0, dk, params.scale,
                                       lane);
  warp_store_acc<T, kColumns, kStride>(sV + key_group * 16 * kStride + col0, dv, 1.f, lane);
  __syncthreads();
  T* grad_k = grad_k_rows<T>(params, batch, head_kv, kr.start);
  T* grad_v = grad_v_rows<T>(params, batch, head_kv, kr.start);
  store_tile<Traits, kBlockN>(grad_k, params.grad_k_row_stride, sK, n0, kr.length, head_dim,
                              vectorized);
  store_tile<Traits, kBlockN>(grad_v, params.grad_v_row_stride, sV, n0, kr.length, head_dim,
                              vectorized);
  write_tail();
#endif
}

// dQ: a CTA owns kBlockOwn queries; with two row groups per warp every K and V fragment read
// from shared memory feeds two products. Query tiles run costliest first (grid_tile): the last,
// under a causal mask.
// kLongRows: blocks may have more than kMaxKeysPerAccumulator keys; dQ sums chunks of at most
// that many apart and adds them up.
template <typename Traits, typename T, bool kIsCausal, bool kLongRows, bool kVariants>
__global__ void __launch_bounds__(Traits::kThreads)
    dq_flash_kernel(const BackwardParams params, const float* delta, const bool vectorized) {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  static_assert(Traits::kColumnSplit == 1, "a dQ warp owns whole rows");
  static_assert(Traits::kRowGroups * Traits::kHeadDim <= 256, "dQ (128 floats a thread at most)");
  constexpr int kRowGroups = Traits::kRowGroups;
  constexpr int kBlockM = Traits::kBlockOwn;     // queries of this CTA
  constexpr int kBlockN = Traits::kBlockStream;  // keys per streamed tile
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStride = Traits::kSmemStride;

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
  const int group_row = lane / 4;
  const int quad_col = lane % 4;
  const int warp_row0 = warp * Traits::kRowsPerWarp;  // the warp's first owned row
  const int head_dim = params.head_dim;

  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * kStride;
  // Double buffers: buffer b of a tile starts b * (one tile) after its first buffer.
  constexpr int kTile = kBlockN * kStride;
  T* sK = sdO + kBlockM * kStride;
  T* sV = sK + 2 * kTile;

  const T* q = q_rows<T>(params, batch, head, qr.start);
  const T* grad_out = grad_out_rows<T>(params, batch, head, qr.start);
  const T* k = k_rows<T>(params, batch, head_kv, kr.start);
  const T* v = v_rows<T>(params, batch, head_kv, kr.start);

  [[maybe_unused]] const KeyWindow window =
      block_window(params, qr.start, kr.start, qr.length, kr.length);
  [[maybe_unused]] const float slope = alibi_slope<float>(params, batch, head);
  // The key tiles the tile's rows visit, and those every row sees whole (no mask).
  const KeyTiles tiles = key_tiles_of_rows<kIsCausal, kVariants>(
      window, m0, tile_last_row(m0, kBlockM, qr.length), qr, kr, kBlockN);
  const int j_begin = tiles.begin, j_end = tiles.end, n_end = tiles.key_end;

  load_tile_async<Traits, kBlockM>(sQ, q, params.q_row_stride, m0, qr.length, head_dim, vectorized);
  load_tile_async<Traits, kBlockM>(sdO, grad_out, params.grad_out_row_stride, m0, qr.length,
                                   head_dim, vectorized);
  if (j_end > j_begin) {
    load_tile_async<Traits, kBlockN>(sK, k, params.k_row_stride, j_begin * kBlockN, n_end, head_dim,
                                     vectorized);
    load_tile_async<Traits, kBlockN>(sV, v, params.v_row_stride, j_begin * kBlockN, n_end, head_dim,
                                     vectorized);
  }
  cp_async_commit();

  constexpr float kLog2e = 1.4426950408889634f;
  const float scale_log2 = params.scale * kLog2e;
  [[maybe_unused]] const float scale = static_cast<float>(params.scale);
  const int64_t row_base = lse_index(params, batch, head, qr.start);
  float lse_log2[kRowGroups][2];
  float row_delta[kRowGroups][2];
  float dq[kRowGroups][kHeadDim / 8][4];
#pragma unroll
  for (int g = 0; g < kRowGroups; ++g) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int i = m0 + warp_row0 + g * 16 + group_row + rr * 8;
      row_statistics(params, delta, row_base, i, qr.length, lse_log2[g][rr], row_delta[g][rr]);
    }
  }
  zero_fragments(dq);
  [[maybe_unused]] float total_dq[kRowGroups][kHeadDim / 8][4];
  if constexpr (kLongRows) zero_fragments(total_dq);
  const T* sQ_warp = sQ + warp_row0 * kStride;
  const T* sdO_warp = sdO + warp_row0 * kStride;

  for (int j = j_begin; j < j_end; ++j) {
    const int buf = (j - j_begin) % 2;
    const int n0 = j * kBlockN;
    cp_async_wait_all();
    __syncthreads();  // tile j is in; every warp is done with the other buffer
    if (j + 1 < j_end) {
      load_tile_async<Traits, kBlockN>((sK + (buf ^ 1) * kTile), k, params.k_row_stride,
                                       n0 + kBlockN, n_end, head_dim, vectorized);
      load_tile_async<Traits, kBlockN>((sV + (buf ^ 1) * kTile), v, params.v_row_stride,
                                       n0 + kBlockN, n_end, head_dim, vectorized);
    }
    cp_async_commit();

    // Separate copies for masked and unmasked tiles, as in dkdv_flash_kernel.
    auto accumulate_tile = [&](auto mask_tag) {
      constexpr bool kMask = decltype(mask_tag)::value;
      float s[kRowGroups][kBlockN / 8][4];
      float dp[kRowGroups][kBlockN / 8][4];
      zero_fragments(s);
      zero_fragments(dp);
      warp_gemm_abt<T, kHeadDim, kBlockN, kStride, kRowGroups>(s, sQ_warp, (sK + buf * kTile),
                                                               lane);
      warp_gemm_abt<T, kHeadDim, kBlockN, kStride, kRowGroups>(dp, sdO_warp, (sV + buf * kTile),
                                                               lane);
#pragma unroll
      for (int g = 0; g < kRowGroups; ++g) {
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int rr = e / 2;
            const int i = m0 + warp_row0 + g * 16 + group_row + rr * 8;
            const int key = n0 + n * 8 + quad_col * 2 + (e % 2);
            if constexpr (kVariants) {
              float th;
              const float x = transformed_score<float>(params, s[g][n][e] * scale, slope, i, key,
                                                       qr.length, kr.length, window, th);
              float p = fast_exp2(x * kLog2e - lse_log2[g][rr]);
              if (kMask && (key < window_key_begin(i, qr.length, kr.length, window) ||
                            key >= window_key_end(i, qr.length, kr.length, window))) {
                p = 0.f;
              }
              const float z = dropout_factor<float>(params, batch * params.heads_q + head,
                                                    static_cast<int64_t>(qr.start) + i,
                                                    static_cast<int64_t>(kr.start) + key);
              s[g][n][e] = p * (z * dp[g][n][e] - row_delta[g][rr]) * (1.f - th * th);  // dS
            } else {
              float p = fast_exp2(s[g][n][e] * scale_log2 - lse_log2[g][rr]);
              if (kMask) {
                const int key_end = kIsCausal ? causal_key_end(i, qr.length, kr.length) : kr.length;
                if (key >= key_end) p = 0.f;
              }
              s[g][n][e] = p * (dp[g][n][e] - row_delta[g][rr]);  // dS
            }
          }
        }
      }
      warp_gemm_pb<T, kBlockN, kHeadDim, kStride, kRowGroups>(dq, s, (sK + buf * kTile), lane);
    };
    if (j < tiles.unmasked_begin || j >= tiles.unmasked_end) {
      accumulate_tile(std::true_type{});
    } else {
      accumulate_tile(std::false_type{});
    }
    if constexpr (kLongRows) {
      if ((j + 1) % tiles_per_accumulator(kBlockN) == 0) add_fragments(total_dq, dq);
    }
  }
  if constexpr (kLongRows) {
    add_fragments(total_dq, dq);
    add_fragments(dq, total_dq);
  }

  cp_async_wait_all();
  __syncthreads();
  warp_store_acc<T, kHeadDim, kStride, kRowGroups>(sQ + warp_row0 * kStride, dq, params.scale,
                                                   lane);
  __syncthreads();
  T* grad_q = grad_q_rows<T>(params, batch, head, qr.start);
  store_tile<Traits, kBlockM>(grad_q, params.grad_q_row_stride, sQ, m0, qr.length, head_dim,
                              vectorized);
  write_tail();
#endif
}

// grad_q = scale * the atomic path's float32 sums, one warp per query row.
template <typename T>
__global__ void __launch_bounds__(128)
    dq_convert_kernel(const BackwardParams params, const float* dq_accumulator) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * 4 + threadIdx.x / 32;
  if (row >= params.seqlen_q) return;
  const int batch = blockIdx.y / params.heads_q;
  const int head = blockIdx.y % params.heads_q;
  const float* sums = dq_accumulator + lse_index(params, batch, head, row) * params.head_dim;
  T* grad_q = grad_q_rows<T>(params, batch, head, row);
  const float scale = static_cast<float>(params.scale);
  for (int d = lane; d < params.head_dim; d += 32) grad_q[d] = from_acc<T>(sums[d] * scale);
}

// What both tensor-core backwards start with: Delta, and the atomic path's accumulator zeroed.
template <typename T>
cudaError_t launch_backward_prologue(const BackwardParams& params, float* delta,
                                     float* dq_accumulator, cudaStream_t stream) {
  const dim3 grid_rows(ceil_div(params.seqlen_q, 4), params.batch * params.heads_q);
  if (grid_rows.x == 0 || grid_rows.y == 0) return cudaSuccess;
  const cudaError_t err = launch_kernel(delta_kernel<T>, grid_rows, 128, 0, stream, params, delta);
  if (err != cudaSuccess || dq_accumulator == nullptr) return err;
  const size_t bytes = static_cast<size_t>(params.batch) * params.heads_q * params.seqlen_q *
                       params.head_dim * sizeof(float);
  return cudaMemsetAsync(dq_accumulator, 0, bytes, stream);
}

// grad_q from the atomic path's sums.
template <typename T>
cudaError_t launch_dq_convert(const BackwardParams& params, const float* dq_accumulator,
                              cudaStream_t stream) {
  const dim3 grid_rows(ceil_div(params.seqlen_q, 4), params.batch * params.heads_q);
  if (grid_rows.x == 0 || grid_rows.y == 0) return cudaSuccess;
  return launch_kernel(dq_convert_kernel<T>, grid_rows, 128, 0, stream, params, dq_accumulator);
}

template <typename Kernel>
cudaError_t allow_shared_bytes(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, typename Traits, bool kIsCausal>
cudaError_t launch_dq_flash(const BackwardParams& params, const float* delta, bool vectorized,
                            cudaStream_t stream) {
  const dim3 grid(tiles_with_tail(params.max_seqlen_q, params.seqlen_q, Traits::kBlockOwn),
                  params.num_blocks, params.batch * params.heads_q);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  auto kernel = dq_flash_kernel<Traits, T, kIsCausal, false, false>;
  // Long key blocks and calls with variants take one row group (run_bwd_flash_tiles), which
  // leaves registers for the second accumulator and the per-score work.
  if constexpr (Traits::kRowGroups == 1) {
    const bool long_rows = params.max_seqlen_k > kMaxKeysPerAccumulator;
    if (has_variants(params)) {
      kernel = long_rows ? dq_flash_kernel<Traits, T, kIsCausal, true, true>
                         : dq_flash_kernel<Traits, T, kIsCausal, false, true>;
    } else if (long_rows) {
      kernel = dq_flash_kernel<Traits, T, kIsCausal, true, false>;
    }
  }
  cudaError_t err = allow_shared_bytes(kernel, Traits::kSharedBytes);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, Traits::kThreads, Traits::kSharedBytes, stream, params, delta,
                       vectorized);
}

template <typename T, typename Traits, bool kIsCausal>
cudaError_t launch_dkdv_flash(const BackwardParams& params, const float* delta,
                              float* dq_accumulator, bool vectorized, cudaStream_t stream) {
  const dim3 grid(tiles_with_tail(params.max_seqlen_k, params.seqlen_k, Traits::kBlockOwn),
                  params.num_blocks, params.batch * params.heads_kv);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  const bool atomic_dq = dq_accumulator != nullptr;
  const bool long_rows = long_query_rows(params);
  auto kernel = BOOL_SWITCH(has_variants(params), kVariants, [&] {
    return atomic_dq
               ? (long_rows ? dkdv_flash_kernel<Traits, T, kIsCausal, true, true, kVariants>
                            : dkdv_flash_kernel<Traits, T, kIsCausal, true, false, kVariants>)
               : (long_rows ? dkdv_flash_kernel<Traits, T, kIsCausal, false, true, kVariants>
                            : dkdv_flash_kernel<Traits, T, kIsCausal, false, false, kVariants>);
  });
  const int shared_bytes = Traits::dkdv_shared_bytes(atomic_dq);
  cudaError_t err = allow_shared_bytes(kernel, shared_bytes);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, grid, Traits::kThreads, shared_bytes, stream, params, delta,
                       dq_accumulator, vectorized);
}

// The backward with the given dK/dV tiles, and dQ by atomics or by the dQ kernel with DqOne's
// tiles (DqTwo's, two row groups per warp, where blocks are longer than 64 queries and the
// device's CTAs have their shared memory; void: never).
template <typename T, bool kIsCausal, typename DkDv, typename DqOne, typename DqTwo>
cudaError_t run_bwd_flash_tiles(const BackwardParams& params, float* delta, float* dq_accumulator,
                                int max_shared_bytes, cudaStream_t stream) {
  const bool vectorized = rows_are_16_byte_aligned(params);
  cudaError_t err = launch_backward_prologue<T>(params, delta, dq_accumulator, stream);
  if (err == cudaSuccess) {
    err = launch_dkdv_flash<T, DkDv, kIsCausal>(params, delta, dq_accumulator, vectorized, stream);
  }
  if (err != cudaSuccess) return err;
  if (dq_accumulator != nullptr) return launch_dq_convert<T>(params, dq_accumulator, stream);
  if constexpr (!std::is_void_v<DqTwo>) {
    if (params.max_seqlen_q > 64 && DqTwo::kSharedBytes <= max_shared_bytes &&
        params.max_seqlen_k <= kMaxKeysPerAccumulator && !has_variants(params)) {
      return launch_dq_flash<T, DqTwo, kIsCausal>(params, delta, vectorized, stream);
    }
  }
  return launch_dq_flash<T, DqOne, kIsCausal>(params, delta, vectorized, stream);
}

// dK/dV CTAs of 4 groups of 16 keys (DkDvTraits). At head_dim 256 each group has two warps, and
// devices with less shared memory per CTA than those tiles need (sm_86, sm_89) get narrower
// ones. The dQ kernel takes two row groups per warp up to head_dim 128 (above, their
// accumulators would not fit in registers) where the shared memory allows.
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_bwd_flash(const BackwardParams& params, void* delta_workspace,
                          float* dq_accumulator, int max_shared_bytes, cudaStream_t stream) {
  auto* delta = static_cast<float*>(delta_workspace);
  using DkDv = DkDvTraits<kHeadDim>;
  if constexpr (kHeadDim > 128) {
    if (flash_bwd_shared_bytes<DkDv, DqTraits<kHeadDim>>() > max_shared_bytes) {
      return run_bwd_flash_tiles<T, kIsCausal, NarrowDkDvTraits<kHeadDim>, NarrowDqTraits<kHeadDim>,
                                 void>(params, delta, dq_accumulator, max_shared_bytes, stream);
    }
    return run_bwd_flash_tiles<T, kIsCausal, DkDv, DqTraits<kHeadDim>, void>(
        params, delta, dq_accumulator, max_shared_bytes, stream);
  } else {
    return run_bwd_flash_tiles<T, kIsCausal, DkDv, DqTraits<kHeadDim>, DqTraits<kHeadDim, 2>>(
        params, delta, dq_accumulator, max_shared_bytes, stream);
  }
}

}  // namespace block_attn::cuda
