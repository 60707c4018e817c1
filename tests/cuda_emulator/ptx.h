// Host versions of the PTX wrappers in csrc/cuda/flash/mma_utils.cuh, with the semantics of the PTX
// ISA manual: fragment layouts of ldmatrix and mma.sync.m16n8k16, cp.async that lands at the wait,
// ex2.approx.ftz.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "emulator.h"

namespace block_attn::cuda {

inline void cp_async_16(void* smem, const void* gmem) {
  cuda_emulator::cp_async_16(smem, gmem);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {
  cuda_emulator::cp_async_wait_all();
}

namespace emulated {

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8i..8i+7 give the rows of matrix i.
// Plain: lane l receives (row l / 4, columns 2 (l % 4) + {0, 1}) of every matrix; transposed:
// (rows 2 (l % 4) + {0, 1}, column l / 4).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool transposed) {
  const char* operation = transposed ? "ldmatrix.trans" : "ldmatrix";
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0) {
    cuda_emulator::fail("ldmatrix row address not 16-byte aligned");
  }
  if (!cuda_emulator::in_shared_memory(smem, 16)) {
    cuda_emulator::fail("ldmatrix row outside the CTA's dynamic shared memory");
  }
  cuda_emulator::note_shared_read(smem);
  const cuda_emulator::WarpPayloads& rows =
      cuda_emulator::warp_exchange(&smem, sizeof(smem), operation);
  auto element = [&](int lane, int column) {
    const void* row;
    std::memcpy(&row, rows[lane], sizeof(row));
    uint16_t value;
    std::memcpy(&value, static_cast<const uint16_t*>(row) + column, sizeof(value));
    if (value == 0xffffu) {
      cuda_emulator::fail(
          "ldmatrix read shared memory that was never written or whose cp.async was not waited "
          "for");
    }
    return static_cast<uint32_t>(value);
  };
  const int lane = cuda_emulator::lane_id();
  for (int i = 0; i < 4; ++i) {
    if (transposed) {
      r[i] = element(8 * i + 2 * (lane % 4), lane / 4) |
             element(8 * i + 2 * (lane % 4) + 1, lane / 4) << 16;
    } else {
      r[i] = element(8 * i + lane / 4, 2 * (lane % 4)) |
             element(8 * i + lane / 4, 2 * (lane % 4) + 1) << 16;
    }
  }
}

inline float to_float(uint16_t bits, __half) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}
inline float to_float(uint16_t bits, __nv_bfloat16) {
  __nv_bfloat16_raw raw;
  raw.x = bits;
  return __bfloat162float(__nv_bfloat16(raw));
}

// mma.sync.aligned.m16n8k16.row.col.f32: lane l = 4 g + t holds A (rows g, g + 8; columns
// 2 t + {0, 1} and + 8) in a0..a3, B (rows 2 t + {0, 1} and + 8; column g) in b0, b1 and
// D (rows g, g + 8; columns 2 t + {0, 1}) in d0..d3.
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const cuda_emulator::WarpPayloads& all = cuda_emulator::warp_exchange(
      mine, sizeof(mine), std::is_same_v<T, __half> ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16");
  // Element k % 2 of register `index` of `lane`.
  auto element = [&](int lane, int index, int k) {
    uint16_t bits;
    std::memcpy(&bits, all[lane] + 4 * index + 2 * (k % 2), sizeof(bits));
    return to_float(bits, T{});
  };
  const int lane = cuda_emulator::lane_id();
  for (int e = 0; e < 4; ++e) {
    const int row = lane / 4 + 8 * (e / 2);
    const int column = 2 * (lane % 4) + e % 2;
    float sum = d[e];
    for (int k = 0; k < 16; ++k) {
      const float a_value = element(4 * (row % 8) + (k % 8) / 2, row / 8 + 2 * (k / 8), k);
      const float b_value = element(4 * column + (k % 8) / 2, 4 + k / 8, k);
      sum += a_value * b_value;
    }
    d[e] = sum;
  }
}

}  // namespace emulated

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  emulated::ldmatrix_x4(r, smem, false);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  emulated::ldmatrix_x4(r, smem, true);
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulated::mma_16816<T>(d, a, b0, b1);
}

// ex2.approx.ftz.f32: results below FLT_MIN flush to zero.
inline float fast_exp2(float x) {
  const float y = std::exp2(x);
  return y < FLT_MIN ? 0.f : y;
}

}  // namespace block_attn::cuda
