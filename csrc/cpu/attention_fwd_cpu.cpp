// CPU forward: FlashAttention-style online softmax over the key tiles of each query tile's
// own block; tiles past the causal diagonal are never visited.
//
// Scores are kept transposed (keys × queries): the register-tiled product then broadcasts K
// straight from its packed rows, the transposed Q is packed once per query tile, and the
// softmax's row maxima and sums become elementwise vector operations across queries.
// clang-format off
#include "vector_isa.h"  // first: it picks the SIMD flavour of the ATen headers below
// clang-format on
#include <algorithm>
#include <type_traits>
#include <vector>

#include "attention_cpu.h"
#include "tile_math.h"
#include "tile_schedule.h"
#include "work_queue.h"

namespace block_attn::cpu {
namespace {

// 64 queries are the vector lanes of the transposed scores (4 AVX-512 vectors, the register
// tile's width). 256 keys per tile amortise the online-softmax rescaling of the output and the
// per-tile packing; a 64×256 score tile (64 KB) and the K and V tiles stay in L2.
constexpr int kBlockM = 64;
constexpr int kBlockN = 256;

template <typename acc>
struct ForwardScratch {
  explicit ForwardScratch(int dim)
      : padded_dim(padded<acc>(dim)),
        storage(static_cast<int64_t>(dim) * kBlockM + 2 * kBlockN * padded_dim +
                kBlockN * kBlockM + kBlockM * padded_dim + 4 * kBlockM) {
    q_t = storage.get();
    k = q_t + static_cast<int64_t>(dim) * kBlockM;
    v = k + kBlockN * padded_dim;
    scores_t = v + kBlockN * padded_dim;
    out = scores_t + kBlockN * kBlockM;
    row_max = out + kBlockM * padded_dim;
    row_sum = row_max + kBlockM;
    correction = row_sum + kBlockM;
    inverse_sum = correction + kBlockM;
  }
  int padded_dim;
  AlignedBuffer<acc> storage;
  acc *q_t, *k, *v, *scores_t, *out, *row_max, *row_sum, *correction, *inverse_sum;
};

// Masks, exponentiates and sums one transposed score tile (cols keys × `lanes` queries, row
// stride kBlockM) against the running maxima and sums of the queries. Leaves P in scores_t and
// each query's output rescaling factor in `correction`.
template <typename acc>
void online_softmax_tile(int cols, int lanes, acc* scores_t, acc* row_max, acc* row_sum,
                         acc* correction) {
  using Vec = at::vec::Vectorized<acc>;
  constexpr int W = kVecWidth<acc>;
  for (int v0 = 0; v0 < lanes; v0 += W) {
    const Vec old_max = Vec::loadu(row_max + v0);
    Vec new_max = old_max;
    for (int t = 0; t < cols; ++t) {
      new_max = at::vec::maximum(new_max, Vec::loadu(scores_t + t * kBlockM + v0));
    }
    // A query with no key seen yet shifts by 0, so that exp(-inf - shift) is 0, not NaN.
    const Vec shift = Vec::blendv(new_max, Vec(0), new_max == Vec(-kInf<acc>));
    Vec sum(0);
    for (int t = 0; t < cols; ++t) {
      acc* s = scores_t + t * kBlockM + v0;
      const Vec p = vec_exp<acc>(Vec::loadu(s) - shift);
      p.store(s);
      sum = sum + p;
    }
    const Vec factor = vec_exp<acc>(old_max - shift);
    Vec total = Vec::loadu(row_sum + v0) * factor + sum;
    // A NaN score must stay visible: the clamped exp would turn it into a finite value.
    total = Vec::blendv(total, Vec(std::numeric_limits<acc>::quiet_NaN()), new_max != new_max);
    total.store(row_sum + v0);
    new_max.store(row_max + v0);
    factor.store(correction + v0);
  }
}

template <typename scalar_t>
void forward_tile(const ForwardParams& p, int batch, int head, const Tile& tile,
                  ForwardScratch<acc_t<scalar_t>>& t) {
  using acc = acc_t<scalar_t>;
  const int dim = p.head_dim;
  const int ld = t.padded_dim;
  const BlockExtent e = block_extent(p, tile.block);
  const int rows = tile.end - tile.begin;
  const int lanes = padded<acc>(rows);
  const int kv_head = head / (p.heads_q / p.heads_kv);

  const auto* q = static_cast<const scalar_t*>(p.q) + batch * p.q_batch_stride +
                  head * p.q_head_stride + (e.q_start + tile.begin) * p.q_row_stride;
  const auto* k = static_cast<const scalar_t*>(p.k) + batch * p.k_batch_stride +
                  kv_head * p.k_head_stride + e.k_start * p.k_row_stride;
  const auto* v = static_cast<const scalar_t*>(p.v) + batch * p.v_batch_stride +
                  kv_head * p.v_head_stride + e.k_start * p.v_row_stride;

  pack_rows_transposed(q, p.q_row_stride, rows, dim, static_cast<acc>(p.scale), t.q_t, kBlockM);
  fill<acc>(t.out, static_cast<int64_t>(rows) * ld, 0);
  fill<acc>(t.row_max, kBlockM, -kInf<acc>);
  fill<acc>(t.row_sum, kBlockM, 0);

  // Inputs already in the accumulation type are read in place: K is only broadcast from, so any
  // row stride will do; V rows are whole vectors when dim is a multiple of the vector width.
  constexpr bool kSameType = std::is_same_v<scalar_t, acc>;
  const bool v_in_place = kSameType && dim == ld;
  const int key_end = causal_key_end(tile.end - 1, e, p.is_causal);
  for (int k0 = 0; k0 < key_end; k0 += kBlockN) {
    const int cols = std::min(kBlockN, key_end - k0);
    StridedMatrix<acc> k_rows{t.k, ld, 1};
    if constexpr (kSameType) {
      k_rows = {reinterpret_cast<const acc*>(k + k0 * p.k_row_stride), p.k_row_stride, 1};
    } else {
      pack_rows(k + k0 * p.k_row_stride, p.k_row_stride, cols, dim, t.k, ld);
    }
    // Sᵀ = K · (scale·Q)ᵀ: keys × queries.
    tile_product<acc>(false, cols, lanes, dim, k_rows, t.q_t, kBlockM, t.scores_t, kBlockM);
    if (p.is_causal) {
      for (int c = 0; c < cols; ++c) {
        // Queries before `first` (tile-local) may not see key k0 + c.
        const int first = std::clamp(causal_query_begin(k0 + c, e, true) - tile.begin, 0, rows);
        fill<acc>(t.scores_t + c * kBlockM, first, -kInf<acc>);
      }
    }
    online_softmax_tile<acc>(cols, lanes, t.scores_t, t.row_max, t.row_sum, t.correction);
    for (int r = 0; r < rows; ++r) {
      if (t.correction[r] != acc(1)) scale_in_place(t.out + r * ld, ld, t.correction[r]);
    }
    const acc* v_rows = t.v;
    int64_t v_stride = ld;
    if (v_in_place) {
      v_rows = reinterpret_cast<const acc*>(v + k0 * p.v_row_stride);
      v_stride = p.v_row_stride;
    } else {
      pack_rows(v + k0 * p.v_row_stride, p.v_row_stride, cols, dim, t.v, ld);
    }
    // O += P · V, P read from the transposed tile.
    tile_product<acc>(true, rows, ld, cols, {t.scores_t, 1, kBlockM}, v_rows, v_stride, t.out, ld);
  }

  acc* lse = static_cast<acc*>(p.lse) +
             (static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q + e.q_start + tile.begin;
  for (int r = 0; r < rows; ++r) {
    const bool any_key = t.row_sum[r] != 0;  // NaN inputs give a NaN sum: keep it visible
    t.inverse_sum[r] = any_key ? acc(1) / t.row_sum[r] : acc(0);
    lse[r] = any_key ? t.row_max[r] + std::log(t.row_sum[r]) : -kInf<acc>;
  }
  auto* out = static_cast<scalar_t*>(p.out) + batch * p.out_batch_stride +
              head * p.out_head_stride + (e.q_start + tile.begin) * p.out_row_stride;
  unpack_rows(t.out, ld, rows, dim, t.inverse_sum, out, p.out_row_stride);
}

}  // namespace

template <typename scalar_t>
void run_forward(const ForwardParams& p) {
  check_host_offsets(p.cu_seqlens_q, p.num_blocks, p.seqlen_q, "cu_seqlens_q");
  check_host_offsets(p.cu_seqlens_k, p.num_blocks, p.seqlen_k, "cu_seqlens_k");
  std::vector<Tile> tiles = make_tiles(p, kBlockM, /*by_query=*/true);
  // Costliest first (keys visited per query tile) so that the long blocks start early.
  const auto keys_seen = [&](const Tile& tile) {
    return causal_key_end(tile.end - 1, block_extent(p, tile.block), p.is_causal);
  };
  std::stable_sort(tiles.begin(), tiles.end(), [&](const Tile& a, const Tile& b) {
    return keys_seen(a) * (a.end - a.begin) > keys_seen(b) * (b.end - b.begin);
  });
  // Item = (tile, batch·head), tile-major, so that all heads of a long tile come first.
  const int64_t heads = static_cast<int64_t>(p.batch) * p.heads_q;
  run_work_items(
      static_cast<int64_t>(tiles.size()) * heads,
      [&] { return ForwardScratch<acc_t<scalar_t>>(p.head_dim); },
      [&](int64_t item, ForwardScratch<acc_t<scalar_t>>& scratch) {
        const int64_t bh = item % heads;
        forward_tile<scalar_t>(p, static_cast<int>(bh / p.heads_q),
                               static_cast<int>(bh % p.heads_q), tiles[item / heads], scratch);
      });
}

template void run_forward<float>(const ForwardParams&);
template void run_forward<double>(const ForwardParams&);
template void run_forward<c10::BFloat16>(const ForwardParams&);
template void run_forward<c10::Half>(const ForwardParams&);

}  // namespace block_attn::cpu
