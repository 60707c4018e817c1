// Shared-memory tiles of bf16 / fp16 rows (head_dim 64 or 128) in the 128-byte swizzle layout that
// the Hopper kernels' wgmma descriptors read: each row stored as head_dim / 64 column blocks of
// [rows][64].
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../flash/mma_utils.cuh"
#include "wgmma.cuh"

namespace block_attn::cuda::hopper {

// Byte offset of element (row, col) in a [rows][head_dim] tile stored as swizzled [rows][64]
// column blocks.
template <int kRows>
__device__ __forceinline__ uint32_t tile_offset(int row, int col) {
  return static_cast<uint32_t>(col / 64) * kRows * 128 + swizzle128_offset(row, col % 64);
}

// Stages rows [row0, row0 + kRows) of a (rows, kColumns) matrix of 16-bit T; rows past `rows` are
// zero.
template <int kRows, int kColumns, int kThreads, typename T>
__device__ __forceinline__ void load_tile_swizzled(unsigned char* tile, const T* gmem,
                                                   int64_t row_stride, int row0, int rows) {
  constexpr int kChunks = kColumns / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    unsigned char* dst = tile + tile_offset<kRows>(r, c);
    const int row = row0 + r;
    if (row < rows) {
      cp_async_16(dst, gmem + static_cast<int64_t>(row) * row_stride + c);
    } else {
      store_shared(dst, make_uint4(0, 0, 0, 0));
    }
  }
}

// cp.async and plain stores are generic-proxy writes; wgmma reads through the async proxy.
__device__ __forceinline__ void wait_tiles_for_wgmma() {
  cp_async_wait_all();
  fence_shared_for_async_reads();
  __syncthreads();
}

}  // namespace block_attn::cuda::hopper
