// The score variants of the CPU kernels on transposed score tiles (keys × lanes): the window's
// per-key lane interval, the softcap and ALiBi (block_attn/variants.py). The forward and the
// backward apply them identically, so the backward's recomputed probabilities are the forward's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../attention_params.h"
#include "tile_math.h"
#include "tile_schedule.h"

namespace block_attn::cpu {

// The lanes of a score tile: its queries (times query heads, in the forward).
constexpr int kTileLanes = 64;

// Per lane of a tile: the ALiBi slope and the query's position i' relative to the tile's first
// key, so that key c of the tile is |position - c| away. Padding lanes hold slope 0.
template <typename acc>
struct AlibiLanes {
  alignas(64) acc slope[kTileLanes];
  alignas(64) acc position[kTileLanes];
};

// What a tile's scaled scores go through: softcap, then ALiBi, then the window's lane intervals.
// Lanes [first_lane[c], end_lane[c]) may see key c (first_lane == nullptr: every lane may).
template <typename acc>
struct TileVariants {
  acc scale = 1;
  acc softcap = 0;
  // 2 · scale / softcap · log2(e): a raw score's power of 2 in tanh x = 1 − 2 / (1 + exp(2x)).
  acc softcap_exponent = 0;
  const AlibiLanes<acc>* alibi = nullptr;
  const int* first_lane = nullptr;
  const int* end_lane = nullptr;

  TileVariants(double scale_value, double softcap_value, const AlibiLanes<acc>* alibi_lanes)
      : scale(static_cast<acc>(scale_value)),
        softcap(static_cast<acc>(softcap_value)),
        softcap_exponent(softcap_value != 0 ? static_cast<acc>(2 * scale_value / softcap_value *
                                                               1.4426950408889634)
                                            : acc(0)),
        alibi(alibi_lanes) {}
};

// The slope of query head `head` of batch `batch`.
inline float alibi_slope(const ForwardParams& p, int batch, int head) {
  return p.alibi_slopes[batch * p.alibi_batch_stride + head];
}

// 2^u for the softcap's tanh, cheaper than the softmax's exp: u is clamped to ±64, where tanh has
// long saturated, and 2^u is a degree-5 polynomial (a relative minimax fit) in u's distance to its
// nearest integer n, scaled by 2^n: within a few float32 ulps. AVX-512 only (it scales by vscalef);
// other vectors take vec_exp. A NaN stays NaN.
inline at::vec::Vectorized<float> tanh_exp2(at::vec::Vectorized<float> u) {
#if defined(CPU_CAPABILITY_AVX512)
  u = _mm512_max_ps(_mm512_set1_ps(-64.0f), _mm512_min_ps(_mm512_set1_ps(64.0f), u));
  const __m512 n = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(u, n);
  __m512 p = _mm512_set1_ps(1.327645848505199e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675540961325169e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713464617729e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
#else
  return vec_exp<float>(u * at::vec::Vectorized<float>(0.6931471805599453f));
#endif
}

// Calls f(std::bool_constant<softcap>(), std::bool_constant<alibi>()): the variants a tile's
// score code is compiled for, so that each combination runs without tests per score.
template <typename acc, typename F>
void with_score_transforms(const TileVariants<acc>& v, F&& f) {
  const bool alibi = v.alibi != nullptr;
  if (v.softcap != 0) {
    if (alibi) return f(std::true_type(), std::true_type());
    return f(std::true_type(), std::false_type());
  }
  if (alibi) return f(std::false_type(), std::true_type());
  f(std::false_type(), std::false_type());
}

// The scaled score raw · scale of key c (tile-local) for lanes [v0, v0 + W), through the softcap
// (kSoftcap) and ALiBi (kAlibi). With `slope`, also d score / d raw there: scale, times 1 − tanh²
// under the softcap. Float32 takes tanh x as 1 − q with q = 2 / (1 + exp(2x)), on tanh_exp2
// (Sleef's tanh cost a softcapped forward half again its time; the absolute error stays near
// float32's ulp of 1), and 1 − tanh² as q · (2 − q); float64 keeps Sleef's tanh, exact for
// gradcheck.
template <typename acc, bool kSoftcap, bool kAlibi>
inline at::vec::Vectorized<acc> transformed_score(at::vec::Vectorized<acc> raw,
                                                  const TileVariants<acc>& v, int c, int v0,
                                                  at::vec::Vectorized<acc>* slope) {
  using Vec = at::vec::Vectorized<acc>;
  Vec s;
  if constexpr (!kSoftcap) {
    s = raw * Vec(v.scale);
    if (slope != nullptr) *slope = Vec(v.scale);
  } else if constexpr (std::is_same_v<acc, float>) {
    const Vec q = Vec(2) / (Vec(1) + tanh_exp2(raw * Vec(v.softcap_exponent)));
    s = Vec(v.softcap) - q * Vec(v.softcap);
    if (slope != nullptr) *slope = Vec(v.scale) * q * (Vec(2) - q);
  } else {
    const Vec t = (raw * Vec(v.scale / v.softcap)).tanh();
    s = t * Vec(v.softcap);
    if (slope != nullptr) *slope = Vec(v.scale) * (Vec(1) - t * t);
  }
  if constexpr (kAlibi) {
    const Vec distance = (Vec::loadu(v.alibi->position + v0) - Vec(static_cast<acc>(c))).abs();
    s = s - Vec::loadu(v.alibi->slope + v0) * distance;
  }
  return s;
}

// True for lanes [v0, v0 + W) outside [first, end).
template <typename acc>
inline at::vec::Vectorized<acc> outside_lanes(int v0, int first, int end) {
  using Vec = at::vec::Vectorized<acc>;
  const Vec lane = Vec::arange(static_cast<acc>(v0), 1);
  return (lane < Vec(static_cast<acc>(first))) | (lane >= Vec(static_cast<acc>(end)));
}

// Fills the lanes' slopes and positions for a tile whose lane l is query row
// `first_row + l / heads` of head `first_head + l % heads`, against keys from `key`.
template <typename acc>
void fill_alibi_lanes(const ForwardParams& p, const BlockExtent& e, int batch, int first_head,
                      int heads, int first_row, int used, int key, AlibiLanes<acc>& lanes) {
  const KeyWindow window = key_window(p, e);
  for (int l = 0; l < kTileLanes; ++l) {
    if (l >= used) {
      lanes.slope[l] = 0;
      lanes.position[l] = 0;
      continue;
    }
    const int64_t position = key_distance(first_row + l / heads, key, e.len_q, e.len_k, window);
    lanes.slope[l] = static_cast<acc>(alibi_slope(p, batch, first_head + l % heads));
    lanes.position[l] = static_cast<acc>(position);
  }
}

}  // namespace block_attn::cpu
