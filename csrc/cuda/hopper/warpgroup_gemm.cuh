// Tile products of a warpgroup on the swizzled tiles of swizzled_tiles.cuh, shared by the Hopper
// kernels: they issue the wgmma instructions; callers fence, commit and wait around them.
#pragma once

#include <cstdint>

#include "../flash/mma_utils.cuh"
#include "wgmma.cuh"

namespace block_attn::cuda::hopper {

// acc (64 x N, N = 2 kRegisters: 64 or 128) = A B^T over kHeadDim for A's 64 rows starting at
// a_tile and B's N rows starting at b_tile, both K-major in [rows][kHeadDim] tiles whose 64-column
// blocks are a_block_bytes and b_block_bytes apart.
template <typename T, int kHeadDim, int kRegisters>
__device__ __forceinline__ void warpgroup_gemm_abt(float (&acc)[kRegisters],
                                                   const unsigned char* a_tile, int a_block_bytes,
                                                   const unsigned char* b_tile, int b_block_bytes) {
  static_assert(kRegisters == 32 || kRegisters == 64, "64 or 128 output columns");
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) {  // step ks lies in column block ks / 4
    const int block = ks / 4;
    const int k0 = (ks % 4) * 16;
    const uint64_t desc_a = k_major_descriptor(a_tile + block * a_block_bytes, k0);
    const uint64_t desc_b = k_major_descriptor(b_tile + block * b_block_bytes, k0);
    if constexpr (kRegisters == 64) {
      wgmma_m64n128k16<T>(acc, desc_a, desc_b, ks > 0);
    } else {
      wgmma_m64n64k16<T, false>(acc, desc_a, desc_b, ks > 0);
    }
  }
}

// acc[h] += P B for P in registers (kSteps A fragments of 16 k each, from to_a_fragments) and
// B's 16 kSteps rows, N-major, in a tile whose 64-column blocks h are b_block_bytes apart.
template <typename T, int kBlocks, int kSteps>
__device__ __forceinline__ void warpgroup_gemm_pb(float (&acc)[kBlocks][32],
                                                  const uint32_t (&p)[kSteps][4],
                                                  const unsigned char* b_tile, int b_block_bytes) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
#pragma unroll
    for (int h = 0; h < kBlocks; ++h) {
      wgmma_m64n64k16_register_a<T>(acc[h], p[kk],
                                    mn_major_descriptor(b_tile + h * b_block_bytes, kk * 16));
    }
  }
}

// An accumulator tile (64 rows, kRegisters / 2 columns) rounded to T as A fragments: columns
// 16 kk .. 16 kk + 15 lie in registers 8 kk .. 8 kk + 7, already in the A-fragment layout.
template <typename T, int kRegisters>
__device__ __forceinline__ void to_a_fragments(const float (&acc)[kRegisters],
                                               uint32_t (&frag)[kRegisters / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kRegisters / 8; ++kk) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      frag[kk][j] = pack2<T>(acc[8 * kk + 2 * j], acc[8 * kk + 2 * j + 1]);
  }
}

}  // namespace block_attn::cuda::hopper
