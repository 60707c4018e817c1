// Transparent huge pages for the large tensors the CPU kernels write.
//
// A fresh tensor of tens of MB comes from mmap, and its first write takes one page fault per
// 4 KB page, which costs more than the writes themselves. Asking for 2 MB pages on the tensor's
// aligned interior (the allocator does not align to 2 MB) cuts the faults 512-fold. It is only a
// hint: nothing changes where THP is off or memory is mapped.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace block_attn::cpu {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.numel() * t.element_size();
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace block_attn::cpu
