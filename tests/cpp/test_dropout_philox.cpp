// Checks csrc/dropout_philox.h without torch: Philox4x32-10 against the Random123 known answers,
// the lane-parallel form against the scalar one, and dropout_keep against decisions of the Python
// rule (block_attn/dropout_mask.py).
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "dropout_philox.h"

namespace {

using block_attn::PhiloxKey;
using block_attn::PhiloxWords;

int failures = 0;

struct KnownAnswer {
  uint32_t counter[4];
  PhiloxKey key;
  uint32_t expected[4];
};

// Published with Random123 (kat_vectors).
constexpr KnownAnswer kKnownAnswers[] = {
    {{0, 0, 0, 0}, {0, 0}, {0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8}},
    {{0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF},
     {0xFFFFFFFF, 0xFFFFFFFF},
     {0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD}},
    {{0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344},
     {0xA4093822, 0x299F31D0},
     {0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1}},
};

void check_known_answers() {
  for (const KnownAnswer& answer : kKnownAnswers) {
    const uint32_t* c = answer.counter;
    const PhiloxWords got = block_attn::philox4x32_10(c[0], c[1], c[2], c[3], answer.key);
    const uint32_t* want = answer.expected;
    const bool ok =
        got.w0 == want[0] && got.w1 == want[1] && got.w2 == want[2] && got.w3 == want[3];
    std::printf("%-5s philox4x32_10(%08x %08x %08x %08x; %08x %08x) = %08x %08x %08x %08x\n",
                ok ? "ok" : "FAIL", c[0], c[1], c[2], c[3], answer.key.k0, answer.key.k1, got.w0,
                got.w1, got.w2, got.w3);
    if (!ok) {
      std::printf("      expected %08x %08x %08x %08x\n", want[0], want[1], want[2], want[3]);
      ++failures;
    }
  }
}

// An odd lane count, so a vectorised loop also runs its remainder.
void check_lanes_match_scalar() {
  constexpr int kLanes = 301;
  std::mt19937 random(20240611);
  std::vector<uint32_t> c1(kLanes), c2(kLanes), w0(kLanes), w1(kLanes), w2(kLanes), w3(kLanes);
  int mismatches = 0;
  for (int trial = 0; trial < 4; ++trial) {
    const uint32_t c0 = random();
    const uint32_t c3 = random();
    const PhiloxKey key{static_cast<uint32_t>(random()), static_cast<uint32_t>(random())};
    for (int lane = 0; lane < kLanes; ++lane) {
      c1[lane] = random();
      c2[lane] = random();
    }
    block_attn::philox4x32_10_lanes(c0, c1.data(), c2.data(), c3, key, kLanes, w0.data(), w1.data(),
                                    w2.data(), w3.data());
    for (int lane = 0; lane < kLanes; ++lane) {
      const PhiloxWords want = block_attn::philox4x32_10(c0, c1[lane], c2[lane], c3, key);
      if (w0[lane] != want.w0 || w1[lane] != want.w1 || w2[lane] != want.w2 ||
          w3[lane] != want.w3) {
        if (mismatches++ < 5) {
          std::printf(
              "      trial %d lane %d: lanes %08x %08x %08x %08x, scalar %08x %08x %08x %08x\n",
              trial, lane, w0[lane], w1[lane], w2[lane], w3[lane], want.w0, want.w1, want.w2,
              want.w3);
        }
      }
    }
  }
  std::printf("%-5s philox4x32_10_lanes equals the scalar form (%d mismatches of %d lanes)\n",
              mismatches == 0 ? "ok" : "FAIL", mismatches, 4 * kLanes);
  failures += mismatches == 0 ? 0 : 1;
}

struct KeepCase {
  int64_t seed;    // as stored in the int64 seed_offset tensor
  int64_t offset;  // likewise
  uint32_t batch_head;
  int64_t query_row;
  int64_t key_row;
  double p;
  bool keep;
};

// Generated with the Python rule: keep_mask(torch.tensor([seed, offset]), p, b + 1, Hq,
// torch.tensor([i]), torch.tensor([j]))[b, h, 0, 0] with batch_head = b * Hq + h. For each
// element the first two p put the threshold at its word u and at u + 1 (kept, then dropped).
// Rows reach i = 2^32 - 1 and j = 2^34 - 1, the largest indices where the rules agree.
constexpr KeepCase kKeepCases[] = {
    {0, 0, 0u, 0, 0, 0.3990464706439525, true},
    {0, 0, 0u, 0, 0, 0.39904647087678313, false},
    {0, 0, 0u, 0, 0, 0.5, false},
    {1234, 0, 6u, 5, 7, 0.5041947276331484, true},
    {1234, 0, 6u, 5, 7, 0.5041947278659791, false},
    {1234, 0, 6u, 5, 7, 0.5, true},
    {-1, 0, 19u, 17, 6, 0.35858167451806366, true},
    {-1, 0, 19u, 17, 6, 0.3585816747508943, false},
    {-1, 0, 19u, 17, 6, 0.5, false},
    {-7, 5, 3u, 13, 29, 0.1411538179963827, true},
    {-7, 5, 3u, 13, 29, 0.14115381822921336, false},
    {-7, 5, 3u, 13, 29, 0.5, false},
    {INT64_MIN, 4294967299LL, 57u, 1000, 1001, 0.6928695631213486, true},
    {INT64_MIN, 4294967299LL, 57u, 1000, 1001, 0.6928695633541793, false},
    {INT64_MIN, 4294967299LL, 57u, 1000, 1001, 0.5, true},
    {9223372036854775807LL, -1, 12345u, 123456, 654321, 0.1453495053574443, true},
    {9223372036854775807LL, -1, 12345u, 123456, 654321, 0.14534950559027493, false},
    {9223372036854775807LL, -1, 12345u, 123456, 654321, 0.5, false},
    {-81985529216486895LL, 987654321, 7u, 2147483647, 2147483646, 0.5936238972935826, true},
    {-81985529216486895LL, 987654321, 7u, 2147483647, 2147483646, 0.5936238975264132, false},
    {-81985529216486895LL, 987654321, 7u, 2147483647, 2147483646, 0.5, true},
    {62410555435956926LL, -1099511627776LL, 4u, 4294967295LL, 17179869183LL, 0.248426113743335,
     true},
    {62410555435956926LL, -1099511627776LL, 4u, 4294967295LL, 17179869183LL, 0.24842611397616565,
     false},
    {62410555435956926LL, -1099511627776LL, 4u, 4294967295LL, 17179869183LL, 0.5, false},
    {-42, 9223372036854775807LL, 511u, 4096, 4095, 0.4616098783444613, true},
    {-42, 9223372036854775807LL, 511u, 4096, 4095, 0.46160987857729197, false},
    {-42, 9223372036854775807LL, 511u, 4096, 4095, 0.5, false},
    {314159265358979LL, 271828, 48u, 99, 3, 0.8720229458995163, true},
    {314159265358979LL, 271828, 48u, 99, 3, 0.872022946132347, false},
    {314159265358979LL, 271828, 48u, 99, 3, 0.5, true},
};

void check_keep_decisions() {
  int mismatches = 0;
  for (const KeepCase& c : kKeepCases) {
    const uint32_t threshold = block_attn::dropout_threshold(c.p);
    const bool got =
        block_attn::dropout_keep(static_cast<uint64_t>(c.seed), static_cast<uint64_t>(c.offset),
                                 c.batch_head, c.query_row, c.key_row, threshold);
    if (got != c.keep) {
      ++mismatches;
      std::printf("      seed %" PRId64 " offset %" PRId64 " batch_head %u i %" PRId64 " j %" PRId64
                  " p %.17g (threshold %u): got %d, expected %d\n",
                  c.seed, c.offset, c.batch_head, c.query_row, c.key_row, c.p, threshold, got,
                  c.keep);
    }
  }
  const int total = static_cast<int>(sizeof(kKeepCases) / sizeof(kKeepCases[0]));
  std::printf("%-5s dropout_keep matches keep_mask (%d mismatches of %d cases)\n",
              mismatches == 0 ? "ok" : "FAIL", mismatches, total);
  failures += mismatches == 0 ? 0 : 1;
}

}  // namespace

int main() {
  check_known_answers();
  check_lanes_match_scalar();
  check_keep_decisions();
  std::printf("%s\n", failures == 0 ? "all passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
