// Forward on tensor cores for blocks of few queries against long key blocks: decoding new tokens
// against per-sequence key/value caches. float16/bfloat16, sm_80+.
//
// The flash forward gives each query head its own 64-row tile: a block of one query fills one
// row of it, and every query head of a kv head reads that head's K and V again. Here a 16-row
// tile (one mma row group) holds lanes l = row * groups + g, query row l / groups of head
// head_kv * groups + l % groups, so a K or V row is read once for all the heads that share it.
// Few such tiles would leave most SMs idle, so each block's key tiles are split over `splits`
// CTAs (grid (splits * lane tiles, blocks, batch * heads_kv)); with more than one split, every CTA
// writes its rows' normalised partial output and log-sum-exp, and combine_splits_kernel merges
// them. Within a CTA each of the four warps takes 16 keys of every 64-key tile, with its own
// online softmax; the warps' partial results merge in shared memory at the end. Loads use
// cp.async: V_j streams in while S_j is computed, and K_{j+1} while P_j V_j is.
// kVariants (score_variants.cuh), as in the flash forward: a window's key tiles only, split over
// the CTAs, masks on the tiles crossing its edges; softcap and ALiBi (each lane its head's slope)
// on every score; dropout on P after the row sums took it.
#pragma once

#include <type_traits>

#include "../kernel_launch.cuh"
#include "../score_variants.cuh"
#include "../shared_memory.cuh"
#include "../tensor_rows.cuh"
#include "../utils.cuh"
#include "flash_kernels.h"
#include "mma_utils.cuh"
#include "online_softmax.cuh"
#include "tile_io.cuh"
#include "warp_gemm.cuh"

namespace block_attn::cuda {

template <int kHeadDim_>
struct DecodeFwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLanes = kDecodeLanes;  // (row, head) pairs per tile: one mma row group
  static constexpr int kBlockN = kDecodeKeyTile;
  static constexpr int kKeysPerWarp = kBlockN / kWarps;  // 16: one k-step of the P V product
  static constexpr int kSmemStride = kHeadDim + 8;  // elements; +16 bytes against bank conflicts
  static constexpr int kTileBytes = (kLanes + 2 * kBlockN) * kSmemStride * 2;
  // After the key loop the tiles' memory holds every warp's float O (16 x kHeadDim; +4 floats
  // per row against bank conflicts); the warps' row maxima and sums follow the tiles.
  static constexpr int kMergeStride = kHeadDim + 4;
  static constexpr int kStatsBytes = 2 * kWarps * kLanes * 4;
  static constexpr int kSharedBytes = kTileBytes + kStatsBytes;
  static_assert(kWarps * kLanes * kMergeStride * 4 <= kTileBytes, "merge buffer too large");
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 256, "unsupported head dim");
  static_assert(kKeysPerWarp == 16, "the warps' products assume 16 keys each");
};

// The CTA's rows: lane tile, block and kv head, and the query rows its lanes stand for.
struct DecodeTile {
  BlockRange qr;
  BlockRange kr;
  int lane0;  // the tile's first lane; lane l is row l / groups of query head head_kv * groups + l
              // % groups
  int split;
  int batch;
  int head_kv;
  int groups;
};

__device__ __forceinline__ DecodeTile decode_tile(const ForwardParams& p, int lane_tiles) {
  DecodeTile t;
  t.qr = block_range(p.cu_seqlens_q, blockIdx.y, p.seqlen_q);
  t.kr = block_range(p.cu_seqlens_k, blockIdx.y, p.seqlen_k);
  t.lane0 = static_cast<int>(blockIdx.x % lane_tiles) * kDecodeLanes;
  t.split = static_cast<int>(blockIdx.x / lane_tiles);
  t.batch = static_cast<int>(blockIdx.z) / p.heads_kv;
  t.head_kv = static_cast<int>(blockIdx.z) % p.heads_kv;
  t.groups = p.heads_q / p.heads_kv;
  return t;
}

// Lane `lane`'s query head, and its row in the tensors (the block's row lane / groups).
__device__ __forceinline__ int lane_head(const DecodeTile& t, int lane) {
  return t.head_kv * t.groups + lane % t.groups;
}
__device__ __forceinline__ int lane_row(const DecodeTile& t, int lane) {
  return t.qr.start + lane / t.groups;
}

// Index of a lane's query row in the (batch, heads_q, seqlen_q) lse array and in each split's
// slice of the partial results.
__device__ __forceinline__ int64_t decode_row_index(const ForwardParams& p, const DecodeTile& t,
                                                    int lane) {
  return lse_index(p, t.batch, lane_head(t, lane), lane_row(t, lane));
}

// Writes columns [c, c + 8) of a lane's output row, `o` times `factor` (real columns only).
template <typename T>
__device__ __forceinline__ void store_output_chunk(const ForwardParams& p, const DecodeTile& t,
                                                   int lane, int c, const float (&o)[8],
                                                   float factor, bool vectorized) {
  T* dst = out_rows<T>(p, t.batch, lane_head(t, lane), lane_row(t, lane)) + c;
  if (vectorized) {
    uint4 packed;
    packed.x = pack2<T>(o[0] * factor, o[1] * factor);
    packed.y = pack2<T>(o[2] * factor, o[3] * factor);
    packed.z = pack2<T>(o[4] * factor, o[5] * factor);
    packed.w = pack2<T>(o[6] * factor, o[7] * factor);
    *reinterpret_cast<uint4*>(dst) = packed;
  } else {
    for (int e = 0; e < 8 && c + e < p.head_dim; ++e) dst[e] = from_acc<T>(o[e] * factor);
  }
}

// Stages the tile's 16 query rows in shared memory; lanes past the block's rows are zero.
template <typename Traits, typename T>
__device__ __forceinline__ void load_lane_rows_async(T* sQ, const ForwardParams& p,
                                                     const DecodeTile& t, bool vectorized) {
  constexpr int kChunks = Traits::kHeadDim / 8;
  for (int idx = threadIdx.x; idx < Traits::kLanes * kChunks; idx += Traits::kThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    const int lane = t.lane0 + r;
    const int row = lane / t.groups;
    T* dst = sQ + r * Traits::kSmemStride + c;
    if (row < t.qr.length && c < p.head_dim) {
      const T* src = q_rows<T>(p, t.batch, lane_head(t, lane), lane_row(t, lane)) + c;
      if (vectorized) {
        cp_async_16(dst, src);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = c + e < p.head_dim ? src[e] : from_acc<T>(0.f);
      }
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

// Keys [0, end) of the block that query `row` sees.
template <bool kIsCausal>
__device__ __forceinline__ int decode_key_end(int row, BlockRange qr, BlockRange kr) {
  return kIsCausal ? causal_key_end(row, qr.length, kr.length) : kr.length;
}

template <typename Traits, typename T, bool kIsCausal, bool kVariants>
__global__ void __launch_bounds__(Traits::kThreads)
    fwd_decode_kernel(const ForwardParams params, const int lane_tiles, float* split_partials,
                      const bool vectorized) {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStride = Traits::kSmemStride;
  constexpr int kLanes = Traits::kLanes;
  constexpr int kWarps = Traits::kWarps;
  constexpr int kNBlocksS = Traits::kKeysPerWarp / 8;  // 8-column mma tiles of S
  constexpr int kNBlocksO = kHeadDim / 8;              // 8-column mma tiles of O

  const DecodeTile tile = decode_tile(params, lane_tiles);
  const BlockRange qr = tile.qr, kr = tile.kr;
  // The block's query rows with a lane in this tile.
  const int first_row = tile.lane0 / tile.groups;
  const int last_row = min((tile.lane0 + kLanes - 1) / tile.groups, qr.length - 1);
  // This CTA's share of the rows after the last block (tail_begin): at once where it has no
  // rows of its own, else after them.
  auto write_tail = [&] {
    if (tile.split == 0) {  // the first split's CTAs of the last block write the rows after it
      write_query_tail<T>(params, tail_begin(params, blockIdx.y, qr, params.seqlen_q), tile.batch,
                          tile.head_kv * tile.groups, tile.groups, tile.lane0 / kLanes, lane_tiles);
    }
  };
  if (last_row < first_row) {
    write_tail();
    return;
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group_row = lane / 4;  // rows of the mma fragments: group_row and group_row + 8
  const int quad_col = lane % 4;   // column pair of the mma fragments
  const int head_dim = params.head_dim;

  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kLanes * kStride;
  T* sV = sK + kBlockN * kStride;

  const T* k = k_rows<T>(params, tile.batch, tile.head_kv, kr.start);
  const T* v = v_rows<T>(params, tile.batch, tile.head_kv, kr.start);

  // Key tiles some lane may see, [first_tile, n_tiles); tiles every lane sees whole (no mask),
  // [unmasked_begin, unmasked_end); and this split's share of the first.
  [[maybe_unused]] const KeyWindow window =
      block_window(params, qr.start, kr.start, qr.length, kr.length);
  const KeyTiles tiles =
      key_tiles_of_rows<kIsCausal, kVariants>(window, first_row, last_row, qr, kr, kBlockN);
  const int first_tile = tiles.begin, n_tiles = tiles.end, n_end = tiles.key_end;
  const int unmasked_begin = tiles.unmasked_begin, unmasked_end = tiles.unmasked_end;
  const int splits = gridDim.x / lane_tiles;
  const int tiles_per_split = ceil_div(n_tiles - first_tile, splits);
  const int tile_begin = first_tile + min(tile.split * tiles_per_split, n_tiles - first_tile);
  const int tile_end = min(tile_begin + tiles_per_split, n_tiles);

  const float scale_log2 = params.scale * 1.4426950408889634f;
  [[maybe_unused]] const float scale = static_cast<float>(params.scale);
  // The ALiBi slopes of the thread's two fragment rows (lanes group_row and group_row + 8).
  [[maybe_unused]] float slope[2] = {0.f, 0.f};
  if constexpr (kVariants) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      slope[rr] =
          alibi_slope<float>(params, tile.batch, lane_head(tile, tile.lane0 + group_row + rr * 8));
    }
  }
  // One 16-row group: the shapes online_softmax_step and the warp products take.
  float acc_o[1][kNBlocksO][4];
  float row_max[1][2] = {{-INFINITY, -INFINITY}};
  float row_sum[1][2] = {{0.f, 0.f}};  // per-thread partial sums, reduced over the quad at the end
  zero_fragments(acc_o);

  load_lane_rows_async<Traits>(sQ, params, tile, vectorized);
  if (tile_begin < tile_end) {
    load_tile_async<Traits, kBlockN>(sK, k, params.k_row_stride, tile_begin * kBlockN, n_end,
                                     head_dim, vectorized);
  }
  cp_async_commit();

  auto process_key_tile = [&](const int j, auto mask_tag) {
    constexpr bool kMask = decltype(mask_tag)::value;
    const int n0 = j * kBlockN + warp * Traits::kKeysPerWarp;  // the warp's first key
    cp_async_wait_all();
    __syncthreads();  // K_j is in; every warp is done with V_{j-1}
    load_tile_async<Traits, kBlockN>(sV, v, params.v_row_stride, j * kBlockN, n_end, head_dim,
                                     vectorized);
    cp_async_commit();

    float s[1][kNBlocksS][4];
    zero_fragments(s);
    warp_gemm_abt<T, kHeadDim, Traits::kKeysPerWarp, kStride, 1>(
        s, sQ, sK + warp * Traits::kKeysPerWarp * kStride, lane);
#pragma unroll
    for (int n = 0; n < kNBlocksS; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = (tile.lane0 + group_row + (e / 2) * 8) / tile.groups;
        const int key = n0 + n * 8 + quad_col * 2 + (e % 2);
        if constexpr (kVariants) {
          float tanh_unused;
          const float x = transformed_score<float>(params, s[0][n][e] * scale, slope[e / 2], row,
                                                   key, qr.length, kr.length, window, tanh_unused);
          s[0][n][e] = x * 1.4426950408889634f;
          if (kMask && (key < window_key_begin(row, qr.length, kr.length, window) ||
                        key >= window_key_end(row, qr.length, kr.length, window))) {
            s[0][n][e] = -INFINITY;
          }
        } else {
          s[0][n][e] *= scale_log2;  // scale first (it may be negative), then mask
          if (kMask && key >= decode_key_end<kIsCausal>(row, qr, kr)) s[0][n][e] = -INFINITY;
        }
      }
    }

    online_softmax_step(s, row_max, row_sum, acc_o);  // the warp's 16 keys
    // Dropout keeps every probability in the row sums and drops from the output only.
    if constexpr (kVariants) {
      if (params.dropout_seed_offset != nullptr) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int lane_index = tile.lane0 + group_row + rr * 8;
          const int batch_head = tile.batch * params.heads_q + lane_head(tile, lane_index);
#pragma unroll
          for (int n = 0; n < kNBlocksS; ++n) {
            const int key = n0 + n * 8 + quad_col * 2;
            float first, second;
            dropout_factor_pair<float>(params, batch_head, lane_row(tile, lane_index),
                                       static_cast<int64_t>(kr.start) + key, first, second);
            s[0][n][2 * rr] *= first;
            s[0][n][2 * rr + 1] *= second;
          }
        }
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V_j is in; every warp is done with K_j
    if (j + 1 < tile_end) {
      load_tile_async<Traits, kBlockN>(sK, k, params.k_row_stride, (j + 1) * kBlockN, n_end,
                                       head_dim, vectorized);
    }
    cp_async_commit();

    warp_gemm_pb<T, Traits::kKeysPerWarp, kHeadDim, kStride, 1>(
        acc_o, s, sV + warp * Traits::kKeysPerWarp * kStride, lane);
  };

  const int j_unmasked_begin = min(max(unmasked_begin, tile_begin), tile_end);
  const int j_unmasked_end = max(min(unmasked_end, tile_end), j_unmasked_begin);
  int j = tile_begin;
  for (; j < j_unmasked_begin; ++j) process_key_tile(j, std::true_type{});
  for (; j < j_unmasked_end; ++j) process_key_tile(j, std::false_type{});
  for (; j < tile_end; ++j) process_key_tile(j, std::true_type{});

  cp_async_wait_all();
  __syncthreads();  // all loads landed and all warps are done with the tiles

  // Every warp's O (unnormalised), row maximum and sum, then one merged value per element.
  float* merge_o = reinterpret_cast<float*>(smem_raw);
  float* warp_max = reinterpret_cast<float*>(smem_raw + Traits::kTileBytes);
  float* warp_sum = warp_max + kWarps * kLanes;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float sum = row_sum[0][rr];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = group_row + rr * 8;
    if (quad_col == 0) {
      warp_max[warp * kLanes + r] = row_max[0][rr];
      warp_sum[warp * kLanes + r] = sum;
    }
#pragma unroll
    for (int d = 0; d < kNBlocksO; ++d) {
      *reinterpret_cast<float2*>(merge_o + (warp * kLanes + r) * Traits::kMergeStride + d * 8 +
                                 quad_col * 2) =
          make_float2(acc_o[0][d][2 * rr], acc_o[0][d][2 * rr + 1]);
    }
  }
  __syncthreads();

  const int64_t rows_total = static_cast<int64_t>(params.batch) * params.heads_q * params.seqlen_q;
  constexpr int kChunks = kHeadDim / 8;
  for (int idx = threadIdx.x; idx < kLanes * kChunks; idx += Traits::kThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    const int lane_index = tile.lane0 + r;
    if (lane_index / tile.groups >= qr.length || c >= head_dim) continue;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_max[w * kLanes + r]);
    float weight[kWarps];
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      weight[w] = m == -INFINITY ? 0.f : fast_exp2(warp_max[w * kLanes + r] - m);
      sum += weight[w] * warp_sum[w * kLanes + r];
    }
    const float inv = sum != 0.f ? 1.f / sum : 0.f;  // a NaN sum (NaN inputs) stays visible
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float x = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        x += weight[w] * merge_o[(w * kLanes + r) * Traits::kMergeStride + c + e];
      }
      o[e] = x * inv;
    }
    const float lse_value =
        sum != 0.f ? (m + log2f(sum)) * 0.6931471805599453f : -INFINITY;  // natural log
    const int64_t at = decode_row_index(params, tile, lane_index);
    if (splits == 1) {
      if (c == 0) static_cast<float*>(params.lse)[at] = lse_value;
      store_output_chunk<T>(params, tile, lane_index, c, o, 1.f, vectorized);
    } else {
      // Partials: splits slices of rows_total log-sum-exps, then splits slices of rows_total
      // rows of head_dim floats.
      const int64_t slice_row = tile.split * rows_total + at;
      if (c == 0) split_partials[slice_row] = lse_value;
      float* dst = split_partials + splits * rows_total + slice_row * head_dim + c;
      for (int e = 0; e < 8 && c + e < head_dim; ++e) dst[e] = o[e];
    }
  }
  write_tail();
#endif
}

// Merges the splits' partial rows of one lane tile: out = sum_s exp(lse_s - lse) out_s with
// lse = log sum_s exp(lse_s). Grid (lane tiles, blocks, batch * heads_kv).
template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads)
    combine_splits_kernel(const ForwardParams params, const int lane_tiles, const int splits,
                          const float* split_partials, const bool vectorized) {
  const DecodeTile tile = decode_tile(params, lane_tiles);
  const int64_t rows_total = static_cast<int64_t>(params.batch) * params.heads_q * params.seqlen_q;
  const int head_dim = params.head_dim;
  constexpr int kChunks = Traits::kHeadDim / 8;
  for (int idx = threadIdx.x; idx < Traits::kLanes * kChunks; idx += Traits::kThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    const int lane_index = tile.lane0 + r;
    if (lane_index / tile.groups >= tile.qr.length || c >= head_dim) continue;
    const int64_t at = decode_row_index(params, tile, lane_index);
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, split_partials[s * rows_total + at]);
    float sum = 0.f;
    float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < splits; ++s) {
      const float lse_s = split_partials[s * rows_total + at];
      if (lse_s == -INFINITY) continue;  // a split without keys for this row
      const float weight = exp_acc(lse_s - m);
      sum += weight;
      const float* src =
          split_partials + splits * rows_total + (s * rows_total + at) * head_dim + c;
      for (int e = 0; e < 8 && c + e < head_dim; ++e) o[e] += weight * src[e];
    }
    const float inv = sum != 0.f ? 1.f / sum : 0.f;
    if (c == 0) static_cast<float*>(params.lse)[at] = sum != 0.f ? m + log_acc(sum) : -INFINITY;
    store_output_chunk<T>(params, tile, lane_index, c, o, inv, vectorized);
  }
}

template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_fwd_decode(const ForwardParams& params, int splits, float* split_partials,
                           cudaStream_t stream) {
  using Traits = DecodeFwdTraits<kHeadDim>;
  const int lane_tiles = decode_lane_tiles(params);
  if (splits < 1 || (splits > 1 && split_partials == nullptr)) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(splits) * lane_tiles > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(splits * lane_tiles, params.num_blocks, params.batch * params.heads_kv);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  const bool vectorized = rows_are_16_byte_aligned(params);
  auto kernel = has_variants(params) ? fwd_decode_kernel<Traits, T, kIsCausal, true>
                                     : fwd_decode_kernel<Traits, T, kIsCausal, false>;
  if (Traits::kSharedBytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSharedBytes);
    if (err != cudaSuccess) return err;
  }
  cudaError_t err = launch_kernel(kernel, grid, Traits::kThreads, Traits::kSharedBytes, stream,
                                  params, lane_tiles, split_partials, vectorized);
  if (err != cudaSuccess || splits == 1) return err;
  const dim3 combine_grid(lane_tiles, params.num_blocks, params.batch * params.heads_kv);
  return launch_kernel(combine_splits_kernel<Traits, T>, combine_grid, Traits::kThreads, 0, stream,
                       params, lane_tiles, splits, static_cast<const float*>(split_partials),
                       vectorized);
}

}  // namespace block_attn::cuda
