// Warp-level products on mma.sync.m16n8k16 for the tensor-core kernels. A warp owns kGroups
// groups of 16 rows of the result; every B fragment read from shared memory feeds one mma per
// group. Fragments follow the PTX layouts (row group_row = lane / 4 and group_row + 8, column
// pair 2 * (lane % 4) of every 8-column tile).
#pragma once

#include "mma_utils.cuh"

namespace block_attn::cuda {

// Zeroes a warp's accumulator fragments (kN 8-column tiles, in kGroups row groups).
template <int kN>
__device__ __forceinline__ void zero_fragments(float (&acc)[kN][4]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}
template <int kGroups, int kN>
__device__ __forceinline__ void zero_fragments(float (&acc)[kGroups][kN][4]) {
#pragma unroll
  for (int g = 0; g < kGroups; ++g) zero_fragments(acc[g]);
}
// total += part, then part = 0: a chunk's sums folded into the running total (long rows).
template <int kN>
__device__ __forceinline__ void add_fragments(float (&total)[kN][4], float (&part)[kN][4]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      total[n][e] += part[n][e];
      part[n][e] = 0.f;
    }
  }
}
template <int kGroups, int kN>
__device__ __forceinline__ void add_fragments(float (&total)[kGroups][kN][4],
                                              float (&part)[kGroups][kN][4]) {
#pragma unroll
  for (int g = 0; g < kGroups; ++g) add_fragments(total[g], part[g]);
}

// acc[g] (16 x kN) += A_g B^T, with A_g rows [16 g, 16 g + 16) of a [row][k] shared tile starting
// at sA and B the first kN rows of another [row][k] shared tile; k runs over kK columns.
template <typename T, int kK, int kN, int kStride, int kGroups>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[kGroups][kN / 8][4], const T* sA,
                                              const T* sB, int lane) {
  if constexpr (kN == 8) {
    // One 8-row B tile: each ldmatrix.x4 takes its fragments for two k-steps.
    static_assert(kK % 32 == 0, "k in pairs of 16-column steps");
#pragma unroll
    for (int ks = 0; ks < kK / 16; ks += 2) {
      uint32_t b[4];
      ldmatrix_x4(b, sB + (lane % 8) * kStride + ks * 16 + (lane / 8) * 8);
#pragma unroll
      for (int step = 0; step < 2; ++step) {
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          uint32_t a[4];
          ldmatrix_x4(a,
                      sA + (g * 16 + (lane % 16)) * kStride + (ks + step) * 16 + (lane / 16) * 8);
          mma_16816<T>(acc[g][0], a, b[2 * step], b[2 * step + 1]);
        }
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < kK / 16; ++ks) {
      uint32_t a[kGroups][4];
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        ldmatrix_x4(a[g], sA + (g * 16 + (lane % 16)) * kStride + ks * 16 + (lane / 16) * 8);
      }
#pragma unroll
      for (int n2 = 0; n2 < kN / 16; ++n2) {
        uint32_t b[4];
        ldmatrix_x4(b, sB + (n2 * 16 + (lane % 8) + (lane / 16) * 8) * kStride + ks * 16 +
                           ((lane / 8) % 2) * 8);
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          mma_16816<T>(acc[g][2 * n2], a[g], b[0], b[1]);
          mma_16816<T>(acc[g][2 * n2 + 1], a[g], b[2], b[3]);
        }
      }
    }
  }
}

// One 16-row group.
template <typename T, int kK, int kN, int kStride>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[kN / 8][4], const T* sA, const T* sB,
                                              int lane) {
  warp_gemm_abt<T, kK, kN, kStride, 1>(reinterpret_cast<float (&)[1][kN / 8][4]>(acc), sA, sB,
                                       lane);
}

// acc[g] (16 x kD) += P_g B, with P_g (16 x kK) in accumulator registers (rounded to T here)
// and B the first kK rows of a [row][kD] shared tile.
template <typename T, int kK, int kD, int kStride, int kGroups>
__device__ __forceinline__ void warp_gemm_pb(float (&acc)[kGroups][kD / 8][4],
                                             const float (&p)[kGroups][kK / 8][4], const T* sB,
                                             int lane) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[kGroups][4];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      a[g][0] = pack2<T>(p[g][2 * kk][0], p[g][2 * kk][1]);
      a[g][1] = pack2<T>(p[g][2 * kk][2], p[g][2 * kk][3]);
      a[g][2] = pack2<T>(p[g][2 * kk + 1][0], p[g][2 * kk + 1][1]);
      a[g][3] = pack2<T>(p[g][2 * kk + 1][2], p[g][2 * kk + 1][3]);
    }
#pragma unroll
    for (int d2 = 0; d2 < kD / 16; ++d2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStride + d2 * 16 +
                               (lane / 16) * 8);
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        mma_16816<T>(acc[g][2 * d2], a[g], b[0], b[1]);
        mma_16816<T>(acc[g][2 * d2 + 1], a[g], b[2], b[3]);
      }
    }
  }
}

// One 16-row group.
template <typename T, int kK, int kD, int kStride>
__device__ __forceinline__ void warp_gemm_pb(float (&acc)[kD / 8][4], const float (&p)[kK / 8][4],
                                             const T* sB, int lane) {
  warp_gemm_pb<T, kK, kD, kStride, 1>(reinterpret_cast<float (&)[1][kD / 8][4]>(acc),
                                      reinterpret_cast<const float (&)[1][kK / 8][4]>(p), sB, lane);
}

// acc (16 x kD) += A B, with A (16 x kK) the 16 rows at sA of a [row][k] shared tile (T values,
// as warp_gemm_pb would round them) and B the first kK rows of a [k][d] shared tile.
template <typename T, int kK, int kD, int kStrideA, int kStrideB>
__device__ __forceinline__ void warp_gemm_ab(float (&acc)[kD / 8][4], const T* sA, const T* sB,
                                             int lane) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, sA + (lane % 16) * kStrideA + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int d2 = 0; d2 < kD / 16; ++d2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStrideB + d2 * 16 +
                               (lane / 16) * 8);
      mma_16816<T>(acc[2 * d2], a, b[0], b[1]);
      mma_16816<T>(acc[2 * d2 + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x kN) += A B, with A (16 x kK) read transposed from shared memory - the 16 columns
// starting at sAt of a [k][row] tile - and B the first kK rows of a [k][n] shared tile.
template <typename T, int kK, int kN, int kStrideA, int kStrideB>
__device__ __forceinline__ void warp_gemm_atb(float (&acc)[kN / 8][4], const T* sAt, const T* sB,
                                              int lane) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    // Matrices 0..3: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k
    // 8-15).
    uint32_t a[4];
    ldmatrix_x4_trans(
        a, sAt + (kk * 16 + (lane / 16) * 8 + lane % 8) * kStrideA + ((lane / 8) % 2) * 8);
#pragma unroll
    for (int n2 = 0; n2 < kN / 16; ++n2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStrideB + n2 * 16 +
                               (lane / 16) * 8);
      mma_16816<T>(acc[2 * n2], a, b[0], b[1]);
      mma_16816<T>(acc[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}

// Stores the warp's kGroups x 16 x kD accumulators, times `factor`, into consecutive rows of a
// padded shared tile starting at sC.
template <typename T, int kD, int kStride, int kGroups>
__device__ __forceinline__ void warp_store_acc(T* sC, const float (&acc)[kGroups][kD / 8][4],
                                               float factor, int lane) {
  const int row = lane / 4;
  const int col = (lane % 4) * 2;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int d = 0; d < kD / 8; ++d) {
      *reinterpret_cast<uint32_t*>(sC + (g * 16 + row) * kStride + d * 8 + col) =
          pack2<T>(acc[g][d][0] * factor, acc[g][d][1] * factor);
      *reinterpret_cast<uint32_t*>(sC + (g * 16 + row + 8) * kStride + d * 8 + col) =
          pack2<T>(acc[g][d][2] * factor, acc[g][d][3] * factor);
    }
  }
}

// One 16-row group.
template <typename T, int kD, int kStride>
__device__ __forceinline__ void warp_store_acc(T* sC, const float (&acc)[kD / 8][4], float factor,
                                               int lane) {
  warp_store_acc<T, kD, kStride, 1>(sC, reinterpret_cast<const float (&)[1][kD / 8][4]>(acc),
                                    factor, lane);
}

}  // namespace block_attn::cuda
