// Thin wrappers over the sm_80+ PTX the tensor-core kernels use: cp.async, ldmatrix and
// mma.sync.m16n8k16 (fp16/bf16 inputs, fp32 accumulators). Under BLOCK_ATTN_CUDA_EMULATION the
// host emulator provides the same functions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(BLOCK_ATTN_CUDA_EMULATION)
#define BLOCK_ATTN_SM80_OR_NEWER 1
#endif

#ifdef BLOCK_ATTN_CUDA_EMULATION
#include "cuda_emulator/ptx.h"
#else

namespace block_attn::cuda {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared, bypassing L1.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(smem)), "l"(gmem));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  asm volatile("cp.async.wait_group 0;\n" ::);
#endif
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i of
// every lane receives its (row lane / 4, columns 2 * (lane % 4) + {0, 1}) of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem)));
#endif
}
// Same, transposed: register i receives (rows 2 * (lane % 4) + {0, 1}, column lane / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem)));
#endif
}

// D = A * B + D for a 16x16 (row-major) A, 16x8 (column-major) B and 16x8 fp32 D.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
#ifdef BLOCK_ATTN_SM80_OR_NEWER
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// 2^x in one MUFU.EX2. exp2f also handles results below 2^-126 (three more instructions per
// element); softmax weights that small next to the row maximum's 1 change nothing, so they
// flush to zero here.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace block_attn::cuda

#endif  // BLOCK_ATTN_CUDA_EMULATION

namespace block_attn::cuda {

// Packs two floats into one register of two 16-bit values, `lo` in the low half (the lower
// column of an mma fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

}  // namespace block_attn::cuda
