// Small device helpers shared by the kernels: element/accumulator conversions, warp reductions,
// per-block offsets and the causal bound.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../key_window.h"

namespace block_attn::cuda {

// float16/bfloat16/float32 accumulate in float, float64 in double.
template <typename T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccumulatorOf<T>::type;

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_acc(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
__device__ __forceinline__ float to_acc(float x) {
  return x;
}
__device__ __forceinline__ double to_acc(double x) {
  return x;
}

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> x);
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}

__device__ __forceinline__ float exp_acc(float x) {
  return expf(x);
}
__device__ __forceinline__ double exp_acc(double x) {
  return exp(x);
}
__device__ __forceinline__ float log_acc(float x) {
  return logf(x);
}
__device__ __forceinline__ double log_acc(double x) {
  return log(x);
}

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// Butterfly reductions: every lane ends with the result, in the same order on every run.
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Start and length of block `block` in a cu_seqlens array (read on the device: no host sync).
// The offsets are not checked on the host (that would wait for the GPU), so they are clamped
// here to [0, seqlen] in order: offsets that break the op's contract give wrong rows, never reads
// or writes outside the tensors.
struct BlockRange {
  int start;
  int length;
};
__device__ __forceinline__ BlockRange block_range(const int32_t* cu_seqlens, int block,
                                                  int seqlen) {
  const int start = min(max(cu_seqlens[block], 0), seqlen);
  const int end = min(max(cu_seqlens[block + 1], start), seqlen);
  return {start, end - start};
}

// The causal bounds below are computed in int64: with lengths up to INT32_MAX, i + 1 + len_k -
// len_q and t - len_k + len_q overflow int.
// Causal, bottom-right aligned: local query i attends local key t iff t <= i + (len_k - len_q).
// Number of keys, from the start, that query i may see (clamped to [0, len_k]).
__host__ __device__ __forceinline__ int causal_key_end(int i, int len_q, int len_k) {
  return clamp_to_length(static_cast<int64_t>(i) + 1 + len_k - len_q, len_k);
}
// First query that may see key t (clamped to [0, len_q]).
__host__ __device__ __forceinline__ int causal_query_begin(int t, int len_q, int len_k) {
  return clamp_to_length(static_cast<int64_t>(t) - len_k + len_q, len_q);
}

// Last row of the tile [m0, m0 + rows) that lies in a block of `length` rows (m0 < length);
// m0 + rows itself may pass INT32_MAX.
__host__ __device__ __forceinline__ int tile_last_row(int m0, int rows, int length) {
  return m0 >= length - rows ? length - 1 : m0 + rows - 1;
}

// Keys that some query of rows [m0, m0 + rows) of a block may see: the keys a tile of queries
// visits.
template <bool kIsCausal>
__device__ __forceinline__ int tile_key_end(int m0, int rows, BlockRange qr, BlockRange kr) {
  return kIsCausal ? causal_key_end(tile_last_row(m0, rows, qr.length), qr.length, kr.length)
                   : kr.length;
}

// Without a + b - 1, which overflows for a near INT32_MAX; 0 for a <= 0.
__host__ __device__ constexpr int ceil_div(int a, int b) {
  return a > 0 ? (a - 1) / b + 1 : 0;
}

// The key tiles (of `tile` keys) that query rows [first, last] of a block visit: some row sees
// keys of tiles [begin, end) (key_end: the last such key + 1), every row sees all keys of tiles
// [unmasked_begin, unmasked_end), which need no mask. kVariants: by the window (key_window.h),
// else by the causal mask or none.
struct KeyTiles {
  int begin;
  int end;
  int unmasked_begin;
  int unmasked_end;
  int key_end;
};
template <bool kIsCausal, bool kVariants>
__device__ __forceinline__ KeyTiles key_tiles_of_rows(const KeyWindow& window, int first, int last,
                                                      BlockRange qr, BlockRange kr, int tile) {
  int key_begin = 0, all_begin = 0;
  int key_end = kIsCausal ? causal_key_end(last, qr.length, kr.length) : kr.length;
  int all_end = kIsCausal ? causal_key_end(first, qr.length, kr.length) : kr.length;
  if constexpr (kVariants) {
    key_begin = window_key_begin(first, qr.length, kr.length, window);
    key_end = window_key_end(last, qr.length, kr.length, window);
    all_begin = window_key_begin(last, qr.length, kr.length, window);
    all_end = window_key_end(first, qr.length, kr.length, window);
  }
  KeyTiles t;
  t.begin = key_begin / tile;
  t.end = max(ceil_div(key_end, tile), t.begin);
  t.unmasked_begin = min(max(ceil_div(all_begin, tile), t.begin), t.end);
  t.unmasked_end = max(min(all_end / tile, t.end), t.unmasked_begin);
  t.key_end = key_end;
  return t;
}

// The query rows [begin, end) of a block that see some key of the tile of `keys` keys from n0
// (n0 < kr.length); begin is a multiple of query_tile, so that no row index of a tile passes
// INT32_MAX.
struct QueryRows {
  int begin;
  int end;
};
template <bool kIsCausal, bool kVariants>
__device__ __forceinline__ QueryRows query_rows_of_keys(const KeyWindow& window, int n0, int keys,
                                                        BlockRange qr, BlockRange kr,
                                                        int query_tile) {
  if constexpr (kVariants) {
    const int last_key = tile_last_row(n0, keys, kr.length);
    return {window_query_begin(n0, qr.length, kr.length, window) / query_tile * query_tile,
            window_query_end(last_key, qr.length, kr.length, window)};
  }
  const int begin = kIsCausal ? causal_query_begin(n0, qr.length, kr.length) : 0;
  return {begin / query_tile * query_tile, qr.length};
}

// Whether the tile of query rows [m0, m0 + rows) against keys [n0, n0 + keys) holds a pair to
// mask: a query past the block, or (kVariants) a key past it or outside some query's window, or
// (causal) a key past the diagonal.
template <bool kIsCausal, bool kVariants>
__device__ __forceinline__ bool tile_pair_needs_mask(const KeyWindow& window, int m0, int rows,
                                                     int n0, int keys, BlockRange qr,
                                                     BlockRange kr) {
  if (m0 > qr.length - rows) return true;
  if constexpr (kVariants) {
    return n0 > kr.length - keys ||
           window_query_begin(n0 + keys - 1, qr.length, kr.length, window) > m0 ||
           window_query_end(n0, qr.length, kr.length, window) - rows < m0;
  }
  return kIsCausal && n0 > causal_key_end(m0, qr.length, kr.length) - keys;
}

// Most keys (or queries) one float accumulator sums. Past 2^24 terms of similar size a float sum
// stalls (x + 1 == x), so kernels whose rows may be longer (known on the host from max_seqlen)
// sum chunks of at most this many terms and fold each into a second accumulator. The emulator
// test sets it small to run that path on small problems.
#ifndef BLOCK_ATTN_MAX_KEYS_PER_ACCUMULATOR
#define BLOCK_ATTN_MAX_KEYS_PER_ACCUMULATOR (1 << 22)
#endif
constexpr int kMaxKeysPerAccumulator = BLOCK_ATTN_MAX_KEYS_PER_ACCUMULATOR;

// Tiles of `tile` rows that one accumulator sums before a fold (at least one).
__host__ __device__ constexpr int tiles_per_accumulator(int tile) {
  return kMaxKeysPerAccumulator / tile > 0 ? kMaxKeysPerAccumulator / tile : 1;
}

// Whether the dK/dV kernels, which sum over every query of the heads that share a kv head, may
// sum more than kMaxKeysPerAccumulator terms.
template <typename Params>
inline bool long_query_rows(const Params& params) {
  const int64_t group = params.heads_kv > 0 ? params.heads_q / params.heads_kv : 1;
  return group * params.max_seqlen_q > kMaxKeysPerAccumulator;
}

// Largest power of two <= x (x >= 1).
__host__ __device__ constexpr int floor_pow2(int x) {
  return x >= 2 ? 2 * floor_pow2(x / 2) : 1;
}

}  // namespace block_attn::cuda
