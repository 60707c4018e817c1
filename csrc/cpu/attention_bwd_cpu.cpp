// CPU backward (FlashAttention-2): probabilities are recomputed from the saved lse, and each
// (query tile, key tile) pair costs five tile products: S, dP, dV += Pᵀ·dO, dK += dSᵀ·Q and
// dQ += dS·K. Scores are kept transposed (keys × queries), as in the forward.
//
// A work item owns a range of key tiles of one block for one (batch, kv head): it writes those
// keys' dK and dV outright, and the dQ of the block's queries. When a block is split into
// several key ranges to spread it over threads, each range writes its dQ into its own partial
// buffer and the partials are summed afterwards in range order: no atomics, no shared writes,
// bitwise repeatable whatever the schedule.
// clang-format off
#include "vector_isa.h"  // first: it picks the SIMD flavour of the ATen headers below
// clang-format on
#include <algorithm>
#include <memory>
#include <vector>

#include "attention_cpu.h"
#include "backward_products.h"
#include "dropout_tile.h"
#include "rows_outside_blocks.h"
#include "score_variants.h"
#include "tile_math.h"
#include "tile_schedule.h"
#include "work_queue.h"

namespace block_attn::cpu {
namespace {

// 64 queries are the vector lanes of the transposed scores, as in the forward. 128 keys per
// inner tile keep the two score tiles (2 × 32 KB) and the K rows that dQ reads in L2 beside
// the dK/dV accumulators of the range.
constexpr int kBlockM = kTileLanes;
constexpr int kBlockN = 128;
// Blocks are split into key ranges until no item exceeds 1/kItemsPerThread of a thread's
// share of the work: enough items for the dynamic schedule to even out. A block is cut into
// about kMaxRangesPerBlock ranges at most, which bounds the dQ partials to that many float
// copies of the block's dQ however many threads there are.
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kMaxRangesPerBlock = 16;
// dQ sums at most this many key tiles, and dK and dV this many query tiles (4096 of either),
// in plain float before the sum is added, compensated, to a running total: a plain float sum
// over a whole long block stops growing once it passes 2^24 times its terms.
constexpr int kKeyTilesPerSum = 32;
constexpr int kQueryTilesPerSum = 64;

// Keys [key_begin, key_end) (block-local) of block `block` for one (batch, kv head).
struct WorkItem {
  int batch;
  int kv_head;
  int block;
  int key_begin;
  int key_end;
  int range;  // index of this key range within the block
  int64_t cost;
};

// The query rows [begin, end) (block-local, from a query tile's start to a tile's end or the
// block's) whose dQ a key range of a split block writes, and where its partial starts:
// [batch][head][row - begin][dim].
struct QuerySpan {
  int begin;
  int end;
  int64_t offset;
};

// Where dQ goes: straight into grad_q for blocks kept whole, else into per-range partials.
struct QueryGradTarget {
  std::vector<int> ranges;                    // key ranges per block
  std::vector<std::vector<QuerySpan>> spans;  // per block, per range; empty for whole blocks
  int64_t partial_size = 0;

  bool whole(int block) const { return spans[block].empty(); }
};

// The query tiles that see keys [key_begin, key_end) of block e: from a tile start to the end of
// the last one.
inline QuerySpan query_span(const BlockExtent& e, const KeyWindow& window, int key_begin,
                            int key_end) {
  const int begin = window_query_begin(key_begin, e.len_q, e.len_k, window) / kBlockM * kBlockM;
  const int last = window_query_end(key_end - 1, e.len_q, e.len_k, window);
  if (last <= begin) return {begin, begin, 0};
  const int64_t tiles = (static_cast<int64_t>(last) - begin + kBlockM - 1) / kBlockM;
  return {begin, static_cast<int>(std::min<int64_t>(begin + tiles * kBlockM, e.len_q)), 0};
}

template <typename scalar_t>
struct BackwardScratch {
  using acc = acc_t<scalar_t>;
  BackwardScratch(int dim, int max_range_keys)
      : padded_dim(padded<acc>(dim)),
        products(dim, max_range_keys),
        grad_q(kBlockM * padded_dim),
        grad_q_total(kBlockM * padded_dim),
        grad_q_compensation(kBlockM * padded_dim),
        scores_t(kBlockN * kBlockM),
        grad_scores_t(kBlockN * kBlockM),
        lse(kBlockM),
        delta(kBlockM),
        grad_k(static_cast<int64_t>(max_range_keys) * padded_dim),
        grad_v(static_cast<int64_t>(max_range_keys) * padded_dim) {}
  int padded_dim;
  BackwardProducts<scalar_t, kBlockM, kBlockN> products;
  // dQ of one query tile (kBlockM × padded_dim), and the compensated total of its earlier keys.
  AlignedBuffer<acc> grad_q, grad_q_total, grad_q_compensation;
  // Transposed score tiles, keys × queries: S then P, and dP then dS.
  AlignedBuffer<acc> scores_t, grad_scores_t;
  // Per query of the tile: lse (+inf where the query saw no key, so that P = 0) and Delta.
  AlignedBuffer<acc> lse, delta;
  // dK and dV of the item's key range.
  AlignedBuffer<acc> grad_k, grad_v;
  // Compensated totals of dK and dV over earlier query tiles (total, compensation, each range
  // keys × padded_dim), sized when a range first needs them: most blocks never do.
  std::vector<acc> grad_kv_totals;
  AlibiLanes<acc> alibi;
  // Dropout: the query tile's counter words and the factors of the current key tile.
  DropoutLanes dropout_lanes;
  AlignedBuffer<acc> dropout_factors = AlignedBuffer<acc>(kBlockN * kBlockM);
};

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
      delta[i] = dot_row(o, g, p.head_dim) -
                 (p.grad_lse ? static_cast<const acc*>(p.grad_lse)[i] : acc(0));
    }
  });
  return delta;
}

// Turns the transposed scores of one tile pair into P = exp(s − lse) and the score gradient
// dS = P ∘ (dP − Delta) · ds/dS (in grad_scores_t, which holds dPᵀ on entry), where s is the
// score after scaling and the variants: ds/dS = scale, times 1 − tanh² under a softcap. With
// dropout factors Z (dropout_t, else nullptr) dP becomes Z ∘ dP and scores_t gets Z ∘ P (what dV
// needs), else P. Keys [k0, k0 + cols) and queries [q0, q0 + rows) are block-local; `lanes` is
// rows rounded up to whole vectors. kSoftcap, kAlibi: what the variants transform.
template <typename acc, bool kSoftcap, bool kAlibi>
void probabilities_and_score_grads(const BlockExtent& e, const KeyWindow& window,
                                   const TileVariants<acc>& variants, int q0, int rows, int lanes,
                                   int k0, int cols, acc* scores_t, acc* grad_scores_t,
                                   const acc* lse, const acc* delta, const acc* dropout_t) {
  using Vec = at::vec::Vectorized<acc>;
  constexpr int W = kVecWidth<acc>;
  const Vec scale(variants.scale);
  for (int c = 0; c < cols; ++c) {
    acc* s = scores_t + c * kBlockM;
    acc* ds = grad_scores_t + c * kBlockM;
    // Queries outside [first, end) (tile-local) may not see key k0 + c.
    int first = 0, end = kBlockM;
    if (window.masks()) {
      first = std::clamp(window_query_begin(k0 + c, e.len_q, e.len_k, window) - q0, 0, rows);
      const int end_row =
          std::clamp(window_query_end(k0 + c, e.len_q, e.len_k, window) - q0, 0, rows);
      end = end_row == rows ? kBlockM : end_row;
    }
    // kVecs lane vectors at a time: their exp (and tanh) chains are independent, and the core
    // overlaps them only when they stand close together in the instruction stream.
    auto lane_vectors = [&](auto count, int v0) {
      constexpr int kVecs = decltype(count)::value;
      Vec prob[kVecs], slope[kVecs];
#pragma GCC unroll 4
      for (int j = 0; j < kVecs; ++j) {
        const int v = v0 + j * W;
        if constexpr (kSoftcap || kAlibi) {
          const Vec score = transformed_score<acc, kSoftcap, kAlibi>(Vec::loadu(s + v), variants, c,
                                                                     v, &slope[j]);
          prob[j] = vec_exp<acc>(score - Vec::loadu(lse + v));
        } else {
          slope[j] = scale;
          prob[j] = vec_exp<acc>(at::vec::fmadd(Vec::loadu(s + v), scale, -Vec::loadu(lse + v)));
        }
      }
#pragma GCC unroll 4
      for (int j = 0; j < kVecs; ++j) {
        const int v = v0 + j * W;
        if (first > v || end < v + W) {
          prob[j] = Vec::blendv(prob[j], Vec(0), outside_lanes<acc>(v, first, end));
        }
        Vec grad = Vec::loadu(ds + v);
        if (dropout_t != nullptr) {
          const Vec kept = Vec::loadu(dropout_t + c * kBlockM + v);
          grad = grad * kept;
          (prob[j] * kept).store(s + v);
        } else {
          prob[j].store(s + v);
        }
        (prob[j] * (grad - Vec::loadu(delta + v)) * slope[j]).store(ds + v);
      }
    };
    constexpr int kGroup = 4;
    int v0 = 0;
    for (; v0 + kGroup * W <= lanes; v0 += kGroup * W) {
      lane_vectors(std::integral_constant<int, kGroup>(), v0);
    }
    for (; v0 < lanes; v0 += W) lane_vectors(std::integral_constant<int, 1>(), v0);
  }
}

// Loads query tile [q0, q0 + rows) of one head: Q and dO into the products, lse and Delta.
template <typename scalar_t>
void load_query_tile(const BackwardParams& p, const std::vector<acc_t<scalar_t>>& delta, int batch,
                     int head, const BlockExtent& e, int q0, int rows,
                     BackwardScratch<scalar_t>& t) {
  using acc = acc_t<scalar_t>;
  const int64_t row = e.q_start + q0;
  const auto* q = static_cast<const scalar_t*>(p.q) + batch * p.q_batch_stride +
                  head * p.q_head_stride + row * p.q_row_stride;
  const auto* grad_out = static_cast<const scalar_t*>(p.grad_out) +
                         batch * p.grad_out_batch_stride + head * p.grad_out_head_stride +
                         row * p.grad_out_row_stride;
  t.products.load_queries({q, p.q_row_stride}, {grad_out, p.grad_out_row_stride}, rows);
  const int64_t stat = (static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q + row;
  const acc* lse = static_cast<const acc*>(p.lse) + stat;
  for (int r = 0; r < kBlockM; ++r) {
    const bool seen = r < rows && lse[r] != -kInf<acc>;
    t.lse.get()[r] = seen ? lse[r] : kInf<acc>;  // exp(s - inf) = 0 for unseen/padding queries
    t.delta.get()[r] = r < rows ? delta[stat + r] : acc(0);
  }
}

template <typename scalar_t>
void backward_item(const BackwardParams& p, const std::vector<acc_t<scalar_t>>& delta,
                   const WorkItem& item, const QueryGradTarget& target, acc_t<scalar_t>* partials,
                   BackwardScratch<scalar_t>& t) {
  using acc = acc_t<scalar_t>;
  const int dim = p.head_dim;
  const int ld = t.padded_dim;
  const int group = p.heads_q / p.heads_kv;
  const BlockExtent e = block_extent(p, item.block);
  const int range_keys = item.key_end - item.key_begin;
  const int64_t key_row = e.k_start + item.key_begin;

  t.products.load_keys({static_cast<const scalar_t*>(p.k) + item.batch * p.k_batch_stride +
                            item.kv_head * p.k_head_stride + key_row * p.k_row_stride,
                        p.k_row_stride},
                       {static_cast<const scalar_t*>(p.v) + item.batch * p.v_batch_stride +
                            item.kv_head * p.v_head_stride + key_row * p.v_row_stride,
                        p.v_row_stride},
                       range_keys);
  fill<acc>(t.grad_k.get(), static_cast<int64_t>(range_keys) * ld, 0);
  fill<acc>(t.grad_v.get(), static_cast<int64_t>(range_keys) * ld, 0);

  const int64_t range_size = static_cast<int64_t>(range_keys) * ld;
  int query_tiles_in_grads = 0;  // query tiles summed into grad_k/grad_v since their last add
  bool has_key_totals = false;
  acc* kv_totals = nullptr;  // dK total, its compensation, dV total, its compensation

  // A block kept whole writes the dQ of all its queries (zeros where they see none of its keys);
  // the ranges of a split block visit only the query tiles that see them, their span.
  const KeyWindow window = key_window(p, e);
  const bool whole_block = target.whole(item.block);
  const QuerySpan span =
      whole_block ? QuerySpan{0, e.len_q, 0} : target.spans[item.block][item.range];
  // Key rows (range-local) summed into grad_k/grad_v since their last move into the totals.
  int touched_begin = range_keys, touched_end = 0;
  // A window bounding every key's queries to what one plain sum takes needs no totals at all.
  const int64_t queries_per_key = window.left + window.right + 1;
  const bool few_terms_per_key = window.left >= 0 && window.right >= 0 &&
                                 group * queries_per_key <= kQueryTilesPerSum * kBlockM;
  const TileVariants<acc> variants(p.scale, p.softcap,
                                   p.alibi_slopes != nullptr ? &t.alibi : nullptr);
  const bool dropout = p.dropout_seed_offset != nullptr;
  const acc* dropout_t = dropout ? t.dropout_factors.get() : nullptr;
  for (int g = 0; g < group; ++g) {
    const int head = item.kv_head * group + g;
    for (int q0 = span.begin; q0 < span.end; q0 = tile_end(q0, span.end, kBlockM)) {
      const int rows = std::min(kBlockM, e.len_q - q0);
      const int lanes = padded<acc>(rows);
      // Key tiles start an even number of keys into the range (bf16 products take key pairs).
      const int window_begin =
          std::max(item.key_begin, window_key_begin(q0, e.len_q, e.len_k, window));
      const int key_start = item.key_begin + ((window_begin - item.key_begin) & ~1);
      const int key_limit =
          std::min(item.key_end, window_key_end(q0 + rows - 1, e.len_q, e.len_k, window));
      fill<acc>(t.grad_q.get(), static_cast<int64_t>(rows) * ld, 0);
      if (key_limit > key_start) {
        touched_begin = std::min(touched_begin, key_start - item.key_begin);
        touched_end = std::max(touched_end, key_limit - item.key_begin);
        load_query_tile<scalar_t>(p, delta, item.batch, head, e, q0, rows, t);
        if (dropout)
          fill_dropout_lanes(p, item.batch, head, 1, e.q_start + q0, rows, t.dropout_lanes);
      }
      int tiles_in_grad_q = 0;  // key tiles summed into grad_q since its last add
      bool has_query_total = false;
      for (int k0 = key_start; k0 < key_limit; k0 = tile_end(k0, key_limit, kBlockN)) {
        const int cols = std::min(kBlockN, key_limit - k0);
        const int key = k0 - item.key_begin;  // within the range
        t.products.scores(key, cols, lanes, t.scores_t.get(), t.grad_scores_t.get());
        if (variants.alibi != nullptr) {
          fill_alibi_lanes<acc>(p, e, item.batch, head, 1, q0, rows, k0, t.alibi);
        }
        if (dropout) {
          dropout_factors<acc>(p, t.dropout_lanes, e.k_start + k0, cols, lanes,
                               t.dropout_factors.get());
        }
        with_score_transforms(variants, [&](auto softcap, auto alibi) {
          probabilities_and_score_grads<acc, decltype(softcap)::value, decltype(alibi)::value>(
              e, window, variants, q0, rows, lanes, k0, cols, t.scores_t.get(),
              t.grad_scores_t.get(), t.lse.get(), t.delta.get(), dropout_t);
        });
        t.products.accumulate_grads(key, cols, rows, t.scores_t.get(), t.grad_scores_t.get(),
                                    t.grad_v.get(), t.grad_k.get(), t.grad_q.get());
        if (++tiles_in_grad_q == kKeyTilesPerSum && tile_end(k0, key_limit, kBlockN) < key_limit) {
          const int64_t size = static_cast<int64_t>(rows) * ld;
          if (!has_query_total) {
            fill<acc>(t.grad_q_total.get(), size, 0);
            fill<acc>(t.grad_q_compensation.get(), size, 0);
            has_query_total = true;
          }
          move_into_compensated(t.grad_q.get(), size, t.grad_q_total.get(),
                                t.grad_q_compensation.get());
          tiles_in_grad_q = 0;
        }
      }
      if (has_query_total) {
        finish_compensated(t.grad_q.get(), static_cast<int64_t>(rows) * ld, t.grad_q_total.get(),
                           t.grad_q_compensation.get());
      }
      if (key_limit > key_start && !few_terms_per_key &&
          ++query_tiles_in_grads == kQueryTilesPerSum) {
        if (!has_key_totals) {
          if (static_cast<int64_t>(t.grad_kv_totals.size()) < 4 * range_size) {
            t.grad_kv_totals.resize(4 * range_size);
          }
          kv_totals = t.grad_kv_totals.data();
          fill<acc>(kv_totals, 4 * range_size, 0);
          has_key_totals = true;
        }
        // Only the rows touched since the last move hold anything (a window touches few).
        const int64_t first = static_cast<int64_t>(touched_begin) * ld;
        const int64_t size = static_cast<int64_t>(touched_end - touched_begin) * ld;
        for (int side = 0; side < 2; ++side) {
          acc* grads = side == 0 ? t.grad_k.get() : t.grad_v.get();
          acc* totals = kv_totals + 2 * side * range_size;
          move_into_compensated(grads + first, size, totals + first, totals + range_size + first);
        }
        touched_begin = range_keys;
        touched_end = 0;
        query_tiles_in_grads = 0;
      }
      const int64_t q_row = e.q_start + q0;
      if (whole_block) {
        unpack_rows<scalar_t>(t.grad_q.get(), ld, rows, dim, nullptr,
                              static_cast<scalar_t*>(p.grad_q) +
                                  item.batch * p.grad_q_batch_stride + head * p.grad_q_head_stride +
                                  q_row * p.grad_q_row_stride,
                              p.grad_q_row_stride);
      } else {
        const int64_t span_rows = span.end - span.begin;
        acc* partial =
            partials + span.offset +
            ((static_cast<int64_t>(item.batch) * p.heads_q + head) * span_rows + q0 - span.begin) *
                dim;
        for (int r = 0; r < rows; ++r) {
          std::copy_n(t.grad_q.get() + r * ld, dim, partial + static_cast<int64_t>(r) * dim);
        }
      }
    }
  }
  if (has_key_totals) {
    finish_compensated(t.grad_k.get(), range_size, kv_totals, kv_totals + range_size);
    finish_compensated(t.grad_v.get(), range_size, kv_totals + 2 * range_size,
                       kv_totals + 3 * range_size);
  }
  unpack_rows<scalar_t>(t.grad_k.get(), ld, range_keys, dim, nullptr,
                        static_cast<scalar_t*>(p.grad_k) + item.batch * p.grad_k_batch_stride +
                            item.kv_head * p.grad_k_head_stride + key_row * p.grad_k_row_stride,
                        p.grad_k_row_stride);
  unpack_rows<scalar_t>(t.grad_v.get(), ld, range_keys, dim, nullptr,
                        static_cast<scalar_t*>(p.grad_v) + item.batch * p.grad_v_batch_stride +
                            item.kv_head * p.grad_v_head_stride + key_row * p.grad_v_row_stride,
                        p.grad_v_row_stride);
}

// Work of key tile [k0, k0 + cols): the queries that see any of its keys times its keys.
int64_t key_tile_cost(const BlockExtent& e, int k0, int cols, const KeyWindow& window) {
  const int queries = window_query_end(k0 + cols - 1, e.len_q, e.len_k, window) -
                      window_query_begin(k0, e.len_q, e.len_k, window);
  return static_cast<int64_t>(cols) * std::max(queries, 0);
}

// Splits blocks into key ranges of at most `max_cost` work (whole blocks when it is 0) and lists
// the items, costliest first.
std::vector<WorkItem> make_work_items(const BackwardParams& p, int64_t max_cost,
                                      QueryGradTarget& target) {
  std::vector<WorkItem> ranges;  // for batch 0, kv head 0
  target.ranges.assign(p.num_blocks, 0);
  target.spans.assign(p.num_blocks, {});
  for (int j = 0; j < p.num_blocks; ++j) {
    const BlockExtent e = block_extent(p, j);
    const KeyWindow window = key_window(p, e);
    WorkItem current{0, 0, j, 0, 0, 0, 0};
    for (int k0 = 0; k0 < e.len_k; k0 = tile_end(k0, e.len_k, kBlockN)) {
      const int cols = std::min(kBlockN, e.len_k - k0);
      const int64_t cost = key_tile_cost(e, k0, cols, window);
      if (max_cost > 0 && current.key_end > current.key_begin && current.cost + cost > max_cost) {
        ranges.push_back(current);
        current = {0, 0, j, k0, k0, current.range + 1, 0};
      }
      current.key_end = k0 + cols;
      current.cost += cost;
    }
    if (e.len_k > 0) ranges.push_back(current);
    target.ranges[j] = e.len_k > 0 ? current.range + 1 : 0;
    if (target.ranges[j] > 1) {
      for (auto r = ranges.end() - target.ranges[j]; r != ranges.end(); ++r) {
        QuerySpan span = query_span(e, window, r->key_begin, r->key_end);
        span.offset = target.partial_size;
        target.partial_size +=
            static_cast<int64_t>(span.end - span.begin) * p.batch * p.heads_q * p.head_dim;
        target.spans[j].push_back(span);
      }
    }
  }
  // Head by head, in sequence order within a head: among items of equal cost (which keep this
  // order), a thread's next item reads the rows after its last one.
  std::vector<WorkItem> items;
  items.reserve(ranges.size() * p.batch * p.heads_kv);
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.heads_kv; ++h) {
      for (const WorkItem& r : ranges) {
        WorkItem item = r;
        item.batch = b;
        item.kv_head = h;
        items.push_back(item);
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return items;
}

// Largest item cost for the planned thread count: 0 (blocks kept whole) when one thread, or when
// whole blocks are already small against a thread's share. The split depends on that count, so
// results are bitwise repeatable for a given count (any count in deterministic mode).
int64_t max_item_cost(const BackwardParams& p) {
  const int64_t threads = planning_threads();
  if (threads <= 1) return 0;
  int64_t total = 0, largest = 0;
  for (int j = 0; j < p.num_blocks; ++j) {
    const BlockExtent e = block_extent(p, j);
    int64_t block = 0;
    for (int k0 = 0; k0 < e.len_k; k0 = tile_end(k0, e.len_k, kBlockN)) {
      block += key_tile_cost(e, k0, std::min(kBlockN, e.len_k - k0), key_window(p, e));
    }
    total += block * p.batch * p.heads_kv;
    largest = std::max(largest, block);
  }
  const int64_t limit =
      std::max({int64_t(1), total / (threads * kItemsPerThread), largest / kMaxRangesPerBlock});
  return largest > limit ? limit : 0;
}

// dQ rows of blocks without keys get no item: they are zero.
template <typename scalar_t>
void zero_query_grads_of_keyless_blocks(const BackwardParams& p) {
  for (int j = 0; j < p.num_blocks; ++j) {
    const BlockExtent e = block_extent(p, j);
    if (e.len_k > 0) continue;
    for (int b = 0; b < p.batch; ++b) {
      for (int h = 0; h < p.heads_q; ++h) {
        auto* dq = static_cast<scalar_t*>(p.grad_q) + b * p.grad_q_batch_stride +
                   h * p.grad_q_head_stride + e.q_start * p.grad_q_row_stride;
        for (int r = 0; r < e.len_q; ++r) {
          std::fill_n(dq + r * p.grad_q_row_stride, p.head_dim, scalar_t(0));
        }
      }
    }
  }
}

// grad_q of split blocks = the sum of their ranges' partials, in range order (rows outside
// every span see no key: zero). Split over chunks of rows too: a single long block's sum is
// otherwise one thread's work while the others wait.
template <typename scalar_t>
void reduce_query_grad_partials(const BackwardParams& p, const QueryGradTarget& target,
                                const acc_t<scalar_t>* partials) {
  using acc = acc_t<scalar_t>;
  constexpr int kChunkRows = 256;
  struct Chunk {
    int block;
    int row_begin;
  };
  std::vector<Chunk> chunks;
  for (int j = 0; j < p.num_blocks; ++j) {
    if (target.whole(j)) continue;
    const int len_q = block_extent(p, j).len_q;
    for (int r = 0; r < len_q; r = tile_end(r, len_q, kChunkRows)) chunks.push_back({j, r});
  }
  const int64_t heads = static_cast<int64_t>(p.batch) * p.heads_q;
  at::parallel_for(
      0, static_cast<int64_t>(chunks.size()) * heads, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc> sum(p.head_dim);
        for (int64_t i = begin; i < end; ++i) {
          const Chunk& chunk = chunks[i / heads];
          const int64_t batch_head = i % heads;
          const int b = static_cast<int>(batch_head / p.heads_q);
          const int h = static_cast<int>(batch_head % p.heads_q);
          const BlockExtent e = block_extent(p, chunk.block);
          auto* dq = static_cast<scalar_t*>(p.grad_q) + b * p.grad_q_batch_stride +
                     h * p.grad_q_head_stride + e.q_start * p.grad_q_row_stride;
          const int row_end = std::min(e.len_q, chunk.row_begin + kChunkRows);
          for (int r = chunk.row_begin; r < row_end; ++r) {
            std::fill(sum.begin(), sum.end(), acc(0));
            for (const QuerySpan& span : target.spans[chunk.block]) {
              if (r < span.begin || r >= span.end) continue;
              const int64_t span_rows = span.end - span.begin;
              const acc* row =
                  partials + span.offset + (batch_head * span_rows + r - span.begin) * p.head_dim;
              for (int d = 0; d < p.head_dim; ++d) sum[d] += row[d];
            }
            unpack_rows<scalar_t>(sum.data(), p.head_dim, 1, p.head_dim, nullptr,
                                  dq + r * p.grad_q_row_stride, p.grad_q_row_stride);
          }
        }
      });
}

}  // namespace

template <typename scalar_t>
void run_backward(const BackwardParams& p) {
  using acc = acc_t<scalar_t>;
  check_host_offsets(p.cu_seqlens_q, p.num_blocks, p.seqlen_q, "cu_seqlens_q");
  check_host_offsets(p.cu_seqlens_k, p.num_blocks, p.seqlen_k, "cu_seqlens_k");
  const std::vector<acc> delta = compute_delta<scalar_t>(p);

  QueryGradTarget target;
  const std::vector<WorkItem> items = make_work_items(p, max_item_cost(p), target);
  int max_range_keys = 1;
  for (const WorkItem& item : items) {
    max_range_keys = std::max(max_range_keys, item.key_end - item.key_begin);
  }
  // Every row of every span is written by its range's item: no need to clear it first.
  const std::unique_ptr<acc[]> partials(new acc[target.partial_size]);

  zero_query_grads_of_keyless_blocks<scalar_t>(p);
  zero_gradient_rows_after_blocks<scalar_t>(p);
  run_work_items(
      static_cast<int64_t>(items.size()),
      [&] { return BackwardScratch<scalar_t>(p.head_dim, max_range_keys); },
      [&](int64_t i, BackwardScratch<scalar_t>& scratch) {
        backward_item<scalar_t>(p, delta, items[i], target, partials.get(), scratch);
      });
  reduce_query_grad_partials<scalar_t>(p, target, partials.get());
}

template void run_backward<float>(const BackwardParams&);
template void run_backward<double>(const BackwardParams&);
template void run_backward<c10::BFloat16>(const BackwardParams&);
template void run_backward<c10::Half>(const BackwardParams&);

}  // namespace block_attn::cpu
