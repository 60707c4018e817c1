// FlashAttention-2-style forward on tensor cores for float16/bfloat16.
//
// Grid (query tiles of the longest block, blocks, batch * heads_q); a CTA reads its block's
// offsets on the device and exits if its tile lies past the block. CTAs start block by block,
// each block's heads on their costliest tile (the last, under a causal mask) first (grid_tile),
// so the launch ends on cheap ones. Four warps each own kRowGroups groups of 16 query rows.
// S = Q K^T and O += P V use mma.sync.m16n8k16 with fp32 accumulators; every K or V fragment read
// from shared memory feeds one mma per row group, so two groups halve the shared-memory traffic
// per product, which bounds the one-group kernel. O and the softmax statistics stay in registers.
// Loads use cp.async: V_j streams in while S_j is computed, and K_{j+1} while P_j V_j is.
// Shared-memory rows are padded by 16 bytes so the eight row addresses of every ldmatrix hit
// distinct banks.
// Causal: only key tiles up to the diagonal are visited and only tiles crossing it are masked.
// kVariants (score_variants.cuh): a sliding window visits only the key tiles some row's window
// reaches and masks only those that cross a window's edge; softcap and ALiBi transform each score
// before the softmax; dropout zeroes P after the row sums took it, before P V.
#pragma once

#include <type_traits>

#include "../kernel_launch.cuh"
#include "../score_variants.cuh"
#include "../shared_memory.cuh"
#include "../static_switch.h"
#include "../tensor_rows.cuh"
#include "../utils.cuh"
#include "flash_kernels.h"
#include "mma_utils.cuh"
#include "online_softmax.cuh"
#include "tile_io.cuh"
#include "warp_gemm.cuh"

namespace block_attn::cuda {

template <int kHeadDim_, int kRowGroups_>
struct FlashFwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kRowGroups = kRowGroups_;  // 16-row mma groups per warp
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = 16 * kRowGroups;
  static constexpr int kBlockM = kWarps * kRowsPerWarp;
  // Keys per tile: as many as leave S (kRowGroups * kBlockN / 2 floats per thread) and O
  // (kRowGroups * kHeadDim / 2) in registers without spilling; longer tiles amortise the
  // per-tile max, rescale and barriers.
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kSmemStride = kHeadDim + 8;  // elements; +16 bytes against bank conflicts
  static constexpr int kSharedBytes = (kBlockM + 2 * kBlockN) * kSmemStride * 2;
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 256, "unsupported head dim");
  static_assert(kRowGroups * kHeadDim <= 256, "O would not fit in registers");
};

// kLongRows: rows may see more than kMaxKeysPerAccumulator keys; each chunk of that many is summed
// apart and folded into a second accumulator, so no float sum takes more terms.
template <typename Traits, typename T, bool kIsCausal, bool kLongRows, bool kVariants>
__global__ void __launch_bounds__(Traits::kThreads)
    fwd_flash_kernel(const ForwardParams params, const bool vectorized) {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  constexpr int kRowGroups = Traits::kRowGroups;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStride = Traits::kSmemStride;
  constexpr int kNBlocksS = kBlockN / 8;   // 8-column mma tiles of S
  constexpr int kNBlocksO = kHeadDim / 8;  // 8-column mma tiles of O

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
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group_row = lane / 4;                     // row of the mma fragments (and row + 8)
  const int quad_col = lane % 4;                      // column pair of the mma fragments
  const int warp_row0 = warp * Traits::kRowsPerWarp;  // the warp's first row in the tile
  const int head_dim = params.head_dim;

  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  const T* q = q_rows<T>(params, batch, head, qr.start);
  const T* k = k_rows<T>(params, batch, head_kv, kr.start);
  const T* v = v_rows<T>(params, batch, head_kv, kr.start);

  [[maybe_unused]] const KeyWindow window =
      block_window(params, qr.start, kr.start, qr.length, kr.length);
  [[maybe_unused]] const float slope = alibi_slope<float>(params, batch, head);
  // The key tiles the tile's rows visit, and those every row sees whole (no mask).
  const KeyTiles tiles = key_tiles_of_rows<kIsCausal, kVariants>(
      window, m0, tile_last_row(m0, kBlockM, qr.length), qr, kr, kBlockN);
  const int j_begin = tiles.begin, j_end = tiles.end, n_end = tiles.key_end;

  // Scores are kept in the log2 domain: exp(x * scale) = exp2(x * scale * log2(e)).
  const float scale_log2 = params.scale * 1.4426950408889634f;
  [[maybe_unused]] const float scale = static_cast<float>(params.scale);
  float acc_o[kRowGroups][kNBlocksO][4];
  float row_max[kRowGroups][2];
  float row_sum[kRowGroups][2];  // per-thread partial sums, reduced over the quad at the end
  zero_fragments(acc_o);
#pragma unroll
  for (int g = 0; g < kRowGroups; ++g) {
    row_max[g][0] = row_max[g][1] = -INFINITY;
    row_sum[g][0] = row_sum[g][1] = 0.f;
  }

  // The chunks summed so far, relative to their row maxima total_max (long rows only).
  [[maybe_unused]] float total_o[kRowGroups][kNBlocksO][4];
  [[maybe_unused]] float total_max[kRowGroups][2];
  [[maybe_unused]] float total_sum[kRowGroups][2];
  auto fold = [&] {
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float m_use = row_max[g][rr] == -INFINITY ? 0.f : row_max[g][rr];
        const float beta = fast_exp2(total_max[g][rr] - m_use);
        total_sum[g][rr] = total_sum[g][rr] * beta + row_sum[g][rr];
        total_max[g][rr] = row_max[g][rr];
        row_sum[g][rr] = 0.f;
#pragma unroll
        for (int d = 0; d < kNBlocksO; ++d) {
#pragma unroll
          for (int e = 2 * rr; e < 2 * rr + 2; ++e) {
            total_o[g][d][e] = total_o[g][d][e] * beta + acc_o[g][d][e];
            acc_o[g][d][e] = 0.f;
          }
        }
      }
    }
  };
  if constexpr (kLongRows) {
    zero_fragments(total_o);
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) {
      total_max[g][0] = total_max[g][1] = -INFINITY;
      total_sum[g][0] = total_sum[g][1] = 0.f;
    }
  }

  load_tile_async<Traits, kBlockM>(sQ, q, params.q_row_stride, m0, qr.length, head_dim, vectorized);
  if (j_end > j_begin) {
    load_tile_async<Traits, kBlockN>(sK, k, params.k_row_stride, j_begin * kBlockN, n_end, head_dim,
                                     vectorized);
  }
  cp_async_commit();

  // One key tile: S_j = Q K_j^T, online softmax, O += P_j V_j. kMask: some score of the tile
  // lies past the diagonal or the block's end. Unmasked tiles get their own copy of the loop so
  // that they carry no per-element index tests (the compiler predicates them otherwise).
  auto process_key_tile = [&](const int j, auto mask_tag) {
    constexpr bool kMask = decltype(mask_tag)::value;
    const int n0 = j * kBlockN;
    cp_async_wait_all();
    __syncthreads();  // K_j is in; every warp is done with V_{j-1}
    load_tile_async<Traits, kBlockN>(sV, v, params.v_row_stride, n0, n_end, head_dim, vectorized);
    cp_async_commit();

    float s[kRowGroups][kNBlocksS][4];
    zero_fragments(s);
    warp_gemm_abt<T, kHeadDim, kBlockN, kStride, kRowGroups>(s, sQ + warp_row0 * kStride, sK, lane);

    // Scale first (scale may be negative), then mask.
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) {
#pragma unroll
      for (int n = 0; n < kNBlocksS; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = m0 + warp_row0 + g * 16 + group_row + (e / 2) * 8;
          const int key = n0 + n * 8 + quad_col * 2 + (e % 2);
          if constexpr (kVariants) {
            float tanh_unused;
            const float x = transformed_score<float>(params, s[g][n][e] * scale, slope, i, key,
                                                     qr.length, kr.length, window, tanh_unused);
            s[g][n][e] = x * 1.4426950408889634f;
            if (kMask && (key < window_key_begin(i, qr.length, kr.length, window) ||
                          key >= window_key_end(i, qr.length, kr.length, window))) {
              s[g][n][e] = -INFINITY;
            }
          } else {
            s[g][n][e] *= scale_log2;
            if (kMask) {
              const int key_end = kIsCausal ? causal_key_end(i, qr.length, kr.length) : kr.length;
              if (key >= key_end) s[g][n][e] = -INFINITY;
            }
          }
        }
      }
    }

    online_softmax_step(s, row_max, row_sum, acc_o);
    // Dropout keeps every probability in the row sums and drops from the output only.
    if constexpr (kVariants) {
      if (params.dropout_seed_offset != nullptr) {
        const int batch_head = batch * params.heads_q + head;
#pragma unroll
        for (int g = 0; g < kRowGroups; ++g) {
#pragma unroll
          for (int n = 0; n < kNBlocksS; ++n) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
              const int i = m0 + warp_row0 + g * 16 + group_row + rr * 8;
              const int key = n0 + n * 8 + quad_col * 2;
              float first, second;
              dropout_factor_pair<float>(params, batch_head, static_cast<int64_t>(qr.start) + i,
                                         static_cast<int64_t>(kr.start) + key, first, second);
              s[g][n][2 * rr] *= first;
              s[g][n][2 * rr + 1] *= second;
            }
          }
        }
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V_j is in; every warp is done with K_j
    if (j + 1 < j_end) {
      load_tile_async<Traits, kBlockN>(sK, k, params.k_row_stride, n0 + kBlockN, n_end, head_dim,
                                       vectorized);
    }
    cp_async_commit();

    // O += P V: the S accumulators of two adjacent 8-key tiles form one 16-key A fragment.
    warp_gemm_pb<T, kBlockN, kHeadDim, kStride, kRowGroups>(acc_o, s, sV, lane);
    if constexpr (kLongRows) {
      if ((j + 1) % tiles_per_accumulator(kBlockN) == 0) fold();
    }
  };

  // Tiles every row sees whole need no mask; the rest (the diagonal, a window's edges, the
  // block's end) do.
  int j = j_begin;
  for (; j < tiles.unmasked_begin; ++j) process_key_tile(j, std::true_type{});
  for (; j < tiles.unmasked_end; ++j) process_key_tile(j, std::false_type{});
  for (; j < j_end; ++j) process_key_tile(j, std::true_type{});
  if constexpr (kLongRows) {
    fold();
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        row_max[g][rr] = total_max[g][rr];
        row_sum[g][rr] = total_sum[g][rr];
      }
#pragma unroll
      for (int d = 0; d < kNBlocksO; ++d) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[g][d][e] = total_o[g][d][e];
      }
    }
  }

  cp_async_wait_all();
  __syncthreads();  // all loads landed and all warps are done with shared memory

  // Normalise, stage O in shared memory (over Q) and write real rows and columns only.
  float* lse = static_cast<float*>(params.lse) + lse_index(params, batch, head, qr.start);
  T* sO = sQ;
#pragma unroll
  for (int g = 0; g < kRowGroups; ++g) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float sum = row_sum[g][rr];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = sum != 0.f ? 1.f / sum : 0.f;  // a NaN sum (NaN inputs) stays visible
      const int row_local = warp_row0 + g * 16 + group_row + rr * 8;
      const int i = m0 + row_local;
      if (quad_col == 0 && i < qr.length) {
        lse[i] = sum != 0.f ? (row_max[g][rr] + log2f(sum)) * 0.6931471805599453f : -INFINITY;
      }
#pragma unroll
      for (int d = 0; d < kNBlocksO; ++d) {
        *reinterpret_cast<uint32_t*>(sO + row_local * kStride + d * 8 + quad_col * 2) =
            pack2<T>(acc_o[g][d][2 * rr] * inv, acc_o[g][d][2 * rr + 1] * inv);
      }
    }
  }
  __syncthreads();

  T* out = out_rows<T>(params, batch, head, qr.start);
  store_tile<Traits, kBlockM>(out, params.out_row_stride, sO, m0, qr.length, head_dim, vectorized);
  write_tail();
#endif
}

template <typename T, int kHeadDim, bool kIsCausal, int kRowGroups, bool kLongRows, bool kVariants>
cudaError_t launch_fwd_flash_kernel(const ForwardParams& params, cudaStream_t stream) {
  using Traits = FlashFwdTraits<kHeadDim, kRowGroups>;
  const dim3 grid(tiles_with_tail(params.max_seqlen_q, params.seqlen_q, Traits::kBlockM),
                  params.num_blocks, params.batch * params.heads_q);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  auto kernel = fwd_flash_kernel<Traits, T, kIsCausal, kLongRows, kVariants>;
  if (Traits::kSharedBytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSharedBytes);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(kernel, grid, Traits::kThreads, Traits::kSharedBytes, stream, params,
                       rows_are_16_byte_aligned(params));
}

// 128-row tiles (two row groups per warp) unless every block has at most 64 queries, where
// half of such a tile would idle, or head_dim is 256, where O fits in registers only once.
// Blocks of more than kMaxKeysPerAccumulator keys take 64-row tiles, which leave registers for
// the second accumulator, and so do calls with variants, whose per-score work needs registers too.
template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_fwd_flash(const ForwardParams& params, cudaStream_t stream) {
  const bool long_rows = params.max_seqlen_k > kMaxKeysPerAccumulator;
  if (has_variants(params)) {
    return BOOL_SWITCH(long_rows, kLongRows, [&] {
      return launch_fwd_flash_kernel<T, kHeadDim, kIsCausal, 1, kLongRows, true>(params, stream);
    });
  }
  if (long_rows) {
    return launch_fwd_flash_kernel<T, kHeadDim, kIsCausal, 1, true, false>(params, stream);
  }
  if constexpr (kHeadDim <= 128) {
    if (params.max_seqlen_q > 64) {
      return launch_fwd_flash_kernel<T, kHeadDim, kIsCausal, 2, false, false>(params, stream);
    }
  }
  return launch_fwd_flash_kernel<T, kHeadDim, kIsCausal, 1, false, false>(params, stream);
}

}  // namespace block_attn::cuda
