// Row operations on a score tile: causal masking, the forward's online softmax, and the
// backward's recomputed probabilities and softmax gradient. Vectorised with at::vec.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace block_attn::cpu {

template <typename acc_t>
inline at::vec::Vectorized<acc_t> vec_exp(const at::vec::Vectorized<acc_t>& x) {
  // exp_u20 (error up to about 20 ulp, ~1e-6 relative) is the fast exp ATen's own flash attention
  // uses for float; it maps -inf to 0, which masking relies on.
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// Sets scores to -inf where the causal mask forbids them: row r of the tile may see tile columns
// c <= first_row_limit + r. Called only for tiles that straddle the diagonal.
template <typename acc_t>
inline void mask_causal(acc_t* scores, int64_t rows, int64_t cols, int64_t ld,
                        int64_t first_row_limit) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first_masked = std::clamp<int64_t>(first_row_limit + r + 1, 0, cols);
    std::fill(scores + r * ld + first_masked, scores + r * ld + cols, kNegInf);
  }
}

template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t result = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  if (n >= Vec::size()) {
    Vec m = Vec::loadu(x);
    for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size()) {
      m = at::vec::maximum(m, Vec::loadu(x + i));
    }
    result = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, m);
  }
  for (; i < n; ++i) result = std::max(result, x[i]);
  return result;
}

// x = exp(x - shift) in place; returns the sum of the results.
template <typename acc_t>
inline acc_t exp_shifted_sum(acc_t* x, int64_t n, acc_t shift) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec shift_vec(shift);
  Vec sum_vec(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = vec_exp(Vec::loadu(x + i) - shift_vec);
    e.store(x + i);
    sum_vec = sum_vec + e;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, sum_vec);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// One step of the online softmax for one row: scores (already scaled and masked) become
// exp(score - new running max); returns the factor by which earlier partial sums and outputs
// must be rescaled. A row that has seen only masked keys keeps max -inf and gets all zeros.
template <typename acc_t>
inline acc_t online_softmax_row(acc_t* scores, int64_t n, acc_t& running_max, acc_t& running_sum) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t new_max = std::max(running_max, row_max(scores, n));
  if (new_max == kNegInf) {
    std::fill_n(scores, n, acc_t(0));
    return acc_t(1);
  }
  const acc_t rescale = running_max == kNegInf ? acc_t(0) : std::exp(running_max - new_max);
  running_sum = running_sum * rescale + exp_shifted_sum(scores, n, new_max);
  running_max = new_max;
  return rescale;
}

// Backward: probabilities exp(score - lse) from the saved log-sum-exp, in place. Rows with
// lse = -inf (no allowed key) get zeros.
template <typename acc_t>
inline void probs_from_lse(acc_t* scores, int64_t n, float lse) {
  if (lse == -std::numeric_limits<float>::infinity()) {
    std::fill_n(scores, n, acc_t(0));
    return;
  }
  exp_shifted_sum(scores, n, static_cast<acc_t>(lse));
}

// dS = P * (dP - delta) in place in grad_probs.
template <typename acc_t>
inline void softmax_grad_row(const acc_t* probs, acc_t* grad_probs, int64_t n, acc_t delta) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec delta_vec(delta);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (Vec::loadu(probs + i) * (Vec::loadu(grad_probs + i) - delta_vec)).store(grad_probs + i);
  }
  for (; i < n; ++i) grad_probs[i] = probs[i] * (grad_probs[i] - delta);
}

}  // namespace block_attn::cpu
