// Simple backward in three deterministic passes, no atomics:
//   1. delta_kernel: Delta_i = rowsum(dO_i * O_i) - grad_lse_i, one warp per query row.
//   2. dkdv_simple_kernel: one CTA per key tile of a block and kv head; each warp owns key rows
//      and loops over the group's query heads and the query tiles that see its keys.
//   3. dq_simple_kernel: one CTA per query tile, looping over the key tiles it sees.
// P is recomputed from lse; dS = P * (dP - Delta). With the variants (kVariants) the scores go
// through the softcap and ALiBi as in the forward, dP is multiplied by the dropout factor Z, dV
// sums Z * P * dO, and dS gains the softcap's derivative 1 - tanh^2.
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

template <typename T>
__global__ void __launch_bounds__(128) delta_kernel(const BackwardParams params, Acc<T>* delta) {
  using A = Acc<T>;
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * 4 + threadIdx.x / 32;
  if (row >= params.seqlen_q) return;
  const int batch = blockIdx.y / params.heads_q;
  const int head = blockIdx.y % params.heads_q;
  const T* grad_out = grad_out_rows<T>(params, batch, head, row);
  const T* out = out_rows<T>(params, batch, head, row);
  A sum = 0;
  for (int d = lane; d < params.head_dim; d += 32) sum += to_acc(grad_out[d]) * to_acc(out[d]);
  sum = warp_sum(sum);
  if (lane == 0) {
    const int64_t idx = static_cast<int64_t>(blockIdx.y) * params.seqlen_q + row;
    delta[idx] = sum - (params.grad_lse ? static_cast<const A*>(params.grad_lse)[idx] : A(0));
  }
}

// Sums of long rows: the running sums `part` take at most kMaxKeysPerAccumulator terms each
// before they are added to `total` and restart (kLongRows of the kernels below).
template <int kRows, int kPerLane, typename A>
__device__ __forceinline__ void fold_sums(A (&total)[kRows][kPerLane], A (&part)[kRows][kPerLane]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      total[r][e] += part[r][e];
      part[r][e] = 0;
    }
  }
}

// The gradient terms of one allowed (query i, key t) pair under the variants: the probability
// times the dropout factor (dV's weight) and dS before the final scale.
template <typename A>
struct PairGrads {
  A kept_p;
  A ds;
};
template <typename A>
__device__ __forceinline__ PairGrads<A> variant_pair_grads(const ForwardParams& params, A s, A lse,
                                                           A dp, A delta, A slope, int i, int t,
                                                           BlockRange qr, BlockRange kr,
                                                           const KeyWindow& window,
                                                           int batch_head) {
  A tanh_value;
  const A score =
      transformed_score<A>(params, s, slope, i, t, qr.length, kr.length, window, tanh_value);
  const A p = exp_acc(score - lse);
  const A z = dropout_factor<A>(params, batch_head, static_cast<int64_t>(qr.start) + i,
                                static_cast<int64_t>(kr.start) + t);
  const A ds = p * (dp * z - delta) * (A(1) - tanh_value * tanh_value);
  return {p * z, ds};
}

// kLongRows: blocks may have more than kMaxKeysPerAccumulator queries (see fold_sums).
// kVariants: the call has a window, softcap, ALiBi or dropout.
template <typename Traits, typename T, bool kIsCausal, bool kLongRows, bool kVariants>
__global__ void __launch_bounds__(Traits::kThreads)
    dkdv_simple_kernel(const BackwardParams params, const Acc<T>* delta) {
  using A = Acc<T>;
  constexpr int kPerLane = Traits::kPerLane;
  constexpr int kRows = Traits::kRowsPerWarp;
  constexpr int kTileRows = Traits::kTileRows;
  constexpr int kHeadDim = Traits::kHeadDim;

  const BlockRange qr = block_range(params.cu_seqlens_q, blockIdx.y, params.seqlen_q);
  const BlockRange kr = block_range(params.cu_seqlens_k, blockIdx.y, params.seqlen_k);
  const int n0 = blockIdx.x * Traits::kRowsPerBlock;
  const int batch = blockIdx.z / params.heads_kv;
  const int head_kv = blockIdx.z % params.heads_kv;
  // This CTA's share of the rows after the last block (tail_begin): at once where it has no
  // rows of its own, else after them.
  auto write_tail = [&] {
    zero_grad_kv_tail<T>(params, tail_begin(params, blockIdx.y, kr, params.seqlen_k), batch,
                         head_kv, blockIdx.x, gridDim.x);
  };
  if (n0 >= kr.length) {
    write_tail();
    return;
  }
  const int group = params.heads_q / params.heads_kv;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int head_dim = params.head_dim;

  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kTileRows * kHeadDim;
  A* s_lse = reinterpret_cast<A*>(sdO + kTileRows * kHeadDim);
  A* s_delta = s_lse + kTileRows;

  const T* k = k_rows<T>(params, batch, head_kv, kr.start);
  const T* v = v_rows<T>(params, batch, head_kv, kr.start);

  A k_reg[kRows][kPerLane];
  A v_reg[kRows][kPerLane];
  A dk[kRows][kPerLane];
  A dv[kRows][kPerLane];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int t = n0 + warp * kRows + r;
    if (t < kr.length) {
      load_row<Traits>(k_reg[r], k + static_cast<int64_t>(t) * params.k_row_stride, head_dim, lane);
      load_row<Traits>(v_reg[r], v + static_cast<int64_t>(t) * params.v_row_stride, head_dim, lane);
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dk[r][e] = dv[r][e] = 0;
  }
  [[maybe_unused]] A total_dk[kLongRows ? kRows : 1][kPerLane] = {};
  [[maybe_unused]] A total_dv[kLongRows ? kRows : 1][kPerLane] = {};
  [[maybe_unused]] int tiles_summed = 0;

  const A scale = static_cast<A>(params.scale);
  // Query tiles that may see the first key of this tile (earlier ones see none of it), from a
  // multiple of kTileRows and counted in tiles, so that no row index passes INT32_MAX.
  [[maybe_unused]] const KeyWindow window =
      block_window(params, qr.start, kr.start, qr.length, kr.length);
  int m_begin =
      kIsCausal ? causal_query_begin(n0, qr.length, kr.length) / kTileRows * kTileRows : 0;
  int m_stop = qr.length;
  if constexpr (kVariants) {
    const int last_key = tile_last_row(n0, Traits::kRowsPerBlock, kr.length);
    m_begin = window_query_begin(n0, qr.length, kr.length, window) / kTileRows * kTileRows;
    m_stop = window_query_end(last_key, qr.length, kr.length, window);
  }
  const int m_tiles = ceil_div(m_stop - m_begin, kTileRows);

  for (int g = 0; g < group; ++g) {
    const int head = head_kv * group + g;
    [[maybe_unused]] const A slope = alibi_slope<A>(params, batch, head);
    const T* q = q_rows<T>(params, batch, head, qr.start);
    const T* grad_out = grad_out_rows<T>(params, batch, head, qr.start);
    const int64_t row_base = lse_index(params, batch, head, qr.start);
    for (int tile = 0; tile < m_tiles; ++tile) {
      const int m0 = m_begin + tile * kTileRows;
      __syncthreads();
      load_tile<Traits>(sQ, q, params.q_row_stride, m0, qr.length, head_dim);
      load_tile<Traits>(sdO, grad_out, params.grad_out_row_stride, m0, qr.length, head_dim);
      if (threadIdx.x < kTileRows) {
        const int i = m0 + threadIdx.x;
        s_lse[threadIdx.x] = i < qr.length ? static_cast<const A*>(params.lse)[row_base + i] : A(0);
        s_delta[threadIdx.x] = i < qr.length ? delta[row_base + i] : A(0);
      }
      __syncthreads();
      const int m_end = min(kTileRows, qr.length - m0);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int t = n0 + warp * kRows + r;
        if (t >= kr.length) continue;  // warp-uniform
        int first = kIsCausal ? causal_query_begin(t, qr.length, kr.length) - m0 : 0;
        int stop = m_end;
        if constexpr (kVariants) {
          first = window_query_begin(t, qr.length, kr.length, window) - m0;
          stop = min(m_end, window_query_end(t, qr.length, kr.length, window) - m0);
        }
        for (int m = max(first, 0); m < stop; ++m) {
          const T* qrow = sQ + m * kHeadDim;
          const T* dorow = sdO + m * kHeadDim;
          const A s = dot_row<Traits>(k_reg[r], qrow, lane) * scale;
          const A dp = dot_row<Traits>(v_reg[r], dorow, lane);
          A p, ds;
          if constexpr (kVariants) {
            const PairGrads<A> pair =
                variant_pair_grads<A>(params, s, s_lse[m], dp, s_delta[m], slope, m0 + m, t, qr, kr,
                                      window, batch * params.heads_q + head);
            p = pair.kept_p;
            ds = pair.ds;
          } else {
            p = exp_acc(s - s_lse[m]);
            ds = p * (dp - s_delta[m]);
          }
#pragma unroll
          for (int e = 0; e < kPerLane; ++e) {
            dv[r][e] += p * to_acc(dorow[lane + 32 * e]);
            dk[r][e] += ds * to_acc(qrow[lane + 32 * e]);
          }
        }
      }
      if constexpr (kLongRows) {
        if (++tiles_summed == tiles_per_accumulator(kTileRows)) {
          fold_sums(total_dk, dk);
          fold_sums(total_dv, dv);
          tiles_summed = 0;
        }
      }
    }
  }
  if constexpr (kLongRows) {
    fold_sums(total_dk, dk);
    fold_sums(total_dv, dv);
    fold_sums(dk, total_dk);
    fold_sums(dv, total_dv);
  }

  T* grad_k = grad_k_rows<T>(params, batch, head_kv, kr.start);
  T* grad_v = grad_v_rows<T>(params, batch, head_kv, kr.start);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int t = n0 + warp * kRows + r;
    if (t >= kr.length) continue;
    store_row<Traits>(grad_k + static_cast<int64_t>(t) * params.grad_k_row_stride, dk[r], scale,
                      head_dim, lane);
    store_row<Traits>(grad_v + static_cast<int64_t>(t) * params.grad_v_row_stride, dv[r], A(1),
                      head_dim, lane);
  }
  write_tail();
}

// kLongRows: blocks may have more than kMaxKeysPerAccumulator keys (see fold_sums).
// kVariants: the call has a window, softcap, ALiBi or dropout.
template <typename Traits, typename T, bool kIsCausal, bool kLongRows, bool kVariants>
__global__ void __launch_bounds__(Traits::kThreads)
    dq_simple_kernel(const BackwardParams params, const Acc<T>* delta) {
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
    zero_grad_q_tail<T>(params, tail_begin(params, blockIdx.y, qr, params.seqlen_q), batch, head,
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
  const T* grad_out = grad_out_rows<T>(params, batch, head, qr.start);
  const T* k = k_rows<T>(params, batch, head_kv, kr.start);
  const T* v = v_rows<T>(params, batch, head_kv, kr.start);
  const int64_t row_base = lse_index(params, batch, head, qr.start);

  A q_reg[kRows][kPerLane];
  A do_reg[kRows][kPerLane];
  A dq[kRows][kPerLane];
  A lse[kRows];
  A row_delta[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = m0 + warp * kRows + r;
    if (i < qr.length) {
      load_row<Traits>(q_reg[r], q + static_cast<int64_t>(i) * params.q_row_stride, head_dim, lane);
      load_row<Traits>(do_reg[r], grad_out + static_cast<int64_t>(i) * params.grad_out_row_stride,
                       head_dim, lane);
      lse[r] = static_cast<const A*>(params.lse)[row_base + i];
      row_delta[r] = delta[row_base + i];
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dq[r][e] = 0;
  }

  [[maybe_unused]] A total_dq[kLongRows ? kRows : 1][kPerLane] = {};

  const A scale = static_cast<A>(params.scale);
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
      const int n_stop = min(kTileRows, key_end - n0);
      for (int n = max(key_begin - n0, 0); n < n_stop; ++n) {
        const T* krow = sK + n * kHeadDim;
        const A s = dot_row<Traits>(q_reg[r], krow, lane) * scale;
        const A dp = dot_row<Traits>(do_reg[r], sV + n * kHeadDim, lane);
        A ds;
        if constexpr (kVariants) {
          ds = variant_pair_grads<A>(params, s, lse[r], dp, row_delta[r], slope, i, n0 + n, qr, kr,
                                     window, blockIdx.z)
                   .ds;
        } else {
          ds = exp_acc(s - lse[r]) * (dp - row_delta[r]);
        }
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) dq[r][e] += ds * to_acc(krow[lane + 32 * e]);
      }
    }
    if constexpr (kLongRows) {
      if ((tile + 1) % tiles_per_accumulator(kTileRows) == 0) fold_sums(total_dq, dq);
    }
  }
  if constexpr (kLongRows) {
    fold_sums(total_dq, dq);
    fold_sums(dq, total_dq);
  }

  T* grad_q = grad_q_rows<T>(params, batch, head, qr.start);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = m0 + warp * kRows + r;
    if (i >= qr.length) continue;
    store_row<Traits>(grad_q + static_cast<int64_t>(i) * params.grad_q_row_stride, dq[r], scale,
                      head_dim, lane);
  }
  write_tail();
}

template <typename T, int kHeadDim, bool kIsCausal>
cudaError_t run_bwd_simple(const BackwardParams& params, void* delta_workspace,
                           cudaStream_t stream) {
  using Traits = SimpleTraits<T, kHeadDim>;
  auto* delta = static_cast<Acc<T>*>(delta_workspace);
  if (params.seqlen_q > 0 && params.batch * params.heads_q > 0) {
    const cudaError_t err = launch_kernel(
        delta_kernel<T>, dim3(ceil_div(params.seqlen_q, 4), params.batch * params.heads_q), 128, 0,
        stream, params, delta);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid_dkdv(tiles_with_tail(params.max_seqlen_k, params.seqlen_k, Traits::kRowsPerBlock),
                       params.num_blocks, params.batch * params.heads_kv);
  // float64 sums do not stall before 2^53 terms. dK and dV sum every query of the group's heads.
  constexpr bool kFloatSums = !std::is_same_v<Acc<T>, double>;
  const bool long_queries = kFloatSums && long_query_rows(params);
  const bool variants = has_variants(params);
  if (grid_dkdv.x > 0 && grid_dkdv.y > 0 && grid_dkdv.z > 0) {
    const cudaError_t err = BOOL_SWITCH(long_queries, kLongRows, [&] {
      return BOOL_SWITCH(variants, kVariants, [&] {
        return launch_kernel(dkdv_simple_kernel<Traits, T, kIsCausal, kLongRows, kVariants>,
                             grid_dkdv, Traits::kThreads, Traits::kKeySharedBytes, stream, params,
                             delta);
      });
    });
    if (err != cudaSuccess) return err;
  }
  const dim3 grid_dq(tiles_with_tail(params.max_seqlen_q, params.seqlen_q, Traits::kRowsPerBlock),
                     params.num_blocks, params.batch * params.heads_q);
  const bool long_keys = kFloatSums && params.max_seqlen_k > kMaxKeysPerAccumulator;
  if (grid_dq.x > 0 && grid_dq.y > 0 && grid_dq.z > 0) {
    const cudaError_t err = BOOL_SWITCH(long_keys, kLongRows, [&] {
      return BOOL_SWITCH(variants, kVariants, [&] {
        return launch_kernel(dq_simple_kernel<Traits, T, kIsCausal, kLongRows, kVariants>, grid_dq,
                             Traits::kThreads, Traits::kSharedBytes, stream, params, delta);
      });
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace block_attn::cuda
