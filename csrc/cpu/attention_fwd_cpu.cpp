// CPU forward: one work item per (batch, query head, block, query tile); each streams the key
// tiles its block allows through an online softmax (FlashAttention-2), so memory stays at one
// tile per thread and work grows with the blocks' squared lengths.
#include <algorithm>
#include <cmath>
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
struct ForwardScratch {
  std::vector<acc_t> q, k, v, scores, out;
  std::vector<acc_t> running_max, running_sum;
  ForwardScratch(int block_m, int block_n, int head_dim)
      : q(block_m * head_dim),
        k(block_n * head_dim),
        v(block_n * head_dim),
        scores(block_m * block_n),
        out(block_m * head_dim),
        running_max(block_m),
        running_sum(block_m) {}
};

// Rows no block covers (outside [cu_seqlens_q[0], cu_seqlens_q[num_blocks]))) see no key.
template <typename scalar_t>
void write_empty_rows(const ForwardParams& p, int64_t row_begin, int64_t row_end) {
  if (row_begin >= row_end) return;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.out_batch_stride +
                      h * p.out_head_stride + row_begin * p.out_row_stride;
      zero_rows(out, p.out_row_stride, row_end - row_begin, p.head_dim);
      float* lse = p.lse + (b * p.heads_q + h) * p.seqlen_q;
      std::fill(lse + row_begin, lse + row_end, -std::numeric_limits<float>::infinity());
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_tile(const ForwardParams& p, const TileShape& shape, int64_t b, int64_t h,
                  const BlockTile& tile, ForwardScratch<acc_t>& s) {
  const int64_t d = p.head_dim;
  const int64_t kv_head = h / (p.heads_q / p.heads_kv);
  const int64_t q_begin = p.cu_seqlens_q[tile.block];
  const int64_t k_begin = p.cu_seqlens_k[tile.block];
  const int64_t len_q = p.cu_seqlens_q[tile.block + 1] - q_begin;
  const int64_t len_k = p.cu_seqlens_k[tile.block + 1] - k_begin;
  const int64_t rows = tile.rows;
  const int64_t row0 = tile.start;
  // Bottom-right causal alignment: local query i sees local keys t <= i + diagonal.
  const int64_t diagonal = len_k - len_q;
  const int64_t key_end =
      p.is_causal ? std::min<int64_t>(len_k, row0 + rows - 1 + diagonal + 1) : len_k;

  const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride +
                      h * p.q_head_stride + (q_begin + row0) * p.q_row_stride;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride +
                      kv_head * p.k_head_stride + k_begin * p.k_row_stride;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride +
                      kv_head * p.v_head_stride + k_begin * p.v_row_stride;
  scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
                  (q_begin + row0) * p.out_row_stride;
  float* lse = p.lse + (b * p.heads_q + h) * p.seqlen_q + q_begin + row0;

  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  std::fill_n(s.running_max.data(), rows, kNegInf);
  std::fill_n(s.running_sum.data(), rows, acc_t(0));
  std::fill_n(s.out.data(), rows * d, acc_t(0));
  const TileView<acc_t> q_tile = load_tile(q, p.q_row_stride, rows, d, s.q.data());
  const acc_t scale = static_cast<acc_t>(p.scale);

  for (int64_t key0 = 0; key0 < key_end; key0 += shape.block_n) {
    const int64_t cols = std::min<int64_t>(shape.block_n, key_end - key0);
    const TileView<acc_t> k_tile =
        load_tile(k + key0 * p.k_row_stride, p.k_row_stride, cols, d, s.k.data());
    const TileView<acc_t> v_tile =
        load_tile(v + key0 * p.v_row_stride, p.v_row_stride, cols, d, s.v.data());
    acc_t* scores = s.scores.data();
    // scores (rows x cols, ld cols) = scale * Q K^T
    gemm_row_major<acc_t>(false, true, rows, cols, d, scale, q_tile.data, q_tile.ld, k_tile.data,
                          k_tile.ld, acc_t(0), scores, cols);
    // Only tiles that cross the diagonal need a mask: the first row sees keys <= row0 + diagonal.
    if (p.is_causal && key0 + cols - 1 > row0 + diagonal) {
      mask_causal(scores, rows, cols, cols, row0 + diagonal - key0);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t rescale =
          online_softmax_row(scores + r * cols, cols, s.running_max[r], s.running_sum[r]);
      if (rescale != acc_t(1)) {
        using Vec = at::vec::Vectorized<acc_t>;
        acc_t* out_row = s.out.data() + r * d;
        at::vec::map([rescale](Vec x) { return x * Vec(rescale); }, out_row, out_row, d);
      }
    }
    // out (rows x d) += P V
    gemm_row_major<acc_t>(false, false, rows, d, cols, acc_t(1), scores, cols, v_tile.data,
                          v_tile.ld, acc_t(1), s.out.data(), d);
  }

  for (int64_t r = 0; r < rows; ++r) {
    const acc_t sum = s.running_sum[r];
    if (sum > acc_t(0)) {
      store_row(s.out.data() + r * d, acc_t(1) / sum, out + r * p.out_row_stride, d);
      lse[r] = static_cast<float>(s.running_max[r] + std::log(sum));
    } else {
      std::fill_n(out + r * p.out_row_stride, d, scalar_t(0));
      lse[r] = -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace

template <typename scalar_t>
void run_forward(const ForwardParams& p) {
  using acc_t = acc_type<scalar_t>;
  const TileShape shape = forward_tile_shape(p.head_dim);
  write_empty_rows<scalar_t>(p, 0, p.cu_seqlens_q[0]);
  write_empty_rows<scalar_t>(p, p.cu_seqlens_q[p.num_blocks], p.seqlen_q);
  const std::vector<BlockTile> tiles =
      tiles_of_blocks(p.cu_seqlens_q, p.num_blocks, shape.block_m, /*last_first=*/true);
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  parallel_for_items(
      num_tiles * p.batch * p.heads_q,
      [&] { return ForwardScratch<acc_t>(shape.block_m, shape.block_n, p.head_dim); },
      [&](ForwardScratch<acc_t>& scratch, int64_t item) {
        const int64_t batch_head = item / num_tiles;
        forward_tile<scalar_t, acc_t>(p, shape, batch_head / p.heads_q, batch_head % p.heads_q,
                                      tiles[item % num_tiles], scratch);
      });
}

template void run_forward<float>(const ForwardParams&);
template void run_forward<double>(const ForwardParams&);
template void run_forward<c10::BFloat16>(const ForwardParams&);
template void run_forward<c10::Half>(const ForwardParams&);

}  // namespace block_attn::cpu
