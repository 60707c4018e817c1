// Dynamic scheduling of the CPU kernels' work items over ATen's threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace block_attn::cpu {

// Calls body(item, scratch) for every item in [0, count), each thread taking the next item from
// a shared counter with a scratch made once per thread by make_scratch(). List the costliest
// items first and threads finish together even when blocks differ a hundredfold in size. Items
// must write disjoint outputs; results then do not depend on which thread ran which item.
template <typename MakeScratch, typename Body>
void run_work_items(int64_t count, const MakeScratch& make_scratch, const Body& body) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::clamp<int64_t>(at::get_num_threads(), 1, count);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t item = next.fetch_add(1); item < count; item = next.fetch_add(1)) {
      body(item, scratch);
    }
  });
}

}  // namespace block_attn::cpu
