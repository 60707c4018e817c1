// CPU backward (FlashAttention-2): probabilities are recomputed from the saved lse. Two passes
// with no shared writes, so the result is bitwise deterministic and B = H = 1 still uses every
// core: dK/dV per (kv head, key tile) and dQ per (query head, query tile).
// clang-format off
#include "vector_isa.h"  // first: it picks the SIMD flavour of the ATen headers below
// clang-format on
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "attention_cpu.h"
#include "tile_math.h"
#include "tile_schedule.h"

namespace block_attn::cpu {
namespace {

// Square 64×64 tiles: both passes multiply a query tile with a key tile in both directions,
// and 64 rows keep the five scratch tiles of a D = 256 head inside L2.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

template <typename scalar_t>
struct Pointers {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* grad_out;
  const acc_t<scalar_t>* lse;
  const acc_t<scalar_t>* delta;
};

// Pointers to row 0 of a block for one (batch, query head).
template <typename scalar_t>
Pointers<scalar_t> head_pointers(const BackwardParams& p, const std::vector<acc_t<scalar_t>>& delta,
                                 int batch, int head, const BlockExtent& e) {
  const int kv_head = head / (p.heads_q / p.heads_kv);
  const int64_t row_index =
      (static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q + e.q_start;
  return {static_cast<const scalar_t*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
              e.q_start * p.q_row_stride,
          static_cast<const scalar_t*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride +
              e.k_start * p.k_row_stride,
          static_cast<const scalar_t*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride +
              e.k_start * p.v_row_stride,
          static_cast<const scalar_t*>(p.grad_out) + batch * p.grad_out_batch_stride +
              head * p.grad_out_head_stride + e.q_start * p.grad_out_row_stride,
          static_cast<const acc_t<scalar_t>*>(p.lse) + row_index,
          delta.data() + row_index};
}

// scores (rows×cols, ld kBlockN) := P, then dP (ld kBlockN) := dS = P ∘ (dP − Delta) · scale.
// Query rows [q_begin, q_begin + rows) and keys [k_begin, k_begin + cols) are block-local.
template <typename acc>
void probabilities_and_score_grads(const BackwardParams& p, const BlockExtent& e, int q_begin,
                                   int rows, int k_begin, int cols, const acc* lse,
                                   const acc* delta, acc* scores, acc* grad_scores) {
  for (int r = 0; r < rows; ++r) {
    acc* s = scores + r * kBlockN;
    acc* ds = grad_scores + r * kBlockN;
    const int allowed = std::clamp(causal_key_end(q_begin + r, e, p.is_causal) - k_begin, 0, cols);
    const acc row_lse = lse[q_begin + r];
    if (allowed == 0 || row_lse == -std::numeric_limits<acc>::infinity()) {
      fill<acc>(s, cols, 0);
      fill<acc>(ds, cols, 0);
      continue;
    }
    exp_shifted(s, allowed, row_lse);
    fill<acc>(s + allowed, cols - allowed, 0);
    const acc row_delta = delta[q_begin + r];
    const acc scale = static_cast<acc>(p.scale);
    for (int c = 0; c < cols; ++c) ds[c] = s[c] * (ds[c] - row_delta) * scale;
  }
}

template <typename scalar_t>
struct Scratch {
  using acc = acc_t<scalar_t>;
  explicit Scratch(int dim)
      : storage(
            static_cast<size_t>(4 * kBlockM * dim + 2 * kBlockN * dim + 2 * kBlockM * kBlockN)) {
    q = storage.data();
    grad_out = q + kBlockM * dim;
    k = grad_out + kBlockM * dim;
    v = k + kBlockN * dim;
    scores = v + kBlockN * dim;
    grad_scores = scores + kBlockM * kBlockN;
    grad_a = grad_scores + kBlockM * kBlockN;
    grad_b = grad_a + kBlockM * dim;
  }
  std::vector<acc> storage;
  acc *q, *grad_out, *k, *v, *scores, *grad_scores, *grad_a, *grad_b;
};

// dK and dV of keys [key.begin, key.end) of one block for one (batch, kv head).
template <typename scalar_t>
void key_value_grads_tile(const BackwardParams& p, const std::vector<acc_t<scalar_t>>& delta,
                          int batch, int kv_head, const Tile& key, Scratch<scalar_t>& t) {
  using acc = acc_t<scalar_t>;
  const int dim = p.head_dim;
  const BlockExtent e = block_extent(p, key.block);
  const int cols = key.end - key.begin;
  const int group = p.heads_q / p.heads_kv;
  acc* grad_k = t.grad_a;
  acc* grad_v = t.grad_b;
  fill<acc>(grad_k, cols * dim, 0);
  fill<acc>(grad_v, cols * dim, 0);

  for (int g = 0; g < group; ++g) {
    const Pointers<scalar_t> ptr = head_pointers<scalar_t>(p, delta, batch, kv_head * group + g, e);
    if (g == 0) {
      pack_rows(ptr.k + key.begin * p.k_row_stride, p.k_row_stride, cols, dim, t.k);
      pack_rows(ptr.v + key.begin * p.v_row_stride, p.v_row_stride, cols, dim, t.v);
    }
    for (int q0 = causal_query_begin(key.begin, e, p.is_causal); q0 < e.len_q; q0 += kBlockM) {
      const int rows = std::min(kBlockM, e.len_q - q0);
      pack_rows(ptr.q + q0 * p.q_row_stride, p.q_row_stride, rows, dim, t.q);
      pack_rows(ptr.grad_out + q0 * p.grad_out_row_stride, p.grad_out_row_stride, rows, dim,
                t.grad_out);
      matmul_abt<acc>(rows, cols, dim, static_cast<acc>(p.scale), t.q, dim, t.k, dim, 0, t.scores,
                      kBlockN);
      matmul_abt<acc>(rows, cols, dim, 1, t.grad_out, dim, t.v, dim, 0, t.grad_scores, kBlockN);
      probabilities_and_score_grads<acc>(p, e, q0, rows, key.begin, cols, ptr.lse, ptr.delta,
                                         t.scores, t.grad_scores);
      matmul_atb<acc>(cols, dim, rows, 1, t.scores, kBlockN, t.grad_out, dim, 1, grad_v, dim);
      matmul_atb<acc>(cols, dim, rows, 1, t.grad_scores, kBlockN, t.q, dim, 1, grad_k, dim);
    }
  }
  const int64_t k_row = e.k_start + key.begin;
  unpack_rows(grad_k, cols, dim,
              static_cast<scalar_t*>(p.grad_k) + batch * p.grad_k_batch_stride +
                  kv_head * p.grad_k_head_stride + k_row * p.grad_k_row_stride,
              p.grad_k_row_stride);
  unpack_rows(grad_v, cols, dim,
              static_cast<scalar_t*>(p.grad_v) + batch * p.grad_v_batch_stride +
                  kv_head * p.grad_v_head_stride + k_row * p.grad_v_row_stride,
              p.grad_v_row_stride);
}

// dQ of queries [query.begin, query.end) of one block for one (batch, query head).
template <typename scalar_t>
void query_grads_tile(const BackwardParams& p, const std::vector<acc_t<scalar_t>>& delta, int batch,
                      int head, const Tile& query, Scratch<scalar_t>& t) {
  using acc = acc_t<scalar_t>;
  const int dim = p.head_dim;
  const BlockExtent e = block_extent(p, query.block);
  const int rows = query.end - query.begin;
  const Pointers<scalar_t> ptr = head_pointers<scalar_t>(p, delta, batch, head, e);
  acc* grad_q = t.grad_a;
  fill<acc>(grad_q, rows * dim, 0);
  pack_rows(ptr.q + query.begin * p.q_row_stride, p.q_row_stride, rows, dim, t.q);
  pack_rows(ptr.grad_out + query.begin * p.grad_out_row_stride, p.grad_out_row_stride, rows, dim,
            t.grad_out);

  const int key_end = causal_key_end(query.end - 1, e, p.is_causal);
  for (int k0 = 0; k0 < key_end; k0 += kBlockN) {
    const int cols = std::min(kBlockN, key_end - k0);
    pack_rows(ptr.k + k0 * p.k_row_stride, p.k_row_stride, cols, dim, t.k);
    pack_rows(ptr.v + k0 * p.v_row_stride, p.v_row_stride, cols, dim, t.v);
    matmul_abt<acc>(rows, cols, dim, static_cast<acc>(p.scale), t.q, dim, t.k, dim, 0, t.scores,
                    kBlockN);
    matmul_abt<acc>(rows, cols, dim, 1, t.grad_out, dim, t.v, dim, 0, t.grad_scores, kBlockN);
    probabilities_and_score_grads<acc>(p, e, query.begin, rows, k0, cols, ptr.lse, ptr.delta,
                                       t.scores, t.grad_scores);
    matmul_ab<acc>(rows, dim, cols, 1, t.grad_scores, kBlockN, t.k, dim, 1, grad_q, dim);
  }
  unpack_rows(grad_q, rows, dim,
              static_cast<scalar_t*>(p.grad_q) + batch * p.grad_q_batch_stride +
                  head * p.grad_q_head_stride + (e.q_start + query.begin) * p.grad_q_row_stride,
              p.grad_q_row_stride);
}

// Delta_i = rowsum(dO_i ∘ O_i) − grad_lse_i, one value per (batch, query head, query).
template <typename scalar_t>
std::vector<acc_t<scalar_t>> compute_delta(const BackwardParams& p) {
  using acc = acc_t<scalar_t>;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  std::vector<acc> delta(rows);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (static_cast<int64_t>(p.heads_q) * p.seqlen_q);
      const int64_t h = (i / p.seqlen_q) % p.heads_q;
      const int64_t n = i % p.seqlen_q;
      const auto* o = static_cast<const scalar_t*>(p.out) + b * p.out_batch_stride +
                      h * p.out_head_stride + n * p.out_row_stride;
      const auto* g = static_cast<const scalar_t*>(p.grad_out) + b * p.grad_out_batch_stride +
                      h * p.grad_out_head_stride + n * p.grad_out_row_stride;
      acc sum = 0;
      for (int d = 0; d < p.head_dim; ++d) sum += static_cast<acc>(o[d]) * static_cast<acc>(g[d]);
      delta[i] = sum - (p.grad_lse ? static_cast<const acc*>(p.grad_lse)[i] : acc(0));
    }
  });
  return delta;
}

}  // namespace

template <typename scalar_t>
void run_backward(const BackwardParams& p) {
  check_host_offsets(p.cu_seqlens_q, p.num_blocks, p.seqlen_q, "cu_seqlens_q");
  check_host_offsets(p.cu_seqlens_k, p.num_blocks, p.seqlen_k, "cu_seqlens_k");
  const std::vector<acc_t<scalar_t>> delta = compute_delta<scalar_t>(p);

  const std::vector<Tile> key_tiles = make_tiles(p, kBlockN, /*by_query=*/false);
  const int64_t keys_per_head = static_cast<int64_t>(key_tiles.size());
  at::parallel_for(0, keys_per_head * p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(p.head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / keys_per_head;
      key_value_grads_tile<scalar_t>(p, delta, static_cast<int>(bh / p.heads_kv),
                                     static_cast<int>(bh % p.heads_kv),
                                     key_tiles[item % keys_per_head], scratch);
    }
  });

  const std::vector<Tile> query_tiles = make_tiles(p, kBlockM, /*by_query=*/true);
  const int64_t queries_per_head = static_cast<int64_t>(query_tiles.size());
  at::parallel_for(0, queries_per_head * p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(p.head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / queries_per_head;
      query_grads_tile<scalar_t>(p, delta, static_cast<int>(bh / p.heads_q),
                                 static_cast<int>(bh % p.heads_q),
                                 query_tiles[item % queries_per_head], scratch);
    }
  });
}

template void run_backward<float>(const BackwardParams&);
template void run_backward<double>(const BackwardParams&);
template void run_backward<c10::BFloat16>(const BackwardParams&);
template void run_backward<c10::Half>(const BackwardParams&);

}  // namespace block_attn::cpu
