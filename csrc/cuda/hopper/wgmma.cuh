// Building blocks for Hopper (sm_90a) warpgroup products: shared-memory matrix descriptors, the
// 128-byte swizzled tile layout they describe, the wgmma fences and the bf16 / fp16 m64n64k16
// product.
// A warpgroup (four consecutive warps, 128 threads) issues each wgmma together; the tensor cores
// read the operands from shared memory, with no ldmatrix. The 64 x 64 fp32 result lies in the
// warpgroup's registers like four stacked mma.sync C fragments: register 4 j + e of lane l in
// warp w holds row 16 w + l / 4 + 8 (e / 2), column 8 j + 2 (l % 4) + e % 2.
// bench/probes/wgmma_probe.cu checks these against a host reference on the GPU; under
// BLOCK_ATTN_CUDA_EMULATION the host emulator provides the fences and products.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace block_attn::cuda::hopper {

#if (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || \
    defined(BLOCK_ATTN_CUDA_EMULATION)
#define BLOCK_ATTN_WGMMA 1
#endif

// Byte offset of element (row, col) of a tile of 16-bit elements stored in the 128-byte swizzle
// layout: rows of 64 elements (128 bytes), and within each group of 8 rows the 16-byte chunks
// of row r permuted by XOR with r % 8, so the 8 rows of any chunk column hit distinct banks.
// Tiles must start 1024-byte aligned (the swizzle is applied to address bits).
__host__ __device__ constexpr uint32_t swizzle128_offset(int row, int col) {
  const uint32_t chunk = static_cast<uint32_t>(col / 8) ^ static_cast<uint32_t>(row % 8);
  return static_cast<uint32_t>(row) * 128u + chunk * 16u + static_cast<uint32_t>(col % 8) * 2u;
}

}  // namespace block_attn::cuda::hopper

#ifdef BLOCK_ATTN_CUDA_EMULATION
#include "cuda_emulator/wgmma.h"
#else

namespace block_attn::cuda::hopper {

// Makes this thread's earlier shared-memory stores visible to the tensor cores' reads.
__device__ __forceinline__ void fence_shared_for_async_reads() {
#ifdef BLOCK_ATTN_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// A plain shared-memory store of what a wgmma will read (after fence_shared_for_async_reads and
// a barrier); under emulation the store is tracked for those checks.
template <typename V>
__device__ __forceinline__ void store_shared(unsigned char* address, const V& value) {
  *reinterpret_cast<V*>(address) = value;
}

// Orders register accesses before the next wgmma (needed before the first and after registers
// that feed one were written).
__device__ __forceinline__ void wgmma_fence() {
#ifdef BLOCK_ATTN_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef BLOCK_ATTN_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most kPending committed groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef BLOCK_ATTN_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// The compiler sees a wgmma read its registers and write its accumulators when it is issued, not
// when it completes. Fencing them after the wait keeps the accumulators from being read, and the
// A-fragment registers from being reused, while the product still runs.
template <typename Register, int kCount>
__device__ __forceinline__ void fence_operands(Register (&registers)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) {
    if constexpr (sizeof(Register) == 4 && std::is_floating_point_v<Register>) {
      asm volatile("" : "+f"(registers[i])::"memory");
    } else {
      asm volatile("" : "+r"(registers[i])::"memory");
    }
  }
}
template <typename Register, int kRows, int kCount>
__device__ __forceinline__ void fence_operands(Register (&registers)[kRows][kCount]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) fence_operands(registers[r]);
}

// The 32 accumulator registers of a 64 x 64 fp32 wgmma: as operand text and as asm operands.
#define BLOCK_ATTN_WGMMA_D_TEXT                                                                 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define BLOCK_ATTN_WGMMA_D_OPERANDS(d)                                                            \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),    \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),  \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),  \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// The 64 accumulator registers of a 64 x 128 fp32 wgmma.
#define BLOCK_ATTN_WGMMA_D128_TEXT                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "  \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "  \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define BLOCK_ATTN_WGMMA_D128_OPERANDS(d)                                                          \
  BLOCK_ATTN_WGMMA_D_OPERANDS(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), \
      "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),   \
      "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),   \
      "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),   \
      "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// 64 x 128 output, both operands from shared memory and K-major.
#define BLOCK_ATTN_WGMMA_SS_N128(type, d, desc_a, desc_b, accumulate)                             \
  asm volatile(                                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " " BLOCK_ATTN_WGMMA_D128_TEXT \
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                           \
      : BLOCK_ATTN_WGMMA_D128_OPERANDS(d)                                                         \
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)))

// Both operands from shared memory; inputs of PTX type `type` (bf16 or f16).
#define BLOCK_ATTN_WGMMA_SS(type, d, desc_a, desc_b, accumulate, transpose_a, transpose_b)    \
  asm volatile(                                                                               \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                            \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " " BLOCK_ATTN_WGMMA_D_TEXT \
      ", %32, %33, p, 1, 1, %35, %36;\n}\n"                                                   \
      : BLOCK_ATTN_WGMMA_D_OPERANDS(d)                                                        \
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)), "n"(transpose_a),        \
        "n"(transpose_b))

// A from registers, B from shared memory (N-major), always accumulating.
#define BLOCK_ATTN_WGMMA_RS(type, d, a, desc_b)                                               \
  asm volatile(                                                                               \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                              \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " " BLOCK_ATTN_WGMMA_D_TEXT \
      ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                         \
      : BLOCK_ATTN_WGMMA_D_OPERANDS(d)                                                        \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))

// d (64 x 64, fp32) = A B + (accumulate ? d : 0) for A 64 x 16 and B 16 x 64 in shared memory:
// A through desc_a, K-major (A's rows are the 64 output rows) or, with kTransposeA, M-major (A's
// rows are its 16 k rows); B through desc_b, K-major (B's rows are the 64 output columns) or,
// with kTransposeB, N-major (B's rows are its 16 k rows). T: __nv_bfloat16 or __half inputs.
template <typename T, bool kTransposeB, bool kTransposeA = false>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                bool accumulate) {
#ifdef BLOCK_ATTN_WGMMA
  if constexpr (std::is_same_v<T, __half>) {
    BLOCK_ATTN_WGMMA_SS("f16", d, desc_a, desc_b, accumulate, kTransposeA ? 1 : 0,
                        kTransposeB ? 1 : 0);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "wgmma takes bf16 or fp16 here");
    BLOCK_ATTN_WGMMA_SS("bf16", d, desc_a, desc_b, accumulate, kTransposeA ? 1 : 0,
                        kTransposeB ? 1 : 0);
  }
#endif
}

// d (64 x 128, fp32) = A B + (accumulate ? d : 0) for A 64 x 16 and B 16 x 128 in shared memory,
// both K-major (B's rows are the 128 output columns). d[4 j + e] lies as in the 64-wide product,
// for j up to 16. T: __nv_bfloat16 or __half inputs.
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                 bool accumulate) {
#ifdef BLOCK_ATTN_WGMMA
  if constexpr (std::is_same_v<T, __half>) {
    BLOCK_ATTN_WGMMA_SS_N128("f16", d, desc_a, desc_b, accumulate);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "wgmma takes bf16 or fp16 here");
    BLOCK_ATTN_WGMMA_SS_N128("bf16", d, desc_a, desc_b, accumulate);
  }
#endif
}

// d (64 x 64, fp32) += A B for A 64 x 16 in registers, in the mma.sync m16n8k16 A-fragment
// layout per warp (warp w holds rows 16 w ... 16 w + 15), and B 16 x 64 in shared memory through
// desc_b, N-major (B's rows are its 16 k rows). T: __nv_bfloat16 or __half inputs.
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_register_a(float (&d)[32], const uint32_t (&a)[4],
                                                           uint64_t desc_b) {
#ifdef BLOCK_ATTN_WGMMA
  if constexpr (std::is_same_v<T, __half>) {
    BLOCK_ATTN_WGMMA_RS("f16", d, a, desc_b);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "wgmma takes bf16 or fp16 here");
    BLOCK_ATTN_WGMMA_RS("bf16", d, a, desc_b);
  }
#endif
}

#undef BLOCK_ATTN_WGMMA_RS
#undef BLOCK_ATTN_WGMMA_SS
#undef BLOCK_ATTN_WGMMA_SS_N128
#undef BLOCK_ATTN_WGMMA_D128_OPERANDS
#undef BLOCK_ATTN_WGMMA_D128_TEXT
#undef BLOCK_ATTN_WGMMA_D_OPERANDS
#undef BLOCK_ATTN_WGMMA_D_TEXT

}  // namespace block_attn::cuda::hopper

#endif  // BLOCK_ATTN_CUDA_EMULATION

namespace block_attn::cuda::hopper {

// Matrix descriptor of wgmma: start address, leading- and stride-dimension byte offsets (all in
// 16-byte units) and the swizzle mode (1 = 128-byte swizzle) in bits 62-63.
__device__ __forceinline__ uint64_t smem_descriptor(const void* smem, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((address >> 4) & 0x3FFF);
  desc |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16;
  desc |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32;
  desc |= static_cast<uint64_t>(1) << 62;
  return desc;
}

// K-major operand (each row's k elements contiguous) in the 128-byte swizzle layout, starting at
// k element k0 of every row (k0 a multiple of 16, below 64): 8-row groups are 1024 bytes apart;
// the leading offset is unused for this layout.
__device__ __forceinline__ uint64_t k_major_descriptor(const void* tile, int k0) {
  return smem_descriptor(static_cast<const char*>(tile) + k0 * 2, 16, 1024);
}

// MN-major operand 64 elements wide (one swizzle atom: each k row's 64 elements in one 128-byte
// row) starting at k row k0 (a multiple of 8): 8-row k groups are 1024 bytes apart; the leading
// offset, which steps between atoms along M or N, is unused at this width.
__device__ __forceinline__ uint64_t mn_major_descriptor(const void* tile, int k0) {
  return smem_descriptor(static_cast<const char*>(tile) + k0 * 128, 1024, 1024);
}

}  // namespace block_attn::cuda::hopper
