// CPU forward: FlashAttention-style online softmax over the key tiles of each query tile's
// own block; tiles outside the causal mask or the sliding window are never visited.
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
#include "dropout_tile.h"
#include "few_query_scores.h"
#include "forward_key_split.h"
#include "forward_products.h"
#include "rows_outside_blocks.h"
#include "score_variants.h"
#include "tile_math.h"
#include "tile_schedule.h"
#include "work_queue.h"

namespace block_attn::cpu {
namespace {

// 64 queries are the vector lanes of the transposed scores (4 AVX-512 vectors, the register
// tile's width). 256 keys per tile amortise the online-softmax rescaling of the output and the
// per-tile packing; a 64×256 score tile (64 KB) and the K and V tiles stay in L2.
constexpr int kBlockM = kTileLanes;
constexpr int kBlockN = 256;
constexpr int64_t kTilesPerTake = 4;
// Where K and V are converted to float for the products, neighbouring tiles taken together share
// one conversion of their keys.
constexpr int64_t kConvertedTilesPerTake = 8;
// A query's output sums at most this many key tiles (4096 keys) in plain float before the sum
// is added, compensated, to its running total: a plain float sum over a whole long row stops
// growing once it passes 2^24 times its terms. Rows of up to that many tiles never add.
constexpr int kTilesPerSum = 16;

template <typename scalar_t>
struct ForwardScratch {
  using acc = acc_t<scalar_t>;
  explicit ForwardScratch(int dim)
      : padded_dim(padded<acc>(dim)),
        products(dim),
        storage(kBlockN * kBlockM + 3 * kBlockM * padded_dim + 5 * kBlockM),
        gathered_queries(static_cast<int64_t>(kBlockM) * dim),
        query_rows(static_cast<int64_t>(kFewQueries) * padded_dim) {
    scores_t = storage.get();
    out = scores_t + kBlockN * kBlockM;
    row_max = out + kBlockM * padded_dim;
    row_sum = row_max + kBlockM;
    correction = row_sum + kBlockM;
    inverse_sum = correction + kBlockM;
    sum_compensation = inverse_sum + kBlockM;
    out_total = sum_compensation + kBlockM;
    out_compensation = out_total + kBlockM * padded_dim;
  }
  int padded_dim;
  ForwardProducts<scalar_t, kBlockM, kBlockN> products;
  AlignedBuffer<acc> storage;
  AlignedBuffer<scalar_t> gathered_queries;  // query rows of several heads, lane order
  AlignedBuffer<acc> query_rows;             // a few queries' rows for few_query_scores
  acc *scores_t, *out, *row_max, *row_sum, *correction, *inverse_sum;
  // Compensated running totals: of row_sum, and of `out` over the key tiles summed before.
  acc *sum_compensation, *out_total, *out_compensation;
  // The window's lane interval of each key of a tile, and the tile's ALiBi lanes.
  std::vector<int> first_lane = std::vector<int>(kBlockN);
  std::vector<int> end_lane = std::vector<int>(kBlockN);
  AlibiLanes<acc> alibi;
  // Dropout: the tile's counter words and the factors of its current key tile.
  DropoutLanes dropout_lanes;
  AlignedBuffer<acc> dropout_factors = AlignedBuffer<acc>(kBlockN * kBlockM);
};

// Scales, transforms (softcap, ALiBi), masks, exponentiates and sums one transposed score tile
// (cols keys × `lanes` queries, row stride kBlockM) against the running maxima and sums of the
// queries. Leaves P in scores_t and each query's output rescaling factor in `correction`. Each
// tile's sum is added to row_sum compensated (sum_compensation), so long rows keep the sum's
// precision. kSoftcap, kAlibi: what the variants transform (plain tiles skip their code).
template <typename acc, bool kSoftcap, bool kAlibi>
void online_softmax_tile(int cols, int lanes, const TileVariants<acc>& variants, acc* scores_t,
                         acc* row_max, acc* row_sum, acc* sum_compensation, acc* correction) {
  using Vec = at::vec::Vectorized<acc>;
  constexpr int W = kVecWidth<acc>;
  for (int v0 = 0; v0 < lanes; v0 += W) {
    const Vec old_max = Vec::loadu(row_max + v0);
    Vec new_max = old_max;
    for (int t = 0; t < cols; ++t) {
      acc* s = scores_t + t * kBlockM + v0;
      Vec scaled =
          transformed_score<acc, kSoftcap, kAlibi>(Vec::loadu(s), variants, t, v0, nullptr);
      if (variants.first_lane != nullptr &&
          (variants.first_lane[t] > v0 || variants.end_lane[t] < v0 + W)) {
        scaled = Vec::blendv(scaled, Vec(-kInf<acc>),
                             outside_lanes<acc>(v0, variants.first_lane[t], variants.end_lane[t]));
      }
      scaled.store(s);
      new_max = at::vec::maximum(new_max, scaled);
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
    const Vec old_sum = Vec::loadu(row_sum + v0) * factor;
    Vec total = old_sum + sum;
    (Vec::loadu(sum_compensation + v0) * factor + addition_error(old_sum, sum, total))
        .store(sum_compensation + v0);
    // A NaN score must stay visible: the clamped exp would turn it into a finite value.
    total = Vec::blendv(total, Vec(std::numeric_limits<acc>::quiet_NaN()), new_max != new_max);
    total.store(row_sum + v0);
    new_max.store(row_max + v0);
    factor.store(correction + v0);
  }
}

// Writes lane `lane` of a tile of `heads` query heads from `head` (lane = row · heads + head
// offset): its lse, and its output row `values` (dim values) times `factor`.
template <typename scalar_t>
void write_lane(const ForwardParams& p, int batch, int head, int heads, const BlockExtent& e,
                const Tile& tile, int lane, const acc_t<scalar_t>* values,
                const acc_t<scalar_t>* factor, acc_t<scalar_t> lse) {
  const int h = head + lane % heads;
  const int64_t row = e.q_start + tile.begin + lane / heads;
  static_cast<acc_t<scalar_t>*>(
      p.lse)[(static_cast<int64_t>(batch) * p.heads_q + h) * p.seqlen_q + row] = lse;
  auto* out = static_cast<scalar_t*>(p.out) + batch * p.out_batch_stride + h * p.out_head_stride +
              row * p.out_row_stride;
  unpack_rows(values, p.head_dim, 1, p.head_dim, factor, out, p.out_row_stride);
}

// One query tile of `heads` consecutive query heads that share a kv head, starting at `head`.
// Its lanes are (row, head) pairs, lane = row · heads + head offset: the heads read each K and V
// tile once, and a tile of few rows (decoding, short chunks) fills more of its vector lanes.
// The lanes that may see a key stay an interval: the rows its window reaches. Keys
// [keys.begin, keys.end) of the block only; with a `partial` slot the unnormalised results go
// there for merge_key_ranges instead of to out/lse.
template <typename scalar_t>
void forward_tile(const ForwardParams& p, int batch, int head, int heads, const Tile& tile,
                  KeyRange keys, acc_t<scalar_t>* partial, ForwardScratch<scalar_t>& t) {
  using acc = acc_t<scalar_t>;
  const int dim = p.head_dim;
  const int ld = t.padded_dim;
  const BlockExtent e = block_extent(p, tile.block);
  const int rows = tile.end - tile.begin;
  const int used = rows * heads;
  const int lanes = padded<acc>(used);
  const int kv_head = head / (p.heads_q / p.heads_kv);

  const auto* q = static_cast<const scalar_t*>(p.q) + batch * p.q_batch_stride +
                  head * p.q_head_stride + (e.q_start + tile.begin) * p.q_row_stride;
  const auto* k = static_cast<const scalar_t*>(p.k) + batch * p.k_batch_stride +
                  kv_head * p.k_head_stride + e.k_start * p.k_row_stride;
  const auto* v = static_cast<const scalar_t*>(p.v) + batch * p.v_batch_stride +
                  kv_head * p.v_head_stride + e.k_start * p.v_row_stride;

  auto query_row = [&](int lane) {
    return q + (lane % heads) * p.q_head_stride + (lane / heads) * p.q_row_stride;
  };
  const bool few = used <= kFewQueries;
  const KeyWindow window = key_window(p, e);
  const int key_begin =
      std::max(keys.begin, window_key_begin(tile.begin, e.len_q, e.len_k, window));
  const int key_end = std::min(keys.end, window_key_end(tile.end - 1, e.len_q, e.len_k, window));
  TileVariants<acc> variants(p.scale, p.softcap, p.alibi_slopes != nullptr ? &t.alibi : nullptr);
  if (window.masks()) {
    variants.first_lane = t.first_lane.data();
    variants.end_lane = t.end_lane.data();
  }
  if (!few) {
    // Q is packed next and K and V are read right after: ask for all three tiles at once, so
    // that their first reads from memory overlap instead of each stalling in turn (the
    // few-query path prefetches its own keys as it goes).
    const int first_keys = std::clamp(key_end - key_begin, 0, kBlockN);
    for (int h = 0; h < heads; ++h) {
      prefetch_rows(q + h * p.q_head_stride, p.q_row_stride, rows, dim);
    }
    prefetch_rows(k + key_begin * p.k_row_stride, p.k_row_stride, first_keys, dim);
    prefetch_rows(v + key_begin * p.v_row_stride, p.v_row_stride, first_keys, dim);
  }
  if (few) {
    t.products.drop_kept_keys();  // a few queries read K rows as they are
    for (int lane = 0; lane < used; ++lane) {
      pack_rows(query_row(lane), 0, 1, dim, t.query_rows.get() + lane * ld, ld);
    }
  } else {
    t.products.keep_keys(k, p.k_row_stride, v, p.v_row_stride, key_begin, key_end);
    if (heads == 1) {
      t.products.load_queries(q, p.q_row_stride, rows);
    } else {
      scalar_t* gathered = t.gathered_queries.get();
      for (int lane = 0; lane < used; ++lane) {
        std::copy(query_row(lane), query_row(lane) + dim,
                  gathered + static_cast<int64_t>(lane) * dim);
      }
      t.products.load_queries(gathered, dim, used);
    }
  }
  const bool dropout = p.dropout_seed_offset != nullptr;
  if (dropout) {
    fill_dropout_lanes(p, batch, head, heads, e.q_start + tile.begin, used, t.dropout_lanes);
  }
  fill<acc>(t.out, static_cast<int64_t>(used) * ld, 0);
  fill<acc>(t.row_max, kBlockM, -kInf<acc>);
  fill<acc>(t.row_sum, kBlockM, 0);
  fill<acc>(t.sum_compensation, kBlockM, 0);
  int tiles_in_out = 0;    // key tiles summed into t.out since it was last added to out_total
  bool has_total = false;  // out_total holds earlier tiles' sum

  for (int k0 = key_begin; k0 < key_end; k0 = tile_end(k0, key_end, kBlockN)) {
    const int cols = std::min(kBlockN, key_end - k0);
    // Sᵀ = K · Qᵀ: keys × queries.
    if (few) {
      const KeyValueRows<scalar_t> rows_now{k + k0 * p.k_row_stride, p.k_row_stride,
                                            v + k0 * p.v_row_stride, p.v_row_stride};
      few_query_scores(rows_now, cols, dim, t.query_rows.get(), ld, used, lanes, t.scores_t,
                       kBlockM);
    } else {
      t.products.scores(k + k0 * p.k_row_stride, p.k_row_stride, k0, cols, lanes, t.scores_t);
    }
    if (window.masks()) {
      for (int c = 0; c < cols; ++c) {
        const int first_row =
            std::clamp(window_query_begin(k0 + c, e.len_q, e.len_k, window) - tile.begin, 0, rows);
        const int end_row =
            std::clamp(window_query_end(k0 + c, e.len_q, e.len_k, window) - tile.begin, 0, rows);
        t.first_lane[c] = first_row * heads;
        // Padding lanes are never read: leave them unmasked when every row may see the key.
        t.end_lane[c] = end_row == rows ? kBlockM : end_row * heads;
      }
    }
    if (variants.alibi != nullptr) {
      fill_alibi_lanes<acc>(p, e, batch, head, heads, tile.begin, used, k0, t.alibi);
    }
    with_score_transforms(variants, [&](auto softcap, auto alibi) {
      online_softmax_tile<acc, decltype(softcap)::value, decltype(alibi)::value>(
          cols, lanes, variants, t.scores_t, t.row_max, t.row_sum, t.sum_compensation,
          t.correction);
    });
    for (int r = 0; r < used; ++r) {
      if (t.correction[r] == acc(1)) continue;
      scale_in_place(t.out + r * ld, ld, t.correction[r]);
      if (has_total) {
        scale_in_place(t.out_total + r * ld, ld, t.correction[r]);
        scale_in_place(t.out_compensation + r * ld, ld, t.correction[r]);
      }
    }
    if (dropout) {
      // The sums above are of the probabilities before dropout: the normaliser is unchanged.
      dropout_factors<acc>(p, t.dropout_lanes, e.k_start + k0, cols, lanes,
                           t.dropout_factors.get());
      multiply_in_place(t.scores_t, t.dropout_factors.get(), cols * kBlockM);
    }
    // O += P · V.
    t.products.accumulate_values(t.scores_t, v + k0 * p.v_row_stride, p.v_row_stride, k0, cols,
                                 used, t.out);
    if (++tiles_in_out == kTilesPerSum && tile_end(k0, key_end, kBlockN) < key_end) {
      const int64_t size = static_cast<int64_t>(used) * ld;
      if (!has_total) {
        fill<acc>(t.out_total, size, 0);
        fill<acc>(t.out_compensation, size, 0);
        has_total = true;
      }
      move_into_compensated(t.out, size, t.out_total, t.out_compensation);
      tiles_in_out = 0;
    }
  }
  if (has_total) {
    finish_compensated(t.out, static_cast<int64_t>(used) * ld, t.out_total, t.out_compensation);
  }
  for (int lane = 0; lane < used; ++lane) t.row_sum[lane] += t.sum_compensation[lane];

  if (partial != nullptr) {
    const KeyRangeSlot<acc> slot(partial, used, dim);
    for (int lane = 0; lane < used; ++lane) {
      std::copy_n(t.out + lane * ld, dim, slot.out + static_cast<int64_t>(lane) * dim);
    }
    std::copy_n(t.row_max, used, slot.max);
    std::copy_n(t.row_sum, used, slot.sum);
    return;
  }
  for (int lane = 0; lane < used; ++lane) {
    const bool any_key = t.row_sum[lane] != 0;  // NaN inputs give a NaN sum: keep it visible
    t.inverse_sum[lane] = any_key ? acc(1) / t.row_sum[lane] : acc(0);
    write_lane<scalar_t>(p, batch, head, heads, e, tile, lane, t.out + lane * ld,
                         t.inverse_sum + lane,
                         any_key ? t.row_max[lane] + std::log(t.row_sum[lane]) : -kInf<acc>);
  }
}

}  // namespace

template <typename scalar_t>
void run_forward(const ForwardParams& p) {
  using acc = acc_t<scalar_t>;
  check_host_offsets(p.cu_seqlens_q, p.num_blocks, p.seqlen_q, "cu_seqlens_q");
  check_host_offsets(p.cu_seqlens_k, p.num_blocks, p.seqlen_k, "cu_seqlens_k");
  write_rows_after_blocks<scalar_t, acc>(p);
  const std::vector<Tile> tiles = make_tiles(p, kBlockM, /*by_query=*/true);
  // Items (tile, batch·head), costliest first (query rows × keys visited) so that long blocks
  // start early; among equal costs, head by head in sequence order, so that a thread's next
  // item reads the rows after its last one (and the same block's K and V) instead of another
  // head's.
  // A tile of fewer than kBlockM rows takes as many query heads of its kv head as fit in
  // kBlockM lanes (GQA / MQA: decoding one token per sequence runs a kv head's group at once).
  struct Item {
    int64_t cost;
    int64_t head;  // batch · heads_q + the first head
    int tile;
    int heads;        // consecutive query heads, all of one kv head
    KeyRange keys;    // block-local keys the item visits
    int64_t partial;  // its key range's slot in `partials`, or -1: written out directly
  };
  const int groups = p.heads_q / p.heads_kv;
  std::vector<Item> whole;
  for (int64_t bh = 0; bh < static_cast<int64_t>(p.batch) * p.heads_q; ++bh) {
    const int in_group = static_cast<int>(bh % groups);
    for (int i = 0; i < static_cast<int>(tiles.size()); ++i) {
      const Tile& tile = tiles[i];
      const int rows = tile.end - tile.begin;
      const int per_item = std::clamp(kBlockM / rows, 1, groups);
      if (in_group % per_item != 0) continue;  // this head runs in the item of an earlier one
      const int heads = std::min(per_item, groups - in_group);
      const BlockExtent e = block_extent(p, tile.block);
      const KeyWindow window = key_window(p, e);
      const int key_end = window_key_end(tile.end - 1, e.len_q, e.len_k, window);
      const int key_begin =
          std::min(window_key_begin(tile.begin, e.len_q, e.len_k, window), key_end);
      const int64_t cost = static_cast<int64_t>(key_end - key_begin) * rows * heads;
      whole.push_back({cost, bh, i, heads, {key_begin, key_end}, -1});
    }
  }
  // Too few items for the threads: the costliest tiles' keys are split into ranges whose
  // results are merged below (split tiles: their first item and range count).
  std::vector<int64_t> costs;
  for (const Item& item : whole) costs.push_back(item.cost);
  const int64_t cost_limit = forward_split_cost(costs, planning_threads());
  struct SplitTile {
    Item whole;             // the tile as one item
    int64_t first_partial;  // its ranges' slots, one after another in `partials`
    int ranges;
  };
  std::vector<Item> items;
  std::vector<SplitTile> split_tiles;
  int64_t partial_size = 0;
  for (const Item& item : whole) {
    const int rows = tiles[item.tile].end - tiles[item.tile].begin;
    const std::vector<KeyRange> ranges = item.cost > cost_limit && cost_limit > 0
                                             ? split_keys(item.keys, kBlockN, item.cost, cost_limit)
                                             : std::vector<KeyRange>{item.keys};
    if (ranges.size() == 1) {
      items.push_back(item);
      continue;
    }
    split_tiles.push_back({item, partial_size, static_cast<int>(ranges.size())});
    const int64_t slot = key_range_slot_size(rows * item.heads, p.head_dim);
    for (const KeyRange& r : ranges) {
      const int64_t cost = static_cast<int64_t>(r.end - r.begin) * rows * item.heads;
      items.push_back({cost, item.head, item.tile, item.heads, r, partial_size});
      partial_size += slot;
    }
  }
  std::vector<acc> partials(partial_size);
  // A thread takes up to kTilesPerTake consecutive whole items of one (head, block) at a time:
  // they read the same K and V tiles, which then come from its own cache. Key ranges go alone.
  auto same_take = [&](const Item& a, const Item& b) {
    return a.partial < 0 && b.partial < 0 && a.head == b.head &&
           tiles[a.tile].block == tiles[b.tile].block;
  };
  std::vector<int64_t> takes;  // take j is items [takes[j], takes[j + 1])
  auto close_takes = [&](int64_t tiles_per_take) {
    takes = {0};
    for (int64_t i = 1; i < static_cast<int64_t>(items.size()); ++i) {
      if (i - takes.back() == tiles_per_take || !same_take(items[i], items[i - 1])) {
        takes.push_back(i);
      }
    }
    if (!items.empty()) takes.push_back(static_cast<int64_t>(items.size()));
  };
  // Where the products convert K and V (float16/bfloat16 on float products), neighbouring tiles
  // are taken together whatever their costs, the one reaching furthest first, so that one
  // conversion of its keys serves the others; the takes are then ordered costliest first (as long
  // as there are enough of them to share out evenly).
  bool taken = false;
  if (decltype(ForwardScratch<scalar_t>::products)::kKeepsKeys && !items.empty()) {
    close_takes(kConvertedTilesPerTake);
    const int64_t count = static_cast<int64_t>(takes.size()) - 1;
    if (count >= 4 * planning_threads()) {
      std::vector<int64_t> order(count);
      std::vector<int64_t> costs(count, 0);
      for (int64_t t = 0; t < count; ++t) {
        order[t] = t;
        for (int64_t i = takes[t]; i < takes[t + 1]; ++i) costs[t] += items[i].cost;
      }
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
      std::vector<Item> ordered;
      std::vector<int64_t> bounds = {0};
      for (int64_t t : order) {
        for (int64_t i = takes[t + 1] - 1; i >= takes[t]; --i) ordered.push_back(items[i]);
        bounds.push_back(static_cast<int64_t>(ordered.size()));
      }
      items = std::move(ordered);
      takes = std::move(bounds);
      taken = true;
    }
  }
  if (!taken) {
    std::stable_sort(items.begin(), items.end(),
                     [](const Item& a, const Item& b) { return a.cost > b.cost; });
    close_takes(kTilesPerTake);
  }
  run_work_items(
      static_cast<int64_t>(takes.size()) - 1, [&] { return ForwardScratch<scalar_t>(p.head_dim); },
      [&](int64_t take, ForwardScratch<scalar_t>& scratch) {
        for (int64_t i = takes[take]; i < takes[take + 1]; ++i) {
          const Item& item = items[i];
          acc* partial = item.partial < 0 ? nullptr : partials.data() + item.partial;
          forward_tile<scalar_t>(p, static_cast<int>(item.head / p.heads_q),
                                 static_cast<int>(item.head % p.heads_q), item.heads,
                                 tiles[item.tile], item.keys, partial, scratch);
        }
      });
  at::parallel_for(0, static_cast<int64_t>(split_tiles.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> merged(p.head_dim);
    for (int64_t s = begin; s < end; ++s) {
      const SplitTile& split = split_tiles[s];
      const Tile& tile = tiles[split.whole.tile];
      const int used = (tile.end - tile.begin) * split.whole.heads;
      for (int lane = 0; lane < used; ++lane) {
        const acc lse = merge_key_ranges<acc>(partials.data() + split.first_partial,
                                              key_range_slot_size(used, p.head_dim), split.ranges,
                                              used, p.head_dim, lane, merged.data());
        write_lane<scalar_t>(p, static_cast<int>(split.whole.head / p.heads_q),
                             static_cast<int>(split.whole.head % p.heads_q), split.whole.heads,
                             block_extent(p, tile.block), tile, lane, merged.data(), nullptr, lse);
      }
    }
  });
}

template void run_forward<float>(const ForwardParams&);
template void run_forward<double>(const ForwardParams&);
template void run_forward<c10::BFloat16>(const ForwardParams&);
template void run_forward<c10::Half>(const ForwardParams&);

}  // namespace block_attn::cpu
