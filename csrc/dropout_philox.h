// The attention-dropout keep rule of block_attn/dropout_mask.py (Philox4x32-10 on the element's
// global indices), for host C++ and CUDA device code alike. No ATen, so kernels can include it.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace block_attn {

// Philox4x32-10 constants (Salmon et al., SC'11; Random123).
constexpr uint32_t kPhiloxMultiplier0 = 0xD2511F53u;
constexpr uint32_t kPhiloxMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxWeyl0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxWeyl1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct PhiloxKey {
  uint32_t k0, k1;
};

// The four output words of one Philox block; word(l) picks word l without indexing an array,
// which on CUDA would put the block in local memory.
struct PhiloxWords {
  uint32_t w0, w1, w2, w3;

  BLOCK_ATTN_HOST_DEVICE uint32_t word(int lane) const {
    return lane == 0 ? w0 : lane == 1 ? w1 : lane == 2 ? w2 : w3;
  }
};

// The seed as stored in the int64 seed_offset tensor, cast to uint64 (that is, mod 2^64).
BLOCK_ATTN_HOST_DEVICE inline PhiloxKey philox_key(uint64_t seed) {
  return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

// floor(p * 2^32) for p in [0, 1): the product is exact (a power-of-two scale), so truncation
// gives the same integer as Python's int(p * 2**32).
BLOCK_ATTN_HOST_DEVICE inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 4294967296.0);
}

BLOCK_ATTN_HOST_DEVICE inline void philox_mulhilo(uint32_t a, uint32_t multiplier, uint32_t& high,
                                                  uint32_t& low) {
#ifdef __CUDA_ARCH__
  high = __umulhi(a, multiplier);
  low = a * multiplier;
#else
  const uint64_t product = static_cast<uint64_t>(a) * multiplier;
  high = static_cast<uint32_t>(product >> 32);
  low = static_cast<uint32_t>(product);
#endif
}

BLOCK_ATTN_HOST_DEVICE inline PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                                        uint32_t c3, PhiloxKey key) {
  uint32_t k0 = key.k0;
  uint32_t k1 = key.k1;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    uint32_t high0, low0, high1, low1;
    philox_mulhilo(c0, kPhiloxMultiplier0, high0, low0);
    philox_mulhilo(c2, kPhiloxMultiplier1, high1, low1);
    const uint32_t next0 = high1 ^ c1 ^ k0;
    c1 = low1;
    c2 = high0 ^ c3 ^ k1;
    c3 = low0;
    c0 = next0;
    // The bump after the last round is dead and compiled away.
    k0 += kPhiloxWeyl0;
    k1 += kPhiloxWeyl1;
  }
  return {c0, c1, c2, c3};
}

// Whether element (batch_head = b * Hq + h, query_row i, key_row j) is kept: word j mod 4 of the
// block at counter (j div 4, i, batch_head, offset mod 2^32) is >= threshold. Counter words take
// the low 32 bits of j div 4 and i; that equals the Python rule for i < 2^32 and j < 2^34 (the
// int32 cu_seqlens keep real indices below 2^31). Past that the Python's int64 arithmetic is not
// Philox on any 32-bit counter, and the two are not expected to agree.
// dropout_words gives the whole block, which serves keys 4c .. 4c + 3 of the row at once.
BLOCK_ATTN_HOST_DEVICE inline PhiloxWords dropout_words(uint64_t seed, uint64_t offset,
                                                        uint32_t batch_head, int64_t query_row,
                                                        int64_t key_row) {
  return philox4x32_10(static_cast<uint32_t>(key_row >> 2), static_cast<uint32_t>(query_row),
                       batch_head, static_cast<uint32_t>(offset), philox_key(seed));
}

BLOCK_ATTN_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint64_t offset, uint32_t batch_head,
                                                int64_t query_row, int64_t key_row,
                                                uint32_t threshold) {
  const PhiloxWords words = dropout_words(seed, offset, batch_head, query_row, key_row);
  return words.word(static_cast<int>(key_row & 3)) >= threshold;
}

// Philox4x32-10 of n counters (c0, c1[l], c2[l], c3), word k of lane l into wk[l]. Branch-free
// lanes, so g++ -O3 vectorises the loop. Host only. With AVX-512 the words live in 64-bit lanes
// (the multiply is then one vpmuludq on their low halves, with no repacking between rounds: twice
// as fast there); AVX2 packs 32-bit words better.
inline void philox4x32_10_lanes(uint32_t c0, const uint32_t* __restrict c1,
                                const uint32_t* __restrict c2, uint32_t c3, PhiloxKey key, int n,
                                uint32_t* __restrict w0, uint32_t* __restrict w1,
                                uint32_t* __restrict w2, uint32_t* __restrict w3) {
#ifdef __AVX512F__
  constexpr uint64_t kLow = 0xFFFFFFFFu;
  for (int lane = 0; lane < n; ++lane) {
    uint64_t x0 = c0, x1 = c1[lane], x2 = c2[lane], x3 = c3;
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const uint64_t product0 = (x0 & kLow) * kPhiloxMultiplier0;
      const uint64_t product1 = (x2 & kLow) * kPhiloxMultiplier1;
      x0 = (product1 >> 32) ^ x1 ^ k0;
      x1 = product1;
      x2 = (product0 >> 32) ^ x3 ^ k1;
      x3 = product0;
      k0 += kPhiloxWeyl0;
      k1 += kPhiloxWeyl1;
    }
    w0[lane] = static_cast<uint32_t>(x0);
    w1[lane] = static_cast<uint32_t>(x1);
    w2[lane] = static_cast<uint32_t>(x2);
    w3[lane] = static_cast<uint32_t>(x3);
  }
#else
  for (int lane = 0; lane < n; ++lane) {
    const PhiloxWords words = philox4x32_10(c0, c1[lane], c2[lane], c3, key);
    w0[lane] = words.w0;
    w1[lane] = words.w1;
    w2[lane] = words.w2;
    w3[lane] = words.w3;
  }
#endif
}

}  // namespace block_attn
