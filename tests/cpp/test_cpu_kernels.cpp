// Checks the CPU kernels directly (no dispatcher) against a dense ATen computation on a small
// ragged, causal, GQA example, and checks that the backward is bitwise reproducible across runs
// and agrees across thread counts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "attention_host.h"
#include "cpu/attention_cpu.h"
#include "cpu/forward_key_split.h"
#include "cpu/tile_schedule.h"

namespace {

using block_attn::BackwardParams;
using block_attn::ForwardParams;

int failures = 0;

void expect_close(const std::string& name, const at::Tensor& got, const at::Tensor& want,
                  double tolerance) {
  const at::Tensor finite = at::isfinite(want);
  const bool same_infinities = at::equal(finite, at::isfinite(got)) &&
                               at::equal(got.masked_select(~finite), want.masked_select(~finite));
  const double error =
      (got.masked_select(finite).to(at::kDouble) - want.masked_select(finite).to(at::kDouble))
          .abs()
          .max()
          .item<double>();
  const bool ok = same_infinities && error <= tolerance;
  std::printf("%-5s %-24s max error %.3g (tolerance %.3g)%s\n", ok ? "ok" : "FAIL", name.c_str(),
              error, tolerance, same_infinities ? "" : ", infinities differ");
  failures += ok ? 0 : 1;
}

void expect(const std::string& name, bool ok) {
  std::printf("%-5s %s\n", ok ? "ok" : "FAIL", name.c_str());
  failures += ok ? 0 : 1;
}

struct Dense {
  at::Tensor out, lse, grad_q, grad_k, grad_v;
};

// The same attention with an explicit (N, N) mask, in double; GQA by repeating kv heads.
Dense dense_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& grad_out, const at::Tensor& grad_lse,
                      const std::vector<int32_t>& offsets, bool causal, double scale) {
  const int64_t n = q.size(2), group = q.size(1) / k.size(1);
  at::Tensor allowed = at::zeros({n, n}, at::kBool);
  for (size_t j = 0; j + 1 < offsets.size(); ++j) {
    const int64_t begin = offsets[j], end = offsets[j + 1];
    at::Tensor block = at::ones({end - begin, end - begin}, at::kBool);
    allowed.slice(0, begin, end).slice(1, begin, end).copy_(causal ? at::tril(block) : block);
  }
  const at::Tensor qd = q.to(at::kDouble), go = grad_out.to(at::kDouble);
  const at::Tensor kd = k.to(at::kDouble).repeat_interleave(group, 1);
  const at::Tensor vd = v.to(at::kDouble).repeat_interleave(group, 1);
  const at::Tensor scores =
      at::matmul(qd, kd.transpose(-2, -1)).mul(scale).masked_fill(~allowed, -INFINITY);
  Dense d;
  d.lse = at::logsumexp(scores, -1);
  const at::Tensor probs = at::exp(scores - d.lse.unsqueeze(-1));
  d.out = at::matmul(probs, vd);
  // dS = P * (dP - (rowsum(dO * O) - grad_lse))
  const at::Tensor delta = (go * d.out).sum(-1) - grad_lse.to(at::kDouble);
  const at::Tensor grad_scores =
      probs * (at::matmul(go, vd.transpose(-2, -1)) - delta.unsqueeze(-1));
  d.grad_q = at::matmul(grad_scores, kd).mul(scale);
  auto sum_group = [&](const at::Tensor& t) { return t.unflatten(1, {k.size(1), group}).sum(2); };
  d.grad_k = sum_group(at::matmul(grad_scores.transpose(-2, -1), qd).mul(scale));
  d.grad_v = sum_group(at::matmul(probs.transpose(-2, -1), go));
  return d;
}

template <typename scalar_t>
void check_dtype(at::ScalarType dtype, double tolerance) {
  const std::string tag = std::string(c10::toString(dtype)) + " ";
  const int64_t batch = 2, heads_q = 4, heads_kv = 2, n = 70, head_dim = 24;
  const std::vector<int32_t> offsets = {0, 5, 6, 40, 70};  // ragged, one block of length 1
  const bool causal = true;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  at::manual_seed(0);
  const auto options = at::TensorOptions().dtype(dtype);
  // q is a transposed (B, N, H, D) view to exercise non-contiguous strides.
  const at::Tensor q = at::randn({batch, n, heads_q, head_dim}, options).transpose(1, 2);
  const at::Tensor k = at::randn({batch, heads_kv, n, head_dim}, options);
  const at::Tensor v = at::randn({batch, heads_kv, n, head_dim}, options);
  const at::Tensor grad_out = at::randn({batch, heads_q, n, head_dim}, options);
  const at::Tensor grad_lse = at::randn({batch, heads_q, n}, block_attn::lse_dtype_for(q));
  const at::Tensor cu_seqlens = at::tensor(at::ArrayRef<int32_t>(offsets), at::kInt);

  at::Tensor out = block_attn::empty_output_like(q);
  at::Tensor lse = block_attn::empty_lse_for(q);
  const ForwardParams forward = block_attn::make_forward_params(q, k, v, out, lse, cu_seqlens,
                                                                cu_seqlens, n, n, causal, scale);
  block_attn::cpu::run_forward<scalar_t>(forward);

  auto backward = [&] {
    at::Tensor grad_q = at::full_like(q, NAN), grad_k = at::full_like(k, NAN),
               grad_v = at::full_like(v, NAN);  // must be fully overwritten
    const BackwardParams params = block_attn::make_backward_params(
        grad_out, q, k, v, out, lse, grad_lse, grad_q, grad_k, grad_v, cu_seqlens, cu_seqlens, n, n,
        causal, scale, /*deterministic=*/true);
    block_attn::cpu::run_backward<scalar_t>(params);
    return std::vector<at::Tensor>{grad_q, grad_k, grad_v};
  };
  const std::vector<at::Tensor> grads = backward();

  const Dense want = dense_attention(q, k, v, grad_out, grad_lse, offsets, causal, scale);
  expect_close(tag + "out", out, want.out, tolerance);
  expect_close(tag + "lse", lse, want.lse, tolerance);
  expect_close(tag + "grad_q", grads[0], want.grad_q, tolerance);
  expect_close(tag + "grad_k", grads[1], want.grad_k, tolerance);
  expect_close(tag + "grad_v", grads[2], want.grad_v, tolerance);

  const std::vector<at::Tensor> again = backward();
  bool same_again = true;
  for (size_t i = 0; i < grads.size(); ++i)
    same_again = same_again && at::equal(grads[i], again[i]);
  expect(tag + "backward bitwise equal across runs", same_again);

  // Long blocks are split over threads, so another thread count may sum dQ in another order:
  // equal up to rounding.
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const std::vector<at::Tensor> one_thread = backward();
  at::set_num_threads(threads);
  const char* names[] = {"grad_q", "grad_k", "grad_v"};
  for (size_t i = 0; i < grads.size(); ++i) {
    expect_close(tag + names[i] + " 1 thread vs " + std::to_string(threads), one_thread[i],
                 grads[i], tolerance);
  }
}

// Blocks whose lengths pass INT32_MAX - tile: tile loops end after covering every position
// once, key splits cover the block, and causal limits stay exact (no int32 overflow).
void check_int32_edge() {
  using namespace block_attn::cpu;
  using namespace block_attn;
  constexpr int kTile = 256;
  constexpr int kMax = std::numeric_limits<int32_t>::max();
  for (const int len : {kMax, kMax - 16, kMax - kTile}) {
    const std::string name = std::to_string(len);
    int64_t tiles = 0;
    int covered = 0;
    bool contiguous = true;
    for (int r = 0; r < len && tiles <= len; r = tile_end(r, len, kTile)) {
      contiguous &= r == covered;
      covered = tile_end(r, len, kTile);
      ++tiles;
    }
    expect("tile loop over " + name, contiguous && covered == len &&
                                         tiles == (static_cast<int64_t>(len) + kTile - 1) / kTile);
    const int64_t cost = static_cast<int64_t>(len) * 64;
    const std::vector<KeyRange> ranges = split_keys({0, len}, kTile, cost, cost / kMaxKeyRanges);
    bool covers =
        ranges.size() == kMaxKeyRanges && ranges.front().begin == 0 && ranges.back().end == len;
    for (size_t i = 1; i < ranges.size(); ++i) {
      covers &= ranges[i].begin == ranges[i - 1].end && ranges[i].begin % kTile == 0;
    }
    expect("split_keys of " + name, covers);
    const int begin = len / 3;
    const std::vector<KeyRange> tail = split_keys({begin, len}, kTile, cost, cost / kMaxKeyRanges);
    bool covers_tail = tail.front().begin == begin && tail.back().end == len;
    for (size_t i = 1; i < tail.size(); ++i) {
      covers_tail &= tail[i].begin == tail[i - 1].end && (tail[i].begin - begin) % kTile == 0;
    }
    expect("split_keys of the keys after " + std::to_string(begin) + " of " + name, covers_tail);
    // (len_q, len_k) of a block with one query, and of a square block.
    const int one = 1, all = len;
    const KeyWindow causal{-1, 0};
    expect("causal limits of " + name, window_key_end(0, one, len, causal) == len &&
                                           window_key_end(0, all, len, causal) == 1 &&
                                           window_key_end(len - 1, all, len, causal) == len &&
                                           window_query_begin(len - 1, one, len, causal) == 0);
    const KeyWindow wide{len, len};
    expect("window limits of " + name, window_key_begin(len - 1, all, len, wide) == 0 &&
                                           window_key_end(0, all, len, wide) == len &&
                                           window_query_begin(len - 1, all, len, wide) == 0 &&
                                           window_query_end(0, all, len, wide) == len &&
                                           window_query_end(0, one, len, {0, -1}) == 0 &&
                                           window_query_end(len - 1, one, len, {0, -1}) == 1);
  }
}

}  // namespace

int main() {
  std::printf("threads: %d\n", at::get_num_threads());
  // Double's gradients are limited by the float32 lse the backward recomputes P from.
  check_dtype<double>(at::kDouble, 1e-6);
  check_dtype<float>(at::kFloat, 1e-4);
  check_dtype<c10::BFloat16>(at::kBFloat16, 6e-2);
  check_dtype<c10::Half>(at::kHalf, 1e-2);
  check_int32_edge();
  std::printf("%s\n", failures == 0 ? "all passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
