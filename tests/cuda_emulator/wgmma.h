// Host versions of the Hopper warpgroup products in csrc/cuda/hopper/wgmma.cuh. Operands are read
// through the matrix descriptors as the PTX manual lays out the 128-byte swizzle: 16-byte chunk c
// of the 128-byte row at address a lands at chunk c XOR ((a / 128) % 8), so tiles are 1024-byte
// aligned; a K-major operand's 8-row groups are the stride offset apart, an MN-major operand's
// 8-row k groups the stride offset apart and its 64-element column atoms the leading offset. A
// product runs, and its accumulators change, only at the wgmma.wait_group that retires its commit
// group; its accumulator and A-fragment registers must be left alone until then (the accumulators
// hold cuda_emulator::kPendingAccumulator meanwhile). Its shared-memory operand reads are checked
// per 16-byte chunk as the hardware's would need (cuda_emulator::note_async_read): written with a
// __syncthreads since, behind each writing thread's fence.proxy.async, and not overwritten until
// that wait and a __syncthreads after it.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emulator.h"

namespace block_attn::cuda::hopper {

inline void fence_shared_for_async_reads() {
  cuda_emulator::fence_proxy_async();
}
template <typename V>
void store_shared(unsigned char* address, const V& value) {
  if (cuda_emulator::holds_pending_accumulator(&value, sizeof(V))) {
    cuda_emulator::fail("store of a value read from wgmma accumulators before the wait");
  }
  cuda_emulator::note_shared_store(address, sizeof(V));
  std::memcpy(address, &value, sizeof(V));
}
inline void wgmma_fence() {}
// Each thread runs its own products; the warpgroup's first thread keeps the account of operand
// reads.
inline void wgmma_commit() {
  cuda_emulator::commit_products();
  if (cuda_emulator::warpgroup_thread() == 0) cuda_emulator::commit_async_reads();
}
template <int kPending>
void wgmma_wait() {
  cuda_emulator::run_products(kPending);
  if (cuda_emulator::warpgroup_thread() == 0) cuda_emulator::wait_async_reads(kPending);
}
template <typename Register, int kCount>
void fence_operands(Register (&)[kCount]) {}
template <typename Register, int kRows, int kCount>
void fence_operands(Register (&)[kRows][kCount]) {}

namespace emulated {

// Value of a 16-bit element of type T (__nv_bfloat16 or __half) from its bits.
template <typename T>
float element_value(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  } else {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
}

template <typename T>
struct Descriptor {
  uint32_t start, leading, stride;
  explicit Descriptor(uint64_t desc)
      : start(static_cast<uint32_t>(desc & 0x3FFF) << 4),
        leading(static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4),
        stride(static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4) {
    if ((desc >> 62) != 1) cuda_emulator::fail("wgmma descriptor without the 128-byte swizzle");
  }
  static uint32_t swizzled(uint32_t linear) { return linear ^ (((linear >> 7) & 7) << 4); }
  float at(uint32_t linear) const {
    uint16_t bits;
    std::memcpy(&bits, cuda_emulator::shared_at(swizzled(linear), 2), 2);
    if (bits == 0xffffu) {
      cuda_emulator::fail("wgmma read shared memory that was never written or not yet landed");
    }
    return element_value<T>(bits);
  }
  uint32_t k_major_offset(int row, int k) const {
    return start + (row / 8) * stride + (row % 8) * 128 + k * 2;
  }
  uint32_t mn_major_offset(int k, int column) const {
    return start + (k / 8) * stride + (k % 8) * 128 + (column / 64) * leading + (column % 64) * 2;
  }
  // Element (row, k) of a K-major operand (rows of 64 k-elements).
  float k_major(int row, int k) const { return at(k_major_offset(row, k)); }
  // Element (k, column) of an MN-major operand (rows of 64 columns, one per k).
  float mn_major(int k, int column) const { return at(mn_major_offset(k, column)); }
  // Notes every 16-byte chunk of a 16-k operand with `extent` rows (M or N) as read.
  void note_reads(bool mn_major_layout, int extent) const {
    for (int i = 0; i < extent; i += mn_major_layout ? 8 : 1) {
      for (int k = 0; k < 16; k += mn_major_layout ? 1 : 8) {
        const uint32_t linear = mn_major_layout ? mn_major_offset(k, i) : k_major_offset(i, k);
        cuda_emulator::note_async_read(swizzled(linear));
      }
    }
  }
};

// Queues `run` (which forms d) to run at the wait that retires it; d is marked pending until then.
template <int kRegisters, typename Run>
void defer(float (&d)[kRegisters], Run run) {
  cuda_emulator::defer_product(d, sizeof(d), run);
}

// d (64 x N) = A B (+ d): thread t of the warpgroup holds d[4 j + e] = row 16 (t / 32) +
// (t % 32) / 4 + 8 (e / 2), column 8 j + 2 (t % 4) + e % 2.
template <int kRegisters, typename AElement, typename BElement>
void product(float (&d)[kRegisters], bool accumulate, AElement a_at, BElement b_at) {
  const int t = cuda_emulator::warpgroup_thread();
  for (int i = 0; i < kRegisters; ++i) {
    const int row = 16 * (t / 32) + (t % 32) / 4 + 8 * ((i % 4) / 2);
    const int column = 8 * (i / 4) + 2 * (t % 4) + i % 2;
    float sum = accumulate ? d[i] : 0.f;
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, column);
    d[i] = sum;
  }
}

// d (64 x 2 kRegisters) = A B (+ d) with both operands read through descriptors, once every
// thread of the warpgroup has issued the same ones.
template <typename T, bool kTransposeA, bool kTransposeB, int kRegisters>
void shared_memory_product(float (&d)[kRegisters], uint64_t desc_a, uint64_t desc_b,
                           bool accumulate, const char* name) {
  const uint64_t mine[3] = {desc_a, desc_b, accumulate ? 1u : 0u};
  const cuda_emulator::WarpgroupPayloads& all =
      cuda_emulator::warpgroup_exchange(mine, sizeof(mine), name);
  if (std::memcmp(all[0], mine, sizeof(mine)) != 0) {
    cuda_emulator::fail("wgmma operands differ across the warpgroup");
  }
  const Descriptor<T> a(desc_a), b(desc_b);
  if (cuda_emulator::warpgroup_thread() == 0) {
    a.note_reads(kTransposeA, 64);
    b.note_reads(kTransposeB, 2 * kRegisters);
  }
  defer(d, [&d, a, b, accumulate] {
    product(
        d, accumulate,
        [&](int row, int k) { return kTransposeA ? a.mn_major(k, row) : a.k_major(row, k); },
        [&](int k, int column) {
          return kTransposeB ? b.mn_major(k, column) : b.k_major(column, k);
        });
  });
}

}  // namespace emulated

template <typename T, bool kTransposeB, bool kTransposeA = false>
void wgmma_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  const char* name = kTransposeA ? (kTransposeB ? "wgmma.ss.m-major.n-major" : "wgmma.ss.m-major")
                                 : (kTransposeB ? "wgmma.ss.n-major" : "wgmma.ss");
  emulated::shared_memory_product<T, kTransposeA, kTransposeB>(d, desc_a, desc_b, accumulate, name);
}

template <typename T>
void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  emulated::shared_memory_product<T, false, false>(d, desc_a, desc_b, accumulate, "wgmma.ss.n128");
}

template <typename T>
void wgmma_m64n64k16_register_a(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  struct Operands {
    uint32_t a[4];
    uint64_t desc_b;
  } mine{{a[0], a[1], a[2], a[3]}, desc_b};
  const cuda_emulator::WarpgroupPayloads& all =
      cuda_emulator::warpgroup_exchange(&mine, sizeof(mine), "wgmma.rs");
  Operands first;
  std::memcpy(&first, all[0], sizeof(first));
  if (first.desc_b != desc_b) cuda_emulator::fail("wgmma operands differ across the warpgroup");
  // A: warp w's rows 16 w .. 16 w + 15 in the mma.sync m16n8k16 A-fragment layout. This
  // thread's output rows, read from the other threads' registers now (before the next
  // collective reuses the payloads).
  auto a_at = [&](int row, int k) {
    const int warp = row / 16, r = row % 16;
    const int thread = 32 * warp + 4 * (r % 8) + (k % 8) / 2;
    uint16_t bits;
    std::memcpy(&bits, all[thread] + 4 * (r / 8 + 2 * (k / 8)) + 2 * (k % 2), 2);
    return emulated::element_value<T>(bits);
  };
  const int t = cuda_emulator::warpgroup_thread();
  std::array<std::array<float, 16>, 2> rows;  // rows 16 (t / 32) + (t % 32) / 4 + {0, 8}
  for (int half = 0; half < 2; ++half) {
    for (int k = 0; k < 16; ++k) rows[half][k] = a_at(16 * (t / 32) + (t % 32) / 4 + 8 * half, k);
  }
  const emulated::Descriptor<T> b(desc_b);
  if (t == 0) b.note_reads(true, 64);
  const std::array<uint32_t, 4> issued{a[0], a[1], a[2], a[3]};
  emulated::defer(d, [&d, &a, issued, rows, b] {
    if (a[0] != issued[0] || a[1] != issued[1] || a[2] != issued[2] || a[3] != issued[3]) {
      cuda_emulator::fail("wgmma A-fragment registers written before the wait for the product");
    }
    emulated::product(
        d, true, [&](int row, int k) { return rows[(row % 16) / 8][k]; },
        [&](int k, int column) { return b.mn_major(k, column); });
  });
}

}  // namespace block_attn::cuda::hopper
