// Simple forward: grid (query tiles of the longest block, blocks, batch * heads_q). Each warp
// owns kRowsPerWarp query rows and runs an online softmax over key/value tiles staged in shared
// memory; key tiles past the causal diagonal (or outside the sliding window) are skipped, not
// masked.
#pragma once

#include <type_traits>

#include "../kernel_launch.cuh"
#include "../score_variants.cuh"
#include "../shared_memory.cuh"
#include "../static_switch.h"
#include "../tensor_rows.cuh"
#include "../utils.cuh"
#include "simple_kernels.h"
#include "simple_traits.cuh"

namespace block_attn::cuda {

// kLongRows: rows may see more than kMaxKeysPerAccumulator keys; each chunk of that many is summed
// apart and folded into a second accumulator, so no float sum takes more terms. kVariants: the
// call has a window, softcap, ALiBi or dropout (score_variants.cuh).
template <typename Traits, typename T, bool kIsCausal, bool kLongRows, bool kVariants>
__global__ void __launch_bounds__(Traits::kThreads) fwd_simple_kernel(const ForwardParams params) {
  using A = Acc<T>;
  constexpr int kPerLane = Traits::kPerLane;
  constexpr int kRows = Traits::kRowsPerWarp;
  constexpr int kTileRows = Traits::kTileRows;
  constexpr int kHeadDim = Traits::kHeadDim;

  const BlockRange qr = block_range(params.cu_seqlens_q, blockIdx.y, params.seqlen_q);
  const BlockRange kr = block_range(params.cu_seqlens_k, blockIdx.y, params.seqlen_k);
  const int m0 = blockIdx.x * Traits::kRowsPerBlock;
  const int batch = blockIdx.z / params.heads_q;
  const int head = blockIdx.z % params.heads_q;
  // This CTA's share of the rows after the last block (tail_begin): at once where it has no
  // rows of its own, else after them.
  auto write_tail = [&] {
    write_query_tail<T>(params, tail_begin(params, blockIdx.y, qr, params.seqlen_q), batch, head, 1,
                        blockIdx.x, gridDim.x);
  };
  if (m0 >= qr.length) {
    write_tail();
    return;
  }
  const int head_kv = head / (params.heads_q / params.heads_kv);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int head_dim = params.head_dim;

  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kTileRows * kHeadDim;

  const T* q = q_rows<T>(params, batch, head, qr.start);
  const T* k = k_rows<T>(params, batch, head_kv, kr.start);
  const T* v = v_rows<T>(params, batch, head_kv, kr.start);

  const A scale = static_cast<A>(params.scale);
  A q_reg[kRows][kPerLane];
  A acc[kRows][kPerLane];
  A row_max[kRows];
  A row_sum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = m0 + warp * kRows + r;
    if (i < qr.length) {
      load_row<Traits>(q_reg[r], q + static_cast<int64_t>(i) * params.q_row_stride, head_dim, lane);
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[r][e] = 0;
    row_max[r] = neg_inf<A>();
    row_sum[r] = 0;
  }

  // The chunks summed so far, relative to their row maximum total_max (long rows only).
  [[maybe_unused]] A total_acc[kRows][kPerLane];
  [[maybe_unused]] A total_max[kRows];
  [[maybe_unused]] A total_sum[kRows];
  auto fold = [&] {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const A beta = exp_acc(total_max[r] - (row_max[r] == neg_inf<A>() ? A(0) : row_max[r]));
      total_sum[r] = total_sum[r] * beta + row_sum[r];
      total_max[r] = row_max[r];
      row_sum[r] = 0;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        total_acc[r][e] = total_acc[r][e] * beta + acc[r][e];
        acc[r][e] = 0;
      }
    }
  };
  if constexpr (kLongRows) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      total_max[r] = neg_inf<A>();
      total_sum[r] = 0;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) total_acc[r][e] = 0;
    }
  }

  // Keys any row of this tile may see, in tiles (counted so that no index passes INT32_MAX).
  [[maybe_unused]] const KeyWindow window =
      block_window(params, qr.start, kr.start, qr.length, kr.length);
  [[maybe_unused]] const A slope = alibi_slope<A>(params, batch, head);
  int n_begin = 0;
  int n_end = tile_key_end<kIsCausal>(m0, Traits::kRowsPerBlock, qr, kr);
  if constexpr (kVariants) {
    const int last = tile_last_row(m0, Traits::kRowsPerBlock, qr.length);
    n_begin = window_key_begin(m0, qr.length, kr.length, window) / kTileRows * kTileRows;
    n_end = window_key_end(last, qr.length, kr.length, window);
  }
  const int n_tiles = ceil_div(n_end - n_begin, kTileRows);

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int n0 = n_begin + tile * kTileRows;
    __syncthreads();
    load_tile<Traits>(sK, k, params.k_row_stride, n0, n_end, head_dim);
    load_tile<Traits>(sV, v, params.v_row_stride, n0, n_end, head_dim);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = m0 + warp * kRows + r;
      if (i >= qr.length) continue;  // warp-uniform
      int key_begin = 0;
      int key_end = kIsCausal ? causal_key_end(i, qr.length, kr.length) : kr.length;
      if constexpr (kVariants) {
        key_begin = window_key_begin(i, qr.length, kr.length, window);
        key_end = window_key_end(i, qr.length, kr.length, window);
      }
      // Lane n keeps the score of key n0 + n.
      A my_score = neg_inf<A>();
      for (int n = 0; n < kTileRows; ++n) {
        const A s = dot_row<Traits>(q_reg[r], sK + n * kHeadDim, lane);
        if (lane == n && n0 + n >= key_begin && n0 + n < key_end) my_score = s * scale;
      }
      if constexpr (kVariants) {
        A tanh_unused;
        if (my_score != neg_inf<A>()) {
          my_score = transformed_score<A>(params, my_score, slope, i, n0 + lane, qr.length,
                                          kr.length, window, tanh_unused);
        }
      }
      // max() drops NaN scores, so a row whose allowed scores are all NaN (a NaN query) keeps
      // max -inf: it goes on with 0 in place of the max, and its NaN reaches the sum and output.
      const A new_max = max(row_max[r], warp_max(my_score));
      const bool any_nan = __any_sync(0xffffffffu, my_score != my_score);
      if (new_max == neg_inf<A>() && !any_nan) continue;  // no allowed key yet; warp-uniform
      const A max_used = new_max == neg_inf<A>() ? A(0) : new_max;
      const A alpha = exp_acc(row_max[r] - max_used);
      const A p = exp_acc(my_score - max_used);
      row_sum[r] = row_sum[r] * alpha + warp_sum(p);
      row_max[r] = new_max;
      // Dropout keeps the normaliser of every probability and drops from the output only.
      A p_kept = p;
      if constexpr (kVariants) {
        p_kept = p * dropout_factor<A>(params, blockIdx.z, static_cast<int64_t>(qr.start) + i,
                                       static_cast<int64_t>(kr.start) + n0 + lane);
      }
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[r][e] *= alpha;
      for (int n = 0; n < kTileRows; ++n) {
        const A pn = __shfl_sync(0xffffffffu, p_kept, n);
        const T* vrow = sV + n * kHeadDim;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) acc[r][e] += pn * to_acc(vrow[lane + 32 * e]);
      }
    }
    if constexpr (kLongRows) {
      if ((tile + 1) % tiles_per_accumulator(kTileRows) == 0) fold();
    }
  }
  if constexpr (kLongRows) {
    fold();
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = total_max[r];
      row_sum[r] = total_sum[r];
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[r][e] = total_acc[r][e];
    }
  }

  T* out = out_rows<T>(params, batch, head, qr.start);
  A* lse = static_cast<A*>(params.lse) + lse_index(params, batch, head, qr.start);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = m0 + warp * kRows + r;
    if (i >= qr.length) continue;
    const bool any = row_sum[r] != A(0);  // a NaN sum (NaN inputs) stays visible
    store_row<Traits>(out + static_cast<int64_t>(i) * params.out_row_stride, acc[r],
                      any ? A(1) / row_sum[r] : A(0), head_dim, lane);
    if (lane == 0) {
      lse[i] = any ? row_max[r] + log_acc(row_sum[r]) : A(-INFINITY);
    }
  }
  write_tail();
}

template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_fwd_simple(const ForwardParams& params, cudaStream_t stream) {
  using Traits = SimpleTraits<T, kHeadDim>;
  const dim3 grid(tiles_with_tail(params.max_seqlen_q, params.seqlen_q, Traits::kRowsPerBlock),
                  params.num_blocks, params.batch * params.heads_q);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  // float64 sums do not stall before 2^53 terms.
  const bool long_rows =
      !std::is_same_v<Acc<T>, double> && params.max_seqlen_k > kMaxKeysPerAccumulator;
  return BOOL_SWITCH(long_rows, kLongRows, [&] {
    return BOOL_SWITCH(has_variants(params), kVariants, [&] {
      return launch_kernel(fwd_simple_kernel<Traits, T, kIsCausal, kLongRows, kVariants>, grid,
                           Traits::kThreads, Traits::kSharedBytes, stream, params);
    });
  });
}

}  // namespace block_attn::cuda
