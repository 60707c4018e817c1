// Runs the CUDA kernels (launch_forward / launch_backward, as the extension calls them) on the host
// emulator and checks them against a float64 reference: ragged and empty blocks, query and key
// blocks of different lengths, rows after the last offset, causal and not, GQA/MQA, both stride
// layouts, padded rows, unaligned rows (the element-wise copy path), every head-dim tile, every
// dtype, and the device properties that change the dispatch (sm_90, sm_86's smaller shared
// memory, sm_75 without the tensor-core kernels); then seeded random problems for every kernel
// family. Outputs start filled with NaN so an element never written fails, and padding between
// rows must stay untouched.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_params.h"
#include "cuda/flash/bwd_flash.cuh"
#include "cuda/hopper/bwd_wgmma.cuh"
#include "cuda/hopper/fwd_wgmma.cuh"
#include "cuda/launch.h"
#include "cuda/static_switch.h"
#include "dropout_philox.h"
#include "emulated_elements.h"
#include "emulated_kernel_paths.h"
#include "emulated_long_rows.h"
#include "emulated_offset_clamp.h"

namespace {

using block_attn::BackwardParams;
using block_attn::ForwardParams;
using block_attn::cuda::DType;
using block_attn::emulated_test::Element;

enum class Layout {
  kHeadsFirst,     // (batch, heads, rows, head_dim) contiguous
  kRowsFirst,      // (batch, rows, heads, head_dim) contiguous
  kPaddedRows,     // rows first, 8 spare elements after every row of heads (16-byte aligned)
  kUnalignedRows,  // rows first, 3 spare elements: no 16-byte vector copies
};

struct Case {
  std::string name;
  std::vector<int> lengths_q;
  std::vector<int> lengths_k;
  int batch = 1;
  int heads_q = 2;
  int heads_kv = 2;
  int head_dim = 64;
  bool causal = false;
  Layout layout = Layout::kHeadsFirst;
  bool grad_lse = true;
  bool backward = true;
  // Standard deviation of q: large values make scores whose exponentials overflow float32 unless
  // the kernels subtract the right row maximum.
  double q_scale = 1.0;
  // The sm_90 wgmma kernels called directly, with their dispatched shapes, where
  // hopper_shapes.h has the head_dim (elsewhere launch_forward / launch_backward).
  bool wgmma = false;
  // Rows after the last offset, in no block (random inputs there): query rows must get out = 0,
  // lse = -inf and grad_q = 0, key rows grad_k = grad_v = 0.
  int tail_q = 0;
  int tail_k = 0;
  double scale_factor = 1.0;  // scale = scale_factor / sqrt(head_dim)
  // The variants (score_variants.cuh): window sides (-1 unbounded), softcap (0 none), ALiBi
  // slopes per (batch, head) and dropout (0 none).
  int window_left = -1;
  int window_right = -1;
  double softcap = 0;
  bool alibi = false;
  double dropout_p = 0;
  // Global positions of the first query and key rows (-1: not given), with some variant.
  int query_offset = -1;
  int key_offset = -1;
};

// The case's ALiBi slope of (batch, head): distinct per batch row, so the batch stride counts.
double alibi_slope_of(const Case& c, int b, int h) {
  return static_cast<float>(0.05 * (1 + h + b * c.heads_q));
}

// The case's dropout (seed, offset): the seed's top bit set, as a drawn int64 may have it.
const int64_t kDropoutSeedOffset[2] = {-1234567890123456789LL, 987654321LL};

bool has_variants(const Case& c) {
  return c.window_left >= 0 || c.window_right >= 0 || c.softcap > 0 || c.alibi || c.dropout_p > 0 ||
         c.query_offset >= 0;
}

// launch_backward, or for a wgmma case the wgmma backward called directly (dQ by atomics, or
// deterministic).
template <typename T>
cudaError_t run_backward(const Case& c, const BackwardParams& p,
                         const block_attn::cuda::BackwardPlan& plan,
                         const block_attn::cuda::BackwardWorkspace& workspace) {
  using block_attn::cuda::hopper::BackwardHeadDims;
  if constexpr (sizeof(T) == 2) {
    if (c.wgmma && BackwardHeadDims::contains(p.head_dim)) {
      float* delta = static_cast<float*>(workspace.delta);
      float* sums = p.deterministic ? nullptr : workspace.dq_accumulator;
      return BackwardHeadDims::dispatch(p.head_dim, cudaErrorInvalidValue, [&](auto head_dim) {
        using block_attn::cuda::hopper::run_bwd_wgmma;
        constexpr int kHeadDim = decltype(head_dim)::value;
        return p.is_causal ? run_bwd_wgmma<T, kHeadDim, true>(p, delta, sums, nullptr)
                           : run_bwd_wgmma<T, kHeadDim, false>(p, delta, sums, nullptr);
      });
    }
  }
  return block_attn::cuda::launch_backward(p, plan, workspace, Element<T>::kDType, nullptr);
}

// launch_forward, or for a wgmma case the wgmma forward called directly.
template <typename T>
cudaError_t run_forward(const Case& c, const ForwardParams& p) {
  using block_attn::cuda::hopper::ForwardHeadDims;
  if constexpr (sizeof(T) == 2) {
    if (c.wgmma && ForwardHeadDims::contains(p.head_dim)) {
      return ForwardHeadDims::dispatch(p.head_dim, cudaErrorInvalidValue, [&](auto head_dim) {
        using block_attn::cuda::hopper::run_fwd_wgmma;
        constexpr int kHeadDim = decltype(head_dim)::value;
        return p.is_causal ? run_fwd_wgmma<T, kHeadDim, true>(p, nullptr)
                           : run_fwd_wgmma<T, kHeadDim, false>(p, nullptr);
      });
    }
  }
  block_attn::cuda::ForwardPlan plan;
  const cudaError_t err = block_attn::cuda::plan_forward(p, Element<T>::kDType, plan);
  if (err != cudaSuccess) return err;
  std::vector<float> split_partials(plan.split_partials_elements, NAN);
  block_attn::cuda::ForwardWorkspace workspace;
  workspace.split_partials = plan.split_partials_elements ? split_partials.data() : nullptr;
  return block_attn::cuda::launch_forward(p, plan, workspace, Element<T>::kDType, nullptr);
}

// A (batch, heads, rows, head_dim) tensor with the case's strides over a buffer that also holds
// the padding; every element starts as NaN.
template <typename T>
struct Tensor {
  int batch, heads, rows, dim;
  int64_t batch_stride, head_stride, row_stride;
  std::vector<T> data;

  Tensor(int b, int h, int r, int d, Layout layout) : batch(b), heads(h), rows(r), dim(d) {
    const int spare = layout == Layout::kPaddedRows ? 8 : layout == Layout::kUnalignedRows ? 3 : 0;
    if (layout == Layout::kHeadsFirst) {
      row_stride = d;
      head_stride = static_cast<int64_t>(r) * d;
      batch_stride = h * head_stride;
    } else {
      head_stride = d;
      row_stride = static_cast<int64_t>(h) * d + spare;
      batch_stride = r * row_stride;
    }
    data.assign(static_cast<size_t>(std::max<int64_t>(b * batch_stride, 1)), Element<T>::nan());
  }
  T& at(int b, int h, int r, int d) {
    return data[b * batch_stride + h * head_stride + r * row_stride + d];
  }
  double value(int b, int h, int r, int d) { return Element<T>::to(at(b, h, r, d)); }
  bool is_element(size_t index) const {
    const int64_t within_row = static_cast<int64_t>(index) % row_stride;
    return row_stride == dim || within_row < static_cast<int64_t>(heads) * dim;
  }
};

template <typename T>
void fill_random(Tensor<T>& t, std::mt19937& rng, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  for (int b = 0; b < t.batch; ++b)
    for (int h = 0; h < t.heads; ++h)
      for (int r = 0; r < t.rows; ++r)
        for (int d = 0; d < t.dim; ++d) t.at(b, h, r, d) = Element<T>::from(normal(rng));
}

struct Blocks {
  std::vector<int32_t> q, k;  // cu_seqlens
  int max_q = 0, max_k = 0;
};

Blocks offsets(const Case& c) {
  Blocks b{{0}, {0}};
  for (size_t j = 0; j < c.lengths_q.size(); ++j) {
    b.q.push_back(b.q.back() + c.lengths_q[j]);
    b.k.push_back(b.k.back() + c.lengths_k[j]);
    b.max_q = std::max(b.max_q, c.lengths_q[j]);
    b.max_k = std::max(b.max_k, c.lengths_k[j]);
  }
  return b;
}

// Float64 attention of one query row: the allowed keys' probabilities, their dropout factors and
// softcap derivatives, out and lse.
struct RowReference {
  std::vector<double> p;      // over the block's keys, 0 where masked
  std::vector<double> kept;   // the dropout factor: 1 / (1 - p) or 0; 1 without dropout
  std::vector<double> slope;  // d(score)/d(scaled q.k): 1 - tanh^2 under a softcap, else 1
  std::vector<double> out;
  double lse;
};

template <typename T>
RowReference reference_row(const Case& c, const Blocks& blocks, Tensor<T>& q, Tensor<T>& k,
                           Tensor<T>& v, int b, int h, int block, int i, double scale) {
  const int hk = h / (c.heads_q / c.heads_kv);
  const int len_q = c.lengths_q[block], len_k = c.lengths_k[block];
  const int q0 = blocks.q[block], k0 = blocks.k[block];
  // i' of the variants: bottom-right aligned, or by global positions when the case gives them.
  const int64_t position = c.query_offset >= 0
                               ? static_cast<int64_t>(c.query_offset) + q0 + i - c.key_offset - k0
                               : static_cast<int64_t>(i) + len_k - len_q;
  const int64_t row_base = c.query_offset >= 0 ? c.query_offset : 0;
  const int64_t key_base = c.key_offset >= 0 ? c.key_offset : 0;
  const int right = c.causal ? 0 : c.window_right;
  const int key_begin =
      c.window_left < 0 ? 0
                        : static_cast<int>(std::clamp<int64_t>(position - c.window_left, 0, len_k));
  const int key_end =
      right < 0 ? len_k : static_cast<int>(std::clamp<int64_t>(position + right + 1, 0, len_k));
  RowReference row{std::vector<double>(len_k, 0.0), std::vector<double>(len_k, 1.0),
                   std::vector<double>(len_k, 1.0), std::vector<double>(c.head_dim, 0.0),
                   -INFINITY};
  double max_score = -INFINITY;
  std::vector<double> scores(len_k, -INFINITY);
  for (int t = key_begin; t < key_end; ++t) {
    double s = 0;
    for (int d = 0; d < c.head_dim; ++d) s += q.value(b, h, q0 + i, d) * k.value(b, hk, k0 + t, d);
    s *= scale;
    if (c.softcap > 0) {
      const double th = std::tanh(s / c.softcap);
      s = c.softcap * th;
      row.slope[t] = 1 - th * th;
    }
    if (c.alibi) s -= alibi_slope_of(c, b, h) * std::abs(static_cast<double>(position - t));
    scores[t] = s;
    max_score = std::max(max_score, scores[t]);
  }
  if (key_end <= key_begin) return row;
  double sum = 0;
  for (int t = key_begin; t < key_end; ++t) sum += std::exp(scores[t] - max_score);
  row.lse = max_score + std::log(sum);
  const uint32_t threshold = block_attn::dropout_threshold(c.dropout_p);
  for (int t = key_begin; t < key_end; ++t) {
    row.p[t] = std::exp(scores[t] - row.lse);
    if (c.dropout_p > 0) {
      const bool keep = block_attn::dropout_keep(static_cast<uint64_t>(kDropoutSeedOffset[0]),
                                                 static_cast<uint64_t>(kDropoutSeedOffset[1]),
                                                 static_cast<uint32_t>(b * c.heads_q + h),
                                                 row_base + q0 + i, key_base + k0 + t, threshold);
      row.kept[t] = keep ? 1 / (1 - c.dropout_p) : 0;
    }
    for (int d = 0; d < c.head_dim; ++d)
      row.out[d] += row.p[t] * row.kept[t] * v.value(b, hk, k0 + t, d);
  }
  return row;
}

// Largest |got - want| over the real elements, and whether padding kept its NaN.
struct Comparison {
  double max_error = 0;
  double max_reference = 0;
  bool padding_intact = true;
  bool finite = true;
};

void compare_value(Comparison& cmp, double got, double want) {
  if (std::isinf(want)) {
    if (got != want) cmp.max_error = INFINITY;
    return;
  }
  if (!std::isfinite(got)) cmp.finite = false;
  cmp.max_error = std::max(cmp.max_error, std::abs(got - want));
  cmp.max_reference = std::max(cmp.max_reference, std::abs(want));
}

// An element that must be exactly `want`: the rows after the last offset.
void compare_exact(Comparison& cmp, double got, double want) {
  if (!(got == want)) cmp.max_error = INFINITY;
}

template <typename T>
void check_padding(Comparison& cmp, const Tensor<T>& t) {
  for (size_t i = 0; i < t.data.size(); ++i) {
    if (!t.is_element(i) && !std::isnan(Element<T>::to(t.data[i]))) cmp.padding_intact = false;
  }
}

int failures = 0;

// Tolerance: units of rounding of the type the values are stored in, relative to the largest
// reference value. Half types round P and dS to 8 or 11 bits before their products; float32 and
// float64 sums of a few hundred terms pick up a few units.
template <typename T>
double tolerance(double magnitude, bool gradient) {
  const double unit = std::is_same_v<T, __nv_bfloat16> ? 0x1p-8
                      : std::is_same_v<T, __half>      ? 0x1p-11
                      : std::is_same_v<T, float>       ? 0x1p-23
                                                       : 0x1p-52;
  const bool half = sizeof(T) == 2;
  return (half ? (gradient ? 3.0 : 2.0) : 16.0) * unit * std::max(magnitude, 1.0);
}

template <typename T, typename Stored = T>
void report(const std::string& what, const Comparison& cmp, bool gradient, double factor = 1.0) {
  const double tol = factor * tolerance<Stored>(cmp.max_reference, gradient);
  const bool ok = cmp.finite && cmp.padding_intact && cmp.max_error <= tol;
  std::printf("  %-4s %-17s max error %.3g (tolerance %.3g, largest value %.3g)%s%s\n",
              ok ? "ok" : "FAIL", what.c_str(), cmp.max_error, tol, cmp.max_reference,
              cmp.finite ? "" : ", non-finite values",
              cmp.padding_intact ? "" : ", padding written");
  failures += ok ? 0 : 1;
}

template <typename T>
void run_case(const Case& c) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const std::string tails = c.tail_q + c.tail_k > 0
                                ? ", rows after the last offset " + std::to_string(c.tail_q) + ":" +
                                      std::to_string(c.tail_k)
                                : "";
  char variants[160] = "";
  if (has_variants(c)) {
    std::snprintf(variants, sizeof(variants), ", window (%d, %d), softcap %g, alibi %d, dropout %g",
                  c.window_left, c.window_right, c.softcap, c.alibi ? 1 : 0, c.dropout_p);
  }
  std::printf("%s [%s, head_dim %d%s%s%s%s]\n", c.name.c_str(), Element<T>::kName, c.head_dim,
              c.causal ? ", causal" : "", c.wgmma ? ", wgmma kernels called directly" : "",
              tails.c_str(), variants);
  std::mt19937 rng(1234);
  const Blocks blocks = offsets(c);
  const int seqlen_q = blocks.q.back() + c.tail_q, seqlen_k = blocks.k.back() + c.tail_k;
  const int hq = c.heads_q, hkv = c.heads_kv, dim = c.head_dim;
  Tensor<T> q(c.batch, hq, seqlen_q, dim, c.layout), k(c.batch, hkv, seqlen_k, dim, c.layout),
      v(c.batch, hkv, seqlen_k, dim, c.layout), out(c.batch, hq, seqlen_q, dim, c.layout),
      grad_out(c.batch, hq, seqlen_q, dim, c.layout), grad_q(c.batch, hq, seqlen_q, dim, c.layout),
      grad_k(c.batch, hkv, seqlen_k, dim, c.layout), grad_v(c.batch, hkv, seqlen_k, dim, c.layout);
  fill_random(q, rng, c.q_scale);
  fill_random(k, rng);
  fill_random(v, rng);
  fill_random(grad_out, rng);
  const size_t lse_count = static_cast<size_t>(c.batch) * hq * seqlen_q;
  std::vector<A> lse(std::max<size_t>(lse_count, 1), NAN), grad_lse(lse.size()),
      delta(lse.size(), NAN);
  std::normal_distribution<double> normal;
  for (A& g : grad_lse) g = static_cast<A>(0.3 * normal(rng));
  const double scale = c.scale_factor / std::sqrt(static_cast<double>(dim));

  BackwardParams p{};
  p.q = q.data.data();
  p.k = k.data.data();
  p.v = v.data.data();
  p.out = out.data.data();
  p.lse = lse.data();
  auto strides = [](const auto& t, int64_t& b, int64_t& h, int64_t& r) {
    b = t.batch_stride;
    h = t.head_stride;
    r = t.row_stride;
  };
  strides(q, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  strides(k, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  strides(v, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  strides(out, p.out_batch_stride, p.out_head_stride, p.out_row_stride);
  p.cu_seqlens_q = blocks.q.data();
  p.cu_seqlens_k = blocks.k.data();
  p.num_blocks = static_cast<int>(c.lengths_q.size());
  p.max_seqlen_q = blocks.max_q;
  p.max_seqlen_k = blocks.max_k;
  p.batch = c.batch;
  p.heads_q = hq;
  p.heads_kv = hkv;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.head_dim = dim;
  p.scale = scale;
  p.is_causal = c.causal;
  p.window_left = c.window_left;
  p.window_right = c.window_right;
  p.softcap = c.softcap;
  p.query_offset = c.query_offset;
  p.key_offset = c.key_offset;
  std::vector<float> slopes;
  if (c.alibi) {
    for (int b = 0; b < c.batch; ++b) {
      for (int h = 0; h < hq; ++h) slopes.push_back(static_cast<float>(alibi_slope_of(c, b, h)));
    }
    p.alibi_slopes = slopes.data();
    p.alibi_batch_stride = hq;
  }
  if (c.dropout_p > 0) {
    p.dropout_seed_offset = kDropoutSeedOffset;
    p.dropout_threshold = block_attn::dropout_threshold(c.dropout_p);
    p.dropout_scale = 1 / (1 - c.dropout_p);
  }

  cudaError_t err = run_forward<T>(c, p);
  if (err != cudaSuccess) {
    std::printf("  FAIL forward launch: error %d\n", static_cast<int>(err));
    ++failures;
    return;
  }

  Comparison cmp_out, cmp_lse;
  std::vector<std::vector<double>> dk_ref(static_cast<size_t>(c.batch) * hkv * seqlen_k,
                                          std::vector<double>(dim, 0.0));
  std::vector<std::vector<double>> dv_ref = dk_ref;
  std::vector<std::vector<double>> dq_ref(static_cast<size_t>(c.batch) * hq * seqlen_q,
                                          std::vector<double>(dim, 0.0));
  for (int b = 0; b < c.batch; ++b) {
    for (int h = 0; h < hq; ++h) {
      const int hk = h / (hq / hkv);
      for (int block = 0; block < p.num_blocks; ++block) {
        const int q0 = blocks.q[block], k0 = blocks.k[block];
        for (int i = 0; i < c.lengths_q[block]; ++i) {
          const RowReference row = reference_row(c, blocks, q, k, v, b, h, block, i, scale);
          const size_t lse_at = (static_cast<size_t>(b) * hq + h) * seqlen_q + q0 + i;
          for (int d = 0; d < dim; ++d)
            compare_value(cmp_out, out.value(b, h, q0 + i, d), row.out[d]);
          compare_value(cmp_lse, lse[lse_at], row.lse);
          // Backward of this row: dS = P (dP - Delta), Delta = dO . O - grad_lse.
          double row_delta = c.grad_lse ? -static_cast<double>(grad_lse[lse_at]) : 0.0;
          for (int d = 0; d < dim; ++d) row_delta += grad_out.value(b, h, q0 + i, d) * row.out[d];
          for (int t = 0; t < c.lengths_k[block]; ++t) {
            if (row.p[t] == 0) continue;
            double dp = 0;
            for (int d = 0; d < dim; ++d)
              dp += grad_out.value(b, h, q0 + i, d) * v.value(b, hk, k0 + t, d);
            const double ds = row.p[t] * (dp * row.kept[t] - row_delta) * row.slope[t];
            auto& dk_row = dk_ref[(static_cast<size_t>(b) * hkv + hk) * seqlen_k + k0 + t];
            auto& dv_row = dv_ref[(static_cast<size_t>(b) * hkv + hk) * seqlen_k + k0 + t];
            auto& dq_row = dq_ref[(static_cast<size_t>(b) * hq + h) * seqlen_q + q0 + i];
            for (int d = 0; d < dim; ++d) {
              dq_row[d] += scale * ds * k.value(b, hk, k0 + t, d);
              dk_row[d] += scale * ds * q.value(b, h, q0 + i, d);
              dv_row[d] += row.p[t] * row.kept[t] * grad_out.value(b, h, q0 + i, d);
            }
          }
        }
      }
      // Query rows after the last offset see no key.
      for (int i = blocks.q.back(); i < seqlen_q; ++i) {
        for (int d = 0; d < dim; ++d) compare_exact(cmp_out, out.value(b, h, i, d), 0.0);
        compare_exact(cmp_lse, lse[(static_cast<size_t>(b) * hq + h) * seqlen_q + i], -INFINITY);
      }
    }
  }
  check_padding(cmp_out, out);
  // A score s carries |s| units of rounding into exp(s - lse), and dK multiplies them by q again:
  // in float32 / float64, where the rounding of P does not hide them, q of deviation g > 1 widens
  // the tolerance by g^2.
  const double peaky = sizeof(T) > 2 ? std::max(c.q_scale * c.q_scale, 1.0) : 1.0;
  report<T>("out", cmp_out, false, peaky);
  report<T, A>("lse", cmp_lse, false, peaky);  // lse is stored in the accumulator type
  if (!c.backward) return;

  p.grad_out = grad_out.data.data();
  p.grad_lse = c.grad_lse ? grad_lse.data() : nullptr;
  p.grad_q = grad_q.data.data();
  p.grad_k = grad_k.data.data();
  p.grad_v = grad_v.data.data();
  strides(grad_out, p.grad_out_batch_stride, p.grad_out_head_stride, p.grad_out_row_stride);
  strides(grad_q, p.grad_q_batch_stride, p.grad_q_head_stride, p.grad_q_row_stride);
  strides(grad_k, p.grad_k_batch_stride, p.grad_k_head_stride, p.grad_k_row_stride);
  strides(grad_v, p.grad_v_batch_stride, p.grad_v_head_stride, p.grad_v_row_stride);
  // Both dQ paths where the tensor-core backward runs: the deterministic dQ kernel, and atomics
  // into a float32 accumulator from the dK/dV kernel.
  for (const bool deterministic : {true, false}) {
    p.deterministic = deterministic;
    block_attn::cuda::BackwardPlan plan;
    err = block_attn::cuda::plan_backward(p, Element<T>::kDType, plan);
    if (err != cudaSuccess) {
      std::printf("  FAIL backward plan: error %d\n", static_cast<int>(err));
      ++failures;
      return;
    }
    const size_t accumulator_elements = plan.dq_accumulator_elements;
    if (!deterministic && accumulator_elements == 0) break;        // one path only
    std::vector<float> dq_accumulator(accumulator_elements, NAN);  // launch_backward zeroes it
    block_attn::cuda::BackwardWorkspace workspace;
    workspace.delta = delta.data();
    workspace.dq_accumulator = accumulator_elements ? dq_accumulator.data() : nullptr;
    for (Tensor<T>* t : {&grad_q, &grad_k, &grad_v}) {
      std::fill(t->data.begin(), t->data.end(), Element<T>::nan());
    }
    err = run_backward<T>(c, p, plan, workspace);
    if (err != cudaSuccess) {
      std::printf("  FAIL backward launch: error %d\n", static_cast<int>(err));
      ++failures;
      return;
    }
    Comparison cmp_dq, cmp_dk, cmp_dv;
    for (int b = 0; b < c.batch; ++b) {
      for (int h = 0; h < hq; ++h) {
        for (int i = 0; i < seqlen_q; ++i) {
          const auto& want = dq_ref[(static_cast<size_t>(b) * hq + h) * seqlen_q + i];
          auto compare = i < blocks.q.back() ? compare_value : compare_exact;
          for (int d = 0; d < dim; ++d) compare(cmp_dq, grad_q.value(b, h, i, d), want[d]);
        }
      }
      for (int h = 0; h < hkv; ++h) {
        for (int t = 0; t < seqlen_k; ++t) {
          const size_t at = (static_cast<size_t>(b) * hkv + h) * seqlen_k + t;
          auto compare = t < blocks.k.back() ? compare_value : compare_exact;
          for (int d = 0; d < dim; ++d) {
            compare(cmp_dk, grad_k.value(b, h, t, d), dk_ref[at][d]);
            compare(cmp_dv, grad_v.value(b, h, t, d), dv_ref[at][d]);
          }
        }
      }
    }
    check_padding(cmp_dq, grad_q);
    check_padding(cmp_dk, grad_k);
    check_padding(cmp_dv, grad_v);
    const std::string path = accumulator_elements ? " (atomic dQ)" : "";
    report<T>("dq" + path, cmp_dq, true, peaky);
    report<T>("dk" + path, cmp_dk, true, peaky);
    report<T>("dv" + path, cmp_dv, true, peaky);
  }
}

void run_on(const cuda_emulator::DeviceProperties& device, const char* name,
            const std::vector<std::pair<DType, Case>>& cases) {
  cuda_emulator::set_device_properties(device);
  std::printf("=== emulated %s\n", name);
  for (const auto& [dtype, c] : cases) {
    DTYPE_SWITCH(dtype, T, [&] {
      run_case<T>(c);
      return cudaSuccess;
    });
  }
}

// The kernel families the random problems take in turn, each on the emulated device and dtypes
// that select it.
enum class Family {
  kSimple,      // float32 / float64: the simple kernels on any device
  kSimpleHalf,  // float16 / bfloat16 on sm_75: the simple kernels
  kTensorCore,  // float16 / bfloat16 on sm_86: mma.sync
  kHopper,      // float16 / bfloat16 on sm_90, as launch_forward / launch_backward pick
  kWgmma,       // the sm_90 wgmma kernels called directly with their dispatched shapes
  kDecode,      // blocks of at most 16 queries against longer key blocks: the decoding forward
};
constexpr int kFamilies = 6;
const char* family_name(Family family) {
  static const char* const kNames[] = {"simple",         "simple, sm_75", "tensor cores",
                                       "sm_90 dispatch", "wgmma",         "decoding"};
  return kNames[static_cast<int>(family)];
}

struct RandomProblem {
  Family family;
  DType dtype;
  Case c;
  int device;  // 0: sm_90, 1: sm_86, 2: sm_75
};

// Draws as tests/test_fuzz.py does: lengths just off the tile sizes, the degenerate ones, short
// ones and up to 300; blocks cut from a total with some empty and one-row ones.
class ProblemDraw {
 public:
  explicit ProblemDraw(std::mt19937& rng) : rng_(rng) {}
  int pick(int n) { return static_cast<int>(rng_() % static_cast<unsigned>(n)); }
  template <typename V, size_t N>
  V choice(const V (&values)[N]) {
    return values[pick(static_cast<int>(N))];
  }
  double uniform() { return rng_() * 0x1p-32; }  // the same on every standard library

  int length() {
    static const int kSpecial[] = {0, 1, 2, 63, 64, 65, 127, 128, 129, 255, 257};
    const double roll = uniform();
    if (roll < 0.35) return choice(kSpecial);
    return roll < 0.55 ? pick(17) : pick(301);
  }
  // `blocks` consecutive block lengths over `total` rows, some empty or a single row.
  std::vector<int> cut(int total, int blocks) {
    std::vector<int> cuts;
    for (int j = 0; j + 1 < blocks; ++j) {
      const double roll = uniform();
      const int previous = cuts.empty() ? 0 : cuts.back();
      cuts.push_back(roll < 0.15  ? previous
                     : roll < 0.3 ? std::min(previous + 1, total)
                                  : pick(total + 1));
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.push_back(total);
    std::vector<int> lengths;
    int previous = 0;
    for (int at : cuts) {
      lengths.push_back(at - previous);
      previous = at;
    }
    return lengths;
  }

 private:
  std::mt19937& rng_;
};

// The emulator's cost of a problem, in padded multiply-adds: every query head's blocks in whole
// tiles (64 rows; 128 in the Hopper kernels) over whole 64-column blocks of head_dim, as the
// backward computes them (it outweighs the decoding forward). The simple kernels' products cost
// the emulator about three times as much.
double emulated_work(const Case& c, Family family) {
  auto round_up = [](int x, int to) { return static_cast<double>((x + to - 1) / to * to); };
  const int tile = family == Family::kHopper || family == Family::kWgmma ? 128 : 64;
  double work = 0;
  for (size_t j = 0; j < c.lengths_q.size(); ++j) {
    work += round_up(c.lengths_q[j], tile) * round_up(c.lengths_k[j], tile);
  }
  const bool simple = family == Family::kSimple || family == Family::kSimpleHalf;
  return work * c.batch * c.heads_q * round_up(c.head_dim, 64) * (simple ? 3 : 1);
}

// Problem `index`, drawn from rng, for family index % kFamilies. The listed cases vary one thing
// at a time; these meet combinations nobody listed.
RandomProblem random_case(std::mt19937& rng, int index) {
  ProblemDraw draw(rng);
  const auto family = static_cast<Family>(index % kFamilies);
  Case c;
  c.wgmma = family == Family::kWgmma;
  static const int kHeadsKv[] = {1, 1, 2, 3};
  static const int kGroups[] = {1, 1, 2, 4};
  c.heads_kv = draw.choice(kHeadsKv);
  c.heads_q = c.heads_kv * draw.choice(kGroups);
  static const int kBatches[] = {1, 1, 1, 2, 2, 3};
  c.batch = draw.choice(kBatches);
  static const int kHeadDims[] = {1, 3, 8, 17, 40, 59, 64, 80, 111, 128, 256};
  static const int kWgmmaHeadDims[] = {64, 128, 256};  // the wgmma kernels' head dims
  // Half of the sm_90 dispatch's problems at the Hopper kernels' head dims.
  const bool hopper_dims = c.wgmma || (family == Family::kHopper && draw.pick(2) == 0);
  c.head_dim = hopper_dims ? draw.choice(kWgmmaHeadDims) : draw.choice(kHeadDims);
  // The wgmma kernels need 16-byte aligned rows (launch_forward checks that for its own pick).
  c.layout = static_cast<Layout>(draw.pick(c.wgmma ? 3 : 4));
  c.causal = draw.pick(2) == 0;
  c.grad_lse = draw.pick(2) == 0;

  static const int kBlockCounts[] = {1, 2, 3, 5, 9, 17};
  const int blocks = draw.choice(kBlockCounts);
  if (family == Family::kDecode) {
    // Up to 16 queries per block, key blocks of their own, the longest of at least two tiles.
    for (int j = 0; j < blocks; ++j) {
      c.lengths_q.push_back(draw.pick(3) == 0 ? 1 : draw.pick(17));
      c.lengths_k.push_back(draw.length());
    }
    int& longest = *std::max_element(c.lengths_k.begin(), c.lengths_k.end());
    longest = std::max(longest, 128 + draw.pick(300));
  } else {
    c.lengths_q = draw.cut(draw.length(), blocks);
    // Key blocks of their own (more or fewer keys than queries) for some.
    c.lengths_k = draw.uniform() < 0.4 ? draw.cut(draw.length(), blocks) : c.lengths_q;
  }
  if (draw.uniform() < 0.15) {  // padded to a fixed block count with empty blocks
    const int padding = 1 + draw.pick(3);
    c.lengths_q.insert(c.lengths_q.end(), padding, 0);
    c.lengths_k.insert(c.lengths_k.end(), padding, 0);
  }
  // Rows after the last offset.
  if (draw.pick(3) == 0) c.tail_q = draw.length();
  if (draw.pick(3) == 0) c.tail_k = draw.length();

  DType dtype = draw.pick(2) == 0 ? DType::kFloat16 : DType::kBFloat16;
  if (family == Family::kSimple) dtype = draw.pick(2) == 0 ? DType::kFloat32 : DType::kFloat64;
  if (draw.uniform() < 0.3) {
    static const double kScales[] = {0.0, -0.5, 0.3, 1.5};
    c.scale_factor = draw.choice(kScales);
  }
  // Peaky scores only in float32 / float64: with float16 / bfloat16 P, one key taking almost all
  // of a row's weight lets the gradients stray past the half types' tolerance.
  if (family == Family::kSimple && draw.uniform() < 0.3) c.q_scale = draw.pick(2) == 0 ? 4.0 : 10.0;
  // The variants, in the families whose kernels have them: any combination, half the time.
  const bool variant_family = family == Family::kSimple || family == Family::kSimpleHalf ||
                              family == Family::kTensorCore || family == Family::kDecode ||
                              family == Family::kWgmma;
  if (variant_family && draw.pick(2) == 0) {
    static const int kLeft[] = {-1, 0, 5, 33, 100};
    static const int kRight[] = {-1, 0, 7, 64};
    if (draw.uniform() < 0.6) {
      c.window_left = draw.choice(kLeft);
      c.window_right = draw.choice(kRight);
    }
    static const double kCaps[] = {1.0, 5.0};
    if (draw.uniform() < 0.4) c.softcap = draw.choice(kCaps);
    c.alibi = draw.uniform() < 0.4;
    static const double kDropouts[] = {0.1, 0.5};
    if (draw.uniform() < 0.4) c.dropout_p = draw.choice(kDropouts);
    if (draw.uniform() < 0.3) {  // a piece of a longer sequence, as context parallelism calls
      c.query_offset = draw.pick(400);
      c.key_offset = draw.pick(400);
    }
  }

  // Shrink the batch, then the query groups, then the heads, then the head dim, until the
  // emulator's work is a few seconds at most; the lengths are what the draw is after.
  constexpr double kMaxWork = 4e7;
  while (emulated_work(c, family) > kMaxWork) {
    if (c.batch > 1) {
      --c.batch;
    } else if (c.heads_q > c.heads_kv) {
      c.heads_q = c.heads_kv;
    } else if (c.heads_kv > 1) {
      c.heads_q = c.heads_kv = 1;
    } else if (c.head_dim > 64 && !c.wgmma) {
      c.head_dim = 64;
    } else {
      break;
    }
  }

  auto list = [](const std::vector<int>& values) {
    std::string text;
    for (int v : values) text += (text.empty() ? "" : ",") + std::to_string(v);
    return text;
  };
  char scales[64];
  std::snprintf(scales, sizeof scales, ", scale %g/sqrt(d), q deviation %g", c.scale_factor,
                c.q_scale);
  c.name = "random problem " + std::to_string(index) + " (" + family_name(family) + "): queries " +
           list(c.lengths_q) + ", keys " + list(c.lengths_k) + ", batch " +
           std::to_string(c.batch) + ", heads " + std::to_string(c.heads_q) + ":" +
           std::to_string(c.heads_kv) + ", layout " + std::to_string(static_cast<int>(c.layout)) +
           (c.grad_lse ? ", lse gradient" : "") + scales;
  // Devices in turn where the family runs on several.
  const int round = index / kFamilies;
  const int device = family == Family::kSimple       ? round % 3
                     : family == Family::kSimpleHalf ? 2
                     : family == Family::kTensorCore ? 1
                     : family == Family::kDecode     ? round % 2
                                                     : 0;
  return {family, dtype, c, device};
}

}  // namespace

// Argument: how many random problems to add (default 12: two for each kernel family, in turn).
int main(int argc, char** argv) {
  const int random_cases = argc > 1 ? std::atoi(argv[1]) : 2 * kFamilies;
  // Lengths sit on both sides of the 32/64/128-row tiles; 0 is an empty block.
  const std::vector<int> ragged = {200, 64, 1, 0, 129};
  Case causal128{"ragged causal, 128-query tiles", ragged, ragged, 1, 2, 2, 128, true};
  Case long_causal{"long causal blocks, batch 2", {700, 300}, {700, 300}, 2, 1, 1, 128, true};
  long_causal.grad_lse = false;
  Case large_scores{"large scores (q of deviation 300)", ragged, ragged, 1, 2, 1, 64, true};
  large_scores.q_scale = 300.0;
  Case gqa64{"GQA 4:2, rows-first layout",
             {130, 65, 7},
             {130, 65, 7},
             2,
             4,
             2,
             64,
             false,
             Layout::kRowsFirst};
  Case causal_gqa64 = gqa64;
  causal_gqa64.name = "GQA 4:2 causal, rows-first layout";
  causal_gqa64.causal = true;
  Case separate{"query and key blocks of different lengths",
                {100, 64, 3, 70},
                {150, 40, 5, 0},
                1,
                2,
                1,
                128,
                true};
  Case short_blocks{"blocks of at most 64 queries (64-query tiles)",
                    {64, 33, 64},
                    {64, 33, 64},
                    1,
                    2,
                    2,
                    128,
                    true};
  Case mqa{"MQA 3:1, padded rows", {96, 17}, {96, 17}, 1, 3, 1, 64, true, Layout::kPaddedRows};
  Case odd_dim{"head_dim 40, unaligned rows", {90, 17}, {90, 17}, 1, 2, 2, 40, true,
               Layout::kUnalignedRows};
  Case dim59{"odd head_dim 59, unaligned rows",
             {90, 40},
             {90, 40},
             1,
             2,
             1,
             59,
             true,
             Layout::kUnalignedRows};
  Case dim96{"head_dim 96, padded rows", {130, 20}, {130, 20}, 1, 2, 2, 96, false,
             Layout::kPaddedRows};
  dim96.grad_lse = false;
  // At head_dim 256 two warps share each 16 keys of dK/dV; sm_86 (99 KiB of shared memory per
  // CTA) takes narrower tiles than sm_90.
  Case dim256{"head_dim 256", {150, 33}, {150, 33}, 1, 2, 2, 256, true};
  Case dim192{"head_dim 192, unaligned rows", {70, 9}, {70, 9}, 1, 2, 1, 192, false,
              Layout::kUnalignedRows};
  Case simple64{"simple kernels", {70, 33, 0}, {70, 33, 0}, 1, 2, 1, 64, true};
  Case simple32 = simple64;
  simple32.head_dim = 32;
  simple32.layout = Layout::kRowsFirst;
  simple32.causal = false;

  // Few queries per block against longer key blocks: the decoding forward. With the emulated 4
  // SMs, a lone block's keys split over 8 CTAs; rows of heads 6:2 straddle the 16-lane tiles.
  Case decode_split{
      "decoding: one block of 2 queries, 1000 keys, GQA 4:1", {2}, {1000}, 1, 4, 1, 128, true};
  Case decode_ragged{"decoding: key caches of 300, 1000, 0 and 77, GQA 8:2",
                     {1, 1, 1, 1},
                     {300, 1000, 0, 77},
                     1,
                     8,
                     2,
                     128,
                     true,
                     Layout::kRowsFirst};
  Case decode_straddle{
      "decoding: 3, 16 and 5 queries, GQA 6:2", {3, 16, 5}, {200, 700, 5}, 1, 6, 2, 64, true};
  Case decode_unaligned{"decoding: head_dim 40, unaligned rows",
                        {4, 1},
                        {333, 150},
                        2,
                        4,
                        2,
                        40,
                        true,
                        Layout::kUnalignedRows};
  Case decode_wide{"decoding: head_dim 256, MQA 3:1, padded rows",
                   {2, 1},
                   {260, 129},
                   1,
                   3,
                   1,
                   256,
                   false,
                   Layout::kPaddedRows};
  Case decode_one_split{"decoding: 20 blocks of 1 query (one split)",
                        std::vector<int>(20, 1),
                        std::vector<int>(20, 130),
                        1,
                        2,
                        1,
                        64,
                        false};
  // A static cache viewed as packed rows: each slot's unused rows pair with an empty query block.
  Case decode_padded{"decoding: a padded cache of 3 slots, GQA 4:1",
                     {1, 0, 1, 0, 1, 0},
                     {300, 212, 5, 507, 512, 0},
                     1,
                     4,
                     1,
                     64,
                     true};
  Case decode_large = decode_split;
  decode_large.name = "decoding: large scores (q of deviation 300)";
  decode_large.q_scale = 300.0;
  decode_large.causal = false;

  // Rows after the last offset (packed sequences in a fixed-size buffer): more than the longest
  // block has, so the last block's CTAs stride over them; after an empty last block in some.
  Case tail_causal{"rows after the last offset, ragged causal", ragged, ragged, 1, 2, 2, 128, true};
  tail_causal.tail_q = 300;
  tail_causal.tail_k = 70;
  Case tail_separate{"rows after the last offset, separate key blocks, GQA 4:2, rows first",
                     {100, 64, 0},
                     {150, 40, 0},
                     2,
                     4,
                     2,
                     64,
                     false,
                     Layout::kRowsFirst};
  tail_separate.tail_q = 9;
  tail_separate.tail_k = 260;
  Case tail_separate_simple = tail_separate;  // the simple kernels take longer to emulate
  tail_separate_simple.batch = 1;
  Case tail_dim256{
      "rows after the last offset, head_dim 256", {150, 33}, {150, 33}, 1, 2, 1, 256, true};
  tail_dim256.tail_q = 80;
  tail_dim256.tail_k = 20;
  Case tail_only{
      "every block empty: all rows after the last offset", {0, 0}, {0, 0}, 1, 2, 1, 64, true};
  tail_only.tail_q = 70;
  tail_only.tail_k = 40;
  Case tail_simple = simple64;
  tail_simple.name = "simple kernels, rows after the last offset";
  tail_simple.tail_q = 50;
  tail_simple.tail_k = 3;
  Case tail_simple32 = simple32;
  tail_simple32.name = "simple kernels, rows after the last query offset only";
  tail_simple32.tail_q = 40;
  Case tail_decode{"decoding: rows after the last offset, GQA 4:1",
                   {1, 2, 1},
                   {300, 1000, 77},
                   1,
                   4,
                   1,
                   128,
                   true,
                   Layout::kRowsFirst};
  tail_decode.tail_q = 37;
  tail_decode.tail_k = 50;
  Case tail_decode_empty{"decoding: no query in any block", {0, 0}, {200, 0}, 1, 4, 2, 64, true};
  tail_decode_empty.tail_q = 20;
  tail_decode_empty.tail_k = 10;

  // The variants, in the simple kernels (every dtype) and the mma.sync and decoding kernels
  // (float16 / bfloat16): each alone and all together, with ragged and separate key blocks, GQA
  // and rows after the last offset.
  std::vector<std::pair<DType, Case>> variant_cases;
  {
    Case base{"variants: ", {70, 1, 0, 45}, {90, 1, 5, 45}, 2, 4, 2, 64, false, Layout::kRowsFirst};
    base.tail_q = 7;
    base.tail_k = 3;
    Case window = base;
    window.name += "window";
    window.window_left = 20;
    window.window_right = 5;
    Case causal_window = base;
    causal_window.name += "causal window";
    causal_window.causal = true;
    causal_window.window_left = 33;
    Case softcap = base;
    softcap.name += "softcap";
    softcap.softcap = 1.5;
    softcap.q_scale = 3.0;
    Case alibi = base;
    alibi.name += "alibi";
    alibi.alibi = true;
    alibi.causal = true;
    Case dropout = base;
    dropout.name += "dropout";
    dropout.dropout_p = 0.3;
    Case all = base;
    all.name += "all at once";
    all.causal = true;
    all.window_left = 40;
    all.softcap = 2.0;
    all.alibi = true;
    all.dropout_p = 0.2;
    for (const Case& c : {window, causal_window, softcap, alibi, dropout, all}) {
      variant_cases.push_back({DType::kFloat32, c});
    }
    variant_cases.push_back({DType::kFloat64, all});
    variant_cases.push_back({DType::kBFloat16, all});
    variant_cases.push_back({DType::kFloat16, window});
    Case wide = all;
    wide.name += ", head_dim 128";
    wide.head_dim = 128;
    wide.batch = 1;
    variant_cases.push_back({DType::kBFloat16, wide});
    // float16 / bfloat16 take the mma.sync forward on sm_90: each variant alone there too, a
    // window wide enough that query tiles have key tiles inside every row's window (no mask),
    // and head_dim 256.
    for (const Case& c : {causal_window, softcap, alibi, dropout}) {
      variant_cases.push_back({DType::kFloat16, c});
    }
    Case interior{"variants: window (150, 10) over 300-row blocks",
                  {300, 0, 130},
                  {300, 0, 130},
                  1,
                  2,
                  1,
                  64,
                  false,
                  Layout::kRowsFirst};
    interior.window_left = 150;
    interior.window_right = 10;
    interior.softcap = 3.0;
    variant_cases.push_back({DType::kBFloat16, interior});
    Case all_dim256 = all;
    all_dim256.name += ", head_dim 256";
    all_dim256.head_dim = 256;
    all_dim256.batch = 1;
    all_dim256.heads_q = 2;
    all_dim256.heads_kv = 1;
    variant_cases.push_back({DType::kFloat16, all_dim256});
    // The decoding forward: key splits, lanes of several heads (each its own ALiBi slope and
    // dropout mask), and a window that reaches past the query.
    Case decode_all = decode_ragged;
    decode_all.name = "variants: decoding, key caches of 300, 1000, 0 and 77, GQA 8:2, all at once";
    decode_all.window_left = 150;
    decode_all.softcap = 2.0;
    decode_all.alibi = true;
    decode_all.dropout_p = 0.2;
    variant_cases.push_back({DType::kBFloat16, decode_all});
    Case decode_window = decode_straddle;
    decode_window.name = "variants: decoding, 3, 16 and 5 queries, GQA 6:2, window (40, 3)";
    decode_window.causal = false;
    decode_window.window_left = 40;
    decode_window.window_right = 3;
    variant_cases.push_back({DType::kFloat16, decode_window});
    // Global positions (context parallelism's pieces): queries 100 and keys 37 rows into a
    // longer sequence, so the window, ALiBi and dropout differ from the bottom-right ones.
    Case offsets = base;
    offsets.name += "window, ALiBi and dropout at global positions";
    offsets.window_left = 70;
    offsets.window_right = 0;
    offsets.alibi = true;
    offsets.dropout_p = 0.25;
    offsets.query_offset = 100;
    offsets.key_offset = 37;
    variant_cases.push_back({DType::kFloat32, offsets});
    variant_cases.push_back({DType::kBFloat16, offsets});
    Case decode_offsets = decode_all;
    decode_offsets.name += ", global positions";
    decode_offsets.causal = false;
    decode_offsets.window_right = 0;
    decode_offsets.query_offset = 1200;
    decode_offsets.key_offset = 0;
    variant_cases.push_back({DType::kFloat16, decode_offsets});
  }

  cuda_emulator::DeviceProperties sm90;  // 227 KiB of shared memory per CTA
  run_on(sm90, "sm_90 (variants)", variant_cases);
  run_on(sm90, "sm_90",
         {{DType::kBFloat16, causal128},       {DType::kFloat16, causal128},
          {DType::kBFloat16, long_causal},     {DType::kBFloat16, gqa64},
          {DType::kFloat16, causal_gqa64},     {DType::kBFloat16, separate},
          {DType::kBFloat16, short_blocks},    {DType::kFloat16, mqa},
          {DType::kFloat16, odd_dim},          {DType::kBFloat16, dim59},
          {DType::kBFloat16, dim96},           {DType::kBFloat16, dim256},
          {DType::kFloat16, dim192},           {DType::kFloat32, simple64},
          {DType::kFloat64, simple32},         {DType::kFloat16, large_scores},
          {DType::kBFloat16, decode_split},    {DType::kFloat16, decode_ragged},
          {DType::kBFloat16, decode_straddle}, {DType::kFloat16, decode_unaligned},
          {DType::kBFloat16, decode_wide},     {DType::kBFloat16, decode_one_split},
          {DType::kBFloat16, decode_large},    {DType::kFloat16, decode_padded},
          {DType::kBFloat16, tail_causal},     {DType::kBFloat16, tail_separate},
          {DType::kBFloat16, tail_dim256},     {DType::kBFloat16, tail_only},
          {DType::kFloat32, tail_simple},      {DType::kFloat64, tail_simple32},
          {DType::kBFloat16, tail_decode},     {DType::kFloat16, tail_decode_empty}});
  // The wgmma forward and backward called directly with their dispatched shapes (the probe's
  // cases; launch_forward / launch_backward above pick them only for some of these problems):
  // bf16, fp16 for the causal ones, head_dim 64 (backward) and 256 (forward) for some.
  std::vector<std::pair<DType, Case>> wgmma_cases;
  for (Case c :
       {Case{"wgmma: full, one block of 200", {200}, {200}, 1, 2, 2, 128, false},
        Case{"wgmma: causal, one block of 200", {200}, {200}, 1, 2, 2, 128, true},
        Case{"wgmma: ragged, GQA 4:2, rows first",
             {70, 1, 229},
             {70, 1, 229},
             1,
             4,
             2,
             128,
             false,
             Layout::kRowsFirst},
        Case{"wgmma: ragged causal, Lq != Lk", {64, 129, 0}, {130, 20, 5}, 1, 2, 1, 128, true}}) {
    c.wgmma = true;
    wgmma_cases.push_back({DType::kBFloat16, c});
    if (c.causal) wgmma_cases.push_back({DType::kFloat16, c});
    if (c.causal && c.lengths_q.size() == 1) {  // scores in the thousands
      Case large = c;
      large.name += ", large scores";
      large.q_scale = 300.0;
      wgmma_cases.push_back({DType::kBFloat16, large});
    }
    if (c.causal || c.heads_q != c.heads_kv) {  // head_dim 64: one column block
      Case narrow = c;
      narrow.head_dim = 64;
      wgmma_cases.push_back({c.causal ? DType::kFloat16 : DType::kBFloat16, narrow});
    }
    if (c.heads_q != c.heads_kv || c.lengths_q != c.lengths_k) {  // head_dim 256
      Case wide_dim = c;
      wide_dim.head_dim = 256;
      wgmma_cases.push_back({DType::kBFloat16, wide_dim});
    }
  }
  for (const int head_dim : {64, 128, 256}) {
    Case c{"wgmma: ragged causal, Lq != Lk, rows after the last offset",
           {64, 129, 0},
           {130, 20, 5},
           1,
           2,
           1,
           head_dim,
           true};
    c.wgmma = true;
    c.tail_q = 150;
    c.tail_k = 90;
    wgmma_cases.push_back({head_dim == 128 ? DType::kFloat16 : DType::kBFloat16, c});
  }
  // The wgmma kernels with variants: a window wider and narrower than their tiles, and all the
  // variants together, at every head_dim (256: the forward; the backward is the mma.sync one).
  for (const int head_dim : {64, 128, 256}) {
    Case c{"wgmma variants: ragged, GQA 4:2, window (150, 20)",
           {300, 1, 129},
           {300, 1, 129},
           1,
           4,
           2,
           head_dim,
           false,
           Layout::kRowsFirst};
    c.wgmma = true;
    c.window_left = 150;
    c.window_right = 20;
    c.tail_q = 9;
    wgmma_cases.push_back({head_dim == 128 ? DType::kFloat16 : DType::kBFloat16, c});
    Case all = c;
    all.name = "wgmma variants: ragged causal, Lq != Lk, all at once";
    all.lengths_q = {64, 129, 0};
    all.lengths_k = {130, 20, 5};
    all.causal = true;
    all.window_left = 40;
    all.window_right = -1;
    all.softcap = 2.0;
    all.alibi = true;
    all.dropout_p = 0.2;
    wgmma_cases.push_back({head_dim == 128 ? DType::kBFloat16 : DType::kFloat16, all});
    if (head_dim == 128) {  // each variant alone
      Case softcap = all;
      softcap.name = "wgmma variants: ragged causal, Lq != Lk, softcap";
      softcap.window_left = -1;
      softcap.alibi = false;
      softcap.dropout_p = 0;
      softcap.q_scale = 3.0;
      wgmma_cases.push_back({DType::kFloat16, softcap});
      Case alibi = softcap;
      alibi.name = "wgmma variants: ragged causal, Lq != Lk, alibi";
      alibi.softcap = 0;
      alibi.q_scale = 1.0;
      alibi.alibi = true;
      wgmma_cases.push_back({DType::kBFloat16, alibi});
      Case dropout = softcap;
      dropout.name = "wgmma variants: ragged, Lq != Lk, dropout";
      dropout.causal = false;
      dropout.softcap = 0;
      dropout.q_scale = 1.0;
      dropout.dropout_p = 0.3;
      wgmma_cases.push_back({DType::kFloat16, dropout});
      Case offsets = all;
      offsets.name = "wgmma variants: all at global positions";
      offsets.causal = false;
      offsets.window_right = 0;
      offsets.query_offset = 260;
      offsets.key_offset = 190;
      wgmma_cases.push_back({DType::kBFloat16, offsets});
    }
  }
  run_on(sm90, "sm_90", wgmma_cases);

  cuda_emulator::DeviceProperties sm86{8, 6, 99 * 1024};  // the dQ kernel keeps one row group
  run_on(sm86, "sm_86",
         {{DType::kBFloat16, causal128},
          {DType::kFloat16, separate},
          {DType::kFloat16, large_scores},
          {DType::kFloat16, decode_straddle},
          {DType::kBFloat16, decode_wide},
          {DType::kFloat16, dim256},
          {DType::kBFloat16, dim192},
          {DType::kBFloat16, tail_causal},
          {DType::kFloat16, tail_separate},
          {DType::kFloat16, tail_dim256},
          {DType::kFloat16, tail_decode},
          {DType::kBFloat16, tail_decode_empty}});
  // The float16 / bfloat16 variant cases again where the mma.sync kernels take both directions
  // (on sm_90 the Hopper backward takes head_dim 64 and 128).
  std::vector<std::pair<DType, Case>> half_variant_cases;
  for (const auto& [dtype, c] : variant_cases) {
    if (dtype == DType::kFloat16 || dtype == DType::kBFloat16)
      half_variant_cases.push_back({dtype, c});
  }
  run_on(sm86, "sm_86 (variants)", half_variant_cases);
  cuda_emulator::DeviceProperties sm75{7, 5, 64 * 1024};  // no tensor-core kernels
  run_on(sm75, "sm_75",
         {{DType::kFloat16, causal_gqa64},
          {DType::kBFloat16, mqa},
          {DType::kFloat16, tail_separate_simple},
          {DType::kBFloat16, tail_only}});

  const std::pair<const char*, cuda_emulator::DeviceProperties> devices[] = {
      {"sm_90", sm90}, {"sm_86", sm86}, {"sm_75", sm75}};
  std::mt19937 problem_rng(20261124);
  for (int i = 0; i < random_cases; ++i) {
    const RandomProblem problem = random_case(problem_rng, i);
    const auto& [name, device] = devices[problem.device];
    run_on(device, name, {{problem.dtype, problem.c}});
  }

  failures += block_attn::emulated_test::check_offsets_outside_contract();
  failures += block_attn::emulated_test::check_kernel_paths();
  failures += block_attn::emulated_test::check_long_rows();

  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
