// Moves tiles between global memory and padded shared memory for the tensor-core kernels.
// Traits provide kHeadDim (a multiple of 8), kSmemStride (elements per shared row, a multiple of
// 8) and kThreads.
#pragma once

#include "../utils.cuh"
#include "mma_utils.cuh"

namespace block_attn::cuda {

// Stages rows [row0, row0 + kRows) of a (rows, head_dim) matrix in shared memory; rows past
// `rows` and columns past head_dim are zero so they add nothing to the products. `vectorized`:
// every 16-byte chunk of a row is 16-byte aligned in global memory (cp.async); otherwise the
// chunk is copied element by element.
template <typename Traits, int kRows, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride,
                                                int row0, int rows, int head_dim, bool vectorized) {
  constexpr int kChunks = Traits::kHeadDim / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += Traits::kThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    T* dst = smem + r * Traits::kSmemStride + c;
    const int row = row0 + r;
    if (row < rows && c < head_dim) {
      const T* src = gmem + static_cast<int64_t>(row) * row_stride + c;
      if (vectorized) {
        cp_async_16(dst, src);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = c + e < head_dim ? src[e] : from_acc<T>(0.f);
      }
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

// Writes rows [row0, row0 + kRows) of a padded shared tile to global memory, real rows
// (< rows) and columns (< head_dim) only.
template <typename Traits, int kRows, typename T>
__device__ __forceinline__ void store_tile(T* gmem, int64_t row_stride, const T* smem, int row0,
                                           int rows, int head_dim, bool vectorized) {
  constexpr int kChunks = Traits::kHeadDim / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += Traits::kThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    const int row = row0 + r;
    if (row >= rows || c >= head_dim) continue;
    T* dst = gmem + static_cast<int64_t>(row) * row_stride + c;
    const T* src = smem + r * Traits::kSmemStride + c;
    if (vectorized) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && c + e < head_dim; ++e) dst[e] = src[e];
    }
  }
}

// cp.async and 16-byte stores need every row chunk 16-byte aligned: aligned base pointers and
// strides and head_dim that are multiples of 8 elements.
inline bool rows_are_16_byte_aligned(const ForwardParams& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const int64_t strides[] = {p.q_batch_stride,   p.q_head_stride,   p.q_row_stride,
                             p.k_batch_stride,   p.k_head_stride,   p.k_row_stride,
                             p.v_batch_stride,   p.v_head_stride,   p.v_row_stride,
                             p.out_batch_stride, p.out_head_stride, p.out_row_stride};
  for (const int64_t s : strides) {
    if (s % 8 != 0) return false;
  }
  return p.head_dim % 8 == 0 && aligned(p.q) && aligned(p.k) && aligned(p.v) && aligned(p.out);
}

inline bool rows_are_16_byte_aligned(const BackwardParams& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const int64_t strides[] = {p.grad_out_batch_stride, p.grad_out_head_stride, p.grad_out_row_stride,
                             p.grad_q_batch_stride,   p.grad_q_head_stride,   p.grad_q_row_stride,
                             p.grad_k_batch_stride,   p.grad_k_head_stride,   p.grad_k_row_stride,
                             p.grad_v_batch_stride,   p.grad_v_head_stride,   p.grad_v_row_stride};
  for (const int64_t s : strides) {
    if (s % 8 != 0) return false;
  }
  return rows_are_16_byte_aligned(static_cast<const ForwardParams&>(p)) && aligned(p.grad_out) &&
         aligned(p.grad_q) && aligned(p.grad_k) && aligned(p.grad_v);
}

}  // namespace block_attn::cuda
