// CPU forward: FlashAttention-style online softmax over the key tiles of each query tile's
// own block; tiles past the causal diagonal are never visited.
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

// 64 query rows reuse each packed key tile 64 times; 256 keys per tile cover a whole block of
// up to 256 in one BLAS call and measured a few percent faster than 128 (b = 256, D = 64).
// Scratch at D = 256 is ~400 KB, inside L2.
constexpr int kBlockM = 64;
constexpr int kBlockN = 256;

template <typename scalar_t>
void forward_tile(const ForwardParams& p, int batch, int head, const Tile& tile,
                  std::vector<acc_t<scalar_t>>& scratch) {
  using acc = acc_t<scalar_t>;
  const int dim = p.head_dim;
  const BlockExtent e = block_extent(p, tile.block);
  const int rows = tile.end - tile.begin;
  const int kv_head = head / (p.heads_q / p.heads_kv);

  acc* q_tile = scratch.data();
  acc* kv_tile = q_tile + kBlockM * dim;
  acc* scores = kv_tile + kBlockN * dim;
  acc* out_acc = scores + kBlockM * kBlockN;
  acc* row_max = out_acc + kBlockM * dim;
  acc* row_sum = row_max + kBlockM;

  const auto* q = static_cast<const scalar_t*>(p.q) + batch * p.q_batch_stride +
                  head * p.q_head_stride + (e.q_start + tile.begin) * p.q_row_stride;
  const auto* k = static_cast<const scalar_t*>(p.k) + batch * p.k_batch_stride +
                  kv_head * p.k_head_stride + e.k_start * p.k_row_stride;
  const auto* v = static_cast<const scalar_t*>(p.v) + batch * p.v_batch_stride +
                  kv_head * p.v_head_stride + e.k_start * p.v_row_stride;

  pack_rows(q, p.q_row_stride, rows, dim, q_tile);
  fill<acc>(out_acc, rows * dim, 0);
  fill<acc>(row_max, rows, -std::numeric_limits<acc>::infinity());
  fill<acc>(row_sum, rows, 0);

  const int key_end = causal_key_end(tile.end - 1, e, p.is_causal);
  for (int k0 = 0; k0 < key_end; k0 += kBlockN) {
    const int cols = std::min(kBlockN, key_end - k0);
    pack_rows(k + k0 * p.k_row_stride, p.k_row_stride, cols, dim, kv_tile);
    matmul_abt<acc>(rows, cols, dim, static_cast<acc>(p.scale), q_tile, dim, kv_tile, dim, 0,
                    scores, kBlockN);
    for (int r = 0; r < rows; ++r) {
      acc* s = scores + r * kBlockN;
      // Keys at or past `allowed` are masked for this row (causal boundary tiles only).
      const int allowed = std::clamp(causal_key_end(tile.begin + r, e, p.is_causal) - k0, 0, cols);
      fill(s + allowed, cols - allowed, -std::numeric_limits<acc>::infinity());
      const acc tile_max = max_of(s, allowed);
      const acc new_max = std::isnan(tile_max) ? tile_max : std::max(row_max[r], tile_max);
      if (new_max == -std::numeric_limits<acc>::infinity()) {
        fill<acc>(s, cols, 0);  // no key seen yet: nothing to add
        continue;
      }
      const acc correction = std::exp(row_max[r] - new_max);
      row_sum[r] = row_sum[r] * correction + exp_shifted_sum(s, cols, new_max);
      row_max[r] = new_max;
      if (correction != acc(1)) scale_in_place(out_acc + r * dim, dim, correction);
    }
    pack_rows(v + k0 * p.v_row_stride, p.v_row_stride, cols, dim, kv_tile);
    matmul_ab<acc>(rows, dim, cols, 1, scores, kBlockN, kv_tile, dim, 1, out_acc, dim);
  }

  acc* lse = static_cast<acc*>(p.lse) +
             (static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q + e.q_start + tile.begin;
  for (int r = 0; r < rows; ++r) {
    const bool any_key = row_sum[r] != 0;  // NaN inputs give a NaN sum: keep it visible
    scale_in_place(out_acc + r * dim, dim, any_key ? acc(1) / row_sum[r] : acc(0));
    lse[r] = any_key ? row_max[r] + std::log(row_sum[r]) : -std::numeric_limits<acc>::infinity();
  }
  auto* out = static_cast<scalar_t*>(p.out) + batch * p.out_batch_stride +
              head * p.out_head_stride + (e.q_start + tile.begin) * p.out_row_stride;
  unpack_rows(out_acc, rows, dim, out, p.out_row_stride);
}

}  // namespace

template <typename scalar_t>
void run_forward(const ForwardParams& p) {
  check_host_offsets(p.cu_seqlens_q, p.num_blocks, p.seqlen_q, "cu_seqlens_q");
  check_host_offsets(p.cu_seqlens_k, p.num_blocks, p.seqlen_k, "cu_seqlens_k");
  const std::vector<Tile> tiles = make_tiles(p, kBlockM, /*by_query=*/true);
  const int64_t per_head = static_cast<int64_t>(tiles.size());
  const int64_t total = per_head * p.batch * p.heads_q;
  const int64_t scratch_size =
      (kBlockM + kBlockN + kBlockM) * p.head_dim + kBlockM * kBlockN + 2 * kBlockM;
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<scalar_t>> scratch(scratch_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / per_head;
      forward_tile<scalar_t>(p, static_cast<int>(bh / p.heads_q), static_cast<int>(bh % p.heads_q),
                             tiles[item % per_head], scratch);
    }
  });
}

template void run_forward<float>(const ForwardParams&);
template void run_forward<double>(const ForwardParams&);
template void run_forward<c10::BFloat16>(const ForwardParams&);
template void run_forward<c10::Half>(const ForwardParams&);

}  // namespace block_attn::cpu
