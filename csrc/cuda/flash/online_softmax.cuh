// The online-softmax step of the tensor-core forwards, on a warp's mma.sync score fragments.
#pragma once

#include "mma_utils.cuh"

namespace block_attn::cuda {

// One key tile's scores s (log2 domain, scaled and masked; kGroups groups of 16 rows, kNBlocksS
// 8-column tiles) against the running row maxima and sums: the maxima and sums move on, O
// (kNBlocksO 8-column tiles) is rescaled where some row of the warp changed its maximum, and s
// becomes the tile's unnormalised P. Rows are group_row (e = 0, 1) and group_row + 8 (e = 2, 3) of
// each group; the sums stay per thread, reduced over the quad at the end.
template <int kGroups, int kNBlocksS, int kNBlocksO>
__device__ __forceinline__ void online_softmax_step(float (&s)[kGroups][kNBlocksS][4],
                                                    float (&row_max)[kGroups][2],
                                                    float (&row_sum)[kGroups][2],
                                                    float (&acc_o)[kGroups][kNBlocksO][4]) {
  float m_use[kGroups][2];
  float alpha[kGroups][2];
  bool max_moved = false;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = row_max[g][rr];
#pragma unroll
      for (int n = 0; n < kNBlocksS; ++n) {
        mx = fmaxf(mx, fmaxf(s[g][n][2 * rr], s[g][n][2 * rr + 1]));
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      max_moved |= !(mx == row_max[g][rr]);  // NaN counts as moved
      // A row with no allowed key so far keeps max -inf; subtract 0 instead of inf - inf.
      m_use[g][rr] = mx == -INFINITY ? 0.f : mx;
      alpha[g][rr] = fast_exp2(row_max[g][rr] - m_use[g][rr]);
      row_max[g][rr] = mx;
    }
  }
  // Once the maxima settle, most tiles leave every row's max in place (alpha = 1): skip the
  // rescale of O when no row of the warp moved.
  if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        row_sum[g][rr] *= alpha[g][rr];
#pragma unroll
        for (int d = 0; d < kNBlocksO; ++d) {
          acc_o[g][d][2 * rr] *= alpha[g][rr];
          acc_o[g][d][2 * rr + 1] *= alpha[g][rr];
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int n = 0; n < kNBlocksS; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[g][n][e] = fast_exp2(s[g][n][e] - m_use[g][e / 2]);
        row_sum[g][e / 2] += s[g][n][e];
      }
    }
  }
}

}  // namespace block_attn::cuda
