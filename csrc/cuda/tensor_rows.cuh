// Where a (batch, head)'s rows start in the tensors of ForwardParams / BackwardParams: the
// element of row `row`, column 0, from the tensor's base pointer and element strides. Also the
// offset of that row in the contiguous (batch, heads_q, seqlen_q) lse and delta arrays, and the
// rows and heads a query-tile CTA works on.
#pragma once

#include <cstdint>

#include "../attention_params.h"
#include "utils.cuh"

namespace block_attn::cuda {

// A CTA's tile, block and batch-head index in a grid (tiles, blocks, batch * heads). CTAs start
// in linear order (x fastest); decoded block by block, tile by tile, head fastest, every head of a
// block starts its costliest tile (tile 0) first, so the long blocks of the last heads do not
// start last and leave a tail, while the CTAs that share a block's K and V still run close
// together (for L2).
struct GridTile {
  int tile;
  int block;
  int batch_head;
};

__device__ __forceinline__ GridTile grid_tile() {
  const uint64_t linear =
      blockIdx.x + static_cast<uint64_t>(gridDim.x) * (blockIdx.y + gridDim.y * blockIdx.z);
  const uint64_t block_tile = linear / gridDim.z;
  return {static_cast<int>(block_tile % gridDim.x), static_cast<int>(block_tile / gridDim.x),
          static_cast<int>(linear % gridDim.z)};
}

// A CTA of a kernel over query tiles, grid (query tiles of the longest block, blocks,
// batch * heads_q): its block's query and key ranges, its first query m0 and its heads. Tile 0 is
// the block's last, the costliest under a causal mask. m0 >= qr.length: the tile lies past its
// block and the CTA has nothing to do.
struct QueryTile {
  BlockRange qr;
  BlockRange kr;
  int m0;
  int batch;
  int head;
  int head_kv;
  int block;
  int tile;  // the CTA's index among the gridDim.x CTAs of its block and head
};

__device__ __forceinline__ QueryTile query_tile(const ForwardParams& p, int block_m) {
  const GridTile g = grid_tile();
  QueryTile t;
  t.qr = block_range(p.cu_seqlens_q, g.block, p.seqlen_q);
  t.kr = block_range(p.cu_seqlens_k, g.block, p.seqlen_k);
  t.m0 = (gridDim.x - 1 - g.tile) * block_m;
  t.batch = g.batch_head / p.heads_q;
  t.head = g.batch_head % p.heads_q;
  t.head_kv = t.head / (p.heads_q / p.heads_kv);
  t.block = g.block;
  t.tile = g.tile;
  return t;
}

// A CTA of a kernel over key tiles, grid (key tiles of the longest block, blocks,
// batch * heads_kv): its block's ranges, its first key n0 (tile 0 first, the costliest under a
// causal mask) and its heads. n0 >= kr.length: nothing to do.
struct KeyTile {
  BlockRange qr;
  BlockRange kr;
  int n0;
  int batch;
  int head_kv;
  int block;
  int tile;  // the CTA's index among the gridDim.x CTAs of its block and head
};

__device__ __forceinline__ KeyTile key_tile(const ForwardParams& p, int block_n) {
  const GridTile g = grid_tile();
  KeyTile t;
  t.qr = block_range(p.cu_seqlens_q, g.block, p.seqlen_q);
  t.kr = block_range(p.cu_seqlens_k, g.block, p.seqlen_k);
  t.n0 = g.tile * block_n;
  t.batch = g.batch_head / p.heads_kv;
  t.head_kv = g.batch_head % p.heads_kv;
  t.block = g.block;
  t.tile = g.tile;
  return t;
}

__device__ __forceinline__ int64_t strided_row(int64_t batch_stride, int64_t head_stride,
                                               int64_t row_stride, int batch, int head, int row) {
  return batch * batch_stride + head * head_stride + static_cast<int64_t>(row) * row_stride;
}

template <typename T>
__device__ __forceinline__ const T* q_rows(const ForwardParams& p, int batch, int head, int row) {
  return static_cast<const T*>(p.q) +
         strided_row(p.q_batch_stride, p.q_head_stride, p.q_row_stride, batch, head, row);
}
template <typename T>
__device__ __forceinline__ const T* k_rows(const ForwardParams& p, int batch, int head, int row) {
  return static_cast<const T*>(p.k) +
         strided_row(p.k_batch_stride, p.k_head_stride, p.k_row_stride, batch, head, row);
}
template <typename T>
__device__ __forceinline__ const T* v_rows(const ForwardParams& p, int batch, int head, int row) {
  return static_cast<const T*>(p.v) +
         strided_row(p.v_batch_stride, p.v_head_stride, p.v_row_stride, batch, head, row);
}
template <typename T>
__device__ __forceinline__ T* out_rows(const ForwardParams& p, int batch, int head, int row) {
  return static_cast<T*>(p.out) +
         strided_row(p.out_batch_stride, p.out_head_stride, p.out_row_stride, batch, head, row);
}
template <typename T>
__device__ __forceinline__ const T* grad_out_rows(const BackwardParams& p, int batch, int head,
                                                  int row) {
  return static_cast<const T*>(p.grad_out) + strided_row(p.grad_out_batch_stride,
                                                         p.grad_out_head_stride,
                                                         p.grad_out_row_stride, batch, head, row);
}
template <typename T>
__device__ __forceinline__ T* grad_q_rows(const BackwardParams& p, int batch, int head, int row) {
  return static_cast<T*>(p.grad_q) + strided_row(p.grad_q_batch_stride, p.grad_q_head_stride,
                                                 p.grad_q_row_stride, batch, head, row);
}
template <typename T>
__device__ __forceinline__ T* grad_k_rows(const BackwardParams& p, int batch, int head, int row) {
  return static_cast<T*>(p.grad_k) + strided_row(p.grad_k_batch_stride, p.grad_k_head_stride,
                                                 p.grad_k_row_stride, batch, head, row);
}
template <typename T>
__device__ __forceinline__ T* grad_v_rows(const BackwardParams& p, int batch, int head, int row) {
  return static_cast<T*>(p.grad_v) + strided_row(p.grad_v_batch_stride, p.grad_v_head_stride,
                                                 p.grad_v_row_stride, batch, head, row);
}

// Index of query row `row` of (batch, head) in the (batch, heads_q, seqlen_q) lse / delta arrays.
__device__ __forceinline__ int64_t lse_index(const ForwardParams& p, int batch, int head, int row) {
  return (static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q + row;
}

// Rows after the last block's end lie in no block: query rows there get out = 0 and lse = -inf
// (and grad_q = 0), key rows grad_k = grad_v = 0. The host never reads the offsets, so the CTAs
// of the last block write those rows for their (batch, head), spread over the `ctas` CTAs of the
// block (this one is `cta`); where the blocks end at seqlen there is nothing to do.

// The first row after the last block, from the range of this CTA's block; `seqlen` (no rows)
// where the block is not the last.
__device__ __forceinline__ int tail_begin(const ForwardParams& p, int block, BlockRange range,
                                          int seqlen) {
  return block == p.num_blocks - 1 ? range.start + range.length : seqlen;
}

// Zeroes columns [0, head_dim) of rows [begin, end) of `rows`: rows begin + cta, + ctas, ... in
// this CTA.
template <typename T>
__device__ __forceinline__ void zero_tail_rows(T* rows, int64_t row_stride, int begin, int end,
                                               int head_dim, int cta, int ctas) {
  for (int64_t row = static_cast<int64_t>(begin) + cta; row < end; row += ctas) {
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
      rows[row * row_stride + d] = from_acc<T>(Acc<T>(0));
    }
  }
}

// out = 0 and lse = -inf on query rows [begin, seqlen_q) of query heads [head, head + heads).
template <typename T>
__device__ __forceinline__ void write_query_tail(const ForwardParams& p, int begin, int batch,
                                                 int head, int heads, int cta, int ctas) {
  if (begin >= p.seqlen_q) return;
  const int64_t step = static_cast<int64_t>(ctas) * blockDim.x;
  for (int h = head; h < head + heads; ++h) {
    zero_tail_rows(out_rows<T>(p, batch, h, 0), p.out_row_stride, begin, p.seqlen_q, p.head_dim,
                   cta, ctas);
    Acc<T>* lse = static_cast<Acc<T>*>(p.lse) + lse_index(p, batch, h, 0);
    for (int64_t i = begin + static_cast<int64_t>(cta) * blockDim.x + threadIdx.x; i < p.seqlen_q;
         i += step) {
      lse[i] = neg_inf<Acc<T>>();
    }
  }
}

// grad_q = 0 on query rows [begin, seqlen_q) of `head`.
template <typename T>
__device__ __forceinline__ void zero_grad_q_tail(const BackwardParams& p, int begin, int batch,
                                                 int head, int cta, int ctas) {
  if (begin >= p.seqlen_q) return;
  zero_tail_rows(grad_q_rows<T>(p, batch, head, 0), p.grad_q_row_stride, begin, p.seqlen_q,
                 p.head_dim, cta, ctas);
}

// grad_k = grad_v = 0 on key rows [begin, seqlen_k) of kv head `head_kv`.
template <typename T>
__device__ __forceinline__ void zero_grad_kv_tail(const BackwardParams& p, int begin, int batch,
                                                  int head_kv, int cta, int ctas) {
  if (begin >= p.seqlen_k) return;
  zero_tail_rows(grad_k_rows<T>(p, batch, head_kv, 0), p.grad_k_row_stride, begin, p.seqlen_k,
                 p.head_dim, cta, ctas);
  zero_tail_rows(grad_v_rows<T>(p, batch, head_kv, 0), p.grad_v_row_stride, begin, p.seqlen_k,
                 p.head_dim, cta, ctas);
}

// CTAs over the query or key tiles of the longest block: at least one while the tensors have
// rows, so that the last block's CTAs write the rows after it even where every block is empty.
__host__ __device__ constexpr int tiles_with_tail(int max_seqlen, int seqlen, int tile_rows) {
  return seqlen <= 0 ? 0 : max_seqlen > 0 ? ceil_div(max_seqlen, tile_rows) : 1;
}

}  // namespace block_attn::cuda
