// Lists this build's CPU kernels in a KernelTable; in a kernel object (one capability of a
// portable build) also exports the table under BLOCK_ATTN_KERNEL_TABLE_SYMBOL.
#include "kernel_table.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "attention_cpu.h"

// Set by the build for each capability's object; the extension's own kernels are "default"
// (baseline x86-64) or "native" (-march=native).
#ifndef BLOCK_ATTN_CPU_CAPABILITY_NAME
#define BLOCK_ATTN_CPU_CAPABILITY_NAME "default"
#endif

namespace block_attn::cpu {

const KernelTable& compiled_kernel_table() {
  static const KernelTable table{
      kKernelTableVersion,
      static_cast<int>(sizeof(BackwardParams)),
      BLOCK_ATTN_CPU_CAPABILITY_NAME,
      {&run_forward<float>, &run_forward<double>, &run_forward<c10::BFloat16>,
       &run_forward<c10::Half>},
      {&run_backward<float>, &run_backward<double>, &run_backward<c10::BFloat16>,
       &run_backward<c10::Half>},
  };
  return table;
}

}  // namespace block_attn::cpu

#ifdef BLOCK_ATTN_CPU_KERNEL_OBJECT
extern "C" __attribute__((visibility("default")))
const block_attn::cpu::KernelTable* block_attn_cpu_kernel_table() {
  return &block_attn::cpu::compiled_kernel_table();
}
#endif
