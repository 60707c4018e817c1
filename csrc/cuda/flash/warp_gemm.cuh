// Warp-level products on mma.sync.m16n8k16 for the tensor-core kernels. A warp owns 16 rows of
// the result; fragments follow the PTX layouts (row group_row = lane / 4 and group_row + 8,
// column pair 2 * (lane % 4) of every 8-column tile).
#pragma once

#include "mma_utils.cuh"

namespace block_attn::cuda {

// acc (16 x kN) += A B^T, with A the warp's 16 rows of a [row][k] shared tile and B the first kN
// rows of another [row][k] shared tile; k runs over kK columns.
template <typename T, int kK, int kN, int kStride>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[kN / 8][4], const T* sA, const T* sB,
                                              int lane) {
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, sA + (lane % 16) * kStride + ks * 16 + (lane / 16) * 8);
#pragma unroll
    for (int n2 = 0; n2 < kN / 16; ++n2) {
      uint32_t b[4];
      ldmatrix_x4(b, sB + (n2 * 16 + (lane % 8) + (lane / 16) * 8) * kStride + ks * 16 +
                         ((lane / 8) % 2) * 8);
      mma_16816<T>(acc[2 * n2], a, b[0], b[1]);
      mma_16816<T>(acc[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x kD) += P B, with P (16 x kK) in accumulator registers (rounded to T here) and B the
// first kK rows of a [row][kD] shared tile.
template <typename T, int kK, int kD, int kStride>
__device__ __forceinline__ void warp_gemm_pb(float (&acc)[kD / 8][4], const float (&p)[kK / 8][4],
                                             const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    a[0] = pack2<T>(p[2 * kk][0], p[2 * kk][1]);
    a[1] = pack2<T>(p[2 * kk][2], p[2 * kk][3]);
    a[2] = pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int d2 = 0; d2 < kD / 16; ++d2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStride + d2 * 16 +
                               (lane / 16) * 8);
      mma_16816<T>(acc[2 * d2], a, b[0], b[1]);
      mma_16816<T>(acc[2 * d2 + 1], a, b[2], b[3]);
    }
  }
}

// Stores the warp's 16 x kD accumulators, times `factor`, into rows of a padded shared tile.
template <typename T, int kD, int kStride>
__device__ __forceinline__ void warp_store_acc(T* sC, const float (&acc)[kD / 8][4], float factor,
                                               int lane) {
  const int row = lane / 4;
  const int col = (lane % 4) * 2;
#pragma unroll
  for (int d = 0; d < kD / 8; ++d) {
    *reinterpret_cast<uint32_t*>(sC + row * kStride + d * 8 + col) =
        pack2<T>(acc[d][0] * factor, acc[d][1] * factor);
    *reinterpret_cast<uint32_t*>(sC + (row + 8) * kStride + d * 8 + col) =
        pack2<T>(acc[d][2] * factor, acc[d][3] * factor);
  }
}

}  // namespace block_attn::cuda
