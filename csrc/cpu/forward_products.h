// The forward's two tile products behind one interface: Sᵀ = K · Qᵀ and O += P · V.
// FloatForwardProducts multiplies in the accumulation type with FMAs (every dtype);
// Bf16ForwardProducts multiplies bf16 pairs on vdpbf16ps where the build has AVX512-BF16, with
// P rounded to bf16 before P · V, as in FlashAttention's low-precision kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>

#include "bf16_pairs.h"
#include "tile_math.h"

namespace block_attn::cpu {

template <typename scalar_t, int kBlockM, int kBlockN>
class FloatForwardProducts {
 public:
  using acc = acc_t<scalar_t>;

  explicit FloatForwardProducts(int dim)
      : dim_(dim),
        ld_(padded<acc>(dim)),
        q_t_(static_cast<int64_t>(dim) * kBlockM),
        k_(static_cast<int64_t>(kBlockN) * ld_),
        v_(static_cast<int64_t>(kBlockN) * ld_) {}

  // Qᵀ of `rows` queries (row stride `stride`), queries along the vector lanes.
  void load_queries(const scalar_t* q, int64_t stride, int rows) {
    pack_rows_transposed(q, stride, rows, dim_, q_t_.get(), kBlockM);
  }

  // Whether keep_keys keeps anything: float16/bfloat16 rows are converted for the products,
  // float32 and float64 rows are read in place anyway.
  static constexpr bool kKeepsKeys = !std::is_same_v<scalar_t, acc>;

  // Keeps keys [begin, end) of the block whose K and V rows start at `k` and `v` converted to the
  // accumulation type, converting only the rows not kept yet: the query tiles a thread takes in
  // turn from one block then share one conversion, and scores / accumulate_values read them from
  // there. Nothing is kept (each tile is converted again) without kKeepsKeys or for more keys than
  // kMaxKeptKeys.
  void keep_keys(const scalar_t* k, int64_t k_stride, const scalar_t* v, int64_t v_stride,
                 int begin, int end) {
    if (!kKeepsKeys || end - begin > kMaxKeptKeys) {
      kept_k_ = nullptr;
      return;
    }
    if (k != kept_k_ || v != kept_v_ || begin < kept_begin_ || end - kept_begin_ > kMaxKeptKeys) {
      kept_k_ = k;
      kept_v_ = v;
      kept_begin_ = kept_end_ = begin;
    }
    if (end > kept_end_) {
      reserve_kept(end - kept_begin_);
      const int64_t first = static_cast<int64_t>(kept_end_ - kept_begin_) * ld_;
      pack_rows(k + kept_end_ * k_stride, k_stride, end - kept_end_, dim_,
                kept_keys_->get() + first, ld_);
      pack_rows(v + kept_end_ * v_stride, v_stride, end - kept_end_, dim_,
                kept_values_->get() + first, ld_);
      kept_end_ = end;
    }
  }

  // Keeps no keys: scores / accumulate_values convert their own tiles again.
  void drop_kept_keys() { kept_k_ = nullptr; }

  // scores_t (cols × lanes, row stride kBlockM) = K · Qᵀ, unscaled, for the key rows from `k`
  // (key `key` of the kept block when keys are kept).
  void scores(const scalar_t* k, int64_t stride, int key, int cols, int lanes, acc* scores_t) {
    StridedMatrix<acc> k_rows{k_.get(), ld_, 1};
    if constexpr (std::is_same_v<scalar_t, acc>) {
      k_rows = {k, stride, 1};  // only broadcast from: any row stride will do
    } else if (kept_k_ != nullptr) {
      k_rows = {kept_keys_->get() + static_cast<int64_t>(key - kept_begin_) * ld_, ld_, 1};
    } else {
      pack_rows(k, stride, cols, dim_, k_.get(), ld_);
    }
    tile_product<acc>(false, cols, lanes, dim_, k_rows, q_t_.get(), kBlockM, scores_t, kBlockM);
  }

  // out (rows × ld, ld = padded dim) += P · V, with P read from its transposed tile, for the
  // value rows from `v` (key `key` of the kept block when keys are kept).
  void accumulate_values(const acc* probs_t, const scalar_t* v, int64_t stride, int key, int cols,
                         int rows, acc* out) {
    const acc* v_rows = v_.get();
    int64_t v_stride = ld_;
    if (std::is_same_v<scalar_t, acc> && dim_ == ld_) {  // rows are whole vectors: in place
      v_rows = reinterpret_cast<const acc*>(v);
      v_stride = stride;
    } else if (kept_k_ != nullptr) {
      v_rows = kept_values_->get() + static_cast<int64_t>(key - kept_begin_) * ld_;
    } else {
      pack_rows(v, stride, cols, dim_, v_.get(), ld_);
    }
    tile_product<acc>(true, rows, ld_, cols, {probs_t, 1, kBlockM}, v_rows, v_stride, out, ld_);
  }

 private:
  // Kept keys at most: 4096 rows of K and V at head_dim 128 are 4 MB of float32 per thread.
  static constexpr int kMaxKeptKeys = 4096;

  // Room for `rows` kept rows of K and V, the rows kept so far copied over.
  void reserve_kept(int rows) {
    if (rows <= kept_capacity_) return;
    const int capacity = std::min(kMaxKeptKeys, std::max(rows, 2 * kept_capacity_));
    const int64_t size = static_cast<int64_t>(capacity) * ld_;
    const int64_t used = static_cast<int64_t>(kept_end_ - kept_begin_) * ld_;
    std::optional<AlignedBuffer<acc>> keys(std::in_place, size), values(std::in_place, size);
    if (kept_keys_) {
      std::copy_n(kept_keys_->get(), used, keys->get());
      std::copy_n(kept_values_->get(), used, values->get());
    }
    kept_keys_ = std::move(keys);
    kept_values_ = std::move(values);
    kept_capacity_ = capacity;
  }

  int dim_;
  int ld_;
  AlignedBuffer<acc> q_t_, k_, v_;
  std::optional<AlignedBuffer<acc>> kept_keys_, kept_values_;
  int kept_capacity_ = 0;
  const scalar_t* kept_k_ = nullptr;  // the kept block's first K row, or nullptr: none kept
  const scalar_t* kept_v_ = nullptr;
  int kept_begin_ = 0, kept_end_ = 0;
};

#ifdef BLOCK_ATTN_BF16_PAIRS

template <int kBlockM, int kBlockN>
class Bf16ForwardProducts {
 public:
  explicit Bf16ForwardProducts(int dim)
      : dim_(dim),
        pairs_((dim + 1) / 2),
        ld_(padded<float>(dim)),
        q_pairs_(static_cast<int64_t>(pairs_) * kBlockM),
        k_pairs_(static_cast<int64_t>(kBlockN) * pairs_),
        prob_pairs_(static_cast<int64_t>(kBlockN / 2) * kBlockM),
        v_pairs_(static_cast<int64_t>(kBlockN / 2) * ld_) {}

  void load_queries(const c10::BFloat16* q, int64_t stride, int rows) {
    pack_pairs_transposed(q, stride, rows, dim_, q_pairs_.get(), kBlockM);
  }

  // bf16 pairs are packed per tile (or read in place): nothing is kept.
  static constexpr bool kKeepsKeys = false;
  void keep_keys(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int, int) {}
  void drop_kept_keys() {}

  void scores(const c10::BFloat16* k, int64_t stride, int /*key*/, int cols, int lanes,
              float* scores_t) {
    PairMatrix k_rows{k_pairs_.get(), pairs_, 1};
    // Even rows of even length are already pairs.
    if (dim_ % 2 == 0 && stride % 2 == 0 && reinterpret_cast<uintptr_t>(k) % 4 == 0) {
      k_rows = {reinterpret_cast<const Bf16Pair*>(k), stride / 2, 1};
    } else {
      pack_pairs(k, stride, cols, dim_, k_pairs_.get(), pairs_);
    }
    tiled_product<Bf16PairProduct>(false, cols, lanes, pairs_, k_rows, q_pairs_.get(), kBlockM,
                                   scores_t, kBlockM);
  }

  void accumulate_values(const float* probs_t, const c10::BFloat16* v, int64_t stride, int /*key*/,
                         int cols, int rows, float* out) {
    const int lanes = padded<float>(rows);
    pack_row_pairs(probs_t, kBlockM, cols, lanes, prob_pairs_.get(), kBlockM);
    pack_row_pairs(v, stride, cols, dim_, v_pairs_.get(), ld_);
    tiled_product<Bf16PairProduct>(true, rows, ld_, (cols + 1) / 2, {prob_pairs_.get(), 1, kBlockM},
                                   v_pairs_.get(), ld_, out, ld_);
  }

 private:
  int dim_;
  int pairs_;
  int ld_;
  AlignedBuffer<Bf16Pair> q_pairs_, k_pairs_, prob_pairs_, v_pairs_;
};

template <typename scalar_t, int kBlockM, int kBlockN>
using ForwardProducts =
    std::conditional_t<kUsesBf16Pairs<scalar_t>, Bf16ForwardProducts<kBlockM, kBlockN>,
                       FloatForwardProducts<scalar_t, kBlockM, kBlockN>>;
#else
template <typename scalar_t, int kBlockM, int kBlockN>
using ForwardProducts = FloatForwardProducts<scalar_t, kBlockM, kBlockN>;
#endif

}  // namespace block_attn::cpu
