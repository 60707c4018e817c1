// CPU backward (FlashAttention-2 style): probabilities are recomputed from the saved lse, never
// stored. Three parallel passes, none with atomics, so gradients are bitwise reproducible:
//   1. delta = rowsum(dO * O) - grad_lse for every query row;
//   2. dK, dV per (batch, kv head, block, key tile), looping over the group's query heads and
//      the query tiles that see the key tile;
//   3. dQ per (batch, query head, block, query tile), looping over the key tiles it sees.
// Pass 3 recomputes S and dP once more, the price of parallelising beyond batch x heads without
// atomics.
#include <algorithm>
#include <limits>
#include <vector>

#include "attention_cpu.h"
#include "softmax_tile.h"
#include "tile_ops.h"
#include "tile_schedule.h"
#include "tile_shape.h"
#include "vector_isa.h"  // must precede ATen headers

namespace block_attn::cpu {
namespace {

template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> q, grad_out, k, v, probs, grad_probs, grad_a, grad_b;
  BackwardScratch(int block_m, int block_n, int head_dim)
      : q(block_m * head_dim),
        grad_out(block_m * head_dim),
        k(block_n * head_dim),
        v(block_n * head_dim),
        probs(block_m * block_n),
        grad_probs(block_m * block_n),
        grad_a(std::max(block_m, block_n) * head_dim),
        grad_b(block_n * head_dim) {}
};

template <typename scalar_t>
const scalar_t* row_ptr(const void* base, int64_t batch_stride, int64_t head_stride,
                        int64_t row_stride, int64_t b, int64_t h, int64_t row) {
  return static_cast<const scalar_t*>(base) + b * batch_stride + h * head_stride + row * row_stride;
}

template <typename scalar_t>
scalar_t* row_ptr(void* base, int64_t batch_stride, int64_t head_stride, int64_t row_stride,
                  int64_t b, int64_t h, int64_t row) {
  return static_cast<scalar_t*>(base) + b * batch_stride + h * head_stride + row * row_stride;
}

// Block j's extent in queries and keys, and the causal diagonal offset.
struct BlockExtent {
  int64_t q_begin, len_q, k_begin, len_k, diagonal;
};

inline BlockExtent block_extent(const ForwardParams& p, int32_t block) {
  BlockExtent e;
  e.q_begin = p.cu_seqlens_q[block];
  e.len_q = p.cu_seqlens_q[block + 1] - e.q_begin;
  e.k_begin = p.cu_seqlens_k[block];
  e.len_k = p.cu_seqlens_k[block + 1] - e.k_begin;
  e.diagonal = e.len_k - e.len_q;  // local query i sees local keys t <= i + diagonal
  return e;
}

// Probabilities P and softmax gradient dS for one (query tile, key tile) pair, left in
// s.probs and s.grad_probs (rows x cols, ld cols).
template <typename acc_t>
void probs_and_grad(const BackwardParams& p, const BlockExtent& e, int64_t row0, int64_t rows,
                    int64_t key0, int64_t cols, const TileView<acc_t>& q_tile,
                    const TileView<acc_t>& grad_out_tile, const TileView<acc_t>& k_tile,
                    const TileView<acc_t>& v_tile, const float* lse, const acc_t* delta,
                    BackwardScratch<acc_t>& s) {
  const int64_t d = p.head_dim;
  acc_t* probs = s.probs.data();
  acc_t* grad_probs = s.grad_probs.data();
  gemm_row_major<acc_t>(false, true, rows, cols, d, static_cast<acc_t>(p.scale), q_tile.data,
                        q_tile.ld, k_tile.data, k_tile.ld, acc_t(0), probs, cols);
  if (p.is_causal && key0 + cols - 1 > row0 + e.diagonal) {
    mask_causal(probs, rows, cols, cols, row0 + e.diagonal - key0);
  }
  for (int64_t r = 0; r < rows; ++r) probs_from_lse(probs + r * cols, cols, lse[r]);
  // dP (rows x cols) = dO V^T
  gemm_row_major<acc_t>(false, true, rows, cols, d, acc_t(1), grad_out_tile.data, grad_out_tile.ld,
                        v_tile.data, v_tile.ld, acc_t(0), grad_probs, cols);
  for (int64_t r = 0; r < rows; ++r) {
    softmax_grad_row(probs + r * cols, grad_probs + r * cols, cols, delta[r]);
  }
}

// Pass 1: delta[b, h, i] = sum_d dO * O - grad_lse, in acc_t.
template <typename scalar_t, typename acc_t>
void compute_delta(const BackwardParams& p, acc_t* delta) {
  const int64_t rows_per_head = p.seqlen_q;
  at::parallel_for(0, int64_t(p.batch) * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o_row(p.head_dim), grad_out_row(p.head_dim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      for (int64_t i = 0; i < rows_per_head; ++i) {
        convert_row(row_ptr<scalar_t>(p.out, p.out_batch_stride, p.out_head_stride,
                                      p.out_row_stride, b, h, i),
                    o_row.data(), p.head_dim);
        convert_row(row_ptr<scalar_t>(p.grad_out, p.grad_out_batch_stride, p.grad_out_head_stride,
                                      p.grad_out_row_stride, b, h, i),
                    grad_out_row.data(), p.head_dim);
        acc_t dot = 0;
        for (int64_t c = 0; c < p.head_dim; ++c) dot += o_row[c] * grad_out_row[c];
        const int64_t index = bh * rows_per_head + i;
        delta[index] = dot - (p.grad_lse ? static_cast<acc_t>(p.grad_lse[index]) : acc_t(0));
      }
    }
  });
}

// Pass 2: dK and dV for one key tile of one block, summed over the kv head's query heads.
template <typename scalar_t, typename acc_t>
void grad_kv_tile(const BackwardParams& p, const TileShape& shape, int64_t b, int64_t kv_head,
                  const BlockTile& tile, const acc_t* delta, BackwardScratch<acc_t>& s) {
  const int64_t d = p.head_dim;
  const BlockExtent e = block_extent(p, tile.block);
  const int64_t key0 = tile.start, cols = tile.rows;
  const int64_t group = p.heads_q / p.heads_kv;
  acc_t* grad_k = s.grad_a.data();
  acc_t* grad_v = s.grad_b.data();
  std::fill_n(grad_k, cols * d, acc_t(0));
  std::fill_n(grad_v, cols * d, acc_t(0));

  const TileView<acc_t> k_tile =
      load_tile(row_ptr<scalar_t>(p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride, b,
                                  kv_head, e.k_begin + key0),
                p.k_row_stride, cols, d, s.k.data());
  const TileView<acc_t> v_tile =
      load_tile(row_ptr<scalar_t>(p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride, b,
                                  kv_head, e.k_begin + key0),
                p.v_row_stride, cols, d, s.v.data());
  // Under the causal mask only queries i >= key0 - diagonal see this tile.
  const int64_t first_row = p.is_causal ? std::max<int64_t>(0, key0 - e.diagonal) : 0;
  const int64_t first_tile_row = first_row / shape.block_m * shape.block_m;
  for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
    for (int64_t row0 = first_tile_row; row0 < e.len_q; row0 += shape.block_m) {
      const int64_t rows = std::min<int64_t>(shape.block_m, e.len_q - row0);
      const int64_t row = e.q_begin + row0;
      const TileView<acc_t> q_tile = load_tile(
          row_ptr<scalar_t>(p.q, p.q_batch_stride, p.q_head_stride, p.q_row_stride, b, h, row),
          p.q_row_stride, rows, d, s.q.data());
      const TileView<acc_t> grad_out_tile =
          load_tile(row_ptr<scalar_t>(p.grad_out, p.grad_out_batch_stride, p.grad_out_head_stride,
                                      p.grad_out_row_stride, b, h, row),
                    p.grad_out_row_stride, rows, d, s.grad_out.data());
      const int64_t stats = (b * p.heads_q + h) * p.seqlen_q + row;
      probs_and_grad(p, e, row0, rows, key0, cols, q_tile, grad_out_tile, k_tile, v_tile,
                     p.lse + stats, delta + stats, s);
      // dV (cols x d) += P^T dO;  dK (cols x d) += scale * dS^T Q
      gemm_row_major<acc_t>(true, false, cols, d, rows, acc_t(1), s.probs.data(), cols,
                            grad_out_tile.data, grad_out_tile.ld, acc_t(1), grad_v, d);
      gemm_row_major<acc_t>(true, false, cols, d, rows, static_cast<acc_t>(p.scale),
                            s.grad_probs.data(), cols, q_tile.data, q_tile.ld, acc_t(1), grad_k, d);
    }
  }
  scalar_t* grad_k_out = row_ptr<scalar_t>(p.grad_k, p.grad_k_batch_stride, p.grad_k_head_stride,
                                           p.grad_k_row_stride, b, kv_head, e.k_begin + key0);
  scalar_t* grad_v_out = row_ptr<scalar_t>(p.grad_v, p.grad_v_batch_stride, p.grad_v_head_stride,
                                           p.grad_v_row_stride, b, kv_head, e.k_begin + key0);
  for (int64_t c = 0; c < cols; ++c) {
    store_row(grad_k + c * d, acc_t(1), grad_k_out + c * p.grad_k_row_stride, d);
    store_row(grad_v + c * d, acc_t(1), grad_v_out + c * p.grad_v_row_stride, d);
  }
}

// Pass 3: dQ for one query tile of one block.
template <typename scalar_t, typename acc_t>
void grad_q_tile(const BackwardParams& p, const TileShape& shape, int64_t b, int64_t h,
                 const BlockTile& tile, const acc_t* delta, BackwardScratch<acc_t>& s) {
  const int64_t d = p.head_dim;
  const BlockExtent e = block_extent(p, tile.block);
  const int64_t row0 = tile.start, rows = tile.rows;
  const int64_t row = e.q_begin + row0;
  const int64_t kv_head = h / (p.heads_q / p.heads_kv);
  const int64_t key_end =
      p.is_causal ? std::min<int64_t>(e.len_k, row0 + rows - 1 + e.diagonal + 1) : e.len_k;
  acc_t* grad_q = s.grad_a.data();
  std::fill_n(grad_q, rows * d, acc_t(0));

  const TileView<acc_t> q_tile = load_tile(
      row_ptr<scalar_t>(p.q, p.q_batch_stride, p.q_head_stride, p.q_row_stride, b, h, row),
      p.q_row_stride, rows, d, s.q.data());
  const TileView<acc_t> grad_out_tile =
      load_tile(row_ptr<scalar_t>(p.grad_out, p.grad_out_batch_stride, p.grad_out_head_stride,
                                  p.grad_out_row_stride, b, h, row),
                p.grad_out_row_stride, rows, d, s.grad_out.data());
  const int64_t stats = (b * p.heads_q + h) * p.seqlen_q + row;
  for (int64_t key0 = 0; key0 < key_end; key0 += shape.block_n) {
    const int64_t cols = std::min<int64_t>(shape.block_n, key_end - key0);
    const TileView<acc_t> k_tile =
        load_tile(row_ptr<scalar_t>(p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride, b,
                                    kv_head, e.k_begin + key0),
                  p.k_row_stride, cols, d, s.k.data());
    const TileView<acc_t> v_tile =
        load_tile(row_ptr<scalar_t>(p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride, b,
                                    kv_head, e.k_begin + key0),
                  p.v_row_stride, cols, d, s.v.data());
    probs_and_grad(p, e, row0, rows, key0, cols, q_tile, grad_out_tile, k_tile, v_tile,
                   p.lse + stats, delta + stats, s);
    // dQ (rows x d) += scale * dS K
    gemm_row_major<acc_t>(false, false, rows, d, cols, static_cast<acc_t>(p.scale),
                          s.grad_probs.data(), cols, k_tile.data, k_tile.ld, acc_t(1), grad_q, d);
  }
  scalar_t* grad_q_out = row_ptr<scalar_t>(p.grad_q, p.grad_q_batch_stride, p.grad_q_head_stride,
                                           p.grad_q_row_stride, b, h, row);
  for (int64_t r = 0; r < rows; ++r) {
    store_row(grad_q + r * d, acc_t(1), grad_q_out + r * p.grad_q_row_stride, d);
  }
}

// Gradient rows of tokens outside every block (before the first offset or after the last).
template <typename scalar_t>
void zero_uncovered_rows(void* base, int64_t batch_stride, int64_t head_stride, int64_t row_stride,
                         int64_t batch, int64_t heads, int64_t head_dim, int64_t covered_begin,
                         int64_t covered_end, int64_t seqlen) {
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      zero_rows(row_ptr<scalar_t>(base, batch_stride, head_stride, row_stride, b, h, 0), row_stride,
                covered_begin, head_dim);
      zero_rows(row_ptr<scalar_t>(base, batch_stride, head_stride, row_stride, b, h, covered_end),
                row_stride, seqlen - covered_end, head_dim);
    }
  }
}

}  // namespace

template <typename scalar_t>
void run_backward(const BackwardParams& p) {
  using acc_t = acc_type<scalar_t>;
  const TileShape shape = backward_tile_shape(p.head_dim);
  const int64_t q_covered_begin = p.cu_seqlens_q[0], q_covered_end = p.cu_seqlens_q[p.num_blocks];
  const int64_t k_covered_begin = p.cu_seqlens_k[0], k_covered_end = p.cu_seqlens_k[p.num_blocks];
  zero_uncovered_rows<scalar_t>(p.grad_q, p.grad_q_batch_stride, p.grad_q_head_stride,
                                p.grad_q_row_stride, p.batch, p.heads_q, p.head_dim,
                                q_covered_begin, q_covered_end, p.seqlen_q);
  zero_uncovered_rows<scalar_t>(p.grad_k, p.grad_k_batch_stride, p.grad_k_head_stride,
                                p.grad_k_row_stride, p.batch, p.heads_kv, p.head_dim,
                                k_covered_begin, k_covered_end, p.seqlen_k);
  zero_uncovered_rows<scalar_t>(p.grad_v, p.grad_v_batch_stride, p.grad_v_head_stride,
                                p.grad_v_row_stride, p.batch, p.heads_kv, p.head_dim,
                                k_covered_begin, k_covered_end, p.seqlen_k);

  // O(B * H * N) row statistics, not a score matrix.
  std::vector<acc_t> delta(int64_t(p.batch) * p.heads_q * p.seqlen_q);
  compute_delta<scalar_t>(p, delta.data());

  auto make_scratch = [&] {
    return BackwardScratch<acc_t>(shape.block_m, shape.block_n, p.head_dim);
  };
  const std::vector<BlockTile> key_tiles =
      tiles_of_blocks(p.cu_seqlens_k, p.num_blocks, shape.block_n, /*last_first=*/false);
  const int64_t num_key_tiles = static_cast<int64_t>(key_tiles.size());
  parallel_for_items(num_key_tiles * p.batch * p.heads_kv, make_scratch,
                     [&](BackwardScratch<acc_t>& scratch, int64_t item) {
                       const int64_t batch_head = item / num_key_tiles;
                       grad_kv_tile<scalar_t, acc_t>(
                           p, shape, batch_head / p.heads_kv, batch_head % p.heads_kv,
                           key_tiles[item % num_key_tiles], delta.data(), scratch);
                     });

  const std::vector<BlockTile> query_tiles =
      tiles_of_blocks(p.cu_seqlens_q, p.num_blocks, shape.block_m, /*last_first=*/true);
  const int64_t num_query_tiles = static_cast<int64_t>(query_tiles.size());
  parallel_for_items(num_query_tiles * p.batch * p.heads_q, make_scratch,
                     [&](BackwardScratch<acc_t>& scratch, int64_t item) {
                       const int64_t batch_head = item / num_query_tiles;
                       grad_q_tile<scalar_t, acc_t>(
                           p, shape, batch_head / p.heads_q, batch_head % p.heads_q,
                           query_tiles[item % num_query_tiles], delta.data(), scratch);
                     });
}

template void run_backward<float>(const BackwardParams&);
template void run_backward<double>(const BackwardParams&);
template void run_backward<c10::BFloat16>(const BackwardParams&);
template void run_backward<c10::Half>(const BackwardParams&);

}  // namespace block_attn::cpu
