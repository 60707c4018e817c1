// The backward's five tile products behind one interface, per (query tile, key tile) pair:
// Sᵀ = K · Qᵀ and dPᵀ = V · dOᵀ (keys × queries), then dV += Pᵀ · dO, dK += dSᵀ · Q and
// dQ += dS · K. FloatBackwardProducts multiplies in the accumulation type with FMAs (every dtype);
// Bf16BackwardProducts multiplies bf16 pairs on vdpbf16ps where the build has AVX512-BF16, with
// P and dS rounded to bf16 before their products, as in FlashAttention's low-precision kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include "bf16_pairs.h"
#include "tile_math.h"

namespace block_attn::cpu {

// Row pointers and strides of one tile of an input, in its own dtype.
template <typename scalar_t>
struct InputRows {
  const scalar_t* data;
  int64_t stride;
};

template <typename scalar_t, int kBlockM, int kBlockN>
class FloatBackwardProducts {
 public:
  using acc = acc_t<scalar_t>;

  FloatBackwardProducts(int dim, int max_range_keys)
      : dim_(dim),
        ld_(padded<acc>(dim)),
        q_(static_cast<int64_t>(kBlockM) * ld_),
        q_t_(static_cast<int64_t>(dim) * kBlockM),
        grad_out_(static_cast<int64_t>(kBlockM) * ld_),
        grad_out_t_(static_cast<int64_t>(dim) * kBlockM),
        k_(static_cast<int64_t>(max_range_keys) * ld_),
        v_(static_cast<int64_t>(max_range_keys) * ld_) {}

  // K and V rows of the item's key range.
  void load_keys(InputRows<scalar_t> k, InputRows<scalar_t> v, int keys) {
    pack_rows(k.data, k.stride, keys, dim_, k_.get(), ld_);
    pack_rows(v.data, v.stride, keys, dim_, v_.get(), ld_);
  }

  // Q and dO of one query tile, as rows and transposed.
  void load_queries(InputRows<scalar_t> q, InputRows<scalar_t> grad_out, int rows) {
    pack_rows(q.data, q.stride, rows, dim_, q_.get(), ld_);
    pack_rows_transposed(q.data, q.stride, rows, dim_, q_t_.get(), kBlockM);
    pack_rows(grad_out.data, grad_out.stride, rows, dim_, grad_out_.get(), ld_);
    pack_rows_transposed(grad_out.data, grad_out.stride, rows, dim_, grad_out_t_.get(), kBlockM);
  }

  // Keys [key, key + cols) of the range: scores_t = K · Qᵀ, grad_scores_t = V · dOᵀ (unscaled;
  // row stride kBlockM).
  void scores(int key, int cols, int lanes, acc* scores_t, acc* grad_scores_t) {
    const int64_t offset = static_cast<int64_t>(key) * ld_;
    tile_product<acc>(false, cols, lanes, dim_, {k_.get() + offset, ld_, 1}, q_t_.get(), kBlockM,
                      scores_t, kBlockM);
    tile_product<acc>(false, cols, lanes, dim_, {v_.get() + offset, ld_, 1}, grad_out_t_.get(),
                      kBlockM, grad_scores_t, kBlockM);
  }

  // grad_v/grad_k rows of keys [key, key + cols) (row stride ld) += Pᵀ·dO and dSᵀ·Q;
  // grad_q (rows × ld) += dS·K.
  void accumulate_grads(int key, int cols, int rows, const acc* probs_t, const acc* grad_scores_t,
                        acc* grad_v, acc* grad_k, acc* grad_q) {
    const int64_t offset = static_cast<int64_t>(key) * ld_;
    tile_product<acc>(true, cols, ld_, rows, {probs_t, kBlockM, 1}, grad_out_.get(), ld_,
                      grad_v + offset, ld_);
    tile_product<acc>(true, cols, ld_, rows, {grad_scores_t, kBlockM, 1}, q_.get(), ld_,
                      grad_k + offset, ld_);
    tile_product<acc>(true, rows, ld_, cols, {grad_scores_t, 1, kBlockM}, k_.get() + offset, ld_,
                      grad_q, ld_);
  }

 private:
  int dim_;
  int ld_;
  AlignedBuffer<acc> q_, q_t_, grad_out_, grad_out_t_, k_, v_;
};

#ifdef BLOCK_ATTN_BF16_PAIRS

template <int kBlockM, int kBlockN>
class Bf16BackwardProducts {
 public:
  Bf16BackwardProducts(int dim, int max_range_keys)
      : dim_(dim),
        pairs_((dim + 1) / 2),
        ld_(padded<float>(dim)),
        q_pairs_t_(static_cast<int64_t>(pairs_) * kBlockM),
        grad_out_pairs_t_(static_cast<int64_t>(pairs_) * kBlockM),
        q_row_pairs_(static_cast<int64_t>(kBlockM / 2) * ld_),
        grad_out_row_pairs_(static_cast<int64_t>(kBlockM / 2) * ld_),
        k_pairs_(static_cast<int64_t>(max_range_keys) * pairs_),
        v_pairs_(static_cast<int64_t>(max_range_keys) * pairs_),
        k_row_pairs_((static_cast<int64_t>(max_range_keys) + 1) / 2 * ld_),
        probs_(static_cast<int64_t>(kBlockN) * kBlockM),
        grad_scores_(static_cast<int64_t>(kBlockN) * kBlockM),
        grad_score_row_pairs_(static_cast<int64_t>(kBlockN / 2) * kBlockM) {}

  void load_keys(InputRows<c10::BFloat16> k, InputRows<c10::BFloat16> v, int keys) {
    pack_pairs(k.data, k.stride, keys, dim_, k_pairs_.get(), pairs_);
    pack_pairs(v.data, v.stride, keys, dim_, v_pairs_.get(), pairs_);
    pack_row_pairs(k.data, k.stride, keys, dim_, k_row_pairs_.get(), ld_);
  }

  void load_queries(InputRows<c10::BFloat16> q, InputRows<c10::BFloat16> grad_out, int rows) {
    pack_pairs_transposed(q.data, q.stride, rows, dim_, q_pairs_t_.get(), kBlockM);
    pack_pairs_transposed(grad_out.data, grad_out.stride, rows, dim_, grad_out_pairs_t_.get(),
                          kBlockM);
    pack_row_pairs(q.data, q.stride, rows, dim_, q_row_pairs_.get(), ld_);
    pack_row_pairs(grad_out.data, grad_out.stride, rows, dim_, grad_out_row_pairs_.get(), ld_);
  }

  void scores(int key, int cols, int lanes, float* scores_t, float* grad_scores_t) {
    const int64_t offset = static_cast<int64_t>(key) * pairs_;
    tiled_product<Bf16PairProduct>(false, cols, lanes, pairs_, {k_pairs_.get() + offset, pairs_, 1},
                                   q_pairs_t_.get(), kBlockM, scores_t, kBlockM);
    tiled_product<Bf16PairProduct>(false, cols, lanes, pairs_, {v_pairs_.get() + offset, pairs_, 1},
                                   grad_out_pairs_t_.get(), kBlockM, grad_scores_t, kBlockM);
  }

  // `key` is a multiple of kBlockN, hence even: key tiles start on whole row pairs.
  void accumulate_grads(int key, int cols, int rows, const float* probs_t,
                        const float* grad_scores_t, float* grad_v, float* grad_k, float* grad_q) {
    const int lanes = padded<float>(rows);
    const int query_pairs = (rows + 1) / 2;
    const int64_t offset = static_cast<int64_t>(key) * ld_;
    // Pᵀ and dSᵀ rows in bf16: pairs of adjacent queries. Lanes past `rows` hold P = dS = 0.
    convert_rows_to_bf16(probs_t, kBlockM, cols, lanes, probs_.get(), kBlockM);
    convert_rows_to_bf16(grad_scores_t, kBlockM, cols, lanes, grad_scores_.get(), kBlockM);
    const auto* prob_pairs = reinterpret_cast<const Bf16Pair*>(probs_.get());
    const auto* grad_score_pairs = reinterpret_cast<const Bf16Pair*>(grad_scores_.get());
    tiled_product<Bf16PairProduct>(true, cols, ld_, query_pairs, {prob_pairs, kBlockM / 2, 1},
                                   grad_out_row_pairs_.get(), ld_, grad_v + offset, ld_);
    tiled_product<Bf16PairProduct>(true, cols, ld_, query_pairs, {grad_score_pairs, kBlockM / 2, 1},
                                   q_row_pairs_.get(), ld_, grad_k + offset, ld_);
    // dS as pairs of adjacent keys for dQ += dS · K.
    pack_row_pairs(grad_scores_t, kBlockM, cols, lanes, grad_score_row_pairs_.get(), kBlockM);
    tiled_product<Bf16PairProduct>(true, rows, ld_, (cols + 1) / 2,
                                   {grad_score_row_pairs_.get(), 1, kBlockM},
                                   k_row_pairs_.get() + offset / 2, ld_, grad_q, ld_);
  }

 private:
  int dim_;
  int pairs_;
  int ld_;
  AlignedBuffer<Bf16Pair> q_pairs_t_, grad_out_pairs_t_, q_row_pairs_, grad_out_row_pairs_;
  AlignedBuffer<Bf16Pair> k_pairs_, v_pairs_, k_row_pairs_;
  AlignedBuffer<c10::BFloat16> probs_, grad_scores_;
  AlignedBuffer<Bf16Pair> grad_score_row_pairs_;
};

template <typename scalar_t, int kBlockM, int kBlockN>
using BackwardProducts =
    std::conditional_t<kUsesBf16Pairs<scalar_t>, Bf16BackwardProducts<kBlockM, kBlockN>,
                       FloatBackwardProducts<scalar_t, kBlockM, kBlockN>>;
#else
template <typename scalar_t, int kBlockM, int kBlockN>
using BackwardProducts = FloatBackwardProducts<scalar_t, kBlockM, kBlockN>;
#endif

}  // namespace block_attn::cpu
